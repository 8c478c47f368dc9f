#include "cuda_backend.h"
#include "stream_chunks.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>

namespace sleepd {
namespace {

int duplicate(int fd, const char* call) {
  int copy = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (copy < 0) throw BackendError(std::string(call) + ": dup: " + std::strerror(errno));
  return copy;
}

cu::CUmemAllocationProp device_memory(int device) {
  cu::CUmemAllocationProp prop{};
  prop.type = cu::CU_MEM_ALLOCATION_TYPE_PINNED;
  prop.requestedHandleTypes = cu::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
  prop.location.type = cu::CU_MEM_LOCATION_TYPE_DEVICE;
  prop.location.id = device;
  return prop;
}

}  // namespace

CudaBackend::CudaBackend(std::shared_ptr<cu::Driver> driver, unsigned streams)
    : driver_(std::move(driver)), stream_count_(std::max(1u, streams)) {
  int count = 0;
  driver_->check(driver_->cuDeviceGetCount(&count), "cuDeviceGetCount");
  used_.assign(count, 0);
  contexts_.assign(count, nullptr);
  granularity_.assign(count, 0);
}

void CudaBackend::check_device(int device) const {
  if (device < 0 || device >= device_count())
    throw BackendError("cuda device " + std::to_string(device) + " does not exist (" +
                       std::to_string(device_count()) + " visible)");
}

size_t CudaBackend::granularity(int device) const {
  check_device(device);
  std::lock_guard<std::mutex> lock(mutex_);
  if (granularity_[device] == 0) {
    cu::CUmemAllocationProp prop = device_memory(device);
    driver_->check(driver_->cuMemGetAllocationGranularity(&granularity_[device], &prop,
                                                           cu::CU_MEM_ALLOC_GRANULARITY_MINIMUM),
                   "cuMemGetAllocationGranularity");
  }
  return granularity_[device];
}

size_t CudaBackend::total_memory(int device) const {
  check_device(device);
  size_t bytes = 0;
  driver_->check(driver_->cuDeviceTotalMem(&bytes, device), "cuDeviceTotalMem");
  return bytes;
}

int CudaBackend::compute_mode(int device) const {
  check_device(device);
  int mode = 0;
  driver_->check(driver_->cuDeviceGetAttribute(&mode, cu::CU_DEVICE_ATTRIBUTE_COMPUTE_MODE, device),
                 "cuDeviceGetAttribute");
  return mode;
}

std::string CudaBackend::uuid(int device) const {
  check_device(device);
  cu::CUuuid own{}, whole{};
  driver_->check(driver_->cuDeviceGetUuid(&own, device), "cuDeviceGetUuid_v2");
  driver_->check(driver_->cuDeviceGetUuid_v1(&whole, device), "cuDeviceGetUuid");
  // Only a MIG instance has a UUID of its own apart from its GPU's.
  std::string text = std::memcmp(own.bytes, whole.bytes, sizeof own.bytes) != 0 ? "MIG-" : "GPU-";
  char hex[3];
  for (int i = 0; i < 16; ++i) {
    if (i == 4 || i == 6 || i == 8 || i == 10) text += '-';
    std::snprintf(hex, sizeof hex, "%02x", own.bytes[i]);
    text += hex;
  }
  return text;
}

size_t CudaBackend::used(int device) const {
  check_device(device);
  std::lock_guard<std::mutex> lock(mutex_);
  return used_[device];
}

Handle CudaBackend::create(int device, size_t size, const std::string&) {
  size_t unit = granularity(device);
  if (size == 0 || size % unit != 0)
    throw BackendError("cuMemCreate: size " + std::to_string(size) + " is not a positive multiple of " +
                       std::to_string(unit));
  cu::CUmemAllocationProp prop = device_memory(device);
  cu::CUmemGenericAllocationHandle handle = 0;
  driver_->check(driver_->cuMemCreate(&handle, size, &prop, 0), "cuMemCreate");
  std::lock_guard<std::mutex> lock(mutex_);
  used_[device] += size;
  Handle id = next_handle_++;
  memory_.emplace(id, Memory{handle, device, size, true});
  return id;
}

cu::CUmemGenericAllocationHandle CudaBackend::driver_handle(Handle handle) const {
  std::lock_guard<std::mutex> lock(mutex_);
  return find_handle(memory_, handle).handle;
}

Shareable CudaBackend::export_handle(Handle handle) {
  Memory memory;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    memory = find_handle(memory_, handle);
  }
  Shareable shareable;
  if (memory.fd >= 0) {
    shareable.fd = duplicate(memory.fd, "export");
    return shareable;
  }
  driver_->check(driver_->cuMemExportToShareableHandle(&shareable.fd, memory.handle,
                                                       cu::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0),
                 "cuMemExportToShareableHandle");
  return shareable;
}

