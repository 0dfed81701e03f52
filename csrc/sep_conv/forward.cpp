// Forward of the CPU sep_conv. A tile is (batch b, group g, a block of output rows [r0, r1));
// each thread keeps its own tile buffers and runs, per tile:
//
//   1. stage 1 (vertical, C -> K): tacc (rows*W pixels x Kg, float) = sum_i X_i * Wv_i, one GEMM
//      per tap i, where X_i (rows*W pixels x Cg) is the tile's input rows shifted down by tap i.
//      X is read in place for a channels_last tile inside the image (leading dimension C);
//      otherwise the rows are copied pixel-major into xbuf (NCHW transposed, 16-bit data
//      converted where the kernels compute in float, rows in the vertical padding zero).
//      A vertical stride > 1 takes one GEMM per output row and tap;
//   2. the intermediate is rounded to the input dtype (bfloat16/float16 tiles: the unfused
//      pair's numerics) into tpad (rows x Wp pixels x Kg), whose pad_h columns either side of
//      each row stay zero: the horizontal padding;
//   3. stage 2 (horizontal, K -> N): cbuf (rows x Wv pixels x Ng, float) = sum_j T_j * Wh_j,
//      one GEMM per tap j over all rows of the tile at once: output pixel (r, w') of tap j
//      reads tpad pixel r*Wp + w'*sh + j*lh, i.e. row r*Wv + w' of a matrix with leading
//      dimension sh*Kg when Wp = Wv*sh (Wp is rounded up to a multiple of sh; the Wv - W'
//      extra pixels per row are computed and dropped). 16-bit operands without horizontal
//      dilation take all taps in one GEMM (see fused_h_taps);
//   4. cbuf plus bias goes to the output in its dtype and memory format (NCHW transposed).
//
// The GEMMs are micro_gemm.h's (oneDNN brgemm for float and native 16-bit; BLAS for double).
#include "sep_conv.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "micro_gemm.h"
#include "pixel_layout.h"
#include "weight_cache.h"
#include "workspace.h"

#include <algorithm>
#include <vector>

namespace lowrank {
namespace sep_conv {
namespace {

// In: the dtype of the tensors; Op: the GEMM operand type (In, or float for 16-bit data where
// oneDNN has no 16-bit kernel on this CPU). CL: channels_last.
template <typename In, typename Op, bool CL>
struct ForwardKernel {
  using Acc = acc_t<Op>;
  const SepConvShape& s;
  const In* x;
  In* y;
  const Op* wvp;  // packed B operands per (group, tap)
  const Op* whp;
  std::vector<Acc> bias;  // N values (zeros without bias)
  int64_t wv_block, wh_block;
  int64_t Wp, Wv;

  ForwardKernel(const SepConvShape& shape, const In* x_, In* y_) : s(shape), x(x_), y(y_) {
    Wv = (s.width + 2 * s.pad_h + s.stride_h - 1) / s.stride_h;
    Wp = Wv * s.stride_h;
    wv_block = packed_b_size<Op>(s.cg, s.kg);
    wh_block = packed_b_size<Op>(s.kg, s.ng);
  }
  int64_t packed_elems() const { return s.groups * (s.dv * wv_block + s.dh * wh_block); }

