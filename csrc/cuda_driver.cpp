#include "cuda_driver.h"

#include <dlfcn.h>

#include <cstdlib>

#include "backend.h"

namespace sleepd {
namespace cu {
namespace {

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
#define SLEEPD_CUDA_SYMBOL(name, symbol, ...) {#symbol, reinterpret_cast<void**>(&d.name)},
  const Symbol symbols[] = {
      SLEEPD_CUDA_ENTRY_POINTS(SLEEPD_CUDA_SYMBOL) SLEEPD_CUDA_SUPERSEDED_ENTRY_POINTS(SLEEPD_CUDA_SYMBOL)};
#undef SLEEPD_CUDA_SYMBOL
  for (const Symbol& symbol : symbols) {
    *symbol.slot = dlsym(handle, symbol.name);
    if (!*symbol.slot) {
      *reason = library + " lacks " + symbol.name + " (a driver older than CUDA 11.4?)";
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
  switch (result) {
    case CUDA_ERROR_ECC_UNCORRECTABLE:
    case CUDA_ERROR_CONTAINED:
    case CUDA_ERROR_ILLEGAL_ADDRESS:
    case CUDA_ERROR_LAUNCH_TIMEOUT:
    case CUDA_ERROR_ASSERT:
    case CUDA_ERROR_HARDWARE_STACK_ERROR:
    case CUDA_ERROR_ILLEGAL_INSTRUCTION:
    case CUDA_ERROR_MISALIGNED_ADDRESS:
    case CUDA_ERROR_INVALID_ADDRESS_SPACE:
    case CUDA_ERROR_INVALID_PC:
    case CUDA_ERROR_LAUNCH_FAILED:
    case CUDA_ERROR_TENSOR_MEMORY_LEAK:
    case CUDA_ERROR_MPS_CLIENT_TERMINATED:
    case CUDA_ERROR_EXTERNAL_DEVICE:
    case CUDA_ERROR_UNKNOWN:
      throw ContextLost(message);
  }
  throw BackendError(message);
}

}  // namespace cu
}  // namespace sleepd
