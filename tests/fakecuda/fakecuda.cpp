// A driver double: the subset of the CUDA driver API that sleepd uses,
// implemented over memfd and mmap, so that the CUDA backend's logic runs in CI
// where there is no GPU. "Device memory" is host shared memory here.
//
// Like the real driver:
//  * memory lives until its last reference is gone: the handle, every mapping
//    and every exported descriptor (the kernel's own reference counting on the
//    memfd gives exactly this), and until then it counts against the GPU's
//    memory for every process's cuMemCreate (alive_memory.h);
//  * cuMemMap maps with no access until cuMemSetAccess, only whole granules, and
//    never over a range already mapped; cuMemUnmap must cover a whole earlier map; calls that need a context fail without one current on
//    the calling thread (a new thread has none);
//  * asynchronous copies and memsets run only when their stream, or its
//    context, is synchronised: until then nothing says they have run;
//  * cuMemHostRegister holds the pages of a file-backed range until the process
//    ends: a range punched out of the file under it leaves the pin, and every
//    later copy, on the old pages, while the file, and whoever maps it afresh,
//    gets new empty ones (the double keeps such orphaned pages itself);
//  * an imported handle does not take ownership of the descriptor;
//  * CUDA_VISIBLE_DEVICES picks and renumbers the GPUs a process sees, and
//    UUIDs name the GPU whatever its ordinal.
//  * a copy or memset that would write memory mapped with read access only
//    (cuMemSetAccess PROT_READ) faults: ILLEGAL_ADDRESS, and every later call of
//    the process fails the same way, as after a GPU fault.
// Stricter than the driver: cuMemSetAccess refuses to open memory to a device
// other than the GPU it lives on (a driver with peer access would allow it,
// and the engine would silently compute on another GPU's memory).
//
// Configuration (environment, read at cuInit):
//   FAKE_CUDA_DEVICES      GPUs on the machine (default 1)
//   FAKE_CUDA_MIG          GPUs in MIG mode, as the machine numbers them (comma-separated):
//                          CUDA sees each as one MIG instance, with a UUID of its own
//   FAKE_CUDA_MEMORY       bytes per device (default 1 GiB)
//   FAKE_CUDA_COMPUTE_MODE every device's compute mode (default 0, DEFAULT; 3 is EXCLUSIVE_PROCESS)
//   FAKE_CUDA_COUNTERS     directory where each process writes <pid>.json counters
//   FAKE_CUDA_TAG          names this test's memory, which fakenvml.cpp counts alone
//   FAKE_CUDA_CONTROL      a file of key=value lines, re-read on every call, for
//                          fault injection; a change of its contents resets the counts:
//                            oom_at_create=N    the Nth cuMemCreate from now fails with OOM
//                            oom_from_create=N  so do the Nth and every later one
//                            fail_map=1         cuMemMap fails
//                            fail_import_pid=P  cuMemImportFromShareableHandle fails in process P
//                            hold_dtoh=1        device-to-host copies wait until this line is gone
//                            sync_delay_ms=N    cuCtxSynchronize takes N ms, as with work in flight
//                            register_ms_per_gib=N  cuMemHostRegister takes N ms per GiB it pins
//                            sticky_fault=E     the next asynchronous copy a process issues fails with E
//                                               (700: an illegal address), and so does every later call
//                                               of that process that needs a context, as after a GPU fault
//
// A test-only entry point, not the driver's, stands for an engine's kernel:
//   fakecuda_launch_write(dst, data, size)  a kernel writing `data` (copied at launch) at
//                          device address `dst`, on a stream of the current context's own:
//                          it lands when that context is synchronised, and not before.
//
// It is written against csrc/cuda_driver.h, and checks at the end that it
// exports every entry point sleepd resolves with the very type sleepd calls it
// through; tests/test_cuda_headers.py checks those types against cuda.h.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <mutex>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "alive_memory.h"
#include "cuda_driver.h"

using namespace sleepd::cu;

