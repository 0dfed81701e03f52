// Fused separable low-rank convolution on CPU: a (dv x 1) conv C -> K followed by a
// (1 x dh) conv K -> N, computed tile by tile so the (B, K, H', W) intermediate never
// exists in full. See DESIGN.md section 4 for the exact semantics.
//
// A tile is (batch b, group g, a block of R output rows); all buffers are thread-local and
// sized to stay in L2. Two implementations share the tiling:
//   * float32 with stride 1 on AVX2/FMA builds: sep_conv_forward_avx2, both stages on the
//     register-blocked micro-kernel of sep_conv_avx2.h, reading activations in place;
//   * everything else (float64, strides > 1, the backward, non-AVX2 builds): one GEMM per
//     vertical tap reading the input in place, an im2col of the intermediate tile, and a GEMM
//     writing the output tile, on the BLAS torch was built with.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "blas.h"
#include "sep_conv_avx2.h"
#include "sep_conv_depthwise.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace lowrank {
namespace {

using at::Tensor;

struct SepConvShape {
  int64_t batch, in_channels, height, width;  // input
  int64_t rank, out_channels, dv, dh, groups;
  int64_t cg, kg, ng;  // channels per group: input, intermediate, output
  int64_t stride_v, stride_h, pad_v, pad_h, dil_v, dil_h;
  int64_t out_height, out_width;
};

// The one C++ place that validates sep_conv arguments (forward and backward share it).
SepConvShape check_sep_conv(const Tensor& input, const Tensor& weight_v, const Tensor& weight_h,
                            const std::optional<Tensor>& bias, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK_VALUE(stride.size() == 2, "sep_conv: stride must have 2 elements, got ", stride.size());
  TORCH_CHECK_VALUE(padding.size() == 2, "sep_conv: padding must have 2 elements, got ", padding.size());
  TORCH_CHECK_VALUE(dilation.size() == 2, "sep_conv: dilation must have 2 elements, got ", dilation.size());
  TORCH_CHECK_VALUE(input.dim() == 4, "sep_conv: input must be 4-D (B, C, H, W), got ", input.dim(), "-D");
  TORCH_CHECK_VALUE(weight_v.dim() == 4 && weight_v.size(3) == 1,
                    "sep_conv: weight_v must have shape (K, C/groups, dv, 1), got ", weight_v.sizes());
  TORCH_CHECK_VALUE(weight_h.dim() == 4 && weight_h.size(2) == 1,
                    "sep_conv: weight_h must have shape (N, K/groups, 1, dh), got ", weight_h.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(input.scalar_type()),
                    "sep_conv: input must be a floating-point tensor, got ", input.scalar_type());
  TORCH_CHECK_VALUE(weight_v.scalar_type() == input.scalar_type(), "sep_conv: weight_v dtype ",
                    weight_v.scalar_type(), " does not match input dtype ", input.scalar_type());
  TORCH_CHECK_VALUE(weight_h.scalar_type() == input.scalar_type(), "sep_conv: weight_h dtype ",
                    weight_h.scalar_type(), " does not match input dtype ", input.scalar_type());
  TORCH_CHECK_VALUE(weight_v.device() == input.device(), "sep_conv: weight_v is on ", weight_v.device(),
                    " but input is on ", input.device());
  TORCH_CHECK_VALUE(weight_h.device() == input.device(), "sep_conv: weight_h is on ", weight_h.device(),
                    " but input is on ", input.device());
  TORCH_CHECK_VALUE(groups > 0, "sep_conv: groups must be positive, got ", groups);
  for (int i = 0; i < 2; ++i) {
    TORCH_CHECK_VALUE(stride[i] > 0, "sep_conv: stride must be positive, got ", stride);
    TORCH_CHECK_VALUE(dilation[i] > 0, "sep_conv: dilation must be positive, got ", dilation);
    TORCH_CHECK_VALUE(padding[i] >= 0, "sep_conv: padding must be non-negative, got ", padding);
  }
  SepConvShape s;
  s.batch = input.size(0);
  s.in_channels = input.size(1);
  s.height = input.size(2);
  s.width = input.size(3);
  s.rank = weight_v.size(0);
  s.out_channels = weight_h.size(0);
  s.dv = weight_v.size(2);
  s.dh = weight_h.size(3);
  s.groups = groups;
  TORCH_CHECK_VALUE(s.rank > 0 && weight_v.size(1) > 0 && s.dv > 0,
                    "sep_conv: weight_v must not be empty, got shape ", weight_v.sizes());
  TORCH_CHECK_VALUE(weight_h.size(1) > 0 && s.dh > 0, "sep_conv: weight_h must not be empty, got shape ",
                    weight_h.sizes());
  TORCH_CHECK_VALUE(s.in_channels % groups == 0 && weight_v.size(1) * groups == s.in_channels,
                    "sep_conv: weight_v expects ", weight_v.size(1), " input channels per group and groups=",
                    groups, ", but input has ", s.in_channels, " channels");
  TORCH_CHECK_VALUE(s.rank % groups == 0, "sep_conv: weight_v has ", s.rank,
                    " output channels, not divisible by groups=", groups);
  TORCH_CHECK_VALUE(weight_h.size(1) * groups == s.rank, "sep_conv: weight_h expects ", weight_h.size(1),
                    " channels per group (groups=", groups, "), but weight_v produces ", s.rank);
  TORCH_CHECK_VALUE(s.out_channels % groups == 0, "sep_conv: weight_h has ", s.out_channels,
                    " output channels, not divisible by groups=", groups);
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == s.out_channels, "sep_conv: bias must have shape (",
                      s.out_channels, ",), got ", bias->sizes());
    TORCH_CHECK_VALUE(bias->scalar_type() == input.scalar_type(), "sep_conv: bias dtype ",
                      bias->scalar_type(), " does not match input dtype ", input.scalar_type());
    TORCH_CHECK_VALUE(bias->device() == input.device(), "sep_conv: bias is on ", bias->device(),
                      " but input is on ", input.device());
  }
  s.cg = s.in_channels / groups;
  s.kg = s.rank / groups;
  s.ng = s.out_channels / groups;
  s.stride_v = stride[0];
  s.stride_h = stride[1];
  s.pad_v = padding[0];
  s.pad_h = padding[1];
  s.dil_v = dilation[0];
  s.dil_h = dilation[1];
  const int64_t span_v = s.dil_v * (s.dv - 1) + 1, span_h = s.dil_h * (s.dh - 1) + 1;
  TORCH_CHECK_VALUE(s.height + 2 * s.pad_v >= span_v, "sep_conv: weight_v's dilated height ", span_v,
                    " is larger than the padded input height ", s.height + 2 * s.pad_v);
  TORCH_CHECK_VALUE(s.width + 2 * s.pad_h >= span_h, "sep_conv: weight_h's dilated width ", span_h,
                    " is larger than the padded input width ", s.width + 2 * s.pad_h);
  s.out_height = (s.height + 2 * s.pad_v - span_v) / s.stride_v + 1;
  s.out_width = (s.width + 2 * s.pad_h - span_h) / s.stride_h + 1;
  return s;
}

using blas::gemm;

// How the output rows of one (batch, group) image are cut into tiles. Tile t covers rows
// [t*H'/n, (t+1)*H'/n), so tile heights differ by at most one row.
struct Tiling {
  int64_t per_image = 1;  // tiles per (batch, group) image
  int64_t max_rows = 1;
  int64_t begin(int64_t t, int64_t out_height) const { return t * out_height / per_image; }

  // Where tile number `tile` of a call lies: its image (= b * groups + g), batch b, group g and
  // its index tt among the image's tiles.
  struct Location {
    int64_t image, b, g, tt;
  };
  Location locate(int64_t tile, int64_t groups) const {
    const int64_t image = tile / per_image;
    return {image, image / groups, image % groups, tile % per_image};
  }
};

