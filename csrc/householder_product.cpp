// Products of Householder reflections on CPU, with the contract of
// torch.linalg.householder_product: Q = H_1 H_2 ... H_k, first n columns, where
// H_i = I - tau_i v_i v_i^T and v_i is column i of A below the diagonal with an implicit 1
// on it (LAPACK's orgqr convention).
//
// Both directions are blocked in compact-WY panels of kPanel reflectors
// (Schreiber & Van Loan): a panel's product is I - Y T Y^T with T upper triangular, so
// every O(m n k) step is a GEMM. T is built as T = D (I + striu(Y^T Y) D)^{-1}, D = diag(tau),
// which never divides by tau (tau = 0 is a valid identity reflector); the backward
// differentiates that formula instead of walking the reflectors one by one (torch's
// backward is sequential in k: matrix-vector work instead of GEMMs).
//
// The backward recomputes the forward sweep and keeps, per panel, the trailing block the
// panel is applied to (the reflectors need not be orthogonal, so the states cannot be
// recovered by inverting panels).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "blas.h"

#include <algorithm>
#include <vector>

namespace lowrank {
namespace {

using at::Tensor;

// Reflectors per compact-WY panel (the GEMMs' inner dimension): narrower panels make the
// GEMMs thin, wider ones grow the triangular T work; 32 was the fastest of 16/32/64/96 on
// the householder suite's shapes (docs/householder.md).
constexpr int64_t kPanel = 32;

using blas::gemm;

// One compact-WY panel: reflectors j0 .. j0+b-1 acting on rows j0 .. m-1.
template <typename T>
struct Panel {
  int64_t j0 = 0, b = 0, rows = 0;  // rows = m - j0
  std::vector<T> y;                 // rows x b, unit diagonal, zeros above it
  std::vector<T> s;                 // b x b, Y^T Y
  std::vector<T> uinv;              // b x b, (I + striu(S) D)^{-1} (unit upper triangular)
  std::vector<T> t;                 // b x b, T = D uinv (upper triangular)
};

template <typename T>
void build_panel(const T* a, const T* tau, int64_t m, int64_t n, int64_t j0, int64_t b, Panel<T>& p) {
  p.j0 = j0;
  p.b = b;
  p.rows = m - j0;
  p.y.assign(p.rows * b, T(0));
  for (int64_t r = 0; r < p.rows; ++r) {
    const T* arow = a + (j0 + r) * n + j0;
    T* yrow = p.y.data() + r * b;
    const int64_t below = std::min(r, b);  // columns c < r hold A's entries
    for (int64_t c = 0; c < below; ++c) yrow[c] = arow[c];
    if (r < b) yrow[r] = T(1);
  }
  p.s.assign(b * b, T(0));
  gemm<T>(true, false, b, b, p.rows, T(1), p.y.data(), b, p.y.data(), b, T(0), p.s.data(), b);
  // U = I + striu(S) D is unit upper triangular; column i of U^{-1} is
  // e_i - U^{-1}[:, :i] S[:i, i] tau_i.
  p.uinv.assign(b * b, T(0));
  p.t.assign(b * b, T(0));
  for (int64_t i = 0; i < b; ++i) {
    p.uinv[i * b + i] = T(1);
    const T ti = tau[j0 + i];
    for (int64_t r = 0; r < i; ++r) {
      T acc = 0;
      for (int64_t c = r; c < i; ++c) acc += p.uinv[r * b + c] * p.s[c * b + i];
      p.uinv[r * b + i] = -acc * ti;
    }
  }
  for (int64_t r = 0; r < b; ++r)
    for (int64_t c = r; c < b; ++c) p.t[r * b + c] = tau[j0 + r] * p.uinv[r * b + c];
}

// What the backward needs from the forward sweep, per panel.
template <typename T>
struct PanelState {
  Panel<T> panel;
  std::vector<T> x;  // (m - j1) x (n - j1): trailing block of the partial product before this panel
  std::vector<T> w;  // b x (n - j0): Y^T [I 0; 0 X]
};

// Q (m x n, row-major) = first n columns of H_1 ... H_k. If `states` is given, keeps the
// per-panel data the backward needs.
template <typename T>
void forward_one(const T* a, const T* tau, int64_t m, int64_t n, int64_t k, T* q, std::vector<PanelState<T>>* states) {
  std::fill(q, q + m * n, T(0));
  for (int64_t i = 0; i < n; ++i) q[i * n + i] = T(1);
  const int64_t npanels = (k + kPanel - 1) / kPanel;
  if (states) states->resize(npanels);
  Panel<T> local;
  std::vector<T> w, tw;
  // LAPACK orgqr order: the last panel first; before panel [j0, j1) the product's block
  // rows/cols >= j0 is [I 0; 0 X] with X the trailing (m-j1) x (n-j1) block.
  for (int64_t pi = npanels - 1; pi >= 0; --pi) {
    const int64_t j0 = pi * kPanel, b = std::min(kPanel, k - j0), j1 = j0 + b;
    const int64_t rows = m - j0, cols = n - j0;
    Panel<T>& p = states ? (*states)[pi].panel : local;
    build_panel(a, tau, m, n, j0, b, p);
    std::vector<T>& wv = states ? (*states)[pi].w : w;
    wv.assign(b * cols, T(0));
    for (int64_t r = 0; r < b; ++r)
      for (int64_t c = 0; c < b; ++c) wv[r * cols + c] = p.y[c * b + r];
    T* qj1 = q + j1 * n + j1;
    if (states) {
      std::vector<T>& x = (*states)[pi].x;
      x.resize((m - j1) * (n - j1));
      for (int64_t r = 0; r < m - j1; ++r) std::copy(qj1 + r * n, qj1 + r * n + (n - j1), x.data() + r * (n - j1));
    }
    gemm<T>(true, false, b, n - j1, m - j1, T(1), p.y.data() + b * b, b, qj1, n, T(0), wv.data() + b, cols);
    tw.resize(b * cols);
    gemm<T>(false, false, b, cols, b, T(1), p.t.data(), b, wv.data(), cols, T(0), tw.data(), cols);
    gemm<T>(false, false, rows, cols, b, T(-1), p.y.data(), b, tw.data(), cols, T(1), q + j0 * n + j0, n);
  }
}

// Gradients of <G, Q> with respect to A (strictly lower part; the rest is zero) and tau.
template <typename T>
void backward_one(const T* g, const T* a, const T* tau, int64_t m, int64_t n, int64_t k, T* grad_a, T* grad_tau) {
  std::fill(grad_a, grad_a + m * n, T(0));
  if (k == 0) return;
  std::vector<PanelState<T>> states;
  std::vector<T> q(m * n);
  forward_one(a, tau, m, n, k, q.data(), &states);

  std::vector<T> gw(g, g + m * n);  // gradient w.r.t. the partial product P_j ... P_p E
  std::vector<T> v, gy, tmp, gt, mm, nn, gsym, ttv;
  for (const PanelState<T>& st : states) {
    const Panel<T>& p = st.panel;
    const int64_t j0 = p.j0, b = p.b, j1 = j0 + b, rows = p.rows, cols = n - j0;
    const T* gz = gw.data() + j0 * n + j0;  // rows x cols, leading dimension n
    const T* w = st.w.data();
    // Output Z = X - Y T W with W = Y^T X. V = Y^T G_Z.
    v.resize(b * cols);
    gemm<T>(true, false, b, cols, rows, T(1), p.y.data(), b, gz, n, T(0), v.data(), cols);
    // dL/dY = -G_Z W^T T^T - X V^T T, X = [I 0; 0 X'].
    tmp.resize(rows * b);
    gemm<T>(false, true, rows, b, cols, T(1), gz, n, w, cols, T(0), tmp.data(), b);
    gy.resize(rows * b);
    gemm<T>(false, true, rows, b, b, T(-1), tmp.data(), b, p.t.data(), b, T(0), gy.data(), b);
    for (int64_t r = 0; r < b; ++r)
      for (int64_t c = 0; c < b; ++c) tmp[r * b + c] = v[c * cols + r];
    gemm<T>(false, true, m - j1, b, n - j1, T(1), st.x.data(), n - j1, v.data() + b, cols, T(0), tmp.data() + b * b, b);
    gemm<T>(false, false, rows, b, b, T(-1), tmp.data(), b, p.t.data(), b, T(1), gy.data(), b);
    // dL/dT = -V W^T, then through T = D U^{-1}, U = I + striu(S) D:
    // M = dT U^{-T}, N = -T^T M, dtau = diag(M) + diag(S^T N), dS = striu(N D).
    gt.resize(b * b);
    gemm<T>(false, true, b, b, cols, T(-1), v.data(), cols, w, cols, T(0), gt.data(), b);
    mm.resize(b * b);
    gemm<T>(false, true, b, b, b, T(1), gt.data(), b, p.uinv.data(), b, T(0), mm.data(), b);
    nn.resize(b * b);
    gemm<T>(true, false, b, b, b, T(-1), p.t.data(), b, mm.data(), b, T(0), nn.data(), b);
    gsym.assign(b * b, T(0));
    for (int64_t i = 0; i < b; ++i) {
      T acc = mm[i * b + i];
      for (int64_t r = 0; r < i; ++r) acc += p.s[r * b + i] * nn[r * b + i];
      grad_tau[j0 + i] = acc;
      for (int64_t r = 0; r < i; ++r) {
        const T gs = nn[r * b + i] * tau[j0 + i];
        gsym[r * b + i] += gs;
        gsym[i * b + r] += gs;
      }
    }
    // S = Y^T Y contributes Y (dS + dS^T).
    gemm<T>(false, false, rows, b, b, T(1), p.y.data(), b, gsym.data(), b, T(1), gy.data(), b);
    for (int64_t r = 1; r < rows; ++r) {
      const int64_t below = std::min(r, b);
      for (int64_t c = 0; c < below; ++c) grad_a[(j0 + r) * n + j0 + c] = gy[r * b + c];
    }
    // Gradient w.r.t. the panel's input: P^T G_Z = G_Z - Y T^T V; later panels only read
    // rows/cols >= j1.
    if (j1 < n && j1 < m) {
      ttv.resize(b * (n - j1));
      gemm<T>(true, false, b, n - j1, b, T(1), p.t.data(), b, v.data() + b, cols, T(0), ttv.data(), n - j1);
      gemm<T>(false, false, m - j1, n - j1, b, T(-1), p.y.data() + b * b, b, ttv.data(), n - j1, T(1),
              gw.data() + j1 * n + j1, n);
    }
  }
}

void check_householder(const Tensor& input, const Tensor& tau, const char* name) {
  TORCH_CHECK_VALUE(input.dim() >= 2, name, ": input must have at least 2 dimensions, got ", input.dim());
  TORCH_CHECK_VALUE(tau.dim() >= 1, name, ": tau must have at least 1 dimension, got ", tau.dim());
  TORCH_CHECK_VALUE(input.dim() - tau.dim() == 1, name,
                    ": Expected tau to have one dimension less than input, but got tau.ndim equal to ", tau.dim(),
                    " and input.ndim is equal to ", input.dim());
  TORCH_CHECK_VALUE(input.size(-2) >= input.size(-1), name,
                    ": input.shape[-2] must be greater than or equal to input.shape[-1], got input.shape ",
                    input.sizes());
  TORCH_CHECK_VALUE(input.size(-1) >= tau.size(-1), name,
                    ": input.shape[-1] must be greater than or equal to tau.shape[-1], got input.shape ", input.sizes(),
                    " and tau.shape ", tau.sizes());
  TORCH_CHECK_VALUE(input.sizes().slice(0, input.dim() - 2) == tau.sizes().slice(0, tau.dim() - 1), name,
                    ": Expected batch dimensions of tau to be equal to input.shape[:-2], but got tau.shape ",
                    tau.sizes(), " and input.shape ", input.sizes());
  TORCH_CHECK_VALUE(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble, name,
                    ": input must be float32 or float64, got ", input.scalar_type());
  TORCH_CHECK_VALUE(tau.scalar_type() == input.scalar_type(), name, ": tau dtype ", tau.scalar_type(),
                    " does not match input dtype ", input.scalar_type());
  TORCH_CHECK_VALUE(tau.device() == input.device(), name, ": tau is on ", tau.device(), " but input is on ",
                    input.device());
}

Tensor householder_product_cpu(const Tensor& input, const Tensor& tau) {
  check_householder(input, tau, "householder_product");
  const int64_t m = input.size(-2), n = input.size(-1), k = tau.size(-1);
  const int64_t batch = m * n == 0 ? input.numel() : input.numel() / (m * n);
  Tensor a = input.contiguous();
  Tensor t = tau.contiguous();
  Tensor out = at::empty(input.sizes(), input.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "householder_product_cpu", [&] {
    const scalar_t* ap = a.const_data_ptr<scalar_t>();
    const scalar_t* tp = t.const_data_ptr<scalar_t>();
    scalar_t* qp = out.mutable_data_ptr<scalar_t>();
    // One matrix: BLAS threads inside. Many: one matrix per thread, BLAS sequential.
    at::parallel_for(0, batch, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i)
        forward_one<scalar_t>(ap + i * m * n, tp + i * k, m, n, k, qp + i * m * n, nullptr);
    });
  });
  return out;
}