namespace {

using Handle = CUmemGenericAllocationHandle;

constexpr CUresult SUCCESS = 0, INVALID_VALUE = 1, OUT_OF_MEMORY = 2, NOT_INITIALIZED = 3, INVALID_DEVICE = 101,
                   INVALID_CONTEXT = 201, INVALID_HANDLE = 400, ILLEGAL_ADDRESS = 700, LAUNCH_FAILED = 719;

struct Allocation {
  int fd;
  size_t size;
  int device;  // the ordinal it was created on here; -1 if imported
  bool created;
  int gpu;     // the GPU it lives on, as the machine numbers them
};

struct Counters {
  long contexts_retained = 0, creates = 0, live_handles = 0, live_created_bytes = 0, peak_created_bytes = 0,
       exports = 0, imports = 0, maps = 0, live_mappings = 0, host_register_calls = 0, host_registered_bytes = 0,
       copies = 0, first_register_ms = 0, last_register_end_ms = 0;  // wall-clock times: processes' pinning, side by side
};

std::mutex mutex;
bool initialised = false;
int devices = 1;
std::vector<int> visible;  // ordinal -> GPU
size_t memory_per_device = size_t(1) << 30;
constexpr size_t kGranularity = 2u << 20;
std::map<CUdeviceptr, size_t> reservations;  // start -> size
std::map<CUdeviceptr, size_t> mappings;      // start -> size
std::map<CUdeviceptr, int> mapped_gpu;       // start -> the GPU of the memory mapped there
Counters counters;
std::string control_text;
long creates_since_control = 0;
thread_local CUcontext current_context = nullptr;
std::atomic<CUresult> sticky_error{SUCCESS};  // once a fault has broken this process's contexts, what every call returns
char contexts[64];  // one address per device stands for its primary context
std::vector<bool> in_mig_mode;  // per GPU, as the machine numbers them

// A range of host memory registered (pinned) with cuMemHostRegister.
struct Registration {
  char* base;
  size_t size;
  int file;          // the file it maps, opened anew (-1: anonymous memory)
  off_t file_offset;  // of `base` in that file
  std::vector<bool> pinned;  // per page: in use under the pin (a copy went through it)
  std::map<size_t, std::vector<char>> orphans;  // per page punched out under the pin: the page the pin holds
};
std::vector<Registration*> registrations;  // guarded by `mutex`; sleepd never unregisters
const size_t kPage = static_cast<size_t>(sysconf(_SC_PAGESIZE));

// A stream: work queued on it runs, in order, when it or its context is synchronised.
struct Stream {
  CUcontext context;
  std::vector<std::function<void()>> work;  // guarded by `mutex`
  std::mutex running;  // held while its work runs: a synchronise from another thread waits for it
};
std::vector<Stream*> streams;              // every stream made; sleepd never destroys one
std::map<CUcontext, Stream*> kernel_streams;  // per context, where fakecuda_launch_write's kernels go

std::string env(const char* name) {
  const char* value = std::getenv(name);
  return value ? value : "";
}

// Re-reads the control file; a change of contents starts the counts afresh.
std::map<std::string, long> control() {
  std::map<std::string, long> values;
  std::string path = env("FAKE_CUDA_CONTROL");
  if (path.empty()) return values;
  std::ifstream file(path);
  std::stringstream text;
  text << file.rdbuf();
  if (text.str() != control_text) {
    control_text = text.str();
    creates_since_control = 0;
  }
  std::string line;
  std::istringstream lines(control_text);
  while (std::getline(lines, line)) {
    auto eq = line.find('=');
    if (eq != std::string::npos) values[line.substr(0, eq)] = std::atol(line.c_str() + eq + 1);
  }
  return values;
}

void write_counters() {
  std::string dir = env("FAKE_CUDA_COUNTERS");
  if (dir.empty()) return;
  char json[1024];
  std::snprintf(json, sizeof json,
                "{\"contexts_retained\": %ld, \"creates\": %ld, \"live_handles\": %ld, \"live_created_bytes\": %ld, "
                "\"peak_created_bytes\": %ld, "
                "\"exports\": %ld, \"imports\": %ld, \"maps\": %ld, \"live_mappings\": %ld, "
                "\"host_register_calls\": %ld, \"host_registered_bytes\": %ld, \"copies\": %ld, "
                "\"first_register_ms\": %ld, \"last_register_end_ms\": %ld}\n",
                counters.contexts_retained, counters.creates, counters.live_handles, counters.live_created_bytes,
                counters.peak_created_bytes, counters.exports, counters.imports, counters.maps, counters.live_mappings,
                counters.host_register_calls, counters.host_registered_bytes, counters.copies,
                counters.first_register_ms, counters.last_register_end_ms);
  std::string path = dir + "/" + std::to_string(getpid()) + ".json";
  std::string tmp = path + ".tmp";
  if (FILE* file = std::fopen(tmp.c_str(), "w")) {
    std::fputs(json, file);
    std::fclose(file);
    std::rename(tmp.c_str(), path.c_str());
  }
}

// The control file's value for `key`, or 0; takes the lock only to read it,
// so that a call waiting on it holds up no other call.
long knob(const char* key) {
  std::lock_guard<std::mutex> lock(mutex);
  auto faults = control();
  return faults.count(key) ? faults[key] : 0;
}

long now_ms() {
  timespec now;
  clock_gettime(CLOCK_REALTIME, &now);
  return now.tv_sec * 1000 + now.tv_nsec / 1000000;
}

// FAKE_CUDA_MIG, per GPU.
std::vector<bool> mig_mode(int gpus) {
  std::vector<bool> mig(gpus, false);
  std::istringstream items(env("FAKE_CUDA_MIG"));
  std::string item;
  while (std::getline(items, item, ',')) {
    int gpu = std::atoi(item.c_str());
    if (gpu >= 0 && gpu < gpus) mig[gpu] = true;
  }
  return mig;
}

// A fixed pattern and the GPU's number, as fakenvml.cpp expects: 0xa0, 0xa1...
// for a GPU, 0xc0, 0xc1... for the MIG instance of a GPU in MIG mode.
void fill_uuid(CUuuid* uuid, unsigned char first, int gpu) {
  for (int i = 0; i < 16; ++i) uuid->bytes[i] = static_cast<unsigned char>(first + i);
  uuid->bytes[15] = static_cast<unsigned char>(gpu);
}

Allocation* allocation(Handle handle) { return reinterpret_cast<Allocation*>(handle); }

bool inside(const std::map<CUdeviceptr, size_t>& ranges, CUdeviceptr address, size_t size) {
  auto it = ranges.upper_bound(address);
  if (it == ranges.begin()) return false;
  --it;
  return address >= it->first && address + size <= it->first + it->second;
}

// The file mapped at `address` and the offset there, from /proc/self/maps; -1 for anonymous memory.
std::pair<int, off_t> backing_file(const void* address) {
  std::ifstream maps("/proc/self/maps");
  std::string line;
  auto at = reinterpret_cast<uintptr_t>(address);
  while (std::getline(maps, line)) {
    uintptr_t start, end;
    unsigned long long offset;
    int path_at = 0;
    if (std::sscanf(line.c_str(), "%lx-%lx %*s %llx %*s %*s %n", &start, &end, &offset, &path_at) < 3) continue;
    if (at < start || at >= end || line[path_at] != '/') continue;
    int fd = open(line.c_str() + path_at, O_RDONLY | O_CLOEXEC);
    return {fd, static_cast<off_t>(offset + (at - start))};
  }
  return {-1, 0};
}

// Where a copy finds page `index` of `r`: the page the pin holds. The caller holds `mutex`.
char* pinned_page(Registration* r, size_t index) {
  auto orphan = r->orphans.find(index);
  if (orphan != r->orphans.end()) return orphan->second.data();
  off_t in_file = r->file_offset + static_cast<off_t>(index * kPage);
  if (r->pinned[index] && lseek(r->file, in_file, SEEK_DATA) != in_file) {
    // Punched out of the file under the pin: the pin keeps the old page, the file has none.
    std::vector<char>& page = r->orphans[index];
    page.assign(kPage, 0);
    return page.data();
  }
  r->pinned[index] = true;
  return r->base + index * kPage;
}

// Copies between host memory and device memory, through the pin where the host memory is registered.
void host_copy(char* host, char* device, size_t size, bool to_host) {
  std::unique_lock<std::mutex> lock(mutex);
  Registration* r = nullptr;
  for (Registration* each : registrations)
    if (each->file >= 0 && host >= each->base && host + size <= each->base + each->size) r = each;
  size_t first = r ? static_cast<size_t>(host - r->base) / kPage : 0;
  size_t last = r ? (static_cast<size_t>(host - r->base) + size - 1) / kPage : 0;
  if (r && r->orphans.lower_bound(first) == r->orphans.lower_bound(last + 1)) {
    off_t start = r->file_offset + static_cast<off_t>(first * kPage);
    if (lseek(r->file, start, SEEK_HOLE) >= start + static_cast<off_t>((last + 1 - first) * kPage)) {
      // The common case: no page of the range has left the file.
      for (size_t index = first; index <= last; ++index) r->pinned[index] = true;
      r = nullptr;
    }
  }
  if (!r) {
    lock.unlock();
    std::memcpy(to_host ? host : device, to_host ? device : host, size);
    return;
  }
  for (size_t done = 0; done < size;) {
    size_t at = static_cast<size_t>(host - r->base) + done;
    size_t length = std::min(kPage - at % kPage, size - done);
    char* page = pinned_page(r, at / kPage) + at % kPage;
    std::memcpy(to_host ? page : device + done, to_host ? device + done : page, length);
    done += length;
  }
}

// Why a call that needs a context cannot run on this thread, or SUCCESS.
CUresult context_error() {
  if (CUresult error = sticky_error) return error;
  return current_context ? SUCCESS : INVALID_CONTEXT;
}

// Mappings whose access is read-only (cuMemSetAccess with PROT_READ): address -> size.
std::map<CUdeviceptr, size_t> read_only;

// Injects the fault the control file asks for, before a copy is issued; a copy that would write
// memory mapped read-only faults as a GPU's would: an illegal address, and the context broken for good.
CUresult fault_before_copy(CUdeviceptr written = 0, size_t size = 0) {
  if (long error = knob("sticky_fault")) sticky_error = static_cast<CUresult>(error);
  if (CUresult error = context_error()) return error;
  std::lock_guard<std::mutex> lock(mutex);
  for (const auto& [start, length] : read_only)
    if (written < start + length && start < written + size) return sticky_error = ILLEGAL_ADDRESS;
  return SUCCESS;
}

// The caller holds `mutex`.
Stream* new_stream(CUcontext context) {
  streams.push_back(new Stream{context, {}, {}});
  return streams.back();
}

void enqueue(Stream* stream, std::function<void()> work) {
  std::lock_guard<std::mutex> lock(mutex);
  stream->work.push_back(std::move(work));
}

// Runs what is queued on `stream`, without holding `mutex`: work may wait on a knob.
void drain(Stream* stream) {
  std::lock_guard<std::mutex> running(stream->running);
  std::vector<std::function<void()>> work;
  {
    std::lock_guard<std::mutex> lock(mutex);
    work.swap(stream->work);
  }
  for (auto& item : work) item();
}

}  // namespace

