// The depthwise forward kernels (sep_conv with groups == C == K == N), included once by each
// depthwise_<isa>.cpp after depthwise_prelude.h and its target pragma, with
// LOWRANK_DW_VECTOR_BYTES set to that level's vector width (and LOWRANK_DW_F16C where the F16C
// conversions exist). Everything here has internal linkage, so each level keeps its own copy.
//
// Per channel c, with zero padding:
//   t[b, c, i, w] = round(sum_a wv[c, a] x[b, c, i sv - pv + a lv, w])          (i < H', w < W)
//   y[b, c, i, j] = round(bias[c] + sum_e wh[c, e] t[b, c, i, j sh - ph + e lh])  (j < W')
// where round() is the rounding to the tensors' dtype (none for float32), as in the unfused pair.
// Elements are read in their own dtype and widened to float32 in registers, sums run in float32,
// and the intermediate only exists one output row at a time in a small per-thread buffer that
// stays in L1 (padded by ph zero columns on each side, so the horizontal taps need no bounds
// checks).
//
// channels_last: a thread takes whole output rows (b, i); each row is cut into strips of NV
// vectors of channels, and a strip runs the vertical stage over the whole row into the buffer
// (W + 2 ph columns of NV vectors), then the horizontal stage from it. The taps' weights of a strip
// sit in registers; the last channels reuse a vector that overlaps the one before (the overlap is
// just computed twice), so only C < one vector needs the scalar kernel.
// NCHW: a thread takes whole (b, c) planes; the vectors run along a row's columns (again with an
// overlapping last vector), and the horizontal stage of row i runs after the vertical stage of
// row i + 1 into the other of two row buffers, so its unaligned reads of the buffer never wait
// on the stores that just wrote it.
#ifndef LOWRANK_DW_VECTOR_BYTES
#error "define LOWRANK_DW_VECTOR_BYTES before including depthwise_kernels.h"
#endif

