// The Gram route around the eigen-decomposition: B = W^T W, then U diag(sigma) = W V with a
// Gram-Schmidt repair.
#pragma once

#ifndef LOWRANK_SVD_KERNEL_TU
#error "batched_svd_gram.h belongs to the batched_svd_<isa>.cpp kernel translation units"
#endif

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
      if (pair)
        gemm_tile<4, 2>(W, Vm, Wn, l, k, i, c);
      else
        gemm_tile<4, 1>(W, Vm, Wn, l, k, i, c);
    }
    for (; i < l; ++i) {
      if (pair)
        gemm_tile<1, 2>(W, Vm, Wn, l, k, i, c);
      else
        gemm_tile<1, 1>(W, Vm, Wn, l, k, i, c);
    }
  }
}

// Scratch of the Gram route for one group, allocated once per thread.
struct GramWork {
  std::vector<double> Wn, B, H, Q, D, d, e, tau, p, ab, lam, inv_n2;
  std::vector<int64_t> order;
  GramWork(int64_t l, int64_t k)
      : Wn(l * k * kDL),
        B(k * k * kDL),
        H(k * k * kDL),
        Q(k * k * kDL),
        D(k * kDL),
        d(k * kDL),
        e(k * kDL),
        tau(2 * k * kDL),
        p(k * kDL),
        ab(2 * k * kDL),
        lam(k * kDL),
        inv_n2(k * kDL),
        order(k) {}
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
  tridiagonalize(ws.B.data(), ws.H.data(), ws.Q.data(), ws.d.data(), ws.e.data(), ws.tau.data(), ws.p.data(), k);
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
    for (int64_t i = 0; i < j; ++i) keep = keep + S::blend_gt(thr, S::load(ws.lam.data() + i * kDL) * lj, one, zero);
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