extern "C" {

CUresult cuInit(unsigned) {
  std::lock_guard<std::mutex> lock(mutex);
  int gpus = env("FAKE_CUDA_DEVICES").empty() ? 1 : std::atoi(env("FAKE_CUDA_DEVICES").c_str());
  visible.clear();
  if (const char* list = std::getenv("CUDA_VISIBLE_DEVICES")) {
    // As the driver reads it: indices up to the first that is not a GPU here.
    std::istringstream items(list);
    std::string item;
    while (std::getline(items, item, ',')) {
      char* end = nullptr;
      long gpu = std::strtol(item.c_str(), &end, 10);
      if (item.empty() || *end || gpu < 0 || gpu >= gpus) break;
      visible.push_back(static_cast<int>(gpu));
    }
  } else {
    for (int gpu = 0; gpu < gpus; ++gpu) visible.push_back(gpu);
  }
  devices = static_cast<int>(visible.size());
  in_mig_mode = mig_mode(gpus);
  if (!env("FAKE_CUDA_MEMORY").empty()) memory_per_device = std::strtoull(env("FAKE_CUDA_MEMORY").c_str(), nullptr, 10);
  initialised = true;
  write_counters();
  return SUCCESS;
}

CUresult cuGetErrorString(CUresult error, const char** text) {
  switch (error) {
    case SUCCESS: *text = "no error"; break;
    case INVALID_VALUE: *text = "invalid argument"; break;
    case OUT_OF_MEMORY: *text = "out of memory"; break;
    case NOT_INITIALIZED: *text = "initialization error"; break;
    case INVALID_DEVICE: *text = "invalid device ordinal"; break;
    case INVALID_CONTEXT: *text = "invalid device context"; break;
    case INVALID_HANDLE: *text = "invalid resource handle"; break;
    case ILLEGAL_ADDRESS: *text = "an illegal memory access was encountered"; break;
    case LAUNCH_FAILED: *text = "unspecified launch failure"; break;
    default: *text = "unknown error"; break;
  }
  return SUCCESS;
}

CUresult cuDeviceGetCount(int* count) {
  if (!initialised) return NOT_INITIALIZED;
  *count = devices;
  return SUCCESS;
}

CUresult cuDeviceGetAttribute(int* value, int attribute, CUdevice device) {
  if (!initialised) return NOT_INITIALIZED;
  if (device < 0 || device >= devices) return INVALID_DEVICE;
  if (attribute != CU_DEVICE_ATTRIBUTE_COMPUTE_MODE) return INVALID_VALUE;  // the only one sleepd asks
  *value = std::atoi(env("FAKE_CUDA_COMPUTE_MODE").c_str());
  return SUCCESS;
}

CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice device) {
  if (device < 0 || device >= devices) return INVALID_DEVICE;
  *bytes = memory_per_device;
  return SUCCESS;
}