  // Weight B operands: stage 1 tap i of group g is (Cg x Kg), B[c][k] = wv[g*Kg + k][c][i];
  // stage 2 tap j is (Kg x Ng), B[k][n] = wh[g*Ng + n][k][j]. Written row-major (the weights
  // transposed per tap by pixel_layout.h's split_taps_transposed), then packed where the
  // 16-bit kernels need it.
  void pack_weights(const WeightTaps<In>& wv, const WeightTaps<In>& wh, Op* packed) const {
    Op* pv = packed;
    Op* ph = packed + s.groups * s.dv * wv_block;
    constexpr bool plain = !is_16bit<Op>();  // packed form == row-major
    std::vector<Op> rowmajor(plain ? 0 : s.groups * (s.dv * s.cg * s.kg + s.dh * s.kg * s.ng));
    Op* rv = plain ? pv : rowmajor.data();
    Op* rh = plain ? ph : rowmajor.data() + s.groups * s.dv * s.cg * s.kg;
    parallel_over_row_blocks(s.groups, s.kg, [&](int64_t g, int64_t r0, int64_t r1) {
      split_taps_transposed(wv.group(g), rv + g * s.dv * s.cg * s.kg, r0, r1);
    });
    parallel_over_row_blocks(s.groups, s.ng, [&](int64_t g, int64_t r0, int64_t r1) {
      split_taps_transposed(wh.group(g), rh + g * s.dh * s.kg * s.ng, r0, r1);
    });
    if constexpr (!plain) {
      // Stage 2's taps are one (dh*Kg x Ng) operand when they run as one GEMM.
      const int64_t h_taps = fused_h_taps() ? 1 : s.dh, h_rows = s.dh / h_taps * s.kg;
      at::parallel_for(0, s.groups * (s.dv + h_taps), 1, [&](int64_t begin, int64_t end) {
        for (int64_t task = begin; task < end; ++task) {
          const int64_t g = task / (s.dv + h_taps), tap = task % (s.dv + h_taps);
          if (tap < s.dv)
            pack_b<Op>(s.cg, s.kg, rv + (g * s.dv + tap) * s.cg * s.kg, s.kg, pv + (g * s.dv + tap) * wv_block);
          else
            pack_b<Op>(h_rows, s.ng, rh + (g * s.dh + (tap - s.dv) * s.dh / h_taps) * s.kg * s.ng, s.ng,
                       ph + (g * s.dh + (tap - s.dv) * s.dh / h_taps) * wh_block);
        }
      });
    }
  }

  void use_weights(const Op* packed, const In* b) {
    wvp = packed;
    whp = packed + s.groups * s.dv * wv_block;
    bias.assign(s.out_channels, Acc(0));
    if (b)
      for (int64_t n = 0; n < s.out_channels; ++n) bias[n] = Acc(b[n]);
  }

  int64_t input_rows(int64_t rows) const { return (rows - 1) * s.stride_v + s.dil_v * (s.dv - 1) + 1; }

  // Without horizontal dilation, the dh taps an output pixel reads are dh consecutive pixels of
  // tpad: its A row of all taps is dh*Kg contiguous values, so stage 2 can be one GEMM with a
  // reduction of dh*Kg (Wh's taps stacked) instead of dh GEMMs that each load and store the
  // result. That pays on the matrix engines, whose tiles a short Kg leaves half empty; in float
  // the longer reduction ran slower on wide layers and gained little on narrow ones.
  bool fused_h_taps() const { return is_16bit<Op>() && s.dil_h == 1; }

  int64_t bytes_per_row() const {
    return s.stride_v * s.width * s.cg * int64_t(sizeof(Op)) + s.width * s.kg * int64_t(sizeof(Acc)) +
           Wp * s.kg * int64_t(sizeof(Op)) + Wv * s.ng * int64_t(sizeof(Acc));
  }

