// SIMD lanes of the batched SVD: one lane per matrix, Bytes wide (16: SSE2/NEON, 32: AVX2,
// 64: AVX-512), written once on GCC vector types. Arithmetic, comparisons and blends are the
// compiler's vector operators (a * b + c becomes an FMA under -ffp-contract=fast where the
// target has one); only sqrt and the lane mask use x86 intrinsics, with a per-lane fallback.
//
// Part of the per-instruction-set kernel translation units (batched_svd_kernel.h): included
// after the standard headers, inside an anonymous namespace and the TU's target pragma.
#pragma once

#ifndef LOWRANK_SVD_KERNEL_TU
#error "batched_svd_lanes.h belongs to the batched_svd_<isa>.cpp kernel translation units"
#endif

template <typename T, int Bytes>
struct Lanes {
  static_assert(Bytes % sizeof(T) == 0, "lane width must be a multiple of the element size");
  static constexpr int L = Bytes / int(sizeof(T));
  using I = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  typedef T V __attribute__((vector_size(Bytes)));
  typedef I IV __attribute__((vector_size(Bytes)));

  static V load(const T* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
  }
  static void store(T* p, V v) { std::memcpy(p, &v, sizeof(V)); }
  static V set1(T x) { return V{} + x; }
  static V fmadd(V a, V b, V c) { return a * b + c; }
  static V fnmadd(V a, V b, V c) { return c - a * b; }
  static V abs(V a) { return (V)((IV)a & ~sign_bits()); }
  static V copysign(V mag, V sgn) { return (V)(((IV)mag & ~sign_bits()) | ((IV)sgn & sign_bits())); }
  static V min(V a, V b) { return a < b ? a : b; }
  static V max(V a, V b) { return a > b ? a : b; }
  static V blend_gt(V x, V y, V a, V b) { return x > y ? b : a; }  // per lane: x > y ? b : a

  static V sqrt(V a) {
#if defined(__x86_64__)
    if constexpr (Bytes == 64 && sizeof(T) == 8)
      return (V)_mm512_mask_sqrt_pd((__m512d)a, (__mmask8)0xFF, (__m512d)a);  // no undefined source lanes
    if constexpr (Bytes == 64 && sizeof(T) == 4) return (V)_mm512_mask_sqrt_ps((__m512)a, (__mmask16)0xFFFF, (__m512)a);
    if constexpr (Bytes == 32 && sizeof(T) == 8) return (V)_mm256_sqrt_pd((__m256d)a);
    if constexpr (Bytes == 32 && sizeof(T) == 4) return (V)_mm256_sqrt_ps((__m256)a);
    if constexpr (Bytes == 16 && sizeof(T) == 8) return (V)_mm_sqrt_pd((__m128d)a);
    if constexpr (Bytes == 16 && sizeof(T) == 4) return (V)_mm_sqrt_ps((__m128)a);
#endif
    V r;
    for (int i = 0; i < L; ++i) r[i] = std::sqrt(a[i]);
    return r;
  }

  // Bit i set where x[i] > y[i] (ordered: false for NaN).
  static unsigned gt_mask(V x, V y) {
    const IV gt = x > y;
#if defined(__x86_64__)
    if constexpr (Bytes == 64 && sizeof(T) == 8) return (unsigned)_mm512_movepi64_mask((__m512i)gt);
    if constexpr (Bytes == 64 && sizeof(T) == 4) return (unsigned)_mm512_movepi32_mask((__m512i)gt);
    if constexpr (Bytes == 32 && sizeof(T) == 8) return (unsigned)_mm256_movemask_pd((__m256d)gt);
    if constexpr (Bytes == 32 && sizeof(T) == 4) return (unsigned)_mm256_movemask_ps((__m256)gt);
    if constexpr (Bytes == 16 && sizeof(T) == 8) return (unsigned)_mm_movemask_pd((__m128d)gt);
    if constexpr (Bytes == 16 && sizeof(T) == 4) return (unsigned)_mm_movemask_ps((__m128)gt);
#endif
    unsigned mask = 0;
    for (int i = 0; i < L; ++i) mask |= gt[i] ? 1u << i : 0u;
    return mask;
  }

 private:
  static IV sign_bits() { return IV{} + std::numeric_limits<I>::min(); }
};