// Per-thread buffers of about `budget` bytes. 512 KiB (this machine's L2) measured best on
// VGG-16: 256 KiB gives tiles of 2-3 rows on 14x14/28x28 layers, and GEMMs that narrow lose
// 10-30%; the buffers are streamed once per stage, so spilling part of them to L3 costs less.
// `passes` = 2 in the backward, whose grad_input scatter runs
// even and odd tiles in separate passes: there a tile must be at least as tall as the
// vertical halo so that tiles two apart never touch the same input rows.
// `at_least` rows per tile overrides the budget, as long as that still leaves a tile per thread.
Tiling choose_tiling(const SepConvShape& s, int64_t bytes_per_row, int64_t passes, int64_t at_least = 1) {
  // LOWRANK_TILE_KB overrides the budget (for tuning on other CPUs; see README).
  const char* env = std::getenv("LOWRANK_TILE_KB");
  const int64_t budget = (env ? std::atoll(env) : 512) * 1024;
  const int64_t H = s.out_height;
  const int64_t threads = at::get_num_threads(), images = s.batch * s.groups;
  at_least = std::max<int64_t>(1, std::min(at_least, H * images / threads));
  const int64_t min_rows =
      std::max(at_least, passes == 1 ? 1 : std::max<int64_t>(1, (s.dil_v * (s.dv - 1)) / s.stride_v));
  const int64_t max_per_image = std::max<int64_t>(1, H / min_rows);
  const int64_t fit_rows = std::max<int64_t>(1, budget / std::max<int64_t>(1, bytes_per_row));
  int64_t n = std::min(max_per_image, (H + fit_rows - 1) / fit_rows);
  // With few tiles, parallel_for's contiguous chunks only balance if every pass has a
  // multiple of the thread count (this is what keeps both cores busy at batch 1): look for
  // such a count above n, else below it.
  const auto balanced = [&](int64_t cand) { return cand % passes == 0 && (images * cand / passes) % threads == 0; };
  if (threads > 1 && images * n < 16 * threads * passes && !balanced(n)) {
    int64_t found = 0;
    for (int64_t cand = n + 1; cand <= std::min(max_per_image, n + 2 * threads * passes) && !found; ++cand)
      if (balanced(cand)) found = cand;
    for (int64_t cand = n - 1; cand >= 1 && !found; --cand)
      if (balanced(cand)) found = cand;
    if (found) n = found;
  }
  Tiling tiling;
  tiling.per_image = n;
  tiling.max_rows = (H + n - 1) / n;
  return tiling;
}

// Output rows r in [r0, r1) whose vertical tap i reads an input row inside [0, H).
struct RowRange {
  int64_t begin, end;
};
RowRange valid_rows(const SepConvShape& s, int64_t i, int64_t r0, int64_t r1) {
  const int64_t lo_num = s.pad_v - i * s.dil_v;  // r*sv >= lo_num
  const int64_t hi_num = s.height - 1 + s.pad_v - i * s.dil_v;  // r*sv <= hi_num
  const int64_t lo = lo_num <= 0 ? 0 : (lo_num + s.stride_v - 1) / s.stride_v;
  const int64_t hi = hi_num < 0 ? 0 : hi_num / s.stride_v + 1;
  const int64_t b = std::max(r0, lo), e = std::min(r1, hi);
  return {b, std::max(b, e)};
}

// The input is contiguous in its memory format (NCHW, or NHWC for channels_last), so the
// rows a vertical tap reads form a plain matrix that the GEMMs use in place: (C x pixels)
// with ld = H*W in NCHW, (pixels x C) with ld = C in NHWC. With vertical stride 1 one GEMM
// covers all rows of a tile; otherwise one GEMM per row.
template <bool CL>
struct Layout {
  const SepConvShape& s;
  // Offset of pixel (h, w), channel c inside one image.
  int64_t in(int64_t c, int64_t h, int64_t w) const {
    return CL ? (h * s.width + w) * s.in_channels + c : (c * s.height + h) * s.width + w;
  }
  int64_t out(int64_t n, int64_t h, int64_t w) const {
    return CL ? (h * s.out_width + w) * s.out_channels + n : (n * s.out_height + h) * s.out_width + w;
  }
  int64_t in_ld() const { return CL ? s.in_channels : s.height * s.width; }
  int64_t out_ld() const { return CL ? s.out_channels : s.out_height * s.out_width; }
};

// True if some vertical tap of output rows [r0, r1) falls into the zero padding.
bool tile_clipped(const SepConvShape& s, int64_t r0, int64_t r1) {
  for (int64_t i = 0; i < s.dv; ++i) {
    const RowRange rr = valid_rows(s, i, r0, r1);
    if (rr.begin != r0 || rr.end != r1) return true;
  }
  return false;
}

// Calls fn(i, rr, h, npix) for every run of valid rows of tap i: tile row rr (relative to
// r0), input row h, and npix = pixels in the run (contiguous in the input and in the tile).
template <typename Fn>
void for_each_tap_run(const SepConvShape& s, int64_t r0, int64_t r1, Fn&& fn) {
  for (int64_t i = 0; i < s.dv; ++i) {
    const RowRange rr = valid_rows(s, i, r0, r1);
    if (rr.end <= rr.begin) continue;
    if (s.stride_v == 1) {
      fn(i, rr.begin - r0, rr.begin - s.pad_v + i * s.dil_v, (rr.end - rr.begin) * s.width);
    } else {
      for (int64_t r = rr.begin; r < rr.end; ++r) fn(i, r - r0, r * s.stride_v - s.pad_v + i * s.dil_v, s.width);
    }
  }
}

// Stage 1 for output rows [r0, r1) of group g: t = sum_i wv_i * x(rows of tap i).
// t is (Kg x P) in NCHW, (P x Kg) in NHWC, P = rows*W. wvp is (dv, K, Cg).
template <typename T, bool CL>
void vertical_stage(const SepConvShape& s, const T* xb, const T* wvp, int64_t g, int64_t r0, int64_t r1, T* t) {
  const Layout<CL> L{s};
  const int64_t P = (r1 - r0) * s.width;
  const bool clipped = tile_clipped(s, r0, r1);
  if (clipped) std::fill(t, t + P * s.kg, T(0));
  for_each_tap_run(s, r0, r1, [&](int64_t i, int64_t rr, int64_t h, int64_t npix) {
    const T* w = wvp + (i * s.rank + g * s.kg) * s.cg;
    const T* xs = xb + L.in(g * s.cg, h, 0);
    // Unclipped tiles: every tap covers every row, so tap 0 initializes t.
    const T beta = (!clipped && i == 0) ? T(0) : T(1);
    if (CL) {
      gemm<T>(false, true, npix, s.kg, s.cg, xs, L.in_ld(), w, s.cg, beta, t + rr * s.width * s.kg, s.kg);
    } else {
      gemm<T>(false, false, s.kg, npix, s.cg, w, s.cg, xs, L.in_ld(), beta, t + rr * s.width, P);
    }
  });
}

// Horizontal tap j reads intermediate column off + w'*sh for output column w'; returns off and
// the output-column range [w_lo, w_hi) whose source column lies inside [0, W).
struct TapColumns {
  int64_t off, w_lo, w_hi;
};
inline TapColumns tap_columns(const SepConvShape& s, int64_t j) {
  const int64_t off = j * s.dil_h - s.pad_h;
  const int64_t w_lo = std::min(s.out_width, off >= 0 ? 0 : (-off + s.stride_h - 1) / s.stride_h);
  const int64_t w_hi =
      std::max(w_lo, s.width - off <= 0 ? 0 : std::min(s.out_width, (s.width - 1 - off) / s.stride_h + 1));
  return {off, w_lo, w_hi};
}

// Horizontal im2col of the intermediate tile. NCHW: tcols[(k*dh + j), q] (Kg*dh x Q);
// NHWC: tcols[q, (j*Kg + k)] (Q x dh*Kg), q = rr*W' + w'; source column w'*sh - ph + j*lh,
// zero outside [0, W).
template <typename T, bool CL>
void gather_mid_cols(const SepConvShape& s, const T* t, int64_t rows, T* tcols) {
  const int64_t P = rows * s.width, Q = rows * s.out_width, kg = s.kg;
  for (int64_t j = 0; j < s.dh; ++j) {
    const auto [off, w_lo, w_hi] = tap_columns(s, j);
    for (int64_t rr = 0; rr < rows; ++rr) {
      if (CL) {
        T* d = tcols + rr * s.out_width * s.dh * kg + j * kg;
        const int64_t ld = s.dh * kg;
        for (int64_t w = 0; w < w_lo; ++w) std::fill_n(d + w * ld, kg, T(0));
        for (int64_t w = w_lo; w < w_hi; ++w)
          std::copy_n(t + (rr * s.width + off + w * s.stride_h) * kg, kg, d + w * ld);
        for (int64_t w = w_hi; w < s.out_width; ++w) std::fill_n(d + w * ld, kg, T(0));
      } else {
        for (int64_t k = 0; k < kg; ++k) {
          const T* src = t + k * P + rr * s.width + off;
          T* d = tcols + (k * s.dh + j) * Q + rr * s.out_width;
          std::fill(d, d + w_lo, T(0));
          if (s.stride_h == 1) {
            std::copy(src + w_lo, src + w_hi, d + w_lo);
          } else {
            for (int64_t w = w_lo; w < w_hi; ++w) d[w] = src[w * s.stride_h];
          }
          std::fill(d + w_hi, d + s.out_width, T(0));
        }
      }
    }
  }
}

