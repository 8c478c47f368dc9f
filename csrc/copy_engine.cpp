#include "copy_engine.h"

#include <algorithm>
#include <cstring>
#include <thread>
#include <vector>

namespace sleepd {
namespace {

// Below this a single memcpy beats the cost of starting threads.
constexpr size_t kMinBytesPerThread = 8u << 20;
constexpr unsigned kMaxThreads = 16;

unsigned thread_count(size_t size, unsigned requested) {
  if (requested != 0) return requested;
  unsigned hw = std::max(1u, std::thread::hardware_concurrency());
  size_t by_size = size / kMinBytesPerThread;
  return static_cast<unsigned>(std::max<size_t>(1, std::min<size_t>({by_size, hw, kMaxThreads})));
}

// Runs `work(offset, length)` over [0, size) in page-aligned slices, one per thread.
template <typename Work>
void split(size_t size, unsigned threads, Work work) {
  if (threads <= 1) {
    work(0, size);
    return;
  }
  constexpr size_t kAlign = 4096;
  size_t slice = (size / threads + kAlign - 1) / kAlign * kAlign;
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (size_t offset = 0; offset < size; offset += slice) {
    size_t length = std::min(slice, size - offset);
    pool.emplace_back([=] { work(offset, length); });
  }
  for (auto& t : pool) t.join();
}

}  // namespace

void parallel_copy(void* dst, const void* src, size_t size, unsigned threads) {
  auto* d = static_cast<char*>(dst);
  const auto* s = static_cast<const char*>(src);
  split(size, thread_count(size, threads),
        [=](size_t offset, size_t length) { std::memcpy(d + offset, s + offset, length); });
}

void parallel_zero(void* dst, size_t size, unsigned threads) {
  auto* d = static_cast<char*>(dst);
  split(size, thread_count(size, threads),
        [=](size_t offset, size_t length) { std::memset(d + offset, 0, length); });
}

}  // namespace sleepd
