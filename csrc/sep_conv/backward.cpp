// Backward of the CPU sep_conv: grad_input, grad_weight_v and grad_weight_h (the bias gradient
// is a sum in Python). Tiles are the forward's (image, group, block of output rows [r0, r1)).
// With P = rows*Wp pixels of the tile in the forward's padded intermediate coordinates (see
// forward.cpp; output pixel (r, w') of horizontal tap j is intermediate pixel r*Wp + w'*sh + j*lh),
// each tile runs, all on micro_gemm.h's GEMMs:
//
//   * G (Ng x P, channel-major): grad_out scattered to the pixels r*Wp + w'*sh, zero elsewhere,
//     with (dh-1)*lh zero columns in front;
//   * grad_weight_h, tap j:  acc_wh[j] (Ng x Kg) += G (Ng x P) * T_j (P x Kg), where T is the
//     intermediate tile recomputed as in the forward (rounded to the input dtype) and T_j its
//     pixels shifted by j*lh;
//   * dT (Kg x P) = sum_j Wh_j^T (Kg x Ng) * G shifted back by j*lh (the transposed horizontal
//     conv), rounded to the input dtype into dtu (Kg x rows*W: the interior columns);
//   * grad_weight_v, tap i:  acc_wv[i] (Kg x Cg) += dtu (Kg x rows*W) * X_i (rows*W x Cg), X_i the
//     tile's input rows shifted by tap i (read in place for channels_last, as in the forward);
//   * grad_input += sum_i Wv_i^T * dtu (NCHW: (Cg x pixels), written in place with leading
//     dimension H*W) or dtu^T * Wv_i (channels_last: (pixels x Cg), leading dimension C).
//     Neighbouring tiles add to the same input rows (the vertical halo), so even and odd tiles
//     run in two passes, and tiles are at least a halo tall (choose_tiling's passes = 2).
//
// Weight gradients accumulate per thread in float (double for float64) and are summed at the
// end; the number of accumulators is capped (kAccumulatorBytes), and work is split into at
// most that many chunks. bfloat16/float16 compute in float here, converted tile by tile, with
// the intermediate and its gradient rounded to the input dtype (the unfused pair's numerics);
// grad_input of a 16-bit input accumulates in a float buffer converted once at the end.
#include "sep_conv.h"

#include <ATen/Parallel.h>

#include "micro_gemm.h"
#include "pixel_layout.h"
#include "workspace.h"

#include <algorithm>
#include <memory>
#include <vector>

namespace lowrank {
namespace sep_conv {
namespace {

// Upper bound on the memory of all per-thread weight-gradient accumulators of one call.
constexpr int64_t kAccumulatorBytes = int64_t(64) << 20;

// In: tensor dtype; Op: operand type (float for float and 16-bit data, double for double).
template <typename In, typename Op, bool CL>
struct BackwardKernel {
  using Acc = acc_t<Op>;
  const SepConvShape& s;
  const In* gy;
  const In* x;
  Acc* gx;  // grad_input accumulator in x's layout (zeroed), or null
  bool need_wv, need_wh;
  // Row-major weight matrices per (group, tap): wv_ck (Cg x Kg) [c][k] = wv[k][c][i] (stage 1's B,
  // and grad_input's A in NCHW); wv_kc (Kg x Cg) (grad_input's B in channels_last); wh_kn
  // (Kg x Ng) [k][n] = wh[n][k][j] (dT's A).
  Op *wv_ck, *wv_kc, *wh_kn;
  int64_t Wp, Wv, guard, n_slots = 1;
  Acc* acc;  // n_slots x (wv_numel + wh_numel), layout [g][tap][rows][cols]
  std::unique_ptr<Scratch> call_scratch;

