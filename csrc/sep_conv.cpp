// Fused separable low-rank convolution on CPU: a (dv x 1) conv C -> K followed by a
// (1 x dh) conv K -> N, computed tile by tile so the (B, K, H', W) intermediate never
// exists in full. See DESIGN.md section 4 for the exact semantics.
//
// A tile is (batch b, group g, a block of R output rows). Per tile, stage 1 gathers the
// input rows it needs into a column buffer and runs one GEMM into the intermediate tile;
// stage 2 does the same on the intermediate tile. All buffers are thread-local and sized
// to stay in L2, and the GEMMs go to the BLAS torch was built with.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace lowrank {
namespace {

using at::Tensor;

struct SepConvShape {
  int64_t batch, in_channels, height, width;  // input
  int64_t rank, out_channels, dv, dh, groups;
  int64_t cg, kg, ng;  // channels per group: input, intermediate, output
  int64_t stride_v, stride_h, pad_v, pad_h, dil_v, dil_h;
  int64_t out_height, out_width;
};

// The one C++ place that validates sep_conv arguments (forward and backward share it).
SepConvShape check_sep_conv(const Tensor& input, const Tensor& weight_v, const Tensor& weight_h,
                            const std::optional<Tensor>& bias, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK_VALUE(stride.size() == 2, "sep_conv: stride must have 2 elements, got ", stride.size());
  TORCH_CHECK_VALUE(padding.size() == 2, "sep_conv: padding must have 2 elements, got ", padding.size());
  TORCH_CHECK_VALUE(dilation.size() == 2, "sep_conv: dilation must have 2 elements, got ", dilation.size());
  TORCH_CHECK_VALUE(input.dim() == 4, "sep_conv: input must be 4-D (B, C, H, W), got ", input.dim(), "-D");
  TORCH_CHECK_VALUE(weight_v.dim() == 4 && weight_v.size(3) == 1,
                    "sep_conv: weight_v must have shape (K, C/groups, dv, 1), got ", weight_v.sizes());
  TORCH_CHECK_VALUE(weight_h.dim() == 4 && weight_h.size(2) == 1,
                    "sep_conv: weight_h must have shape (N, K/groups, 1, dh), got ", weight_h.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(input.scalar_type()),
                    "sep_conv: input must be a floating-point tensor, got ", input.scalar_type());
  TORCH_CHECK_VALUE(weight_v.scalar_type() == input.scalar_type(), "sep_conv: weight_v dtype ",
                    weight_v.scalar_type(), " does not match input dtype ", input.scalar_type());
  TORCH_CHECK_VALUE(weight_h.scalar_type() == input.scalar_type(), "sep_conv: weight_h dtype ",
                    weight_h.scalar_type(), " does not match input dtype ", input.scalar_type());
  TORCH_CHECK_VALUE(weight_v.device() == input.device(), "sep_conv: weight_v is on ", weight_v.device(),
                    " but input is on ", input.device());
  TORCH_CHECK_VALUE(weight_h.device() == input.device(), "sep_conv: weight_h is on ", weight_h.device(),
                    " but input is on ", input.device());
  TORCH_CHECK_VALUE(groups > 0, "sep_conv: groups must be positive, got ", groups);
  for (int i = 0; i < 2; ++i) {
    TORCH_CHECK_VALUE(stride[i] > 0, "sep_conv: stride must be positive, got ", stride);
    TORCH_CHECK_VALUE(dilation[i] > 0, "sep_conv: dilation must be positive, got ", dilation);
    TORCH_CHECK_VALUE(padding[i] >= 0, "sep_conv: padding must be non-negative, got ", padding);
  }
  SepConvShape s;
  s.batch = input.size(0);
  s.in_channels = input.size(1);
  s.height = input.size(2);
  s.width = input.size(3);
  s.rank = weight_v.size(0);
  s.out_channels = weight_h.size(0);
  s.dv = weight_v.size(2);
  s.dh = weight_h.size(3);
  s.groups = groups;
  TORCH_CHECK_VALUE(s.rank > 0 && weight_v.size(1) > 0 && s.dv > 0,
                    "sep_conv: weight_v must not be empty, got shape ", weight_v.sizes());
  TORCH_CHECK_VALUE(weight_h.size(1) > 0 && s.dh > 0, "sep_conv: weight_h must not be empty, got shape ",
                    weight_h.sizes());
  TORCH_CHECK_VALUE(s.in_channels % groups == 0 && weight_v.size(1) * groups == s.in_channels,
                    "sep_conv: weight_v expects ", weight_v.size(1), " input channels per group and groups=",
                    groups, ", but input has ", s.in_channels, " channels");
  TORCH_CHECK_VALUE(s.rank % groups == 0, "sep_conv: weight_v has ", s.rank,
                    " output channels, not divisible by groups=", groups);
  TORCH_CHECK_VALUE(weight_h.size(1) * groups == s.rank, "sep_conv: weight_h expects ", weight_h.size(1),
                    " channels per group (groups=", groups, "), but weight_v produces ", s.rank);
  TORCH_CHECK_VALUE(s.out_channels % groups == 0, "sep_conv: weight_h has ", s.out_channels,
                    " output channels, not divisible by groups=", groups);
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == s.out_channels, "sep_conv: bias must have shape (",
                      s.out_channels, ",), got ", bias->sizes());
    TORCH_CHECK_VALUE(bias->scalar_type() == input.scalar_type(), "sep_conv: bias dtype ",
                      bias->scalar_type(), " does not match input dtype ", input.scalar_type());
    TORCH_CHECK_VALUE(bias->device() == input.device(), "sep_conv: bias is on ", bias->device(),
                      " but input is on ", input.device());
  }
  s.cg = s.in_channels / groups;
  s.kg = s.rank / groups;
  s.ng = s.out_channels / groups;
  s.stride_v = stride[0];
  s.stride_h = stride[1];
  s.pad_v = padding[0];
  s.pad_h = padding[1];
  s.dil_v = dilation[0];
  s.dil_h = dilation[1];
  const int64_t span_v = s.dil_v * (s.dv - 1) + 1, span_h = s.dil_h * (s.dh - 1) + 1;
  TORCH_CHECK_VALUE(s.height + 2 * s.pad_v >= span_v, "sep_conv: weight_v's dilated height ", span_v,
                    " is larger than the padded input height ", s.height + 2 * s.pad_v);
  TORCH_CHECK_VALUE(s.width + 2 * s.pad_h >= span_h, "sep_conv: weight_h's dilated width ", span_h,
                    " is larger than the padded input width ", s.width + 2 * s.pad_h);
  s.out_height = (s.height + 2 * s.pad_v - span_v) / s.stride_v + 1;
  s.out_width = (s.width + 2 * s.pad_h - span_h) / s.stride_h + 1;
  return s;
}

}  // namespace
}  // namespace lowrank

