// AVX2/FMA float32 micro-kernel for sep_conv on CPU (used for stride 1; any padding,
// dilation and groups).
//
// Both stages of sep_conv are convolutions along one axis, i.e. GEMMs whose reduction runs
// over (tap, channel) and whose "im2col" operand is the pixel-major activation shifted by a
// per-tap offset. The micro-kernel reads that operand in place through one pointer per
// pixel -- no im2col and no BLAS-style packing of activations, all taps in one pass -- and
// only the weights are packed (once per call, into zero-padded 24-wide panels):
//
//   C (4 pixels x 24 channels) += X (4 pixels x taps*channels, in place) * W (taps*channels x 24, packed)
//
// 4 x 24 keeps 12 ymm accumulators, three weight vectors and one broadcast in the 16 ymm
// registers; each reduction step issues 12 FMAs against 3 loads and 4 broadcasts. (6 x 16, with
// 2 loads and 6 broadcasts per step, ran 25% slower on Zen 3.) Weight panels stream from L2
// (the callers cap them at 192 KiB) along with the activation rows. The same
// kernel, with strided operands, computes the weight gradients as reductions over pixels.
#pragma once

#if defined(__AVX2__) && defined(__FMA__)
#define LOWRANK_SEP_CONV_AVX2 1
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace lowrank {
namespace avx2 {
namespace {  // internal linkage: direct calls, no PLT

// Micro-tiles are kRows x kPanel: 4 x 24 (12 accumulators, 3 weight vectors and 4 broadcasts
// per step) measured 94-96 GFLOP/s on one core with L1-resident operands against 69-73 for
// 6 x 16 (AMD EPYC, Zen 3). A last panel of <= 16 channels runs as 4 x 16 or 4 x 8.
constexpr int kRows = 4;      // rows of a micro-tile (pixels or output channels: the broadcast operand)
constexpr int64_t kPanel = 24;  // columns of a micro-tile, and the width of the packed weight panels

// GCC otherwise folds each weight load into every FMA that uses it (one load per FMA instead
// of one per vector), which makes the loop load-bound.
inline void keep_in_register(__m256& v) { asm("" : "+x"(v)); }

// Lanes [0, n) active, n in [0, 8].
inline __m256i lane_mask(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::clamp<int64_t>(n, 0, 8))),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// Writes acc to the rows c[m], columns [0, ncols) (masked if MASKED); adds the old value if
// `accumulate`, else the per-column bias (may be null).
template <int MR, int NV, bool MASKED>
inline void store_tile(__m256 (&acc)[MR][NV], float* const* c, int64_t ncols, bool accumulate, const float* bias) {
  __m256i mask[NV];
  _Pragma("GCC unroll 8")
  for (int v = 0; v < NV; ++v) mask[v] = lane_mask(ncols - 8 * v);
  _Pragma("GCC unroll 8")
  for (int m = 0; m < MR; ++m) {
    _Pragma("GCC unroll 8")
    for (int v = 0; v < NV; ++v) {
      float* p = c[m] + 8 * v;
      __m256 r = acc[m][v];
      if (accumulate) {
        r = _mm256_add_ps(r, MASKED ? _mm256_maskload_ps(p, mask[v]) : _mm256_loadu_ps(p));
      } else if (bias) {
        r = _mm256_add_ps(r, MASKED ? _mm256_maskload_ps(bias + 8 * v, mask[v]) : _mm256_loadu_ps(bias + 8 * v));
      }
      if (MASKED) {
        _mm256_maskstore_ps(p, mask[v], r);
      } else {
        _mm256_storeu_ps(p, r);
      }
    }
  }
}

// acc[m][col] = sum_t sum_k a[m][a_tap[t] + k*a_step] * b[t*b_tap + k*b_step + col] for m < MR rows
// a[m] and col < 8*NV; stores columns [0, ncols). The forward and the data gradients run it
// with a = pixel rows (a_step 1) and b = a packed weight panel (b_step = its width); the
// weight gradients with a = channel rows of one pixel-major operand (a_step = its pixel
// stride) and b = a panel of another operand's channels, packed per tap (b_step = its width).
// noinline: inlined into the tile loops, GCC runs out of ymm registers and spills
// accumulators, turning the FMA chain into a store-forwarding chain (3x slower).
template <int MR, int NV>
__attribute__((noinline)) void kernel(int taps, const int64_t* a_tap, int64_t kc, const float* const* a,
                                      int64_t a_step, const float* b, int64_t b_tap, int64_t b_step, int64_t ncols,
                                      float* const* c, bool accumulate, const float* bias) {
  __m256 acc[MR][NV];
  _Pragma("GCC unroll 8")
  for (int m = 0; m < MR; ++m)
    _Pragma("GCC unroll 8")
    for (int v = 0; v < NV; ++v) acc[m][v] = _mm256_setzero_ps();
  // The C rows are read only after the reduction loop; fetching them now hides the miss
  // (weight-gradient accumulators live in L3).
  if (accumulate) {
    _Pragma("GCC unroll 8")
    for (int m = 0; m < MR; ++m) {
      _mm_prefetch(reinterpret_cast<const char*>(c[m]), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(c[m] + 8 * NV - 1), _MM_HINT_T0);
    }
  }
  for (int t = 0; t < taps; ++t) {
    const float* ar[MR];
    _Pragma("GCC unroll 8")
    for (int m = 0; m < MR; ++m) ar[m] = a[m] + a_tap[t];
    const float* bp = b + t * b_tap;
    _Pragma("GCC unroll 4")
    for (int64_t k = 0, ak = 0; k < kc; ++k, ak += a_step, bp += b_step) {
      __m256 bv[NV];
      _Pragma("GCC unroll 8")
      for (int v = 0; v < NV; ++v) {
        bv[v] = _mm256_loadu_ps(bp + 8 * v);
        keep_in_register(bv[v]);
      }
      _Pragma("GCC unroll 8")
      for (int m = 0; m < MR; ++m) {
        const __m256 av = _mm256_broadcast_ss(ar[m] + ak);
        _Pragma("GCC unroll 8")
        for (int v = 0; v < NV; ++v) acc[m][v] = _mm256_fmadd_ps(av, bv[v], acc[m][v]);
      }
    }
  }
  if (ncols >= 8 * NV) {
    store_tile<MR, NV, false>(acc, c, ncols, accumulate, bias);
  } else {
    store_tile<MR, NV, true>(acc, c, ncols, accumulate, bias);
  }
}

// Operands of one kernel call (see kernel).
struct KernelArgs {
  int taps;
  const int64_t* a_tap;
  int64_t kc;
  const float* const* a;
  int64_t a_step;
  const float* b;
  int64_t b_tap, b_step;
  float* const* c;
  bool accumulate;
  const float* bias;
};

template <int NV>
void kernel_rows(int rows, int64_t ncols, const KernelArgs& k) {
#define LOWRANK_KERNEL_CASE(MR) \
  return kernel<MR, NV>(k.taps, k.a_tap, k.kc, k.a, k.a_step, k.b, k.b_tap, k.b_step, ncols, k.c, k.accumulate, k.bias)
  switch (rows) {
    case 4: LOWRANK_KERNEL_CASE(4);
    case 3: LOWRANK_KERNEL_CASE(3);
    case 2: LOWRANK_KERNEL_CASE(2);
    default: LOWRANK_KERNEL_CASE(1);
  }
#undef LOWRANK_KERNEL_CASE
}

// One micro-tile of `rows` <= kRows rows and `ncols` <= kPanel columns: picks the
// instantiation by the number of 8-wide vectors the columns need.
inline void kernel_tile(int rows, int64_t ncols, const KernelArgs& k) {
  if (ncols > 16) {
    kernel_rows<3>(rows, ncols, k);
  } else if (ncols > 8) {
    kernel_rows<2>(rows, ncols, k);
  } else {
    kernel_rows<1>(rows, ncols, k);
  }
}

// Floats per group of pack_panels' output.
inline int64_t packed_panels_size(int64_t rows, int64_t red, int64_t taps) {
  return (rows + kPanel - 1) / kPanel * kPanel * red * taps;
}

// One 8 x 8 block: dst[j * ld_dst + i] = src[i * ld_src + j] for i < nr, j < nc. A partial
// block (at the edge of a transpose) reads and writes only its nr x nc corner, with masks.
template <bool PARTIAL = false>
inline void transpose_8x8(const float* src, int64_t ld_src, float* dst, int64_t ld_dst, int nr = 8, int nc = 8) {
  __m256 r[8], t[8];
  const __m256i load_mask = lane_mask(nc), store_mask = lane_mask(nr);
  for (int i = 0; i < 8; ++i) {
    if (!PARTIAL) {
      r[i] = _mm256_loadu_ps(src + i * ld_src);
    } else {
      r[i] = i < nr ? _mm256_maskload_ps(src + i * ld_src, load_mask) : _mm256_setzero_ps();
    }
  }
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int j = 0; j < 8; ++j) {
    const __m256 v =
        j < 4 ? _mm256_permute2f128_ps(r[j], r[j + 4], 0x20) : _mm256_permute2f128_ps(r[j - 4], r[j], 0x31);
    if (!PARTIAL) {
      _mm256_storeu_ps(dst + j * ld_dst, v);
    } else if (j < nc) {
      _mm256_maskstore_ps(dst + j * ld_dst, store_mask, v);
    }
  }
}

// dst[j * ld_dst + i] = src[i * ld_src + j] for i < rows, j < cols.
// The outer loop runs over the 8-row blocks of whichever side has the longer rows (the
// channel planes of an NCHW tensor), so 8 of its rows are streamed at a time. Writing 8
// pixels into all 64 planes of a 224 x 224 image before moving on (planes 49 x 4 KiB apart,
// so every store lands in one L1 set) took 1.8-2.5 ms per 12 MiB in a harness, against 1.1-1.7.
inline void transpose(const float* src, int64_t ld_src, int64_t rows, int64_t cols, float* dst, int64_t ld_dst) {
  const auto block = [&](int64_t i0, int64_t j0) {
    const float* s = src + i0 * ld_src + j0;
    float* d = dst + j0 * ld_dst + i0;
    if (i0 + 8 <= rows && j0 + 8 <= cols) {
      transpose_8x8(s, ld_src, d, ld_dst);
    } else {
      transpose_8x8<true>(s, ld_src, d, ld_dst, static_cast<int>(std::min<int64_t>(8, rows - i0)),
                          static_cast<int>(std::min<int64_t>(8, cols - j0)));
    }
  };
  if (ld_dst > ld_src) {
    for (int64_t j0 = 0; j0 < cols; j0 += 8)
      for (int64_t i0 = 0; i0 < rows; i0 += 8) block(i0, j0);
  } else {
    for (int64_t i0 = 0; i0 < rows; i0 += 8)
      for (int64_t j0 = 0; j0 < cols; j0 += 8) block(i0, j0);
  }
}

// d[3*c + i] = src[i * tap_step + c] for c < 8, i < 3: eight channels at three taps,
// interleaved channel-major (the weights' (channel, tap) order).
inline void interleave3(const float* src, int64_t tap_step, float* d) {
  const __m256 x = _mm256_permutevar8x32_ps(_mm256_loadu_ps(src), _mm256_setr_epi32(0, 3, 6, 1, 4, 7, 2, 5));
  const __m256 y =
      _mm256_permutevar8x32_ps(_mm256_loadu_ps(src + tap_step), _mm256_setr_epi32(5, 0, 3, 6, 1, 4, 7, 2));
  const __m256 z =
      _mm256_permutevar8x32_ps(_mm256_loadu_ps(src + 2 * tap_step), _mm256_setr_epi32(2, 5, 0, 3, 6, 1, 4, 7));
  _mm256_storeu_ps(d, _mm256_blend_ps(_mm256_blend_ps(x, y, 0x92), z, 0x24));
  _mm256_storeu_ps(d + 8, _mm256_blend_ps(_mm256_blend_ps(x, y, 0x24), z, 0x49));
  _mm256_storeu_ps(d + 16, _mm256_blend_ps(_mm256_blend_ps(x, y, 0x49), z, 0x92));
}

// The inverse of interleave3: x[c] = src[3*c], y[c] = src[3*c + 1], z[c] = src[3*c + 2], c < 8.
inline void deinterleave3(const float* src, float* x, float* y, float* z) {
  const __m256 a = _mm256_loadu_ps(src), b = _mm256_loadu_ps(src + 8), c = _mm256_loadu_ps(src + 16);
  // Lanes of a, b, c holding tap 0: a 0 3 6, b 1 4 7, c 2 5 (tap 1 and 2 likewise).
  const __m256 t0 = _mm256_blend_ps(_mm256_blend_ps(a, b, 0x92), c, 0x24);
  const __m256 t1 = _mm256_blend_ps(_mm256_blend_ps(a, b, 0x24), c, 0x49);
  const __m256 t2 = _mm256_blend_ps(_mm256_blend_ps(a, b, 0x49), c, 0x92);
  _mm256_storeu_ps(x, _mm256_permutevar8x32_ps(t0, _mm256_setr_epi32(0, 3, 6, 1, 4, 7, 2, 5)));
  _mm256_storeu_ps(y, _mm256_permutevar8x32_ps(t1, _mm256_setr_epi32(1, 4, 7, 2, 5, 0, 3, 6)));
  _mm256_storeu_ps(z, _mm256_permutevar8x32_ps(t2, _mm256_setr_epi32(2, 5, 0, 3, 6, 1, 4, 7)));
}

// Where pack_panels reads element (group g, row r, reduction index k, tap t) of a weight:
// w[g*group + r*row + k*red + t*tap].
struct WeightStrides {
  int64_t group, row, red, tap;
};

// Packs rows x red x taps weights per group into panels of kPanel rows,
// out[g][panel][t][k][kPanel], zero past `rows`.
inline void pack_panels(const float* w, WeightStrides st, int64_t groups, int64_t rows, int64_t red, int64_t taps,
                        float* out) {
  const int64_t per_group = packed_panels_size(rows, red, taps);
  const int64_t width = kPanel, panels = (rows + width - 1) / width;
  at::parallel_for(0, groups * panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t gp = begin; gp < end; ++gp) {
      const int64_t g = gp / panels, p = gp % panels;
      float* o = out + g * per_group + p * taps * red * width;
      const int64_t n = std::min(width, rows - p * width);
      const float* src = w + g * st.group + p * width * st.row;
      const auto put = [&](int64_t i, int64_t k) {
        for (int64_t t = 0; t < taps; ++t) o[(t * red + k) * width + i] = src[i * st.row + k * st.red + t * st.tap];
      };
      if (st.tap == 1 && st.red == taps) {
        // Rows contiguous in (k, t): 8 x 8 transposes of 8 rows at a time into a local block of
        // kChunk whole output rows, which is then written out row by row. (Scalar copies across
        // the rows took 25% of a batch-1 conv5 forward: 24 weight rows 6 KiB apart share two
        // L1 sets, and 32-byte stores scattered over the panel miss L1.)
        constexpr int64_t kChunk = 64;
        alignas(32) float blk[kChunk * kPanel];
        if (n < width) std::fill(blk, blk + kChunk * kPanel, 0.f);  // columns past n stay zero
        const int64_t cols = red * taps;
        for (int64_t q0 = 0; q0 < cols; q0 += kChunk) {
          const int64_t nq = std::min(kChunk, cols - q0);
          transpose(src + q0, st.row, n, nq, blk, width);
          for (int64_t q = 0; q < nq; ++q) {
            float* d = o + ((q0 + q) % taps * red + (q0 + q) / taps) * width;
            for (int64_t v = 0; v < width; v += 8) _mm256_storeu_ps(d + v, _mm256_load_ps(blk + q * width + v));
          }
        }
        continue;
      }
      if (st.tap == 1 && st.row == taps && taps == 3) {
        // The transposed packs of 3-tap weights: per k, a contiguous run of n x 3 floats to
        // de-interleave into the three tap rows.
        for (int64_t k = 0; k < red; ++k) {
          float* ox = o + k * width;
          int64_t i = 0;
          for (; i + 8 <= n; i += 8)
            deinterleave3(src + k * st.red + 3 * i, ox + i, ox + red * width + i, ox + 2 * red * width + i);
          for (; i < n; ++i) put(i, k);
        }
      } else {
        for (int64_t k = 0; k < red; ++k)
          for (int64_t i = 0; i < n; ++i) put(i, k);
      }
      if (n < width)
        for (int64_t tk = 0; tk < taps * red; ++tk) std::fill(o + tk * width + n, o + (tk + 1) * width, 0.f);
    }
  });
}

}  // namespace
}  // namespace avx2
}  // namespace lowrank
#endif
