// The depthwise forward kernels (depthwise_kernels.h), compiled once per instruction-set level
// (depthwise_default.cpp, depthwise_avx2.cpp, depthwise_avx512.cpp), and the call they share.
// depthwise.cpp picks one with lowrank::cpu_capability().
#pragma once

#include <cstdint>

#include "sep_conv.h"

namespace lowrank::sep_conv::dw {

// BFloat16Native: bfloat16 on a CPU with the AVX512-BF16 conversions (used at the AVX-512 level;
// they round to nearest even like the portable code, but treat subnormal floats as zero, as
// oneDNN's bfloat16 convolutions on such CPUs do).
enum class Dtype { Float, BFloat16, Half, BFloat16Native };

// One forward call. x and y hold elements of `dtype` (NCHW or channels_last, contiguous); the
// weights and bias are float32: channels_last wv (dv, C), wh (dh, C); NCHW wv (C, dv), wh (C, dh);
// bias (C) (zeros when the call has none).
struct ForwardCall {
  SepConvShape s;
  bool channels_last;
  Dtype dtype;
  const void* x;
  void* y;
  const float *wv, *wh, *bias;
};

void forward_default(const ForwardCall& call);
#if defined(__x86_64__)
void forward_avx2(const ForwardCall& call);
void forward_avx512(const ForwardCall& call);
#endif

}  // namespace lowrank::sep_conv::dw