  void run() {
    const Tiling tiling = choose_tiling(s, bytes_per_row(), 1);
    const int64_t n_tiles = s.batch * s.groups * tiling.per_image;
    at::parallel_for(0, n_tiles, 1, [&](int64_t begin, int64_t end) {
      const int64_t max_rows = tiling.max_rows;
      const int64_t nx = input_rows(max_rows) * s.width * s.cg, nt = max_rows * s.width * s.kg;
      const int64_t np = max_rows * Wp * s.kg, nc = max_rows * Wv * s.ng;
      Scratch scratch(Scratch::kTile, Scratch::bytes_for<Op>(nx) + Scratch::bytes_for<Acc>(nt) +
                                          Scratch::bytes_for<Op>(np) + Scratch::bytes_for<Acc>(nc));
      Op* xbuf = scratch.take<Op>(nx);
      Acc* tacc = scratch.take<Acc>(nt);
      Op* tpad = scratch.take<Op>(np);
      Acc* cbuf = scratch.take<Acc>(nc);
      // The pad columns of tpad are never written by the tiles: zero them once.
      for (int64_t rr = 0; rr < max_rows; ++rr) {
        std::fill_n(tpad + rr * Wp * s.kg, s.pad_h * s.kg, Op(0));
        std::fill_n(tpad + (rr * Wp + s.pad_h + s.width) * s.kg, (Wp - s.pad_h - s.width) * s.kg, Op(0));
      }
      for (int64_t tile = begin; tile < end; ++tile) {
        const Tiling::Location at = tiling.locate(tile, s.groups);
        const int64_t r0 = tiling.begin(at.tt, s.out_height), r1 = tiling.begin(at.tt + 1, s.out_height);
        run_tile(at.b, at.g, r0, r1 - r0, xbuf, tacc, tpad, cbuf);
      }
      release<Op>();
    });
  }

  void run_tile(int64_t b, int64_t g, int64_t r0, int64_t rows, Op* xbuf, Acc* tacc, Op* tpad, Acc* cbuf) const {
    const int64_t H = s.height, W = s.width, Ho = s.out_height, Wo = s.out_width;
    const In* xb = x + b * s.in_channels * H * W;
    // 1. Stage 1 from input rows [top, top + nin).
    const int64_t top = r0 * s.stride_v - s.pad_v, nin = input_rows(rows);
    const Op* xr;
    int64_t ld;
    if (in_place(top, nin)) {
      xr = reinterpret_cast<const Op*>(xb) + top * W * s.in_channels + g * s.cg;
      ld = s.in_channels;
    } else {
      load_pixel_rows<In, Op, CL>(xb, s.in_channels, H, W, g * s.cg, s.cg, top, nin, xbuf);
      xr = xbuf;
      ld = s.cg;
    }
    const Op* wv = wvp + g * s.dv * wv_block;
    for (int64_t i = 0; i < s.dv; ++i) {
      const Op* xi = xr + i * s.dil_v * W * ld;
      if (s.stride_v == 1) {
        gemm<Op>(rows * W, s.kg, s.cg, xi, ld, wv + i * wv_block, tacc, s.kg, i > 0);
      } else {
        for (int64_t rr = 0; rr < rows; ++rr)
          gemm<Op>(W, s.kg, s.cg, xi + rr * s.stride_v * W * ld, ld, wv + i * wv_block, tacc + rr * W * s.kg, s.kg,
                   i > 0);
      }
    }
    // 2. Round into the padded tile.
    for (int64_t rr = 0; rr < rows; ++rr)
      round_rows<In, Op>(tacc + rr * W * s.kg, W * s.kg, tpad + (rr * Wp + s.pad_h) * s.kg);
    // 3. Stage 2.
    const Op* wh = whp + g * s.dh * wh_block;
    const int64_t m = (rows - 1) * Wv + Wo;
    if (fused_h_taps()) {
      gemm<Op>(m, s.ng, s.dh * s.kg, tpad, s.stride_h * s.kg, wh, cbuf, s.ng, false);
    } else {
      for (int64_t j = 0; j < s.dh; ++j)
        gemm<Op>(m, s.ng, s.kg, tpad + j * s.dil_h * s.kg, s.stride_h * s.kg, wh + j * wh_block, cbuf, s.ng, j > 0);
    }
    // 4. Bias and store.
    In* yb = y + b * s.out_channels * Ho * Wo;
    store_pixel_rows<Acc, In, CL>(cbuf, Wv, s.ng, bias.data() + g * s.ng, rows, Wo, yb, s.out_channels, Ho, g * s.ng,
                                  r0);
  }

