// Argument checks and tiling of the CPU sep_conv (declarations in sep_conv.h).
#include "sep_conv.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <string>

#ifdef __linux__
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace lowrank {
namespace sep_conv {

SepConvShape check_sep_conv(const Tensor& input, const Tensor& weight_v, const Tensor& weight_h,
                            const std::optional<Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK_VALUE(stride.size() == 2, "sep_conv: stride must have 2 elements, got ", stride.size());
  TORCH_CHECK_VALUE(padding.size() == 2, "sep_conv: padding must have 2 elements, got ", padding.size());
  TORCH_CHECK_VALUE(dilation.size() == 2, "sep_conv: dilation must have 2 elements, got ", dilation.size());
  TORCH_CHECK_VALUE(input.dim() == 4, "sep_conv: input must be 4-D (B, C, H, W), got ", input.dim(), "-D");
  TORCH_CHECK_VALUE(weight_v.dim() == 4 && weight_v.size(3) == 1,
                    "sep_conv: weight_v must have shape (K, C/groups, dv, 1), got ", weight_v.sizes());
  TORCH_CHECK_VALUE(weight_h.dim() == 4 && weight_h.size(2) == 1,
                    "sep_conv: weight_h must have shape (N, K/groups, 1, dh), got ", weight_h.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(input.scalar_type()), "sep_conv: input must be a floating-point tensor, got ",
                    input.scalar_type());
  TORCH_CHECK_VALUE(weight_v.scalar_type() == input.scalar_type(), "sep_conv: weight_v dtype ", weight_v.scalar_type(),
                    " does not match input dtype ", input.scalar_type());
  TORCH_CHECK_VALUE(weight_h.scalar_type() == input.scalar_type(), "sep_conv: weight_h dtype ", weight_h.scalar_type(),
                    " does not match input dtype ", input.scalar_type());
  TORCH_CHECK_VALUE(weight_v.device() == input.device(), "sep_conv: weight_v is on ", weight_v.device(),
                    " but input is on ", input.device());
  TORCH_CHECK_VALUE(weight_h.device() == input.device(), "sep_conv: weight_h is on ", weight_h.device(),
                    " but input is on ", input.device());
  TORCH_CHECK_VALUE(groups > 0, "sep_conv: groups must be positive, got ", groups);
  for (int i = 0; i < 2; ++i) {
    TORCH_CHECK_VALUE(stride[i] > 0, "sep_conv: stride must be positive, got ", stride);
    TORCH_CHECK_VALUE(dilation[i] > 0, "sep_conv: dilation must be positive, got ", dilation);
    TORCH_CHECK_VALUE(padding[i] >= 0, "sep_conv: padding must be non-negative, got ", padding);
  }
  SepConvShape s;
  s.batch = input.size(0);
  s.in_channels = input.size(1);
  s.height = input.size(2);
  s.width = input.size(3);
  s.rank = weight_v.size(0);
  s.out_channels = weight_h.size(0);
  s.dv = weight_v.size(2);
  s.dh = weight_h.size(3);
  s.groups = groups;
  TORCH_CHECK_VALUE(s.rank > 0 && weight_v.size(1) > 0 && s.dv > 0, "sep_conv: weight_v must not be empty, got shape ",
                    weight_v.sizes());
  TORCH_CHECK_VALUE(weight_h.size(1) > 0 && s.dh > 0, "sep_conv: weight_h must not be empty, got shape ",
                    weight_h.sizes());
  TORCH_CHECK_VALUE(s.in_channels % groups == 0 && weight_v.size(1) * groups == s.in_channels,
                    "sep_conv: weight_v expects ", weight_v.size(1), " input channels per group and groups=", groups,
                    ", but input has ", s.in_channels, " channels");
  TORCH_CHECK_VALUE(s.rank % groups == 0, "sep_conv: weight_v has ", s.rank,
                    " output channels, not divisible by groups=", groups);
  TORCH_CHECK_VALUE(weight_h.size(1) * groups == s.rank, "sep_conv: weight_h expects ", weight_h.size(1),
                    " channels per group (groups=", groups, "), but weight_v produces ", s.rank);
  TORCH_CHECK_VALUE(s.out_channels % groups == 0, "sep_conv: weight_h has ", s.out_channels,
                    " output channels, not divisible by groups=", groups);
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == s.out_channels, "sep_conv: bias must have shape (",
                      s.out_channels, ",), got ", bias->sizes());
    TORCH_CHECK_VALUE(bias->scalar_type() == input.scalar_type(), "sep_conv: bias dtype ", bias->scalar_type(),
                      " does not match input dtype ", input.scalar_type());
    TORCH_CHECK_VALUE(bias->device() == input.device(), "sep_conv: bias is on ", bias->device(), " but input is on ",
                      input.device());
  }
  s.cg = s.in_channels / groups;
  s.kg = s.rank / groups;
  s.ng = s.out_channels / groups;
  s.stride_v = stride[0];
  s.stride_h = stride[1];
  s.pad_v = padding[0];
  s.pad_h = padding[1];
  s.dil_v = dilation[0];
  s.dil_h = dilation[1];
  const int64_t span_v = s.dil_v * (s.dv - 1) + 1, span_h = s.dil_h * (s.dh - 1) + 1;
  TORCH_CHECK_VALUE(s.height + 2 * s.pad_v >= span_v, "sep_conv: weight_v's dilated height ", span_v,
                    " is larger than the padded input height ", s.height + 2 * s.pad_v);
  TORCH_CHECK_VALUE(s.width + 2 * s.pad_h >= span_h, "sep_conv: weight_h's dilated width ", span_h,
                    " is larger than the padded input width ", s.width + 2 * s.pad_h);
  s.out_height = (s.height + 2 * s.pad_v - span_v) / s.stride_v + 1;
  s.out_width = (s.width + 2 * s.pad_h - span_h) / s.stride_h + 1;
  return s;
}

