// The batched SVD's kernels, compiled once per instruction-set level (batched_svd_default.cpp,
// batched_svd_avx2.cpp, batched_svd_avx512.cpp) from the same source at that level's lane width,
// and the call they share. batched_svd.cpp picks one with lowrank::cpu_capability().
#pragma once

#include <atomic>
#include <cstdint>

namespace lowrank::svd {

// One batched_svd call on contiguous row-major data: A (batch, m, n) -> U (batch, m, rank),
// S (batch, rank), Vh (batch, rank, n), all float (is_double false) or all double.
struct SvdCall {
  const void* A;
  void *U, *S, *Vh;
  int64_t batch, m, n, rank, max_sweeps;
  bool is_double;
  // float32 only: the Gram route (beyond 8 x 8) instead of float-lane Jacobi.
  bool gram;
  // Lowest flattened batch index that did not converge (left alone when all did).
  std::atomic<int64_t>* failed;
};

// Lanes per vector at each level, 16 / 32 / 64 bytes.
void run_default(const SvdCall& call);
#if defined(__x86_64__)
void run_avx2(const SvdCall& call);
void run_avx512(const SvdCall& call);
void run_avx512_256(const SvdCall& call);  // AVX-512 instructions, 32-byte lanes
#endif

}  // namespace lowrank::svd
