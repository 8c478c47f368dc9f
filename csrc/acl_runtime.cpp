#include "acl_runtime.h"

#include <dlfcn.h>

#include <cstdlib>

#include "backend.h"

namespace sleepd {
namespace acl {

std::shared_ptr<Runtime> Runtime::load(const std::string& path, std::string* reason) {
  std::string library = path;
  if (library.empty()) {
    const char* override_path = std::getenv("SLEEPD_LIBACL");
    library = override_path && *override_path ? override_path : "libascendcl.so";
  }
  void* handle = dlopen(library.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!handle) {
    *reason = std::string("cannot load the ACL runtime (") + dlerror() + ")";
    return nullptr;
  }
  auto runtime = std::make_shared<Runtime>();
  runtime->library = handle;
  Runtime& r = *runtime;
  struct Symbol {
    const char* name;
    void** slot;
  };
#define SLEEPD_ACL_SYMBOL(name, ...) {#name, reinterpret_cast<void**>(&r.name)},
  const Symbol symbols[] = {SLEEPD_ACL_ENTRY_POINTS(SLEEPD_ACL_SYMBOL)};
#undef SLEEPD_ACL_SYMBOL
  for (const Symbol& symbol : symbols) {
    *symbol.slot = dlsym(handle, symbol.name);
    if (!*symbol.slot) {
      *reason = library + " lacks " + symbol.name + " (a CANN release without the virtual memory API?)";
      return nullptr;
    }
  }
  // aclInit may be called once per process; a second call reports it, which is fine.
  aclError result = r.aclInit(nullptr);
  if (result != ACL_SUCCESS && result != ACL_ERROR_REPEAT_INITIALIZE) {
    *reason = "aclInit failed: error " + std::to_string(result);
    return nullptr;
  }
  uint32_t count = 0;
  if (r.aclrtGetDeviceCount(&count) != ACL_SUCCESS || count == 0) {
    *reason = "the ACL runtime sees no NPU";
    return nullptr;
  }
  return runtime;
}

void Runtime::check(aclError result, const char* call) const {
  if (result == ACL_SUCCESS) return;
  const char* text = aclGetRecentErrMsg();
  std::string message = std::string(call) + ": ACL error " + std::to_string(result) +
                        (text && *text ? std::string(" (") + text + ")" : "");
  if (result == ACL_ERROR_RT_MEMORY_ALLOCATION) throw OutOfMemory(message);
  if (result == ACL_ERROR_RT_DEVICE_TASK_ABORT || result == ACL_ERROR_RT_AICORE_EXCEPTION ||
      result == ACL_ERROR_RT_DEVICE_MEM_ERROR)
    throw ContextLost(message);
  throw BackendError(message);
}

}  // namespace acl
}  // namespace sleepd
