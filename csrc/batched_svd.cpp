// Batched thin SVD on CPU, vectorized ACROSS matrices.
//
// A group of L matrices is packed in a structure-of-arrays buffer where lane = matrix, so
// every operation updates L matrices with one vector instruction and tiny sizes (3x3 ...
// 16x16) need no horizontal reductions. Groups are spread over threads with at::parallel_for.
// Two algorithms share the packing and the unpacking (sort, signs, completion):
//
// * One-sided (Hestenes) Jacobi: float64, and float32 with max(m, n) <= 8. Lanes are doubles
//   for float64; float32 up to 8 x 8 uses float lanes (twice as many per register; errors ~3e-6
//   there -- float rotations would leave ||V^T V - I|| ~ 1e-4 at 64 x 64).
// * The Gram route (gram_tridiagonal, tridiagonal_qr, gram_vectors): float32 beyond 8 x 8.
//   B = W^T W in double lanes, Householder tridiagonalization + implicit QR for
//   B = V diag(sigma^2) V^T, W V = U diag(sigma) with a Gram-Schmidt repair where the columns
//   lost orthogonality. ~10 k^3 flops instead of Jacobi's ~90 k^3; accurate norm-wise (what
//   float32 results need), not to float64's 1e-12. Two groups at a time, so that the two
//   latency-bound QR chases interleave.
//
// Per matrix A (m x n), with k = min(m, n) and l = max(m, n):
//   * W = A (tall/square) or A^T (wide), an l x k matrix scaled by a power of two so its
//     largest entry is in [0.5, 1) (exact; avoids overflow/underflow in the dot products);
//   * Jacobi: sweeps over column pairs (p, q) in round-robin order: rotate when
//     |w_p.w_q| > tol * |w_p| |w_q|, accumulating the rotations into V (k x k); stop when a
//     sweep rotates nothing in any lane of the group, or report non-convergence (RuntimeError
//     naming the matrix) after max_sweeps sweeps. Gram route: max_sweeps bounds the QR steps
//     per eigenvalue instead;
//   * sigma_j = |w_j|, the columns w_j / sigma_j are the singular vectors on the long side,
//     V those on the short side; sort descending and fix signs (largest entry of each right
//     singular vector positive). Numerically zero columns (sigma_j <= sigma_max * eps^2, or
//     at the float rounding floor in float lanes) are replaced by an orthonormal completion,
//     so U^T U = I always holds.
//   * Matrices with a NaN/inf entry are not iterated: their U, S, Vh are all NaN.
// Both handle min(m, n) <= 64 (the SoA buffers, a few l*k and k*k vectors per group, stay in
// L2 there; max(m, n) is unlimited); larger matrices take LAPACK with the same contract applied
// on top (lapack_fallback below).
//
// The lanes follow the vector width of the CPU the call runs on (lowrank::cpu_capability():
// 8 doubles / 16 floats with AVX-512, 4 / 8 with AVX2, 2 / 4 otherwise; with AVX-512 the float32
// Gram route keeps 4-double lanes, which are faster for it); the kernels are one source
// (batched_svd_kernels.h) compiled per level and width in batched_svd_<level>.cpp. This file holds
// the argument checks, the LAPACK fallback, the dispatch and the op registrations.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <atomic>
#include <limits>
#include <optional>
#include <string>

#include "batched_svd_isa.h"
#include "cpu_capability.h"

