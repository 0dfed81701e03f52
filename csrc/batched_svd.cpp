// Batched thin SVD on CPU, vectorized ACROSS matrices.
//
// A group of L matrices is packed in a structure-of-arrays buffer where lane = matrix, so
// every operation updates L matrices with one vector instruction and tiny sizes (3x3 ...
// 16x16) need no horizontal reductions. Groups are spread over threads with at::parallel_for.
// Two algorithms share the packing and the unpacking (sort, signs, completion):
//
// * One-sided (Hestenes) Jacobi: float64, and float32 with max(m, n) <= 8. Lanes are doubles
//   (4 per AVX2 register) for float64; float32 up to 8 x 8 uses float lanes (8 per register;
//   errors ~3e-6 there -- float rotations would leave ||V^T V - I|| ~ 1e-4 at 64 x 64).
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
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#ifdef __AVX2__
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <numeric>
#include <optional>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

namespace lowrank {
namespace {

using at::Tensor;

// ---- SIMD lanes: one lane per matrix (4 doubles with AVX2, scalar fallback otherwise). ------
// Float lanes only for float32 Jacobi up to 8 x 8: beyond, float Jacobi stalls at a rounding-noise
// floor of about sqrt(l) * 1e-7 in w_p.w_q, too coarse for ||U^T U - I|| <= 1e-5 at 64 x 64.
template <typename T>
struct Lanes {
  using V = T;
  static constexpr int L = 1;
  static V load(const T* p) { return *p; }
  static void store(T* p, V v) { *p = v; }
  static V set1(T x) { return x; }
  static V fmadd(V a, V b, V c) { return a * b + c; }
  static V fnmadd(V a, V b, V c) { return c - a * b; }
  static V sqrt(V a) { return std::sqrt(a); }
  static V abs(V a) { return std::abs(a); }
  static V min(V a, V b) { return std::min(a, b); }
  static V max(V a, V b) { return std::max(a, b); }
  static V copysign(V mag, V sgn) { return std::copysign(mag, sgn); }
  static unsigned gt_mask(V x, V y) { return x > y ? 1u : 0u; }
  static V blend_gt(V x, V y, V a, V b) { return x > y ? b : a; }  // per lane: x > y ? b : a
};

#ifdef __AVX2__
template <>
struct Lanes<float> {
  using V = __m256;
  static constexpr int L = 8;
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V set1(float x) { return _mm256_set1_ps(x); }
#ifdef __FMA__
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V fnmadd(V a, V b, V c) { return _mm256_fnmadd_ps(a, b, c); }
#else
  static V fmadd(V a, V b, V c) { return _mm256_add_ps(_mm256_mul_ps(a, b), c); }
  static V fnmadd(V a, V b, V c) { return _mm256_sub_ps(c, _mm256_mul_ps(a, b)); }
#endif
  static V sqrt(V a) { return _mm256_sqrt_ps(a); }
  static V copysign(V mag, V sgn) {
    const V sign = _mm256_set1_ps(-0.0f);
    return _mm256_or_ps(_mm256_and_ps(sgn, sign), _mm256_andnot_ps(sign, mag));
  }
  static unsigned gt_mask(V x, V y) { return (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(x, y, _CMP_GT_OQ)); }
  static V blend_gt(V x, V y, V a, V b) { return _mm256_blendv_ps(a, b, _mm256_cmp_ps(x, y, _CMP_GT_OQ)); }
};

template <>
struct Lanes<double> {
  using V = __m256d;
  static constexpr int L = 4;
  static V load(const double* p) { return _mm256_loadu_pd(p); }
  static void store(double* p, V v) { _mm256_storeu_pd(p, v); }
  static V set1(double x) { return _mm256_set1_pd(x); }
#ifdef __FMA__
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
  static V fnmadd(V a, V b, V c) { return _mm256_fnmadd_pd(a, b, c); }
#else
  static V fmadd(V a, V b, V c) { return _mm256_add_pd(_mm256_mul_pd(a, b), c); }
  static V fnmadd(V a, V b, V c) { return _mm256_sub_pd(c, _mm256_mul_pd(a, b)); }
#endif
  static V sqrt(V a) { return _mm256_sqrt_pd(a); }
  static V abs(V a) { return _mm256_andnot_pd(_mm256_set1_pd(-0.0), a); }
  static V min(V a, V b) { return _mm256_min_pd(a, b); }
  static V max(V a, V b) { return _mm256_max_pd(a, b); }
  static V copysign(V mag, V sgn) {
    const V sign = _mm256_set1_pd(-0.0);
    return _mm256_or_pd(_mm256_and_pd(sgn, sign), _mm256_andnot_pd(sign, mag));
  }
  static unsigned gt_mask(V x, V y) { return (unsigned)_mm256_movemask_pd(_mm256_cmp_pd(x, y, _CMP_GT_OQ)); }
  static V blend_gt(V x, V y, V a, V b) { return _mm256_blendv_pd(a, b, _mm256_cmp_pd(x, y, _CMP_GT_OQ)); }
};
#endif


// Round-robin ("tournament") ordering: each round is a set of disjoint column pairs, so the
// rotation angles of a round are independent and their divide/sqrt latencies overlap.
std::vector<std::pair<int64_t, int64_t>> round_robin_pairs(int64_t k, std::vector<int64_t>& round_start) {
  const int64_t K = k + (k & 1);  // odd k: one dummy column, its pairs are skipped
  std::vector<int64_t> ring(K);
  std::iota(ring.begin(), ring.end(), 0);
  std::vector<std::pair<int64_t, int64_t>> pairs;
  round_start.clear();
  for (int64_t r = 0; r + 1 < K; ++r) {
    round_start.push_back((int64_t)pairs.size());
    for (int64_t i = 0; i < K / 2; ++i) {
      int64_t p = ring[i], q = ring[K - 1 - i];
      if (p > q) std::swap(p, q);
      if (q < k) pairs.emplace_back(p, q);
    }
    std::rotate(ring.begin() + 1, ring.end() - 1, ring.end());  // keep ring[0], turn the rest
  }
  round_start.push_back((int64_t)pairs.size());
  return pairs;
}

// Jacobi sweeps on one group. W: k columns of l lane-vectors; Vm: k columns of k lane-vectors
// (starts as identity). Rotates (p, q) when (w_p.w_q)^2 > tol^2 |w_p|^2 |w_q|^2. Returns the
// lane mask of lanes that still rotated in the last sweep (0 = converged).
template <typename C>
unsigned jacobi_group(C* W, C* Vm, int64_t l, int64_t k, int64_t max_sweeps, C tol,
                      const std::vector<std::pair<int64_t, int64_t>>& pairs, const std::vector<int64_t>& round_start,
                      std::vector<C>& cs, std::vector<unsigned>& pair_mask) {
  using S = Lanes<C>;
  using Vec = typename S::V;
  constexpr int L = S::L;
  const Vec vtol2 = S::set1(tol * tol), one = S::set1(C(1)), zero = S::set1(C(0)), four = S::set1(C(4));
  unsigned rotating = 0;
  for (int64_t sweep = 0; sweep < max_sweeps; ++sweep) {
    rotating = 0;
    for (size_t r = 0; r + 1 < round_start.size(); ++r) {
      const int64_t first = round_start[r], last = round_start[r + 1];
      unsigned round_mask = 0;
      // Phase 1: dot products of all (independent) pairs of the round.
      for (int64_t pi = first; pi < last; ++pi) {
        const C* wp = W + pairs[pi].first * l * L;
        const C* wq = W + pairs[pi].second * l * L;
        Vec a0 = zero, a1 = zero, b0 = zero, b1 = zero, g0 = zero, g1 = zero;
        int64_t i = 0;
        for (; i + 1 < l; i += 2) {
          const Vec x0 = S::load(wp + i * L), y0 = S::load(wq + i * L);
          const Vec x1 = S::load(wp + (i + 1) * L), y1 = S::load(wq + (i + 1) * L);
          a0 = S::fmadd(x0, x0, a0);
          b0 = S::fmadd(y0, y0, b0);
          g0 = S::fmadd(x0, y0, g0);
          a1 = S::fmadd(x1, x1, a1);
          b1 = S::fmadd(y1, y1, b1);
          g1 = S::fmadd(x1, y1, g1);
        }
        if (i < l) {
          const Vec x0 = S::load(wp + i * L), y0 = S::load(wq + i * L);
          a0 = S::fmadd(x0, x0, a0);
          b0 = S::fmadd(y0, y0, b0);
          g0 = S::fmadd(x0, y0, g0);
        }
        const Vec alpha = a0 + a1, beta = b0 + b1, gamma = g0 + g1;
        const Vec g2 = gamma * gamma, thresh = vtol2 * alpha * beta;
        const unsigned mask = S::gt_mask(g2, thresh);
        round_mask |= mask;
        pair_mask[pi] = mask;
        // Lanes that need no rotation get (d, gamma) = (1, 0), i.e. t = 0: c = 1, s = 0 exactly.
        S::store(cs.data() + (2 * pi) * L, S::blend_gt(g2, thresh, one, beta - alpha));
        S::store(cs.data() + (2 * pi + 1) * L, S::blend_gt(g2, thresh, zero, gamma));
      }
      if (!round_mask) continue;
      // Phase 2: the angles, in a separate loop so that the divide/sqrt latencies of the
      // independent pairs overlap. t = tan(theta) is the smaller root of
      // t^2 + 2 zeta t - 1 = 0 with zeta = d / (2 gamma), d = beta - alpha, written without
      // forming zeta: t = 2 gamma / (d + sign(d) sqrt(d^2 + 4 gamma^2)).
      for (int64_t pi = first; pi < last; ++pi) {
        if (!pair_mask[pi]) continue;
        const Vec d = S::load(cs.data() + (2 * pi) * L), gamma = S::load(cs.data() + (2 * pi + 1) * L);
        const Vec g2x4 = four * gamma * gamma;
        const Vec root = S::sqrt(S::fmadd(d, d, g2x4));
        const Vec t = (gamma + gamma) / (d + S::copysign(root, d));
        const Vec c = one / S::sqrt(S::fmadd(t, t, one));
        S::store(cs.data() + (2 * pi) * L, c);
        S::store(cs.data() + (2 * pi + 1) * L, c * t);
      }
      rotating |= round_mask;
      // Phase 3: apply the rotations (identity where a lane did not need one).
      for (int64_t pi = first; pi < last; ++pi) {
        if (!pair_mask[pi]) continue;
        const Vec c = S::load(cs.data() + (2 * pi) * L), s = S::load(cs.data() + (2 * pi + 1) * L);
        C* wp = W + pairs[pi].first * l * L;
        C* wq = W + pairs[pi].second * l * L;
        for (int64_t i = 0; i < l; ++i) {
          const Vec x = S::load(wp + i * L), y = S::load(wq + i * L);
          S::store(wp + i * L, S::fnmadd(s, y, c * x));
          S::store(wq + i * L, S::fmadd(s, x, c * y));
        }
        C* vp = Vm + pairs[pi].first * k * L;
        C* vq = Vm + pairs[pi].second * k * L;
        for (int64_t i = 0; i < k; ++i) {
          const Vec x = S::load(vp + i * L), y = S::load(vq + i * L);
          S::store(vp + i * L, S::fnmadd(s, y, c * x));
          S::store(vq + i * L, S::fmadd(s, x, c * y));
        }
      }
    }
    if (!rotating) break;
  }
  return rotating;
}

// Orthonormal completion: replace the columns flagged in `deficient` (of the l x k column set
// Q, column-major, unit columns elsewhere) by unit vectors orthogonal to all others.
void complete_columns(std::vector<double>& Q, const std::vector<char>& deficient, int64_t l, int64_t k) {
  std::vector<int64_t> accepted;
  for (int64_t j = 0; j < k; ++j)
    if (!deficient[j]) accepted.push_back(j);
  std::vector<double> v(l), best(l);
  for (int64_t j = 0; j < k; ++j) {
    if (!deficient[j]) continue;
    double best_norm = -1;
    for (int64_t e = 0; e < l; ++e) {
      std::fill(v.begin(), v.end(), 0.0);
      v[e] = 1.0;
      for (int pass = 0; pass < 2; ++pass) {  // Gram-Schmidt twice is enough
        for (int64_t a : accepted) {
          const double* qa = Q.data() + a * l;
          double d = 0;
          for (int64_t i = 0; i < l; ++i) d += qa[i] * v[i];
          for (int64_t i = 0; i < l; ++i) v[i] -= d * qa[i];
        }
      }
      double nrm = 0;
      for (int64_t i = 0; i < l; ++i) nrm += v[i] * v[i];
      if (nrm > best_norm) {
        best_norm = nrm;
        best = v;
      }
      if (nrm > 0.5) break;  // good enough: well away from the accepted span
    }
    const double inv = 1.0 / std::sqrt(best_norm);
    for (int64_t i = 0; i < l; ++i) Q[j * l + i] = best[i] * inv;
    accepted.push_back(j);
  }
}

// ---- Gram route (float32 results): B = W^T W, symmetric eigen-decomposition in double lanes. ----
// float32 results need norm-wise accuracy only (||A - U S Vh|| / ||A|| and orthogonality ~1e-6),
// which the eigen-decomposition of B = W^T W = V diag(sigma^2) V^T in double delivers for a
// fraction of Jacobi's cost: Householder tridiagonalization + implicit QR ~ 10 k^3 flops against
// ~ 90 k^3 for 8-10 one-sided Jacobi sweeps. V is orthogonal to double precision and W V = U S
// holds exactly (so does A = (U S) V^T); the columns of W V are orthogonal up to about
// gamma sigma_max^2 / (sigma_i sigma_j) with gamma ~ (l + k) eps_double, which a Gram-Schmidt
// pass in order of descending sigma removes for the pairs where it matters (ill-conditioned
// input), changing U S by at most ~ sqrt(gamma) sigma_max. Not for float64: there gamma kappa(A)
// would exceed the 1e-12 contract.
using DLanes = Lanes<double>;
using DVec = DLanes::V;
constexpr int kDL = DLanes::L;

// Element (r, c) of a k x k row-major matrix of lane vectors.
inline double* elem(double* M, int64_t k, int64_t r, int64_t c) { return M + (r * k + c) * kDL; }

inline int64_t lane_min(DVec v) {
  alignas(32) double x[kDL];
  DLanes::store(x, v);
  return (int64_t)*std::min_element(x, x + kDL);
}

// Householder reduction Q^T B Q = tridiag(d, e) of the symmetric B (k x k, row-major, lower
// triangle used and overwritten); Q (row-major) is formed explicitly. Row j of H keeps the j-th
// Householder vector (entries j+1..k-1, contiguous for the inner loops; H zero-initialized).
// tau: 2 k, p: k lane vectors of scratch.
void tridiagonalize(double* B, double* H, double* Q, double* d, double* e, double* tau, double* p,
                    int64_t k) {
  using S = DLanes;
  const DVec zero = S::set1(0.0), one = S::set1(1.0), half = S::set1(0.5);
  for (int64_t j = 0; j + 2 < k; ++j) {
    const int64_t j1 = j + 1;
    double* v = elem(H, k, j, 0);
    const DVec alpha = S::load(elem(B, k, j1, j));  // only the lower triangle is kept
    DVec xn2 = zero;
    for (int64_t i = j1 + 1; i < k; ++i) {
      const DVec x = S::load(elem(B, k, i, j));
      xn2 = S::fmadd(x, x, xn2);
    }
    const DVec beta = S::copysign(S::sqrt(S::fmadd(alpha, alpha, xn2)), zero - alpha);
    // Nothing below the subdiagonal (xn2 = 0, e.g. a zero lane): H = I.
    const DVec t = S::blend_gt(xn2, zero, zero, (beta - alpha) / beta);
    const DVec scal = S::blend_gt(xn2, zero, zero, one / (alpha - beta));
    S::store(tau + j * kDL, t);
    S::store(d + j * kDL, S::load(elem(B, k, j, j)));
    S::store(e + j * kDL, S::blend_gt(xn2, zero, alpha, beta));
    S::store(v + j1 * kDL, one);  // v = (1, x_2 / (alpha - beta), ...)
    for (int64_t i = j1 + 1; i < k; ++i) S::store(v + i * kDL, S::load(elem(B, k, i, j)) * scal);
    // Two-sided update of the trailing block B' (rows/columns j1..k-1, lower triangle only):
    // p = tau B' v, w = p - (tau/2)(p.v) v, B' -= v w^T + w v^T.
    for (int64_t r = j1; r < k; ++r) S::store(p + r * kDL, zero);
    for (int64_t r = j1; r < k; ++r) {  // symmetric product from the lower triangle
      const double* br = elem(B, k, r, 0);
      const DVec vr = S::load(v + r * kDL);
      DVec a0 = zero, a1 = zero;
      int64_t c = j1;
      for (; c + 2 <= r; c += 2) {
        const DVec b0 = S::load(br + c * kDL), b1 = S::load(br + (c + 1) * kDL);
        a0 = S::fmadd(b0, S::load(v + c * kDL), a0);
        a1 = S::fmadd(b1, S::load(v + (c + 1) * kDL), a1);
        S::store(p + c * kDL, S::fmadd(b0, vr, S::load(p + c * kDL)));
        S::store(p + (c + 1) * kDL, S::fmadd(b1, vr, S::load(p + (c + 1) * kDL)));
      }
      for (; c < r; ++c) {
        const DVec b0 = S::load(br + c * kDL);
        a0 = S::fmadd(b0, S::load(v + c * kDL), a0);
        S::store(p + c * kDL, S::fmadd(b0, vr, S::load(p + c * kDL)));
      }
      S::store(p + r * kDL, S::fmadd(S::load(br + r * kDL), vr, S::load(p + r * kDL) + a0 + a1));
    }
    DVec pv = zero;
    for (int64_t r = j1; r < k; ++r) {
      const DVec pr = t * S::load(p + r * kDL);
      S::store(p + r * kDL, pr);
      pv = S::fmadd(pr, S::load(v + r * kDL), pv);
    }
    const DVec K = half * t * pv;
    for (int64_t r = j1; r < k; ++r) S::store(p + r * kDL, S::fnmadd(K, S::load(v + r * kDL), S::load(p + r * kDL)));
    for (int64_t r = j1; r < k; ++r) {
      const DVec vr = S::load(v + r * kDL), wr = S::load(p + r * kDL);
      double* br = elem(B, k, r, 0);
      for (int64_t c = j1; c <= r; ++c) {
        const DVec x = S::fnmadd(vr, S::load(p + c * kDL), S::load(br + c * kDL));
        S::store(br + c * kDL, S::fnmadd(wr, S::load(v + c * kDL), x));
      }
    }
  }
  if (k >= 2) {
    S::store(d + (k - 2) * kDL, S::load(elem(B, k, k - 2, k - 2)));
    S::store(e + (k - 2) * kDL, S::load(elem(B, k, k - 1, k - 2)));
  }
  S::store(d + (k - 1) * kDL, S::load(elem(B, k, k - 1, k - 1)));
  // Q = H_0 H_1 ... H_{k-3}, accumulated backwards on the trailing blocks (Q = I elsewhere), two
  // reflectors per pass over Q: H_b H_a Q = Q - v_a p_a^T - v_b p_b^T with p_a = tau_a Q^T v_a,
  // p_b = tau_b (Q^T v_b - (v_a.v_b) p_a). v_a is zero at row b + 1 (H rows are zero-initialized).
  for (int64_t r = 0; r < k; ++r)
    for (int64_t c = 0; c < k; ++c) S::store(elem(Q, k, r, c), r == c ? one : zero);
  double* pa = p;
  double* pb = tau + k * kDL;  // second half of the scratch (tau holds 2 k vectors)
  for (int64_t a = k - 3; a >= 0; a -= 2) {
    const int64_t b = a - 1, j0 = a;  // rows/columns touched: j0..k-1 (b + 1 = a)
    const double* va = elem(H, k, a, 0);
    const double* vb = b >= 0 ? elem(H, k, b, 0) : va;  // no b: p_b = 0 below
    const DVec ta = S::load(tau + a * kDL), tb = b >= 0 ? S::load(tau + b * kDL) : zero;
    DVec vab = zero;
    for (int64_t r = j0; r < k; ++r) vab = S::fmadd(S::load(va + r * kDL), S::load(vb + r * kDL), vab);
    int64_t c = j0;
    for (; c < k; c += 2) {  // u_a = Q^T v_a, u_b = Q^T v_b, two columns at a time
      const bool two = c + 1 < k;
      DVec a0 = zero, a1 = zero, b0 = zero, b1 = zero;
      for (int64_t r = j0; r < k; ++r) {
        const double* q = elem(Q, k, r, c);
        const DVec x = S::load(va + r * kDL), y = S::load(vb + r * kDL);
        const DVec q0 = S::load(q), q1 = two ? S::load(q + kDL) : zero;
        a0 = S::fmadd(x, q0, a0);
        a1 = S::fmadd(x, q1, a1);
        b0 = S::fmadd(y, q0, b0);
        b1 = S::fmadd(y, q1, b1);
      }
      const DVec p0 = ta * a0, p1 = ta * a1;
      S::store(pa + c * kDL, p0);
      S::store(pb + c * kDL, tb * S::fnmadd(vab, p0, b0));
      if (two) {
        S::store(pa + (c + 1) * kDL, p1);
        S::store(pb + (c + 1) * kDL, tb * S::fnmadd(vab, p1, b1));
      }
    }
    for (int64_t r = j0; r < k; ++r) {
      const DVec x = S::load(va + r * kDL), y = S::load(vb + r * kDL);
      double* qr = elem(Q, k, r, 0);
      for (c = j0; c < k; ++c) {
        const DVec q = S::fnmadd(x, S::load(pa + c * kDL), S::load(qr + c * kDL));
        S::store(qr + c * kDL, S::fnmadd(y, S::load(pb + c * kDL), q));
      }
    }
  }
}

// Q <- Q G_lo ... G_{hi-1} with Q kept as Qs diag(D) (column scales D): rotation i, i.e.
// (c, s) mixing columns i and i+1, is c ([q_i, q_{i+1}] + t [q_{i+1}, -q_i]) with t = s / c, so
// with the c's moved into D it costs two FMAs per row (ab: alpha_i = t D_{i+1} / D_i,
// beta_i = t D_i / D_{i+1}, see tridiagonal_qr). Each row is one pass with the running column in
// a register (one load and one store per rotation); four rows at a time to overlap the chains.
void apply_rotations(double* Q, const double* ab, int64_t k, int64_t lo, int64_t hi) {
  using S = DLanes;
  int64_t r = 0;
  for (; r + 4 <= k; r += 4) {
    double* q0 = elem(Q, k, r, 0);
    double* q1 = q0 + k * kDL;
    double* q2 = q1 + k * kDL;
    double* q3 = q2 + k * kDL;
    DVec x0 = S::load(q0 + lo * kDL), x1 = S::load(q1 + lo * kDL), x2 = S::load(q2 + lo * kDL),
         x3 = S::load(q3 + lo * kDL);
    for (int64_t i = lo; i < hi; ++i) {
      const DVec al = S::load(ab + 2 * i * kDL), be = S::load(ab + (2 * i + 1) * kDL);
      const int64_t o = (i + 1) * kDL;
      const DVec y0 = S::load(q0 + o), y1 = S::load(q1 + o), y2 = S::load(q2 + o), y3 = S::load(q3 + o);
      S::store(q0 + o - kDL, S::fmadd(al, y0, x0));
      S::store(q1 + o - kDL, S::fmadd(al, y1, x1));
      S::store(q2 + o - kDL, S::fmadd(al, y2, x2));
      S::store(q3 + o - kDL, S::fmadd(al, y3, x3));
      x0 = S::fnmadd(be, x0, y0);
      x1 = S::fnmadd(be, x1, y1);
      x2 = S::fnmadd(be, x2, y2);
      x3 = S::fnmadd(be, x3, y3);
    }
    S::store(q0 + hi * kDL, x0);
    S::store(q1 + hi * kDL, x1);
    S::store(q2 + hi * kDL, x2);
    S::store(q3 + hi * kDL, x3);
  }
  for (; r < k; ++r) {
    double* q = elem(Q, k, r, 0);
    DVec x = S::load(q + lo * kDL);
    for (int64_t i = lo; i < hi; ++i) {
      const DVec al = S::load(ab + 2 * i * kDL), be = S::load(ab + (2 * i + 1) * kDL);
      const DVec y = S::load(q + (i + 1) * kDL);
      S::store(q + i * kDL, S::fmadd(al, y, x));
      x = S::fnmadd(be, x, y);
    }
    S::store(q + hi * kDL, x);
  }
}

// One group's state in tridiagonal_qr (the chase registers are the caller's locals).
struct QrGroup {
  double *d, *e, *Q, *D, *ab;
  int64_t k, max_steps;
  DVec tol, lo, mu;
  int64_t hi, steps = 0, lo_min = 0;
  unsigned failing = 0;
  bool done = false;

