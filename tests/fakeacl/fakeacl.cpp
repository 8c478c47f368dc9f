// An ACL runtime double: the subset of AscendCL that sleepd uses, implemented
// over memfd and mmap, so that the ACL backend's logic runs in CI where there is
// no NPU. "Device memory" is host shared memory here.
//
// Strict where CANN's acl_rt.h and its API docs say the runtime is:
//  * a handle is exported once (a second export fails), and only a handle this
//    process made with aclrtMallocPhysical (an imported one cannot be exported);
//  * a process that exported never imports, and a process that imported never
//    exports;
//  * a token is imported only by a process whose aclrtDeviceGetBareTgid is on
//    the allow-list aclrtMemSetPidToShareableHandle last set (the list is
//    replaced, not added to), only while the exporter still holds its handle,
//    and at most once per process while that import lives;
//  * aclrtMapMem maps a whole handle at offset 0, inside a reservation that
//    never mixes imported and local handles, or two devices; aclrtUnmapMem and
//    aclrtReleaseMemAddress take the start of a mapping / a bare reservation;
//  * aclrtMemcpy, aclrtMemcpyAsync and aclrtMemsetAsync fail when count exceeds destMax;
//    aclrtMemcpyAsync honours its kind: device to host reads a device mapping and
//    writes host memory, host to device the other way round;
//  * aclrtHostRegister gives the registered memory a device address of its own
//    (another view of the same pages), not the host address;
//  * calls that need a device fail on a thread that never called aclrtSetDevice;
//    aclrtMallocPhysical, export, the allow-list and aclrtFreePhysical need only aclInit;
//  * asynchronous copies run only when their stream or the device is synchronised;
//  * memory lives until the exporter's handle and every importer's handle and
//    mapping are gone (the kernel's reference counting on the memfd gives this).
//
// Configuration (environment):
//   FAKE_ACL_DEVICES    NPUs (default 1)
//   FAKE_ACL_MEMORY     bytes per NPU (default 1 GiB)
//   FAKE_ACL_STATE      directory the processes of one test share tokens through
//   FAKE_ACL_TAG        names this test's memory, which aclrtGetMemInfo counts alone
//   FAKE_ACL_BARE_TGID  what aclrtDeviceGetBareTgid says (default: the pid), as in another PID namespace
//   FAKE_ACL_COUNTERS   directory where each process writes <pid>.json counters
//   FAKE_ACL_CONTROL    a file of key=value lines, re-read on every call; a change resets the counts:
//                         oom_at_malloc=N    the Nth aclrtMallocPhysical from now fails: out of memory
//                         fail_import_pid=P  aclrtMemImportFromShareableHandle fails in process P
//                         fail_map_pid=P     aclrtMapMem fails in process P
//
// aclrtGetMemInfo reports the memory the runtime holds on the current device:
// every memfd this double made there for this test that any process still holds
// open or mapped, each counted once.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <mutex>
#include <set>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "../fakecuda/alive_memory.h"
#include "acl_runtime.h"

using namespace sleepd::acl;