  // Whether stage 1 reads the input in place: channels_last, no conversion, every row inside.
  bool in_place(int64_t top, int64_t nin) const {
    return CL && std::is_same_v<In, Op> && top >= 0 && top + nin <= s.height;
  }
};

// NCHW float/double with horizontal stride 1 and a small Kg*dv: the same tiles computed channel-major, so that
// the input planes and the output planes are GEMM operands in place (no transposes):
//   stage 1: tcm (Kg x rows*W) = sum_i Wv_i (Kg x Cg) * X_i (Cg x pixels, leading dimension
//            H*W), taps clipped to the rows inside the image;
//   tpc (Kg x rows*Wp): tcm with pad_h zero columns either side of each row;
//   stage 2: cbuf (Ng x rows*Wp) = sum_j Wh_j (Ng x Kg) * tpc shifted by j*lh columns;
//   the first W' columns of each cbuf row plus bias are the output rows.
template <typename T>
struct PlanarForwardKernel {
  const SepConvShape& s;
  const T* x;
  T* y;
  const T* wv_kc;  // per (group, tap) Kg x Cg
  const T* wh_nk;  // per (group, tap) Ng x Kg
  std::vector<T> bias;
  int64_t Wp;

  PlanarForwardKernel(const SepConvShape& shape, const T* x_, T* y_) : s(shape), x(x_), y(y_) {
    Wp = s.width + 2 * s.pad_h;
  }
  int64_t packed_elems() const { return s.groups * (s.dv * s.kg * s.cg + s.dh * s.ng * s.kg); }

  void pack_weights(const WeightTaps<T>& wv, const WeightTaps<T>& wh, T* packed) const {
    T* pv = packed;
    T* ph = packed + s.groups * s.dv * s.kg * s.cg;
    parallel_over_row_blocks(s.groups, s.kg, [&](int64_t g, int64_t r0, int64_t r1) {
      split_taps(wv.group(g), pv + g * s.dv * s.kg * s.cg, r0, r1);
    });
    parallel_over_row_blocks(s.groups, s.ng, [&](int64_t g, int64_t r0, int64_t r1) {
      split_taps(wh.group(g), ph + g * s.dh * s.ng * s.kg, r0, r1);
    });
  }

  void use_weights(const T* packed, const T* b) {
    wv_kc = packed;
    wh_nk = packed + s.groups * s.dv * s.kg * s.cg;
    bias.assign(s.out_channels, T(0));
    if (b) std::copy_n(b, s.out_channels, bias.data());
  }

  void run() {
    const int64_t bytes_per_row = (s.width * s.kg + Wp * s.kg + Wp * s.ng) * int64_t(sizeof(T));
    const Tiling tiling = choose_tiling(s, bytes_per_row, 1);
    const int64_t n_tiles = s.batch * s.groups * tiling.per_image;
    const int64_t max_rows = tiling.max_rows, pitch_t = max_rows * s.width, pitch_p = max_rows * Wp;
    at::parallel_for(0, n_tiles, 1, [&](int64_t begin, int64_t end) {
      const int64_t nt = s.kg * pitch_t, np = s.kg * pitch_p, nc = s.ng * pitch_p;
      Scratch scratch(Scratch::kTile,
                      Scratch::bytes_for<T>(nt) + Scratch::bytes_for<T>(np) + Scratch::bytes_for<T>(nc));
      T* tcm = scratch.take<T>(nt);
      T* tpc = scratch.take<T>(np);
      T* cbuf = scratch.take<T>(nc);
      std::fill_n(tpc, np, T(0));  // pad columns stay zero
      for (int64_t tile = begin; tile < end; ++tile) {
        const Tiling::Location at = tiling.locate(tile, s.groups);
        const int64_t r0 = tiling.begin(at.tt, s.out_height), r1 = tiling.begin(at.tt + 1, s.out_height);
        run_tile(at.b, at.g, r0, r1, pitch_t, pitch_p, tcm, tpc, cbuf);
      }
    });
  }

