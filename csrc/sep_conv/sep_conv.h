// Shared declarations of the CPU sep_conv: the checked shape of a call, how output rows are cut
// into per-thread tiles, and the forward/backward entry points (forward.cpp, backward.cpp) that
// registration.cpp binds to the op schema. Semantics: the result equals
//   t = conv2d(x, weight_v, stride=(sv, 1), padding=(pv, 0), dilation=(lv, 1), groups)
//   y = conv2d(t, weight_h, bias, stride=(1, sh), padding=(0, ph), dilation=(1, lh), groups)
// computed tile by tile, so the (B, K, H', W) intermediate t never exists in full.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cstdint>
#include <optional>
#include <tuple>
#include <utility>

namespace lowrank {
namespace sep_conv {

using at::Tensor;

struct SepConvShape {
  int64_t batch, in_channels, height, width;  // input
  int64_t rank, out_channels, dv, dh, groups;
  int64_t cg, kg, ng;  // channels per group: input, intermediate, output
  int64_t stride_v, stride_h, pad_v, pad_h, dil_v, dil_h;
  int64_t out_height, out_width;
};

// The one C++ place that validates sep_conv arguments (forward and backward share it).
SepConvShape check_sep_conv(const Tensor& input, const Tensor& weight_v, const Tensor& weight_h,
                            const std::optional<Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, int64_t groups);

// How the output rows of one (batch, group) image are cut into tiles. Tile t covers rows
// [t*H'/n, (t+1)*H'/n), so tile heights differ by at most one row.
struct Tiling {
  int64_t per_image = 1;  // tiles per (batch, group) image
  int64_t max_rows = 1;
  int64_t begin(int64_t t, int64_t out_height) const { return t * out_height / per_image; }

  // Where tile number `tile` of a call lies: its image (= b * groups + g), batch b, group g and
  // its index tt among the image's tiles.
  struct Location {
    int64_t image, b, g, tt;
  };
  Location locate(int64_t tile, int64_t groups) const {
    const int64_t image = tile / per_image;
    return {image, image / groups, image % groups, tile % per_image};
  }
};

// Per-thread buffers of about `budget` bytes: the per-core L2 size (LOWRANK_TILE_KB overrides it).
// Taller tiles re-read the weights (streamed once per tile and stage) for more pixels; on VGG-16
// a budget of half the L2 or less gave tiles of 2-3 rows on 14x14/28x28 layers and lost
// 5-30% to the weight traffic, while the tile buffers are streamed once per stage and spill
// to L3 cheaply.
// `passes` = 2 in the backward, whose grad_input scatter runs
// even and odd tiles in separate passes: there a tile must be at least as tall as the
// vertical halo so that tiles two apart never touch the same input rows.
// `at_least` rows per tile overrides the budget, as long as that still leaves a tile per thread.
Tiling choose_tiling(const SepConvShape& s, int64_t bytes_per_row, int64_t passes, int64_t at_least = 1);

// Output rows r in [r0, r1) whose vertical tap i reads an input row inside [0, H): [first, second).
inline std::pair<int64_t, int64_t> valid_rows(const SepConvShape& s, int64_t i, int64_t r0, int64_t r1) {
  const int64_t lo_num = s.pad_v - i * s.dil_v;                 // r*sv >= lo_num
  const int64_t hi_num = s.height - 1 + s.pad_v - i * s.dil_v;  // r*sv <= hi_num
  const int64_t lo = lo_num <= 0 ? 0 : (lo_num + s.stride_v - 1) / s.stride_v;
  const int64_t hi = hi_num < 0 ? 0 : hi_num / s.stride_v + 1;
  const int64_t b = r0 > lo ? r0 : lo, e = r1 < hi ? r1 : hi;
  return {b, e > b ? e : b};
}

// An empty tensor for a large result (see checks_and_tiling.cpp for LOWRANK_HUGE_PAGES).
Tensor empty_result(at::IntArrayRef sizes, const at::TensorOptions& options);

// The op's CPU kernels (arguments already checked into `s`).
Tensor forward(const SepConvShape& s, const Tensor& input, const Tensor& weight_v, const Tensor& weight_h,
               const std::optional<Tensor>& bias);
std::tuple<Tensor, Tensor, Tensor> backward(const SepConvShape& s, const Tensor& grad_out, const Tensor& input,
                                            const Tensor& weight_v, const Tensor& weight_h,
                                            std::array<bool, 3> output_mask);

}  // namespace sep_conv
}  // namespace lowrank