Handle CudaBackend::import_memory(const Shareable& shareable, int device, size_t size, bool adopt) {
  if (shareable.fd < 0) throw BackendError("import: the CUDA backend shares file descriptors");
  check_device(device);
  // An imported handle does not know its size; the daemon sends it alongside.
  Memory memory{0, device, size, adopt};
  if (adopt) {
    // The daemon has no context to import in: a descriptor of its own is as good a reference.
    memory.fd = duplicate(shareable.fd, "adopt");
  } else {
    auto scope = use_context(device);
    // The descriptor goes by value and stays ours: the caller closes it.
    driver_->check(driver_->cuMemImportFromShareableHandle(
                       &memory.handle, reinterpret_cast<void*>(static_cast<uintptr_t>(shareable.fd)),
                       cu::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR),
                   "cuMemImportFromShareableHandle");
  }
  std::lock_guard<std::mutex> lock(mutex_);
  Handle id = next_handle_++;
  memory_.emplace(id, memory);
  if (adopt) used_[device] += size;
  return id;
}

void CudaBackend::release(Handle handle) {
  Memory memory;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    memory = find_handle(memory_, handle);
    memory_.erase(handle);
    if (memory.owned) used_[memory.device] -= memory.size;
  }
  if (memory.fd >= 0) {
    close(memory.fd);
    return;
  }
  if (memory.staging) {
    // Every copy through the staging mapping synchronised its own streams before
    // returning; a context-wide synchronise here would also wait for the copies
    // another thread runs in the other direction.
    auto scope = use_context(memory.device);
    driver_->check(driver_->cuMemUnmap(memory.staging, memory.size), "cuMemUnmap");
    driver_->check(driver_->cuMemAddressFree(memory.staging, memory.size), "cuMemAddressFree");
  }
  driver_->check(driver_->cuMemRelease(memory.handle), "cuMemRelease");
}

void CudaBackend::set_device(int device) {
  check_device(device);
  device_ = device;  // made current only inside each call: the caller's own context stays as it was
}

ContextScope::ContextScope(const cu::Driver& driver, cu::CUcontext context) : driver_(driver) {
  driver_.check(driver_.cuCtxGetCurrent(&previous_), "cuCtxGetCurrent");
  if (previous_ == context) return;
  // The current context is per thread; setting it is cheap.
  driver_.check(driver_.cuCtxSetCurrent(context), "cuCtxSetCurrent");
  restore_ = true;
}

ContextScope::~ContextScope() {
  if (restore_) driver_.cuCtxSetCurrent(previous_);
}

ContextScope CudaBackend::use_context(int device) {
  cu::CUcontext context;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!contexts_[device])
      driver_->check(driver_->cuDevicePrimaryCtxRetain(&contexts_[device], device), "cuDevicePrimaryCtxRetain");
    context = contexts_[device];
  }
  return ContextScope(*driver_, context);
}

uintptr_t CudaBackend::reserve(size_t size) {
  auto scope = use_context(device_);
  cu::CUdeviceptr address = 0;
  driver_->check(driver_->cuMemAddressReserve(&address, size, 0, 0, 0), "cuMemAddressReserve");
  return static_cast<uintptr_t>(address);
}

void CudaBackend::free_reservation(uintptr_t address, size_t size) {
  auto scope = use_context(device_);
  driver_->check(driver_->cuMemAddressFree(address, size), "cuMemAddressFree");
}

void CudaBackend::map(uintptr_t address, size_t size, Handle handle, int device) {
  driver_->check(map_with(address, size, handle, device, cu::CU_MEM_ACCESS_FLAGS_PROT_READWRITE), "cuMemSetAccess");
}

// cuda.h documents PROT_READ for cuMemSetAccess without saying whether device mappings
// honour it: where the driver refuses it, the memory is mapped read-write and the
// refusal recorded, for the client to say so.
bool CudaBackend::map_read_only(uintptr_t address, size_t size, Handle handle, int device) {
  if (map_with(address, size, handle, device, cu::CU_MEM_ACCESS_FLAGS_PROT_READ) == cu::CUDA_SUCCESS) return true;
  read_only_refused_ = true;
  map(address, size, handle, device);
  return false;
}

