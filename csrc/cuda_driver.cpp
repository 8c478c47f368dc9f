#include "cuda_driver.h"

#include <dlfcn.h>

#include <cstdlib>

#include "backend.h"

namespace sleepd {
namespace cu {
namespace {

// Several entry points exist in versioned forms; the driver exports the
// current ABI under the suffixed name.
struct Symbol {
  const char* name;
  void** slot;
};

}  // namespace

std::shared_ptr<Driver> Driver::load(const std::string& path, std::string* reason) {
  std::string library = path;
  if (library.empty()) {
    const char* override_path = std::getenv("SLEEPD_LIBCUDA");
    library = override_path && *override_path ? override_path : "libcuda.so.1";
  }
  void* handle = dlopen(library.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!handle) {
    *reason = std::string("cannot load the CUDA driver (") + dlerror() + ")";
    return nullptr;
  }
  auto driver = std::make_shared<Driver>();
  driver->library = handle;
  Driver& d = *driver;
  const Symbol symbols[] = {
      {"cuInit", reinterpret_cast<void**>(&d.cuInit)},
      {"cuGetErrorString", reinterpret_cast<void**>(&d.cuGetErrorString)},
      {"cuDeviceGetCount", reinterpret_cast<void**>(&d.cuDeviceGetCount)},
      {"cuDeviceTotalMem_v2", reinterpret_cast<void**>(&d.cuDeviceTotalMem)},
      {"cuDeviceGetUuid", reinterpret_cast<void**>(&d.cuDeviceGetUuid)},
      {"cuDevicePrimaryCtxRetain", reinterpret_cast<void**>(&d.cuDevicePrimaryCtxRetain)},
      {"cuCtxSetCurrent", reinterpret_cast<void**>(&d.cuCtxSetCurrent)},
      {"cuCtxSynchronize", reinterpret_cast<void**>(&d.cuCtxSynchronize)},
      {"cuMemGetAllocationGranularity", reinterpret_cast<void**>(&d.cuMemGetAllocationGranularity)},
      {"cuMemCreate", reinterpret_cast<void**>(&d.cuMemCreate)},
      {"cuMemRelease", reinterpret_cast<void**>(&d.cuMemRelease)},
      {"cuMemExportToShareableHandle", reinterpret_cast<void**>(&d.cuMemExportToShareableHandle)},
      {"cuMemImportFromShareableHandle", reinterpret_cast<void**>(&d.cuMemImportFromShareableHandle)},
      {"cuMemAddressReserve", reinterpret_cast<void**>(&d.cuMemAddressReserve)},
      {"cuMemAddressFree", reinterpret_cast<void**>(&d.cuMemAddressFree)},
      {"cuMemMap", reinterpret_cast<void**>(&d.cuMemMap)},
      {"cuMemUnmap", reinterpret_cast<void**>(&d.cuMemUnmap)},
      {"cuMemSetAccess", reinterpret_cast<void**>(&d.cuMemSetAccess)},
      {"cuMemcpy", reinterpret_cast<void**>(&d.cuMemcpy)},
      {"cuMemcpyDtoHAsync_v2", reinterpret_cast<void**>(&d.cuMemcpyDtoHAsync)},
      {"cuMemcpyHtoDAsync_v2", reinterpret_cast<void**>(&d.cuMemcpyHtoDAsync)},
      {"cuMemsetD8Async", reinterpret_cast<void**>(&d.cuMemsetD8Async)},
      {"cuStreamCreate", reinterpret_cast<void**>(&d.cuStreamCreate)},
      {"cuStreamSynchronize", reinterpret_cast<void**>(&d.cuStreamSynchronize)},
      {"cuMemHostRegister_v2", reinterpret_cast<void**>(&d.cuMemHostRegister)},
  };
  for (const Symbol& symbol : symbols) {
    *symbol.slot = dlsym(handle, symbol.name);
    if (!*symbol.slot) {
      *reason = library + " lacks " + symbol.name + " (a driver older than CUDA 11.x?)";
      return nullptr;
    }
  }
  CUresult result = d.cuInit(0);
  if (result != CUDA_SUCCESS) {
    const char* text = nullptr;
    d.cuGetErrorString(result, &text);
    *reason = std::string("cuInit failed: ") + (text ? text : std::to_string(result));
    return nullptr;
  }
  int count = 0;
  if (d.cuDeviceGetCount(&count) != CUDA_SUCCESS || count == 0) {
    *reason = "the CUDA driver sees no device";
    return nullptr;
  }
  return driver;
}

void Driver::check(CUresult result, const char* call) const {
  if (result == CUDA_SUCCESS) return;
  const char* text = nullptr;
  cuGetErrorString(result, &text);
  std::string message = std::string(call) + ": " + (text ? text : "CUDA error " + std::to_string(result));
  if (result == CUDA_ERROR_OUT_OF_MEMORY) throw OutOfMemory(message);
  throw BackendError(message);
}

}  // namespace cu
}  // namespace sleepd
