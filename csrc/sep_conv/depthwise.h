// sep_conv's depthwise case on CPU: groups == C == K == N, so every channel is filtered on its own
// by a (dv x 1) and then a (1 x dh) filter (the spatial part of CP and Jaderberg scheme-1 layers).
// The general kernel's per-group GEMMs degenerate to 1 x 1 products there, so this case gets its
// own direct kernels: the forward is vectorized per instruction-set level (depthwise_kernels.h),
// the intermediate kept one output row at a time in a per-thread buffer.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>

#include "sep_conv.h"

namespace lowrank {
namespace sep_conv {

// True when a (checked) sep_conv call is the depthwise case handled here.
bool sep_conv_is_depthwise(const SepConvShape& s);

Tensor sep_conv_depthwise_forward(const SepConvShape& s, const Tensor& input, const Tensor& weight_v,
                                  const Tensor& weight_h, const std::optional<Tensor>& bias);

// Gradients for input, weight_v, weight_h; one not asked for in output_mask is an empty tensor.
std::tuple<Tensor, Tensor, Tensor> sep_conv_depthwise_backward(const SepConvShape& s, const Tensor& grad_out,
                                                               const Tensor& input, const Tensor& weight_v,
                                                               const Tensor& weight_h, std::array<bool, 3> output_mask);

}  // namespace sep_conv
}  // namespace lowrank
