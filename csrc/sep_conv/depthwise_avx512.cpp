// The depthwise forward kernels for AVX-512 CPUs (F, DQ, VL, BW): 64-byte vectors (16 floats).
// Called only when lowrank::cpu_capability() allows it; the AVX512-BF16 conversions only run
// for calls that depthwise.cpp marks BFloat16Native.
#if defined(__x86_64__)
#include "depthwise_prelude.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512vl,avx512bw,avx512bf16,avx2,fma,f16c")
#define LOWRANK_DW_VECTOR_BYTES 64
#define LOWRANK_DW_AVX512BF16 1  // used only for Dtype::BFloat16Native, which depthwise.cpp picks
#define LOWRANK_DW_F16C 1
#include "depthwise_kernels.h"
#pragma GCC pop_options

namespace lowrank::sep_conv::dw {
void forward_avx512(const ForwardCall& call) { forward(call); }
}  // namespace lowrank::sep_conv::dw
#endif
