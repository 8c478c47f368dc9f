// Python bindings: sleepd._C. Every call that can reach the driver releases the
// GIL: the driver may block (a context's creation, a synchronise, a lock another
// thread's copy holds), and other threads (gRPC, hooks) must run meanwhile.
// Nothing here calls back into Python but a ChunkPool given a Python refill (tests of
// the carving alone: an engine's pools refill in C++, see daemon_refill.h).
#include <pybind11/functional.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <fcntl.h>
#include <sys/mman.h>

#include <cerrno>
#include <cstring>
#include <memory>
#include <optional>
#include <system_error>
#include <tuple>
#include <vector>

#include "acl_backend.h"
#include "backend.h"
#include "batches.h"
#include "checksum.h"
#include "chunk_pool.h"
#include "copy_engine.h"
#include "cuda_backend.h"
#include "daemon_refill.h"
#include "fd_channel.h"
#include "host_backend.h"

namespace py = pybind11;
using namespace sleepd;

namespace {

// import_handle and adopt_handle, as Python calls them: with the descriptor itself.
auto taking_fd(Handle (Backend::*take)(const Shareable&, int, size_t)) {
  return [take](Backend& self, int fd, int device, size_t size) { return (self.*take)(Shareable{fd}, device, size); };
}

void* as_pointer(uintptr_t address) { return reinterpret_cast<void*>(address); }

using BackendClass = py::class_<Backend, std::shared_ptr<Backend>>;

// Native failures as the Python exceptions callers catch.
void bind_errors(py::module_& m) {
  auto backend_error = py::register_exception<BackendError>(m, "BackendError", PyExc_RuntimeError);
  // Registered after its base, so that its translation is tried first.
  py::register_exception<ContextLost>(m, "ContextLostError", backend_error);
  // With the block it names as an attribute, so that the mover can say where the backup went bad.
  static py::handle mismatch = py::exception<ChecksumMismatch>(m, "ChecksumMismatch", backend_error).release();
  py::register_exception_translator([](std::exception_ptr error) {
    try {
      if (error) std::rethrow_exception(error);
    } catch (const ChecksumMismatch& failure) {
      py::object instance = py::reinterpret_borrow<py::object>(mismatch)(failure.what());
      instance.attr("block") = failure.block;
      PyErr_SetObject(mismatch.ptr(), instance.ptr());
    }
  });
  py::register_exception<OutOfMemory>(m, "OutOfMemoryError", PyExc_MemoryError);
  py::register_exception<ChannelTimeout>(m, "ChannelTimeout", PyExc_TimeoutError);
  py::register_exception_translator([](std::exception_ptr error) {
    try {
      if (error) std::rethrow_exception(error);
    } catch (const std::system_error& failure) {  // a failed system call: OSError, as Python's own would be
      PyErr_SetObject(PyExc_OSError, py::make_tuple(failure.code().value(), failure.what()).ptr());
    }
  });
}

// The one backend interface: memory, how processes share it, and mappings.
BackendClass bind_backend(py::module_& m) {
  BackendClass backend(m, "Backend");
  backend.def_property_readonly("name", &Backend::name)
      .def_property_readonly("pins_host_memory", &Backend::pins_host_memory)
      .def("granularity", &Backend::granularity, py::arg("device"), py::call_guard<py::gil_scoped_release>())
      .def("create", &Backend::create, py::arg("device"), py::arg("size"), py::arg("label") = "sleepd",
           py::call_guard<py::gil_scoped_release>(),
           "Create physical memory; raises OutOfMemoryError when the device is full.")
      .def(
          "export_handle",
          [](Backend& self, Handle handle) {
            if (self.shares_tokens()) throw BackendError(self.name() + " shares tokens: use export_token");
            return self.export_handle(handle).fd;
          },
          py::arg("handle"), py::call_guard<py::gil_scoped_release>(), "An fd the caller must close.")
      .def_property_readonly("shares_tokens", &Backend::shares_tokens)
      .def(
          "export_token",
          [](Backend& self, Handle handle) {
            if (!self.shares_tokens()) throw BackendError(self.name() + " shares file descriptors: use export_handle");
            return self.export_handle(handle).token;
          },
          py::arg("handle"), py::call_guard<py::gil_scoped_release>(),
          "The handle's token, the same on every call (token backends).")
      .def(
          "authorize",
          [](Backend& self, Handle handle, int device_pid, bool mover) {
            self.authorize(handle, device_pid, mover ? Backend::Importer::mover : Backend::Importer::owner);
          },
          py::arg("handle"), py::arg("device_pid"), py::arg("mover") = false,
          py::call_guard<py::gil_scoped_release>(),
          "Lets the process the runtime knows as device_pid import the handle's token, in place of the "
          "owner's (or, with mover, the mover's) process authorised before.")
      .def(
          "import_token",
          [](Backend& self, uint64_t token, int device, size_t size) {
            Shareable shareable;
            shareable.token = token;
            return self.import_handle(shareable, device, size);
          },
          py::arg("token"), py::arg("device"), py::arg("size"), py::call_guard<py::gil_scoped_release>(),
          "Import memory another process exported as a token and authorised this process for.")
      .def("import_handle", taking_fd(&Backend::import_handle), py::arg("shareable"), py::arg("device"),
           py::arg("size"), py::call_guard<py::gil_scoped_release>(),
           "Import memory shared by another process; a passed fd stays the caller's to close.")
      .def("adopt_handle", taking_fd(&Backend::adopt_handle), py::arg("shareable"), py::arg("device"),
           py::arg("size"), py::call_guard<py::gil_scoped_release>(),
           "Take memory an engine hands back as the daemon's own (after a restart); the fd stays the caller's.")
      .def("release", &Backend::release, py::arg("handle"), py::call_guard<py::gil_scoped_release>())
      .def("reserve", &Backend::reserve, py::arg("size"), py::call_guard<py::gil_scoped_release>())
      .def("free_reservation", &Backend::free_reservation, py::arg("address"), py::arg("size"),
           py::call_guard<py::gil_scoped_release>())
      .def("map", &Backend::map, py::arg("address"), py::arg("size"), py::arg("handle"), py::arg("device"),
           py::call_guard<py::gil_scoped_release>())
      .def("map_read_only", &Backend::map_read_only, py::arg("address"), py::arg("size"), py::arg("handle"),
           py::arg("device"), py::call_guard<py::gil_scoped_release>(),
           "Map for reading only; False where the device refused that and it is mapped read-write.")
      .def("unmap", &Backend::unmap, py::arg("address"), py::arg("size"), py::call_guard<py::gil_scoped_release>())
      .def("synchronize", &Backend::synchronize, py::call_guard<py::gil_scoped_release>(),
           "Wait for this process's work in flight on its device (kernels, copies).")
      .def(
          "register_host",
          [](Backend& self, uintptr_t address, size_t size) { self.register_host(as_pointer(address), size); },
          py::arg("address"), py::arg("size"), py::call_guard<py::gil_scoped_release>());
  return backend;
}

// Copies between device and host memory, and a mapped address's bytes read and written.
void bind_backend_copies(BackendClass& backend) {
  backend
      .def(
          "copy_to_host",
          [](Backend& self, Handle src, size_t offset, uintptr_t dst, size_t size) {
            return self.copy_to_host(src, offset, as_pointer(dst), size);
          },
          py::arg("src"), py::arg("offset"), py::arg("dst"), py::arg("size"), py::call_guard<py::gil_scoped_release>(),
          "Copies device memory to host memory; returns the checksums of what it wrote there.")
      .def(
          "copy_from_host",
          [](Backend& self, Handle dst, size_t offset, uintptr_t src, size_t size,
             const std::optional<Checksums>& checksums) {
            self.copy_from_host(dst, offset, as_pointer(src), size, checksums ? &*checksums : nullptr);
          },
          py::arg("dst"), py::arg("offset"), py::arg("src"), py::arg("size"), py::arg("checksums") = std::nullopt,
          py::call_guard<py::gil_scoped_release>(),
          "Copies host memory to device memory; with checksums, checks the host bytes against them on the way "
          "(ChecksumMismatch names the first block that differs).")
      .def("copy", &Backend::copy, py::arg("dst"), py::arg("src"), py::arg("size"),
           py::call_guard<py::gil_scoped_release>(), "Copy between addresses mapped in this process.")
      .def(
          "read",
          [](Backend& self, uintptr_t address, size_t size) {
            std::string data(size, '\0');
            {
              py::gil_scoped_release release;
              self.copy(reinterpret_cast<uintptr_t>(data.data()), address, size);
            }
            return py::bytes(data);
          },
          py::arg("address"), py::arg("size"), "The bytes at a mapped address (device or host).")
      .def(
          "write",
          [](Backend& self, uintptr_t address, const py::buffer& data) {
            py::buffer_info info = data.request();
            size_t size = static_cast<size_t>(info.size * info.itemsize);
            py::gil_scoped_release release;
            self.copy(address, reinterpret_cast<uintptr_t>(info.ptr), size);
          },
          py::arg("address"), py::arg("data"), "Copy a bytes-like object to a mapped address.")
      .def("zero", &Backend::zero, py::arg("dst"), py::arg("offset"), py::arg("size"),
           py::call_guard<py::gil_scoped_release>());
}

// All-or-none batches of creations, mappings and unmappings, and releases of many handles (batches.h).
void bind_backend_batches(BackendClass& backend) {
  backend
      .def(
          "create_all",
          [](Backend& self, const std::vector<std::tuple<int, size_t, std::string>>& creations) {
            std::vector<Creation> batch;
            for (const auto& [device, size, label] : creations) batch.push_back({device, size, label});
            py::gil_scoped_release release;
            return create_all(self, batch);
          },
          py::arg("creations"), "Handles for [(device, size, label)]: all created, or none and the error raised.")
      .def("release_all", &release_all, py::arg("handles"), py::call_guard<py::gil_scoped_release>(),
           "Release every handle, then raise the first failure, if any.")
      .def(
          "map_all",
          [](Backend& self, const std::vector<std::tuple<uint64_t, uintptr_t, size_t>>& mappings, int device,
             bool read_only) {
            std::vector<Mapping> batch;
            for (const auto& [shared, address, size] : mappings) {
              Shareable shareable;
              if (self.shares_tokens())
                shareable.token = shared;
              else
                shareable.fd = static_cast<int>(shared);
              batch.push_back({shareable, address, size, read_only});
            }
            py::gil_scoped_release release;
            return map_all(self, batch, device);
          },
          py::arg("mappings"), py::arg("device"), py::arg("read_only") = false,
          "Import and map [(fd or token, address, size)], closing every fd: all mapped (their imported "
          "handles returned), or none and the error raised. With read_only, as map_read_only does.")
      .def(
          "unmap_all",
          [](Backend& self, const std::vector<std::tuple<uintptr_t, size_t, Handle>>& unmappings) {
            std::vector<Unmapping> batch;
            for (const auto& [address, size, handle] : unmappings) batch.push_back({address, size, handle});
            py::gil_scoped_release release;
            return unmap_all(self, batch);
          },
          py::arg("unmappings"),
          "Unmap and release [(address, size, imported handle)] in order, stopping at a failure: "
          "(how many were done, why it stopped or '').");
}

void bind_host_backend(py::module_& m) {
  py::class_<HostBackend, Backend, std::shared_ptr<HostBackend>>(m, "HostBackend")
      .def(py::init<int, size_t>(), py::arg("devices") = 0, py::arg("capacity") = 0)
      .def_property_readonly("devices", &HostBackend::devices)
      .def_property_readonly("capacity", &HostBackend::capacity)
      .def("used", &HostBackend::used, py::arg("device"));
}

// name(library=""): why the backend over Loader's library (the CUDA driver, the ACL runtime) cannot run
// here, or None when it can.
template <typename Loader>
void bind_unavailable_reason(py::module_& m, const char* name, const char* doc) {
  m.def(
      name,
      [](const std::string& library) -> std::optional<std::string> {
        std::string reason;
        if (Loader::load(library, &reason)) return std::nullopt;
        return reason;
      },
      py::arg("library") = "", py::call_guard<py::gil_scoped_release>(), doc);
}

void bind_cuda_backend(py::module_& m) {
  py::class_<CudaBackend, Backend, std::shared_ptr<CudaBackend>>(m, "CudaBackend")
      .def(py::init([](const std::string& library, unsigned streams) {
             py::gil_scoped_release release;  // cuInit may take seconds
             std::string reason;
             auto driver = cu::Driver::load(library, &reason);
             if (!driver) throw BackendError("the CUDA backend is unavailable: " + reason);
             return std::make_shared<CudaBackend>(driver, streams);
           }),
           py::arg("library") = "", py::arg("streams") = 4,
           "Loads the driver (library, else $SLEEPD_LIBCUDA, else libcuda.so.1).")
      .def_property_readonly("device_count", &CudaBackend::device_count)
      .def("total_memory", &CudaBackend::total_memory, py::arg("device"),
           py::call_guard<py::gil_scoped_release>())
      .def("uuid", &CudaBackend::uuid, py::arg("device"), py::call_guard<py::gil_scoped_release>())
      .def("compute_mode", &CudaBackend::compute_mode, py::arg("device"),
           "CU_COMPUTEMODE_*: 0 default, 2 prohibited, 3 exclusive-process.")
      .def("used", &CudaBackend::used, py::arg("device"))
      .def_property_readonly("read_only_refused", &CudaBackend::read_only_refused)
      .def("set_device", &CudaBackend::set_device, py::arg("device"),
           py::call_guard<py::gil_scoped_release>());

  bind_unavailable_reason<cu::Driver>(m, "cuda_unavailable_reason",
                                      "Why the CUDA backend cannot run here, or None when it can.");
}

void bind_acl_backend(py::module_& m) {
  py::class_<AclBackend, Backend, std::shared_ptr<AclBackend>>(m, "AclBackend")
      .def(py::init([](const std::string& library, unsigned streams) {
             py::gil_scoped_release release;
             std::string reason;
             auto runtime = acl::Runtime::load(library, &reason);
             if (!runtime) throw BackendError("the ACL backend is unavailable: " + reason);
             return std::make_shared<AclBackend>(runtime, streams);
           }),
           py::arg("library") = "", py::arg("streams") = 4,
           "Loads the runtime (library, else $SLEEPD_LIBACL, else libascendcl.so).")
      .def_property_readonly("device_count", &AclBackend::device_count)
      .def("memory_info", &AclBackend::memory_info, py::arg("device"), py::call_guard<py::gil_scoped_release>(),
           "(free, total) bytes as the runtime reports them; sets the device on this thread.")
      .def("used", &AclBackend::used, py::arg("device"))
      .def("set_device", &AclBackend::set_device, py::arg("device"), py::call_guard<py::gil_scoped_release>())
      .def("device_pid", &AclBackend::device_pid, py::call_guard<py::gil_scoped_release>(),
           "The id the runtime knows this process by (aclrtDeviceGetBareTgid).");

  bind_unavailable_reason<acl::Runtime>(m, "acl_unavailable_reason",
                                        "Why the ACL backend cannot run here, or None when it can.");
}

void bind_fd_channel(py::module_& m) {
  py::class_<FdChannel, std::shared_ptr<FdChannel>>(
      m, "FdChannel", "The engine's fd socket connection; one request in flight, any thread, no GIL.")
      .def(py::init<int>(), py::arg("fd"), "Takes ownership of a connected, blocking SOCK_SEQPACKET socket.")
      .def(
          "exchange",
          [](FdChannel& self, py::bytes request, std::vector<int> fds, double timeout) {
            std::string data = request;
            Packet reply;
            {
              py::gil_scoped_release release;
              reply = self.exchange(data, fds, timeout);
            }
            return py::make_tuple(py::bytes(reply.data), reply.fds, reply.truncated);
          },
          py::arg("request"), py::arg("fds"), py::arg("timeout"),
          "(reply bytes, its descriptors, truncated); empty bytes and no descriptors: the daemon closed.")
      .def("close", &FdChannel::close, py::call_guard<py::gil_scoped_release>());
}

void bind_daemon_refill(py::module_& m) {
  py::class_<DaemonRefill, std::shared_ptr<DaemonRefill>>(
      m, "DaemonRefill", "A ChunkPool's chunks, allocated over the fd socket in C++.")
      .def(py::init<std::shared_ptr<FdChannel>, std::shared_ptr<Backend>, int, std::string, int64_t, double,
                    double>(),
           py::arg("channel"), py::arg("backend"), py::arg("device"), py::arg("tag"), py::arg("device_pid"),
           py::arg("answer_seconds"), py::arg("busy_seconds"))
      .def("use_channel", &DaemonRefill::use_channel, py::arg("channel"))
      .def(
          "take_landed",
          [](DaemonRefill& self) {
            std::vector<std::tuple<int64_t, size_t, size_t, uintptr_t, Handle>> landed;
            for (auto& region : self.take_landed())
              landed.emplace_back(region.id, region.size, region.mapped_size, region.address, region.handle);
            return landed;
          },
          "(id, size, mapped size, address, handle) of each region mapped since the last call.")
      .def("take_unmapped", &DaemonRefill::take_unmapped, "Ids of regions allocated but not mapped here.")
      .def_property_readonly("busy", &DaemonRefill::busy);
}

void bind_chunk_pool(py::module_& m) {
  py::class_<ChunkPool, std::shared_ptr<ChunkPool>>(
      m, "ChunkPool", "Carves allocations out of large chunks from `refill`.")
      .def(py::init([](std::shared_ptr<DaemonRefill> refill, size_t chunk_bytes, size_t alignment) {
             return std::make_shared<ChunkPool>([refill](size_t bytes) { return (*refill)(bytes); }, chunk_bytes,
                                                alignment);
           }),
           py::arg("refill"), py::arg("chunk_bytes"), py::arg("alignment") = 512)
      .def(py::init([](py::function refill, size_t chunk_bytes, size_t alignment) {
             // Takes the GIL inside the refill: never behind torch's hooks, see daemon_refill.h.
             auto call = [refill](size_t bytes) {
               py::gil_scoped_acquire gil;
               return refill(bytes).cast<std::pair<uintptr_t, size_t>>();
             };
             return std::make_shared<ChunkPool>(call, chunk_bytes, alignment);
           }),
           py::arg("refill"), py::arg("chunk_bytes"), py::arg("alignment") = 512)
      .def("allocate", &ChunkPool::allocate, py::arg("size"), py::call_guard<py::gil_scoped_release>())
      .def("deallocate", &ChunkPool::deallocate, py::arg("address"))
      .def_property_readonly("chunk_count", &ChunkPool::chunk_count)
      .def_property_readonly("bytes_in_use", &ChunkPool::bytes_in_use)
      .def("activate", &ChunkPool::activate, "Serve this thread's allocations through the C hooks.")
      .def("deactivate", &ChunkPool::deactivate);
}

// Host memory mapped from files (the backup pool's slabs) and seen from Python.
void bind_mapped_files(py::module_& m) {
  m.def(
      "map_file",
      [](int fd, size_t size, bool populate) {
        void* address = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED | (populate ? MAP_POPULATE : 0), fd, 0);
        if (address == MAP_FAILED) throw BackendError(std::string("map_file: mmap: ") + std::strerror(errno));
        return reinterpret_cast<uintptr_t>(address);
      },
      py::arg("fd"), py::arg("size"), py::arg("populate") = false, py::call_guard<py::gil_scoped_release>(),
      "Map a whole file shared, for host memory such as backup pool slabs.");
  m.def(
      "unmap_file",
      [](uintptr_t address, size_t size) {
        if (munmap(as_pointer(address), size) != 0)
          throw BackendError(std::string("unmap_file: munmap: ") + std::strerror(errno));
      },
      py::arg("address"), py::arg("size"));
  m.def(
      "memoryview",
      [](uintptr_t address, size_t size, bool readonly) {
        return py::memoryview::from_memory(as_pointer(address), static_cast<py::ssize_t>(size), readonly);
      },
      py::arg("address"), py::arg("size"), py::arg("readonly") = false,
      "A memoryview over mapped memory; it does not keep the mapping alive.");
  m.def(
      "punch_hole",
      [](int fd, size_t offset, size_t length) {
        if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(offset),
                      static_cast<off_t>(length)) != 0)
          throw BackendError(std::string("punch_hole: ") + std::strerror(errno));
      },
      py::arg("fd"), py::arg("offset"), py::arg("length"),
      "Give a file range's pages back to the kernel, keeping the file's size.");
}