  BackwardKernel(const SepConvShape& shape, const In* gy_, const In* x_, const In* wv, const In* wh, Acc* gx_,
                 bool need_wv_, bool need_wh_)
      : s(shape), gy(gy_), x(x_), gx(gx_), need_wv(need_wv_), need_wh(need_wh_) {
    Wv = (s.width + 2 * s.pad_h + s.stride_h - 1) / s.stride_h;
    Wp = Wv * s.stride_h;
    guard = (s.dh - 1) * s.dil_h;
    const int64_t vblk = s.cg * s.kg, hblk = s.kg * s.ng;
    // At most n_slots accumulators (each thread number of run() indexes one).
    const int64_t per_slot = wv_numel() + wh_numel();
    if (!at::in_parallel_region()) n_slots = std::max<int64_t>(1, at::get_num_threads());
    if (per_slot > 0)
      n_slots = std::max<int64_t>(1, std::min(n_slots, kAccumulatorBytes / (per_slot * int64_t(sizeof(Acc)))));
    const int64_t nv = s.groups * s.dv * vblk, nh = s.groups * s.dh * hblk;
    call_scratch =
        std::make_unique<Scratch>(Scratch::kCall, 2 * Scratch::bytes_for<Op>(nv) + Scratch::bytes_for<Op>(nh) +
                                                      Scratch::bytes_for<Acc>(n_slots * per_slot));
    wv_ck = call_scratch->take<Op>(nv);
    wv_kc = call_scratch->take<Op>(nv);
    wh_kn = call_scratch->take<Op>(nh);
    acc = call_scratch->take<Acc>(n_slots * per_slot);
    std::fill_n(acc, n_slots * per_slot, Acc(0));
    const WeightTaps<In> v{wv, s.kg, s.cg, s.dv, s.cg * s.dv, s.dv, 1};
    const WeightTaps<In> h{wh, s.ng, s.kg, s.dh, s.kg * s.dh, s.dh, 1};
    parallel_over_row_blocks(s.groups, s.kg, [&](int64_t g, int64_t r0, int64_t r1) {
      split_taps_transposed(v.group(g), wv_ck + g * s.dv * vblk, r0, r1);
      split_taps(v.group(g), wv_kc + g * s.dv * vblk, r0, r1);
    });
    parallel_over_row_blocks(s.groups, s.ng, [&](int64_t g, int64_t r0, int64_t r1) {
      split_taps_transposed(h.group(g), wh_kn + g * s.dh * hblk, r0, r1);
    });
  }

  int64_t wv_numel() const { return need_wv ? s.groups * s.dv * s.kg * s.cg : 0; }
  int64_t wh_numel() const { return need_wh ? s.groups * s.dh * s.ng * s.kg : 0; }
  int64_t input_rows(int64_t rows) const { return (rows - 1) * s.stride_v + s.dil_v * (s.dv - 1) + 1; }

  void run() {
    const int64_t row_bytes =
        (s.stride_v * s.width * s.cg + Wp * s.kg + Wp * s.ng + 2 * s.width * s.kg) * int64_t(sizeof(Op)) +
        (s.width * s.kg + Wp * s.kg) * int64_t(sizeof(Acc));
    const Tiling tiling = choose_tiling(s, row_bytes, 2);
    const int64_t per_slot = wv_numel() + wh_numel();
    const bool nested = at::in_parallel_region();
    const int64_t half = (tiling.per_image + 1) / 2, n_items = s.batch * s.groups * half;
    // At most n_slots chunks, so thread numbers index the accumulators.
    const int64_t grain = std::max<int64_t>(1, (n_items + n_slots - 1) / n_slots);
    for (int64_t parity = 0; parity < 2; ++parity) {
      at::parallel_for(0, n_items, grain, [&](int64_t begin, int64_t end) {
        const int64_t slot = nested ? 0 : at::get_thread_num();
        TORCH_INTERNAL_ASSERT(slot < n_slots, "sep_conv backward: more chunks than accumulators");
        Buffers buf(*this, tiling.max_rows);
        Acc* my_acc = acc + slot * per_slot;
        for (int64_t item = begin; item < end; ++item) {
          const int64_t image = item / half, tt = 2 * (item % half) + parity;
          if (tt >= tiling.per_image) continue;
          const int64_t r0 = tiling.begin(tt, s.out_height), r1 = tiling.begin(tt + 1, s.out_height);
          run_tile(image / s.groups, image % s.groups, r0, r1 - r0, buf, my_acc);
        }
      });
    }
  }