// The adjoint of gather_mid_cols: dt = 0; dt[...] += dtcols[...].
template <typename T, bool CL>
void scatter_mid_cols(const SepConvShape& s, const T* dtcols, int64_t rows, T* dt) {
  const int64_t P = rows * s.width, Q = rows * s.out_width, kg = s.kg;
  std::fill(dt, dt + kg * P, T(0));
  for (int64_t j = 0; j < s.dh; ++j) {
    const auto [off, w_lo, w_hi] = tap_columns(s, j);
    for (int64_t rr = 0; rr < rows; ++rr) {
      if (CL) {
        const int64_t ld = s.dh * kg;
        const T* src = dtcols + rr * s.out_width * ld + j * kg;
        for (int64_t w = w_lo; w < w_hi; ++w) {
          T* d = dt + (rr * s.width + off + w * s.stride_h) * kg;
          const T* sr = src + w * ld;
          for (int64_t k = 0; k < kg; ++k) d[k] += sr[k];
        }
      } else {
        for (int64_t k = 0; k < kg; ++k) {
          T* d = dt + k * P + rr * s.width + off;
          const T* sr = dtcols + (k * s.dh + j) * Q + rr * s.out_width;
          for (int64_t w = w_lo; w < w_hi; ++w) d[w * s.stride_h] += sr[w];
        }
      }
    }
  }
}

// x and out are contiguous in the layout CL selects; wvp is (dv, K, Cg); whp is (N, Kg*dh)
// ordered (k, j) for NCHW and (j, k) for NHWC, matching gather_mid_cols.
template <typename T, bool CL>
void sep_conv_forward_kernel(const SepConvShape& s, const T* x, const T* wvp, const T* whp, const T* bias, T* y) {
  const Layout<CL> L{s};
  const int64_t kdh = s.kg * s.dh;
  const int64_t row_elems = s.kg * s.width + kdh * s.out_width;
  const Tiling tiling = choose_tiling(s, row_elems * sizeof(T), 1);
  const int64_t n_tiles = s.batch * s.groups * tiling.per_image;
  const int64_t in_image = s.in_channels * s.height * s.width;
  const int64_t out_image = s.out_channels * s.out_height * s.out_width;

  at::parallel_for(0, n_tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> buf(tiling.max_rows * row_elems);
    T* t = buf.data();
    T* tcols = t + tiling.max_rows * s.kg * s.width;
    for (int64_t tile = begin; tile < end; ++tile) {
      const Tiling::Location at = tiling.locate(tile, s.groups);
      const int64_t b = at.b, g = at.g, tt = at.tt;
      const int64_t r0 = tiling.begin(tt, s.out_height), r1 = tiling.begin(tt + 1, s.out_height);
      const int64_t rows = r1 - r0, Q = rows * s.out_width;
      vertical_stage<T, CL>(s, x + b * in_image, wvp, g, r0, r1, t);
      gather_mid_cols<T, CL>(s, t, rows, tcols);
      T* yt = y + b * out_image + L.out(g * s.ng, r0, 0);
      const T* w = whp + g * s.ng * kdh;
      if (CL) {
        gemm<T>(false, true, Q, s.ng, kdh, tcols, kdh, w, kdh, T(0), yt, L.out_ld());
        if (bias)
          for (int64_t q = 0; q < Q; ++q)
            for (int64_t n = 0; n < s.ng; ++n) yt[q * s.out_channels + n] += bias[g * s.ng + n];
      } else {
        gemm<T>(false, false, s.ng, Q, kdh, w, kdh, tcols, Q, T(0), yt, L.out_ld());
        if (bias)
          for (int64_t n = 0; n < s.ng; ++n) {
            T* row = yt + n * L.out_ld();
            const T bn = bias[g * s.ng + n];
            for (int64_t q = 0; q < Q; ++q) row[q] += bn;
          }
      }
    }
  });
}

// gy, x, grad_input are contiguous in the layout CL selects; gwv/gwh come back in the
// packed layouts of wvp/whp.
template <typename T, bool CL>
void sep_conv_backward_kernel(const SepConvShape& s, const T* gy, const T* x, const T* wvp, const T* whp, T* gx,
                              T* gwv, T* gwh) {
  const Layout<CL> L{s};
  const int64_t kdh = s.kg * s.dh;
  const bool need_t = gwh != nullptr, need_dt = gx != nullptr || gwv != nullptr;
  const int64_t row_elems = 2 * s.kg * s.width + 2 * kdh * s.out_width;
  const Tiling tiling = choose_tiling(s, row_elems * sizeof(T), 2);
  const int64_t in_image = s.in_channels * s.height * s.width;
  const int64_t out_image = s.out_channels * s.out_height * s.out_width;
  const int64_t wv_numel = s.dv * s.rank * s.cg, wh_numel = s.out_channels * kdh;

  // Weight gradients accumulate per thread and are summed at the end.
  const int64_t n_threads = at::get_num_threads();
  std::vector<T> wgrad(n_threads * (wv_numel + wh_numel), T(0));

  // Tiles two apart never share input rows (see choose_tiling), so the grad_input
  // accumulation is race-free if even and odd tiles run in separate passes.
  const int64_t half = (tiling.per_image + 1) / 2;
  const int64_t n_items = s.batch * s.groups * half;
  for (int64_t parity = 0; parity < 2; ++parity) {
    at::parallel_for(0, n_items, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> buf(tiling.max_rows * row_elems);
      T* t = buf.data();
      T* dt = t + tiling.max_rows * s.kg * s.width;
      T* tcols = dt + tiling.max_rows * s.kg * s.width;
      T* dtcols = tcols + tiling.max_rows * kdh * s.out_width;
      T* my_wgrad = wgrad.data() + at::get_thread_num() * (wv_numel + wh_numel);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / (s.groups * half);
        const int64_t g = (item / half) % s.groups;
        const int64_t tt = 2 * (item % half) + parity;
        if (tt >= tiling.per_image) continue;
        const int64_t r0 = tiling.begin(tt, s.out_height), r1 = tiling.begin(tt + 1, s.out_height);
        const int64_t rows = r1 - r0, P = rows * s.width, Q = rows * s.out_width;
        const T* xb = x + b * in_image;
        const T* go = gy + b * out_image + L.out(g * s.ng, r0, 0);
        const T* wh = whp + g * s.ng * kdh;
        if (need_t) {
          vertical_stage<T, CL>(s, xb, wvp, g, r0, r1, t);
          gather_mid_cols<T, CL>(s, t, rows, tcols);
          T* gw = my_wgrad + wv_numel + g * s.ng * kdh;
          if (CL) {  // gwh (Ng x kdh) += go^T (Ng x Q) * tcols (Q x kdh)
            gemm<T>(true, false, s.ng, kdh, Q, go, L.out_ld(), tcols, kdh, T(1), gw, kdh);
          } else {  // gwh (Ng x kdh) += go (Ng x Q) * tcols^T (Q x kdh)
            gemm<T>(false, true, s.ng, kdh, Q, go, L.out_ld(), tcols, Q, T(1), gw, kdh);
          }
        }
        if (!need_dt) continue;
        if (CL) {  // dtcols (Q x kdh) = go (Q x Ng) * wh (Ng x kdh)
          gemm<T>(false, false, Q, kdh, s.ng, go, L.out_ld(), wh, kdh, T(0), dtcols, kdh);
        } else {  // dtcols (kdh x Q) = wh^T (kdh x Ng) * go (Ng x Q)
          gemm<T>(true, false, kdh, Q, s.ng, wh, kdh, go, L.out_ld(), T(0), dtcols, Q);
        }
        scatter_mid_cols<T, CL>(s, dtcols, rows, dt);
        for_each_tap_run(s, r0, r1, [&](int64_t i, int64_t rr, int64_t h, int64_t npix) {
          const int64_t wofs = (i * s.rank + g * s.kg) * s.cg;
          const T* dts = CL ? dt + rr * s.width * s.kg : dt + rr * s.width;
          const int64_t xofs = L.in(g * s.cg, h, 0);
          if (gwv) {
            T* gw = my_wgrad + wofs;
            if (CL) {  // gwv_i (Kg x Cg) += dt^T (Kg x npix) * x (npix x Cg)
              gemm<T>(true, false, s.kg, s.cg, npix, dts, s.kg, xb + xofs, L.in_ld(), T(1), gw, s.cg);
            } else {  // gwv_i (Kg x Cg) += dt (Kg x npix) * x^T (npix x Cg)
              gemm<T>(false, true, s.kg, s.cg, npix, dts, P, xb + xofs, L.in_ld(), T(1), gw, s.cg);
            }
          }
          if (gx) {
            T* gxs = gx + b * in_image + xofs;
            if (CL) {  // gx (npix x Cg) += dt (npix x Kg) * wv_i (Kg x Cg)
              gemm<T>(false, false, npix, s.cg, s.kg, dts, s.kg, wvp + wofs, s.cg, T(1), gxs, L.in_ld());
            } else {  // gx (Cg x npix) += wv_i^T (Cg x Kg) * dt (Kg x npix)
              gemm<T>(true, false, s.cg, npix, s.kg, wvp + wofs, s.cg, dts, P, T(1), gxs, L.in_ld());
            }
          }
        });
      }
    });
  }
  for (int64_t th = 0; th < n_threads; ++th) {
    const T* src = wgrad.data() + th * (wv_numel + wh_numel);
    if (gwv)
      for (int64_t i = 0; i < wv_numel; ++i) gwv[i] = (th ? gwv[i] : T(0)) + src[i];
    if (gwh)
      for (int64_t i = 0; i < wh_numel; ++i) gwh[i] = (th ? gwh[i] : T(0)) + src[wv_numel + i];
  }
}

