// The GEMM every stage of sep_conv runs on: C (M x N, float or double) = A (M x K) * B (K x N)
// [+ C], row-major, A read in place through its leading dimension, B packed once per call.
//
//   * float: oneDNN's batch-reduce GEMM (at::native::cpublas::brgemm), generated at run time
//     for the CPU it runs on (AVX2, AVX-512, ...; capped by ONEDNN_MAX_CPU_ISA). cpublas falls
//     back to the BLAS GEMM where oneDNN has no kernel (CPUs without AVX2, or when
//     torch.backends.mkldnn is disabled).
//   * bfloat16 / float16 "native": 16-bit A and B, float C, on the matrix engines (AMX) when
//     cpublas::could_pack says oneDNN can pack B into its VNNI layout for this CPU. B is packed in
//     column blocks of kVnniBlock (wider blocks failed to pack), and K must be even (an odd K
//     crashed inside oneDNN). Where that is not possible the kernels compute in float instead and
//     convert 16-bit data tile by tile (see Compute in sep_conv.h).
//   * double: the BLAS inside libtorch (gradcheck and float64 users).
#pragma once

#include <ATen/ATen.h>
#include <ATen/native/CPUBlas.h>

#include "../blas.h"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace lowrank {
namespace sep_conv {

// Column block of a VNNI-packed 16-bit B.
constexpr int64_t kVnniBlock = 64;

template <typename T>
constexpr bool is_16bit() {
  return std::is_same_v<T, at::BFloat16> || std::is_same_v<T, at::Half>;
}

// Accumulator type of operand type T.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Whether oneDNN can multiply 16-bit operands of type `dtype` with a reduction of length k on
// this CPU.
inline bool native_16bit_ok(at::ScalarType dtype, int64_t k) {
  return k % 2 == 0 && at::native::cpublas::could_pack(dtype);
}

// oneDNN and BLAS take 32-bit dimensions: a call past that range is an error, not a wrap.
inline void check_dims(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldc) {
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(m <= kMax && n <= kMax && k <= kMax && lda <= kMax && ldc <= kMax, "sep_conv: a GEMM of this call (M=", m,
              ", N=", n, ", K=", k, ", lda=", lda, ", ldc=", ldc,
              ") exceeds the 32-bit sizes oneDNN/BLAS accept; use a smaller input");
}

// Elements of the packed form of a K x N matrix B of operand type T.
template <typename T>
int64_t packed_b_size(int64_t k, int64_t n) {
  if constexpr (is_16bit<T>()) return (n + kVnniBlock - 1) / kVnniBlock * kVnniBlock * k;
  return k * n;
}

// Packs the row-major K x N matrix `src` (leading dimension ld) for gemm().
template <typename T>
void pack_b(int64_t k, int64_t n, const T* src, int64_t ld, T* dst) {
  if constexpr (is_16bit<T>()) {
    const auto dt = c10::CppTypeToScalarType<T>::value;
    for (int64_t n0 = 0; n0 < n; n0 += kVnniBlock)
      at::native::cpublas::pack(k, std::min(kVnniBlock, n - n0), ld, kVnniBlock, dt, dt, src + n0, dst + n0 * k);
  } else {
    for (int64_t r = 0; r < k; ++r) std::copy_n(src + r * ld, n, dst + r * n);
  }
}

// C (M x N, leading dimension ldc) = A (M x K, leading dimension lda) * B (K x N, row-major,
// leading dimension ldb) [+ C if add_c]; float and double only (16-bit B must be packed).
template <typename T>
void gemm_rowmajor_b(int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b, int64_t ldb, acc_t<T>* c,
                     int64_t ldc, bool add_c) {
  static_assert(!is_16bit<T>(), "16-bit B operands must be packed (pack_b)");
  if (m <= 0 || n <= 0) return;
  check_dims(m, n, k, std::max(lda, ldb), ldc);
  if constexpr (std::is_same_v<T, float>) {
    at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, add_c, a, b, c, /*is_vnni=*/false);
  } else {
    blas::gemm<T>(false, false, m, n, k, a, lda, b, ldb, add_c ? T(1) : T(0), c, ldc);
  }
}

// C (M x N, leading dimension ldc) = A (M x K, leading dimension lda) * B [+ C if add_c], B
// packed by pack_b.
template <typename T>
void gemm(int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b, acc_t<T>* c, int64_t ldc, bool add_c) {
  if constexpr (is_16bit<T>()) {
    if (m <= 0 || n <= 0) return;
    check_dims(m, n, k, lda, ldc);
    for (int64_t n0 = 0; n0 < n; n0 += kVnniBlock)
      at::native::cpublas::brgemm(m, std::min(kVnniBlock, n - n0), k, lda, kVnniBlock, ldc, add_c, a, b + n0 * k,
                                  c + n0, /*is_vnni=*/true);
  } else {
    gemm_rowmajor_b<T>(m, n, k, a, lda, b, n, c, ldc, add_c);
  }
}

// Releases the AMX state the 16-bit kernels configured on this thread.
template <typename T>
void release() {
  if constexpr (is_16bit<T>()) at::native::cpublas::brgemm_release(true);
}

}  // namespace sep_conv
}  // namespace lowrank
