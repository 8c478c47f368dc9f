// Bulk device copies as the GPU and NPU backends issue them: in chunks, round-robin
// over a thread's streams, so that several DMA transfers are in flight at once.
#pragma once

#include <algorithm>
#include <cstddef>
#include <vector>

namespace sleepd {

constexpr size_t kStreamChunk = 64u << 20;

// Calls issue(offset, length, stream) for each chunk of `size` bytes, then waits
// for every stream with synchronize(stream, check). If issuing fails, it still
// waits (check false: the first error is the one reported), because chunks
// already queued use a mapping the caller drops afterwards, and rethrows.
template <typename Stream, typename Issue, typename Synchronize>
void issue_in_chunks(const std::vector<Stream>& streams, size_t size, Issue issue, Synchronize synchronize) {
  size_t index = 0;
  try {
    for (size_t offset = 0; offset < size; offset += kStreamChunk, ++index)
      issue(offset, std::min(kStreamChunk, size - offset), streams[index % streams.size()]);
  } catch (...) {
    for (Stream stream : streams) synchronize(stream, false);
    throw;
  }
  for (Stream stream : streams) synchronize(stream, true);
}

}  // namespace sleepd