// Fortran BLAS exported by libtorch_cpu (MKL or OpenBLAS, whichever torch was built with).
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc);
}

namespace lowrank {
namespace {

inline void blas_gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
                      const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
                      const int* ldc) {
  sgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
inline void blas_gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k,
                      const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
                      const double* beta, double* c, const int* ldc) {
  dgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// Row-major C(MxN) = op(A)(MxK) * op(B)(KxN) + beta*C. BLAS is column-major, so this
// computes C^T = op(B)^T op(A)^T. Leading dimensions must be >= 1 for BLAS.
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b,
          int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  const int mi = static_cast<int>(n), ni = static_cast<int>(m), ki = static_cast<int>(k);
  const int lda_i = static_cast<int>(std::max<int64_t>(1, ldb)), ldb_i = static_cast<int>(std::max<int64_t>(1, lda));
  const int ldc_i = static_cast<int>(std::max<int64_t>(1, ldc));
  const T one(1);
  blas_gemm(trans_b ? "T" : "N", trans_a ? "T" : "N", &mi, &ni, &ki, &one, b, &lda_i, a, &ldb_i, &beta, c, &ldc_i);
}

// Output rows per tile: enough to keep the per-thread buffers near `budget` bytes, and in
// the backward at least enough that tiles two apart never touch the same input rows.
int64_t rows_per_tile(const SepConvShape& s, int64_t bytes_per_row, int64_t elem_size) {
  const int64_t budget = 384 * 1024;
  int64_t rows = std::max<int64_t>(1, budget / std::max<int64_t>(1, bytes_per_row * elem_size));
  const int64_t halo_rows = (s.dil_v * (s.dv - 1)) / s.stride_v;
  rows = std::max(rows, std::max<int64_t>(1, halo_rows));
  // Keep several tiles per image so both cores have work at batch 1.
  const int64_t want_tiles = 4 * at::get_num_threads();
  if (s.batch * s.groups < want_tiles) {
    const int64_t per_image = (want_tiles + s.batch * s.groups - 1) / (s.batch * s.groups);
    rows = std::min(rows, std::max<int64_t>(std::max<int64_t>(1, halo_rows),
                                            (s.out_height + per_image - 1) / per_image));
  }
  return std::min(rows, s.out_height);
}

// Strided 4-D view of an NCHW-indexed tensor, whatever its memory layout.
template <typename T>
struct View4 {
  T* data = nullptr;
  int64_t sb = 0, sc = 0, sh = 0, sw = 0;
  View4() = default;
  explicit View4(const Tensor& t)
      : data(static_cast<T*>(t.data_ptr())), sb(t.stride(0)), sc(t.stride(1)), sh(t.stride(2)), sw(t.stride(3)) {}
  T* at(int64_t b, int64_t c, int64_t h, int64_t w) const { return data + b * sb + c * sc + h * sh + w * sw; }
};

// cols[(c*dv + i), rr*W + w] = x[b, c0 + c, (r0 + rr)*sv - pv + i*lv, w], zero outside the input.
template <typename T>
void gather_input_cols(const SepConvShape& s, const View4<const T>& x, int64_t b, int64_t c0, int64_t r0,
                       int64_t rows, T* cols) {
  const int64_t P = rows * s.width;
  for (int64_t c = 0; c < s.cg; ++c) {
    for (int64_t i = 0; i < s.dv; ++i) {
      T* dst = cols + (c * s.dv + i) * P;
      for (int64_t rr = 0; rr < rows; ++rr) {
        const int64_t h = (r0 + rr) * s.stride_v - s.pad_v + i * s.dil_v;
        T* d = dst + rr * s.width;
        if (h < 0 || h >= s.height) {
          std::fill(d, d + s.width, T(0));
        } else if (x.sw == 1) {
          std::copy_n(x.at(b, c0 + c, h, 0), s.width, d);
        } else {
          const T* src = x.at(b, c0 + c, h, 0);
          for (int64_t w = 0; w < s.width; ++w) d[w] = src[w * x.sw];
        }
      }
    }
  }
}

// The adjoint of gather_input_cols: grad_x[...] += cols[...].
template <typename T>
void scatter_add_input_cols(const SepConvShape& s, const View4<T>& gx, int64_t b, int64_t c0, int64_t r0,
                            int64_t rows, const T* cols) {
  const int64_t P = rows * s.width;
  for (int64_t c = 0; c < s.cg; ++c) {
    for (int64_t i = 0; i < s.dv; ++i) {
      const T* src = cols + (c * s.dv + i) * P;
      for (int64_t rr = 0; rr < rows; ++rr) {
        const int64_t h = (r0 + rr) * s.stride_v - s.pad_v + i * s.dil_v;
        if (h < 0 || h >= s.height) continue;
        T* d = gx.at(b, c0 + c, h, 0);
        const T* sr = src + rr * s.width;
        for (int64_t w = 0; w < s.width; ++w) d[w * gx.sw] += sr[w];
      }
    }
  }
}

// tcols[(k*dh + j), rr*W' + w'] = t[k, rr*W + w'*sh - ph + j*lh], zero outside [0, W).
template <typename T>
void gather_mid_cols(const SepConvShape& s, const T* t, int64_t rows, T* tcols) {
  const int64_t P = rows * s.width, Q = rows * s.out_width;
  for (int64_t k = 0; k < s.kg; ++k) {
    for (int64_t j = 0; j < s.dh; ++j) {
      T* dst = tcols + (k * s.dh + j) * Q;
      const int64_t off = j * s.dil_h - s.pad_h;
      // Output columns whose source column off + w'*sh lies in [0, W).
      const int64_t w_lo = off >= 0 ? 0 : (-off + s.stride_h - 1) / s.stride_h;
      const int64_t w_hi =
          s.width - off <= 0 ? 0 : std::min(s.out_width, (s.width - 1 - off) / s.stride_h + 1);
      for (int64_t rr = 0; rr < rows; ++rr) {
        const T* src = t + k * P + rr * s.width + off;
        T* d = dst + rr * s.out_width;
        if (w_hi <= w_lo) {
          std::fill(d, d + s.out_width, T(0));
          continue;
        }
        std::fill(d, d + w_lo, T(0));
        if (s.stride_h == 1) {
          std::copy(src + w_lo, src + w_hi, d + w_lo);
        } else {
          for (int64_t w = w_lo; w < w_hi; ++w) d[w] = src[w * s.stride_h];
        }
        std::fill(d + w_hi, d + s.out_width, T(0));
      }
    }
  }
}

// The adjoint of gather_mid_cols: dt = 0; dt[...] += dtcols[...].
template <typename T>
void scatter_mid_cols(const SepConvShape& s, const T* dtcols, int64_t rows, T* dt) {
  const int64_t P = rows * s.width, Q = rows * s.out_width;
  std::fill(dt, dt + s.kg * P, T(0));
  for (int64_t k = 0; k < s.kg; ++k) {
    for (int64_t j = 0; j < s.dh; ++j) {
      const T* src = dtcols + (k * s.dh + j) * Q;
      const int64_t off = j * s.dil_h - s.pad_h;
      const int64_t w_lo = off >= 0 ? 0 : (-off + s.stride_h - 1) / s.stride_h;
      const int64_t w_hi =
          s.width - off <= 0 ? 0 : std::min(s.out_width, (s.width - 1 - off) / s.stride_h + 1);
      for (int64_t rr = 0; rr < rows; ++rr) {
        T* d = dt + k * P + rr * s.width + off;
        const T* sr = src + rr * s.out_width;
        for (int64_t w = w_lo; w < w_hi; ++w) d[w * s.stride_h] += sr[w];
      }
    }
  }
}

template <typename T>
void sep_conv_forward_kernel(const SepConvShape& s, const Tensor& input, const Tensor& weight_v,
                             const Tensor& weight_h, const T* bias, Tensor& out) {
  const View4<const T> x(input);
  const View4<T> y(out);
  const T* wv = weight_v.data_ptr<T>();
  const T* wh = weight_h.data_ptr<T>();
  const int64_t row_elems = s.cg * s.dv * s.width + s.kg * s.width + s.kg * s.dh * s.out_width +
                            s.ng * s.out_width;
  const int64_t R = rows_per_tile(s, row_elems, sizeof(T));
  const int64_t tiles_per_image = (s.out_height + R - 1) / R;
  const int64_t n_tiles = s.batch * s.groups * tiles_per_image;
  const int64_t ldwv = s.cg * s.dv, ldwh = s.kg * s.dh;

  at::parallel_for(0, n_tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> buf(R * row_elems);
    T* xcols = buf.data();
    T* t = xcols + R * s.cg * s.dv * s.width;
    T* tcols = t + R * s.kg * s.width;
    T* o = tcols + R * s.kg * s.dh * s.out_width;
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t b = tile / (s.groups * tiles_per_image);
      const int64_t g = (tile / tiles_per_image) % s.groups;
      const int64_t r0 = (tile % tiles_per_image) * R;
      const int64_t rows = std::min(R, s.out_height - r0);
      const int64_t P = rows * s.width, Q = rows * s.out_width;
      gather_input_cols(s, x, b, g * s.cg, r0, rows, xcols);
      gemm<T>(false, false, s.kg, P, ldwv, wv + g * s.kg * ldwv, ldwv, xcols, P, T(0), t, P);
      gather_mid_cols(s, t, rows, tcols);
      gemm<T>(false, false, s.ng, Q, ldwh, wh + g * s.ng * ldwh, ldwh, tcols, Q, T(0), o, Q);
      for (int64_t n = 0; n < s.ng; ++n) {
        const T bn = bias ? bias[g * s.ng + n] : T(0);
        for (int64_t rr = 0; rr < rows; ++rr) {
          T* dst = y.at(b, g * s.ng + n, r0 + rr, 0);
          const T* src = o + n * Q + rr * s.out_width;
          for (int64_t w = 0; w < s.out_width; ++w) dst[w * y.sw] = src[w] + bn;
        }
      }
    }
  });
}