#ifdef LOWRANK_SEP_CONV_AVX2
// Fused float32 forward for stride 1 on the AVX2 micro-kernels of sep_conv_avx2.h. Tiles are
// the same (image, group, block of output rows) as above; both stages run pixel-major, in
// both memory formats:
//   * stage 1 reads the tile's input rows as (pixels x Cg): in place for channels_last
//     interior tiles; otherwise copied (and for NCHW transposed) into a buffer, with zero rows
//     where the tile reaches into the vertical padding;
//   * the intermediate goes to tpad (rows x (W + 2 ph) pixels x Kg), zero pixels either side
//     of every row being the horizontal padding;
//   * stage 2 writes y in place for channels_last; for NCHW it writes a pixel-major tile
//     that is transposed into y.
// NCHW reads channel planes H*W apart, which for 224x224 or 112x112 planes fall into a few
// L1 sets; the pixel-major copy avoids that, and per input element it costs about one load
// and store against 2*Kg*dv FLOPs. wv and wh are the contiguous float weights.

// Taps * channels per reduction pass: a packed weight panel of at most 192 KiB, streamed from
// L2. Passes of 256 (a 24 KiB panel kept in L1) were 1-11% slower on VGG-16 conv3-conv5 than
// one pass over the whole reduction (at most 1536 there): every extra pass re-reads and
// re-writes the output tile and restarts the activation streams. Past 2048, one pass was no
// faster (a 2048-channel layer, 3 taps: passes of 2048 took 0.97x and of 256 1.03x the time of
// one pass).
constexpr int64_t kReductionBlock = 2048;

// C (n_pix pixel rows, pointers c_of(p)) = sum over taps and `red` channels of
// A (pixel rows a_of(p), tap offsets a_tap) times the packed panels of `packed` (n_out
// columns); `bias` (may be null) is added on the first reduction block.
template <typename APtr, typename CPtr>
void pixel_gemm(int64_t n_pix, int64_t n_out, const float* packed, int64_t red, int taps, const int64_t* a_tap,
                APtr&& a_of, CPtr&& c_of, const float* bias) {
  namespace k = avx2;
  // Equal reduction blocks of at most kReductionBlock / taps channels (2048 channels in blocks
  // of 682 would leave a last block of 2, paying a full pass over C for 6 FMA steps).
  const int64_t max_blk = std::max<int64_t>(1, kReductionBlock / taps), n_blk = (red + max_blk - 1) / max_blk;
  const int64_t rblk = (red + n_blk - 1) / n_blk;
  const int64_t width = k::kPanel;
  const int mr = k::kRows;
  float* crow[k::kRows];
  const float* arow[k::kRows];
  for (int64_t r0 = 0; r0 < red; r0 += rblk) {
    const int64_t rl = std::min(rblk, red - r0);
    for (int64_t np = 0; np * width < n_out; ++np) {
      const int64_t nc = std::min(width, n_out - np * width);
      const float* b = packed + (np * taps * red + r0) * width;
      const float* bias_p = (r0 == 0 && bias) ? bias + np * width : nullptr;
      for (int64_t p0 = 0; p0 < n_pix; p0 += mr) {
        const int rm = static_cast<int>(std::min<int64_t>(mr, n_pix - p0));
        for (int m = 0; m < rm; ++m) {
          arow[m] = a_of(p0 + m) + r0;
          crow[m] = c_of(p0 + m) + np * width;
        }
        k::kernel_tile(rm, nc, {taps, a_tap, rl, arow, 1, b, red * width, width, crow, r0 > 0, bias_p});
      }
    }
  }
}

// Pixel-major view of a block of rows: pixel p at p + p * ld, channels contiguous.
struct PixelRows {
  const float* p;
  int64_t ld;
};

// Input rows [top, top + nin) of image xb, group g, as (nin*W pixels x Cg): in place for
// channels_last rows inside the image, otherwise copied into xbuf (NCHW transposed), with
// zero rows outside [0, H). The first `kept` rows are already in xbuf (see keep_shared_rows).
template <bool CL>
PixelRows input_rows(const SepConvShape& s, const float* xb, int64_t g, int64_t top, int64_t nin, float* xbuf,
                     int64_t kept = 0) {
  const int64_t H = s.height, W = s.width;
  const float* xg = xb + (CL ? g * s.cg : g * s.cg * H * W);
  if (CL && top >= 0 && top + nin <= H) return {xg + top * W * s.in_channels, s.in_channels};
  for (int64_t rr = kept; rr < nin; ++rr) {
    const int64_t h = top + rr;
    float* d = xbuf + rr * W * s.cg;
    if (h < 0 || h >= H) {
      std::fill_n(d, W * s.cg, 0.f);
    } else if (CL) {
      for (int64_t w = 0; w < W; ++w) std::copy_n(xg + (h * W + w) * s.in_channels, s.cg, d + w * s.cg);
    } else {
      avx2::transpose(xg + h * W, H * W, s.cg, W, d, s.cg);  // (Cg x W) plane rows -> (W x Cg)
    }
  }
  return {xbuf, s.cg};
}

// The NCHW input rows of a thread's consecutive tiles of one image overlap by the vertical
// halo. Which rows xbuf holds is tracked here, and the shared ones are moved to the front
// rather than transposed again from the planes (a third of the input transposes of 4-row
// tiles; 2.1 -> 1.4 ms per 224 x 224 x 64 image in a harness).
struct HeldRows {
  int64_t image = -1, top = 0, n = 0;  // xbuf holds rows [top, top + n) of tile image `image`

  // Moves the rows that rows [next_top, next_top + nin) of `next_image` share with the held
  // ones to the front of xbuf (row_floats floats per row), and holds the new rows; returns how
  // many were kept.
  int64_t keep_shared_rows(int64_t next_image, int64_t next_top, int64_t nin, float* xbuf, int64_t row_floats) {
    int64_t kept = 0;
    if (next_image == image && next_top >= top && next_top < top + n) {
      kept = std::min(top + n, next_top + nin) - next_top;
      std::memmove(xbuf, xbuf + (next_top - top) * row_floats, kept * row_floats * sizeof(float));
    }
    image = next_image, top = next_top, n = nin;
    return kept;
  }
};

// Stage 1 for `rows` output rows: tpad (rows x Wp pixels x Kg) = sum_i X_i * Wv_i^T, where X
// holds the input rows from the first one tap 0 reads, and the pad_h pixels either side of
// every row are zero (the horizontal padding of stage 2).
void vertical_stage_avx2(const SepConvShape& s, PixelRows x, const float* wv_packed, int64_t rows, float* tpad) {
  const int64_t W = s.width, Wp = W + 2 * s.pad_h;
  std::vector<int64_t> tap(s.dv);
  for (int64_t i = 0; i < s.dv; ++i) tap[i] = i * s.dil_v * W * x.ld;
  for (int64_t rr = 0; rr < rows; ++rr) {
    std::fill_n(tpad + rr * Wp * s.kg, s.pad_h * s.kg, 0.f);
    std::fill_n(tpad + (rr * Wp + s.pad_h + W) * s.kg, s.pad_h * s.kg, 0.f);
  }
  pixel_gemm(
      rows * W, s.kg, wv_packed, s.cg, static_cast<int>(s.dv), tap.data(), [&](int64_t p) { return x.p + p * x.ld; },
      [&](int64_t p) { return tpad + ((p / W) * Wp + s.pad_h + p % W) * s.kg; }, nullptr);
}

