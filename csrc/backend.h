// One interface for every kind of accelerator memory sleepd manages.
//
// A backend knows how to create physical memory, share it with another process,
// map it at an address that stays reserved for the region's whole life, and move
// bytes. The daemon uses the create/export/release half; engines and movers use
// the import/reserve/map half. Nothing here keeps process-wide state.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace sleepd {

// Raised when a device has no room for a new allocation.
struct OutOfMemory : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Raised for every other backend failure; the message names the call.
struct BackendError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Raised when the device's context is broken for good (a fault on a GPU): every
// later call in this process fails the same way, and only a new process can use
// the device again.
struct ContextLost : BackendError {
  using BackendError::BackendError;
};

// What crosses a process boundary: a file descriptor (host, CUDA), or an
// opaque token sent in-band (ACL), which only processes the exporter has
// authorised may import.
struct Shareable {
  int fd = -1;
  uint64_t token = 0;
};

using Handle = uint64_t;

// The checksums of bytes in host memory, one per block (checksum.h).
using Checksums = std::vector<uint32_t>;

// A backend's record of `handle` in `table` (handle -> record); the caller holds
// the lock that guards the table.
template <typename Table>
auto& find_handle(Table& table, Handle handle) {
  auto it = table.find(handle);
  if (it == table.end()) throw BackendError("unknown handle " + std::to_string(handle));
  return it->second;
}

class Backend {
 public:
  virtual ~Backend() = default;

  virtual std::string name() const = 0;
  // Allocation and mapping sizes are multiples of this.
  virtual size_t granularity(int device) const = 0;

  // Physical memory. `create` fails with OutOfMemory when the device is full.
  // `label` names the memory where the system shows it (memfd names); may be ignored.
  virtual Handle create(int device, size_t size, const std::string& label) = 0;
  // A returned descriptor belongs to the caller, who must close it. A token
  // backend exports each handle once and returns the same token every time.
  virtual Shareable export_handle(Handle handle) = 0;
  // Whether shareables are tokens, imported only by the processes `authorize` named.
  virtual bool shares_tokens() const { return false; }
  // Who imports a handle's token: the process of the session that owns it, and its device's mover.
  enum class Importer { owner, mover };
  // Token backends: lets the process the runtime knows as `device_pid` import
  // `handle`'s token (the exporter's side), in place of the one `importer` named
  // before (which has exited, or handed the handle on): an allow-list names no
  // process that is gone. Others have nothing to authorise.
  virtual void authorize(Handle /*handle*/, int /*device_pid*/, Importer /*importer*/) {
    throw BackendError(name() + " shares file descriptors: there is no allow-list to add a process to");
  }
  // Does not take ownership of `shareable.fd`: the caller closes it. A token is
  // imported only by a process the exporter authorised, never by the exporter.
  Handle import_handle(const Shareable& shareable, int device, size_t size) {
    return import_memory(shareable, device, size, false);
  }
  // Takes memory back from an engine after a daemon restart: like import, but the
  // handle becomes the daemon's own and counts against the device again.
  Handle adopt_handle(const Shareable& shareable, int device, size_t size) {
    return import_memory(shareable, device, size, true);
  }
  virtual void release(Handle handle) = 0;

  // Virtual address space. `unmap` leaves a bare reservation at the same address.
  virtual uintptr_t reserve(size_t size) = 0;
  virtual void free_reservation(uintptr_t address, size_t size) = 0;
  virtual void map(uintptr_t address, size_t size, Handle handle, int device) = 0;
  // Maps for reading only (a weight set's memory, shared between engines), so that one
  // engine's stray write faults instead of changing what the others compute with. Returns
  // false where the device refuses read-only access: then it is mapped read-write.
  virtual bool map_read_only(uintptr_t address, size_t size, Handle handle, int device) {
    map(address, size, handle, device);
    return false;
  }
  virtual void unmap(uintptr_t address, size_t size) = 0;
  // Waits until the work this process queued on its device (kernels, copies) has
  // finished, so that another process reads what it wrote. A no-op on the host.
  virtual void synchronize() {}

  // Copies between addresses mapped in this process (device or host alike).
  virtual void copy(uintptr_t dst, uintptr_t src, size_t size) = 0;
  // Bulk movement between a handle's memory (from `offset`) and host memory of
  // this process, such as a backup pool slab. Large transfers are split across
  // threads (host) or streams (GPU); each call returns when its bytes have moved.
  // copy_to_host returns the checksums of the bytes it wrote at `dst`; copy_from_host,
  // given `checksums`, checks the bytes at `src` against them as it copies, and raises
  // ChecksumMismatch at the first block that differs (checksum.h). Either computes
  // them on the way, while the bytes are in the CPU's cache or other chunks in flight.
  virtual Checksums copy_to_host(Handle src, size_t offset, void* dst, size_t size) = 0;
  virtual void copy_from_host(Handle dst, size_t offset, const void* src, size_t size,
                              const Checksums* checksums) = 0;
  virtual void zero(Handle dst, size_t offset, size_t size) = 0;
  // Prepares host memory for fast copies once (a GPU pins it); a no-op elsewhere.
  virtual void register_host(void* /*address*/, size_t /*size*/) {}
  // Whether register_host pins: the pages it found then stay the ones copies use
  // until the process ends, even if the file they belong to drops them.
  virtual bool pins_host_memory() const { return false; }

 protected:
  // Import and adopt in one: `adopt` makes the memory count against `device`.
  virtual Handle import_memory(const Shareable& shareable, int device, size_t size, bool adopt) = 0;
};

}  // namespace sleepd
