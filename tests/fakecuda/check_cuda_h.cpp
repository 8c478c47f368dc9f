// Compiled, never run, by tests/test_cuda_headers.py against a CUDA toolkit's
// cuda.h: every declaration in csrc/cuda_driver.h must be the real ABI. A second
// compilation defines __CUDA_API_VERSION_INTERNAL, under which cuda.h declares
// superseded entry points instead of mapping their names to the current ones.
#include <cuda.h>

#include <cstddef>
#include <tuple>
#include <type_traits>
#include <utility>

// cuda.h #defines this flag, which cuda_driver.h declares as a constant: keep
// the real value and let ours be declared. cuda_driver.h comes after cuda.h, so
// that cuda.h's renaming macros (cuMemHostRegister -> cuMemHostRegister_v2)
// rename its members just as they rename the names used below.
constexpr auto kRealHostRegisterPortable = CU_MEMHOSTREGISTER_PORTABLE;
#undef CU_MEMHOSTREGISTER_PORTABLE

#include "cuda_driver.h"

namespace ours = sleepd::cu;

namespace {

// Whether a parameter or result of a type of ours passes as the real type does.
template <typename Ours, typename Real>
struct Passes : std::is_same<Ours, Real> {};
// Our ints stand for the header's enums (results, handle types, flags).
template <typename Real>
struct Passes<int, Real> : std::bool_constant<std::is_enum_v<Real> ? sizeof(Real) == sizeof(int)
                                                                     : std::is_same_v<Real, int>> {};
template <typename Ours, typename Real>
struct Passes<Ours*, Real*> : Passes<Ours, Real> {};
template <typename Ours, typename Real>
struct Passes<const Ours*, const Real*> : Passes<Ours, Real> {};
// Our structs stand for the header's: their layouts are checked below.
template <>
struct Passes<ours::CUuuid, ::CUuuid> : std::true_type {};
template <>
struct Passes<ours::CUmemAllocationProp, ::CUmemAllocationProp> : std::true_type {};
template <>
struct Passes<ours::CUmemAccessDesc, ::CUmemAccessDesc> : std::true_type {};

template <typename Ours, typename Real, typename = void>
struct SameParameters : std::false_type {};
template <typename... Ours, typename... Real>
struct SameParameters<std::tuple<Ours...>, std::tuple<Real...>, std::enable_if_t<sizeof...(Ours) == sizeof...(Real)>>
    : std::conjunction<Passes<Ours, Real>...> {};

template <typename Ours, typename Real>
struct SameCall : std::false_type {};
template <typename OurResult, typename... Ours, typename RealResult, typename... Real>
struct SameCall<OurResult (*)(Ours...), RealResult(Real...)>
    : std::bool_constant<Passes<OurResult, RealResult>::value &&
                         SameParameters<std::tuple<Ours...>, std::tuple<Real...>>::value> {};

constexpr bool same_text(const char* a, const char* b) {
  while (*a && *a == *b) ++a, ++b;
  return *a == *b;
}

}  // namespace

// The text of `name` once cuda.h's macros have expanded it.
#define EXPANDED(name) TEXT(name)
#define TEXT(text) #text

#ifndef __CUDA_API_VERSION_INTERNAL