// The first version names a MIG instance by its GPU, as the driver's does.
CUresult cuDeviceGetUuid(CUuuid* uuid, CUdevice device) {
  if (device < 0 || device >= devices) return INVALID_DEVICE;
  fill_uuid(uuid, 0xa0, visible[device]);
  return SUCCESS;
}

CUresult cuDeviceGetUuid_v2(CUuuid* uuid, CUdevice device) {
  if (device < 0 || device >= devices) return INVALID_DEVICE;
  int gpu = visible[device];
  fill_uuid(uuid, in_mig_mode[gpu] ? 0xc0 : 0xa0, gpu);
  return SUCCESS;
}

CUresult cuDevicePrimaryCtxRetain(CUcontext* context, CUdevice device) {
  if (device < 0 || device >= devices) return INVALID_DEVICE;
  std::lock_guard<std::mutex> lock(mutex);
  *context = reinterpret_cast<CUcontext>(&contexts[device]);
  counters.contexts_retained++;
  write_counters();
  return SUCCESS;
}

CUresult cuCtxGetCurrent(CUcontext* context) {
  *context = current_context;
  return SUCCESS;
}

CUresult cuCtxSetCurrent(CUcontext context) {
  current_context = context;
  return SUCCESS;
}

CUresult cuCtxSynchronize() {
  if (CUresult error = context_error()) return error;
  if (long delay = knob("sync_delay_ms")) usleep(static_cast<useconds_t>(delay * 1000));
  std::vector<Stream*> of_context;
  {
    std::lock_guard<std::mutex> lock(mutex);
    for (Stream* stream : streams)
      if (stream->context == current_context) of_context.push_back(stream);
  }
  for (Stream* stream : of_context) drain(stream);
  return SUCCESS;
}