  // A worker thread's tile buffers (kept per thread between calls, see workspace.h).
  struct Buffers {
    Scratch scratch;
    Op *xbuf = nullptr, *tpad = nullptr, *gcm, *dtu, *dtu_pm = nullptr;
    Acc *tacc = nullptr, *dtcm;
    static int64_t counts(const BackwardKernel& k, int64_t max_rows, int64_t (&n)[7]) {
      const SepConvShape& s = k.s;
      const int64_t P = max_rows * k.Wp;
      n[0] = k.input_rows(max_rows) * s.width * s.cg;       // xbuf
      n[1] = k.need_wh ? max_rows * s.width * s.kg : 0;     // tacc
      n[2] = k.need_wh ? P * s.kg : 0;                      // tpad
      n[3] = s.ng * (k.guard + P);                          // gcm
      n[4] = s.kg * P;                                      // dtcm
      n[5] = s.kg * max_rows * s.width;                     // dtu
      n[6] = (CL && k.gx) ? max_rows * s.width * s.kg : 0;  // dtu_pm
      return 0;
    }
    static size_t bytes(const BackwardKernel& k, int64_t max_rows) {
      int64_t n[7];
      counts(k, max_rows, n);
      return Scratch::bytes_for<Op>(n[0]) + Scratch::bytes_for<Acc>(n[1]) + Scratch::bytes_for<Op>(n[2]) +
             Scratch::bytes_for<Op>(n[3]) + Scratch::bytes_for<Acc>(n[4]) + Scratch::bytes_for<Op>(n[5]) +
             Scratch::bytes_for<Op>(n[6]);
    }
    Buffers(const BackwardKernel& k, int64_t max_rows) : scratch(Scratch::kTile, bytes(k, max_rows)) {
      int64_t n[7];
      counts(k, max_rows, n);
      xbuf = scratch.take<Op>(n[0]);
      tacc = scratch.take<Acc>(n[1]);
      tpad = scratch.take<Op>(n[2]);
      gcm = scratch.take<Op>(n[3]);
      dtcm = scratch.take<Acc>(n[4]);
      dtu = scratch.take<Op>(n[5]);
      dtu_pm = scratch.take<Op>(n[6]);
      std::fill_n(tpad, n[2], Op(0));  // pad columns stay zero
    }
  };