namespace {

// acl_base_rt.h and rt_error_codes.h.
constexpr aclError SUCCESS = 0, UNINITIALIZE = 100001, REPEAT_INITIALIZE = 100002, PARAM_INVALID = 107000,
                   INVALID_DEVICEID = 107001, CONTEXT_NULL = 107002, INVALID_HANDLE = 107017,
                   FEATURE_NOT_SUPPORT = 207000, MEMORY_ALLOCATION = 207001, NO_PERMISSION = 207006;
constexpr size_t kGranularity = 2u << 20;

struct Allocation {
  int fd;
  size_t size;
  int device;
  bool imported;
  uint64_t token = 0;  // exported as, or imported from
  int mappings = 0;
};

struct Reservation {
  size_t size;
  int mapped = 0;      // mappings inside
  int imported = -1;   // what they map while any: 1 imported handles, 0 local ones
  int device = -1;
};

struct Counters {
  long devices_set = 0, mallocs = 0, live_handles = 0, live_created_bytes = 0, exports = 0, pid_sets = 0,
       imports = 0, maps = 0, live_mappings = 0, host_register_calls = 0, copies = 0;
};

std::mutex mutex;
bool initialised = false;
int devices = 1;
size_t memory_per_device = size_t(1) << 30;
size_t used[64];
bool has_exported = false, has_imported = false;
uint64_t next_serial = 0;
std::map<uintptr_t, Reservation> reservations;   // start -> reservation
std::map<uintptr_t, std::pair<Allocation*, uintptr_t>> mappings;  // start -> (memory, its reservation)
std::set<uint64_t> live_imports;
Counters counters;
std::string control_text;
long mallocs_since_control = 0;
thread_local int current_device = -1;
thread_local std::string last_error;

struct Stream {
  int device;
  std::vector<std::function<void()>> work;
};
std::vector<Stream*> streams;

std::string env(const char* name) {
  const char* value = std::getenv(name);
  return value ? value : "";
}

aclError fail(aclError error, const std::string& why) {
  last_error = why;
  return error;
}

// The caller holds `mutex`. A change of the file's contents starts the counts afresh.
std::map<std::string, long> control() {
  std::map<std::string, long> values;
  std::string path = env("FAKE_ACL_CONTROL");
  if (path.empty()) return values;
  std::ifstream file(path);
  std::stringstream text;
  text << file.rdbuf();
  if (text.str() != control_text) {
    control_text = text.str();
    mallocs_since_control = 0;
  }
  std::string line;
  std::istringstream lines(control_text);
  while (std::getline(lines, line)) {
    auto eq = line.find('=');
    if (eq != std::string::npos) values[line.substr(0, eq)] = std::atol(line.c_str() + eq + 1);
  }
  return values;
}

// The caller holds `mutex`.
void write_counters() {
  std::string dir = env("FAKE_ACL_COUNTERS");
  if (dir.empty()) return;
  char json[1024];
  std::snprintf(json, sizeof json,
                "{\"devices_set\": %ld, \"mallocs\": %ld, \"live_handles\": %ld, \"live_created_bytes\": %ld, "
                "\"exports\": %ld, \"pid_sets\": %ld, \"imports\": %ld, \"maps\": %ld, \"live_mappings\": %ld, "
                "\"host_register_calls\": %ld, \"copies\": %ld}\n",
                counters.devices_set, counters.mallocs, counters.live_handles, counters.live_created_bytes,
                counters.exports, counters.pid_sets, counters.imports, counters.maps, counters.live_mappings,
                counters.host_register_calls, counters.copies);
  std::string path = dir + "/" + std::to_string(getpid()) + ".json";
  std::string tmp = path + ".tmp";
  if (FILE* file = std::fopen(tmp.c_str(), "w")) {
    std::fputs(json, file);
    std::fclose(file);
    std::rename(tmp.c_str(), path.c_str());
  }
}

std::string memfd_name(int device) { return "fakeacl:t" + env("FAKE_ACL_TAG") + ":d" + std::to_string(device); }

// Where the processes of a test find a token: "<exporter pid> <fd> <size> <device>" and the allow-list.
std::string token_path(uint64_t token) {
  std::string dir = env("FAKE_ACL_STATE").empty() ? "/tmp" : env("FAKE_ACL_STATE");
  return dir + "/fakeacl-token-" + std::to_string(token);
}

int bare_tgid() { return env("FAKE_ACL_BARE_TGID").empty() ? getpid() : std::atoi(env("FAKE_ACL_BARE_TGID").c_str()); }

aclError device_error() {
  if (!initialised) return fail(UNINITIALIZE, "aclInit was not called");
  if (current_device < 0) return fail(CONTEXT_NULL, "no device set on this thread (aclrtSetDevice)");
  return SUCCESS;
}

// Bytes this test's memory holds on `device`, as the runtime sees it: every memfd
// any process holds open or mapped, each counted once.
size_t held(int device) {
  // A link reads "/memfd:NAME (deleted)", a mapping "/memfd:NAME": never a name with more digits.
  std::string name = "/memfd:" + memfd_name(device);
  return fake_memory::alive_where([&name](const std::string& path) {
    return path == name || path.rfind(name + " ", 0) == 0;
  });
}

void drain(Stream* stream) {
  std::vector<std::function<void()>> work;
  {
    std::lock_guard<std::mutex> lock(mutex);
    work.swap(stream->work);
  }
  for (auto& item : work) item();
}

}  // namespace