CUresult cuMemGetAllocationGranularity(size_t* granularity, const CUmemAllocationProp* prop, int) {
  if (prop->location.id < 0 || prop->location.id >= devices) return INVALID_DEVICE;
  *granularity = kGranularity;
  return SUCCESS;
}

// Needs no context, as with the real driver: the daemon relies on that.
CUresult cuMemCreate(Handle* handle, size_t size, const CUmemAllocationProp* prop, unsigned long long) {
  std::lock_guard<std::mutex> lock(mutex);
  int device = prop->location.id;
  if (device < 0 || device >= devices) return INVALID_DEVICE;
  if (size == 0 || size % kGranularity != 0 || prop->requestedHandleTypes != 1) return INVALID_VALUE;
  auto faults = control();
  ++creates_since_control;
  if (faults.count("oom_at_create") && creates_since_control == faults["oom_at_create"]) return OUT_OF_MEMORY;
  if (faults.count("oom_from_create") && creates_since_control >= faults["oom_from_create"]) return OUT_OF_MEMORY;
  // What is alive on the GPU as the kernel sees it, every process's, and what the control file says
  // processes outside sleepd hold: memory is freed at its last reference, not at cuMemRelease.
  int gpu = visible[device];
  std::string foreign_key = "foreign_used_" + std::to_string(gpu);
  size_t foreign = faults.count(foreign_key) ? faults[foreign_key] : 0;
  if (fake_memory::alive(gpu) + foreign + size > memory_per_device) return OUT_OF_MEMORY;
  // Named by test and GPU, so that fakenvml.cpp and importers can tell where it lives.
  std::string name = "fakecuda:t" + env("FAKE_CUDA_TAG") + ":d" + std::to_string(visible[device]);
  int fd = memfd_create(name.c_str(), MFD_CLOEXEC);
  if (fd < 0) return OUT_OF_MEMORY;
  if (posix_fallocate(fd, 0, static_cast<off_t>(size)) != 0) {
    close(fd);
    return OUT_OF_MEMORY;
  }
  *handle = reinterpret_cast<Handle>(new Allocation{fd, size, device, true, visible[device]});
  counters.creates++;
  counters.live_handles++;
  counters.live_created_bytes += static_cast<long>(size);
  counters.peak_created_bytes = std::max(counters.peak_created_bytes, counters.live_created_bytes);
  write_counters();
  return SUCCESS;
}

