#include "workspace.h"

#include <c10/util/Exception.h>

namespace lowrank {
namespace sep_conv {

struct Scratch::Kept {
  std::unique_ptr<std::byte[]> data;
  size_t size = 0;
  bool in_use = false;
};

namespace {
Scratch::Kept* thread_slots() {
  thread_local Scratch::Kept slots[2];
  return slots;
}
std::byte* aligned(std::byte* p) {
  const auto v = reinterpret_cast<uintptr_t>(p);
  return reinterpret_cast<std::byte*>((v + 63) / 64 * 64);
}
}  // namespace

Scratch::Scratch(Slot slot, size_t bytes) : size_(bytes) {
  Kept& k = thread_slots()[slot];
  if (k.in_use) {
    own_.reset(new std::byte[bytes + 64]);
    base_ = aligned(own_.get());
    return;
  }
  if (k.size < bytes) {
    k.data.reset();
    k.size = 0;  // stays 0 if the allocation below throws
    k.data.reset(new std::byte[bytes + 64]);
    k.size = bytes;
  }
  k.in_use = true;
  kept_ = &k;
  base_ = aligned(k.data.get());
}

Scratch::~Scratch() {
  if (!kept_) return;
  kept_->in_use = false;
  if (kept_->size > kKeepBytes) {
    kept_->data.reset();
    kept_->size = 0;
  }
}

void Scratch::check(size_t used) const {
  TORCH_INTERNAL_ASSERT(used <= size_, "sep_conv: scratch buffer overrun (", used, " > ", size_, " bytes)");
}

}  // namespace sep_conv
}  // namespace lowrank
