// sep_conv's depthwise case on CPU (groups == C == K == N); see sep_conv_depthwise.h.
//
// Per channel c, with zero padding:
//   t[b, c, i, w] = sum_a wv[c, a] x[b, c, i sv - pv + a lv, w]               (i < H', w < W)
//   y[b, c, i, j] = bias[c] + sum_e wh[c, e] t[b, c, i, j sh - ph + e lh]     (j < W')
// The intermediate row t[b, :, i, :] lives in a per-thread buffer padded by ph zero columns on
// each side, so the horizontal taps read it without bounds checks.
//
// Forward: channels_last works on one output row (b, i) at a time, all channels at once (the
// innermost loops run over contiguous channels, up to three taps per loop); NCHW works on one (b, c) plane at a time,
// the innermost loops over contiguous columns. Backward: every thread owns a block of channels (all batches and rows of
// them), so the input gradient can be accumulated in place and the weight gradients need no reduction across threads.
// 16-bit inputs compute in float32.
#include "depthwise.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace lowrank {
namespace {

using at::Tensor;

struct Dw {
  int64_t B, C, H, W, dv, dh, sv, sh, pv, ph, lv, lh, Ho, Wo;
  int64_t wp() const { return W + 2 * ph; }  // padded intermediate row width
  // Input row of output row i's vertical tap a, or -1 where the tap falls into the padding.
  int64_t row(int64_t i, int64_t a) const {
    const int64_t r = i * sv - pv + a * lv;
    return (r >= 0 && r < H) ? r : -1;
  }
};

Dw make_dw(const Tensor& input, const Tensor& weight_v, const Tensor& weight_h, at::IntArrayRef stride,
           at::IntArrayRef padding, at::IntArrayRef dilation) {
  Dw s{};
  s.B = input.size(0);
  s.C = input.size(1);
  s.H = input.size(2);
  s.W = input.size(3);
  s.dv = weight_v.size(2);
  s.dh = weight_h.size(3);
  s.sv = stride[0];
  s.sh = stride[1];
  s.pv = padding[0];
  s.ph = padding[1];
  s.lv = dilation[0];
  s.lh = dilation[1];
  s.Ho = (s.H + 2 * s.pv - s.lv * (s.dv - 1) - 1) / s.sv + 1;
  s.Wo = (s.W + 2 * s.ph - s.lh * (s.dh - 1) - 1) / s.sh + 1;
  return s;
}

at::ScalarType compute_type(at::ScalarType t) { return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t; }

// ---------------------------------------------------------------------------- forward

// out[c] = (init ? init[c] : 0) + sum_k w[k][c] src[k][c] for c < n. Up to three taps per pass,
// each pass one loop over contiguous channels, so out is loaded and stored once per three taps
// and every loop vectorizes.
template <typename T>
inline void weighted_sum(T* __restrict out, const T* __restrict init, const T* const* src, const T* const* w, int64_t m,
                         int64_t n) {
  int64_t k = 0;
  if (m >= 3) {
    const T* __restrict s0 = src[0], * __restrict s1 = src[1], * __restrict s2 = src[2];
    const T* __restrict w0 = w[0], * __restrict w1 = w[1], * __restrict w2 = w[2];
    if (init) {
      for (int64_t c = 0; c < n; ++c) out[c] = init[c] + w0[c] * s0[c] + w1[c] * s1[c] + w2[c] * s2[c];
    } else {
      for (int64_t c = 0; c < n; ++c) out[c] = w0[c] * s0[c] + w1[c] * s1[c] + w2[c] * s2[c];
    }
    k = 3;
  } else if (m == 2) {
    const T* __restrict s0 = src[0], * __restrict s1 = src[1], * __restrict w0 = w[0], * __restrict w1 = w[1];
    if (init) {
      for (int64_t c = 0; c < n; ++c) out[c] = init[c] + w0[c] * s0[c] + w1[c] * s1[c];
    } else {
      for (int64_t c = 0; c < n; ++c) out[c] = w0[c] * s0[c] + w1[c] * s1[c];
    }
    k = 2;
  } else if (m == 1) {
    const T* __restrict s0 = src[0], * __restrict w0 = w[0];
    if (init) {
      for (int64_t c = 0; c < n; ++c) out[c] = init[c] + w0[c] * s0[c];
    } else {
      for (int64_t c = 0; c < n; ++c) out[c] = w0[c] * s0[c];
    }
    k = 1;
  } else if (init) {
    std::copy(init, init + n, out);
  } else {
    std::fill(out, out + n, T(0));
  }
  for (; k + 2 < m; k += 3) {
    const T* __restrict s0 = src[k], * __restrict s1 = src[k + 1], * __restrict s2 = src[k + 2];
    const T* __restrict w0 = w[k], * __restrict w1 = w[k + 1], * __restrict w2 = w[k + 2];
    for (int64_t c = 0; c < n; ++c) out[c] += w0[c] * s0[c] + w1[c] * s1[c] + w2[c] * s2[c];
  }
  for (; k < m; ++k) {
    const T* __restrict s0 = src[k], * __restrict w0 = w[k];
    for (int64_t c = 0; c < n; ++c) out[c] += w0[c] * s0[c];
  }
}

// channels_last: x (B, H, W, C), wvt (dv, C), wht (dh, C), y (B, H', W', C).
template <typename T>
void forward_cl(const Dw& s, const T* x, const T* wvt, const T* wht, const T* bias, T* y) {
  const int64_t C = s.C;
  at::parallel_for(0, s.B * s.Ho, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> buf(s.wp() * C, T(0));  // the padding columns stay zero
    T* t = buf.data() + s.ph * C;
    std::vector<const T*> src(std::max(s.dv, s.dh)), wts(std::max(s.dv, s.dh));
    std::vector<const T*> hw(s.dh), rows(s.dv);
    for (int64_t e = 0; e < s.dh; ++e) hw[e] = wht + e * C;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / s.Ho, i = item % s.Ho;
      // Vertical stage: the taps that fall inside the image, then one pass per column.
      int64_t m = 0;
      for (int64_t a = 0; a < s.dv; ++a) {
        const int64_t r = s.row(i, a);
        if (r < 0) continue;
        rows[m] = x + (b * s.H + r) * s.W * C;
        wts[m] = wvt + a * C;
        ++m;
      }
      for (int64_t w = 0; w < s.W; ++w) {
        for (int64_t k = 0; k < m; ++k) src[k] = rows[k] + w * C;
        weighted_sum<T>(t + w * C, nullptr, src.data(), wts.data(), m, C);
      }
      // Horizontal stage.
      T* yr = y + (b * s.Ho + i) * s.Wo * C;
      for (int64_t j = 0; j < s.Wo; ++j) {
        for (int64_t e = 0; e < s.dh; ++e) src[e] = buf.data() + (j * s.sh + e * s.lh) * C;
        weighted_sum<T>(yr + j * C, bias, src.data(), hw.data(), s.dh, C);
      }
    }
  });
}