#define CURRENT(name, symbol, ...)                                                                   \
  static_assert(same_text(#symbol, EXPANDED(name)),                                                  \
                "cuda_driver.h resolves " #symbol ", but cuda.h maps " #name " to " EXPANDED(name)); \
  static_assert(SameCall<decltype(ours::Driver::name), decltype(::name)>::value,                     \
                #symbol ": the signature in cuda_driver.h is not cuda.h's");
SLEEPD_CUDA_ENTRY_POINTS(CURRENT)

// Only what cuda.h maps to a newer symbol may be resolved as superseded.
#define SUPERSEDED(name, symbol, ...) \
  static_assert(!same_text(#symbol, EXPANDED(symbol)), #symbol " is current in cuda.h: list it with the others");
SLEEPD_CUDA_SUPERSEDED_ENTRY_POINTS(SUPERSEDED)

#define SAME_TYPE(type) static_assert(std::is_same_v<ours::type, ::type>, #type " is not cuda.h's");
SAME_TYPE(CUdevice)
SAME_TYPE(CUdeviceptr)
SAME_TYPE(CUmemGenericAllocationHandle)
static_assert(Passes<ours::CUresult, ::CUresult>::value, "CUresult does not pass as cuda.h's");

#define SAME_VALUE(ours_value, real_value)                                                      \
  static_assert(static_cast<long long>(ours::ours_value) == static_cast<long long>(real_value), \
                #ours_value " is not cuda.h's value");
SAME_VALUE(CUDA_SUCCESS, CUDA_SUCCESS)
SAME_VALUE(CUDA_ERROR_OUT_OF_MEMORY, CUDA_ERROR_OUT_OF_MEMORY)
SAME_VALUE(CUDA_ERROR_ILLEGAL_ADDRESS, CUDA_ERROR_ILLEGAL_ADDRESS)
SAME_VALUE(CUDA_ERROR_HARDWARE_STACK_ERROR, CUDA_ERROR_HARDWARE_STACK_ERROR)
SAME_VALUE(CUDA_ERROR_ILLEGAL_INSTRUCTION, CUDA_ERROR_ILLEGAL_INSTRUCTION)
SAME_VALUE(CUDA_ERROR_MISALIGNED_ADDRESS, CUDA_ERROR_MISALIGNED_ADDRESS)
SAME_VALUE(CUDA_ERROR_INVALID_ADDRESS_SPACE, CUDA_ERROR_INVALID_ADDRESS_SPACE)
SAME_VALUE(CUDA_ERROR_INVALID_PC, CUDA_ERROR_INVALID_PC)
SAME_VALUE(CUDA_ERROR_LAUNCH_FAILED, CUDA_ERROR_LAUNCH_FAILED)
SAME_VALUE(CUDA_ERROR_ECC_UNCORRECTABLE, CUDA_ERROR_ECC_UNCORRECTABLE)
SAME_VALUE(CUDA_ERROR_CONTAINED, CUDA_ERROR_CONTAINED)
SAME_VALUE(CUDA_ERROR_LAUNCH_TIMEOUT, CUDA_ERROR_LAUNCH_TIMEOUT)
SAME_VALUE(CUDA_ERROR_ASSERT, CUDA_ERROR_ASSERT)
SAME_VALUE(CUDA_ERROR_TENSOR_MEMORY_LEAK, CUDA_ERROR_TENSOR_MEMORY_LEAK)
SAME_VALUE(CUDA_ERROR_MPS_CLIENT_TERMINATED, CUDA_ERROR_MPS_CLIENT_TERMINATED)
SAME_VALUE(CUDA_ERROR_EXTERNAL_DEVICE, CUDA_ERROR_EXTERNAL_DEVICE)
SAME_VALUE(CUDA_ERROR_UNKNOWN, CUDA_ERROR_UNKNOWN)
SAME_VALUE(CU_MEM_ALLOCATION_TYPE_PINNED, CU_MEM_ALLOCATION_TYPE_PINNED)
SAME_VALUE(CU_DEVICE_ATTRIBUTE_COMPUTE_MODE, CU_DEVICE_ATTRIBUTE_COMPUTE_MODE)
SAME_VALUE(CU_COMPUTEMODE_DEFAULT, CU_COMPUTEMODE_DEFAULT)
SAME_VALUE(CU_COMPUTEMODE_PROHIBITED, CU_COMPUTEMODE_PROHIBITED)
SAME_VALUE(CU_COMPUTEMODE_EXCLUSIVE_PROCESS, CU_COMPUTEMODE_EXCLUSIVE_PROCESS)
SAME_VALUE(CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR)
SAME_VALUE(CU_MEM_LOCATION_TYPE_DEVICE, CU_MEM_LOCATION_TYPE_DEVICE)
SAME_VALUE(CU_MEM_ACCESS_FLAGS_PROT_READWRITE, CU_MEM_ACCESS_FLAGS_PROT_READWRITE)
SAME_VALUE(CU_MEM_ALLOC_GRANULARITY_MINIMUM, CU_MEM_ALLOC_GRANULARITY_MINIMUM)
SAME_VALUE(CU_MEMHOSTREGISTER_PORTABLE, kRealHostRegisterPortable)
SAME_VALUE(CU_STREAM_NON_BLOCKING, CU_STREAM_NON_BLOCKING)

#define SAME_LAYOUT(type)                                                                       \
  static_assert(sizeof(ours::type) == sizeof(::type) && alignof(ours::type) == alignof(::type), \
                #type " differs in size or alignment from cuda.h's");
#define SAME_FIELD(type, field)                                                                         \
  static_assert(offsetof(ours::type, field) == offsetof(::type, field) &&                               \
                    sizeof(std::declval<ours::type&>().field) == sizeof(std::declval<::type&>().field), \
                #type "." #field " differs in offset or size from cuda.h's");
SAME_LAYOUT(CUuuid)
SAME_FIELD(CUuuid, bytes)
SAME_LAYOUT(CUmemLocation)
SAME_FIELD(CUmemLocation, type)
SAME_FIELD(CUmemLocation, id)
SAME_LAYOUT(CUmemAllocationProp)
SAME_FIELD(CUmemAllocationProp, type)
SAME_FIELD(CUmemAllocationProp, requestedHandleTypes)
SAME_FIELD(CUmemAllocationProp, location)
SAME_FIELD(CUmemAllocationProp, win32HandleMetaData)
SAME_FIELD(CUmemAllocationProp, allocFlags)
SAME_FIELD(CUmemAllocationProp, allocFlags.compressionType)
SAME_FIELD(CUmemAllocationProp, allocFlags.gpuDirectRDMACapable)
SAME_FIELD(CUmemAllocationProp, allocFlags.usage)
SAME_FIELD(CUmemAllocationProp, allocFlags.reserved)
SAME_LAYOUT(CUmemAccessDesc)
SAME_FIELD(CUmemAccessDesc, location)
SAME_FIELD(CUmemAccessDesc, flags)

#else  // cuda.h declares the superseded entry points under their own names

#define SUPERSEDED_CALL(name, symbol, ...)                                         \
  static_assert(SameCall<decltype(ours::Driver::name), decltype(::symbol)>::value, \
                #symbol ": the signature in cuda_driver.h is not cuda.h's");
SLEEPD_CUDA_SUPERSEDED_ENTRY_POINTS(SUPERSEDED_CALL)

#endif
