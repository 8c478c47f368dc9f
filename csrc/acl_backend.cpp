#include "acl_backend.h"
#include "stream_chunks.h"

#include <algorithm>

namespace sleepd {
namespace {

acl::aclrtPhysicalMemProp device_memory(int device) {
  acl::aclrtPhysicalMemProp prop{};
  prop.handleType = acl::ACL_MEM_HANDLE_TYPE_NONE;
  prop.allocationType = acl::ACL_MEM_ALLOCATION_TYPE_PINNED;
  prop.memAttr = acl::ACL_HBM_MEM;
  prop.location.id = static_cast<uint32_t>(device);
  prop.location.type = acl::ACL_MEM_LOCATION_TYPE_DEVICE;
  return prop;
}

}  // namespace

AclBackend::AclBackend(std::shared_ptr<acl::Runtime> runtime, unsigned streams)
    : runtime_(std::move(runtime)), stream_count_(std::max(1u, streams)) {
  uint32_t count = 0;
  runtime_->check(runtime_->aclrtGetDeviceCount(&count), "aclrtGetDeviceCount");
  used_.assign(count, 0);
  granularity_.assign(count, 0);
}

void AclBackend::check_device(int device) const {
  if (device < 0 || device >= device_count())
    throw BackendError("npu " + std::to_string(device) + " does not exist (" + std::to_string(device_count()) +
                       " visible)");
}

size_t AclBackend::granularity(int device) const {
  check_device(device);
  std::lock_guard<std::mutex> lock(mutex_);
  if (granularity_[device] == 0) {
    acl::aclrtPhysicalMemProp prop = device_memory(device);
    runtime_->check(runtime_->aclrtMemGetAllocationGranularity(&prop, acl::ACL_RT_MEM_ALLOC_GRANULARITY_MINIMUM,
                                                                &granularity_[device]),
                    "aclrtMemGetAllocationGranularity");
  }
  return granularity_[device];
}

size_t AclBackend::used(int device) const {
  check_device(device);
  std::lock_guard<std::mutex> lock(mutex_);
  return used_[device];
}

std::pair<size_t, size_t> AclBackend::memory_info(int device) {
  check_device(device);
  use_device(device);
  size_t free = 0, total = 0;
  runtime_->check(runtime_->aclrtGetMemInfo(acl::ACL_HBM_MEM, &free, &total), "aclrtGetMemInfo");
  return {free, total};
}

void AclBackend::set_device(int device) {
  check_device(device);
  device_ = device;
  use_device(device);
}

void AclBackend::use_device(int device) {
  std::lock_guard<std::mutex> lock(mutex_);
  // aclrtSetDevice counts references per call; once per thread is all a thread needs.
  if (devices_set_.insert({device, std::this_thread::get_id()}).second) {
    acl::aclError result = runtime_->aclrtSetDevice(device);
    if (result != acl::ACL_SUCCESS) {
      devices_set_.erase({device, std::this_thread::get_id()});
      runtime_->check(result, "aclrtSetDevice");
    }
  }
}

int AclBackend::device_pid() {
  int32_t pid = 0;
  runtime_->check(runtime_->aclrtDeviceGetBareTgid(&pid), "aclrtDeviceGetBareTgid");
  return pid;
}

Handle AclBackend::create(int device, size_t size, const std::string&) {
  size_t unit = granularity(device);
  if (size == 0 || size % unit != 0)
    throw BackendError("aclrtMallocPhysical: size " + std::to_string(size) + " is not a positive multiple of " +
                       std::to_string(unit));
  acl::aclrtPhysicalMemProp prop = device_memory(device);
  acl::aclrtDrvMemHandle handle = nullptr;
  runtime_->check(runtime_->aclrtMallocPhysical(&handle, size, &prop, 0), "aclrtMallocPhysical");
  std::lock_guard<std::mutex> lock(mutex_);
  used_[device] += size;
  Handle id = next_handle_++;
  memory_.emplace(id, Memory{handle, device, size, true});
  return id;
}

Shareable AclBackend::export_handle(Handle handle) {
  std::lock_guard<std::mutex> lock(mutex_);
  Memory& memory = find_handle(memory_, handle);
  if (!memory.owned) throw BackendError("aclrtMemExportToShareableHandle: an imported handle cannot be exported");
  if (memory.token == 0)  // a second export of one handle fails: keep the first token for every importer
    runtime_->check(runtime_->aclrtMemExportToShareableHandle(memory.handle, acl::ACL_MEM_HANDLE_TYPE_NONE,
                                                              acl::ACL_RT_VMM_EXPORT_FLAG_DEFAULT, &memory.token),
                    "aclrtMemExportToShareableHandle");
  Shareable shareable;
  shareable.token = memory.token;
  return shareable;
}

void AclBackend::authorize(Handle handle, int device_pid, Importer importer) {
  uint64_t token = export_handle(handle).token;
  std::lock_guard<std::mutex> lock(mutex_);
  Memory& memory = find_handle(memory_, handle);
  int32_t owner = memory.owner_pid, mover = memory.mover_pid;
  (importer == Importer::owner ? owner : mover) = device_pid;
  if (owner == memory.owner_pid && mover == memory.mover_pid) return;
  // The whole list every time: the runtime replaces it (a process dropped from it imports no more).
  std::vector<int32_t> allowed;
  for (int32_t pid : {owner, mover})
    if (pid != 0 && std::find(allowed.begin(), allowed.end(), pid) == allowed.end()) allowed.push_back(pid);
  runtime_->check(runtime_->aclrtMemSetPidToShareableHandle(token, allowed.data(), allowed.size()),
                  "aclrtMemSetPidToShareableHandle");
  memory.owner_pid = owner;
  memory.mover_pid = mover;
}

Handle AclBackend::import_memory(const Shareable& shareable, int device, size_t size, bool adopt) {
  if (adopt)
    throw BackendError("acl: memory cannot be handed back: an imported handle cannot be exported again");
  if (shareable.token == 0) throw BackendError("import: the ACL backend shares tokens, not file descriptors");
  check_device(device);
  use_device(device);
  acl::aclrtDrvMemHandle native = nullptr;
  runtime_->check(runtime_->aclrtMemImportFromShareableHandle(shareable.token, device, &native),
                  "aclrtMemImportFromShareableHandle");
  std::lock_guard<std::mutex> lock(mutex_);
  Handle id = next_handle_++;
  // An imported handle does not know its size; the daemon sends it alongside.
  memory_.emplace(id, Memory{native, device, size, false});
  return id;
}

void AclBackend::release(Handle handle) {
  Memory memory;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    memory = find_handle(memory_, handle);
    memory_.erase(handle);
    if (memory.owned) used_[memory.device] -= memory.size;
  }
  if (memory.staging) {
    // Every copy through the staging mapping synchronised its own streams before returning.
    use_device(memory.device);
    runtime_->check(runtime_->aclrtUnmapMem(memory.staging), "aclrtUnmapMem");
    runtime_->check(runtime_->aclrtReleaseMemAddress(memory.staging), "aclrtReleaseMemAddress");
  }
  runtime_->check(runtime_->aclrtFreePhysical(memory.handle), "aclrtFreePhysical");
}

