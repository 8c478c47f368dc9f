#include "daemon_refill.h"

#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <map>
#include <thread>

namespace sleepd {
namespace {

// The daemon's replies as far as a refill reads them: one JSON object whose values
// are strings, integers, booleans or null (common/fd_messages.py's Allocated
// and Refused). Anything else is a protocol error.
struct JsonValue {
  enum Kind { Null, Boolean, Integer, String } kind = Null;
  bool boolean = false;
  bool negative = false;
  uint64_t magnitude = 0;  // an integer's absolute value: tokens use all 64 bits
  std::string text;
};

class FlatObjectReader {
 public:
  explicit FlatObjectReader(const std::string& text) : text_(text) {}

  std::map<std::string, JsonValue> read() {
    std::map<std::string, JsonValue> object;
    expect('{');
    if (peek() == '}') return ++at_, object;
    while (true) {
      std::string key = string();
      expect(':');
      object[key] = value();
      if (peek() == '}') return ++at_, object;
      expect(',');
    }
  }

 private:
  [[noreturn]] void bad(const char* what) {
    throw BackendError(std::string("sleepd's fd socket answered nonsense: ") + what);
  }
  char peek() {
    while (at_ < text_.size() && (text_[at_] == ' ' || text_[at_] == '\n' || text_[at_] == '\t' || text_[at_] == '\r'))
      ++at_;
    if (at_ >= text_.size()) bad("the reply ends early");
    return text_[at_];
  }
  void expect(char c) {
    if (peek() != c) bad("the reply is not a flat JSON object");
    ++at_;
  }
  bool literal(const char* word) {
    size_t length = std::char_traits<char>::length(word);
    if (text_.compare(at_, length, word) != 0) return false;
    at_ += length;
    return true;
  }
  JsonValue value() {
    JsonValue result;
    char c = peek();
    if (c == '"') {
      result.kind = JsonValue::String;
      result.text = string();
    } else if (c == '-' || (c >= '0' && c <= '9')) {
      result.kind = JsonValue::Integer;
      result.negative = c == '-';
      if (result.negative) ++at_;
      size_t start = at_;
      while (at_ < text_.size() && text_[at_] >= '0' && text_[at_] <= '9') ++at_;
      try {
        result.magnitude = std::stoull(text_.substr(start, at_ - start));
      } catch (const std::exception&) {
        bad("an integer out of range");
      }
    } else if (literal("true") || literal("false")) {
      result.kind = JsonValue::Boolean;
      result.boolean = text_[at_ - 1] == 'e' && text_[at_ - 2] == 'u';
    } else if (!literal("null")) {
      bad("a value that is no string, integer, boolean or null");
    }
    return result;
  }
  std::string string() {
    expect('"');
    std::string out;
    while (at_ < text_.size() && text_[at_] != '"') {
      char c = text_[at_++];
      if (c != '\\') {
        out += c;
        continue;
      }
      if (at_ >= text_.size()) break;
      char escaped = text_[at_++];
      switch (escaped) {
        case 'n': out += '\n'; break;
        case 't': out += '\t'; break;
        case 'r': out += '\r'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'u': {
          if (at_ + 4 > text_.size()) bad("a truncated \\u escape");
          unsigned code = 0;
          try {
            code = std::stoul(text_.substr(at_, 4), nullptr, 16);
          } catch (const std::exception&) {
            bad("a bad \\u escape");
          }
          at_ += 4;
          // One line for a log; characters past ASCII are not worth a UTF-8 encoder here.
          out += code < 0x80 ? static_cast<char>(code) : '?';
          break;
        }
        default: out += escaped;  // \" \\ \/
      }
    }
    expect('"');
    return out;
  }

