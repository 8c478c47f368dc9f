#include "host_backend.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "copy_engine.h"

namespace sleepd {
namespace {

std::string errno_text(const char* call) {
  return std::string(call) + ": " + std::strerror(errno);
}

size_t page_size() { return static_cast<size_t>(sysconf(_SC_PAGESIZE)); }

// The seals of memory the daemon can take back: its size may shrink, never grow, and no
// one (an engine holding a copy of the descriptor included) may add a seal.
constexpr int kRevocable = F_SEAL_GROW | F_SEAL_SEAL;
constexpr int kBlocking = F_SEAL_SHRINK | F_SEAL_WRITE | F_SEAL_FUTURE_WRITE;

// Takes the memory behind `fd` back from everyone who holds it: a copy of the descriptor
// or a mapping kept after the daemon let go reads nothing and faults, and cannot grow it back.
void revoke(int fd, size_t size) {
  struct stat st;
  if (ftruncate(fd, 0) != 0 || fstat(fd, &st) != 0)
    throw BackendError(errno_text("release: truncate"));
  if (st.st_size != 0 || st.st_blocks != 0)
    throw BackendError("release: " + std::to_string(st.st_blocks * 512) + " of " + std::to_string(size) +
                       " bytes still held after truncating");
}

}  // namespace

HostBackend::HostBackend(int devices, size_t capacity)
    : capacity_(capacity), used_(devices < 0 ? 0 : devices, 0) {}

HostBackend::~HostBackend() {
  for (auto& [handle, memory] : memory_) close(memory.fd);
}

size_t HostBackend::granularity(int) const { return page_size(); }

size_t HostBackend::used(int device) const {
  check_device(device);
  std::lock_guard<std::mutex> lock(mutex_);
  return used_[device];
}

void HostBackend::check_device(int device) const {
  if (device < 0 || device >= static_cast<int>(used_.size()))
    throw BackendError("host device " + std::to_string(device) + " does not exist (" +
                       std::to_string(used_.size()) + " configured)");
}

Handle HostBackend::create(int device, size_t size, const std::string& label) {
  check_device(device);
  if (size == 0 || size % page_size() != 0)
    throw BackendError("create: size " + std::to_string(size) + " is not a positive multiple of the page size");
  {
    // Claim the bytes first so that concurrent creates cannot both pass the check.
    std::lock_guard<std::mutex> lock(mutex_);
    if (used_[device] + size > capacity_)
      throw OutOfMemory("host:" + std::to_string(device) + " has " +
                        std::to_string(capacity_ - used_[device]) + " bytes free, " +
                        std::to_string(size) + " needed");
    used_[device] += size;
  }
  auto unclaim = [&] {
    std::lock_guard<std::mutex> lock(mutex_);
    used_[device] -= size;
  };
  int fd = memfd_create(label.c_str(), MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (fd < 0) {
    unclaim();
    throw BackendError(errno_text("memfd_create"));
  }
  // Commit the pages now, as a driver commits device memory at creation: the
  // capacity check then matches what the kernel really holds.
  int rc = posix_fallocate(fd, 0, static_cast<off_t>(size));
  if (rc != 0) {
    close(fd);
    unclaim();
    errno = rc;
    if (rc == ENOSPC || rc == ENOMEM) throw OutOfMemory(errno_text("fallocate"));
    throw BackendError(errno_text("fallocate"));
  }
  // Only the daemon's uid may open it again through /proc: an engine of another uid that was handed a
  // read-only descriptor (a weight set's) cannot reopen it for writing.
  if (fchmod(fd, 0600) != 0) {
    close(fd);
    unclaim();
    throw BackendError(errno_text("create: fchmod"));
  }
  // Never to grow again, and no one else may seal it: release() can always shrink it to nothing.
  if (fcntl(fd, F_ADD_SEALS, kRevocable) != 0) {
    close(fd);
    unclaim();
    throw BackendError(errno_text("create: seal"));
  }
  std::lock_guard<std::mutex> lock(mutex_);
  Handle handle = next_handle_++;
  memory_.emplace(handle, Memory{fd, device, size});
  return handle;
}

Shareable HostBackend::export_handle(Handle handle) {
  std::lock_guard<std::mutex> lock(mutex_);
  int fd = fcntl(find_handle(memory_, handle).fd, F_DUPFD_CLOEXEC, 0);
  if (fd < 0) throw BackendError(errno_text("export: dup"));
  return Shareable{fd};
}

Handle HostBackend::import_memory(const Shareable& shareable, int device, size_t size, bool adopt) {
  // Engines import with no devices configured: only adopted memory names a real one.
  if (adopt) check_device(device);
  if (shareable.fd < 0) throw BackendError("import: the host backend shares file descriptors");
  struct stat st;
  if (fstat(shareable.fd, &st) != 0) throw BackendError(errno_text("import: fstat"));
  if (adopt) {
    // Adopted memory becomes the daemon's to release: it must be memory the daemon can take back.
    int seals = fcntl(shareable.fd, F_GET_SEALS);
    if (seals < 0 || (seals & kRevocable) != kRevocable || (seals & kBlocking) != 0)
      throw BackendError("import: this memory was not created by sleepd (its seals are " +
                         std::to_string(seals) + ", " + std::to_string(kRevocable) + " expected)");
  }
  if (static_cast<size_t>(st.st_size) < size)
    throw BackendError("import: memory holds " + std::to_string(st.st_size) + " bytes, " +
                       std::to_string(size) + " expected");
  int fd = fcntl(shareable.fd, F_DUPFD_CLOEXEC, 0);
  if (fd < 0) throw BackendError(errno_text("import: dup"));
  std::lock_guard<std::mutex> lock(mutex_);
  Handle handle = next_handle_++;
  memory_.emplace(handle, Memory{fd, adopt ? device : -1, size});
  if (adopt) used_[device] += size;
  return handle;
}

void HostBackend::release(Handle handle) {
  std::lock_guard<std::mutex> lock(mutex_);
  const Memory& memory = find_handle(memory_, handle);
  // The daemon's own memory is gone when the kernel says so, whoever kept a descriptor or a
  // mapping of it; imported memory (an engine's view, a mover's) is only let go of.
  if (memory.device >= 0) revoke(memory.fd, memory.size);
  close(memory.fd);
  if (memory.device >= 0) used_[memory.device] -= memory.size;
  memory_.erase(handle);
}

uintptr_t HostBackend::reserve(size_t size) {
  void* address = mmap(nullptr, size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (address == MAP_FAILED) throw BackendError(errno_text("reserve: mmap"));
  return reinterpret_cast<uintptr_t>(address);
}

void HostBackend::free_reservation(uintptr_t address, size_t size) {
  if (munmap(reinterpret_cast<void*>(address), size) != 0)
    throw BackendError(errno_text("free_reservation: munmap"));
}

void HostBackend::map(uintptr_t address, size_t size, Handle handle, int) {
  map_with(address, size, handle, PROT_READ | PROT_WRITE);
}

bool HostBackend::map_read_only(uintptr_t address, size_t size, Handle handle, int) {
  map_with(address, size, handle, PROT_READ);
  return true;
}

void HostBackend::map_with(uintptr_t address, size_t size, Handle handle, int protection) {
  int fd;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    const Memory& memory = find_handle(memory_, handle);
    if (size > memory.size)
      throw BackendError("map: " + std::to_string(size) + " bytes asked of a " +
                         std::to_string(memory.size) + "-byte handle");
    fd = memory.fd;
  }
  // MAP_FIXED replaces the PROT_NONE reservation in place.
  void* mapped = mmap(reinterpret_cast<void*>(address), size, protection, MAP_SHARED | MAP_FIXED, fd, 0);
  if (mapped == MAP_FAILED) throw BackendError(errno_text("map: mmap"));
}

void HostBackend::unmap(uintptr_t address, size_t size) {
  // Replacing the shared mapping with a fresh PROT_NONE one drops the reference
  // to the memory and keeps the address reserved, in one step.
  void* bare = mmap(reinterpret_cast<void*>(address), size, PROT_NONE,
                    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0);
  if (bare == MAP_FAILED) throw BackendError(errno_text("unmap: mmap"));
}

void HostBackend::copy(uintptr_t dst, uintptr_t src, size_t size) {
  parallel_copy(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), size);
}

int HostBackend::fd_for(Handle handle, size_t offset, size_t size, const char* call) const {
  std::lock_guard<std::mutex> lock(mutex_);
  const Memory& memory = find_handle(memory_, handle);
  if (offset > memory.size || size > memory.size - offset)
    throw BackendError(std::string(call) + ": range [" + std::to_string(offset) + ", +" + std::to_string(size) +
                       ") is outside the " + std::to_string(memory.size) + "-byte handle");
  return memory.fd;
}

// Through the file rather than a mapping: the kernel copies straight from the
// page cache, so no page tables are built for memory we touch only once.
Checksums HostBackend::copy_to_host(Handle src, size_t offset, void* dst, size_t size) {
  return parallel_pread(fd_for(src, offset, size, "copy_to_host"), offset, dst, size);
}

void HostBackend::copy_from_host(Handle dst, size_t offset, const void* src, size_t size, const Checksums* checksums) {
  pwrite_all(fd_for(dst, offset, size, "copy_from_host"), offset, src, size, checksums);
}

void HostBackend::zero(Handle dst, size_t offset, size_t size) {
  int fd = fd_for(dst, offset, size, "zero");
  if (size == 0) return;
  // tmpfs has no ZERO_RANGE: drop the pages (they read as zeros), then commit fresh ones.
  if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(offset),
                static_cast<off_t>(size)) != 0)
    throw BackendError(errno_text("zero: punch hole"));
  int rc = posix_fallocate(fd, static_cast<off_t>(offset), static_cast<off_t>(size));
  if (rc != 0) {
    errno = rc;
    throw BackendError(errno_text("zero: fallocate"));
  }
}

}  // namespace sleepd