namespace lowrank::sep_conv::dw {
namespace {

constexpr int kLanes = LOWRANK_DW_VECTOR_BYTES / 4;  // floats per vector

template <int L>
struct Vec {
  typedef float F __attribute__((vector_size(4 * L)));
  typedef uint32_t U __attribute__((vector_size(4 * L)));
  typedef uint16_t H __attribute__((vector_size(2 * L)));
};

template <Dtype D>
using Elem = std::conditional_t<D == Dtype::Float, float, uint16_t>;

template <Dtype D>
constexpr bool is_bf16 = D == Dtype::BFloat16 || D == Dtype::BFloat16Native;

#if LOWRANK_DW_VECTOR_BYTES >= 64
inline __m512 bf16x16_to_float(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
#endif

template <int L>
inline typename Vec<L>::F loadf(const float* p) {
  typename Vec<L>::F v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <int L>
inline void storef(float* p, typename Vec<L>::F v) {
  std::memcpy(p, &v, sizeof(v));
}

template <int L>
inline typename Vec<L>::F broadcast(float x) {
  return typename Vec<L>::F{} + x;
}

// float32 bits -> bfloat16 bits in the low half, round to nearest even; NaN stays a quiet NaN
// (the rounding of c10::BFloat16).
template <int L>
inline typename Vec<L>::U bf16_bits(typename Vec<L>::F v) {
  using U = typename Vec<L>::U;
  const U u = (U)v;
  const U r = (u + ((u >> 16) & 1u) + 0x7fffu) >> 16;
  return v == v ? r : U{} + 0x7fc0u;
}

template <int L>
inline typename Vec<L>::F half_to_float(const uint16_t* p) {
  typename Vec<L>::F v;
#if defined(LOWRANK_DW_F16C)
#if LOWRANK_DW_VECTOR_BYTES >= 64
  if constexpr (L == 16) {
    const __m512 r = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    std::memcpy(&v, &r, sizeof(v));
    return v;
  }
#endif
  if constexpr (L == 8) {
    const __m256 r = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    std::memcpy(&v, &r, sizeof(v));
    return v;
  }
  if constexpr (L == 4) {
    const __m128 r = _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    std::memcpy(&v, &r, sizeof(v));
    return v;
  }
#endif
  for (int l = 0; l < L; ++l) v[l] = static_cast<float>(c10::Half(p[l], c10::Half::from_bits()));
  return v;
}

template <int L>
inline void float_to_half(uint16_t* p, typename Vec<L>::F v) {
#if defined(LOWRANK_DW_F16C)
#if LOWRANK_DW_VECTOR_BYTES >= 64
  if constexpr (L == 16) {
    __m512 r;
    std::memcpy(&r, &v, sizeof(v));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(r, _MM_FROUND_TO_NEAREST_INT));
    return;
  }
#endif
  if constexpr (L == 8) {
    __m256 r;
    std::memcpy(&r, &v, sizeof(v));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(r, _MM_FROUND_TO_NEAREST_INT));
    return;
  }
  if constexpr (L == 4) {
    __m128 r;
    std::memcpy(&r, &v, sizeof(v));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_cvtps_ph(r, _MM_FROUND_TO_NEAREST_INT));
    return;
  }
#endif
  for (int l = 0; l < L; ++l) p[l] = c10::Half(v[l]).x;
}

// L elements of dtype D at p, as float32.
template <Dtype D, int L>
inline typename Vec<L>::F load(const Elem<D>* p) {
  using V = Vec<L>;
  if constexpr (D == Dtype::Float) {
    return loadf<L>(p);
  } else if constexpr (is_bf16<D>) {
#if LOWRANK_DW_VECTOR_BYTES >= 64
    if constexpr (L == 16) {
      const __m512 r = bf16x16_to_float(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
      typename V::F v;
      std::memcpy(&v, &r, sizeof(v));
      return v;
    }
#endif
    typename V::H h;
    std::memcpy(&h, p, sizeof(h));
    return (typename V::F)(__builtin_convertvector(h, typename V::U) << 16);
  } else {
    return half_to_float<L>(p);
  }
}

// v rounded to dtype D and stored at p.
template <Dtype D, int L>
inline void store(Elem<D>* p, typename Vec<L>::F v) {
  using V = Vec<L>;
  if constexpr (D == Dtype::Float) {
    storef<L>(p, v);
  } else if constexpr (is_bf16<D>) {
#if defined(LOWRANK_DW_AVX512BF16)
    if constexpr (D == Dtype::BFloat16Native && L == 16) {
      __m512 r;
      std::memcpy(&r, &v, sizeof(v));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(r));
      return;
    }
#endif
    const typename V::H h = __builtin_convertvector(bf16_bits<L>(v), typename V::H);
    std::memcpy(p, &h, sizeof(h));
  } else {
    float_to_half<L>(p, v);
  }
}

// v rounded to dtype D, kept as float32 (the intermediate's rounding).
template <Dtype D, int L>
inline typename Vec<L>::F round_to(typename Vec<L>::F v) {
  using V = Vec<L>;
  if constexpr (D == Dtype::Float) {
    return v;
  } else if constexpr (is_bf16<D>) {
#if defined(LOWRANK_DW_AVX512BF16)
    if constexpr (D == Dtype::BFloat16Native && L == 16) {
      __m512 r;
      std::memcpy(&r, &v, sizeof(v));
      r = bf16x16_to_float((__m256i)_mm512_cvtneps_pbh(r));
      std::memcpy(&v, &r, sizeof(v));
      return v;
    }
#endif
    const typename V::U u = (typename V::U)v;
    const typename V::F r = (typename V::F)((u + ((u >> 16) & 1u) + 0x7fffu) & 0xffff0000u);
    return v == v ? r : v;
  } else {
    uint16_t h[L];
    float_to_half<L>(h, v);
    return half_to_float<L>(h);
  }
}

// Prefetch hints for the bytes [p, p + n) into L2 (write: about to be stored), one per cache line.
// They cover the rows the next work item reads first and the output rows it writes: those come
// from memory, and the strided (channels_last) or short (NCHW) accesses give the hardware
// prefetchers little to go on.
inline void prefetch(const void* p, int64_t n, bool write) {
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < n; o += 64) {
    if (write) {
      __builtin_prefetch(c + o, 1, 2);
    } else {
      __builtin_prefetch(c + o, 0, 2);
    }
  }
}

// ---------------------------------------------------------------------------- channels_last

// The taps of output row i that fall inside the image: their input rows and weights.
struct RowTaps {
  int64_t count = 0;
  std::vector<int64_t> rows, taps;
  explicit RowTaps(int64_t dv) : rows(dv), taps(dv) {}
  void find(const SepConvShape& s, int64_t i) {
    count = 0;
    for (int64_t a = 0; a < s.dv; ++a) {
      const int64_t r = i * s.stride_v - s.pad_v + a * s.dil_v;
      if (r < 0 || r >= s.height) continue;
      rows[count] = r;
      taps[count] = a;
      ++count;
    }
  }
};

