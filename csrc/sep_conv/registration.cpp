// The sep_conv op schemas and their CPU kernels (the `lowrank` namespace itself is defined in
// csrc/lowrank.cpp).
#include <torch/library.h>

#include "depthwise.h"
#include "sep_conv.h"

namespace lowrank {
namespace sep_conv {
namespace {

Tensor sep_conv_cpu(const Tensor& input, const Tensor& weight_v, const Tensor& weight_h,
                    const std::optional<Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                    at::IntArrayRef dilation, int64_t groups) {
  const SepConvShape s = check_sep_conv(input, weight_v, weight_h, bias, stride, padding, dilation, groups);
  if (sep_conv_is_depthwise(s))  // one filter pair per channel: depthwise.cpp
    return sep_conv_depthwise_forward(s, input, weight_v, weight_h, bias);
  return forward(s, input, weight_v, weight_h, bias);
}

std::tuple<Tensor, Tensor, Tensor> sep_conv_backward_cpu(const Tensor& grad_out, const Tensor& input,
                                                         const Tensor& weight_v, const Tensor& weight_h,
                                                         at::IntArrayRef stride, at::IntArrayRef padding,
                                                         at::IntArrayRef dilation, int64_t groups,
                                                         std::array<bool, 3> output_mask) {
  const SepConvShape s = check_sep_conv(input, weight_v, weight_h, std::nullopt, stride, padding, dilation, groups);
  TORCH_CHECK_VALUE(grad_out.dim() == 4 && grad_out.size(0) == s.batch && grad_out.size(1) == s.out_channels &&
                        grad_out.size(2) == s.out_height && grad_out.size(3) == s.out_width,
                    "sep_conv_backward: grad_out has shape ", grad_out.sizes(), ", expected [", s.batch, ", ",
                    s.out_channels, ", ", s.out_height, ", ", s.out_width, "]");
  if (sep_conv_is_depthwise(s)) return sep_conv_depthwise_backward(s, grad_out, input, weight_v, weight_h, output_mask);
  return backward(s, grad_out, input, weight_v, weight_h, output_mask);
}

}  // namespace
}  // namespace sep_conv

TORCH_LIBRARY_FRAGMENT(lowrank, m) {
  m.def(
      "sep_conv(Tensor input, Tensor weight_v, Tensor weight_h, Tensor? bias, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups) -> Tensor");
  // Gradients for input, weight_v, weight_h (bias is a sum in Python). A gradient not asked
  // for in output_mask comes back as an empty tensor.
  m.def(
      "sep_conv_backward(Tensor grad_out, Tensor input, Tensor weight_v, Tensor weight_h, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(lowrank, CPU, m) {
  m.impl("sep_conv", &sep_conv::sep_conv_cpu);
  m.impl("sep_conv_backward", &sep_conv::sep_conv_backward_cpu);
}

}  // namespace lowrank
