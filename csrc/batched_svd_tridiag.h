// The Gram route's eigen-decomposition of B = W^T W in double lanes: Householder
// tridiagonalization and implicit symmetric QR, one or two groups at a time.
#pragma once

#ifndef LOWRANK_SVD_KERNEL_TU
#error "batched_svd_tridiag.h belongs to the batched_svd_<isa>.cpp kernel translation units"
#endif

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
using DLanes = Lanes<double, kVectorBytes>;
using DVec = DLanes::V;
constexpr int kDL = DLanes::L;

// Element (r, c) of a k x k row-major matrix of lane vectors.
inline double* elem(double* M, int64_t k, int64_t r, int64_t c) { return M + (r * k + c) * kDL; }

inline int64_t lane_min(DVec v) {
  alignas(64) double x[kDL];
  DLanes::store(x, v);
  return (int64_t)*std::min_element(x, x + kDL);
}

// Householder reduction Q^T B Q = tridiag(d, e) of the symmetric B (k x k, row-major, lower
// triangle used and overwritten); Q (row-major) is formed explicitly. Row j of H keeps the j-th
// Householder vector (entries j+1..k-1, contiguous for the inner loops; H zero-initialized).
// tau: 2 k, p: k lane vectors of scratch.
void tridiagonalize(double* B, double* H, double* Q, double* d, double* e, double* tau, double* p, int64_t k) {
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

  // Set up on tridiag(d, e); Q (k x k) is the tridiagonalization's, D is set to ones here. An
  // init function, not a constructor: groups live in a stack array (the vector members are
  // over-aligned for heap allocation through the standard allocator).
  void init(double* d_, double* e_, double* Q_, double* D_, double* ab_, int64_t k_, int64_t max_steps_) {
    using S = DLanes;
    d = d_, e = e_, Q = Q_, D = D_, ab = ab_, k = k_, max_steps = max_steps_, hi = k_ - 1;
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
