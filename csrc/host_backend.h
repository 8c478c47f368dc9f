// The host backend: "device" memory is shared memory from memfd_create, so the
// whole system runs on a machine with no accelerator. It simulates `devices`
// devices of `capacity` bytes each and enforces that capacity like a driver.
#pragma once

#include <mutex>
#include <unordered_map>
#include <vector>

#include "backend.h"

namespace sleepd {

class HostBackend : public Backend {
 public:
  // A backend built only to import and map (engines, movers) passes 0 devices.
  HostBackend(int devices, size_t capacity);
  ~HostBackend() override;

  std::string name() const override { return "host"; }
  size_t granularity(int) const override;

  Handle create(int device, size_t size, const std::string& label) override;
  Shareable export_handle(Handle handle) override;
  void release(Handle handle) override;

  uintptr_t reserve(size_t size) override;
  void free_reservation(uintptr_t address, size_t size) override;
  void map(uintptr_t address, size_t size, Handle handle, int device) override;
  bool map_read_only(uintptr_t address, size_t size, Handle handle, int device) override;
  void unmap(uintptr_t address, size_t size) override;

  void copy(uintptr_t dst, uintptr_t src, size_t size) override;
  Checksums copy_to_host(Handle src, size_t offset, void* dst, size_t size) override;
  void copy_from_host(Handle dst, size_t offset, const void* src, size_t size, const Checksums* checksums) override;
  void zero(Handle dst, size_t offset, size_t size) override;

  int devices() const { return static_cast<int>(used_.size()); }
  size_t capacity() const { return capacity_; }
  size_t used(int device) const;

 protected:
  Handle import_memory(const Shareable& shareable, int device, size_t size, bool adopt) override;

 private:
  struct Memory {
    int fd;
    int device;     // -1 for imported memory, which counts against no device
    size_t size;
  };
  // The handle's fd, after checking that [offset, offset + size) lies inside it.
  int fd_for(Handle handle, size_t offset, size_t size, const char* call) const;
  void check_device(int device) const;
  void map_with(uintptr_t address, size_t size, Handle handle, int protection);

  size_t capacity_;
  mutable std::mutex mutex_;
  std::vector<size_t> used_;
  std::unordered_map<Handle, Memory> memory_;
  Handle next_handle_ = 1;
};

}  // namespace sleepd