uintptr_t AclBackend::reserve(size_t size) {
  use_device(device_);
  void* address = nullptr;
  runtime_->check(runtime_->aclrtReserveMemAddress(&address, size, 0, nullptr, 0), "aclrtReserveMemAddress");
  return reinterpret_cast<uintptr_t>(address);
}

void AclBackend::free_reservation(uintptr_t address, size_t) {
  use_device(device_);
  runtime_->check(runtime_->aclrtReleaseMemAddress(reinterpret_cast<void*>(address)), "aclrtReleaseMemAddress");
}

void AclBackend::map(uintptr_t address, size_t size, Handle handle, int device) {
  acl::aclrtDrvMemHandle native;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    Memory& memory = find_handle(memory_, handle);
    if (size != memory.size)  // the runtime maps whole handles only
      throw BackendError("aclrtMapMem: " + std::to_string(size) + " bytes of a " + std::to_string(memory.size) +
                         "-byte handle; a mapping covers the whole handle");
    native = memory.handle;
  }
  use_device(device);
  runtime_->check(runtime_->aclrtMapMem(reinterpret_cast<void*>(address), size, 0, native, 0), "aclrtMapMem");
}

void AclBackend::unmap(uintptr_t address, size_t) {
  // Unmapping does not wait for work in flight on the memory: wait first.
  synchronize();
  runtime_->check(runtime_->aclrtUnmapMem(reinterpret_cast<void*>(address)), "aclrtUnmapMem");
}

void AclBackend::synchronize() {
  use_device(device_);
  runtime_->check(runtime_->aclrtSynchronizeDevice(), "aclrtSynchronizeDevice");
}