cu::CUresult CudaBackend::map_with(uintptr_t address, size_t size, Handle handle, int device, int flags) {
  cu::CUmemGenericAllocationHandle native = driver_handle(handle);
  auto scope = use_context(device);
  driver_->check(driver_->cuMemMap(address, size, 0, native, 0), "cuMemMap");
  cu::CUmemAccessDesc access{};
  access.location.type = cu::CU_MEM_LOCATION_TYPE_DEVICE;
  access.location.id = device;
  access.flags = flags;
  cu::CUresult result = driver_->cuMemSetAccess(address, size, &access, 1);
  if (result != cu::CUDA_SUCCESS) driver_->cuMemUnmap(address, size);
  return result;
}

void CudaBackend::unmap(uintptr_t address, size_t size) {
  auto scope = use_context(device_);
  // Unmapping does not wait for work in flight on the memory: wait first.
  driver_->check(driver_->cuCtxSynchronize(), "cuCtxSynchronize");
  driver_->check(driver_->cuMemUnmap(address, size), "cuMemUnmap");
}

void CudaBackend::synchronize() {
  auto scope = use_context(device_);
  driver_->check(driver_->cuCtxSynchronize(), "cuCtxSynchronize");
}

void CudaBackend::copy(uintptr_t dst, uintptr_t src, size_t size) {
  auto scope = use_context(device_);
  driver_->check(driver_->cuMemcpy(dst, src, size), "cuMemcpy");
}

std::pair<cu::CUdeviceptr, int> CudaBackend::staging(Handle handle, size_t offset, size_t size, const char* call) {
  Memory* memory;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    memory = &find_handle(memory_, handle);
    if (offset > memory->size || size > memory->size - offset)
      throw BackendError(std::string(call) + ": range is outside the " + std::to_string(memory->size) +
                         "-byte handle");
    if (memory->staging) return {memory->staging + offset, memory->device};
  }
  cu::CUdeviceptr address = reserve(memory->size);
  try {
    map(address, memory->size, handle, memory->device);
  } catch (...) {
    free_reservation(address, memory->size);
    throw;
  }
  std::lock_guard<std::mutex> lock(mutex_);
  memory->staging = address;
  return {address + offset, memory->device};
}

template <typename Issue, typename Before, typename Landed>
void CudaBackend::chunked(int device, size_t size, Issue issue, Before before, Landed landed) {
  auto scope = use_context(device);
  std::vector<cu::CUstream>* streams;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    streams = &streams_[{device, std::this_thread::get_id()}];
    while (streams->size() < stream_count_) {
      cu::CUstream stream = nullptr;
      driver_->check(driver_->cuStreamCreate(&stream, cu::CU_STREAM_NON_BLOCKING), "cuStreamCreate");
      streams->push_back(stream);
    }
  }
  issue_in_chunks(*streams, size, issue, [&](cu::CUstream stream, bool check) {
    auto result = driver_->cuStreamSynchronize(stream);
    if (check) driver_->check(result, "cuStreamSynchronize");
  }, before, landed);
}

Checksums CudaBackend::copy_to_host(Handle src, size_t offset, void* dst, size_t size) {
  auto [device_address, device] = staging(src, offset, size, "copy_to_host");
  auto* host = static_cast<char*>(dst);
  Checksums checksums(checksum_count(size));
  chunked(
      device, size,
      [&](size_t at, size_t length, cu::CUstream stream) {
        driver_->check(driver_->cuMemcpyDtoHAsync(host + at, device_address + at, length, stream),
                       "cuMemcpyDtoHAsync");
      },
      kNoHostWork, taking_checksums(host, checksums));
  return checksums;
}

void CudaBackend::copy_from_host(Handle dst, size_t offset, const void* src, size_t size, const Checksums* checksums) {
  auto [device_address, device] = staging(dst, offset, size, "copy_from_host");
  const auto* host = static_cast<const char*>(src);
  chunked(
      device, size,
      [&](size_t at, size_t length, cu::CUstream stream) {
        driver_->check(driver_->cuMemcpyHtoDAsync(device_address + at, host + at, length, stream),
                       "cuMemcpyHtoDAsync");
      },
      checking_checksums(host, checksums), kNoHostWork);
}

void CudaBackend::zero(Handle dst, size_t offset, size_t size) {
  auto [device_address, device] = staging(dst, offset, size, "zero");
  chunked(
      device, size,
      [&](size_t at, size_t length, cu::CUstream stream) {
        driver_->check(driver_->cuMemsetD8Async(device_address + at, 0, length, stream), "cuMemsetD8Async");
      },
      kNoHostWork, kNoHostWork);
}

void CudaBackend::register_host(void* address, size_t size) {
  auto scope = use_context(device_);
  driver_->check(driver_->cuMemHostRegister(address, size, cu::CU_MEMHOSTREGISTER_PORTABLE), "cuMemHostRegister");
}

}  // namespace sleepd
