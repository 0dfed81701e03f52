// Packed weights kept between forward calls while the weights' bytes stay the same.
//
// The forward repacks both weights into its GEMMs' layout on every call; on a deep layer at batch
// 1 that costs as much as the arithmetic. An entry keeps the packed form together with a copy of
// the bytes it was packed from, and a lookup compares the call's weights with that copy (a
// sequential read, several times cheaper than repacking) and repacks on any difference. So a
// result never depends on version counters (writes through `.data` or numpy do not bump them) or
// on data pointers (freed memory is reused): the pointers only find the candidate entry.
//
// All entries together hold at most LOWRANK_WEIGHT_CACHE_MB MiB (default 256; 0 turns the cache
// off; read once); the least recently used entries go first, and weights whose entry would not
// fit, or that change from call to call (training), are packed per call into scratch memory.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>

namespace lowrank {
namespace sep_conv {

// Everything a packing depends on besides the weights' bytes.
struct PackKey {
  int layout;       // which kernel's layout (each kernel names its own)
  int64_t op_size;  // bytes per packed element
  const void* wv;   // where the weights live (finds the entry; the bytes decide)
  const void* wh;
  std::array<int64_t, 13> dims;  // groups, cg, kg, ng, dv, dh, scalar type, the weights' strides
  bool operator==(const PackKey& o) const {
    return layout == o.layout && op_size == o.op_size && wv == o.wv && wh == o.wh && dims == o.dims;
  }
};

class PackedWeightCache {
 public:
  // Packed weights for the dense (non-overlapping) tensors (wv, wh): a cached entry when its copy matches
  // their bytes, else a new entry filled by pack(dst). nullptr when the cache is off, the entry
  // would not fit, or the weights keep changing; the caller then packs into its own buffer.
  static std::shared_ptr<const std::byte> get(const PackKey& key, const at::Tensor& wv, const at::Tensor& wh,
                                              size_t packed_bytes, const std::function<void(std::byte*)>& pack);
  // The cap in bytes (LOWRANK_WEIGHT_CACHE_MB, read once).
  static size_t capacity();
};

}  // namespace sep_conv
}  // namespace lowrank
