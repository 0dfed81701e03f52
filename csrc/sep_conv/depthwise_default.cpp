// The depthwise forward kernels at the baseline level: 16-byte vectors (SSE2 on x86-64, NEON on
// aarch64), the build's own flags.
#include "depthwise_prelude.h"

#define LOWRANK_DW_VECTOR_BYTES 16
#include "depthwise_kernels.h"

namespace lowrank::sep_conv::dw {
void forward_default(const ForwardCall& call) { forward(call); }
}  // namespace lowrank::sep_conv::dw