  QrGroup(double* d_, double* e_, double* Q_, double* D_, double* ab_, int64_t k_, int64_t max_steps_)
      : d(d_), e(e_), Q(Q_), D(D_), ab(ab_), k(k_), max_steps(max_steps_), hi(k_ - 1) {
    using S = DLanes;
    DVec trace = S::set1(0.0);
    for (int64_t i = 0; i < k; ++i) trace = trace + S::abs(S::load(d + i * kDL));
    tol = S::set1(std::numeric_limits<double>::epsilon()) * trace;
    for (int64_t i = 0; i < k; ++i) S::store(D + i * kDL, S::set1(1.0));
  }

  // Deflation and the shift of the next step; false once converged (or failed).
  bool begin_step() {
    using S = DLanes;
    const DVec zero = S::set1(0.0), one = S::set1(1.0), half = S::set1(0.5);
    if (done) return false;
    for (int64_t i = 0; i < hi; ++i) {
      const DVec ei = S::load(e + i * kDL);
      S::store(e + i * kDL, S::blend_gt(S::abs(ei), tol, zero, ei));
    }
    while (hi > 0 && !S::gt_mask(S::abs(S::load(e + (hi - 1) * kDL)), zero)) {
      --hi;
      steps = 0;
    }
    if (hi > 0 && ++steps > max_steps) failing = S::gt_mask(S::abs(S::load(e + (hi - 1) * kDL)), zero);
    if (hi == 0 || failing) {
      done = true;
      return false;
    }
    // lo: first row of each lane's unreduced block ending at hi (hi itself if it split there).
    lo = zero;
    for (int64_t i = 1; i <= hi; ++i)
      lo = S::blend_gt(S::abs(S::load(e + (i - 1) * kDL)), zero, S::set1(double(i)), lo);
    lo_min = lane_min(lo);
    // Wilkinson shift: the eigenvalue of the trailing 2 x 2 block closer to d_hi.
    const DVec a = S::load(d + (hi - 1) * kDL), b = S::load(d + hi * kDL), f = S::load(e + (hi - 1) * kDL);
    const DVec delta = (a - b) * half;
    DVec den = delta + S::copysign(S::sqrt(S::fmadd(delta, delta, f * f)), delta);
    den = S::blend_gt(S::abs(den), zero, one, den);  // f = 0 and delta = 0: mu = b
    mu = b - f * f / den;
    return true;
  }