extern "C" {

aclError aclInit(const char*) {
  std::lock_guard<std::mutex> lock(mutex);
  if (initialised) return fail(REPEAT_INITIALIZE, "aclInit may be called once per process");
  if (!env("FAKE_ACL_DEVICES").empty()) devices = std::atoi(env("FAKE_ACL_DEVICES").c_str());
  if (!env("FAKE_ACL_MEMORY").empty()) memory_per_device = std::strtoull(env("FAKE_ACL_MEMORY").c_str(), nullptr, 10);
  initialised = true;
  write_counters();
  return SUCCESS;
}

const char* aclGetRecentErrMsg() { return last_error.c_str(); }

aclError aclrtGetDeviceCount(uint32_t* count) {
  if (!initialised) return fail(UNINITIALIZE, "aclInit was not called");
  *count = static_cast<uint32_t>(devices);
  return SUCCESS;
}

aclError aclrtSetDevice(int32_t device) {
  if (!initialised) return fail(UNINITIALIZE, "aclInit was not called");
  if (device < 0 || device >= devices) return fail(INVALID_DEVICEID, "no such device");
  std::lock_guard<std::mutex> lock(mutex);
  current_device = device;
  counters.devices_set++;
  write_counters();
  return SUCCESS;
}

aclError aclrtGetMemInfo(aclrtMemAttr, size_t* free, size_t* total) {
  if (aclError error = device_error()) return error;
  size_t bytes = held(current_device);
  *total = memory_per_device;
  *free = bytes > memory_per_device ? 0 : memory_per_device - bytes;
  return SUCCESS;
}

aclError aclrtMemGetAllocationGranularity(aclrtPhysicalMemProp* prop, aclrtMemGranularityOptions, size_t* granularity) {
  if (!initialised) return fail(UNINITIALIZE, "aclInit was not called");
  if (static_cast<int>(prop->location.id) >= devices) return fail(INVALID_DEVICEID, "no such device");
  *granularity = kGranularity;
  return SUCCESS;
}

aclError aclrtMallocPhysical(aclrtDrvMemHandle* handle, size_t size, const aclrtPhysicalMemProp* prop, uint64_t flags) {
  if (!initialised) return fail(UNINITIALIZE, "aclInit was not called");
  std::lock_guard<std::mutex> lock(mutex);
  int device = static_cast<int>(prop->location.id);
  if (device >= devices || prop->location.type != ACL_MEM_LOCATION_TYPE_DEVICE)
    return fail(INVALID_DEVICEID, "no such device");
  if (size == 0 || size % kGranularity != 0 || flags != 0 || prop->handleType != ACL_MEM_HANDLE_TYPE_NONE ||
      prop->allocationType != ACL_MEM_ALLOCATION_TYPE_PINNED)
    return fail(PARAM_INVALID, "bad size, flags or properties");
  auto faults = control();
  ++mallocs_since_control;
  if (faults.count("oom_at_malloc") && mallocs_since_control == faults["oom_at_malloc"])
    return fail(MEMORY_ALLOCATION, "out of memory (injected)");
  if (used[device] + size > memory_per_device) return fail(MEMORY_ALLOCATION, "out of memory");
  int fd = memfd_create(memfd_name(device).c_str(), MFD_CLOEXEC);
  if (fd < 0 || posix_fallocate(fd, 0, static_cast<off_t>(size)) != 0) {
    if (fd >= 0) close(fd);
    return fail(MEMORY_ALLOCATION, "the host has no room for the double's memory");
  }
  used[device] += size;
  *handle = new Allocation{fd, size, device, false};
  counters.mallocs++;
  counters.live_handles++;
  counters.live_created_bytes += static_cast<long>(size);
  write_counters();
  return SUCCESS;
}

aclError aclrtFreePhysical(aclrtDrvMemHandle handle) {
  std::lock_guard<std::mutex> lock(mutex);
  auto* memory = static_cast<Allocation*>(handle);
  if (!memory) return fail(INVALID_HANDLE, "null handle");
  if (memory->mappings) return fail(PARAM_INVALID, "the handle is still mapped in this process");
  close(memory->fd);
  if (memory->imported) {
    live_imports.erase(memory->token);
  } else {
    used[memory->device] -= memory->size;
    counters.live_created_bytes -= static_cast<long>(memory->size);
    if (memory->token) unlink(token_path(memory->token).c_str());  // no new importer from now on
  }
  counters.live_handles--;
  delete memory;
  write_counters();
  return SUCCESS;
}

aclError aclrtMemExportToShareableHandle(aclrtDrvMemHandle handle, aclrtMemHandleType type, uint64_t flags,
                                         uint64_t* token) {
  std::lock_guard<std::mutex> lock(mutex);
  auto* memory = static_cast<Allocation*>(handle);
  if (type != ACL_MEM_HANDLE_TYPE_NONE || flags > 1) return fail(PARAM_INVALID, "handle type must be NONE");
  if (memory->imported) return fail(FEATURE_NOT_SUPPORT, "only a handle this process allocated can be exported");
  if (has_imported) return fail(FEATURE_NOT_SUPPORT, "a process that imported cannot export");
  if (memory->token) return fail(FEATURE_NOT_SUPPORT, "the handle was exported already");
  memory->token = (static_cast<uint64_t>(getpid()) << 32) | ++next_serial;
  std::ofstream file(token_path(memory->token));
  file << getpid() << ' ' << memory->fd << ' ' << memory->size << ' ' << memory->device << '\n'
       << (flags == 1 ? "any" : "") << '\n';
  has_exported = true;
  *token = memory->token;
  counters.exports++;
  write_counters();
  return SUCCESS;
}

aclError aclrtMemSetPidToShareableHandle(uint64_t token, int32_t* pids, size_t count) {
  std::lock_guard<std::mutex> lock(mutex);
  std::ifstream in(token_path(token));
  std::string owner;
  if (!std::getline(in, owner) || std::atoi(owner.c_str()) != getpid())
    return fail(INVALID_HANDLE, "not a token this process exported");
  std::ofstream out(token_path(token));
  out << owner << '\n';
  for (size_t i = 0; i < count; ++i) out << pids[i] << ' ';
  out << '\n';
  counters.pid_sets++;
  write_counters();
  return SUCCESS;
}

aclError aclrtMemImportFromShareableHandle(uint64_t token, int32_t device, aclrtDrvMemHandle* handle) {
  if (aclError error = device_error()) return error;
  if (device < 0 || device >= devices) return fail(INVALID_DEVICEID, "no such device");
  std::lock_guard<std::mutex> lock(mutex);
  auto faults = control();
  if (faults.count("fail_import_pid") && faults["fail_import_pid"] == getpid())
    return fail(INVALID_HANDLE, "import failed (injected)");
  if (has_exported) return fail(FEATURE_NOT_SUPPORT, "the exporting process cannot import");
  if (live_imports.count(token)) return fail(FEATURE_NOT_SUPPORT, "this process holds an import of the token already");
  std::ifstream in(token_path(token));
  std::string owner, allowed;
  if (!std::getline(in, owner)) return fail(INVALID_HANDLE, "no such token, or its memory was freed");
  std::getline(in, allowed);
  std::istringstream pids(allowed);
  std::string pid;
  bool listed = allowed == "any";
  while (pids >> pid) listed = listed || std::atoi(pid.c_str()) == bare_tgid();
  if (!listed) return fail(NO_PERMISSION, "this process is not on the token's allow-list");
  int exporter = 0, exported_fd = -1, source_device = 0;
  size_t size = 0;
  std::sscanf(owner.c_str(), "%d %d %zu %d", &exporter, &exported_fd, &size, &source_device);
  std::string path = "/proc/" + std::to_string(exporter) + "/fd/" + std::to_string(exported_fd);
  int fd = open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) return fail(INVALID_HANDLE, "the exporter no longer holds the memory");
  *handle = new Allocation{fd, size, source_device, true, token};
  live_imports.insert(token);
  has_imported = true;
  counters.imports++;
  counters.live_handles++;
  write_counters();
  return SUCCESS;
}

