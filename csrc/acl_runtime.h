// The slice of Ascend's ACL runtime (AscendCL) sleepd uses, declared here so
// that the extension builds with no CANN toolkit, and loaded at run time with
// dlopen. Types, enum values and error codes are those of CANN's public
// acl/acl_rt.h, acl/acl_base_rt.h and acl/error_codes/rt_error_codes.h
// (hicann/runtime, include/external/acl, 2025 open-source release); each
// constant below names the header it comes from.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace sleepd {
namespace acl {

using aclError = int;                  // acl_base_rt.h
using aclrtStream = void*;             // acl_base_rt.h
using aclrtDrvMemHandle = void*;       // acl_rt.h

constexpr aclError ACL_SUCCESS = 0;                           // acl_base_rt.h
constexpr aclError ACL_ERROR_REPEAT_INITIALIZE = 100002;      // acl_base_rt.h: aclInit twice in one process
constexpr aclError ACL_ERROR_RT_MEMORY_ALLOCATION = 207001;   // rt_error_codes.h: out of memory
// rt_error_codes.h: after these the device is unusable for this process.
constexpr aclError ACL_ERROR_RT_DEVICE_TASK_ABORT = 107022;
constexpr aclError ACL_ERROR_RT_AICORE_EXCEPTION = 507015;
constexpr aclError ACL_ERROR_RT_DEVICE_MEM_ERROR = 507053;

// acl_rt.h, enum aclrtMemcpyKind.
enum aclrtMemcpyKind : int {
  ACL_MEMCPY_HOST_TO_HOST = 0,
  ACL_MEMCPY_HOST_TO_DEVICE = 1,
  ACL_MEMCPY_DEVICE_TO_HOST = 2,
  ACL_MEMCPY_DEVICE_TO_DEVICE = 3,
  ACL_MEMCPY_DEFAULT = 4,
};

// acl_rt.h, enum aclrtMemAttr (first two of many).
enum aclrtMemAttr : int { ACL_DDR_MEM = 0, ACL_HBM_MEM = 1 };
// acl_rt.h, enum aclrtMemLocationType.
enum aclrtMemLocationType : int { ACL_MEM_LOCATION_TYPE_HOST = 0, ACL_MEM_LOCATION_TYPE_DEVICE = 1 };
// acl_rt.h, enum aclrtMemAllocationType.
enum aclrtMemAllocationType : int { ACL_MEM_ALLOCATION_TYPE_PINNED = 0 };
// acl_rt.h, enum aclrtMemHandleType: export takes NONE ("reserved, must be NONE").
enum aclrtMemHandleType : int { ACL_MEM_HANDLE_TYPE_NONE = 0, ACL_MEM_HANDLE_TYPE_POSIX = 2 };
// acl_rt.h, enum aclrtMemGranularityOptions.
enum aclrtMemGranularityOptions : int { ACL_RT_MEM_ALLOC_GRANULARITY_MINIMUM = 0, ACL_RT_MEM_ALLOC_GRANULARITY_RECOMMENDED = 1 };
// acl_rt.h, enum aclrtHostRegisterType.
enum aclrtHostRegisterType : int { ACL_HOST_REGISTER_MAPPED = 0 };
// acl_rt.h: flags of aclrtMemExportToShareableHandle. sleepd never disables the PID check.
constexpr uint64_t ACL_RT_VMM_EXPORT_FLAG_DEFAULT = 0x0;

// acl_rt.h, struct aclrtMemLocation and aclrtPhysicalMemProp.
struct aclrtMemLocation {
  uint32_t id;
  aclrtMemLocationType type;
};

struct aclrtPhysicalMemProp {
  aclrtMemHandleType handleType;
  aclrtMemAllocationType allocationType;
  aclrtMemAttr memAttr;
  aclrtMemLocation location;
  uint64_t reserve;
};

// The entry points sleepd calls, as X(name, result, parameters...), with
// acl_rt.h's signatures.
#define SLEEPD_ACL_ENTRY_POINTS(X)                                                                       \
  X(aclInit, aclError, const char*)                                                                      \
  X(aclGetRecentErrMsg, const char*, void)                                                               \
  X(aclrtGetDeviceCount, aclError, uint32_t*)                                                            \
  X(aclrtSetDevice, aclError, int32_t)                                                                   \
  X(aclrtSynchronizeDevice, aclError, void)                                                              \
  X(aclrtGetMemInfo, aclError, aclrtMemAttr, size_t*, size_t*)                                           \
  X(aclrtMemGetAllocationGranularity, aclError, aclrtPhysicalMemProp*, aclrtMemGranularityOptions,      \
    size_t*)                                                                                             \
  X(aclrtMallocPhysical, aclError, aclrtDrvMemHandle*, size_t, const aclrtPhysicalMemProp*, uint64_t)   \
  X(aclrtFreePhysical, aclError, aclrtDrvMemHandle)                                                      \
  X(aclrtMemExportToShareableHandle, aclError, aclrtDrvMemHandle, aclrtMemHandleType, uint64_t,         \
    uint64_t*)                                                                                           \
  X(aclrtMemSetPidToShareableHandle, aclError, uint64_t, int32_t*, size_t)                               \
  X(aclrtMemImportFromShareableHandle, aclError, uint64_t, int32_t, aclrtDrvMemHandle*)                  \
  X(aclrtDeviceGetBareTgid, aclError, int32_t*)                                                          \
  X(aclrtReserveMemAddress, aclError, void**, size_t, size_t, void*, uint64_t)                           \
  X(aclrtReleaseMemAddress, aclError, void*)                                                             \
  X(aclrtMapMem, aclError, void*, size_t, size_t, aclrtDrvMemHandle, uint64_t)                           \
  X(aclrtUnmapMem, aclError, void*)                                                                      \
  X(aclrtMemcpy, aclError, void*, size_t, const void*, size_t, aclrtMemcpyKind)                          \
  X(aclrtMemcpyAsync, aclError, void*, size_t, const void*, size_t, aclrtMemcpyKind, aclrtStream)        \
  X(aclrtMemsetAsync, aclError, void*, size_t, int32_t, size_t, aclrtStream)                             \
  X(aclrtCreateStream, aclError, aclrtStream*)                                                           \
  X(aclrtSynchronizeStream, aclError, aclrtStream)                                                       \
  X(aclrtHostRegister, aclError, void*, uint64_t, aclrtHostRegisterType, void**)

// Entry points, resolved by name from the loaded library.
struct Runtime {
  // Never dlclose'd: devices and registrations live until the process exits.
  void* library = nullptr;
#define SLEEPD_ACL_POINTER(name, result, ...) result (*name)(__VA_ARGS__) = nullptr;
  SLEEPD_ACL_ENTRY_POINTS(SLEEPD_ACL_POINTER)
#undef SLEEPD_ACL_POINTER

  // Loads `path` (empty: $SLEEPD_LIBACL, else libascendcl.so) and calls aclInit
  // once per process. Returns null and sets `reason` when the runtime or a
  // device is missing.
  static std::shared_ptr<Runtime> load(const std::string& path, std::string* reason);

  // Throws OutOfMemory, ContextLost or BackendError naming `call` when `result` is an error.
  void check(aclError result, const char* call) const;
};

}  // namespace acl
}  // namespace sleepd