Tiling choose_tiling(const SepConvShape& s, int64_t bytes_per_row, int64_t passes, int64_t at_least) {
  // The budget is the per-core L2 size (512 KiB if unknown); LOWRANK_TILE_KB overrides it
  // (for tuning; read once).
  static const int64_t budget = [] {
    const char* env = std::getenv("LOWRANK_TILE_KB");
    const int64_t kb = env ? std::atoll(env) : 0;
    if (kb > 0) return kb * 1024;
    int64_t l2 = 0;
#ifdef _SC_LEVEL2_CACHE_SIZE
    l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
    return l2 >= (int64_t(128) << 10) && l2 <= (int64_t(64) << 20) ? l2 : int64_t(512) << 10;
  }();
  const int64_t H = s.out_height;
  const int64_t threads = at::get_num_threads(), images = s.batch * s.groups;
  at_least = std::max<int64_t>(1, std::min(at_least, H * images / threads));
  const int64_t min_rows =
      std::max(at_least, passes == 1 ? 1 : std::max<int64_t>(1, (s.dil_v * (s.dv - 1)) / s.stride_v));
  const int64_t max_per_image = std::max<int64_t>(1, H / min_rows);
  const int64_t fit_rows = std::max<int64_t>(1, budget / std::max<int64_t>(1, bytes_per_row));
  int64_t n = std::min(max_per_image, (H + fit_rows - 1) / fit_rows);
  // With few tiles, parallel_for's contiguous chunks only balance if every pass has a
  // multiple of the thread count (this is what keeps both cores busy at batch 1): look for
  // such a count above n, else below it.
  const auto balanced = [&](int64_t cand) { return cand % passes == 0 && (images * cand / passes) % threads == 0; };
  if (threads > 1 && images * n < 16 * threads * passes && !balanced(n)) {
    int64_t found = 0;
    for (int64_t cand = n + 1; cand <= std::min(max_per_image, n + 2 * threads * passes) && !found; ++cand)
      if (balanced(cand)) found = cand;
    for (int64_t cand = n - 1; cand >= 1 && !found; --cand)
      if (balanced(cand)) found = cand;
    if (found) n = found;
  }
  Tiling tiling;
  tiling.per_image = n;
  tiling.max_rows = (H + n - 1) / n;
  return tiling;
}

// An empty tensor for a large result; with LOWRANK_HUGE_PAGES=1, backed by transparent huge
// pages where Linux allows it. glibc serves allocations above 32 MiB with a fresh mmap on every
// call, and faulting it in 4 KiB pages is a large share of a wide early layer's time; huge pages
// fault faster, but on VMs with free-page reporting the host reclaims freed 2 MiB blocks and they
// can be slower (docs/cpu-kernels.md). So it is opt-in, as PyTorch's own THP_MEM_ALLOC_ENABLE is;
// smaller buffers come back already faulted from the heap.
Tensor empty_result(at::IntArrayRef sizes, const at::TensorOptions& options) {
  Tensor t = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  static const bool enabled = [] {  // read once
    const char* env = std::getenv("LOWRANK_HUGE_PAGES");
    return env && std::string(env) == "1";
  }();
  if (enabled && t.nbytes() >= (size_t(32) << 20)) {
    const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
    const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1), last = (begin + t.nbytes()) & ~(kHuge - 1);
    // Advice only: if the kernel refuses, the memory is still ordinary memory.
    if (last > first) (void)madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#endif
  return t;
}

}  // namespace sep_conv
}  // namespace lowrank