template <typename T>
void sep_conv_backward_kernel(const SepConvShape& s, const Tensor& grad_out, const Tensor& input,
                              const Tensor& weight_v, const Tensor& weight_h, Tensor& grad_input,
                              Tensor& grad_wv, Tensor& grad_wh, bool need_input, bool need_wv, bool need_wh) {
  const View4<const T> x(input);
  const View4<const T> gy(grad_out);
  const T* wv = weight_v.data_ptr<T>();
  const T* wh = weight_h.data_ptr<T>();
  const bool need_xcols = need_wv || need_wh;
  const int64_t row_elems = 2 * s.cg * s.dv * s.width + 2 * s.kg * s.width + 2 * s.kg * s.dh * s.out_width +
                            s.ng * s.out_width;
  const int64_t R = rows_per_tile(s, row_elems, sizeof(T));
  const int64_t tiles_per_image = (s.out_height + R - 1) / R;
  const int64_t ldwv = s.cg * s.dv, ldwh = s.kg * s.dh;
  const int64_t wv_numel = s.rank * ldwv, wh_numel = s.out_channels * ldwh;

  // Weight gradients accumulate per thread and are summed at the end.
  const int64_t n_threads = at::get_num_threads();
  std::vector<T> wgrad(n_threads * (wv_numel + wh_numel), T(0));
  const View4<T> gx = need_input ? View4<T>(grad_input) : View4<T>();

  // Tiles two apart never share input rows (see rows_per_tile), so the grad_input
  // scatter is race-free if even and odd tiles run in separate passes.
  const int64_t n_pairs = s.batch * s.groups * ((tiles_per_image + 1) / 2);
  for (int64_t parity = 0; parity < 2; ++parity) {
    at::parallel_for(0, n_pairs, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> buf(R * row_elems);
      T* xcols = buf.data();
      T* dxcols = xcols + R * s.cg * s.dv * s.width;
      T* t = dxcols + R * s.cg * s.dv * s.width;
      T* dt = t + R * s.kg * s.width;
      T* tcols = dt + R * s.kg * s.width;
      T* dtcols = tcols + R * s.kg * s.dh * s.out_width;
      T* go = dtcols + R * s.kg * s.dh * s.out_width;
      T* my_wgrad = wgrad.data() + at::get_thread_num() * (wv_numel + wh_numel);
      const int64_t half = (tiles_per_image + 1) / 2;
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / (s.groups * half);
        const int64_t g = (item / half) % s.groups;
        const int64_t tile = 2 * (item % half) + parity;
        if (tile >= tiles_per_image) continue;
        const int64_t r0 = tile * R;
        const int64_t rows = std::min(R, s.out_height - r0);
        const int64_t P = rows * s.width, Q = rows * s.out_width;
        for (int64_t n = 0; n < s.ng; ++n) {
          for (int64_t rr = 0; rr < rows; ++rr) {
            const T* src = gy.at(b, g * s.ng + n, r0 + rr, 0);
            T* d = go + n * Q + rr * s.out_width;
            for (int64_t w = 0; w < s.out_width; ++w) d[w] = src[w * gy.sw];
          }
        }
        if (need_xcols) gather_input_cols(s, x, b, g * s.cg, r0, rows, xcols);
        if (need_wh) {
          gemm<T>(false, false, s.kg, P, ldwv, wv + g * s.kg * ldwv, ldwv, xcols, P, T(0), t, P);
          gather_mid_cols(s, t, rows, tcols);
          // grad_wh[g] += go (Ng x Q) * tcols^T (Q x Kg*dh)
          gemm<T>(false, true, s.ng, ldwh, Q, go, Q, tcols, Q, T(1), my_wgrad + wv_numel + g * s.ng * ldwh,
                  ldwh);
        }
        if (!(need_wv || need_input)) continue;
        // dtcols = wh[g]^T (Kg*dh x Ng) * go (Ng x Q)
        gemm<T>(true, false, ldwh, Q, s.ng, wh + g * s.ng * ldwh, ldwh, go, Q, T(0), dtcols, Q);
        scatter_mid_cols(s, dtcols, rows, dt);
        if (need_wv) {
          // grad_wv[g] += dt (Kg x P) * xcols^T (P x Cg*dv)
          gemm<T>(false, true, s.kg, ldwv, P, dt, P, xcols, P, T(1), my_wgrad + g * s.kg * ldwv, ldwv);
        }
        if (need_input) {
          // dxcols = wv[g]^T (Cg*dv x Kg) * dt (Kg x P)
          gemm<T>(true, false, ldwv, P, s.kg, wv + g * s.kg * ldwv, ldwv, dt, P, T(0), dxcols, P);
          scatter_add_input_cols(s, gx, b, g * s.cg, r0, rows, dxcols);
        }
      }
    });
  }
  T* gwv = need_wv ? grad_wv.data_ptr<T>() : nullptr;
  T* gwh = need_wh ? grad_wh.data_ptr<T>() : nullptr;
  for (int64_t th = 0; th < n_threads; ++th) {
    const T* src = wgrad.data() + th * (wv_numel + wh_numel);
    if (gwv)
      for (int64_t i = 0; i < wv_numel; ++i) gwv[i] = (th ? gwv[i] : T(0)) + src[i];
    if (gwh)
      for (int64_t i = 0; i < wh_numel; ++i) gwh[i] = (th ? gwh[i] : T(0)) + src[wv_numel + i];
  }
}

