#include "chunk_pool.h"

#include <algorithm>
#include <iterator>

#include "backend.h"

namespace sleepd {
namespace {

// Chunks of every live pool, by base address, so that a free from any thread
// finds its pool. torch's hooks carry no user pointer, so this lookup (and the
// per-thread active pool) has to be process-wide.
std::mutex registry_mutex;
std::map<uintptr_t, std::pair<size_t, ChunkPool*>> registry;
// Pools nest (vLLM opens a kv_cache pool inside a runtime pool): the innermost
// serves, and closing it hands the thread back to the one around it.
thread_local std::vector<ChunkPool*> active_pools;

void forget(ChunkPool* pool) {
  active_pools.erase(std::remove(active_pools.begin(), active_pools.end(), pool), active_pools.end());
}

}  // namespace

ChunkPool::ChunkPool(Refill refill, size_t chunk_bytes, size_t alignment)
    : refill_(std::move(refill)), chunk_bytes_(chunk_bytes), alignment_(std::max<size_t>(alignment, 1)) {}

ChunkPool::~ChunkPool() {
  forget(this);
  std::lock_guard<std::mutex> lock(registry_mutex);
  for (auto& [base, size] : chunks_) registry.erase(base);
}

uintptr_t ChunkPool::allocate(size_t size) {
  size_t length = (std::max<size_t>(size, 1) + alignment_ - 1) / alignment_ * alignment_;
  std::unique_lock<std::mutex> lock(mutex_);
  // Best fit keeps large extents whole for large tensors.
  auto best = free_.end();
  for (auto it = free_.begin(); it != free_.end(); ++it)
    if (it->second >= length && (best == free_.end() || it->second < best->second)) best = it;
  if (best == free_.end()) {
    lock.unlock();  // the refill talks to the daemon; other threads may free meanwhile
    auto [base, chunk] = refill_(std::max(length, chunk_bytes_));
    if (chunk < length) throw OutOfMemory("chunk pool: the daemon returned a chunk smaller than asked");
    {
      std::lock_guard<std::mutex> registry_lock(registry_mutex);
      registry[base] = {chunk, this};
    }
    lock.lock();
    chunks_.emplace_back(base, chunk);
    best = free_.emplace(base, chunk).first;
  }
  uintptr_t address = best->first;
  size_t remaining = best->second - length;
  free_.erase(best);
  if (remaining) free_.emplace(address + length, remaining);
  allocated_.emplace(address, length);
  return address;
}

void ChunkPool::deallocate(uintptr_t address) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = allocated_.find(address);
  if (it == allocated_.end()) throw BackendError("chunk pool: free of an address it did not allocate");
  size_t length = it->second;
  allocated_.erase(it);
  auto inserted = free_.emplace(address, length).first;
  // Merge with the following and the preceding extent when they touch, inside one chunk.
  auto same_chunk = [&](uintptr_t a, uintptr_t b) {
    for (auto& [base, size] : chunks_)
      if (a >= base && a < base + size) return b >= base && b < base + size;
    return false;
  };
  auto next = std::next(inserted);
  if (next != free_.end() && inserted->first + inserted->second == next->first && same_chunk(inserted->first, next->first)) {
    inserted->second += next->second;
    free_.erase(next);
  }
  if (inserted != free_.begin()) {
    auto prev = std::prev(inserted);
    if (prev->first + prev->second == inserted->first && same_chunk(prev->first, inserted->first)) {
      prev->second += inserted->second;
      free_.erase(inserted);
    }
  }
}

size_t ChunkPool::chunk_count() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return chunks_.size();
}

size_t ChunkPool::bytes_in_use() const {
  std::lock_guard<std::mutex> lock(mutex_);
  size_t total = 0;
  for (auto& [address, length] : allocated_) total += length;
  return total;
}

void ChunkPool::activate() { active_pools.push_back(this); }

void ChunkPool::deactivate() {
  auto innermost = std::find(active_pools.rbegin(), active_pools.rend(), this);
  if (innermost != active_pools.rend()) active_pools.erase(std::next(innermost).base());
}

ChunkPool* ChunkPool::active() { return active_pools.empty() ? nullptr : active_pools.back(); }

ChunkPool* ChunkPool::owner(uintptr_t address) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  auto it = registry.upper_bound(address);
  if (it == registry.begin()) return nullptr;
  --it;
  return address < it->first + it->second.first ? it->second.second : nullptr;
}

}  // namespace sleepd
