// The whole kernel source of the batched SVD at one lane width, for a batched_svd_<isa>.cpp
// translation unit: that file includes the standard headers first (so that no library code is
// compiled for its instruction set), then sets the target and LOWRANK_SVD_VECTOR_BYTES and
// includes this. Everything here has internal linkage: each level gets its own copy, and no
// symbol compiled for AVX-512 can stand in for the default level's at link time.
#ifndef LOWRANK_SVD_VECTOR_BYTES
#error "define LOWRANK_SVD_VECTOR_BYTES (16, 32 or 64) before including batched_svd_kernels.h"
#endif
#define LOWRANK_SVD_KERNEL_TU

namespace lowrank::svd {
namespace {

constexpr int kVectorBytes = LOWRANK_SVD_VECTOR_BYTES;

#include "batched_svd_lanes.h"
#include "batched_svd_jacobi.h"
#include "batched_svd_tridiag.h"
#include "batched_svd_gram.h"
#include "batched_svd_driver.h"

// float32 up to 8 x 8: float lanes (twice the matrices per instruction); float32 beyond: the Gram
// route in double lanes; float64: Jacobi in double lanes.
void run_kernel(const SvdCall& c) {
  if (c.is_double) {
    batched_svd_kernel<double, double>(static_cast<const double*>(c.A), static_cast<double*>(c.U),
                                       static_cast<double*>(c.S), static_cast<double*>(c.Vh), c.batch, c.m, c.n, c.rank,
                                       c.max_sweeps, false, *c.failed);
  } else if (c.gram) {
    batched_svd_kernel<float, double>(static_cast<const float*>(c.A), static_cast<float*>(c.U),
                                      static_cast<float*>(c.S), static_cast<float*>(c.Vh), c.batch, c.m, c.n, c.rank,
                                      c.max_sweeps, true, *c.failed);
  } else {
    batched_svd_kernel<float, float>(static_cast<const float*>(c.A), static_cast<float*>(c.U), static_cast<float*>(c.S),
                                     static_cast<float*>(c.Vh), c.batch, c.m, c.n, c.rank, c.max_sweeps, false,
                                     *c.failed);
  }
}

}  // namespace
}  // namespace lowrank::svd
