#include "fd_channel.h"

#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <system_error>

namespace sleepd {
namespace {

// As common/wire.py: a message is at most MAX_MESSAGE bytes with at most MAX_FDS descriptors.
constexpr size_t kMaxMessage = 64 * 1024;
constexpr size_t kMaxFds = 253;

[[noreturn]] void fail(const char* call) { throw std::system_error(errno, std::generic_category(), call); }

void send_packet(int fd, const std::string& data, const std::vector<int>& fds) {
  iovec iov{const_cast<char*>(data.data()), data.size()};
  msghdr message{};
  message.msg_iov = &iov;
  message.msg_iovlen = 1;
  std::vector<char> control(fds.empty() ? 0 : CMSG_SPACE(fds.size() * sizeof(int)));
  if (!fds.empty()) {
    message.msg_control = control.data();
    message.msg_controllen = control.size();
    cmsghdr* header = CMSG_FIRSTHDR(&message);
    header->cmsg_level = SOL_SOCKET;
    header->cmsg_type = SCM_RIGHTS;
    header->cmsg_len = CMSG_LEN(fds.size() * sizeof(int));
    std::memcpy(CMSG_DATA(header), fds.data(), fds.size() * sizeof(int));
  }
  while (sendmsg(fd, &message, MSG_NOSIGNAL) < 0) {
    if (errno == EPIPE) return;  // the daemon refused us and closed; its reason waits to be read
    if (errno != EINTR) fail("sendmsg on the fd socket");
  }
}

Packet receive_packet(int fd) {
  Packet packet;
  std::vector<char> buffer(kMaxMessage + 1);
  std::vector<char> control(CMSG_SPACE(kMaxFds * sizeof(int)));
  iovec iov{buffer.data(), buffer.size()};
  msghdr message{};
  message.msg_iov = &iov;
  message.msg_iovlen = 1;
  message.msg_control = control.data();
  message.msg_controllen = control.size();
  ssize_t received;
  while ((received = recvmsg(fd, &message, MSG_CMSG_CLOEXEC)) < 0) {
    if (errno == ECONNRESET) continue;  // our request was unread when it closed: its reason comes next
    if (errno != EINTR) fail("recvmsg on the fd socket");
  }
  for (cmsghdr* header = CMSG_FIRSTHDR(&message); header; header = CMSG_NXTHDR(&message, header)) {
    if (header->cmsg_level != SOL_SOCKET || header->cmsg_type != SCM_RIGHTS) continue;
    size_t count = (header->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    const int* fds = reinterpret_cast<const int*>(CMSG_DATA(header));
    packet.fds.insert(packet.fds.end(), fds, fds + count);
  }
  packet.data.assign(buffer.data(), static_cast<size_t>(received));
  packet.truncated = (message.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) || packet.data.size() > kMaxMessage;
  return packet;
}

}  // namespace

FdChannel::FdChannel(int fd) : fd_(fd) {}

FdChannel::~FdChannel() {
  if (fd_ >= 0) ::close(fd_);
}

Packet FdChannel::exchange(const std::string& request, const std::vector<int>& fds, double timeout_seconds) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (fd_ < 0 || broken_) return Packet{};  // closed: read as the daemon having gone
  send_packet(fd_, request, fds);
  auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_seconds);
  while (true) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    pollfd ready{fd_, POLLIN, 0};
    int polled = poll(&ready, 1, static_cast<int>(std::max<int64_t>(left.count(), 0)));
    if (polled < 0 && errno == EINTR) continue;
    if (polled < 0) fail("poll on the fd socket");
    if (polled == 0) {
      // Shut down, not closed: close() may be reading the number, and a closed one can be reused at once.
      shutdown(fd_, SHUT_RDWR);
      broken_ = true;
      throw ChannelTimeout("no answer on the fd socket");
    }
    return receive_packet(fd_);
  }
}

void FdChannel::close() {
  if (closing_.exchange(true)) return;  // once: a second caller could shut down a reused descriptor
  int fd = fd_.load();
  if (fd >= 0) shutdown(fd, SHUT_RDWR);  // wakes a thread in exchange(), which then reads a closed connection
  std::lock_guard<std::mutex> lock(mutex_);
  if (fd_ >= 0) ::close(fd_.exchange(-1));
}

}  // namespace sleepd