std::tuple<Tensor, Tensor> householder_product_backward_cpu(const Tensor& grad, const Tensor& input,
                                                            const Tensor& tau) {
  check_householder(input, tau, "householder_product_backward");
  TORCH_CHECK_VALUE(grad.sizes() == input.sizes(), "householder_product_backward: grad must have shape ", input.sizes(),
                    ", got ", grad.sizes());
  TORCH_CHECK_VALUE(grad.scalar_type() == input.scalar_type() && grad.device() == input.device(),
                    "householder_product_backward: grad must have the dtype and device of input");
  const int64_t m = input.size(-2), n = input.size(-1), k = tau.size(-1);
  const int64_t batch = m * n == 0 ? 0 : input.numel() / (m * n);
  Tensor a = input.contiguous(), t = tau.contiguous(), g = grad.contiguous();
  Tensor grad_a = at::zeros(input.sizes(), input.options().memory_format(at::MemoryFormat::Contiguous));
  Tensor grad_tau = at::zeros(tau.sizes(), tau.options().memory_format(at::MemoryFormat::Contiguous));
  if (batch == 0 || k == 0) return {grad_a, grad_tau};
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "householder_product_backward_cpu", [&] {
    const scalar_t* ap = a.const_data_ptr<scalar_t>();
    const scalar_t* tp = t.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* gap = grad_a.mutable_data_ptr<scalar_t>();
    scalar_t* gtp = grad_tau.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, batch, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i)
        backward_one<scalar_t>(gp + i * m * n, ap + i * m * n, tp + i * k, m, n, k, gap + i * m * n, gtp + i * k);
    });
  });
  return {grad_a, grad_tau};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lowrank, m) {
  // Same contract as torch.linalg.householder_product (float32/float64).
  m.def("householder_product(Tensor input, Tensor tau) -> Tensor");
  // Gradients of <grad, householder_product(input, tau)> for input (zero on and above the
  // diagonal) and tau.
  m.def("householder_product_backward(Tensor grad, Tensor input, Tensor tau) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(lowrank, CPU, m) {
  m.impl("householder_product", &householder_product_cpu);
  m.impl("householder_product_backward", &householder_product_backward_cpu);
}

}  // namespace lowrank