void AclBackend::copy(uintptr_t dst, uintptr_t src, size_t size) {
  use_device(device_);
  // DEFAULT: the runtime tells host from device memory by address (engines read and write both).
  runtime_->check(runtime_->aclrtMemcpy(reinterpret_cast<void*>(dst), size, reinterpret_cast<const void*>(src), size,
                                        acl::ACL_MEMCPY_DEFAULT),
                  "aclrtMemcpy");
}

std::pair<char*, int> AclBackend::staging(Handle handle, size_t offset, size_t size, const char* call) {
  Memory* memory;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    memory = &find_handle(memory_, handle);
    if (offset > memory->size || size > memory->size - offset)
      throw BackendError(std::string(call) + ": range is outside the " + std::to_string(memory->size) +
                         "-byte handle");
    if (memory->staging) return {static_cast<char*>(memory->staging) + offset, memory->device};
  }
  use_device(memory->device);
  void* address = nullptr;
  runtime_->check(runtime_->aclrtReserveMemAddress(&address, memory->size, 0, nullptr, 0), "aclrtReserveMemAddress");
  acl::aclError mapped = runtime_->aclrtMapMem(address, memory->size, 0, memory->handle, 0);
  if (mapped != acl::ACL_SUCCESS) {
    runtime_->aclrtReleaseMemAddress(address);
    runtime_->check(mapped, "aclrtMapMem");
  }
  std::lock_guard<std::mutex> lock(mutex_);
  memory->staging = address;
  return {static_cast<char*>(address) + offset, memory->device};
}

template <typename Issue, typename Before, typename Landed>
void AclBackend::chunked(int device, size_t size, Issue issue, Before before, Landed landed) {
  use_device(device);
  std::vector<acl::aclrtStream>* streams;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    streams = &streams_[{device, std::this_thread::get_id()}];
    while (streams->size() < stream_count_) {
      acl::aclrtStream stream = nullptr;
      runtime_->check(runtime_->aclrtCreateStream(&stream), "aclrtCreateStream");
      streams->push_back(stream);
    }
  }
  issue_in_chunks(*streams, size, issue, [&](acl::aclrtStream stream, bool check) {
    auto result = runtime_->aclrtSynchronizeStream(stream);
    if (check) runtime_->check(result, "aclrtSynchronizeStream");
  }, before, landed);
}

Checksums AclBackend::copy_to_host(Handle src, size_t offset, void* dst, size_t size) {
  auto [device_address, device] = staging(src, offset, size, "copy_to_host");
  auto* host = static_cast<char*>(dst);
  Checksums checksums(checksum_count(size));
  chunked(
      device, size,
      [&](size_t at, size_t length, acl::aclrtStream stream) {
        runtime_->check(runtime_->aclrtMemcpyAsync(host + at, length, device_address + at, length,
                                                   acl::ACL_MEMCPY_DEVICE_TO_HOST, stream),
                        "aclrtMemcpyAsync");
      },
      kNoHostWork, taking_checksums(host, checksums));
  return checksums;
}

void AclBackend::copy_from_host(Handle dst, size_t offset, const void* src, size_t size, const Checksums* checksums) {
  auto [device_address, device] = staging(dst, offset, size, "copy_from_host");
  const auto* host = static_cast<const char*>(src);
  chunked(
      device, size,
      [&](size_t at, size_t length, acl::aclrtStream stream) {
        runtime_->check(runtime_->aclrtMemcpyAsync(device_address + at, length, host + at, length,
                                                   acl::ACL_MEMCPY_HOST_TO_DEVICE, stream),
                        "aclrtMemcpyAsync");
      },
      checking_checksums(host, checksums), kNoHostWork);
}

void AclBackend::zero(Handle dst, size_t offset, size_t size) {
  auto [device_address, device] = staging(dst, offset, size, "zero");
  chunked(
      device, size,
      [&](size_t at, size_t length, acl::aclrtStream stream) {
        runtime_->check(runtime_->aclrtMemsetAsync(device_address + at, length, 0, length, stream),
                        "aclrtMemsetAsync");
      },
      kNoHostWork, kNoHostWork);
}

void AclBackend::register_host(void* address, size_t size) {
  use_device(device_);
  void* device_view = nullptr;  // the device's address for this memory; copies take the host address
  runtime_->check(runtime_->aclrtHostRegister(address, size, acl::ACL_HOST_REGISTER_MAPPED, &device_view),
                  "aclrtHostRegister");
}

}  // namespace sleepd
