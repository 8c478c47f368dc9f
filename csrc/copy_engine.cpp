#include "copy_engine.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "backend.h"

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

void parallel_pread(int fd, size_t offset, void* dst, size_t size, unsigned threads) {
  auto* d = static_cast<char*>(dst);
  std::atomic<int> error{0};
  split(size, thread_count(size, threads), [&, d](size_t start, size_t length) {
    while (length > 0 && error.load() == 0) {
      ssize_t got = pread(fd, d + start, length, static_cast<off_t>(offset + start));
      if (got < 0 && errno == EINTR) continue;
      if (got <= 0) {
        error = got < 0 ? errno : EIO;  // a short file is as wrong as a failed read
        return;
      }
      start += static_cast<size_t>(got);
      length -= static_cast<size_t>(got);
    }
  });
  if (error) throw BackendError(std::string("copy: pread: ") + std::strerror(error));
}

void pwrite_all(int fd, size_t offset, const void* src, size_t size) {
  const auto* s = static_cast<const char*>(src);
  // One writer: tmpfs serialises writes to a file, so threads would only queue.
  while (size > 0) {
    ssize_t put = pwrite(fd, s, size, static_cast<off_t>(offset));
    if (put < 0 && errno == EINTR) continue;
    if (put <= 0) throw BackendError(std::string("copy: pwrite: ") + std::strerror(put < 0 ? errno : EIO));
    s += put;
    offset += static_cast<size_t>(put);
    size -= static_cast<size_t>(put);
  }
}

}  // namespace sleepd
