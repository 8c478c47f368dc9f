// The engine's end of the fd socket, as one request-reply channel that any
// thread may use without the GIL.
//
// Python's client and the native pool refill (daemon_refill.h) share the one
// connection, which is the engine's session: a second connection would be a
// second, unattached session. So the lock that keeps one request in flight lives
// here, in C++, where a thread inside torch's allocator can take it.
#pragma once

#include <atomic>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

namespace sleepd {

// The daemon did not answer in time; the channel is shut down, since a late
// answer would be taken for the next request's.
struct ChannelTimeout : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Packet {
  std::string data;      // empty with no fds: the daemon closed the connection
  std::vector<int> fds;  // owned by the receiver
  bool truncated = false;
};

class FdChannel {
 public:
  // Takes ownership of `fd`, a connected SOCK_SEQPACKET socket.
  explicit FdChannel(int fd);
  ~FdChannel();
  FdChannel(const FdChannel&) = delete;
  FdChannel& operator=(const FdChannel&) = delete;

  // Sends `request` (with `fds`, which stay the caller's) and returns the reply,
  // waiting at most `timeout_seconds` for it.
  Packet exchange(const std::string& request, const std::vector<int>& fds, double timeout_seconds);
  // Wakes a thread waiting in exchange() and closes the socket.
  void close();

 private:
  std::mutex mutex_;  // one request in flight
  std::atomic<int> fd_;
  std::atomic<bool> closing_{false};
  bool broken_ = false;  // timed out: a late answer would be taken for the next request's
};

}  // namespace sleepd