// Reduced-precision inputs compute in float32.
at::ScalarType compute_dtype(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

Tensor sep_conv_cpu(const Tensor& input, const Tensor& weight_v, const Tensor& weight_h,
                    const std::optional<Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                    at::IntArrayRef dilation, int64_t groups) {
  const SepConvShape s = check_sep_conv(input, weight_v, weight_h, bias, stride, padding, dilation, groups);
  const auto memory_format = input.suggest_memory_format();
  const auto ct = compute_dtype(input.scalar_type());
  Tensor out = at::empty({s.batch, s.out_channels, s.out_height, s.out_width},
                         input.options().dtype(ct).memory_format(memory_format));
  if (out.numel() == 0) return out.to(input.scalar_type());
  const Tensor x = input.to(ct);
  const Tensor wv = weight_v.to(ct).contiguous();
  const Tensor wh = weight_h.to(ct).contiguous();
  const bool has_bias = bias.has_value() && bias->defined();
  const Tensor b = has_bias ? bias->to(ct).contiguous() : Tensor();
  AT_DISPATCH_FLOATING_TYPES(ct, "sep_conv_cpu", [&] {
    sep_conv_forward_kernel<scalar_t>(s, x, wv, wh, has_bias ? b.data_ptr<scalar_t>() : nullptr, out);
  });
  return out.to(input.scalar_type());
}

std::tuple<Tensor, Tensor, Tensor> sep_conv_backward_cpu(const Tensor& grad_out, const Tensor& input,
                                                         const Tensor& weight_v, const Tensor& weight_h,
                                                         at::IntArrayRef stride, at::IntArrayRef padding,
                                                         at::IntArrayRef dilation, int64_t groups,
                                                         std::array<bool, 3> output_mask) {
  const SepConvShape s =
      check_sep_conv(input, weight_v, weight_h, std::nullopt, stride, padding, dilation, groups);
  TORCH_CHECK_VALUE(grad_out.dim() == 4 && grad_out.size(0) == s.batch && grad_out.size(1) == s.out_channels &&
                        grad_out.size(2) == s.out_height && grad_out.size(3) == s.out_width,
                    "sep_conv_backward: grad_out has shape ", grad_out.sizes(), ", expected [", s.batch, ", ",
                    s.out_channels, ", ", s.out_height, ", ", s.out_width, "]");
  const auto ct = compute_dtype(input.scalar_type());
  const auto memory_format = input.suggest_memory_format();
  Tensor grad_input = output_mask[0]
                          ? at::zeros(input.sizes(), input.options().dtype(ct).memory_format(memory_format))
                          : at::empty({0}, input.options());
  Tensor grad_wv = output_mask[1] ? at::zeros(weight_v.sizes(), weight_v.options().dtype(ct))
                                  : at::empty({0}, weight_v.options());
  Tensor grad_wh = output_mask[2] ? at::zeros(weight_h.sizes(), weight_h.options().dtype(ct))
                                  : at::empty({0}, weight_h.options());
  if (s.batch > 0 && s.out_channels > 0 && (output_mask[0] || output_mask[1] || output_mask[2])) {
    const Tensor x = input.to(ct);
    const Tensor gy = grad_out.to(ct);
    const Tensor wv = weight_v.to(ct).contiguous();
    const Tensor wh = weight_h.to(ct).contiguous();
    AT_DISPATCH_FLOATING_TYPES(ct, "sep_conv_backward_cpu", [&] {
      sep_conv_backward_kernel<scalar_t>(s, gy, x, wv, wh, grad_input, grad_wv, grad_wh, output_mask[0],
                                         output_mask[1], output_mask[2]);
    });
  }
  const auto dt = input.scalar_type();
  return {grad_input.to(dt), grad_wv.to(dt), grad_wh.to(dt)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lowrank, m) {
  m.def(
      "sep_conv(Tensor input, Tensor weight_v, Tensor weight_h, Tensor? bias, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups) -> Tensor");
  // Gradients for input, weight_v, weight_h (bias is a sum in Python). A gradient not asked
  // for in output_mask comes back as an empty tensor.
  m.def(
      "sep_conv_backward(Tensor grad_out, Tensor input, Tensor weight_v, Tensor weight_h, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(lowrank, CPU, m) {
  m.impl("sep_conv", &sep_conv_cpu);
  m.impl("sep_conv_backward", &sep_conv_backward_cpu);
}

}  // namespace lowrank
