// An NVML double, built as libnvidia-ml.so.1 for nvidia-ml-py to load: the
// calls sleepd uses, reporting the devices of the driver double (fakecuda.cpp).
//
// Memory "used" is what the kernel says is alive, as a real driver's own
// accounting would: every memfd the driver double made on the GPU for this test
// that any process still holds open or mapped, each counted once, plus memory the
// control file says processes outside sleepd hold (foreign_used_<gpu>=BYTES);
// nvml_lost=1 there makes memory queries fail as for a GPU fallen off the bus.
//
// GPUs are numbered as the machine numbers them (CUDA_VISIBLE_DEVICES does not
// apply to NVML), and NVML's indices run in reverse, as NVML's PCI order and
// CUDA's ordinals can differ on a real machine: only UUIDs match.
//
// A GPU in MIG mode (FAKE_CUDA_MIG, as fakecuda.cpp reads it) has one MIG
// instance, named "MIG-" and its own UUID, and holding FAKE_CUDA_MEMORY: the
// memory CUDA sees. The GPU itself, still found by its "GPU-" UUID, reports the
// whole board, kInstances times that.
#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <utility>

#include "alive_memory.h"

namespace {

using fake_memory::alive;

constexpr int SUCCESS = 0, INVALID_ARGUMENT = 2, NOT_FOUND = 6, GPU_IS_LOST = 15;
constexpr unsigned long long kInstances = 8;

struct Memory {
  unsigned long long total, free, used;
};

int devices() {
  const char* value = std::getenv("FAKE_CUDA_DEVICES");
  return value ? std::atoi(value) : 1;
}

unsigned long long capacity() {
  const char* value = std::getenv("FAKE_CUDA_MEMORY");
  return value ? std::strtoull(value, nullptr, 10) : 1ull << 30;
}

bool in_mig_mode(int gpu) {
  const char* list = std::getenv("FAKE_CUDA_MIG");
  std::istringstream items(list ? list : "");
  std::string item;
  while (std::getline(items, item, ','))
    if (!item.empty() && std::atoi(item.c_str()) == gpu) return true;
  return false;
}

// As the driver double makes them: see fill_uuid in fakecuda.cpp.
std::string uuid(int gpu, bool instance) {
  char text[64];
  if (instance)
    std::snprintf(text, sizeof text, "MIG-c0c1c2c3-c4c5-c6c7-c8c9-cacbcccdce%02x", gpu);
  else
    std::snprintf(text, sizeof text, "GPU-a0a1a2a3-a4a5-a6a7-a8a9-aaabacadae%02x", gpu);
  return text;
}

// A value from the driver double's control file, or 0.
unsigned long long control(const std::string& name) {
  const char* path = std::getenv("FAKE_CUDA_CONTROL");
  if (!path) return 0;
  std::ifstream file(path);
  std::string line, key = name + "=";
  while (std::getline(file, line))
    if (line.compare(0, key.size(), key) == 0) return std::strtoull(line.c_str() + key.size(), nullptr, 10);
  return 0;
}

// Handles are the GPU index plus one, so that none is null; a MIG instance's
// is its GPU's plus kInstanceHandle.
constexpr long kInstanceHandle = 1 << 16;
int gpu_of(void* handle) { return static_cast<int>(reinterpret_cast<long>(handle) % kInstanceHandle) - 1; }
bool is_instance(void* handle) { return reinterpret_cast<long>(handle) >= kInstanceHandle; }
void* handle_of(int gpu, bool instance = false) {
  return reinterpret_cast<void*>(static_cast<long>(gpu) + 1 + (instance ? kInstanceHandle : 0));
}
bool valid(void* handle) {
  int gpu = gpu_of(handle);
  return gpu >= 0 && gpu < devices() && (!is_instance(handle) || in_mig_mode(gpu));
}

}  // namespace

extern "C" {

int nvmlInitWithFlags(unsigned) { return SUCCESS; }
int nvmlInit_v2() { return SUCCESS; }
int nvmlShutdown() { return SUCCESS; }

const char* nvmlErrorString(int result) {
  switch (result) {
    case SUCCESS: return "Success";
    case INVALID_ARGUMENT: return "Invalid Argument";
    case NOT_FOUND: return "Not Found";
    case GPU_IS_LOST: return "GPU is lost";
    default: return "Unknown Error";
  }
}

int nvmlDeviceGetCount_v2(unsigned* count) {
  *count = static_cast<unsigned>(devices());
  return SUCCESS;
}

int nvmlDeviceGetHandleByIndex_v2(unsigned index, void** handle) {
  if (static_cast<int>(index) >= devices()) return INVALID_ARGUMENT;
  *handle = handle_of(devices() - 1 - static_cast<int>(index));
  return SUCCESS;
}

int nvmlDeviceGetHandleByUUID(const char* text, void** handle) {
  for (int gpu = 0; gpu < devices(); ++gpu) {
    for (bool instance : {false, true}) {
      if ((!instance || in_mig_mode(gpu)) && uuid(gpu, instance) == text) {
        *handle = handle_of(gpu, instance);
        return SUCCESS;
      }
    }
  }
  return NOT_FOUND;
}

int nvmlDeviceGetUUID(void* handle, char* text, unsigned length) {
  if (!valid(handle)) return INVALID_ARGUMENT;
  std::snprintf(text, length, "%s", uuid(gpu_of(handle), is_instance(handle)).c_str());
  return SUCCESS;
}

int nvmlDeviceGetMemoryInfo(void* handle, Memory* memory) {
  if (!valid(handle)) return INVALID_ARGUMENT;
  int gpu = gpu_of(handle);
  memory->total = capacity() * (in_mig_mode(gpu) && !is_instance(handle) ? kInstances : 1);
  if (control("nvml_lost")) return GPU_IS_LOST;
  memory->used = std::min(memory->total, alive(gpu) + control("foreign_used_" + std::to_string(gpu)));
  memory->free = memory->total - memory->used;
  return SUCCESS;
}

}  // extern "C"