void bind_checksums(py::module_& m) {
  m.attr("CHECKSUM_BLOCK") = kChecksumBlock;
  m.def(
      "crc32c",
      [](const py::buffer& data, bool portable) {
        py::buffer_info info = data.request();
        size_t size = static_cast<size_t>(info.size * info.itemsize);
        py::gil_scoped_release release;
        return portable ? crc32c_portable(info.ptr, size) : crc32c(info.ptr, size);
      },
      py::arg("data"), py::arg("portable") = false,
      "The CRC32C of a bytes-like object, as backups are checksummed (portable: without the CPU's instructions).");
  m.def("checksum_file", &checksum_file, py::arg("fd"), py::arg("offset"), py::arg("length"),
        py::call_guard<py::gil_scoped_release>(),
        "The CRC32C of each CHECKSUM_BLOCK of a file's bytes [offset, offset + length), as an offload takes them "
        "(read with pread: a file cut short raises BackendError, it never faults).");
  m.def("crc32c_in_hardware", &crc32c_in_hardware, "Whether checksums run on the CPU's CRC32 instructions here.");
  m.def("checksum_checking_seconds", &checking_seconds,
        "Seconds this process has spent checking backups against their checksums, all threads added up.");
}

void bind_copy_engine(py::module_& m) {
  m.def(
      "parallel_copy",
      [](uintptr_t dst, uintptr_t src, size_t size, unsigned threads) {
        parallel_copy(as_pointer(dst), as_pointer(src), size, threads);
      },
      py::arg("dst"), py::arg("src"), py::arg("size"), py::arg("threads") = 0,
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "plain_memcpy",
      [](uintptr_t dst, uintptr_t src, size_t size) { std::memcpy(as_pointer(dst), as_pointer(src), size); },
      py::arg("dst"), py::arg("src"), py::arg("size"), py::call_guard<py::gil_scoped_release>(),
      "One single-threaded memcpy: the baseline benchmarks compare against.");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "sleepd native core: memory backends and bulk copies";
  bind_errors(m);
  BackendClass backend = bind_backend(m);
  bind_backend_copies(backend);
  bind_backend_batches(backend);
  // Each backend after the interface it derives from.
  bind_host_backend(m);
  bind_cuda_backend(m);
  bind_acl_backend(m);
  bind_fd_channel(m);
  bind_daemon_refill(m);
  bind_chunk_pool(m);
  bind_mapped_files(m);
  bind_checksums(m);
  bind_copy_engine(m);
}
