// Bulk copies between host memory and files, split across threads for large sizes.
#pragma once

#include <cstddef>
#include <cstdint>

namespace sleepd {

// Copies `size` bytes using up to `threads` threads (0 picks a count from the
// size and the machine). Small copies run on the calling thread.
void parallel_copy(void* dst, const void* src, size_t size, unsigned threads = 0);

// Reads `size` bytes of `fd` at `offset` into `dst`, split across threads.
void parallel_pread(int fd, size_t offset, void* dst, size_t size, unsigned threads = 0);
// Writes all of `src` to `fd` at `offset`, retrying short writes.
void pwrite_all(int fd, size_t offset, const void* src, size_t size);

}  // namespace sleepd