// NCHW: x (B, C, H, W), wv (C, dv), wh (C, dh), y (B, C, H', W').
template <typename T>
void forward_nchw(const Dw& s, const T* x, const T* wv, const T* wh, const T* bias, T* y) {
  at::parallel_for(0, s.B * s.C, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> buf(s.wp(), T(0));
    T* t = buf.data() + s.ph;
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t c = plane % s.C;
      const T* xp = x + plane * s.H * s.W;
      T* yp = y + plane * s.Ho * s.Wo;
      const T* wvc = wv + c * s.dv;
      const T* whc = wh + c * s.dh;
      const T b0 = bias ? bias[c] : T(0);
      for (int64_t i = 0; i < s.Ho; ++i) {
        std::fill(t, t + s.W, T(0));
        for (int64_t a = 0; a < s.dv; ++a) {
          const int64_t r = s.row(i, a);
          if (r < 0) continue;
          const T* __restrict xr = xp + r * s.W;
          T* __restrict tt = t;
          const T w = wvc[a];
          for (int64_t col = 0; col < s.W; ++col) tt[col] += w * xr[col];
        }
        T* __restrict yr = yp + i * s.Wo;
        std::fill(yr, yr + s.Wo, b0);
        for (int64_t e = 0; e < s.dh; ++e) {
          const T w = whc[e];
          const T* __restrict tp = buf.data() + e * s.lh;
          if (s.sh == 1) {
            for (int64_t j = 0; j < s.Wo; ++j) yr[j] += w * tp[j];
          } else {
            for (int64_t j = 0; j < s.Wo; ++j) yr[j] += w * tp[j * s.sh];
          }
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------- backward

// Channels per backward work item: at least 16 (a cache line of float32), and enough items to
// keep every thread busy.
int64_t channel_block(int64_t C) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t cb = (C / (2 * threads)) / 16 * 16;
  return std::min(C, std::max<int64_t>(16, cb));
}

// Both layouts: element (b, c, h, w) of a (B, C, rows, cols) tensor lives at
// b * bs + h * hs + w * ws + c * cs; `n` channels of a block are handled together, with the
// per-thread rows stored (column, channel) so the innermost loop runs over channels (n > 1,
// channels_last) or over columns (n == 1, NCHW).
template <typename T>
void backward(const Dw& s, bool cl, const T* gy, const T* x, const T* wv, const T* wh, T* gx, T* gwv, T* gwh) {
  const int64_t C = s.C, n_blk = cl ? channel_block(C) : 1;
  const int64_t items = (C + n_blk - 1) / n_blk;
  // Strides (in elements) of input-like and output-like tensors.
  const int64_t xs_b = C * s.H * s.W, xs_h = cl ? s.W * C : s.W, xs_w = cl ? C : 1, xs_c = cl ? 1 : s.H * s.W;
  const int64_t ys_b = C * s.Ho * s.Wo, ys_h = cl ? s.Wo * C : s.Wo, ys_w = cl ? C : 1, ys_c = cl ? 1 : s.Ho * s.Wo;
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    const int64_t nmax = n_blk;
    std::vector<T> tbuf(s.wp() * nmax, T(0)), gtbuf(s.wp() * nmax, T(0));
    // Weight-gradient accumulators per (tap, column, channel): the column index keeps the
    // innermost loops free of reductions, so they vectorize; summed once per block.
    std::vector<T> accv(gwv ? s.dv * s.W * nmax : 0), acch(gwh ? s.dh * s.Wo * nmax : 0);
    std::vector<T> wvb(s.dv * nmax), whb(s.dh * nmax);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t c0 = item * n_blk, n = std::min(n_blk, C - c0);
      for (int64_t cc = 0; cc < n; ++cc) {
        for (int64_t a = 0; a < s.dv; ++a) wvb[a * n + cc] = wv[(c0 + cc) * s.dv + a];
        for (int64_t e = 0; e < s.dh; ++e) whb[e * n + cc] = wh[(c0 + cc) * s.dh + e];
      }
      std::fill(accv.begin(), accv.end(), T(0));
      std::fill(acch.begin(), acch.end(), T(0));
      T* t = tbuf.data() + s.ph * n;
      T* gt = gtbuf.data() + s.ph * n;
      for (int64_t b = 0; b < s.B; ++b) {
        for (int64_t i = 0; i < s.Ho; ++i) {
          const T* gyr = gy + b * ys_b + i * ys_h + c0 * ys_c;
          if (gwh) {                                                   // recompute the intermediate row of this block
            std::fill(tbuf.begin(), tbuf.begin() + s.wp() * n, T(0));  // n changes on the last block
            for (int64_t a = 0; a < s.dv; ++a) {
              const int64_t r = s.row(i, a);
              if (r < 0) continue;
              const T* xr = x + b * xs_b + r * xs_h + c0 * xs_c;
              for (int64_t w = 0; w < s.W; ++w) {
                T* __restrict tw = t + w * n;
                const T* __restrict wa = wvb.data() + a * n;
                if (n == 1) {
                  tw[0] += wa[0] * xr[w * xs_w];
                } else {
                  const T* __restrict xw = xr + w * xs_w;
                  for (int64_t cc = 0; cc < n; ++cc) tw[cc] += wa[cc] * xw[cc];
                }
              }
            }
            for (int64_t e = 0; e < s.dh; ++e) {
              T* __restrict acc = acch.data() + e * s.Wo * n;
              for (int64_t j = 0; j < s.Wo; ++j) {
                const T* __restrict tp = tbuf.data() + (j * s.sh + e * s.lh) * n;
                const T* __restrict g = gyr + j * ys_w;
                T* __restrict aj = acc + j * n;
                for (int64_t cc = 0; cc < n; ++cc) aj[cc] += g[cc] * tp[cc];
              }
            }
          }
          if (!gx && !gwv) continue;
          // Gradient of the intermediate row: the horizontal stage transposed.
          std::fill(gtbuf.begin(), gtbuf.begin() + s.wp() * n, T(0));
          for (int64_t e = 0; e < s.dh; ++e) {
            const T* __restrict we = whb.data() + e * n;
            for (int64_t j = 0; j < s.Wo; ++j) {
              T* __restrict gp = gtbuf.data() + (j * s.sh + e * s.lh) * n;
              const T* __restrict g = gyr + j * ys_w;
              for (int64_t cc = 0; cc < n; ++cc) gp[cc] += we[cc] * g[cc];
            }
          }
          // The vertical stage transposed: input gradient and weight_v gradient.
          for (int64_t a = 0; a < s.dv; ++a) {
            const int64_t r = s.row(i, a);
            if (r < 0) continue;
            const T* xr = x + b * xs_b + r * xs_h + c0 * xs_c;
            T* gxr = gx ? gx + b * xs_b + r * xs_h + c0 * xs_c : nullptr;
            const T* __restrict wa = wvb.data() + a * n;
            T* __restrict av = gwv ? accv.data() + a * s.W * n : nullptr;
            if (!cl) {  // NCHW: one channel, contiguous columns
              const T w = wa[0];
              if (gxr) {
                T* __restrict gxo = gxr;
                for (int64_t col = 0; col < s.W; ++col) gxo[col] += w * gt[col];
              }
              if (av) {
                const T* __restrict xo = xr;
                for (int64_t col = 0; col < s.W; ++col) av[col] += gt[col] * xo[col];
              }
            } else {
              for (int64_t col = 0; col < s.W; ++col) {
                const T* __restrict gc = gt + col * n;
                if (gxr) {
                  T* __restrict gxo = gxr + col * xs_w;
                  for (int64_t cc = 0; cc < n; ++cc) gxo[cc] += wa[cc] * gc[cc];
                }
                if (av) {
                  const T* __restrict xo = xr + col * xs_w;
                  T* __restrict ac = av + col * n;
                  for (int64_t cc = 0; cc < n; ++cc) ac[cc] += gc[cc] * xo[cc];
                }
              }
            }
          }
        }
      }
      for (int64_t cc = 0; cc < n; ++cc) {
        if (gwv) {
          for (int64_t a = 0; a < s.dv; ++a) {
            T sum = 0;
            for (int64_t col = 0; col < s.W; ++col) sum += accv[(a * s.W + col) * n + cc];
            gwv[(c0 + cc) * s.dv + a] = sum;
          }
        }
        if (gwh) {
          for (int64_t e = 0; e < s.dh; ++e) {
            T sum = 0;
            for (int64_t j = 0; j < s.Wo; ++j) sum += acch[(e * s.Wo + j) * n + cc];
            gwh[(c0 + cc) * s.dh + e] = sum;
          }
        }
      }
    }
  });
}

}  // namespace