  void run_tile(int64_t b, int64_t g, int64_t r0, int64_t rows, Buffers& buf, Acc* my_acc) const {
    const int64_t H = s.height, W = s.width, Ho = s.out_height, Wo = s.out_width, P = rows * Wp;
    const int64_t pw = rows * W, gld = guard + P;
    const int64_t vblk = s.cg * s.kg, hblk = s.kg * s.ng;
    // The tile's input rows, pixel-major (needed for T and grad_weight_v).
    const In* xb = x + b * s.in_channels * H * W;
    const Op* xr = nullptr;
    int64_t ld = 0;
    if (need_wv || need_wh) {
      const int64_t top = r0 * s.stride_v - s.pad_v, nin = input_rows(rows);
      if (CL && std::is_same_v<In, Op> && top >= 0 && top + nin <= H) {
        xr = reinterpret_cast<const Op*>(xb) + top * W * s.in_channels + g * s.cg;
        ld = s.in_channels;
      } else {
        load_pixel_rows<In, Op, CL>(xb, s.in_channels, H, W, g * s.cg, s.cg, top, nin, buf.xbuf);
        xr = buf.xbuf;
        ld = s.cg;
      }
    }
    // G: grad_out rows, channel-major, at the intermediate's pixel positions.
    const In* gob = gy + b * s.out_channels * Ho * Wo;
    Op* gcm = buf.gcm;
    std::fill_n(gcm, s.ng * gld, Op(0));
    for (int64_t n = 0; n < s.ng; ++n) {
      Op* d = gcm + n * gld + guard;
      for (int64_t rr = 0; rr < rows; ++rr)
        for (int64_t w = 0; w < Wo; ++w) {
          const int64_t src =
              CL ? ((r0 + rr) * Wo + w) * s.out_channels + g * s.ng + n : ((g * s.ng + n) * Ho + r0 + rr) * Wo + w;
          d[rr * Wp + w * s.stride_h] = Op(gob[src]);
        }
    }
    if (need_wh) {
      // T (recomputed as in the forward) and grad_weight_h.
      Acc* tacc = buf.tacc;
      Op* tpad = buf.tpad;
      for (int64_t i = 0; i < s.dv; ++i) {
        const Op* xi = xr + i * s.dil_v * W * ld;
        const Op* wb = wv_ck + (g * s.dv + i) * vblk;
        if (s.stride_v == 1) {
          gemm_rowmajor_b<Op>(pw, s.kg, s.cg, xi, ld, wb, s.kg, tacc, s.kg, i > 0);
        } else {
          for (int64_t rr = 0; rr < rows; ++rr)
            gemm_rowmajor_b<Op>(W, s.kg, s.cg, xi + rr * s.stride_v * W * ld, ld, wb, s.kg, tacc + rr * W * s.kg, s.kg,
                                i > 0);
        }
      }
      for (int64_t rr = 0; rr < rows; ++rr)
        round_rows<In, Op>(tacc + rr * W * s.kg, W * s.kg, tpad + (rr * Wp + s.pad_h) * s.kg);
      Acc* acc_wh = my_acc + wv_numel() + g * s.dh * hblk;
      for (int64_t j = 0; j < s.dh; ++j)
        gemm_rowmajor_b<Op>(s.ng, s.kg, P - guard, gcm + guard, gld, tpad + j * s.dil_h * s.kg, s.kg, acc_wh + j * hblk,
                            s.kg, true);
    }
    if (!need_wv && !gx) return;
    // dT = sum_j Wh_j^T G(shifted), then its interior columns rounded into dtu.
    Acc* dtcm = buf.dtcm;
    for (int64_t j = 0; j < s.dh; ++j)
      gemm_rowmajor_b<Op>(s.kg, P, s.ng, wh_kn + (g * s.dh + j) * hblk, s.ng, gcm + guard - j * s.dil_h, gld, dtcm, P,
                          j > 0);
    Op* dtu = buf.dtu;
    for (int64_t k = 0; k < s.kg; ++k)
      for (int64_t rr = 0; rr < rows; ++rr)
        round_rows<In, Op>(dtcm + k * P + rr * Wp + s.pad_h, W, dtu + k * pw + rr * W);
    if (need_wv) {
      Acc* acc_wv = my_acc + g * s.dv * vblk;
      for (int64_t i = 0; i < s.dv; ++i) {
        const Op* xi = xr + i * s.dil_v * W * ld;
        if (s.stride_v == 1) {
          gemm_rowmajor_b<Op>(s.kg, s.cg, pw, dtu, pw, xi, ld, acc_wv + i * vblk, s.cg, true);
        } else {
          for (int64_t rr = 0; rr < rows; ++rr)
            gemm_rowmajor_b<Op>(s.kg, s.cg, W, dtu + rr * W, pw, xi + rr * s.stride_v * W * ld, ld, acc_wv + i * vblk,
                                s.cg, true);
        }
      }
    }
    if (!gx) return;
    Acc* gxb = gx + b * s.in_channels * H * W;
    const Op* dpm = nullptr;
    if (CL) {  // dtu^T, pixel-major
      Op* d = buf.dtu_pm;
      for (int64_t k = 0; k < s.kg; ++k)
        for (int64_t p = 0; p < pw; ++p) d[p * s.kg + k] = dtu[k * pw + p];
      dpm = d;
    }
    for (int64_t i = 0; i < s.dv; ++i) {
      const auto [vb, ve] = valid_rows(s, i, r0, r0 + rows);
      const int64_t runs = s.stride_v == 1 ? (ve > vb ? 1 : 0) : ve - vb;
      const int64_t run_rows = s.stride_v == 1 ? ve - vb : 1;
      for (int64_t q = 0; q < runs; ++q) {
        const int64_t r = vb + q, rr = r - r0, h = r * s.stride_v - s.pad_v + i * s.dil_v, npix = run_rows * W;
        if (CL) {
          gemm_rowmajor_b<Op>(npix, s.cg, s.kg, dpm + rr * W * s.kg, s.kg, wv_kc + (g * s.dv + i) * vblk, s.cg,
                              gxb + h * W * s.in_channels + g * s.cg, s.in_channels, true);
        } else {
          gemm_rowmajor_b<Op>(s.cg, npix, s.kg, wv_ck + (g * s.dv + i) * vblk, s.kg, dtu + rr * W, pw,
                              gxb + (g * s.cg * H + h) * W, H * W, true);
        }
      }
    }
  }

