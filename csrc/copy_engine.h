// Bulk copies between host memory and files, split across threads for large sizes,
// and the checksums (checksum.h) of what they write into the host pool and read back.
#pragma once

#include <cstddef>
#include <cstdint>

#include "checksum.h"

namespace sleepd {

// Copies `size` bytes using up to `threads` threads (0 picks a count from the
// size and the machine). Small copies run on the calling thread.
void parallel_copy(void* dst, const void* src, size_t size, unsigned threads = 0);

// Reads `size` bytes of `fd` at `offset` into `dst`, split across threads, and returns the
// checksums of what it wrote at `dst`, each part taken as soon as it is read, while it is in cache.
Checksums parallel_pread(int fd, size_t offset, void* dst, size_t size, unsigned threads = 0);
// Writes all of `src` to `fd` at `offset`, retrying short writes. With `checksums`, checks the
// bytes at `src` against them on the way, part by part as each is written, and raises
// ChecksumMismatch at the first block that differs (written, as is all before it).
void pwrite_all(int fd, size_t offset, const void* src, size_t size, const Checksums* checksums = nullptr);

// The checksums of the blocks of `size` bytes at `data` into out[0...], split across threads.
void take_checksums(const void* data, size_t size, uint32_t* out);
// Checks the blocks of `size` bytes at `data` against checksums[first...], split across threads;
// ChecksumMismatch names the first block that differs, counted from checksums[0].
void check_checksums(const void* data, size_t size, const Checksums& checksums, size_t first);
// Seconds this process has spent checking checksums (pwrite_all's and check_checksums'), all threads added up.
double checking_seconds();

}  // namespace sleepd
