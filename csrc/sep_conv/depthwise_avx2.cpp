// The depthwise forward kernels for AVX2 + FMA CPUs: 32-byte vectors (8 floats). Called only when
// lowrank::cpu_capability() allows it; half-precision calls also need F16C (depthwise.cpp checks).
#if defined(__x86_64__)
#include "depthwise_prelude.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define LOWRANK_DW_VECTOR_BYTES 32
#define LOWRANK_DW_F16C 1
#include "depthwise_kernels.h"
#pragma GCC pop_options

namespace lowrank::sep_conv::dw {
void forward_avx2(const ForwardCall& call) { forward(call); }
}  // namespace lowrank::sep_conv::dw
#endif
