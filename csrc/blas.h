// Row-major GEMM on the BLAS inside libtorch_cpu (MKL or OpenBLAS: torch exports their Fortran
// sgemm_/dgemm_; at::native::cpublas is not exported). Shared by the CPU kernels.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>

#include <c10/util/Exception.h>

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc);
}

namespace lowrank {
namespace blas {

inline void fortran_gemm(char ta, char tb, int m, int n, int k, float alpha, const float* a, int lda, const float* b,
                         int ldb, float beta, float* c, int ldc) {
  sgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}
inline void fortran_gemm(char ta, char tb, int m, int n, int k, double alpha, const double* a, int lda, const double* b,
                         int ldb, double beta, double* c, int ldc) {
  dgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}

// BLAS dimensions are 32-bit: a larger one is an error, never a silent wrap.
inline int checked_int(int64_t v) {
  TORCH_CHECK(v >= 0 && v <= std::numeric_limits<int>::max(), "lowrank: a BLAS dimension of ", v,
              " exceeds the 32-bit range BLAS accepts; use smaller inputs");
  return static_cast<int>(v);
}

// Row-major C(MxN) = alpha op(A)(MxK) op(B)(KxN) + beta C. BLAS is column-major, so this
// computes C^T = op(B)^T op(A)^T. BLAS wants leading dimensions >= 1.
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
          int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {  // C = beta C without reading C when beta is 0 (it may be uninitialized)
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == T(0) ? T(0) : beta * c[i * ldc + j];
    return;
  }
  fortran_gemm(trans_b ? 'T' : 'N', trans_a ? 'T' : 'N', checked_int(n), checked_int(m), checked_int(k), alpha, b,
               checked_int(std::max<int64_t>(ldb, 1)), a, checked_int(std::max<int64_t>(lda, 1)), beta, c,
               checked_int(std::max<int64_t>(ldc, 1)));
}

// The same with alpha = 1.
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b, int64_t ldb,
          T beta, T* c, int64_t ldc) {
  gemm<T>(trans_a, trans_b, m, n, k, T(1), a, lda, b, ldb, beta, c, ldc);
}

}  // namespace blas
}  // namespace lowrank