bool sep_conv_is_depthwise(const Tensor& input, const Tensor& weight_v, const Tensor& weight_h, int64_t groups) {
  const int64_t C = input.size(1);
  return groups == C && weight_v.size(0) == C && weight_v.size(1) == 1 && weight_h.size(0) == C &&
         weight_h.size(1) == 1;
}

Tensor sep_conv_depthwise_forward(const Tensor& input, const Tensor& weight_v, const Tensor& weight_h,
                                  const std::optional<Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                                  at::IntArrayRef dilation) {
  const Dw s = make_dw(input, weight_v, weight_h, stride, padding, dilation);
  const auto memory_format = input.suggest_memory_format();
  const bool cl = memory_format == at::MemoryFormat::ChannelsLast;
  const auto ct = compute_type(input.scalar_type());
  Tensor out = at::empty({s.B, s.C, s.Ho, s.Wo}, input.options().dtype(ct).memory_format(memory_format));
  if (out.numel() == 0) return out.to(input.scalar_type());
  const Tensor x = input.to(ct).contiguous(memory_format);
  const bool has_bias = bias.has_value() && bias->defined();
  const Tensor b = has_bias ? bias->to(ct).contiguous() : Tensor();
  Tensor wv = weight_v.to(ct).reshape({s.C, s.dv}), wh = weight_h.to(ct).reshape({s.C, s.dh});
  wv = cl ? wv.t().contiguous() : wv.contiguous();
  wh = cl ? wh.t().contiguous() : wh.contiguous();
  AT_DISPATCH_FLOATING_TYPES(ct, "sep_conv_depthwise_forward", [&] {
    const scalar_t* bp = has_bias ? b.data_ptr<scalar_t>() : nullptr;
    auto kernel = cl ? &forward_cl<scalar_t> : &forward_nchw<scalar_t>;
    kernel(s, x.data_ptr<scalar_t>(), wv.data_ptr<scalar_t>(), wh.data_ptr<scalar_t>(), bp, out.data_ptr<scalar_t>());
  });
  return out.to(input.scalar_type());
}

