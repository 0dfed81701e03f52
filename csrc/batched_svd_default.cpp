// The batched SVD kernels at the baseline level: 16-byte lanes (SSE2 on x86-64, NEON on aarch64),
// the build's own flags.
#include "batched_svd_prelude.h"

#define LOWRANK_SVD_VECTOR_BYTES 16
#include "batched_svd_kernels.h"

namespace lowrank::svd {
void run_default(const SvdCall& call) { run_kernel(call); }
}  // namespace lowrank::svd
