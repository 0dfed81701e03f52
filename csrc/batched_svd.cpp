// Batched thin SVD on CPU: one-sided (Hestenes) Jacobi, vectorized ACROSS matrices.
//
// A group of L matrices is packed in a structure-of-arrays buffer where lane = matrix, so
// every rotation updates L matrices with one vector instruction and tiny sizes (3x3 ...
// 16x16) need no horizontal reductions. Lanes are doubles (4 per AVX2 register) for float64
// and for float32 -- float rounding in the rotations would leave ||V^T V - I|| ~ 1e-4 at
// 64 x 64 -- except float32 with max(m, n) <= 8, which uses float lanes (8 per register;
// errors ~3e-6 there). Groups are spread over threads with at::parallel_for.
//
// Per matrix A (m x n), with k = min(m, n) and l = max(m, n):
//   * W = A (tall/square) or A^T (wide), an l x k matrix scaled by a power of two so its
//     largest entry is in [0.5, 1) (exact; avoids overflow/underflow in the dot products);
//   * sweeps over column pairs (p, q) in round-robin order: rotate when
//     |w_p.w_q| > tol * |w_p| |w_q|, accumulating the rotations into V (k x k); stop when a
//     sweep rotates nothing in any lane of the group, or report non-convergence (RuntimeError
//     naming the matrix) after max_sweeps sweeps;
//   * sigma_j = |w_j|, the columns w_j / sigma_j are the singular vectors on the long side,
//     V those on the short side; sort descending and fix signs (largest entry of each right
//     singular vector positive). Numerically zero columns (sigma_j <= sigma_max * eps^2, or
//     at the float rounding floor in float lanes) are replaced by an orthonormal completion,
//     so U^T U = I always holds.
//   * Matrices with a NaN/inf entry are not iterated: their U, S, Vh are all NaN.
// The Jacobi kernel handles min(m, n) <= 64 (its SoA buffer, l*k + k*k vectors per group,
// stays in L1/L2 there; max(m, n) is unlimited); larger matrices take LAPACK with the same
// contract applied on top (lapack_fallback below).
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
#include <vector>

namespace lowrank {
namespace {

using at::Tensor;

// ---- SIMD lanes: one lane per matrix (4 doubles with AVX2, scalar fallback otherwise). ------
// All arithmetic is double: float32 input would otherwise stall at a rounding-noise floor of
// about sqrt(l) * 1e-7 in w_p.w_q, which is too coarse for ||U^T U - I|| <= 1e-5 at 64 x 64.
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

// T: element type of A and the results; C: compute type of the Jacobi sweeps (lanes).
template <typename T, typename C>
void batched_svd_kernel(const T* A, T* U, T* S, T* Vh, int64_t batch, int64_t m, int64_t n, int64_t rank,
                        int64_t max_sweeps, std::atomic<int64_t>& failed) {
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
  // ~16 K doubles of matrix data per task so that small problems still split over threads.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, l * k * L));

  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    std::vector<C> W(l * k * L), Vm(k * k * L), cs(2 * pairs.size() * L + 2 * L), sigma_lanes(k * L);
    std::vector<unsigned> pair_mask(pairs.size());
    std::vector<double> Q(l * k), sigma(k), inv_sigma(k);
    std::vector<char> deficient(k);
    std::vector<int64_t> order(k);
    std::vector<double> scale(L);
    std::vector<char> finite(L);
    for (int64_t g = g0; g < g1; ++g) {
      // Pack: lane = matrix. Padding lanes and non-finite matrices are zero (converge at once).
      for (int lane = 0; lane < L; ++lane) {
        const int64_t b = g * L + lane;
        T amax = 0;
        bool ok = true;
        if (b < batch) {
          const T* a = A + b * m * n;
          for (int64_t i = 0; i < m * n; ++i) {
            const T v = std::abs(a[i]);
            if (!(v <= std::numeric_limits<T>::max())) ok = false;  // NaN or inf
            amax = std::max(amax, v);
          }
        }
        finite[lane] = ok;
        int e = 0;
        if (ok && amax > 0) std::frexp(double(amax), &e);
        scale[lane] = std::ldexp(1.0, -e);  // power of two: exact
        const double sc = scale[lane];
        for (int64_t j = 0; j < k; ++j)
          for (int64_t i = 0; i < l; ++i) {
            double v = 0;
            if (b < batch && ok) v = wide ? A[b * m * n + j * n + i] : A[b * m * n + i * n + j];
            W[(j * l + i) * L + lane] = C(v * sc);
          }
        for (int64_t j = 0; j < k; ++j)
          for (int64_t i = 0; i < k; ++i) Vm[(j * k + i) * L + lane] = i == j ? C(1) : C(0);
      }

      const unsigned rotating =
          jacobi_group<C>(W.data(), Vm.data(), l, k, max_sweeps, tol, pairs, round_start, cs, pair_mask);

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
  });
}

constexpr int64_t kFloatLanesMaxSize = 8;
// Beyond min(m, n) = 64 a per-matrix LAPACK call (gesdd) is faster than Jacobi here
// (measured: 0.45x at 64 x 64 single-threaded CPU time, 0.2x at 128 x 128), so larger
// matrices take LAPACK, with this op's contract applied on top (NaN rows, signs, truncation).
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
  // float32 with max(m, n) <= 8 (d x d kernel slices, 8 x 8 blocks): float lanes, twice the
  // matrices per instruction; rotation rounding stays ~3e-6 at this size, inside the 1e-5
  // accuracy contract. Everything else: double lanes.
  if (A.scalar_type() == at::kFloat && std::max(m, n) <= kFloatLanesMaxSize) {
    batched_svd_kernel<float, float>(Ac.const_data_ptr<float>(), U.mutable_data_ptr<float>(),
                                     S.mutable_data_ptr<float>(), Vh.mutable_data_ptr<float>(), batch, m, n, rank,
                                     max_sweeps, failed);
  } else {
    AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "batched_svd", [&] {
      batched_svd_kernel<scalar_t, double>(Ac.const_data_ptr<scalar_t>(), U.mutable_data_ptr<scalar_t>(),
                                           S.mutable_data_ptr<scalar_t>(), Vh.mutable_data_ptr<scalar_t>(), batch, m,
                                           n, rank, max_sweeps, failed);
    });
  }
  TORCH_CHECK(failed.load() == std::numeric_limits<int64_t>::max(),
              "batched_svd: one-sided Jacobi did not converge within max_sweeps=", max_sweeps,
              " sweeps for matrix ", failed.load(), " of the flattened batch (shape ", A.sizes(), ")");
  return {U, S, Vh};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lowrank, m) {
  m.def("batched_svd(Tensor A, int? rank=None, int max_sweeps=40) -> (Tensor U, Tensor S, Tensor Vh)");
}

TORCH_LIBRARY_IMPL(lowrank, CPU, m) { m.impl("batched_svd", &batched_svd_cpu); }

}  // namespace lowrank
