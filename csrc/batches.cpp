#include "batches.h"

#include <unistd.h>

#include <algorithm>
#include <exception>
#include <thread>

namespace sleepd {

namespace {

// Creating and releasing memory is mostly the kernel's or the driver's work, which
// runs in parallel; a batch this large is split across a few threads.
constexpr size_t kParallelFrom = 64;
constexpr unsigned kMaxThreads = 4;

// Runs work(begin, end) over slices of [0, count), in parallel for large counts;
// rethrows the first failure once every slice has finished.
template <typename Work>
void in_slices(size_t count, Work work) {
  unsigned threads = std::min(kMaxThreads, std::max(1u, std::thread::hardware_concurrency()));
  if (count < kParallelFrom || threads == 1) {
    work(size_t{0}, count);
    return;
  }
  std::vector<std::exception_ptr> failures(threads);
  std::vector<std::thread> workers;
  size_t slice = (count + threads - 1) / threads;
  for (unsigned t = 0; t < threads; ++t) {
    size_t begin = std::min(count, t * slice), end = std::min(count, begin + slice);
    workers.emplace_back([&, t, begin, end] {
      try {
        work(begin, end);
      } catch (...) {
        failures[t] = std::current_exception();
      }
    });
  }
  for (auto& worker : workers) worker.join();
  for (auto& failure : failures)
    if (failure) std::rethrow_exception(failure);
}

}  // namespace

std::vector<Handle> create_all(Backend& backend, const std::vector<Creation>& creations) {
  std::vector<Handle> handles(creations.size());
  std::vector<char> created(creations.size(), 0);  // not vector<bool>: slices write it from several threads
  try {
    in_slices(creations.size(), [&](size_t begin, size_t end) {
      for (size_t i = begin; i < end; ++i) {
        handles[i] = backend.create(creations[i].device, creations[i].size, creations[i].label);
        created[i] = 1;
      }
    });
  } catch (...) {
    std::vector<Handle> made;
    for (size_t i = 0; i < handles.size(); ++i)
      if (created[i]) made.push_back(handles[i]);
    release_all(backend, made);
    throw;
  }
  return handles;
}

void release_all(Backend& backend, const std::vector<Handle>& handles) {
  // Each slice releases all of its handles before it reports its first failure.
  in_slices(handles.size(), [&](size_t begin, size_t end) {
    std::exception_ptr first;
    for (size_t i = begin; i < end; ++i) {
      try {
        backend.release(handles[i]);
      } catch (...) {
        if (!first) first = std::current_exception();
      }
    }
    if (first) std::rethrow_exception(first);
  });
}

namespace {

void close_descriptor(const Shareable& shared) {
  if (shared.fd >= 0) close(shared.fd);
}

}  // namespace

std::vector<Handle> map_all(Backend& backend, const std::vector<Mapping>& mappings, int device) {
  std::vector<Handle> handles;
  handles.reserve(mappings.size());
  size_t closed = 0;  // descriptors [0, closed) are closed already
  try {
    for (const Mapping& mapping : mappings) {
      Handle handle;
      try {
        handle = backend.import_handle(mapping.shared, device, mapping.size);
      } catch (...) {
        close_descriptor(mapping.shared);
        ++closed;
        throw;
      }
      close_descriptor(mapping.shared);
      ++closed;
      try {
        if (mapping.read_only)
          backend.map_read_only(mapping.address, mapping.size, handle, device);
        else
          backend.map(mapping.address, mapping.size, handle, device);
      } catch (...) {
        backend.release(handle);
        throw;
      }
      handles.push_back(handle);
    }
  } catch (...) {
    for (size_t rest = closed; rest < mappings.size(); ++rest) close_descriptor(mappings[rest].shared);
    for (size_t done = 0; done < handles.size(); ++done) {
      backend.unmap(mappings[done].address, mappings[done].size);
      backend.release(handles[done]);
    }
    throw;
  }
  return handles;
}

std::pair<size_t, std::string> unmap_all(Backend& backend, const std::vector<Unmapping>& unmappings) {
  for (size_t done = 0; done < unmappings.size(); ++done) {
    try {
      backend.unmap(unmappings[done].address, unmappings[done].size);
      backend.release(unmappings[done].handle);
    } catch (const std::exception& error) {
      return {done, error.what()};
    }
  }
  return {unmappings.size(), ""};
}

}  // namespace sleepd
