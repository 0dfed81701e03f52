// One-sided (Hestenes) Jacobi on one group of packed matrices, and the orthonormal completion
// of numerically zero columns (both routes use it when unpacking).
#pragma once

#ifndef LOWRANK_SVD_KERNEL_TU
#error "batched_svd_jacobi.h belongs to the batched_svd_<isa>.cpp kernel translation units"
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
  using S = Lanes<C, kVectorBytes>;
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
