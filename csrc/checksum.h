// Checksums of backups: CRC32C (Castagnoli), on the CPU's CRC32 instructions
// (x86-64 SSE4.2) where it has them, else a portable table-driven loop that
// gives the same values.
//
// A copy into the host pool takes one checksum per kChecksumBlock bytes of what
// it wrote (the last block of a copy shorter), and a copy back checks the bytes
// against them: a mismatch names the block, so a wake can say where a backup
// went bad.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "backend.h"

namespace sleepd {

constexpr size_t kChecksumBlock = 16u << 20;

// How many checksums cover a copy of `size` bytes.
inline size_t checksum_count(size_t size) { return (size + kChecksumBlock - 1) / kChecksumBlock; }

// CRC32C of `size` bytes at `data`, continuing `crc` (the CRC32C of the bytes
// before them; 0 to start).
uint32_t crc32c(const void* data, size_t size, uint32_t crc = 0);
// The same, always on the portable loop (what runs on a CPU without the instructions).
uint32_t crc32c_portable(const void* data, size_t size, uint32_t crc = 0);
// Whether crc32c() runs on the CPU's instructions here.
bool crc32c_in_hardware();

// The CRC32C of each kChecksumBlock of `length` bytes of file `fd` from `offset` (the last block
// shorter), as a copy into the host pool takes them: what the daemon checks a backup with after a
// resume. Reads with pread, never a mapping, so a file cut short meanwhile raises BackendError
// instead of faulting the caller.
std::vector<uint32_t> checksum_file(int fd, size_t offset, size_t length);

// Raised by a copy that checks a backup: the bytes of block `block` (from the copy's
// start) do not match the checksum taken when they were written.
struct ChecksumMismatch : BackendError {
  ChecksumMismatch(size_t block, uint32_t expected, uint32_t found);
  size_t block;
};

// Checks the CRC32C of a block against `checksums` (which must cover the copy), raising ChecksumMismatch.
void check_block(const Checksums& checksums, size_t block, uint32_t found);

}  // namespace sleepd
