// The CUDA backend: device memory through the driver's virtual memory API
// (cuMemCreate / cuMemMap), shared between processes as POSIX file descriptors.
//
// The daemon uses only create/export/release, which need no context, and adopts
// memory after a restart by keeping the descriptor it is handed (the driver frees
// memory only once its shareable handles are closed too), so it never needs one.
// Engines and movers call set_device() once; every call that may need a context,
// importing included, makes the device's primary context current on the calling
// thread first: a thread starts with none.
#pragma once

#include <atomic>
#include <map>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <vector>

#include "backend.h"
#include "cuda_driver.h"

namespace sleepd {

// The calling thread's current context, set back when the scope ends. The CUDA runtime (and
// so torch) follows the driver's current context: one left set here would send the caller's
// next plain allocation to our device.
class ContextScope {
 public:
  ContextScope(const cu::Driver& driver, cu::CUcontext context);
  ~ContextScope();
  ContextScope(const ContextScope&) = delete;
  ContextScope& operator=(const ContextScope&) = delete;

 private:
  const cu::Driver& driver_;
  cu::CUcontext previous_ = nullptr;
  bool restore_ = false;
};

class CudaBackend : public Backend {
 public:
  CudaBackend(std::shared_ptr<cu::Driver> driver, unsigned streams);

  std::string name() const override { return "cuda"; }
  size_t granularity(int device) const override;

  Handle create(int device, size_t size, const std::string& label) override;
  Shareable export_handle(Handle handle) override;
  void release(Handle handle) override;

  uintptr_t reserve(size_t size) override;
  void free_reservation(uintptr_t address, size_t size) override;
  void map(uintptr_t address, size_t size, Handle handle, int device) override;
  bool map_read_only(uintptr_t address, size_t size, Handle handle, int device) override;
  void unmap(uintptr_t address, size_t size) override;
  void synchronize() override;

  void copy(uintptr_t dst, uintptr_t src, size_t size) override;
  Checksums copy_to_host(Handle src, size_t offset, void* dst, size_t size) override;
  void copy_from_host(Handle dst, size_t offset, const void* src, size_t size, const Checksums* checksums) override;
  void zero(Handle dst, size_t offset, size_t size) override;
  void register_host(void* address, size_t size) override;
  bool pins_host_memory() const override { return true; }

  int device_count() const { return static_cast<int>(used_.size()); }
  size_t total_memory(int device) const;
  // As NVML and nvidia-smi name the device: "GPU-", or "MIG-" for a MIG
  // instance, then its 16 bytes in hex, 8-4-4-4-12.
  std::string uuid(int device) const;
  // The device's compute mode (CU_COMPUTEMODE_*): whether processes beside the engines may have a context.
  int compute_mode(int device) const;
  size_t used(int device) const;
  // The device whose context this process works in (engines, movers).
  void set_device(int device);
  // Whether the driver refused a read-only mapping here (map_read_only then mapped read-write).
  bool read_only_refused() const { return read_only_refused_; }

 protected:
  Handle import_memory(const Shareable& shareable, int device, size_t size, bool adopt) override;

 private:
  // Maps with `flags` (CU_MEM_ACCESS_FLAGS_*); the driver's result of cuMemSetAccess, unmapped again on a failure.
  cu::CUresult map_with(uintptr_t address, size_t size, Handle handle, int device, int flags);

  std::atomic<bool> read_only_refused_{false};
  struct Memory {
    cu::CUmemGenericAllocationHandle handle;  // none for adopted memory, which `fd` holds
    int device;
    size_t size;
    bool owned;                 // counts against the device: created or adopted here, not imported
    cu::CUdeviceptr staging = 0;  // this process's own mapping, made on the first copy
    int fd = -1;                // adopted memory: the engine's descriptor, kept as the daemon's reference
  };

  void check_device(int device) const;
  // The driver's handle for `handle`.
  cu::CUmemGenericAllocationHandle driver_handle(Handle handle) const;
  // Makes the device's primary context current on this thread until the scope it returns ends.
  [[nodiscard]] ContextScope use_context(int device);
  // The handle mapped in this process for copies, and its device.
  std::pair<cu::CUdeviceptr, int> staging(Handle handle, size_t offset, size_t size, const char* call);
  // Issues a transfer in chunks over this thread's streams (stream_chunks.h), with host work before and after each.
  template <typename Issue, typename Before, typename Landed>
  void chunked(int device, size_t size, Issue issue, Before before, Landed landed);

  std::shared_ptr<cu::Driver> driver_;
  unsigned stream_count_;
  mutable std::mutex mutex_;
  std::unordered_map<Handle, Memory> memory_;
  std::vector<size_t> used_;
  std::vector<cu::CUcontext> contexts_;            // primary contexts, retained on first use
  // Per device and calling thread, made on first use: the mover copies in both
  // directions at once from two threads, and a shared stream would run one
  // direction's copies after the other's.
  std::map<std::pair<int, std::thread::id>, std::vector<cu::CUstream>> streams_;
  mutable std::vector<size_t> granularity_;        // per device, 0 until asked
  int device_ = 0;
  Handle next_handle_ = 1;
};

}  // namespace sleepd
