// sep_conv's depthwise case on CPU: groups == C == K == N, so every channel is filtered on its own
// by a (dv x 1) and then a (1 x dh) filter (the spatial part of CP and Jaderberg scheme-1 layers).
// The general kernel's per-group GEMMs degenerate to 1 x 1 products there, so this case gets its
// own direct kernel: one output row (channels_last) or one channel plane (NCHW) at a time, the
// intermediate kept in a per-thread row buffer, vectorized over channels (channels_last) or
// columns (NCHW) by plain loops the compiler vectorizes for whatever -march the build uses.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>

namespace lowrank {

// True when sep_conv's (already validated) arguments are the depthwise case handled here.
bool sep_conv_is_depthwise(const at::Tensor& input, const at::Tensor& weight_v, const at::Tensor& weight_h,
                           int64_t groups);

at::Tensor sep_conv_depthwise_forward(const at::Tensor& input, const at::Tensor& weight_v, const at::Tensor& weight_h,
                                      const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                      at::IntArrayRef padding, at::IntArrayRef dilation);

// Gradients for input, weight_v, weight_h; one not asked for in output_mask is an empty tensor.
std::tuple<at::Tensor, at::Tensor, at::Tensor> sep_conv_depthwise_backward(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight_v, const at::Tensor& weight_h,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, std::array<bool, 3> output_mask);

}  // namespace lowrank
