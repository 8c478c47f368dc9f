#include "copy_engine.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
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
// What a copy moves before it checksums it: small enough to be still in the core's cache.
constexpr size_t kInCache = 512u << 10;
constexpr size_t kPage = 4096;

// Time spent checking backups against their checksums, all threads together: what verification
// costs, reported beside the bytes checked. Adding to it takes a few ns per 512 KiB checked.
std::atomic<uint64_t> checking_ns{0};

class CheckingTime {
 public:
  CheckingTime() : start_(std::chrono::steady_clock::now()) {}
  ~CheckingTime() {
    checking_ns += static_cast<uint64_t>(
        std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start_).count());
  }

 private:
  std::chrono::steady_clock::time_point start_;
};

unsigned thread_count(size_t size, unsigned requested) {
  if (requested != 0) return requested;
  unsigned hw = std::max(1u, std::thread::hardware_concurrency());
  size_t by_size = size / kMinBytesPerThread;
  return static_cast<unsigned>(std::max<size_t>(1, std::min<size_t>({by_size, hw, kMaxThreads})));
}

// Runs `work(offset, length)` over [0, size) in slices that start at multiples of `align`, one per thread.
template <typename Work>
void split(size_t size, unsigned threads, size_t align, Work work) {
  if (threads <= 1) {
    work(0, size);
    return;
  }
  size_t slice = (size / threads + align - 1) / align * align;
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
  split(size, thread_count(size, threads), kPage,
        [=](size_t offset, size_t length) { std::memcpy(d + offset, s + offset, length); });
}

namespace {

// Reads [start, start + length) of `fd` at `offset` into `dst`; false (errno set) if it cannot.
bool pread_range(int fd, size_t offset, char* dst, size_t start, size_t length) {
  while (length > 0) {
    ssize_t got = pread(fd, dst + start, length, static_cast<off_t>(offset + start));
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) {
      if (got == 0) errno = EIO;  // a short file is as wrong as a failed read
      return false;
    }
    start += static_cast<size_t>(got);
    length -= static_cast<size_t>(got);
  }
  return true;
}

}  // namespace

Checksums parallel_pread(int fd, size_t offset, void* dst, size_t size, unsigned threads) {
  auto* d = static_cast<char*>(dst);
  Checksums checksums(checksum_count(size));
  std::atomic<int> error{0};
  // Each thread takes whole blocks, so that each checksum is one thread's.
  split(size, thread_count(size, threads), kChecksumBlock, [&, d](size_t start, size_t length) {
    for (size_t at = start; at < start + length && error.load() == 0; at += kInCache) {
      size_t part = std::min(kInCache, start + length - at);
      if (!pread_range(fd, offset, d, at, part)) {
        error = errno;
        return;
      }
      uint32_t& checksum = checksums[at / kChecksumBlock];
      checksum = crc32c(d + at, part, at % kChecksumBlock == 0 ? 0 : checksum);
    }
  });
  if (error) throw BackendError(std::string("copy: pread: ") + std::strerror(error));
  return checksums;
}

void pwrite_all(int fd, size_t offset, const void* src, size_t size, const Checksums* checksums) {
  const auto* s = static_cast<const char*>(src);
  uint32_t checksum = 0;
  // One writer: tmpfs serialises writes to a file, so threads would only queue.
  for (size_t at = 0; at < size;) {
    size_t part = std::min(kInCache, size - at);
    if (checksums) {
      CheckingTime timed;
      checksum = crc32c(s + at, part, at % kChecksumBlock == 0 ? 0 : checksum);
    }
    for (size_t done = 0; done < part;) {
      ssize_t put = pwrite(fd, s + at + done, part - done, static_cast<off_t>(offset + at + done));
      if (put < 0 && errno == EINTR) continue;
      if (put <= 0) throw BackendError(std::string("copy: pwrite: ") + std::strerror(put < 0 ? errno : EIO));
      done += static_cast<size_t>(put);
    }
    at += part;
    if (checksums && (at % kChecksumBlock == 0 || at == size))
      check_block(*checksums, (at - 1) / kChecksumBlock, checksum);
  }
}

void take_checksums(const void* data, size_t size, uint32_t* out) {
  const auto* d = static_cast<const char*>(data);
  split(size, thread_count(size, 0), kChecksumBlock, [=](size_t start, size_t length) {
    for (size_t at = start; at < start + length; at += kChecksumBlock)
      out[at / kChecksumBlock] = crc32c(d + at, std::min(kChecksumBlock, start + length - at));
  });
}

void check_checksums(const void* data, size_t size, const Checksums& checksums, size_t first) {
  CheckingTime timed;
  Checksums found(checksum_count(size));
  take_checksums(data, size, found.data());
  for (size_t block = 0; block < found.size(); ++block) check_block(checksums, first + block, found[block]);
}

double checking_seconds() { return static_cast<double>(checking_ns.load()) / 1e9; }

}  // namespace sleepd
