// Bulk copies between host mappings, split across threads for large sizes.
#pragma once

#include <cstddef>
#include <cstdint>

namespace sleepd {

// Copies `size` bytes using up to `threads` threads (0 picks a count from the
// size and the machine). Small copies run on the calling thread.
void parallel_copy(void* dst, const void* src, size_t size, unsigned threads = 0);
void parallel_zero(void* dst, size_t size, unsigned threads = 0);

}  // namespace sleepd
