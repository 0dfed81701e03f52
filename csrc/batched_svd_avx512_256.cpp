// The batched SVD kernels for AVX-512 CPUs at 32-byte lanes (4 doubles, 8 floats; AVX-512VL
// encodings, 32 vector registers). The float32 Gram route runs here: 8-double lanes are slower
// for it (every group's QR iteration runs until its slowest lane has converged, and the per-group
// buffers double in size). Called only when lowrank::cpu_capability() allows AVX-512.
#if defined(__x86_64__)
#include "batched_svd_prelude.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma")
#define LOWRANK_SVD_VECTOR_BYTES 32
#include "batched_svd_kernels.h"
#pragma GCC pop_options

namespace lowrank::svd {
void run_avx512_256(const SvdCall& call) { run_kernel(call); }
}  // namespace lowrank::svd
#endif