// Call-level scratch (packed weights, weight-gradient accumulators), kept by each calling
// thread between calls: fresh buffers were page-faulted on every call (glibc hands blocks past
// its trim threshold back to the kernel), which took 8 of the 21 ms of a batch-1 conv5_1
// backward here. Blocks are carved out of one buffer; a buffer above 64 MiB is not kept.
class CallWorkspace {
 public:
  explicit CallWorkspace(int64_t floats) : kept_(kept()) {
    TORCH_INTERNAL_ASSERT(!kept_.in_use, "sep_conv: nested use of the call workspace");
    if (kept_.size < floats) {
      kept_.data.reset();
      kept_.data.reset(new float[floats]);
      kept_.size = floats;
    }
    kept_.in_use = true;
  }
  ~CallWorkspace() {
    kept_.in_use = false;
    if (kept_.size > kKeptFloats) {
      kept_.data.reset();
      kept_.size = 0;
    }
  }
  CallWorkspace(const CallWorkspace&) = delete;
  CallWorkspace& operator=(const CallWorkspace&) = delete;

  // The next `floats` floats (64-byte aligned relative to the buffer).
  float* take(int64_t floats) {
    float* p = kept_.data.get() + used_;
    used_ += round_up(floats);
    TORCH_INTERNAL_ASSERT(used_ <= kept_.size);
    return p;
  }
  static int64_t round_up(int64_t floats) { return (floats + 15) / 16 * 16; }

 private:
  struct Kept {
    std::unique_ptr<float[]> data;
    int64_t size = 0;
    bool in_use = false;
  };
  static constexpr int64_t kKeptFloats = int64_t(16) << 20;  // 64 MiB
  static Kept& kept() {
    thread_local Kept k;
    return k;
  }
  Kept& kept_;
  int64_t used_ = 0;
};

// The weights packed for the kernels, per group: wv/wh as the forward reads them (panels
// over Kg / Ng) or transposed for the data gradients (panels over Cg / Kg).
int64_t packed_weight_v_size(const SepConvShape& s, bool transposed) {
  return s.groups * avx2::packed_panels_size(transposed ? s.cg : s.kg, transposed ? s.kg : s.cg, s.dv);
}
int64_t packed_weight_h_size(const SepConvShape& s, bool transposed) {
  return s.groups * avx2::packed_panels_size(transposed ? s.kg : s.ng, transposed ? s.ng : s.kg, s.dh);
}
const float* pack_weight_v_avx2(const SepConvShape& s, const float* wv, bool transposed, CallWorkspace& ws) {
  const int64_t rows = transposed ? s.cg : s.kg, red = transposed ? s.kg : s.cg;
  float* out = ws.take(packed_weight_v_size(s, transposed));
  const int64_t group = s.kg * s.cg * s.dv;  // weight_v is (K, Cg, dv, 1)
  const avx2::WeightStrides st = transposed ? avx2::WeightStrides{group, s.dv, s.cg * s.dv, 1}
                                            : avx2::WeightStrides{group, s.cg * s.dv, s.dv, 1};
  avx2::pack_panels(wv, st, s.groups, rows, red, s.dv, out);
  return out;
}
const float* pack_weight_h_avx2(const SepConvShape& s, const float* wh, bool transposed, CallWorkspace& ws) {
  const int64_t rows = transposed ? s.kg : s.ng, red = transposed ? s.ng : s.kg;
  float* out = ws.take(packed_weight_h_size(s, transposed));
  const int64_t group = s.ng * s.kg * s.dh;  // weight_h is (N, Kg, 1, dh)
  const avx2::WeightStrides st = transposed ? avx2::WeightStrides{group, s.dh, s.kg * s.dh, 1}
                                            : avx2::WeightStrides{group, s.kg * s.dh, s.dh, 1};
  avx2::pack_panels(wh, st, s.groups, rows, red, s.dh, out);
  return out;
}

template <bool CL>
void sep_conv_forward_avx2(const SepConvShape& s, const float* x, const float* wv, const float* wh, const float* bias,
                           float* y) {
  CallWorkspace ws(CallWorkspace::round_up(packed_weight_v_size(s, false)) +
                   CallWorkspace::round_up(packed_weight_h_size(s, false)));
  const float* wvp = pack_weight_v_avx2(s, wv, false, ws);
  const float* whp = pack_weight_h_avx2(s, wh, false, ws);
  const int64_t wv_group = avx2::packed_panels_size(s.kg, s.cg, s.dv);
  const int64_t wh_group = avx2::packed_panels_size(s.ng, s.kg, s.dh);
  const int64_t H = s.height, W = s.width, Wp = W + 2 * s.pad_h, Ho = s.out_height, Wo = s.out_width;
  const int64_t halo = s.dil_v * (s.dv - 1);
  const int64_t row_elems = s.cg * W + s.kg * Wp + (CL ? 0 : s.ng * Wo);
  const Tiling tiling = choose_tiling(s, row_elems * int64_t(sizeof(float)), 1);
  const int64_t n_tiles = s.batch * s.groups * tiling.per_image;
  const int64_t in_image = s.in_channels * H * W, out_image = s.out_channels * Ho * Wo;
  std::vector<int64_t> tap_h(s.dh);
  for (int64_t j = 0; j < s.dh; ++j) tap_h[j] = j * s.dil_h * s.kg;

  at::parallel_for(0, n_tiles, 1, [&](int64_t begin, int64_t end) {
    const int64_t max_rows = tiling.max_rows;
    const std::unique_ptr<float[]> xbuf(new float[(max_rows + halo) * W * s.cg]);
    const std::unique_ptr<float[]> tpad(new float[max_rows * Wp * s.kg]);
    const std::unique_ptr<float[]> ybuf(new float[CL ? 0 : max_rows * Wo * s.ng]);
    HeldRows held;
    for (int64_t tile = begin; tile < end; ++tile) {
      const Tiling::Location at = tiling.locate(tile, s.groups);
      const int64_t b = at.b, g = at.g, tt = at.tt;
      const int64_t r0 = tiling.begin(tt, Ho), rows = tiling.begin(tt + 1, Ho) - r0;
      const int64_t top = r0 - s.pad_v, nin = rows + halo;
      const int64_t kept = CL ? 0 : held.keep_shared_rows(at.image, top, nin, xbuf.get(), W * s.cg);
      const PixelRows xr = input_rows<CL>(s, x + b * in_image, g, top, nin, xbuf.get(), kept);
      vertical_stage_avx2(s, xr, wvp + g * wv_group, rows, tpad.get());
      // Stage 2: output pixels (taken across row ends) = sum_j T_j * Wh_j^T, plus bias.
      float* yb = y + b * out_image;
      pixel_gemm(
          rows * Wo, s.ng, whp + g * wh_group, s.kg, static_cast<int>(s.dh), tap_h.data(),
          [&](int64_t q) { return tpad.get() + ((q / Wo) * Wp + q % Wo) * s.kg; },
          [&](int64_t q) {
            return CL ? yb + ((r0 + q / Wo) * Wo + q % Wo) * s.out_channels + g * s.ng : ybuf.get() + q * s.ng;
          },
          bias ? bias + g * s.ng : nullptr);
      if (!CL) avx2::transpose(ybuf.get(), s.ng, rows * Wo, s.ng, yb + (g * s.ng * Ho + r0) * Wo, Ho * Wo);
    }
  });
}