std::tuple<Tensor, Tensor, Tensor> sep_conv_depthwise_backward(const Tensor& grad_out, const Tensor& input,
                                                               const Tensor& weight_v, const Tensor& weight_h,
                                                               at::IntArrayRef stride, at::IntArrayRef padding,
                                                               at::IntArrayRef dilation,
                                                               std::array<bool, 3> output_mask) {
  const Dw s = make_dw(input, weight_v, weight_h, stride, padding, dilation);
  const auto ct = compute_type(input.scalar_type());
  const auto memory_format = input.suggest_memory_format();
  const bool cl = memory_format == at::MemoryFormat::ChannelsLast;
  // at::zeros takes no memory format: zero an empty tensor of the input's layout instead.
  Tensor gx = output_mask[0] ? at::empty(input.sizes(), input.options().dtype(ct).memory_format(memory_format)).zero_()
                             : at::empty({0}, input.options());
  Tensor gwv =
      output_mask[1] ? at::zeros(weight_v.sizes(), weight_v.options().dtype(ct)) : at::empty({0}, weight_v.options());
  Tensor gwh =
      output_mask[2] ? at::zeros(weight_h.sizes(), weight_h.options().dtype(ct)) : at::empty({0}, weight_h.options());
  if (s.B > 0 && s.C > 0 && s.Ho > 0 && s.Wo > 0 && (output_mask[0] || output_mask[1] || output_mask[2])) {
    const Tensor x = input.to(ct).contiguous(memory_format);
    const Tensor gy = grad_out.to(ct).contiguous(memory_format);
    const Tensor wv = weight_v.to(ct).contiguous(), wh = weight_h.to(ct).contiguous();
    AT_DISPATCH_FLOATING_TYPES(ct, "sep_conv_depthwise_backward", [&] {
      backward<scalar_t>(s, cl, gy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), wv.data_ptr<scalar_t>(),
                         wh.data_ptr<scalar_t>(), output_mask[0] ? gx.data_ptr<scalar_t>() : nullptr,
                         output_mask[1] ? gwv.data_ptr<scalar_t>() : nullptr,
                         output_mask[2] ? gwh.data_ptr<scalar_t>() : nullptr);
    });
  }
  const auto dt = input.scalar_type();
  return {gx.to(dt), gwv.to(dt), gwh.to(dt)};
}

}  // namespace lowrank
