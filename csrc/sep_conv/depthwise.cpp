// sep_conv's depthwise case on CPU (groups == C == K == N); see depthwise.h.
//
// Per channel c, with zero padding:
//   t[b, c, i, w] = sum_a wv[c, a] x[b, c, i sv - pv + a lv, w]               (i < H', w < W)
//   y[b, c, i, j] = bias[c] + sum_e wh[c, e] t[b, c, i, j sh - ph + e lh]     (j < W')
//
// Forward: the vectorized kernels of depthwise_kernels.h, compiled per instruction-set level and
// chosen here with cpu_capability(); they read and write the tensors' own dtype (float32,
// bfloat16, float16). Backward (here, portable loops): every thread owns a block of channels (all
// batches and rows of them), so the input gradient can be accumulated in place and the weight
// gradients need no reduction across threads; 16-bit tensors compute in float32. Its
// intermediate rows live in per-thread buffers padded by ph zero columns on each side, so the
// horizontal taps read them without bounds checks.
#include "depthwise.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "../cpu_capability.h"
#include "depthwise_isa.h"

namespace lowrank {
namespace sep_conv {
namespace {

bool cpu_has_f16c() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("f16c") != 0;
  }();
  return has;
#else
  return false;
#endif
}

bool cpu_has_avx512bf16() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") != 0;
  }();
  return has;
#else
  return false;
#endif
}

// Padded intermediate row width.
int64_t padded_width(const SepConvShape& s) { return s.width + 2 * s.pad_h; }

// Input row of output row i's vertical tap a, or -1 where the tap falls into the padding.
int64_t input_row(const SepConvShape& s, int64_t i, int64_t a) {
  const int64_t r = i * s.stride_v - s.pad_v + a * s.dil_v;
  return (r >= 0 && r < s.height) ? r : -1;
}

at::ScalarType compute_type(at::ScalarType t) { return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t; }

// ---------------------------------------------------------------------------- forward