  void run_tile(int64_t b, int64_t g, int64_t r0, int64_t r1, int64_t pitch_t, int64_t pitch_p, T* tcm, T* tpc,
                T* cbuf) const {
    const int64_t H = s.height, W = s.width, Ho = s.out_height, Wo = s.out_width, rows = r1 - r0;
    const T* xg = x + (b * s.in_channels + g * s.cg) * H * W;
    bool clipped = false;
    for (int64_t i = 0; i < s.dv; ++i) {
      const auto [vb, ve] = valid_rows(s, i, r0, r1);
      clipped = clipped || vb != r0 || ve != r1;
    }
    if (clipped)
      for (int64_t k = 0; k < s.kg; ++k) std::fill_n(tcm + k * pitch_t, rows * W, T(0));
    for (int64_t i = 0; i < s.dv; ++i) {
      const auto [vb, ve] = valid_rows(s, i, r0, r1);
      const T* a = wv_kc + (g * s.dv + i) * s.kg * s.cg;
      const bool add = clipped || i > 0;
      if (ve <= vb) continue;
      if (s.stride_v == 1) {
        const int64_t h = vb - s.pad_v + i * s.dil_v;
        gemm_rowmajor_b<T>(s.kg, (ve - vb) * W, s.cg, a, s.cg, xg + h * W, H * W, tcm + (vb - r0) * W, pitch_t, add);
      } else {
        for (int64_t r = vb; r < ve; ++r) {
          const int64_t h = r * s.stride_v - s.pad_v + i * s.dil_v;
          gemm_rowmajor_b<T>(s.kg, W, s.cg, a, s.cg, xg + h * W, H * W, tcm + (r - r0) * W, pitch_t, add);
        }
      }
    }
    for (int64_t k = 0; k < s.kg; ++k)
      for (int64_t rr = 0; rr < rows; ++rr)
        std::copy_n(tcm + k * pitch_t + rr * W, W, tpc + k * pitch_p + rr * Wp + s.pad_h);
    const int64_t n = (rows - 1) * Wp + Wo;
    for (int64_t j = 0; j < s.dh; ++j)
      gemm_rowmajor_b<T>(s.ng, n, s.kg, wh_nk + (g * s.dh + j) * s.ng * s.kg, s.kg, tpc + j * s.dil_h, pitch_p, cbuf,
                         pitch_p, j > 0);
    T* yg = y + (b * s.out_channels + g * s.ng) * Ho * Wo;
    for (int64_t nn = 0; nn < s.ng; ++nn) {
      const T bn = bias[g * s.ng + nn];
      for (int64_t rr = 0; rr < rows; ++rr) {
        const T* src = cbuf + nn * pitch_p + rr * Wp;
        T* dst = yg + (nn * Ho + r0 + rr) * Wo;
        for (int64_t w = 0; w < Wo; ++w) dst[w] = src[w] + bn;
      }
    }
  }
};

// Packs the weights for kernel k (or takes them from the PackedWeightCache) and runs it.
template <typename Op, typename Kernel, typename In>
void pack_and_run(Kernel& k, int layout, const SepConvShape& s, const Tensor& wv, const Tensor& wh, const Tensor& b) {
  const In* bias = b.defined() ? b.data_ptr<In>() : nullptr;
  const WeightTaps<In> v{wv.data_ptr<In>(), s.kg, s.cg, s.dv, wv.stride(0), wv.stride(1), wv.stride(2)};
  const WeightTaps<In> h{wh.data_ptr<In>(), s.ng, s.kg, s.dh, wh.stride(0), wh.stride(1), wh.stride(3)};
  const int64_t n = k.packed_elems();
  const PackKey key{
      layout,
      int64_t(sizeof(Op)),
      wv.data_ptr(),
      wh.data_ptr(),
      {s.groups, s.cg, s.kg, s.ng, s.dv, s.dh, int64_t(wv.scalar_type()), v.sr, v.sc, v.st, h.sr, h.sc, h.st}};
  const auto cached = PackedWeightCache::get(key, wv, wh, n * sizeof(Op),
                                             [&](std::byte* dst) { k.pack_weights(v, h, reinterpret_cast<Op*>(dst)); });
  if (cached) {
    k.use_weights(reinterpret_cast<const Op*>(cached.get()), bias);
    k.run();
    return;
  }
  Scratch scratch(Scratch::kCall, Scratch::bytes_for<Op>(n));
  Op* packed = scratch.take<Op>(n);
  k.pack_weights(v, h, packed);
  k.use_weights(packed, bias);
  k.run();
}

enum Layout { kPixelLayout = 0, kPixelFusedTaps = 1, kPlanarLayout = 2 };

template <typename In, typename Op>
void run_forward(const SepConvShape& s, bool cl, const Tensor& x, const Tensor& wv, const Tensor& wh, const Tensor& b,
                 Tensor& y) {
  if constexpr (std::is_same_v<In, Op> && !is_16bit<Op>()) {
    // The planar kernel saves the NCHW transposes (about one load and store per activation
    // against 2*Kg*dv FLOPs for stage 1) but reads B from Cg planes H*W apart, which costs more
    // as Kg*dv grows: it is used below Kg*dv = 256 (the crossover on VGG-16 layers).
    if (!cl && s.stride_h == 1 && s.kg * s.dv < 256) {
      PlanarForwardKernel<In> k(s, x.data_ptr<In>(), y.data_ptr<In>());
      pack_and_run<In, PlanarForwardKernel<In>, In>(k, kPlanarLayout, s, wv, wh, b);
      return;
    }
  }
  if (cl) {
    ForwardKernel<In, Op, true> k(s, x.data_ptr<In>(), y.data_ptr<In>());
    pack_and_run<Op, ForwardKernel<In, Op, true>, In>(k, k.fused_h_taps() ? kPixelFusedTaps : kPixelLayout, s, wv, wh,
                                                      b);
  } else {
    ForwardKernel<In, Op, false> k(s, x.data_ptr<In>(), y.data_ptr<In>());
    pack_and_run<Op, ForwardKernel<In, Op, false>, In>(k, k.fused_h_taps() ? kPixelFusedTaps : kPixelLayout, s, wv, wh,
                                                       b);
  }
}

}  // namespace

Tensor forward(const SepConvShape& s, const Tensor& input, const Tensor& weight_v, const Tensor& weight_h,
               const std::optional<Tensor>& bias) {
  const auto memory_format = input.suggest_memory_format();
  const bool cl = memory_format == at::MemoryFormat::ChannelsLast;
  Tensor out =
      empty_result({s.batch, s.out_channels, s.out_height, s.out_width}, input.options().memory_format(memory_format));
  if (out.numel() == 0) return out;
  const Tensor x = input.contiguous(memory_format);
  // Weights are read through their strides when they are dense (e.g. channels_last).
  const auto dense = [](const Tensor& w) { return w.is_non_overlapping_and_dense() ? w : w.contiguous(); };
  const Tensor wv = dense(weight_v), wh = dense(weight_h);
  const Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : Tensor();
  switch (input.scalar_type()) {
    case at::kFloat:
      run_forward<float, float>(s, cl, x, wv, wh, b, out);
      break;
    case at::kDouble:
      run_forward<double, double>(s, cl, x, wv, wh, b, out);
      break;
    case at::kBFloat16:
      if (native_16bit_ok(at::kBFloat16, s.cg) && native_16bit_ok(at::kBFloat16, s.kg))
        run_forward<at::BFloat16, at::BFloat16>(s, cl, x, wv, wh, b, out);
      else
        run_forward<at::BFloat16, float>(s, cl, x, wv, wh, b, out);
      break;
    case at::kHalf:
      if (native_16bit_ok(at::kHalf, s.cg) && native_16bit_ok(at::kHalf, s.kg))
        run_forward<at::Half, at::Half>(s, cl, x, wv, wh, b, out);
      else
        run_forward<at::Half, float>(s, cl, x, wv, wh, b, out);
      break;
    default:
      TORCH_CHECK_VALUE(false, "sep_conv: unsupported dtype ", input.scalar_type());
  }
  return out;
}

}  // namespace sep_conv
}  // namespace lowrank
