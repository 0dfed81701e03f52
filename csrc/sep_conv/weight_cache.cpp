#include "weight_cache.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <list>
#include <mutex>
#include <string>

namespace lowrank {
namespace sep_conv {
namespace {

struct Entry {
  PackKey key;
  std::unique_ptr<std::byte[]> storage;  // the two weight copies, then the packed weights
  size_t wv_bytes = 0, wh_bytes = 0, packed_bytes = 0;
  const std::byte* wv_copy() const { return storage.get(); }
  const std::byte* wh_copy() const { return storage.get() + wv_bytes; }
  std::byte* packed() const { return aligned(storage.get() + wv_bytes + wh_bytes); }
  size_t footprint() const { return wv_bytes + wh_bytes + packed_bytes + 64; }
  static std::byte* aligned(std::byte* p) {
    const auto v = reinterpret_cast<uintptr_t>(p);
    return reinterpret_cast<std::byte*>((v + 63) / 64 * 64);
  }
};

size_t read_capacity() {
  const char* env = std::getenv("LOWRANK_WEIGHT_CACHE_MB");
  if (!env || !*env) return size_t(256) << 20;
  char* end = nullptr;
  const long long mb = std::strtoll(env, &end, 10);
  TORCH_CHECK_VALUE(end && *end == '\0' && mb >= 0,
                    "LOWRANK_WEIGHT_CACHE_MB must be a non-negative integer (MiB; 0 turns the cache off), got '", env,
                    "'");
  return size_t(mb) << 20;
}

// Whether `n` bytes at a and b are equal; large blocks are compared on all threads.
bool same_bytes(const std::byte* a, const std::byte* b, size_t n) {
  constexpr size_t kChunk = size_t(1) << 20;
  if (n <= kChunk || at::in_parallel_region()) return std::memcmp(a, b, n) == 0;
  std::atomic<bool> same{true};
  const int64_t chunks = int64_t((n + kChunk - 1) / kChunk);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end && same.load(std::memory_order_relaxed); ++c) {
      const size_t off = size_t(c) * kChunk, len = std::min(kChunk, n - off);
      if (std::memcmp(a + off, b + off, len) != 0) same.store(false, std::memory_order_relaxed);
    }
  });
  return same.load();
}

// Entries by key, most recently used first. A key whose weights changed on consecutive calls
// (a training loop) keeps no entry: it would copy and repack every call into fresh memory. It is
// tried again every kRetry-th changed call, so weights that stop changing are cached soon after.
class Cache {
 public:
  static constexpr uint32_t kRetry = 16;

  std::shared_ptr<const Entry> find(const PackKey& key) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = locate(key);
    return it == slots_.end() ? nullptr : it->entry;
  }

  void hit(const PackKey& key) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = locate(key);
    if (it != slots_.end()) it->misses = 0;
  }

  // Records that the key's weights changed; whether to pack them into a new entry.
  bool miss(const PackKey& key) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = locate(key);
    if (it == slots_.end()) return true;
    ++it->misses;
    if (it->misses < 2 || it->misses % kRetry == 0) return true;
    drop(*it);
    return false;
  }

  void insert(std::shared_ptr<const Entry> e, size_t cap) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = locate(e->key);
    if (it == slots_.end()) {
      slots_.push_front(Slot{e->key, nullptr, 0});
      it = slots_.begin();
    }
    drop(*it);
    total_ += e->footprint();
    it->entry = std::move(e);
    for (auto victim = std::prev(slots_.end()); total_ > cap && victim != slots_.begin();) {
      auto prev = std::prev(victim);
      drop(*victim);
      slots_.erase(victim);
      victim = prev;
    }
    while (slots_.size() > kMaxSlots) {
      drop(slots_.back());
      slots_.pop_back();
    }
  }

 private:
  static constexpr size_t kMaxSlots = 4096;  // keys without an entry are only a counter
  struct Slot {
    PackKey key;
    std::shared_ptr<const Entry> entry;
    uint32_t misses;
  };

  std::list<Slot>::iterator locate(const PackKey& key) {
    for (auto it = slots_.begin(); it != slots_.end(); ++it)
      if (it->key == key) {
        slots_.splice(slots_.begin(), slots_, it);
        return slots_.begin();
      }
    return slots_.end();
  }
  void drop(Slot& slot) {
    if (!slot.entry) return;
    total_ -= slot.entry->footprint();
    slot.entry.reset();
  }

  std::mutex mu_;
  std::list<Slot> slots_;
  size_t total_ = 0;
};

Cache& cache() {
  static Cache* c = new Cache();  // never destroyed: calls may still run while the process exits
  return *c;
}

}  // namespace

size_t PackedWeightCache::capacity() {
  static const size_t cap = read_capacity();
  return cap;
}

std::shared_ptr<const std::byte> PackedWeightCache::get(const PackKey& key, const at::Tensor& wv, const at::Tensor& wh,
                                                        size_t packed_bytes,
                                                        const std::function<void(std::byte*)>& pack) {
  TORCH_INTERNAL_ASSERT(wv.is_non_overlapping_and_dense() && wh.is_non_overlapping_and_dense());
  // A dense tensor's elements are the nbytes() bytes from its data pointer, in some order (the
  // strides, part of the key, say which).
  const size_t cap = capacity();
  const size_t wv_bytes = wv.nbytes(), wh_bytes = wh.nbytes();
  if (wv_bytes + wh_bytes + packed_bytes + 64 > cap) return nullptr;
  const auto* wv_data = static_cast<const std::byte*>(wv.data_ptr());
  const auto* wh_data = static_cast<const std::byte*>(wh.data_ptr());
  if (auto e = cache().find(key)) {
    if (e->wv_bytes == wv_bytes && e->wh_bytes == wh_bytes && e->packed_bytes == packed_bytes &&
        same_bytes(e->wv_copy(), wv_data, wv_bytes) && same_bytes(e->wh_copy(), wh_data, wh_bytes)) {
      cache().hit(key);
      return std::shared_ptr<const std::byte>(e, e->packed());
    }
  }
  if (!cache().miss(key)) return nullptr;
  auto e = std::make_shared<Entry>();
  e->key = key;
  e->wv_bytes = wv_bytes;
  e->wh_bytes = wh_bytes;
  e->packed_bytes = packed_bytes;
  e->storage.reset(new std::byte[e->footprint()]);
  std::memcpy(e->storage.get(), wv_data, wv_bytes);
  std::memcpy(e->storage.get() + wv_bytes, wh_data, wh_bytes);
  pack(e->packed());
  cache().insert(e, cap);
  return std::shared_ptr<const std::byte>(e, e->packed());
}

}  // namespace sep_conv
}  // namespace lowrank
