// The batched SVD kernels for AVX-512 CPUs (F, DQ, VL, BW): 64-byte lanes (8 doubles, 16 floats).
// Called only when lowrank::cpu_capability() allows it.
#if defined(__x86_64__)
#include "batched_svd_prelude.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma")
#define LOWRANK_SVD_VECTOR_BYTES 64
#include "batched_svd_kernels.h"
#pragma GCC pop_options

namespace lowrank::svd {
void run_avx512(const SvdCall& call) { run_kernel(call); }
}  // namespace lowrank::svd
#endif