aclError aclrtDeviceGetBareTgid(int32_t* pid) {
  if (!initialised) return fail(UNINITIALIZE, "aclInit was not called");
  *pid = bare_tgid();
  return SUCCESS;
}

aclError aclrtReserveMemAddress(void** address, size_t size, size_t alignment, void* expect, uint64_t flags) {
  if (aclError error = device_error()) return error;
  if (size == 0 || size % kGranularity != 0 || expect != nullptr || flags != 0 || alignment % kGranularity != 0)
    return fail(PARAM_INVALID, "bad size, alignment, expected address or flags");
  void* base = mmap(nullptr, size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (base == MAP_FAILED) return fail(MEMORY_ALLOCATION, "no address space");
  std::lock_guard<std::mutex> lock(mutex);
  reservations[reinterpret_cast<uintptr_t>(base)] = Reservation{size};
  *address = base;
  return SUCCESS;
}

aclError aclrtReleaseMemAddress(void* address) {
  if (aclError error = device_error()) return error;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = reservations.find(reinterpret_cast<uintptr_t>(address));
  if (it == reservations.end()) return fail(PARAM_INVALID, "not the start of a reservation");
  if (it->second.mapped) return fail(PARAM_INVALID, "the reservation is still mapped");
  munmap(address, it->second.size);
  reservations.erase(it);
  return SUCCESS;
}

aclError aclrtMapMem(void* address, size_t size, size_t offset, aclrtDrvMemHandle handle, uint64_t flags) {
  if (aclError error = device_error()) return error;
  std::lock_guard<std::mutex> lock(mutex);
  auto faults = control();
  if (faults.count("fail_map_pid") && faults["fail_map_pid"] == getpid()) return fail(PARAM_INVALID, "map failed (injected)");
  auto* memory = static_cast<Allocation*>(handle);
  if (offset != 0 || size != memory->size || flags != 0)
    return fail(PARAM_INVALID, "a mapping covers a whole handle from offset 0");
  auto at = reinterpret_cast<uintptr_t>(address);
  auto it = reservations.upper_bound(at);
  if (it == reservations.begin()) return fail(PARAM_INVALID, "not inside a reservation");
  --it;
  Reservation& r = it->second;
  if (at + size > it->first + r.size) return fail(PARAM_INVALID, "not inside a reservation");
  if (r.mapped && (r.imported != static_cast<int>(memory->imported) || r.device != memory->device))
    return fail(PARAM_INVALID, "a reservation never mixes imported and local handles, or two devices");
  auto next = mappings.lower_bound(at);
  if ((next != mappings.end() && next->first < at + size) ||
      (next != mappings.begin() && std::prev(next)->first + std::prev(next)->second.first->size > at))
    return fail(PARAM_INVALID, "the range is mapped already");
  if (mmap(address, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, memory->fd, 0) == MAP_FAILED)
    return fail(MEMORY_ALLOCATION, "mmap failed");
  r.mapped++;
  r.imported = memory->imported;
  r.device = memory->device;
  mappings[at] = {memory, it->first};
  memory->mappings++;
  counters.maps++;
  counters.live_mappings++;
  write_counters();
  return SUCCESS;
}

aclError aclrtUnmapMem(void* address) {
  if (aclError error = device_error()) return error;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = mappings.find(reinterpret_cast<uintptr_t>(address));
  if (it == mappings.end()) return fail(PARAM_INVALID, "not the start of a mapping");
  Allocation* memory = it->second.first;
  mmap(address, memory->size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0);
  reservations[it->second.second].mapped--;
  memory->mappings--;
  mappings.erase(it);
  counters.live_mappings--;
  write_counters();
  return SUCCESS;
}

aclError aclrtMemcpy(void* dst, size_t dest_max, const void* src, size_t count, aclrtMemcpyKind) {
  if (aclError error = device_error()) return error;
  if (count > dest_max) return fail(PARAM_INVALID, "count exceeds destMax");
  std::memcpy(dst, src, count);
  return SUCCESS;
}

// Whether [address, address + size) lies inside one device mapping of this process (the mutex held).
bool on_device(const void* address, size_t size) {
  auto start = reinterpret_cast<uintptr_t>(address);
  auto it = mappings.upper_bound(start);
  if (it == mappings.begin()) return false;
  --it;
  return start >= it->first && start + size <= it->first + it->second.first->size;
}

aclError aclrtMemcpyAsync(void* dst, size_t dest_max, const void* src, size_t count, aclrtMemcpyKind kind,
                          aclrtStream stream) {
  if (aclError error = device_error()) return error;
  if (count > dest_max) return fail(PARAM_INVALID, "count exceeds destMax");
  if (kind != ACL_MEMCPY_DEVICE_TO_HOST && kind != ACL_MEMCPY_HOST_TO_DEVICE && kind != ACL_MEMCPY_DEFAULT)
    return fail(PARAM_INVALID, "unexpected copy kind");
  std::lock_guard<std::mutex> lock(mutex);
  if ((kind == ACL_MEMCPY_DEVICE_TO_HOST && (!on_device(src, count) || on_device(dst, count))) ||
      (kind == ACL_MEMCPY_HOST_TO_DEVICE && (on_device(src, count) || !on_device(dst, count))))
    return fail(PARAM_INVALID, "the addresses do not match the copy's kind");
  static_cast<Stream*>(stream)->work.push_back([=] { std::memcpy(dst, src, count); });
  counters.copies++;
  return SUCCESS;
}

aclError aclrtMemsetAsync(void* dst, size_t max_count, int32_t value, size_t count, aclrtStream stream) {
  if (aclError error = device_error()) return error;
  if (count > max_count) return fail(PARAM_INVALID, "count exceeds maxCount");
  std::lock_guard<std::mutex> lock(mutex);
  static_cast<Stream*>(stream)->work.push_back([=] { std::memset(dst, value, count); });
  return SUCCESS;
}

aclError aclrtCreateStream(aclrtStream* stream) {
  if (aclError error = device_error()) return error;
  std::lock_guard<std::mutex> lock(mutex);
  streams.push_back(new Stream{current_device, {}});
  *stream = streams.back();
  return SUCCESS;
}

aclError aclrtSynchronizeStream(aclrtStream stream) {
  if (aclError error = device_error()) return error;
  drain(static_cast<Stream*>(stream));
  return SUCCESS;
}

aclError aclrtSynchronizeDevice() {
  if (aclError error = device_error()) return error;
  std::vector<Stream*> of_device;
  {
    std::lock_guard<std::mutex> lock(mutex);
    for (Stream* stream : streams)
      if (stream->device == current_device) of_device.push_back(stream);
  }
  for (Stream* stream : of_device) drain(stream);
  return SUCCESS;
}

aclError aclrtHostRegister(void* address, uint64_t size, aclrtHostRegisterType type, void** device_address) {
  if (aclError error = device_error()) return error;
  if (type != ACL_HOST_REGISTER_MAPPED) return fail(PARAM_INVALID, "unexpected register type");
  std::lock_guard<std::mutex> lock(mutex);
  // A second view of the same pages, at an address of its own: what the device would use.
  void* view = mremap(address, 0, size, MREMAP_MAYMOVE);
  if (view == MAP_FAILED) return fail(PARAM_INVALID, "the memory cannot be registered (not a shared mapping)");
  *device_address = view;
  counters.host_register_calls++;
  write_counters();
  return SUCCESS;
}

}  // extern "C"

// Every entry point sleepd resolves is here, with the type sleepd calls it through.
#define SAME_AS_SLEEPD(name, ...)                                                    \
  static_assert(std::is_same_v<decltype(&::name), decltype(sleepd::acl::Runtime::name)>, \
                #name " is not declared as csrc/acl_runtime.h declares it");
SLEEPD_ACL_ENTRY_POINTS(SAME_AS_SLEEPD)
