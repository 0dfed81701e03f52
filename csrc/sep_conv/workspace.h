// Scratch memory of the CPU sep_conv kernels, kept per thread between calls.
//
// Fresh buffers were page-faulted on every call (glibc returns blocks above its trim threshold to
// the kernel), which showed up as a large share of small calls. Each thread therefore keeps one
// buffer per slot (kCall: per-call data such as packed weights, owned by the calling thread;
// kTile: the tile buffers of a worker thread), grown on demand; a buffer above kKeepBytes is
// freed when released. A failed allocation leaves the slot empty (size 0) and throws; a slot
// already in use on this thread (a nested call) gets a private allocation instead.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

namespace lowrank {
namespace sep_conv {

class Scratch {
 public:
  struct Kept;  // a thread's buffer of one slot
  enum Slot { kCall = 0, kTile = 1 };
  static constexpr size_t kKeepBytes = size_t(64) << 20;

  Scratch(Slot slot, size_t bytes);
  ~Scratch();
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;

  // The next `count` elements of type T (64-byte aligned), carved from the buffer in order.
  template <typename T>
  T* take(int64_t count) {
    T* p = reinterpret_cast<T*>(base_ + used_);
    used_ += round_up(size_t(count) * sizeof(T));
    check(used_);
    return p;
  }
  // Bytes that take() uses for `count` elements of type T (to size the constructor's request).
  template <typename T>
  static size_t bytes_for(int64_t count) {
    return round_up(size_t(count) * sizeof(T));
  }

 private:
  static size_t round_up(size_t bytes) { return (bytes + 63) / 64 * 64; }
  void check(size_t used) const;

  Kept* kept_ = nullptr;              // the thread's slot, if this Scratch holds it
  std::unique_ptr<std::byte[]> own_;  // private allocation otherwise
  std::byte* base_ = nullptr;
  size_t size_ = 0, used_ = 0;
};

}  // namespace sep_conv
}  // namespace lowrank
