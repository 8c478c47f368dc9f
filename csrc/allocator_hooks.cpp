// The C entry points torch's CUDAPluggableAllocator calls, with the signatures
// it requires. They serve allocations from the calling thread's active
// ChunkPool (SleepClient.pool makes it active) and never throw into torch.
#include <sys/types.h>

#include <cstdio>
#include <exception>

#include "chunk_pool.h"

using sleepd::ChunkPool;

extern "C" {

__attribute__((visibility("default"))) void* sleepd_malloc(ssize_t size, int /*device*/, void* /*stream*/) {
  ChunkPool* pool = ChunkPool::active();
  if (!pool) {
    std::fprintf(stderr, "sleepd: an allocation reached sleepd's allocator outside SleepClient.pool()\n");
    return nullptr;
  }
  try {
    return reinterpret_cast<void*>(pool->allocate(static_cast<size_t>(size)));
  } catch (const std::exception& error) {
    std::fprintf(stderr, "sleepd: allocation of %zd bytes failed: %s\n", size, error.what());
    return nullptr;  // torch reports an out-of-memory error
  }
}

__attribute__((visibility("default"))) void sleepd_free(void* ptr, ssize_t /*size*/, int /*device*/, void* /*stream*/) {
  ChunkPool* pool = ChunkPool::owner(reinterpret_cast<uintptr_t>(ptr));
  if (!pool) {
    std::fprintf(stderr, "sleepd: free of %p, which no live pool owns\n", ptr);
    return;
  }
  try {
    pool->deallocate(reinterpret_cast<uintptr_t>(ptr));
  } catch (const std::exception& error) {
    std::fprintf(stderr, "sleepd: free of %p failed: %s\n", ptr, error.what());
  }
}

}  // extern "C"