// Fused float32 backward for stride 1. Tiles own blocks of output rows [r0, r1). Per tile:
//   * t is recomputed for the owned rows (stage 1) when grad_weight_h is needed;
//   * go rows go to gopad, pixel-major with span_h - 1 - ph zero columns on the left so
//     that dt = sum_j Go_(dh-1-j) * Wh_j (the transposed horizontal conv) reads it in place;
//   * grad_weight_h += go^T t_j and grad_weight_v += dt^T x_i over the owned rows, both
//     reductions over pixels on the same micro-kernel (per-thread accumulators in the
//     weights' layout, with channel-major copies of go and dt as the broadcast operand);
//   * grad_input is written, not accumulated: the tile owns the same share of input rows
//     as of output rows, and computes the dt rows those need. The vertical halo of dt is
//     carried over from the thread's previous tile of the same image, and recomputed only on
//     a thread's first tile of an image.
template <bool CL>
void sep_conv_backward_avx2(const SepConvShape& s, const float* gy, const float* x, const float* wv, const float* wh,
                            float* gx, float* gwv, float* gwh) {
  namespace k = avx2;
  const int64_t H = s.height, W = s.width, Wp = W + 2 * s.pad_h, Ho = s.out_height, Wo = s.out_width;
  const int64_t halo = s.dil_v * (s.dv - 1), span_h = s.dil_h * (s.dh - 1) + 1;
  const int64_t Wg = W + span_h - 1, padg = span_h - 1 - s.pad_h;  // gopad width, go's first column in it
  const bool need_dt = gx || gwv;
  const int64_t wv_numel = s.rank * s.cg * s.dv, wh_numel = s.out_channels * s.kg * s.dh;
  // Called inside another parallel region, parallel_for runs inline on this thread.
  const bool nested = at::in_parallel_region();
  const int64_t n_threads = nested ? 1 : at::get_num_threads();
  const auto sized = [](bool needed, int64_t floats) { return needed ? CallWorkspace::round_up(floats) : 0; };
  CallWorkspace ws(sized(gwh, packed_weight_v_size(s, false)) + sized(need_dt, packed_weight_h_size(s, true)) +
                   sized(gx, packed_weight_v_size(s, true)) + sized(gwv, (n_threads - 1) * wv_numel) +
                   sized(gwh, (n_threads - 1) * wh_numel));
  const float* wvp = gwh ? pack_weight_v_avx2(s, wv, false, ws) : nullptr;
  const float* whT = need_dt ? pack_weight_h_avx2(s, wh, true, ws) : nullptr;
  const float* wvT = gx ? pack_weight_v_avx2(s, wv, true, ws) : nullptr;
  const int64_t wvp_group = k::packed_panels_size(s.kg, s.cg, s.dv);
  const int64_t whT_group = k::packed_panels_size(s.kg, s.ng, s.dh);
  const int64_t wvT_group = k::packed_panels_size(s.cg, s.kg, s.dv);

  const int64_t row_elems = s.cg * W * 2 + s.kg * Wp + s.ng * Wg + s.kg * W;
  // A thread's first tile of an image recomputes the dL/dt rows of its vertical halo for
  // grad_input (later tiles take them from the tile before). Tiles of at least 2 halos ran
  // 2-14% faster than 4 halos (before the carry) on conv1_2-conv3_2, and than 1 halo on
  // conv4_x, where 1-2 row tiles re-read the weights for too few pixels.
  const Tiling tiling = choose_tiling(s, row_elems * int64_t(sizeof(float)), 1, gx ? 2 * halo : 1);
  const int64_t n_tiles = s.batch * s.groups * tiling.per_image;
  const int64_t in_image = s.in_channels * H * W, out_image = s.out_channels * Ho * Wo;
  // Weight gradients accumulate per thread in the weights' own layout: thread 0 into the
  // result, the others into the workspace. A thread's first tile of a group writes its slice
  // instead of accumulating (no zeroing); slices a thread never wrote are left out of the sum.
  float* acc_wv = gwv ? ws.take((n_threads - 1) * wv_numel) : nullptr;
  float* acc_wh = gwh ? ws.take((n_threads - 1) * wh_numel) : nullptr;
  std::vector<char> written(n_threads * s.groups, 0);
  std::vector<int64_t> tap_dt(s.dh), tap_gx(s.dv);
  for (int64_t j = 0; j < s.dh; ++j) tap_dt[j] = (s.dh - 1 - j) * s.dil_h * s.ng;
  for (int64_t i = 0; i < s.dv; ++i) tap_gx[i] = -i * s.dil_v * W * s.kg;
  const int64_t w_lo = std::max<int64_t>(0, -padg), w_hi = std::min(Wo, Wg - padg);  // go columns kept in gopad
  // Weight-gradient micro-tiles: kR output channels x kW (channel, tap) columns of the packed operand.
  const int64_t kW = k::kPanel;
  const int kR = k::kRows;
  at::parallel_for(0, n_tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> xbuf((gwh || gwv) ? (tiling.max_rows + halo) * W * s.cg : 0);
    std::vector<float> tpad, gopad, dtbuf, gxbuf, panel, rows_t;
    const int64_t thread = nested ? 0 : at::get_thread_num();
    TORCH_INTERNAL_ASSERT(thread < n_threads);
    float* my_wv = !gwv ? nullptr : thread == 0 ? gwv : acc_wv + (thread - 1) * wv_numel;
    float* my_wh = !gwh ? nullptr : thread == 0 ? gwh : acc_wh + (thread - 1) * wh_numel;
    int64_t col_off[k::kPanel];
    float* crow[k::kRows];
    const float* arow[k::kRows];
    // One weight gradient, acc (n_rows x channels*taps, column c*taps + t) += A^T B over n_pix
    // pixels: A = rows_t (n_rows x n_pix, channel-major), B = the value of channel c at pixel p
    // shifted by t taps, src_of(p) + c + t * tap_step, packed 24 columns at a time into `panel`
    // and reused by every group of kR rows. A full panel of a 3-tap weight is 8 channels x 3
    // taps, interleaved with AVX2 (the scalar gather was 5% of a batch-8 conv4_2 backward).
    const auto weight_grad = [&](float* acc, int64_t n_rows, int64_t channels, int64_t taps, int64_t tap_step,
                                 int64_t n_pix, bool accumulate, auto&& src_of) {
      const int64_t cols = channels * taps, zero = 0;
      panel.resize(n_pix * kW);
      for (int64_t q0 = 0; q0 < cols; q0 += kW) {
        const int64_t nc = std::min<int64_t>(kW, cols - q0);
        const bool interleave = taps == 3 && nc == kW;
        for (int64_t q = 0; q < nc && !interleave; ++q) col_off[q] = (q0 + q) / taps + (q0 + q) % taps * tap_step;
        for (int64_t p = 0; p < n_pix; ++p) {
          const float* src = src_of(p);
          float* d = panel.data() + p * kW;
          if (interleave) {
            k::interleave3(src + q0 / 3, tap_step, d);
          } else {
            for (int64_t q = 0; q < nc; ++q) d[q] = src[col_off[q]];
            std::fill(d + nc, d + kW, 0.f);
          }
        }
        for (int64_t r0 = 0; r0 < n_rows; r0 += kR) {
          const int rm = static_cast<int>(std::min<int64_t>(kR, n_rows - r0));
          for (int m = 0; m < rm; ++m) {
            arow[m] = rows_t.data() + (r0 + m) * n_pix;
            crow[m] = acc + (r0 + m) * cols + q0;
          }
          k::kernel_tile(rm, nc, {1, &zero, n_pix, arow, 1, panel.data(), 0, kW, crow, accumulate, nullptr});
        }
      }
    };
    // dtbuf holds the dt rows [dt_e0, dt_e1) of image dt_image (-1: none); the next tile of the
    // same image reuses the rows they share (the vertical halo) instead of recomputing them.
    int64_t dt_image = -1, dt_e0 = 0, dt_e1 = 0;
    HeldRows held;
    for (int64_t tile = begin; tile < end; ++tile) {
      const Tiling::Location at = tiling.locate(tile, s.groups);
      const int64_t b = at.b, g = at.g, tt = at.tt;
      const int64_t r0 = tiling.begin(tt, Ho), r1 = tiling.begin(tt + 1, Ho), rows = r1 - r0;
      // Input rows owned for grad_input (the same share of the input's rows as [r0, r1) is of
      // the output's, so the halo work is split evenly), and the dt rows [e0, e1) this tile needs.
      const int64_t image = at.image, h0 = tiling.begin(tt, H), h1 = tiling.begin(tt + 1, H);
      const int64_t e0 = gx ? std::min(r0, h0 + s.pad_v - halo) : r0;
      const int64_t e1 = gx ? std::max(r1, h1 + s.pad_v) : r1;
      const float* gob = gy + b * out_image;
      const bool accumulate = written[thread * s.groups + g];
      written[thread * s.groups + g] = 1;

      PixelRows xr{nullptr, 0};
      if (gwh || gwv) {
        const int64_t top = r0 - s.pad_v, nin = rows + halo;
        const int64_t kept = CL ? 0 : held.keep_shared_rows(image, top, nin, xbuf.data(), W * s.cg);
        xr = input_rows<CL>(s, x + b * in_image, g, top, nin, xbuf.data(), kept);
      }
      // dt rows [e0, c0) come from the previous tile; rows [d0, d1) are computed from gopad
      // (go rows d0..d1, zero columns either side), the rest is zero (outside [0, Ho)).
      const bool carry = need_dt && dt_image == image && dt_e0 <= e0 && e0 < dt_e1;
      const int64_t c0 = carry ? std::min(dt_e1, e1) : e0;
      const int64_t d0 = std::max<int64_t>(c0, 0), d1 = std::max(d0, std::min(e1, Ho));
      gopad.assign(need_dt ? (d1 - d0) * Wg * s.ng : 0, 0.f);
      for (int64_t r = d0; need_dt && r < d1; ++r) {
        float* d = gopad.data() + ((r - d0) * Wg + w_lo + padg) * s.ng;
        if (CL) {
          for (int64_t w = w_lo; w < w_hi; ++w)
            std::copy_n(gob + (r * Wo + w) * s.out_channels + g * s.ng, s.ng, d + (w - w_lo) * s.ng);
        } else {
          k::transpose(gob + (g * s.ng * Ho + r) * Wo + w_lo, Ho * Wo, s.ng, w_hi - w_lo, d, s.ng);
        }
      }
      if (gwh) {
        // grad_weight_h (Ng x Kg*dh) += sum over owned pixels go (pixel, n) t (pixel + j*lh, k),
        // column k*dh + j.
        tpad.resize(rows * Wp * s.kg);
        vertical_stage_avx2(s, xr, wvp + g * wvp_group, rows, tpad.data());
        // go is copied channel-major, so the broadcast operand is 4 contiguous streams (read in
        // place, pixel-major, each reduction step touched a new cache line).
        // The kept columns of the tile's rows are one run of pixels if they span whole rows.
        const int64_t qw = w_hi - w_lo, P = rows * qw, n_runs = qw == Wo ? 1 : rows, run = P / n_runs;
        rows_t.resize(s.ng * P);
        for (int64_t q = 0; q < n_runs; ++q) {
          const int64_t pix = (r0 + q) * Wo + w_lo;
          if (CL) {
            k::transpose(gob + pix * s.out_channels + g * s.ng, s.out_channels, run, s.ng, rows_t.data() + q * run, P);
          } else {
            for (int64_t n = 0; n < s.ng; ++n)
              std::copy_n(gob + (g * s.ng + n) * Ho * Wo + pix, run, rows_t.data() + n * P + q * run);
          }
        }
        weight_grad(my_wh + g * s.ng * s.kg * s.dh, s.ng, s.kg, s.dh, s.dil_h * s.kg, P, accumulate,
                    [&](int64_t p) { return tpad.data() + ((p / qw) * Wp + w_lo + p % qw) * s.kg; });
      }
      if (!need_dt) continue;
      // dt rows e0..e1 (pixel-major, Kg channels) = sum_j Go shifted * Wh_j.
      const int64_t row = W * s.kg;
      if (carry && e0 > dt_e0)
        std::copy(dtbuf.begin() + (e0 - dt_e0) * row, dtbuf.begin() + (c0 - dt_e0) * row, dtbuf.begin());
      dtbuf.resize((e1 - e0) * row);
      std::fill(dtbuf.begin() + (c0 - e0) * row, dtbuf.begin() + (d0 - e0) * row, 0.f);
      std::fill(dtbuf.begin() + (d1 - e0) * row, dtbuf.end(), 0.f);
      pixel_gemm(
          (d1 - d0) * W, s.kg, whT + g * whT_group, s.ng, static_cast<int>(s.dh), tap_dt.data(),
          [&](int64_t p) { return gopad.data() + ((p / W) * Wg + p % W) * s.ng; },
          [&](int64_t p) { return dtbuf.data() + ((d0 - e0) * W + p) * s.kg; }, nullptr);
      dt_image = image, dt_e0 = e0, dt_e1 = e1;
      if (gwv) {
        // grad_weight_v (Kg x Cg*dv) += sum over owned pixels dt (pixel, k) x (pixel + i*lv*W, c),
        // column c*dv + i; dt is copied channel-major (as go above).
        const int64_t P = rows * W;
        rows_t.resize(s.kg * P);
        k::transpose(dtbuf.data() + (r0 - e0) * W * s.kg, s.kg, P, s.kg, rows_t.data(), P);
        weight_grad(my_wv + g * s.kg * s.cg * s.dv, s.kg, s.cg, s.dv, s.dil_v * W * xr.ld, P, accumulate,
                    [&](int64_t p) { return xr.p + p * xr.ld; });
      }
      if (gx && h1 > h0) {
        // grad_input rows h0..h1 = sum_i dt (row h + pv - i*lv) * Wv_i.
        const int64_t Pg = (h1 - h0) * W;
        float* gxb = gx + b * in_image;
        if (!CL) gxbuf.resize(Pg * s.cg);
        pixel_gemm(
            Pg, s.cg, wvT + g * wvT_group, s.kg, static_cast<int>(s.dv), tap_gx.data(),
            [&](int64_t p) { return dtbuf.data() + ((h0 + s.pad_v - e0) * W + p) * s.kg; },
            [&](int64_t p) {
              return CL ? gxb + (h0 * W + p) * s.in_channels + g * s.cg : gxbuf.data() + p * s.cg;
            },
            nullptr);
        if (!CL) k::transpose(gxbuf.data(), s.cg, Pg, s.cg, gxb + (g * s.cg * H + h0) * W, H * W);
      }
    }
  });
  // Add the other threads' accumulators into thread 0's (the result), per group.
  const auto sum_threads = [&](float* out, const float* acc, int64_t numel) {
    const int64_t per_group = numel / s.groups;
    at::parallel_for(0, numel, 1 << 14, [&](int64_t begin, int64_t end) {
      for (int64_t g = begin / per_group; g * per_group < end; ++g) {
        const int64_t lo = std::max(begin, g * per_group), hi = std::min(end, (g + 1) * per_group);
        if (!written[g]) std::fill(out + lo, out + hi, 0.f);
        for (int64_t th = 1; th < n_threads; ++th) {
          if (!written[th * s.groups + g]) continue;
          const float* src = acc + (th - 1) * numel;
          for (int64_t i = lo; i < hi; ++i) out[i] += src[i];
        }
      }
    });
  };
  if (gwv) sum_threads(gwv, acc_wv, wv_numel);
  if (gwh) sum_threads(gwh, acc_wh, wh_numel);
}
#endif