CUresult cuMemRelease(Handle handle) {
  std::lock_guard<std::mutex> lock(mutex);
  Allocation* memory = allocation(handle);
  if (!memory) return INVALID_HANDLE;
  close(memory->fd);
  if (memory->created) counters.live_created_bytes -= static_cast<long>(memory->size);
  counters.live_handles--;
  delete memory;
  write_counters();
  return SUCCESS;
}

CUresult cuMemExportToShareableHandle(void* out, Handle handle, int type, unsigned long long) {
  if (type != 1) return INVALID_VALUE;
  std::lock_guard<std::mutex> lock(mutex);
  int fd = fcntl(allocation(handle)->fd, F_DUPFD_CLOEXEC, 0);
  if (fd < 0) return OUT_OF_MEMORY;
  *static_cast<int*>(out) = fd;
  counters.exports++;
  write_counters();
  return SUCCESS;
}

// Needs a context: the driver's documentation does not promise it works without one.
CUresult cuMemImportFromShareableHandle(Handle* handle, void* os_handle, int type) {
  if (CUresult error = context_error()) return error;
  if (type != 1) return INVALID_VALUE;
  std::lock_guard<std::mutex> lock(mutex);
  auto faults = control();
  if (faults.count("fail_import_pid") && faults["fail_import_pid"] == getpid()) return INVALID_VALUE;
  int fd = fcntl(static_cast<int>(reinterpret_cast<uintptr_t>(os_handle)), F_DUPFD_CLOEXEC, 0);
  if (fd < 0) return INVALID_VALUE;
  struct stat st;
  fstat(fd, &st);
  char name[128] = "";
  std::string link = "/proc/self/fd/" + std::to_string(fd);
  ssize_t length = readlink(link.c_str(), name, sizeof name - 1);
  int gpu = -1;
  if (length > 0) std::sscanf(name, "/memfd:fakecuda:t%*[^:]:d%d", &gpu);
  *handle = reinterpret_cast<Handle>(new Allocation{fd, static_cast<size_t>(st.st_size), -1, false, gpu});
  counters.imports++;
  counters.live_handles++;
  write_counters();
  return SUCCESS;
}