// One strip of NV vectors of channels from channel c of one output row. xr[k]: the input row of
// valid tap k (m of them), wvr[k]: its weights (C floats), yr: the output row; t: the row buffer.
// DV, DH > 0: the tap counts known at compile time (then m == DV), so the weights stay in
// registers; 0: any count. pfx, pfy (or null): the next work item's newest input row and its
// output row, whose strip is prefetched along the way.
template <Dtype D, int L, int NV, int DV, int DH>
void cl_strip(const SepConvShape& s, const Elem<D>* const* xr, const float* const* wvr, int64_t m, const float* wh,
              const float* bias, int64_t c, float* __restrict t, Elem<D>* __restrict yr, const Elem<D>* pfx,
              Elem<D>* pfy) {
  using F = typename Vec<L>::F;
  constexpr int S = NV * L;
  const int64_t C = s.in_channels, W = s.width, Wo = s.out_width, sh = s.stride_h, lh = s.dil_h, ph = s.pad_h;
  std::fill(t, t + ph * S, 0.f);
  std::fill(t + (W + ph) * S, t + (W + 2 * ph) * S, 0.f);
  float* __restrict tc = t + ph * S;
  if constexpr (DV > 0) {
    F wr[DV][NV];
    const Elem<D>* xp[DV];
    for (int k = 0; k < DV; ++k) {
      xp[k] = xr[k] + c;
      for (int v = 0; v < NV; ++v) wr[k][v] = loadf<L>(wvr[k] + c + v * L);
    }
    for (int64_t w = 0; w < W; ++w) {
      if (pfx) prefetch(pfx + w * C + c, S * sizeof(Elem<D>), false);
      for (int v = 0; v < NV; ++v) {
        F acc = wr[0][v] * load<D, L>(xp[0] + w * C + v * L);
        for (int k = 1; k < DV; ++k) acc += wr[k][v] * load<D, L>(xp[k] + w * C + v * L);
        storef<L>(tc + w * S + v * L, round_to<D, L>(acc));
      }
    }
  } else {
    for (int64_t w = 0; w < W; ++w) {
      if (pfx) prefetch(pfx + w * C + c, S * sizeof(Elem<D>), false);
      for (int v = 0; v < NV; ++v) {
        F acc{};
        for (int64_t k = 0; k < m; ++k) acc += loadf<L>(wvr[k] + c + v * L) * load<D, L>(xr[k] + c + w * C + v * L);
        storef<L>(tc + w * S + v * L, round_to<D, L>(acc));
      }
    }
  }
  F b0[NV];
  for (int v = 0; v < NV; ++v) b0[v] = loadf<L>(bias + c + v * L);
  Elem<D>* __restrict yc = yr + c;
  if constexpr (DH > 0) {
    F wr[DH][NV];
    for (int e = 0; e < DH; ++e)
      for (int v = 0; v < NV; ++v) wr[e][v] = loadf<L>(wh + e * C + c + v * L);
    for (int64_t j = 0; j < Wo; ++j) {
      if (pfy) prefetch(pfy + j * C + c, S * sizeof(Elem<D>), true);
      const float* tj = t + j * sh * S;
      for (int v = 0; v < NV; ++v) {
        F acc = b0[v];
        for (int e = 0; e < DH; ++e) acc += wr[e][v] * loadf<L>(tj + e * lh * S + v * L);
        store<D, L>(yc + j * C + v * L, acc);
      }
    }
  } else {
    for (int64_t j = 0; j < Wo; ++j) {
      if (pfy) prefetch(pfy + j * C + c, S * sizeof(Elem<D>), true);
      const float* tj = t + j * sh * S;
      for (int v = 0; v < NV; ++v) {
        F acc = b0[v];
        for (int64_t e = 0; e < s.dh; ++e) acc += loadf<L>(wh + e * C + c + v * L) * loadf<L>(tj + e * lh * S + v * L);
        store<D, L>(yc + j * C + v * L, acc);
      }
    }
  }
}

