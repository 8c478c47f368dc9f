// Where a ChunkPool's new chunks come from in an engine: a region allocated by
// the daemon over the fd socket, imported and mapped here, all in C++.
//
// torch calls the allocator hooks holding its allocator lock. A refill that
// took the GIL there would deadlock with any thread that holds the GIL and
// frees a tensor (which takes the same lock), so nothing here touches Python.
// The client learns of the regions afterwards: take_landed() hands them over.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "backend.h"
#include "fd_channel.h"

namespace sleepd {

// A region the daemon allocated and this process mapped, not yet known to Python.
struct LandedRegion {
  int64_t id;
  size_t size;
  size_t mapped_size;
  uintptr_t address;
  Handle handle;
};

class DaemonRefill {
 public:
  // `device_pid` > 0 on a token backend (ACL): the id the daemon authorises to import. Each
  // request waits `answer_seconds` for its answer; one refused because the model is busy (a
  // sleep or wake is running) is sent again until `busy_seconds` have passed.
  DaemonRefill(std::shared_ptr<FdChannel> channel, std::shared_ptr<Backend> backend, int device,
               std::string tag, int64_t device_pid, double answer_seconds, double busy_seconds);

  // A new mapped region of at least `bytes`: (address, mapped size). Throws
  // OutOfMemory with the daemon's reason when it refuses.
  std::pair<uintptr_t, size_t> operator()(size_t bytes);
  // After the client reconnected to a restarted daemon: its new connection.
  void use_channel(std::shared_ptr<FdChannel> channel);

  std::vector<LandedRegion> take_landed();
  // Regions the daemon allocated that could not be mapped here: the client frees them.
  std::vector<int64_t> take_unmapped();
  // Whether a refill is between its request and take_landed(): a region the daemon
  // names may be on its way.
  bool busy();

 private:
  std::pair<uintptr_t, size_t> map_allocated(int64_t id, size_t size, size_t mapped_size, const Shareable& memory);

  std::shared_ptr<FdChannel> channel_;  // guarded by mutex_
  std::shared_ptr<Backend> backend_;
  int device_;
  std::string request_prefix_;  // the JSON request up to its size
  double answer_seconds_;
  double busy_seconds_;
  std::mutex mutex_;
  int in_flight_ = 0;
  std::vector<LandedRegion> landed_;
  std::vector<int64_t> unmapped_;
};

}  // namespace sleepd
