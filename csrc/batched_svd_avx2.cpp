// The batched SVD kernels for AVX2 + FMA CPUs: 32-byte lanes (4 doubles, 8 floats). Called only
// when lowrank::cpu_capability() allows it.
#if defined(__x86_64__)
#include "batched_svd_prelude.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define LOWRANK_SVD_VECTOR_BYTES 32
#include "batched_svd_kernels.h"
#pragma GCC pop_options

namespace lowrank::svd {
void run_avx2(const SvdCall& call) { run_kernel(call); }
}  // namespace lowrank::svd
#endif