namespace lowrank {
namespace {

using at::Tensor;

constexpr int64_t kFloatLanesMaxSize = 8;
// Beyond min(m, n) = 64 a per-matrix LAPACK call (gesdd) is faster than Jacobi (Jacobi's
// sweeps grow as n^3 per sweep with more sweeps), so larger matrices take LAPACK, with this op's contract applied on
// top (NaN rows, signs, truncation). (The float32 Gram route is faster than LAPACK at 64 x 64 but keeps the same
// limit.)
constexpr int64_t kJacobiMaxSize = 64;

std::tuple<Tensor, Tensor, Tensor> lapack_fallback(const Tensor& A, int64_t rank) {
  const Tensor finite = at::isfinite(A).flatten(-2).all(-1);  // (...)
  const Tensor clean = at::where(finite.unsqueeze(-1).unsqueeze(-1), A, at::zeros({}, A.options()));
  auto [U, S, Vh] = at::linalg_svd(clean, /*full_matrices=*/false);
  U = U.narrow(-1, 0, rank);
  S = S.narrow(-1, 0, rank);
  Vh = Vh.narrow(-2, 0, rank);
  // Sign convention of the Jacobi path: the largest entry of each right singular vector is positive.
  const Tensor big = Vh.gather(-1, Vh.abs().argmax(-1, /*keepdim=*/true));  // (..., rank, 1)
  const Tensor sign = at::where(big < 0, -1.0, 1.0).to(A.scalar_type());
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const Tensor bad = finite.logical_not();
  U = (U * sign.transpose(-1, -2)).masked_fill(bad.unsqueeze(-1).unsqueeze(-1), nan).contiguous();
  S = S.masked_fill(bad.unsqueeze(-1), nan).contiguous();
  Vh = (Vh * sign).masked_fill(bad.unsqueeze(-1).unsqueeze(-1), nan).contiguous();
  return {U, S, Vh};
}

// Measurement switch (not part of the API): LOWRANK_SVD_AVX512_WIDE=1 runs the Gram route at
// 8-double lanes as well.
bool svd_force_512() {
  static const bool wide = [] {
    const char* v = std::getenv("LOWRANK_SVD_AVX512_WIDE");
    return v != nullptr && std::string(v) == "1";
  }();
  return wide;
}

std::tuple<Tensor, Tensor, Tensor> batched_svd_cpu(const Tensor& A, std::optional<int64_t> rank_opt,
                                                   int64_t max_sweeps) {
  TORCH_CHECK_VALUE(A.dim() >= 2, "batched_svd: A must have at least 2 dimensions (..., m, n), got ", A.dim(), "-D");
  TORCH_CHECK_VALUE(A.scalar_type() == at::kFloat || A.scalar_type() == at::kDouble,
                    "batched_svd: A must be float32 or float64, got ", A.scalar_type());
  TORCH_CHECK_VALUE(max_sweeps >= 1, "batched_svd: max_sweeps must be >= 1, got ", max_sweeps);
  const int64_t m = A.size(-2), n = A.size(-1), k = std::min(m, n);
  int64_t rank = k;
  if (rank_opt.has_value()) {
    rank = *rank_opt;
    TORCH_CHECK_VALUE(rank >= 1 && rank <= k, "batched_svd: rank must be in [1, min(m, n)] = [1, ", k, "], got ", rank);
  }
  auto batch_shape = A.sizes().slice(0, A.dim() - 2).vec();
  auto with = [&](std::initializer_list<int64_t> tail) {
    auto s = batch_shape;
    s.insert(s.end(), tail);
    return s;
  };
  Tensor U = at::empty(with({m, rank}), A.options());
  Tensor S = at::empty(with({rank}), A.options());
  Tensor Vh = at::empty(with({rank, n}), A.options());
  const int64_t batch = A.numel() == 0 ? 0 : A.numel() / (m * n);
  if (batch == 0 || rank == 0) return {U, S, Vh};
  if (k > kJacobiMaxSize) return lapack_fallback(A, rank);
  const Tensor Ac = A.contiguous();
  std::atomic<int64_t> failed{std::numeric_limits<int64_t>::max()};
  // float32: float-lane Jacobi up to 8 x 8 (d x d kernel slices, 8 x 8 blocks; twice the matrices
  // per instruction, rotation rounding ~3e-6 there), the Gram route beyond (about a ninth of Jacobi's flops). float64:
  // Jacobi in double lanes (the Gram route cannot reach 1e-12 for ill-conditioned input).
  const bool gram = A.scalar_type() == at::kFloat && std::max(m, n) > kFloatLanesMaxSize;
  const svd::SvdCall call{Ac.const_data_ptr(),
                          U.mutable_data_ptr(),
                          S.mutable_data_ptr(),
                          Vh.mutable_data_ptr(),
                          batch,
                          m,
                          n,
                          rank,
                          max_sweeps,
                          A.scalar_type() == at::kDouble,
                          gram,
                          &failed};
  switch (cpu_capability()) {
#if defined(__x86_64__)
    case CpuCapability::AVX512:
      // Gram route: 4-double lanes (8 are slower there, see batched_svd_avx512_256.cpp).
      if (gram && !svd_force_512()) {
        svd::run_avx512_256(call);
      } else {
        svd::run_avx512(call);
      }
      break;
    case CpuCapability::AVX2:
      svd::run_avx2(call);
      break;
#endif
    default:
      svd::run_default(call);
  }
  TORCH_CHECK(failed.load() == std::numeric_limits<int64_t>::max(),
              "batched_svd: ", gram ? "tridiagonal QR" : "one-sided Jacobi",
              " did not converge within max_sweeps=", max_sweeps, gram ? " steps per eigenvalue" : " sweeps",
              " for matrix ", failed.load(), " of the flattened batch (shape ", A.sizes(), ")");
  return {U, S, Vh};
}

// The level the hand-written SIMD kernels run at: "avx512", "avx2" or "default".
std::string cpu_capability_op() { return cpu_capability_name(cpu_capability()); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(lowrank, m) {
  m.def("batched_svd(Tensor A, int? rank=None, int max_sweeps=40) -> (Tensor U, Tensor S, Tensor Vh)");
  m.def("cpu_capability() -> str", &cpu_capability_op);
}

TORCH_LIBRARY_IMPL(lowrank, CPU, m) { m.impl("batched_svd", &batched_svd_cpu); }

}  // namespace lowrank