// float64 (no vectorized kernel; tests and references use it): plain loops, NCHW planes.
void forward_double(const SepConvShape& s, bool cl, const double* x, const double* wv, const double* wh,
                    const double* bias, double* y) {
  const int64_t C = s.in_channels, H = s.height, W = s.width, Ho = s.out_height, Wo = s.out_width;
  const int64_t xs_c = cl ? 1 : H * W, xs_h = cl ? W * C : W, xs_w = cl ? C : 1;
  const int64_t ys_c = cl ? 1 : Ho * Wo, ys_h = cl ? Wo * C : Wo, ys_w = cl ? C : 1;
  at::parallel_for(0, s.batch * C, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> buf(padded_width(s), 0.0);
    double* t = buf.data() + s.pad_h;
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t b = plane / C, c = plane % C;
      const double* xp = x + b * C * H * W + c * xs_c;
      double* yp = y + b * C * Ho * Wo + c * ys_c;
      for (int64_t i = 0; i < Ho; ++i) {
        std::fill(t, t + W, 0.0);
        for (int64_t a = 0; a < s.dv; ++a) {
          const int64_t r = input_row(s, i, a);
          if (r < 0) continue;
          for (int64_t w = 0; w < W; ++w) t[w] += wv[c * s.dv + a] * xp[r * xs_h + w * xs_w];
        }
        for (int64_t j = 0; j < Wo; ++j) {
          double acc = bias ? bias[c] : 0.0;
          for (int64_t e = 0; e < s.dh; ++e) acc += wh[c * s.dh + e] * buf[j * s.stride_h + e * s.dil_h];
          yp[i * ys_h + j * ys_w] = acc;
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
void backward(const SepConvShape& s, bool cl, const T* gy, const T* x, const T* wv, const T* wh, T* gx, T* gwv,
              T* gwh) {
  const int64_t C = s.in_channels, n_blk = cl ? channel_block(C) : 1;
  const int64_t items = (C + n_blk - 1) / n_blk;
  // Strides (in elements) of input-like and output-like tensors.
  const int64_t xs_b = C * s.height * s.width, xs_h = cl ? s.width * C : s.width, xs_w = cl ? C : 1,
                xs_c = cl ? 1 : s.height * s.width;
  const int64_t ys_b = C * s.out_height * s.out_width, ys_h = cl ? s.out_width * C : s.out_width, ys_w = cl ? C : 1,
                ys_c = cl ? 1 : s.out_height * s.out_width;
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    const int64_t nmax = n_blk;
    std::vector<T> tbuf(padded_width(s) * nmax, T(0)), gtbuf(padded_width(s) * nmax, T(0));
    // Weight-gradient accumulators per (tap, column, channel): the column index keeps the
    // innermost loops free of reductions, so they vectorize; summed once per block.
    std::vector<T> accv(gwv ? s.dv * s.width * nmax : 0), acch(gwh ? s.dh * s.out_width * nmax : 0);
    std::vector<T> wvb(s.dv * nmax), whb(s.dh * nmax);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t c0 = item * n_blk, n = std::min(n_blk, C - c0);
      for (int64_t cc = 0; cc < n; ++cc) {
        for (int64_t a = 0; a < s.dv; ++a) wvb[a * n + cc] = wv[(c0 + cc) * s.dv + a];
        for (int64_t e = 0; e < s.dh; ++e) whb[e * n + cc] = wh[(c0 + cc) * s.dh + e];
      }
      std::fill(accv.begin(), accv.end(), T(0));
      std::fill(acch.begin(), acch.end(), T(0));
      T* t = tbuf.data() + s.pad_h * n;
      T* gt = gtbuf.data() + s.pad_h * n;
      for (int64_t b = 0; b < s.batch; ++b) {
        for (int64_t i = 0; i < s.out_height; ++i) {
          const T* gyr = gy + b * ys_b + i * ys_h + c0 * ys_c;
          if (gwh) {  // recompute the intermediate row of this block
            std::fill(tbuf.begin(), tbuf.begin() + padded_width(s) * n, T(0));  // n changes on the last block
            for (int64_t a = 0; a < s.dv; ++a) {
              const int64_t r = input_row(s, i, a);
              if (r < 0) continue;
              const T* xr = x + b * xs_b + r * xs_h + c0 * xs_c;
              for (int64_t w = 0; w < s.width; ++w) {
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
              T* __restrict acc = acch.data() + e * s.out_width * n;
              for (int64_t j = 0; j < s.out_width; ++j) {
                const T* __restrict tp = tbuf.data() + (j * s.stride_h + e * s.dil_h) * n;
                const T* __restrict g = gyr + j * ys_w;
                T* __restrict aj = acc + j * n;
                for (int64_t cc = 0; cc < n; ++cc) aj[cc] += g[cc] * tp[cc];
              }
            }
          }
          if (!gx && !gwv) continue;
          // Gradient of the intermediate row: the horizontal stage transposed.
          std::fill(gtbuf.begin(), gtbuf.begin() + padded_width(s) * n, T(0));
          for (int64_t e = 0; e < s.dh; ++e) {
            const T* __restrict we = whb.data() + e * n;
            for (int64_t j = 0; j < s.out_width; ++j) {
              T* __restrict gp = gtbuf.data() + (j * s.stride_h + e * s.dil_h) * n;
              const T* __restrict g = gyr + j * ys_w;
              for (int64_t cc = 0; cc < n; ++cc) gp[cc] += we[cc] * g[cc];
            }
          }
          // The vertical stage transposed: input gradient and weight_v gradient.
          for (int64_t a = 0; a < s.dv; ++a) {
            const int64_t r = input_row(s, i, a);
            if (r < 0) continue;
            const T* xr = x + b * xs_b + r * xs_h + c0 * xs_c;
            T* gxr = gx ? gx + b * xs_b + r * xs_h + c0 * xs_c : nullptr;
            const T* __restrict wa = wvb.data() + a * n;
            T* __restrict av = gwv ? accv.data() + a * s.width * n : nullptr;
            if (!cl) {  // NCHW: one channel, contiguous columns
              const T w = wa[0];
              if (gxr) {
                T* __restrict gxo = gxr;
                for (int64_t col = 0; col < s.width; ++col) gxo[col] += w * gt[col];
              }
              if (av) {
                const T* __restrict xo = xr;
                for (int64_t col = 0; col < s.width; ++col) av[col] += gt[col] * xo[col];
              }
            } else {
              for (int64_t col = 0; col < s.width; ++col) {
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
            for (int64_t col = 0; col < s.width; ++col) sum += accv[(a * s.width + col) * n + cc];
            gwv[(c0 + cc) * s.dv + a] = sum;
          }
        }
        if (gwh) {
          for (int64_t e = 0; e < s.dh; ++e) {
            T sum = 0;
            for (int64_t j = 0; j < s.out_width; ++j) sum += acch[(e * s.out_width + j) * n + cc];
            gwh[(c0 + cc) * s.dh + e] = sum;
          }
        }
      }
    }
  });
}

}  // namespace

bool sep_conv_is_depthwise(const SepConvShape& s) {
  return s.groups == s.in_channels && s.cg == 1 && s.kg == 1 && s.ng == 1;
}

Tensor sep_conv_depthwise_forward(const SepConvShape& s, const Tensor& input, const Tensor& weight_v,
                                  const Tensor& weight_h, const std::optional<Tensor>& bias) {
  const auto memory_format = input.suggest_memory_format();
  const bool cl = memory_format == at::MemoryFormat::ChannelsLast;
  const auto dt = input.scalar_type();
  Tensor out =
      empty_result({s.batch, s.in_channels, s.out_height, s.out_width}, input.options().memory_format(memory_format));
  if (out.numel() == 0) return out;
  const Tensor x = input.contiguous(memory_format);
  const bool has_bias = bias.has_value() && bias->defined();
  if (dt == at::kDouble) {
    const Tensor wv = weight_v.contiguous(), wh = weight_h.contiguous();
    const Tensor b = has_bias ? bias->contiguous() : Tensor();
    forward_double(s, cl, x.data_ptr<double>(), wv.data_ptr<double>(), wh.data_ptr<double>(),
                   has_bias ? b.data_ptr<double>() : nullptr, out.data_ptr<double>());
    return out;
  }
  // Weights and bias in float32, in the layout the kernels read (see depthwise_isa.h); plain
  // vectors, since tensor operations would cost more than the kernel on small maps.
  const int64_t C = s.in_channels;
  std::vector<float> wv(C * s.dv), wh(C * s.dh), bv(C, 0.f);
  const Tensor wvc = weight_v.contiguous(), whc = weight_h.contiguous();
  const Tensor bc = has_bias ? bias->contiguous() : Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "sep_conv_depthwise_weights", [&] {
    const scalar_t* pv = wvc.const_data_ptr<scalar_t>();
    const scalar_t* ph = whc.const_data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t a = 0; a < s.dv; ++a) wv[cl ? a * C + c : c * s.dv + a] = static_cast<float>(pv[c * s.dv + a]);
      for (int64_t e = 0; e < s.dh; ++e) wh[cl ? e * C + c : c * s.dh + e] = static_cast<float>(ph[c * s.dh + e]);
    }
    if (has_bias) {
      const scalar_t* pb = bc.const_data_ptr<scalar_t>();
      for (int64_t c = 0; c < C; ++c) bv[c] = static_cast<float>(pb[c]);
    }
  });
  dw::ForwardCall call{s,
                       cl,
                       dt == at::kBFloat16 ? dw::Dtype::BFloat16
                       : dt == at::kHalf   ? dw::Dtype::Half
                                           : dw::Dtype::Float,
                       x.const_data_ptr(),
                       out.mutable_data_ptr(),
                       wv.data(),
                       wh.data(),
                       bv.data()};
  switch (cpu_capability()) {
#if defined(__x86_64__)
    case CpuCapability::AVX512:
      if (call.dtype != dw::Dtype::Half || cpu_has_f16c()) {
        if (call.dtype == dw::Dtype::BFloat16 && cpu_has_avx512bf16()) call.dtype = dw::Dtype::BFloat16Native;
        dw::forward_avx512(call);
        break;
      }
      [[fallthrough]];
    case CpuCapability::AVX2:
      if (call.dtype != dw::Dtype::Half || cpu_has_f16c()) {
        dw::forward_avx2(call);
        break;
      }
      [[fallthrough]];
#endif
    default:
      dw::forward_default(call);
  }
  return out;
}

std::tuple<Tensor, Tensor, Tensor> sep_conv_depthwise_backward(const SepConvShape& s, const Tensor& grad_out,
                                                               const Tensor& input, const Tensor& weight_v,
                                                               const Tensor& weight_h,
                                                               std::array<bool, 3> output_mask) {
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
  if (s.batch > 0 && s.in_channels > 0 && s.out_height > 0 && s.out_width > 0 &&
      (output_mask[0] || output_mask[1] || output_mask[2])) {
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

}  // namespace sep_conv
}  // namespace lowrank
