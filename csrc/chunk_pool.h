// Sub-allocation of torch's CUDA allocations from a few large daemon regions.
//
// torch's caching allocator asks the pluggable allocator for segments; giving
// each segment its own daemon region would mean thousands of handles per model.
// A ChunkPool instead carves allocations out of large chunks, and asks for a
// new chunk (a daemon region) only when none has room.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <unordered_map>
#include <utility>
#include <vector>

namespace sleepd {

class ChunkPool {
 public:
  // Returns (address, size) of a new mapped chunk of at least `bytes`.
  using Refill = std::function<std::pair<uintptr_t, size_t>(size_t bytes)>;

  ChunkPool(Refill refill, size_t chunk_bytes, size_t alignment);
  ~ChunkPool();

  uintptr_t allocate(size_t size);
  void deallocate(uintptr_t address);

  size_t chunk_count() const;
  size_t bytes_in_use() const;

  // The pool that serves this thread's allocations through the C hooks.
  void activate();
  void deactivate();
  static ChunkPool* active();
  // The pool that owns `address`, whichever thread frees it.
  static ChunkPool* owner(uintptr_t address);

 private:
  Refill refill_;
  size_t chunk_bytes_;
  size_t alignment_;
  mutable std::mutex mutex_;
  std::vector<std::pair<uintptr_t, size_t>> chunks_;
  std::map<uintptr_t, size_t> free_;                 // address -> length, coalesced
  std::unordered_map<uintptr_t, size_t> allocated_;  // address -> length
};

}  // namespace sleepd