template <Dtype D, int L, int NV>
inline void cl_strip_any(bool three, const SepConvShape& s, const Elem<D>* const* xr, const float* const* wvr,
                         int64_t m, const float* wh, const float* bias, int64_t c, float* t, Elem<D>* yr,
                         const Elem<D>* pfx, Elem<D>* pfy) {
  if (three) {
    cl_strip<D, L, NV, 3, 3>(s, xr, wvr, m, wh, bias, c, t, yr, pfx, pfy);
  } else {
    cl_strip<D, L, NV, 0, 0>(s, xr, wvr, m, wh, bias, c, t, yr, pfx, pfy);
  }
}

// Strips of NV vectors, then single vectors for the rest (the last one overlapping); C >= L.
template <Dtype D, int L, int NV>
void forward_cl(const ForwardCall& k) {
  using E = Elem<D>;
  const SepConvShape& s = k.s;
  const int64_t C = s.in_channels, W = s.width, Ho = s.out_height, Wo = s.out_width;
  const E* x = static_cast<const E*>(k.x);
  E* y = static_cast<E*>(k.y);
  at::parallel_for(0, s.batch * Ho, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> tbuf((W + 2 * s.pad_h) * NV * L);
    RowTaps taps(s.dv), next(s.dv);
    std::vector<const E*> xr(s.dv);
    std::vector<const float*> wvr(s.dv);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / Ho, i = item % Ho;
      taps.find(s, i);
      for (int64_t q = 0; q < taps.count; ++q) {
        xr[q] = x + (b * s.height + taps.rows[q]) * W * C;
        wvr[q] = k.wv + taps.taps[q] * C;
      }
      const bool three = taps.count == 3 && s.dv == 3 && s.dh == 3;
      E* yr = y + item * Wo * C;
      const E* pfx = nullptr;
      E* pfy = nullptr;
      if (item + 1 < end) {
        next.find(s, (item + 1) % Ho);
        if (next.count > 0) pfx = x + ((item + 1) / Ho * s.height + next.rows[next.count - 1]) * W * C;
        pfy = yr + Wo * C;
      }
      int64_t c = 0;
      for (; c + NV * L <= C; c += NV * L)
        cl_strip_any<D, L, NV>(three, s, xr.data(), wvr.data(), taps.count, k.wh, k.bias, c, tbuf.data(), yr, pfx, pfy);
      for (; c < C; c += L)
        cl_strip_any<D, L, 1>(three, s, xr.data(), wvr.data(), taps.count, k.wh, k.bias, std::min(c, C - L),
                              tbuf.data(), yr, pfx, pfy);
    }
  });
}

// ---------------------------------------------------------------------------- NCHW

// Vertical stage of output row i of one plane into t (already offset by ph); W >= L.
template <Dtype D, int L, int DV>
inline void nchw_vertical(const SepConvShape& s, const Elem<D>* xp, const float* wvc, const RowTaps& taps,
                          float* __restrict t) {
  using F = typename Vec<L>::F;
  const int64_t W = s.width;
  if constexpr (DV > 0) {
    F wr[DV];
    const Elem<D>* xr[DV];
    for (int q = 0; q < DV; ++q) {
      wr[q] = broadcast<L>(wvc[taps.taps[q]]);
      xr[q] = xp + taps.rows[q] * W;
    }
    for (int64_t w0 = 0; w0 < W; w0 += L) {
      const int64_t w = std::min(w0, W - L);
      F acc = wr[0] * load<D, L>(xr[0] + w);
      for (int q = 1; q < DV; ++q) acc += wr[q] * load<D, L>(xr[q] + w);
      storef<L>(t + w, round_to<D, L>(acc));
    }
  } else {
    for (int64_t w0 = 0; w0 < W; w0 += L) {
      const int64_t w = std::min(w0, W - L);
      F acc{};
      for (int64_t q = 0; q < taps.count; ++q) acc += wvc[taps.taps[q]] * load<D, L>(xp + taps.rows[q] * W + w);
      storef<L>(t + w, round_to<D, L>(acc));
    }
  }
}