// Weight layouts the kernels read: wvp (dv, K, Cg) = weight_v permuted so each tap is a
// (K x Cg) matrix; whp (N, Kg*dh) in the order of gather_mid_cols: (k, j) for NCHW,
// (j, k) for NHWC.
Tensor pack_weight_v(const Tensor& wv) { return wv.permute({2, 0, 1, 3}).contiguous(); }
Tensor pack_weight_h(const Tensor& wh, bool cl) { return cl ? wh.permute({0, 3, 1, 2}).contiguous() : wh.contiguous(); }
Tensor unpack_weight_v(const Tensor& wvp) { return wvp.permute({1, 2, 0, 3}).contiguous(); }
Tensor unpack_weight_h(const Tensor& whp, bool cl) {
  return cl ? whp.permute({0, 2, 3, 1}).contiguous() : whp;
}


// Whether the AVX2 kernels take this call: float32, stride 1, unless LOWRANK_SEP_CONV_IMPL=blas
// (run time, for comparing the two implementations; see README).
bool use_avx2_path(const SepConvShape& s, at::ScalarType ct) {
#ifdef LOWRANK_SEP_CONV_AVX2
  const char* impl = std::getenv("LOWRANK_SEP_CONV_IMPL");
  return ct == at::kFloat && s.stride_v == 1 && s.stride_h == 1 && !(impl && std::string(impl) == "blas");
#else
  (void)s;
  (void)ct;
  return false;
#endif
}