CUresult cuMemAddressReserve(CUdeviceptr* address, size_t size, size_t, CUdeviceptr, unsigned long long) {
  if (size == 0 || size % kGranularity != 0) return INVALID_VALUE;
  void* base = mmap(nullptr, size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (base == MAP_FAILED) return OUT_OF_MEMORY;
  std::lock_guard<std::mutex> lock(mutex);
  *address = reinterpret_cast<CUdeviceptr>(base);
  reservations[*address] = size;
  return SUCCESS;
}

CUresult cuMemAddressFree(CUdeviceptr address, size_t size) {
  std::lock_guard<std::mutex> lock(mutex);
  auto it = reservations.find(address);
  if (it == reservations.end() || it->second != size) return INVALID_VALUE;
  for (auto m = mappings.begin(); m != mappings.end(); ++m)
    if (m->first >= address && m->first < address + size) return INVALID_VALUE;  // still mapped
  munmap(reinterpret_cast<void*>(address), size);
  reservations.erase(it);
  return SUCCESS;
}

CUresult cuMemMap(CUdeviceptr address, size_t size, size_t offset, Handle handle, unsigned long long) {
  if (CUresult error = context_error()) return error;
  std::lock_guard<std::mutex> lock(mutex);
  if (control().count("fail_map")) return INVALID_VALUE;  // as a real failed map: 999 would count as a lost context
  Allocation* memory = allocation(handle);
  if (offset != 0 || size == 0 || size % kGranularity != 0 || size > memory->size) return INVALID_VALUE;
  if (!inside(reservations, address, size) || address % kGranularity != 0) return INVALID_VALUE;
  auto next = mappings.lower_bound(address);  // a mapping at or after the address, and the one before it
  if ((next != mappings.end() && next->first < address + size) ||
      (next != mappings.begin() && std::prev(next)->first + std::prev(next)->second > address))
    return INVALID_VALUE;
  // No access until cuMemSetAccess, as on a GPU.
  void* mapped = mmap(reinterpret_cast<void*>(address), size, PROT_NONE, MAP_SHARED | MAP_FIXED, memory->fd, 0);
  if (mapped == MAP_FAILED) return OUT_OF_MEMORY;
  mappings[address] = size;
  mapped_gpu[address] = memory->gpu;
  counters.maps++;
  counters.live_mappings++;
  write_counters();
  return SUCCESS;
}

CUresult cuMemSetAccess(CUdeviceptr address, size_t size, const CUmemAccessDesc* desc, size_t count) {
  if (CUresult error = context_error()) return error;
  std::lock_guard<std::mutex> lock(mutex);
  if (count != 1 || desc->location.id < 0 || desc->location.id >= devices) return INVALID_VALUE;
  if (!inside(mappings, address, size)) return INVALID_VALUE;
  auto mapped = --mapped_gpu.upper_bound(address);
  if (mapped->second != visible[desc->location.id]) return INVALID_DEVICE;
  int prot = desc->flags == 3 ? PROT_READ | PROT_WRITE : desc->flags == 1 ? PROT_READ : PROT_NONE;
  if (desc->flags == 1)
    read_only[address] = size;
  else
    read_only.erase(address);
  return mprotect(reinterpret_cast<void*>(address), size, prot) == 0 ? SUCCESS : OUT_OF_MEMORY;
}

CUresult cuMemUnmap(CUdeviceptr address, size_t size) {
  if (CUresult error = context_error()) return error;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = mappings.find(address);
  if (it == mappings.end() || it->second != size) return INVALID_VALUE;  // must be a whole earlier map
  mmap(reinterpret_cast<void*>(address), size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED,
       -1, 0);
  mappings.erase(it);
  mapped_gpu.erase(address);
  read_only.erase(address);
  counters.live_mappings--;
  write_counters();
  return SUCCESS;
}

CUresult cuMemcpy(CUdeviceptr dst, CUdeviceptr src, size_t size) {
  if (CUresult error = fault_before_copy(dst, size)) return error;
  std::memcpy(reinterpret_cast<void*>(dst), reinterpret_cast<void*>(src), size);
  return SUCCESS;
}

CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t size, CUstream stream) {
  if (CUresult error = fault_before_copy()) return error;
  enqueue(reinterpret_cast<Stream*>(stream), [=] {
    while (knob("hold_dtoh")) usleep(10000);
    host_copy(static_cast<char*>(dst), reinterpret_cast<char*>(src), size, true);
  });
  std::lock_guard<std::mutex> lock(mutex);
  counters.copies++;
  return SUCCESS;
}

CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t size, CUstream stream) {
  if (CUresult error = fault_before_copy(dst, size)) return error;
  enqueue(reinterpret_cast<Stream*>(stream), [=] {
    host_copy(static_cast<char*>(const_cast<void*>(src)), reinterpret_cast<char*>(dst), size, false);
  });
  std::lock_guard<std::mutex> lock(mutex);
  counters.copies++;
  return SUCCESS;
}

CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char value, size_t size, CUstream stream) {
  if (CUresult error = fault_before_copy(dst, size)) return error;
  enqueue(reinterpret_cast<Stream*>(stream), [=] { std::memset(reinterpret_cast<void*>(dst), value, size); });
  return SUCCESS;
}

CUresult cuStreamCreate(CUstream* stream, unsigned) {
  if (CUresult error = context_error()) return error;
  std::lock_guard<std::mutex> lock(mutex);
  *stream = reinterpret_cast<CUstream>(new_stream(current_context));
  return SUCCESS;
}

CUresult cuStreamSynchronize(CUstream stream) {
  if (CUresult error = context_error()) return error;
  drain(reinterpret_cast<Stream*>(stream));
  return SUCCESS;
}

CUresult cuMemHostRegister_v2(void* address, size_t size, unsigned) {
  if (CUresult error = context_error()) return error;
  long started = now_ms();
  // Pinning walks every page: on a real node it takes time in proportion to the size.
  if (long per_gib = knob("register_ms_per_gib")) usleep(static_cast<useconds_t>(per_gib * 1000 * size >> 30));
  auto [file, offset] = backing_file(address);
  std::lock_guard<std::mutex> lock(mutex);
  if (!counters.first_register_ms) counters.first_register_ms = started;
  counters.last_register_end_ms = now_ms();
  registrations.push_back(new Registration{static_cast<char*>(address), size, file, offset,
                                           std::vector<bool>((size + kPage - 1) / kPage), {}});
  counters.host_register_calls++;
  counters.host_registered_bytes += static_cast<long>(size);
  write_counters();
  return SUCCESS;
}

// Test-only: see the top of this file.
__attribute__((visibility("default"))) CUresult fakecuda_launch_write(CUdeviceptr dst, const void* data, size_t size) {
  if (CUresult error = context_error()) return error;
  std::vector<char> bytes(static_cast<const char*>(data), static_cast<const char*>(data) + size);
  std::lock_guard<std::mutex> lock(mutex);
  Stream*& stream = kernel_streams[current_context];
  if (!stream) stream = new_stream(current_context);
  stream->work.push_back([dst, bytes] { std::memcpy(reinterpret_cast<void*>(dst), bytes.data(), bytes.size()); });
  return SUCCESS;
}

}  // extern "C"

// Every entry point sleepd resolves is here, with the type sleepd calls it through.
#define SAME_AS_SLEEPD(name, symbol, ...)                                                 \
  static_assert(std::is_same_v<decltype(&::symbol), decltype(sleepd::cu::Driver::name)>, \
                #symbol " is not declared as csrc/cuda_driver.h declares it");
SLEEPD_CUDA_ENTRY_POINTS(SAME_AS_SLEEPD)
SLEEPD_CUDA_SUPERSEDED_ENTRY_POINTS(SAME_AS_SLEEPD)
