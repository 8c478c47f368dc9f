// Bulk device copies as the GPU and NPU backends issue them: in chunks, round-robin
// over a thread's streams, so that several DMA transfers are in flight at once, while
// the host checksums the chunks that have landed or are about to leave.
#pragma once

#include <algorithm>
#include <cstddef>
#include <vector>

#include "checksum.h"
#include "copy_engine.h"

namespace sleepd {

constexpr size_t kStreamChunk = 64u << 20;
static_assert(kStreamChunk % kChecksumBlock == 0, "a chunk holds whole checksum blocks");

// A chunk's host work where there is none (before or after a chunk of a zero-fill).
constexpr auto kNoHostWork = [](size_t, size_t) {};

// The host work after each chunk of a copy to `host` has landed: its checksums, into `checksums`.
inline auto taking_checksums(const char* host, Checksums& checksums) {
  return [host, &checksums](size_t at, size_t length) {
    take_checksums(host + at, length, &checksums[at / kChecksumBlock]);
  };
}

// The host work before each chunk of a copy from `host` is issued: checking it against `checksums`, if any.
inline auto checking_checksums(const char* host, const Checksums* checksums) {
  return [host, checksums](size_t at, size_t length) {
    if (checksums) check_checksums(host + at, length, *checksums, at / kChecksumBlock);
  };
}

// Calls issue(offset, length, stream) for each chunk of `size` bytes, with one chunk in
// flight on each stream: before(offset, length) runs just before its chunk is issued, and
// landed(offset, length) once its chunk has completed, in order, while the chunks after it
// are in flight. synchronize(stream, check) waits for a stream. If anything fails, it still
// waits for every stream (check false: the first error is the one reported), because chunks
// already queued use a mapping the caller drops afterwards, and rethrows.
template <typename Stream, typename Issue, typename Synchronize, typename Before, typename Landed>
void issue_in_chunks(const std::vector<Stream>& streams, size_t size, Issue issue, Synchronize synchronize,
                     Before before, Landed landed) {
  size_t count = (size + kStreamChunk - 1) / kStreamChunk, lanes = streams.size();
  auto at = [&](size_t index) { return index * kStreamChunk; };
  auto length = [&](size_t index) { return std::min(kStreamChunk, size - index * kStreamChunk); };
  try {
    for (size_t index = 0; index < count; ++index) {
      Stream stream = streams[index % lanes];
      if (index >= lanes) synchronize(stream, true);  // the stream's last chunk, index - lanes, has landed
      before(at(index), length(index));
      issue(at(index), length(index), stream);
      if (index >= lanes) landed(at(index - lanes), length(index - lanes));
    }
    for (size_t index = count > lanes ? count - lanes : 0; index < count; ++index) {
      synchronize(streams[index % lanes], true);
      landed(at(index), length(index));
    }
  } catch (...) {
    for (Stream stream : streams) synchronize(stream, false);
    throw;
  }
}

}  // namespace sleepd