  const std::string& text_;
  size_t at_ = 0;
};

std::string json_string(const std::string& text) {
  std::string out = "\"";
  for (char c : text) {
    if (c == '"' || c == '\\') out += '\\';
    if (static_cast<unsigned char>(c) < 0x20) {
      char escaped[8];
      std::snprintf(escaped, sizeof escaped, "\\u%04x", c);
      out += escaped;
    } else {
      out += c;
    }
  }
  return out + "\"";
}

const JsonValue& field(const std::map<std::string, JsonValue>& reply, const std::string& key, JsonValue::Kind kind) {
  auto it = reply.find(key);
  if (it == reply.end() || it->second.kind != kind)
    throw BackendError("sleepd's fd socket answered allocate without a valid " + key);
  return it->second;
}

uint64_t count(const std::map<std::string, JsonValue>& reply, const std::string& key) {
  const JsonValue& value = field(reply, key, JsonValue::Integer);
  if (value.negative) throw BackendError("sleepd's fd socket answered allocate with a negative " + key);
  return value.magnitude;
}

void close_all(const std::vector<int>& fds) {
  for (int fd : fds) ::close(fd);
}

}  // namespace

DaemonRefill::DaemonRefill(std::shared_ptr<FdChannel> channel, std::shared_ptr<Backend> backend, int device,
                           std::string tag, int64_t device_pid, double answer_seconds, double busy_seconds)
    : channel_(std::move(channel)),
      backend_(std::move(backend)),
      device_(device),
      answer_seconds_(answer_seconds),
      busy_seconds_(busy_seconds) {
  request_prefix_ = "{\"op\":\"allocate\",\"tag\":" + json_string(tag) + ",";
  if (device_pid > 0) request_prefix_ += "\"device_pid\":" + std::to_string(device_pid) + ",";
  request_prefix_ += "\"size\":";
}

std::pair<uintptr_t, size_t> DaemonRefill::operator()(size_t bytes) {
  std::shared_ptr<FdChannel> channel;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    ++in_flight_;
    channel = channel_;
  }
  struct Leave {  // a refill that lands has left already, under the lock that recorded it
    DaemonRefill* refill;
    bool left = false;
    ~Leave() {
      if (left) return;
      std::lock_guard<std::mutex> lock(refill->mutex_);
      --refill->in_flight_;
    }
  } leave{this};

  auto give_up = std::chrono::steady_clock::now() + std::chrono::duration<double>(busy_seconds_);
  while (true) {
    Packet reply = channel->exchange(request_prefix_ + std::to_string(bytes) + "}", {}, answer_seconds_);
    struct CloseFds {
      std::vector<int>& fds;
      ~CloseFds() { close_all(fds); }
    } close_fds{reply.fds};
    if (reply.data.empty() && reply.fds.empty()) throw BackendError("sleepd closed the fd socket");
    if (reply.truncated) throw BackendError("sleepd's fd socket answered allocate with a truncated message");
    auto object = FlatObjectReader(reply.data).read();
    if (!field(object, "ok", JsonValue::Boolean).boolean) {
      std::string code = field(object, "code", JsonValue::String).text;
      std::string why = field(object, "error", JsonValue::String).text;
      // ABORTED: the model is busy with a sleep or wake, which ends; the daemon waited a moment already.
      if (code == "ABORTED" && std::chrono::steady_clock::now() < give_up) {
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
        continue;
      }
      if (code == "RESOURCE_EXHAUSTED") throw OutOfMemory(why);
      throw BackendError(code + ": " + why);
    }
    auto id = static_cast<int64_t>(count(object, "region"));
    try {
      auto size = static_cast<size_t>(count(object, "size"));
      auto mapped_size = static_cast<size_t>(count(object, "mapped_size"));
      Shareable memory;
      if (backend_->shares_tokens()) {
        memory.token = count(object, "token");
      } else if (reply.fds.size() == 1) {
        memory.fd = reply.fds[0];
      } else {
        throw BackendError("sleepd's fd socket answered allocate without the region's descriptor");
      }
      auto chunk = map_allocated(id, size, mapped_size, memory);
      leave.left = true;
      return chunk;
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex_);
      unmapped_.push_back(id);  // the daemon holds it for us: the client frees it
      throw;
    }
  }
}

std::pair<uintptr_t, size_t> DaemonRefill::map_allocated(int64_t id, size_t size, size_t mapped_size,
                                                         const Shareable& memory) {
  uintptr_t address = 0;
  Handle handle = 0;
  bool imported = false;
  try {
    address = backend_->reserve(mapped_size);
    handle = backend_->import_handle(memory, device_, mapped_size);
    imported = true;
    backend_->map(address, mapped_size, handle, device_);
  } catch (...) {
    if (imported) backend_->release(handle);
    if (address) backend_->free_reservation(address, mapped_size);
    throw;
  }
  std::lock_guard<std::mutex> lock(mutex_);
  landed_.push_back({id, size, mapped_size, address, handle});
  --in_flight_;
  return {address, mapped_size};
}

void DaemonRefill::use_channel(std::shared_ptr<FdChannel> channel) {
  std::lock_guard<std::mutex> lock(mutex_);
  channel_ = std::move(channel);
}

std::vector<LandedRegion> DaemonRefill::take_landed() {
  std::lock_guard<std::mutex> lock(mutex_);
  return std::exchange(landed_, {});
}

std::vector<int64_t> DaemonRefill::take_unmapped() {
  std::lock_guard<std::mutex> lock(mutex_);
  return std::exchange(unmapped_, {});
}

bool DaemonRefill::busy() {
  std::lock_guard<std::mutex> lock(mutex_);
  return in_flight_ > 0;
}

}  // namespace sleepd