// Horizontal stage of one output row from the padded row buffer t; Wo >= L.
template <Dtype D, int L, int DH>
inline void nchw_horizontal(const SepConvShape& s, const float* __restrict t, const float* whc, float b0,
                            Elem<D>* __restrict yr) {
  using F = typename Vec<L>::F;
  const int64_t Wo = s.out_width, sh = s.stride_h, lh = s.dil_h;
  const int64_t dh = DH > 0 ? DH : s.dh;
  F wr[DH > 0 ? DH : 1];
  if constexpr (DH > 0)
    for (int e = 0; e < DH; ++e) wr[e] = broadcast<L>(whc[e]);
  for (int64_t j0 = 0; j0 < Wo; j0 += L) {
    const int64_t j = std::min(j0, Wo - L);
    F acc = broadcast<L>(b0);
    for (int64_t e = 0; e < dh; ++e) {
      const F we = DH > 0 ? wr[e] : broadcast<L>(whc[e]);
      F te;
      if (sh == 1) {
        te = loadf<L>(t + j + e * lh);
      } else {
        for (int l = 0; l < L; ++l) te[l] = t[(j + l) * sh + e * lh];
      }
      acc += we * te;
    }
    store<D, L>(yr + j, acc);
  }
}

template <Dtype D, int L>
void forward_nchw(const ForwardCall& k) {
  using E = Elem<D>;
  const SepConvShape& s = k.s;
  const int64_t C = s.in_channels, H = s.height, W = s.width, Ho = s.out_height, Wo = s.out_width;
  const int64_t dv = s.dv, dh = s.dh, ph = s.pad_h;
  const E* x = static_cast<const E*>(k.x);
  E* y = static_cast<E*>(k.y);
  const bool three = dv == 3 && dh == 3;
  const E* x_end = x + s.batch * C * H * W;
  const E* y_end = y + s.batch * C * Ho * Wo;
  constexpr int64_t kAhead = 2048;  // bytes
  at::parallel_for(0, s.batch * C, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> tbuf(2 * (W + 2 * ph), 0.f);  // the padding columns stay zero
    float* tb[2] = {tbuf.data(), tbuf.data() + W + 2 * ph};
    RowTaps taps(dv);
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t c = plane % C;
      const E* xp = x + plane * H * W;
      E* yp = y + plane * Ho * Wo;
      const float* wvc = k.wv + c * dv;
      const float* whc = k.wh + c * dh;
      const float b0 = k.bias[c];
      for (int64_t i = 0; i <= Ho; ++i) {
        if (i < Ho) {
          taps.find(s, i);
          // A fixed distance ahead of the newest input row and of the output row, running on
          // into the next planes of this thread's range.
          if (taps.count > 0) {
            const E* pfx = xp + taps.rows[taps.count - 1] * W + kAhead / sizeof(E);
            if (pfx + W <= x_end) prefetch(pfx, W * sizeof(E), false);
          }
          E* pfy = yp + i * Wo + kAhead / sizeof(E);
          if (pfy + Wo <= y_end) prefetch(pfy, Wo * sizeof(E), true);
          float* t = tb[i & 1] + ph;
          if (three && taps.count == 3) {
            nchw_vertical<D, L, 3>(s, xp, wvc, taps, t);
          } else {
            nchw_vertical<D, L, 0>(s, xp, wvc, taps, t);
          }
        }
        if (i > 0) {
          const float* t = tb[(i - 1) & 1];
          if (three) {
            nchw_horizontal<D, L, 3>(s, t, whc, b0, yp + (i - 1) * Wo);
          } else {
            nchw_horizontal<D, L, 0>(s, t, whc, b0, yp + (i - 1) * Wo);
          }
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------- entry

template <Dtype D>
void forward_typed(const ForwardCall& k) {
  const SepConvShape& s = k.s;
  if (k.channels_last) {
    if (s.in_channels >= kLanes) {
      forward_cl<D, kLanes, D == Dtype::Float ? 4 : 8>(k);
    } else {
      forward_cl<D, 1, 1>(k);
    }
  } else {
    const int64_t n = std::min(s.width, s.out_width);
    if (n >= kLanes) {
      forward_nchw<D, kLanes>(k);
    } else if (n >= kLanes / 2 && kLanes / 2 > 1) {
      forward_nchw<D, (kLanes / 2 > 1 ? kLanes / 2 : 1)>(k);
    } else {
      forward_nchw<D, 1>(k);
    }
  }
}

inline void forward(const ForwardCall& k) {
  switch (k.dtype) {
    case Dtype::BFloat16Native:
#if defined(LOWRANK_DW_AVX512BF16)
      forward_typed<Dtype::BFloat16Native>(k);
      break;
#endif
    case Dtype::BFloat16:
      forward_typed<Dtype::BFloat16>(k);
      break;
    case Dtype::Half:
      forward_typed<Dtype::Half>(k);
      break;
    default:
      forward_typed<Dtype::Float>(k);
  }
}

}  // namespace
}  // namespace lowrank::sep_conv::dw
