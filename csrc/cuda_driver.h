// The slice of the CUDA driver API sleepd uses, declared here so that the
// extension builds with no CUDA toolkit, and loaded at run time with dlopen.
// Types and values follow the driver API's documented ABI; where a toolkit is
// installed, tests/test_cuda_headers.py checks every declaration here against
// its cuda.h (entry points by themselves; a constant or struct added here needs
// a line in tests/fakecuda/check_cuda_h.cpp).
#pragma once

#include <cstddef>
#include <memory>
#include <string>

namespace sleepd {
namespace cu {

using CUresult = int;
using CUdevice = int;
using CUdeviceptr = unsigned long long;
using CUmemGenericAllocationHandle = unsigned long long;
using CUcontext = struct CUctx_st*;
using CUstream = struct CUstream_st*;

constexpr CUresult CUDA_SUCCESS = 0;
constexpr CUresult CUDA_ERROR_OUT_OF_MEMORY = 2;
// After these the process's contexts are unusable: every later call fails the same way. cuda.h says
// so of each ("leaves the process in an inconsistent state", "must be terminated and relaunched"),
// except 214 and 999, which after an uncorrectable ECC error or an Xid behave the same in practice.
constexpr CUresult CUDA_ERROR_ECC_UNCORRECTABLE = 214;
constexpr CUresult CUDA_ERROR_CONTAINED = 226;
constexpr CUresult CUDA_ERROR_ILLEGAL_ADDRESS = 700;
constexpr CUresult CUDA_ERROR_LAUNCH_TIMEOUT = 702;
constexpr CUresult CUDA_ERROR_ASSERT = 710;
constexpr CUresult CUDA_ERROR_HARDWARE_STACK_ERROR = 714;
constexpr CUresult CUDA_ERROR_ILLEGAL_INSTRUCTION = 715;
constexpr CUresult CUDA_ERROR_MISALIGNED_ADDRESS = 716;
constexpr CUresult CUDA_ERROR_INVALID_ADDRESS_SPACE = 717;
constexpr CUresult CUDA_ERROR_INVALID_PC = 718;
constexpr CUresult CUDA_ERROR_LAUNCH_FAILED = 719;
constexpr CUresult CUDA_ERROR_TENSOR_MEMORY_LEAK = 721;
constexpr CUresult CUDA_ERROR_MPS_CLIENT_TERMINATED = 810;
constexpr CUresult CUDA_ERROR_EXTERNAL_DEVICE = 911;
constexpr CUresult CUDA_ERROR_UNKNOWN = 999;

constexpr int CU_DEVICE_ATTRIBUTE_COMPUTE_MODE = 20;
constexpr int CU_COMPUTEMODE_DEFAULT = 0;
constexpr int CU_COMPUTEMODE_PROHIBITED = 2;
constexpr int CU_COMPUTEMODE_EXCLUSIVE_PROCESS = 3;
constexpr int CU_MEM_ALLOCATION_TYPE_PINNED = 0x1;
constexpr int CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR = 0x1;
constexpr int CU_MEM_LOCATION_TYPE_DEVICE = 0x1;
constexpr int CU_MEM_ACCESS_FLAGS_PROT_READ = 0x1;
constexpr int CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 0x3;
constexpr int CU_MEM_ALLOC_GRANULARITY_MINIMUM = 0x0;
constexpr unsigned CU_MEMHOSTREGISTER_PORTABLE = 0x01;
constexpr unsigned CU_STREAM_NON_BLOCKING = 0x1;

struct CUuuid {
  unsigned char bytes[16];
};

struct CUmemLocation {
  int type;
  int id;
};

struct CUmemAllocationProp {
  int type;
  int requestedHandleTypes;
  CUmemLocation location;
  void* win32HandleMetaData;
  struct {
    unsigned char compressionType;
    unsigned char gpuDirectRDMACapable;
    unsigned short usage;
    unsigned char reserved[4];
  } allocFlags;
};

struct CUmemAccessDesc {
  CUmemLocation location;
  int flags;
};

// The entry points sleepd calls, as X(name, symbol, result, parameters...):
// `name` as the API documents it; `symbol` what the driver exports for the ABI
// declared here, which is what cuda.h #defines `name` to.
#define SLEEPD_CUDA_ENTRY_POINTS(X)                                                                   \
  X(cuInit, cuInit, CUresult, unsigned)                                                               \
  X(cuGetErrorString, cuGetErrorString, CUresult, CUresult, const char**)                             \
  X(cuDeviceGetCount, cuDeviceGetCount, CUresult, int*)                                               \
  X(cuDeviceTotalMem, cuDeviceTotalMem_v2, CUresult, size_t*, CUdevice)                               \
  X(cuDeviceGetUuid, cuDeviceGetUuid_v2, CUresult, CUuuid*, CUdevice)                                 \
  X(cuDeviceGetAttribute, cuDeviceGetAttribute, CUresult, int*, int, CUdevice)                        \
  X(cuDevicePrimaryCtxRetain, cuDevicePrimaryCtxRetain, CUresult, CUcontext*, CUdevice)               \
  X(cuCtxGetCurrent, cuCtxGetCurrent, CUresult, CUcontext*)                                           \
  X(cuCtxSetCurrent, cuCtxSetCurrent, CUresult, CUcontext)                                            \
  X(cuCtxSynchronize, cuCtxSynchronize, CUresult, void)                                               \
  X(cuMemGetAllocationGranularity, cuMemGetAllocationGranularity, CUresult, size_t*,                  \
    const CUmemAllocationProp*, int)                                                                  \
  X(cuMemCreate, cuMemCreate, CUresult, CUmemGenericAllocationHandle*, size_t,                        \
    const CUmemAllocationProp*, unsigned long long)                                                   \
  X(cuMemRelease, cuMemRelease, CUresult, CUmemGenericAllocationHandle)                               \
  X(cuMemExportToShareableHandle, cuMemExportToShareableHandle, CUresult, void*,                      \
    CUmemGenericAllocationHandle, int, unsigned long long)                                            \
  X(cuMemImportFromShareableHandle, cuMemImportFromShareableHandle, CUresult,                         \
    CUmemGenericAllocationHandle*, void*, int)                                                        \
  X(cuMemAddressReserve, cuMemAddressReserve, CUresult, CUdeviceptr*, size_t, size_t, CUdeviceptr,    \
    unsigned long long)                                                                               \
  X(cuMemAddressFree, cuMemAddressFree, CUresult, CUdeviceptr, size_t)                                \
  X(cuMemMap, cuMemMap, CUresult, CUdeviceptr, size_t, size_t, CUmemGenericAllocationHandle,          \
    unsigned long long)                                                                               \
  X(cuMemUnmap, cuMemUnmap, CUresult, CUdeviceptr, size_t)                                            \
  X(cuMemSetAccess, cuMemSetAccess, CUresult, CUdeviceptr, size_t, const CUmemAccessDesc*, size_t)    \
  X(cuMemcpy, cuMemcpy, CUresult, CUdeviceptr, CUdeviceptr, size_t)                                   \
  X(cuMemcpyDtoHAsync, cuMemcpyDtoHAsync_v2, CUresult, void*, CUdeviceptr, size_t, CUstream)          \
  X(cuMemcpyHtoDAsync, cuMemcpyHtoDAsync_v2, CUresult, CUdeviceptr, const void*, size_t, CUstream)    \
  X(cuMemsetD8Async, cuMemsetD8Async, CUresult, CUdeviceptr, unsigned char, size_t, CUstream)         \
  X(cuStreamCreate, cuStreamCreate, CUresult, CUstream*, unsigned)                                    \
  X(cuStreamSynchronize, cuStreamSynchronize, CUresult, CUstream)                                     \
  X(cuMemHostRegister, cuMemHostRegister_v2, CUresult, void*, size_t, unsigned)

// Superseded entry points sleepd calls on purpose, in the same form. The first
// cuDeviceGetUuid names a MIG instance by the GPU it is part of, where _v2 gives
// the instance's own UUID: a device whose two UUIDs differ is a MIG instance.
#define SLEEPD_CUDA_SUPERSEDED_ENTRY_POINTS(X) X(cuDeviceGetUuid_v1, cuDeviceGetUuid, CUresult, CUuuid*, CUdevice)

// Entry points, resolved by symbol from the loaded library.
struct Driver {
  // Never dlclose'd: contexts and pinned registrations live until the process
  // exits, and unloading the driver under them is unsafe.
  void* library = nullptr;
#define SLEEPD_CUDA_POINTER(name, symbol, result, ...) result (*name)(__VA_ARGS__) = nullptr;
  SLEEPD_CUDA_ENTRY_POINTS(SLEEPD_CUDA_POINTER)
  SLEEPD_CUDA_SUPERSEDED_ENTRY_POINTS(SLEEPD_CUDA_POINTER)
#undef SLEEPD_CUDA_POINTER

  // Loads `path` (empty: $SLEEPD_LIBCUDA, else libcuda.so.1) and calls cuInit.
  // Returns null and sets `reason` when the driver or a usable device is missing.
  static std::shared_ptr<Driver> load(const std::string& path, std::string* reason);

  // Throws OutOfMemory, ContextLost (after the errors above) or BackendError
  // naming `call` when `result` is an error.
  void check(CUresult result, const char* call) const;
};

}  // namespace cu
}  // namespace sleepd
