// Many regions in one call. A sleep or wake of a model with a thousand small
// regions otherwise pays, per region, a trip through Python and a hand-off of
// the GIL, which together cost more than the system calls themselves.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "backend.h"

namespace sleepd {

struct Creation {
  int device;
  size_t size;
  std::string label;
};

// All or none: when one create fails, the memory made before it is released
// and the failure (OutOfMemory included) is rethrown.
std::vector<Handle> create_all(Backend& backend, const std::vector<Creation>& creations);

// Releases every handle, even after a failure; then rethrows the first one.
void release_all(Backend& backend, const std::vector<Handle>& handles);

struct Mapping {
  Shareable shared;  // a descriptor is closed by map_all, whatever happens
  uintptr_t address;
  size_t size;
  bool read_only = false;  // Backend::map_read_only
};

// Imports each shareable's memory and maps it at its address (a reservation of
// this process). All or none: on a failure, what was mapped goes back to a bare
// reservation before the failure is rethrown. Returns the imported handles.
std::vector<Handle> map_all(Backend& backend, const std::vector<Mapping>& mappings, int device);

struct Unmapping {
  uintptr_t address;
  size_t size;
  Handle handle;  // the imported handle behind the mapping, released after it
};

// Unmaps and releases in order, stopping at the first failure: returns how many
// were done and, if it stopped early, why.
std::pair<size_t, std::string> unmap_all(Backend& backend, const std::vector<Unmapping>& unmappings);

}  // namespace sleepd
