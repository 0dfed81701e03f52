// The batched SVD of one call at one lane width: packing, the chosen route per group, unpacking
// (sort, completion, signs), groups spread over threads.
#pragma once

#ifndef LOWRANK_SVD_KERNEL_TU
#error "batched_svd_driver.h belongs to the batched_svd_<isa>.cpp kernel translation units"
#endif

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
  using Simd = Lanes<C, kVectorBytes>;
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
    std::vector<Slot> slots(per_round, Slot{std::vector<C>(l * k * L), std::vector<C>(k * k * L), std::vector<C>(k * L),
                                            std::vector<double>(L), std::vector<char>(L), 0});
    std::vector<C> cs(2 * pairs.size() * L + 2 * L);
    std::vector<unsigned> pair_mask(pairs.size());
    std::vector<double> Q(l * k), Vs(k * k), sigma(k), inv_sigma(k), signs(k);
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
          // Lane by lane in A's own order (contiguous reads): A[r][c] goes to W's column c, row r
          // (tall) or column r, row c (wide).
          for (int lane = 0; lane < L; ++lane) {
            C* w = W.data() + lane;
            const T* a = src[lane];
            if (a == nullptr) {
              for (int64_t p = 0; p < l * k; ++p) w[p * L] = C(0);
              continue;
            }
            const double s = scale[lane];
            const int64_t row_step = wide ? l : 1, col_step = wide ? 1 : l;
            for (int64_t r = 0; r < m; ++r)
              for (int64_t c = 0; c < n; ++c) w[(r * row_step + c * col_step) * L] = C(double(a[r * n + c]) * s);
          }
        }
        if constexpr (std::is_same_v<C, double>) {
          if (gram) {
            QrGroup qr[2];
            for (int sl = 0; sl < count; ++sl) {
              GramWork& ws = gram_work[sl];
              gram_tridiagonal(slots[sl].W, l, k, ws);
              qr[sl].init(ws.d.data(), ws.e.data(), ws.Q.data(), ws.D.data(), ws.ab.data(), k, max_sweeps);
            }
            tridiagonal_qr(qr, count);
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
              while (b < expected && !failed.compare_exchange_weak(expected, b)) {}
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
            // This lane's vectors, contiguous: Q (l x k, column-major) the normalized long side,
            // completed where a column is numerically zero (rare); Vs (k x k) the short side.
            for (int64_t j = 0; j < k; ++j) {
              const C* wj = W.data() + j * l * L + lane;
              for (int64_t i = 0; i < l; ++i) Q[j * l + i] = double(wj[i * L]) * inv_sigma[j];
              const C* vj = Vm.data() + j * k * L + lane;
              for (int64_t i = 0; i < k; ++i) Vs[j * k + i] = double(vj[i * L]);
            }
            if (any_deficient) complete_columns(Q, deficient, l, k);
            // Columns of the right (n entries) and left (m entries) singular vectors.
            const double* right = wide ? Q.data() : Vs.data();
            const double* left = wide ? Vs.data() : Q.data();
            const int64_t right_stride = wide ? l : k, left_stride = wide ? k : l;
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
              // Sign: the largest entry of each right singular vector is positive.
              const double* v = right + j * right_stride;
              double big = 0;
              for (int64_t c = 0; c < n; ++c)
                if (std::abs(v[c]) > std::abs(big)) big = v[c];
              signs[r] = big < 0 ? -1.0 : 1.0;
              for (int64_t c = 0; c < n; ++c) Vhb[r * n + c] = T(signs[r] * v[c]);
            }
            for (int64_t i = 0; i < m; ++i)
              for (int64_t r = 0; r < rank; ++r) Ub[i * rank + r] = T(signs[r] * left[order[r] * left_stride + i]);
          }
        }
      }
    }
  });
}