  // Chase step i (lo_min <= i < hi). The chase is one dependent chain: the updated d_i, e_{i-1},
  // e_i and the bulge stay in registers (di, eprev, ei, bulge; di, ei start as d_lo_min, e_lo_min).
  void chase(int64_t i, DVec& bulge, DVec& eprev, DVec& di, DVec& ei) {
    using S = DLanes;
    const DVec zero = S::set1(0.0), one = S::set1(1.0), two = S::set1(2.0);
    const DVec iv = S::set1(double(i));
    const DVec dn = S::load(d + (i + 1) * kDL);
    // Lanes starting here take the first column of T - mu I, lanes already chasing (i > lo)
    // annihilate their bulge.
    DVec x = di - mu, z = ei;
    if (i > lo_min) {
      x = S::blend_gt(iv, lo, x, eprev);
      z = S::blend_gt(iv, lo, z, bulge);
    }
    const DVec r = S::sqrt(S::fmadd(x, x, z * z));
    const DVec inv = one / S::blend_gt(r, zero, one, r);
    DVec c = S::blend_gt(r, zero, one, x * inv), s = S::blend_gt(r, zero, zero, z * inv);
    c = S::blend_gt(lo, iv, c, one);  // above the lane's block: identity
    s = S::blend_gt(lo, iv, s, zero);
    if (i > lo_min) S::store(e + (i - 1) * kDL, S::blend_gt(iv, lo, eprev, r));
    const DVec cc = c * c, ss = s * s, cs2f = two * c * s * ei;
    S::store(d + i * kDL, S::fmadd(cc, di, S::fmadd(ss, dn, cs2f)));
    eprev = S::fmadd(c * s, dn - di, (cc - ss) * ei);
    di = S::fmadd(ss, di, S::fmadd(cc, dn, zero - cs2f));
    if (i + 1 < hi) {
      const DVec en = S::load(e + (i + 1) * kDL);
      bulge = s * en;
      ei = c * en;
    }
    // Scaled rotation for Q (apply_rotations); |c| is kept >= 1e-30 (a change of the rotation
    // far below rounding) so that t = s / c stays finite.
    const DVec cq = S::blend_gt(S::abs(c), S::set1(1e-30), S::set1(1e-30), c);
    const DVec Di = S::load(D + i * kDL), Dn = S::load(D + (i + 1) * kDL);
    const DVec q = s / (cq * Di * Dn);
    S::store(ab + 2 * i * kDL, q * Dn * Dn);
    S::store(ab + (2 * i + 1) * kDL, q * Di * Di);
    S::store(D + i * kDL, cq * Di);
    S::store(D + (i + 1) * kDL, cq * Dn);
  }