  // Sums the accumulators into grad_weight_v (K, Cg, dv, 1) and grad_weight_h (N, Kg, 1, dh).
  void write_weight_grads(In* gwv, In* gwh) const {
    const int64_t per_slot = wv_numel() + wh_numel(), vblk = s.cg * s.kg, hblk = s.kg * s.ng;
    const auto total = [&](int64_t idx) {
      Acc v = 0;
      for (int64_t sl = 0; sl < n_slots; ++sl) v += acc[sl * per_slot + idx];
      return v;
    };
    if (gwv)
      for (int64_t g = 0; g < s.groups; ++g)
        for (int64_t i = 0; i < s.dv; ++i)
          for (int64_t k = 0; k < s.kg; ++k)
            for (int64_t c = 0; c < s.cg; ++c)
              gwv[((g * s.kg + k) * s.cg + c) * s.dv + i] = In(total((g * s.dv + i) * vblk + k * s.cg + c));
    if (gwh)
      for (int64_t g = 0; g < s.groups; ++g)
        for (int64_t j = 0; j < s.dh; ++j)
          for (int64_t n = 0; n < s.ng; ++n)
            for (int64_t k = 0; k < s.kg; ++k)
              gwh[((g * s.ng + n) * s.kg + k) * s.dh + j] =
                  In(total(wv_numel() + (g * s.dh + j) * hblk + n * s.kg + k));
  }
};

template <typename In, bool CL>
void run_backward(const SepConvShape& s, const Tensor& gy, const Tensor& x, const Tensor& wv, const Tensor& wh,
                  Tensor& gx_acc, Tensor& gwv, Tensor& gwh) {
  using Op = std::conditional_t<std::is_same_v<In, double>, double, float>;
  BackwardKernel<In, Op, CL> k(s, gy.data_ptr<In>(), x.data_ptr<In>(), wv.data_ptr<In>(), wh.data_ptr<In>(),
                               gx_acc.defined() ? gx_acc.data_ptr<acc_t<Op>>() : nullptr, gwv.defined(), gwh.defined());
  k.run();
  k.write_weight_grads(gwv.defined() ? gwv.data_ptr<In>() : nullptr, gwh.defined() ? gwh.data_ptr<In>() : nullptr);
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> backward(const SepConvShape& s, const Tensor& grad_out, const Tensor& input,
                                            const Tensor& weight_v, const Tensor& weight_h,
                                            std::array<bool, 3> output_mask) {
  const auto dtype = input.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf,
                    "sep_conv: unsupported dtype ", dtype);
  const auto memory_format = input.suggest_memory_format();
  const bool cl = memory_format == at::MemoryFormat::ChannelsLast;
  const auto acc_dtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
  Tensor grad_input = output_mask[0] ? empty_result(input.sizes(), input.options().memory_format(memory_format))
                                     : at::empty({0}, input.options());
  Tensor grad_wv =
      output_mask[1] ? at::zeros(weight_v.sizes(), weight_v.options()) : at::empty({0}, weight_v.options());
  Tensor grad_wh =
      output_mask[2] ? at::zeros(weight_h.sizes(), weight_h.options()) : at::empty({0}, weight_h.options());
  if (output_mask[0]) grad_input.zero_();
  if (s.batch == 0 || s.out_channels == 0 || !(output_mask[0] || output_mask[1] || output_mask[2]))
    return {grad_input, grad_wv, grad_wh};
  // grad_input accumulates in place for float/double, in a float buffer for 16-bit inputs.
  Tensor gx_acc;
  if (output_mask[0])
    gx_acc = dtype == acc_dtype
                 ? grad_input
                 : empty_result(input.sizes(), input.options().dtype(acc_dtype).memory_format(memory_format)).zero_();
  const Tensor x = input.contiguous(memory_format), gy = grad_out.to(dtype).contiguous(memory_format);
  const Tensor wv = weight_v.contiguous(), wh = weight_h.contiguous();
  Tensor gwv = output_mask[1] ? grad_wv : Tensor(), gwh = output_mask[2] ? grad_wh : Tensor();
  const auto run = [&](auto tag) {
    using In = decltype(tag);
    if (cl)
      run_backward<In, true>(s, gy, x, wv, wh, gx_acc, gwv, gwh);
    else
      run_backward<In, false>(s, gy, x, wv, wh, gx_acc, gwv, gwh);
  };
  switch (dtype) {
    case at::kFloat:
      run(float{});
      break;
    case at::kDouble:
      run(double{});
      break;
    case at::kBFloat16:
      run(at::BFloat16{});
      break;
    default:
      run(at::Half{});
      break;
  }
  if (output_mask[0] && dtype != acc_dtype) grad_input.copy_(gx_acc);
  return {grad_input, grad_wv, grad_wh};
}

}  // namespace sep_conv
}  // namespace lowrank