// An empty tensor for a large result; with LOWRANK_HUGE_PAGES=1, backed by transparent huge
// pages where Linux allows it. glibc serves allocations above 32 MiB with a fresh mmap on every
// call, and faulting one in 4 KiB at a time took 30-45 ms per 98 MiB on the benchmark machine
// (a batch-8 conv1_2 output: about half of sep_conv's time); huge pages took 7-15 ms when the
// memory was recycled quickly, but 135-175 ms after the process idled a few seconds (the VM's
// free-page reporting hands freed 2 MiB blocks back to the host). So it is opt-in, as PyTorch's
// own THP_MEM_ALLOC_ENABLE is; smaller buffers come back already faulted from the heap.
Tensor empty_result(at::IntArrayRef sizes, const at::TensorOptions& options) {
  Tensor t = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const char* env = std::getenv("LOWRANK_HUGE_PAGES");
  const bool enabled = env && std::string(env) == "1";
  if (enabled && t.nbytes() >= (size_t(32) << 20)) {
    const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
    const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1), last = (begin + t.nbytes()) & ~(kHuge - 1);
    // Advice only: if the kernel refuses, the memory is still ordinary memory.
    if (last > first) (void)madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#endif
  return t;
}

// Reduced-precision inputs compute in float32.
at::ScalarType compute_dtype(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

Tensor sep_conv_cpu(const Tensor& input, const Tensor& weight_v, const Tensor& weight_h,
                    const std::optional<Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                    at::IntArrayRef dilation, int64_t groups) {
  const SepConvShape s = check_sep_conv(input, weight_v, weight_h, bias, stride, padding, dilation, groups);
  if (sep_conv_is_depthwise(input, weight_v, weight_h, groups))  // sep_conv_depthwise.cpp
    return sep_conv_depthwise_forward(input, weight_v, weight_h, bias, stride, padding, dilation);
  const auto memory_format = input.suggest_memory_format();
  const bool cl = memory_format == at::MemoryFormat::ChannelsLast;
  const auto ct = compute_dtype(input.scalar_type());
  Tensor out = empty_result({s.batch, s.out_channels, s.out_height, s.out_width},
                            input.options().dtype(ct).memory_format(memory_format));
  if (out.numel() == 0) return out.to(input.scalar_type());
  const Tensor x = input.to(ct).contiguous(memory_format);
  const bool has_bias = bias.has_value() && bias->defined();
  const Tensor b = has_bias ? bias->to(ct).contiguous() : Tensor();
#ifdef LOWRANK_SEP_CONV_AVX2
  if (use_avx2_path(s, ct)) {
    const Tensor wv = weight_v.to(ct).contiguous(), wh = weight_h.to(ct).contiguous();
    auto kernel = cl ? &sep_conv_forward_avx2<true> : &sep_conv_forward_avx2<false>;
    kernel(s, x.data_ptr<float>(), wv.data_ptr<float>(), wh.data_ptr<float>(),
           has_bias ? b.data_ptr<float>() : nullptr, out.data_ptr<float>());
    return out.to(input.scalar_type());
  }
#endif
  const Tensor wvp = pack_weight_v(weight_v.to(ct));
  const Tensor whp = pack_weight_h(weight_h.to(ct), cl);
  AT_DISPATCH_FLOATING_TYPES(ct, "sep_conv_cpu", [&] {
    const scalar_t* bp = has_bias ? b.data_ptr<scalar_t>() : nullptr;
    auto kernel = cl ? &sep_conv_forward_kernel<scalar_t, true> : &sep_conv_forward_kernel<scalar_t, false>;
    kernel(s, x.data_ptr<scalar_t>(), wvp.data_ptr<scalar_t>(), whp.data_ptr<scalar_t>(), bp,
           out.data_ptr<scalar_t>());
  });
  return out.to(input.scalar_type());
}

std::tuple<Tensor, Tensor, Tensor> sep_conv_backward_cpu(const Tensor& grad_out, const Tensor& input,
                                                         const Tensor& weight_v, const Tensor& weight_h,
                                                         at::IntArrayRef stride, at::IntArrayRef padding,
                                                         at::IntArrayRef dilation, int64_t groups,
                                                         std::array<bool, 3> output_mask) {
  const SepConvShape s =
      check_sep_conv(input, weight_v, weight_h, std::nullopt, stride, padding, dilation, groups);
  TORCH_CHECK_VALUE(grad_out.dim() == 4 && grad_out.size(0) == s.batch && grad_out.size(1) == s.out_channels &&
                        grad_out.size(2) == s.out_height && grad_out.size(3) == s.out_width,
                    "sep_conv_backward: grad_out has shape ", grad_out.sizes(), ", expected [", s.batch, ", ",
                    s.out_channels, ", ", s.out_height, ", ", s.out_width, "]");
  if (sep_conv_is_depthwise(input, weight_v, weight_h, groups))  // sep_conv_depthwise.cpp
    return sep_conv_depthwise_backward(grad_out, input, weight_v, weight_h, stride, padding, dilation, output_mask);
  const auto ct = compute_dtype(input.scalar_type());
  const auto memory_format = input.suggest_memory_format();
  const bool cl = memory_format == at::MemoryFormat::ChannelsLast;
  // The AVX2 path writes every element it returns; the BLAS path accumulates into zeros.
  const bool fused = use_avx2_path(s, ct) && s.batch > 0 && s.out_channels > 0;
  const auto maybe_zero = [&](Tensor t) { return fused ? t : t.zero_(); };
  const auto input_options = input.options().dtype(ct).memory_format(memory_format);
  Tensor grad_input =
      output_mask[0] ? maybe_zero(empty_result(input.sizes(), input_options)) : at::empty({0}, input.options());
  Tensor grad_wv = output_mask[1] ? maybe_zero(at::empty(weight_v.sizes(), weight_v.options().dtype(ct)))
                                  : at::empty({0}, weight_v.options());
  Tensor grad_wh = output_mask[2] ? maybe_zero(at::empty(weight_h.sizes(), weight_h.options().dtype(ct)))
                                  : at::empty({0}, weight_h.options());
  if (s.batch > 0 && s.out_channels > 0 && (output_mask[0] || output_mask[1] || output_mask[2])) {
    const Tensor x = input.to(ct).contiguous(memory_format);
    const Tensor gy = grad_out.to(ct).contiguous(memory_format);
#ifdef LOWRANK_SEP_CONV_AVX2
    if (fused) {
      const Tensor wv = weight_v.to(ct).contiguous(), wh = weight_h.to(ct).contiguous();
      auto kernel = cl ? &sep_conv_backward_avx2<true> : &sep_conv_backward_avx2<false>;
      kernel(s, gy.data_ptr<float>(), x.data_ptr<float>(), wv.data_ptr<float>(), wh.data_ptr<float>(),
             output_mask[0] ? grad_input.data_ptr<float>() : nullptr,
             output_mask[1] ? grad_wv.data_ptr<float>() : nullptr,
             output_mask[2] ? grad_wh.data_ptr<float>() : nullptr);
      const auto dt = input.scalar_type();
      return {grad_input.to(dt), grad_wv.to(dt), grad_wh.to(dt)};
    }
#endif
    const Tensor wvp = pack_weight_v(weight_v.to(ct));
    const Tensor whp = pack_weight_h(weight_h.to(ct), cl);
    Tensor gwvp = output_mask[1] ? at::empty_like(wvp) : Tensor();
    Tensor gwhp = output_mask[2] ? at::empty_like(whp) : Tensor();
    AT_DISPATCH_FLOATING_TYPES(ct, "sep_conv_backward_cpu", [&] {
      auto kernel = cl ? &sep_conv_backward_kernel<scalar_t, true> : &sep_conv_backward_kernel<scalar_t, false>;
      kernel(s, gy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), wvp.data_ptr<scalar_t>(),
             whp.data_ptr<scalar_t>(), output_mask[0] ? grad_input.data_ptr<scalar_t>() : nullptr,
             output_mask[1] ? gwvp.data_ptr<scalar_t>() : nullptr,
             output_mask[2] ? gwhp.data_ptr<scalar_t>() : nullptr);
    });
    if (output_mask[1]) grad_wv = unpack_weight_v(gwvp);
    if (output_mask[2]) grad_wh = unpack_weight_h(gwhp, cl);
  }
  const auto dt = input.scalar_type();
  return {grad_input.to(dt), grad_wv.to(dt), grad_wh.to(dt)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lowrank, m) {
  m.def(
      "sep_conv(Tensor input, Tensor weight_v, Tensor weight_h, Tensor? bias, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups) -> Tensor");
  // Gradients for input, weight_v, weight_h (bias is a sum in Python). A gradient not asked
  // for in output_mask comes back as an empty tensor.
  m.def(
      "sep_conv_backward(Tensor grad_out, Tensor input, Tensor weight_v, Tensor weight_h, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(lowrank, CPU, m) {
  m.impl("sep_conv", &sep_conv_cpu);
  m.impl("sep_conv_backward", &sep_conv_backward_cpu);
}

}  // namespace lowrank
