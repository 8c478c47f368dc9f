// The ACL backend: Ascend NPU memory through the runtime's virtual memory API
// (aclrtMallocPhysical / aclrtMapMem), shared between processes as uint64
// tokens that only processes on the token's PID allow-list may import.
//
// The runtime's rules, which the daemon, the movers and the engines follow:
//  * a handle is exported once; the token is kept and handed to every importer;
//  * a process that exports never imports, and the reverse: the daemon only
//    creates, exports, authorises and frees, the movers and engines import;
//  * an importer is authorised (aclrtMemSetPidToShareableHandle) by the id the
//    runtime knows it by (aclrtDeviceGetBareTgid), before it imports;
//  * a mapping covers a whole handle from offset 0;
//  * memory is freed when the exporter and every importer have freed their handles.
// Adoption after a daemon restart is refused: an imported handle cannot be
// exported again, so an engine has no token to hand back.
#pragma once

#include <map>
#include <mutex>
#include <set>
#include <thread>
#include <unordered_map>
#include <vector>

#include "acl_runtime.h"
#include "backend.h"

namespace sleepd {

class AclBackend : public Backend {
 public:
  AclBackend(std::shared_ptr<acl::Runtime> runtime, unsigned streams);

  std::string name() const override { return "acl"; }
  size_t granularity(int device) const override;

  Handle create(int device, size_t size, const std::string& label) override;
  Shareable export_handle(Handle handle) override;
  bool shares_tokens() const override { return true; }
  void authorize(Handle handle, int device_pid, Importer importer) override;
  void release(Handle handle) override;

  uintptr_t reserve(size_t size) override;
  void free_reservation(uintptr_t address, size_t size) override;
  void map(uintptr_t address, size_t size, Handle handle, int device) override;
  void unmap(uintptr_t address, size_t size) override;
  void synchronize() override;

  void copy(uintptr_t dst, uintptr_t src, size_t size) override;
  Checksums copy_to_host(Handle src, size_t offset, void* dst, size_t size) override;
  void copy_from_host(Handle dst, size_t offset, const void* src, size_t size, const Checksums* checksums) override;
  void zero(Handle dst, size_t offset, size_t size) override;
  void register_host(void* address, size_t size) override;
  bool pins_host_memory() const override { return true; }

  int device_count() const { return static_cast<int>(used_.size()); }
  // The device's memory as the runtime reports it: (free, total). Sets the device on this thread.
  std::pair<size_t, size_t> memory_info(int device);
  size_t used(int device) const;
  // The device this process works on (engines, movers).
  void set_device(int device);
  // The id the runtime knows this process by, which an exporter puts on a token's allow-list.
  int device_pid();

 protected:
  Handle import_memory(const Shareable& shareable, int device, size_t size, bool adopt) override;

 private:
  struct Memory {
    acl::aclrtDrvMemHandle handle;
    int device;
    size_t size;
    bool owned;                      // created here: counts against the device
    uint64_t token = 0;              // once exported
    int32_t owner_pid = 0;           // the token's allow-list, as last set: these two, where set
    int32_t mover_pid = 0;
    void* staging = nullptr;         // this process's own mapping, made on the first copy
  };

  void check_device(int device) const;
  // Makes `device` current on the calling thread, once per thread.
  void use_device(int device);
  std::pair<char*, int> staging(Handle handle, size_t offset, size_t size, const char* call);
  // Issues a transfer in chunks over this thread's streams (stream_chunks.h), with host work before and after each.
  template <typename Issue, typename Before, typename Landed>
  void chunked(int device, size_t size, Issue issue, Before before, Landed landed);

  std::shared_ptr<acl::Runtime> runtime_;
  unsigned stream_count_;
  mutable std::mutex mutex_;
  std::unordered_map<Handle, Memory> memory_;
  std::vector<size_t> used_;
  std::set<std::pair<int, std::thread::id>> devices_set_;
  // Per device and calling thread: the mover copies in both directions at once from two threads.
  std::map<std::pair<int, std::thread::id>, std::vector<acl::aclrtStream>> streams_;
  mutable std::vector<size_t> granularity_;
  int device_ = 0;
  Handle next_handle_ = 1;
};

}  // namespace sleepd