  void end_step(DVec di, DVec eprev) {
    using S = DLanes;
    S::store(d + hi * kDL, di);
    S::store(e + (hi - 1) * kDL, eprev);
    apply_rotations(Q, ab, k, lo_min, hi);
    // The scales only shrink (|c| <= 1): fold them into Q's columns long before they underflow.
    for (int64_t i = lo_min; i <= hi; ++i) {
      const DVec Di = S::load(D + i * kDL);
      if (!S::gt_mask(S::set1(1e-100), S::abs(Di))) continue;
      const DVec f = S::blend_gt(S::set1(1e-100), S::abs(Di), S::set1(1.0), Di);
      for (int64_t r = 0; r < k; ++r) S::store(elem(Q, k, r, i), S::load(elem(Q, k, r, i)) * f);
      S::store(D + i * kDL, Di / f);
    }
  }
};

// Implicit symmetric QR steps with Wilkinson shifts (Golub & Van Loan) on tridiag(d, e) of one or
// two groups, rotations accumulated into the columns of Q diag(D). All lanes of a group step
// together: each lane chases its own bulge from the top of its unreduced block ending at row hi
// (identity rotations above it); hi moves up once every lane has split there. Off-diagonal
// entries below eps * trace(T) count as zero: norm-wise, like the rounding of B itself. The
// chases of two groups are interleaved (independent dependency chains). Sets each group's
// `failing`: the lanes that had not split at some hi after max_steps steps (0 = converged).
void tridiagonal_qr(QrGroup* g, int count) {
  const DVec zero = DLanes::set1(0.0);
  while (true) {
    const bool act0 = g[0].begin_step(), act1 = count > 1 && g[1].begin_step();
    if (!act0 && !act1) break;
    const int64_t len0 = act0 ? g[0].hi - g[0].lo_min : 0, len1 = act1 ? g[1].hi - g[1].lo_min : 0;
    DVec bulge0 = zero, eprev0 = zero, di0 = zero, ei0 = zero, bulge1 = zero, eprev1 = zero, di1 = zero, ei1 = zero;
    if (act0) {
      di0 = DLanes::load(g[0].d + g[0].lo_min * kDL);
      ei0 = DLanes::load(g[0].e + g[0].lo_min * kDL);
    }
    if (act1) {
      di1 = DLanes::load(g[1].d + g[1].lo_min * kDL);
      ei1 = DLanes::load(g[1].e + g[1].lo_min * kDL);
    }
    for (int64_t t = 0; t < std::max(len0, len1); ++t) {
      if (t < len0) g[0].chase(g[0].lo_min + t, bulge0, eprev0, di0, ei0);
      if (t < len1) g[1].chase(g[1].lo_min + t, bulge1, eprev1, di1, ei1);
    }
    if (act0) g[0].end_step(di0, eprev0);
    if (act1) g[1].end_step(di1, eprev1);
  }
}

// Wn (l x k, column-major) = W (l x k) * Vm (k x k, column-major): R rows x CC columns per tile.
template <int R, int CC>
inline void gemm_tile(const double* W, const double* Vm, double* Wn, int64_t l, int64_t k, int64_t i, int64_t c) {
  using S = DLanes;
  DVec acc[R][CC];
  for (int a = 0; a < R; ++a)
    for (int b = 0; b < CC; ++b) acc[a][b] = S::set1(0.0);
  for (int64_t j = 0; j < k; ++j) {
    DVec w[R], v[CC];
    for (int a = 0; a < R; ++a) w[a] = S::load(W + (j * l + i + a) * kDL);
    for (int b = 0; b < CC; ++b) v[b] = S::load(Vm + ((c + b) * k + j) * kDL);
    for (int a = 0; a < R; ++a)
      for (int b = 0; b < CC; ++b) acc[a][b] = S::fmadd(w[a], v[b], acc[a][b]);
  }
  for (int a = 0; a < R; ++a)
    for (int b = 0; b < CC; ++b) S::store(Wn + ((c + b) * l + i + a) * kDL, acc[a][b]);
}

void gemm_wv(const double* W, const double* Vm, double* Wn, int64_t l, int64_t k) {
  for (int64_t c = 0; c < k; c += 2) {
    const bool pair = c + 1 < k;
    int64_t i = 0;
    for (; i + 4 <= l; i += 4) {
      if (pair) gemm_tile<4, 2>(W, Vm, Wn, l, k, i, c);
      else gemm_tile<4, 1>(W, Vm, Wn, l, k, i, c);
    }
    for (; i < l; ++i) {
      if (pair) gemm_tile<1, 2>(W, Vm, Wn, l, k, i, c);
      else gemm_tile<1, 1>(W, Vm, Wn, l, k, i, c);
    }
  }
}

// Scratch of the Gram route for one group, allocated once per thread.
struct GramWork {
  std::vector<double> Wn, B, H, Q, D, d, e, tau, p, ab, lam, inv_n2;
  std::vector<int64_t> order;
  GramWork(int64_t l, int64_t k)
      : Wn(l * k * kDL), B(k * k * kDL), H(k * k * kDL), Q(k * k * kDL), D(k * kDL), d(k * kDL), e(k * kDL),
        tau(2 * k * kDL), p(k * kDL), ab(2 * k * kDL), lam(k * kDL), inv_n2(k * kDL), order(k) {}
};

// The Gram route, first half, on one group of packed matrices W (l x k, column-major, lane =
// matrix): B = W^T W and its tridiagonal form (ws.d, ws.e, ws.Q).
void gram_tridiagonal(const std::vector<double>& W, int64_t l, int64_t k, GramWork& ws) {
  using S = DLanes;
  const DVec zero = S::set1(0.0);
  // B = W^T W, lower triangle (products of float inputs are exact in double); 2 x 2 tiles.
  auto gram_tile = [&](int64_t a, int64_t b, bool two_a, bool two_b) {
    const double* wa = W.data() + a * l * kDL;
    const double* wb = W.data() + b * l * kDL;
    const int64_t ao = two_a ? l * kDL : 0, bo = two_b ? l * kDL : 0;
    DVec s00 = zero, s01 = zero, s10 = zero, s11 = zero;
    for (int64_t i = 0; i < l; ++i) {
      const DVec x0 = S::load(wa + i * kDL), x1 = S::load(wa + ao + i * kDL);
      const DVec y0 = S::load(wb + i * kDL), y1 = S::load(wb + bo + i * kDL);
      s00 = S::fmadd(x0, y0, s00);
      s01 = S::fmadd(x0, y1, s01);
      s10 = S::fmadd(x1, y0, s10);
      s11 = S::fmadd(x1, y1, s11);
    }
    S::store(elem(ws.B.data(), k, a, b), s00);
    if (two_b && b + 1 <= a) S::store(elem(ws.B.data(), k, a, b + 1), s01);
    if (two_a) S::store(elem(ws.B.data(), k, a + 1, b), s10);
    if (two_a && two_b) S::store(elem(ws.B.data(), k, a + 1, b + 1), s11);
  };
  for (int64_t a = 0; a < k; a += 2)
    for (int64_t b = 0; b <= a; b += 2) gram_tile(a, b, a + 1 < k, b + 1 < k);
  tridiagonalize(ws.B.data(), ws.H.data(), ws.Q.data(), ws.d.data(), ws.e.data(), ws.tau.data(), ws.p.data(),
                 k);
}

// The Gram route, second half (after tridiagonal_qr): outputs as the Jacobi route leaves them,
// W <- U diag(sigma) (columns in descending sigma order), Vm <- V (k x k, column-major),
// sigma_lanes <- sigma.
void gram_vectors(std::vector<double>& W, double* Vm, double* sigma_lanes, int64_t l, int64_t k, GramWork& ws) {
  using S = DLanes;
  const DVec zero = S::set1(0.0), one = S::set1(1.0), quarter = S::set1(0.25);
  // Per lane: eigenvalues descending; V's columns in that order (column-major for the unpack).
  for (int lane = 0; lane < kDL; ++lane) {
    auto lam = [&](int64_t j) { return ws.d[j * kDL + lane]; };
    std::iota(ws.order.begin(), ws.order.end(), 0);
    std::stable_sort(ws.order.begin(), ws.order.end(), [&](int64_t a, int64_t b) { return lam(a) > lam(b); });
    for (int64_t c = 0; c < k; ++c) {
      const int64_t src = ws.order[c];
      ws.lam[c * kDL + lane] = std::max(lam(src), 0.0);
      const double scale = ws.D[src * kDL + lane];
      for (int64_t r = 0; r < k; ++r) Vm[(c * k + r) * kDL + lane] = ws.Q[(r * k + src) * kDL + lane] * scale;
    }
  }
  gemm_wv(W.data(), Vm, ws.Wn.data(), l, k);
  // Gram-Schmidt where needed: column j against the earlier columns i with
  // lambda_i lambda_j < (rho lambda_0)^2 in some lane, i.e. cos(w_i, w_j) ~ gamma lambda_0 /
  // sqrt(lambda_i lambda_j) could exceed ~1e-9 (the other pairs are orthogonal enough already);
  // a second, full pass when the first one removed more than half of the column.
  const DVec rho = S::set1(1e-6 * double(l + k));
  const DVec thr = rho * rho * S::load(ws.lam.data()) * S::load(ws.lam.data());
  double* Wn = ws.Wn.data();
  auto norm2 = [&](const double* w) {
    DVec s0 = zero, s1 = zero;
    int64_t i = 0;
    for (; i + 1 < l; i += 2) {
      const DVec x0 = S::load(w + i * kDL), x1 = S::load(w + (i + 1) * kDL);
      s0 = S::fmadd(x0, x0, s0);
      s1 = S::fmadd(x1, x1, s1);
    }
    if (i < l) s0 = S::fmadd(S::load(w + i * kDL), S::load(w + i * kDL), s0);
    return s0 + s1;
  };
  auto project_out = [&](double* wj, int64_t from, int64_t to) {
    for (int64_t i = from; i < to; ++i) {
      const double* wi = Wn + i * l * kDL;
      DVec h0 = zero, h1 = zero;
      int64_t r = 0;
      for (; r + 1 < l; r += 2) {
        h0 = S::fmadd(S::load(wi + r * kDL), S::load(wj + r * kDL), h0);
        h1 = S::fmadd(S::load(wi + (r + 1) * kDL), S::load(wj + (r + 1) * kDL), h1);
      }
      if (r < l) h0 = S::fmadd(S::load(wi + r * kDL), S::load(wj + r * kDL), h0);
      const DVec h = (h0 + h1) * S::load(ws.inv_n2.data() + i * kDL);
      for (r = 0; r < l; ++r) S::store(wj + r * kDL, S::fnmadd(h, S::load(wi + r * kDL), S::load(wj + r * kDL)));
    }
  };
  for (int64_t j = 0; j < k; ++j) {
    double* wj = Wn + j * l * kDL;
    const DVec lj = S::load(ws.lam.data() + j * kDL);
    DVec keep = zero;  // per lane: how many leading columns need no projection
    for (int64_t i = 0; i < j; ++i)
      keep = keep + S::blend_gt(thr, S::load(ws.lam.data() + i * kDL) * lj, one, zero);
    const int64_t from = lane_min(keep);
    DVec n2 = norm2(wj);
    if (from < j) {
      project_out(wj, from, j);
      const DVec n2_after = norm2(wj);
      if (S::gt_mask(quarter * n2, n2_after)) {
        project_out(wj, 0, j);
        n2 = norm2(wj);
      } else {
        n2 = n2_after;
      }
    }
    S::store(ws.inv_n2.data() + j * kDL, S::blend_gt(n2, zero, zero, one / S::blend_gt(n2, zero, one, n2)));
    S::store(sigma_lanes + j * kDL, S::sqrt(n2));
  }
  std::swap(W, ws.Wn);
}

// Largest |entry| of a[0..count) and whether all entries are finite, from the bit patterns: for
// non-negative floats the integer order is the value order (NaN and inf above the largest
// finite value), and an integer max reduction vectorizes.
template <typename T>
std::pair<T, bool> abs_max(const T* a, int64_t count) {
  using I = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  constexpr I magnitude = ~(I(1) << (8 * sizeof(T) - 1));
  I top = 0;
  for (int64_t i = 0; i < count; ++i) {
    I bits;
    std::memcpy(&bits, a + i, sizeof(T));
    top = std::max<I>(top, bits & magnitude);
  }
  T amax, largest = std::numeric_limits<T>::max();
  I largest_bits;
  std::memcpy(&amax, &top, sizeof(T));
  std::memcpy(&largest_bits, &largest, sizeof(T));
  return {amax, top <= largest_bits};
}

// T: element type of A and the results; C: compute type of the Jacobi sweeps (lanes).
// gram: the Gram route (double lanes only) instead of Jacobi; max_sweeps then bounds the QR steps
// per eigenvalue.
template <typename T, typename C>
void batched_svd_kernel(const T* A, T* U, T* S, T* Vh, int64_t batch, int64_t m, int64_t n, int64_t rank,
                        int64_t max_sweeps, bool gram, std::atomic<int64_t>& failed) {
  using Simd = Lanes<C>;
  using Vec = typename Simd::V;
  constexpr int L = Simd::L;
  const bool wide = m < n;
  const int64_t l = std::max(m, n), k = std::min(m, n);
  const int64_t groups = (batch + L - 1) / L;
  const T nan = std::numeric_limits<T>::quiet_NaN();
  const double eps = std::numeric_limits<T>::epsilon();
  // Float results computed in double lanes converge well below float rounding (one extra
  // sweep at most: the convergence is quadratic) so that U and V are orthogonal to float
  // precision after the final rounding. Float lanes stop at their own rounding floor.
  const bool float_in_double = std::is_same_v<T, float> && std::is_same_v<C, double>;
  const C tol = C(std::sqrt(double(l)) * (float_in_double ? eps / 64 : eps));
  // sigma_j <= tiny * sigma_max: a numerically zero column, replaced by a completion vector.
  // In float lanes, columns at the float rounding floor have no reliable direction.
  const double tiny = std::is_same_v<C, float> ? 4 * std::sqrt(double(l)) * eps : eps * eps;
  std::vector<int64_t> round_start;
  const auto pairs = round_robin_pairs(k, round_start);
  // Work is handed out in chunks of ~16 K doubles of matrix data through a shared counter (small
  // problems still split over threads), so that a thread the OS preempts on a busy machine does
  // not hold up a static half of the batch.
  const int per_round = gram ? 2 : 1;
  const int64_t chunk = std::max<int64_t>(per_round, 16384 / std::max<int64_t>(1, l * k * L));
  const int64_t tasks = std::min<int64_t>(at::get_num_threads(), (groups + chunk - 1) / chunk);
  std::atomic<int64_t> next_chunk{0};

  at::parallel_for(0, tasks, 1, [&](int64_t, int64_t) {
    // Per-group buffers. The Gram route takes two groups at a time: their QR chases (latency-bound
    // dependency chains) interleave.
    struct Slot {
      std::vector<C> W, Vm, sigma_lanes;
      std::vector<double> scale;
      std::vector<char> finite;
      unsigned rotating;
    };
    std::vector<Slot> slots(per_round, Slot{std::vector<C>(l * k * L), std::vector<C>(k * k * L),
                                            std::vector<C>(k * L), std::vector<double>(L), std::vector<char>(L), 0});
    std::vector<C> cs(2 * pairs.size() * L + 2 * L);
    std::vector<unsigned> pair_mask(pairs.size());
    std::vector<double> Q(l * k), sigma(k), inv_sigma(k);
    std::vector<char> deficient(k);
    std::vector<int64_t> order(k);
    std::vector<GramWork> gram_work;
    for (int sl = 0; gram && sl < per_round; ++sl) gram_work.emplace_back(l, k);
    for (int64_t g0; (g0 = next_chunk.fetch_add(chunk)) < groups;) {
      const int64_t g1 = std::min(groups, g0 + chunk);
      for (int64_t g_first = g0; g_first < g1; g_first += per_round) {
        const int count = (int)std::min<int64_t>(per_round, g1 - g_first);
        for (int sl = 0; sl < count; ++sl) {
          const int64_t g = g_first + sl;
          auto& [W, Vm, sigma_lanes, scale, finite, rotating] = slots[sl];
          // Pack: lane = matrix. Padding lanes and non-finite matrices are zero (converge at once).
          const T* src[L];
          for (int lane = 0; lane < L; ++lane) {
            const int64_t b = g * L + lane;
            const auto [amax, ok] = b < batch ? abs_max(A + b * m * n, m * n) : std::pair<T, bool>{T(0), true};
            finite[lane] = ok;
            src[lane] = b < batch && ok ? A + b * m * n : nullptr;
            int e = 0;
            if (ok && amax > 0) std::frexp(double(amax), &e);
            scale[lane] = std::ldexp(1.0, -e);  // power of two: exact
          }
          for (int64_t j = 0; j < k; ++j)
            for (int64_t i = 0; i < l; ++i) {
              const int64_t at = wide ? j * n + i : i * n + j;
              for (int lane = 0; lane < L; ++lane)
                W[(j * l + i) * L + lane] = src[lane] ? C(double(src[lane][at]) * scale[lane]) : C(0);
            }
        }
        if constexpr (std::is_same_v<C, double>) {
          if (gram) {
            std::vector<QrGroup> qr;
            for (int sl = 0; sl < count; ++sl) {
              GramWork& ws = gram_work[sl];
              gram_tridiagonal(slots[sl].W, l, k, ws);
              qr.emplace_back(ws.d.data(), ws.e.data(), ws.Q.data(), ws.D.data(), ws.ab.data(), k, max_sweeps);
            }
            tridiagonal_qr(qr.data(), count);
            for (int sl = 0; sl < count; ++sl) {
              slots[sl].rotating = qr[sl].failing;
              gram_vectors(slots[sl].W, slots[sl].Vm.data(), slots[sl].sigma_lanes.data(), l, k, gram_work[sl]);
            }
          }
        }
        if (!gram) {
          auto& [W, Vm, sigma_lanes, scale, finite, rotating] = slots[0];
          for (int64_t j = 0; j < k; ++j)
            for (int64_t i = 0; i < k; ++i) Simd::store(Vm.data() + (j * k + i) * L, Simd::set1(i == j ? C(1) : C(0)));
          rotating = jacobi_group<C>(W.data(), Vm.data(), l, k, max_sweeps, tol, pairs, round_start, cs, pair_mask);
          // Column norms of all lanes at once.
          for (int64_t j = 0; j < k; ++j) {
            Vec acc = Simd::set1(C(0));
            const C* wj = W.data() + j * l * L;
            for (int64_t i = 0; i < l; ++i) {
              const Vec w = Simd::load(wj + i * L);
              acc = Simd::fmadd(w, w, acc);
            }
            Simd::store(sigma_lanes.data() + j * L, Simd::sqrt(acc));
          }
        }
        for (int sl = 0; sl < count; ++sl) {
          const int64_t g = g_first + sl;
          auto& [W, Vm, sigma_lanes, scale, finite, rotating] = slots[sl];
          // Unpack lane by lane: sort, completion, signs.
          for (int lane = 0; lane < L; ++lane) {
            const int64_t b = g * L + lane;
            if (b >= batch) break;
            T* Ub = U + b * m * rank;
            T* Sb = S + b * rank;
            T* Vhb = Vh + b * rank * n;
            if (!finite[lane]) {
              std::fill(Ub, Ub + m * rank, nan);
              std::fill(Sb, Sb + rank, nan);
              std::fill(Vhb, Vhb + rank * n, nan);
              continue;
            }
            if (rotating & (1u << lane)) {
              int64_t expected = std::numeric_limits<int64_t>::max();
              while (b < expected && !failed.compare_exchange_weak(expected, b)) {
              }
            }
            double smax = 0;
            for (int64_t j = 0; j < k; ++j) {
              sigma[j] = sigma_lanes[j * L + lane];
              smax = std::max(smax, sigma[j]);
            }
            bool any_deficient = false;
            for (int64_t j = 0; j < k; ++j) {
              deficient[j] = !(sigma[j] > smax * tiny) || sigma[j] == 0;
              any_deficient |= bool(deficient[j]);
              inv_sigma[j] = deficient[j] ? 0.0 : 1.0 / sigma[j];
            }
            // Normalized long-side vectors: read from W directly, or from Q after completion (rare).
            if (any_deficient) {
              for (int64_t j = 0; j < k; ++j)
                for (int64_t i = 0; i < l; ++i) Q[j * l + i] = double(W[(j * l + i) * L + lane]) * inv_sigma[j];
              complete_columns(Q, deficient, l, k);
            }
            auto long_side = [&](int64_t j, int64_t i) {
              return any_deficient ? Q[j * l + i] : double(W[(j * l + i) * L + lane]) * inv_sigma[j];
            };
            auto short_side = [&](int64_t j, int64_t i) { return double(Vm[(j * k + i) * L + lane]); };
            // Insertion sort, descending (k is small; stable).
            for (int64_t j = 0; j < k; ++j) {
              int64_t i = j;
              while (i > 0 && sigma[order[i - 1]] < sigma[j]) {
                order[i] = order[i - 1];
                --i;
              }
              order[i] = j;
            }
            const double inv_scale = 1.0 / scale[lane];
            for (int64_t r = 0; r < rank; ++r) {
              const int64_t j = order[r];
              Sb[r] = T(sigma[j] * inv_scale);
              // Right singular vector: column j of V (tall) or of the long side (wide). Sign: its
              // largest entry is positive.
              double big = 0;
              for (int64_t c = 0; c < n; ++c) {
                const double v = wide ? long_side(j, c) : short_side(j, c);
                if (std::abs(v) > std::abs(big)) big = v;
              }
              const double sgn = big < 0 ? -1.0 : 1.0;
              if (wide) {
                for (int64_t c = 0; c < n; ++c) Vhb[r * n + c] = T(sgn * long_side(j, c));
                for (int64_t i = 0; i < m; ++i) Ub[i * rank + r] = T(sgn * short_side(j, i));
              } else {
                for (int64_t c = 0; c < n; ++c) Vhb[r * n + c] = T(sgn * short_side(j, c));
                for (int64_t i = 0; i < m; ++i) Ub[i * rank + r] = T(sgn * long_side(j, i));
              }
            }
          }
        }
      }
    }
  });
}

constexpr int64_t kFloatLanesMaxSize = 8;
// Beyond min(m, n) = 64 a per-matrix LAPACK call (gesdd) is faster than Jacobi here
// (measured: 0.45x at 64 x 64 single-threaded CPU time, 0.2x at 128 x 128), so larger
// matrices take LAPACK, with this op's contract applied on top (NaN rows, signs, truncation).
// (The float32 Gram route is faster than LAPACK at 64 x 64 but keeps the same limit.)
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

std::tuple<Tensor, Tensor, Tensor> batched_svd_cpu(const Tensor& A, std::optional<int64_t> rank_opt,
                                                   int64_t max_sweeps) {
  TORCH_CHECK_VALUE(A.dim() >= 2, "batched_svd: A must have at least 2 dimensions (..., m, n), got ", A.dim(),
                    "-D");
  TORCH_CHECK_VALUE(A.scalar_type() == at::kFloat || A.scalar_type() == at::kDouble,
                    "batched_svd: A must be float32 or float64, got ", A.scalar_type());
  TORCH_CHECK_VALUE(max_sweeps >= 1, "batched_svd: max_sweeps must be >= 1, got ", max_sweeps);
  const int64_t m = A.size(-2), n = A.size(-1), k = std::min(m, n);
  int64_t rank = k;
  if (rank_opt.has_value()) {
    rank = *rank_opt;
    TORCH_CHECK_VALUE(rank >= 1 && rank <= k, "batched_svd: rank must be in [1, min(m, n)] = [1, ", k, "], got ",
                      rank);
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
  // per instruction, rotation rounding ~3e-6 there), the Gram route beyond (3-5x faster than
  // Jacobi in double lanes from 16 x 16 on). float64: Jacobi in double lanes (the Gram route cannot
  // reach 1e-12 for ill-conditioned input).
  const bool gram = A.scalar_type() == at::kFloat && std::max(m, n) > kFloatLanesMaxSize;
  if (A.scalar_type() == at::kFloat && !gram) {
    batched_svd_kernel<float, float>(Ac.const_data_ptr<float>(), U.mutable_data_ptr<float>(),
                                     S.mutable_data_ptr<float>(), Vh.mutable_data_ptr<float>(), batch, m, n, rank,
                                     max_sweeps, false, failed);
  } else {
    AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "batched_svd", [&] {
      batched_svd_kernel<scalar_t, double>(Ac.const_data_ptr<scalar_t>(), U.mutable_data_ptr<scalar_t>(),
                                           S.mutable_data_ptr<scalar_t>(), Vh.mutable_data_ptr<scalar_t>(), batch, m,
                                           n, rank, max_sweeps, gram, failed);
    });
  }
  TORCH_CHECK(failed.load() == std::numeric_limits<int64_t>::max(), "batched_svd: ",
              gram ? "tridiagonal QR" : "one-sided Jacobi", " did not converge within max_sweeps=", max_sweeps,
              gram ? " steps per eigenvalue" : " sweeps", " for matrix ", failed.load(),
              " of the flattened batch (shape ", A.sizes(), ")");
  return {U, S, Vh};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lowrank, m) {
  m.def("batched_svd(Tensor A, int? rank=None, int max_sweeps=40) -> (Tensor U, Tensor S, Tensor Vh)");
}

TORCH_LIBRARY_IMPL(lowrank, CPU, m) { m.impl("batched_svd", &batched_svd_cpu); }

}  // namespace lowrank
