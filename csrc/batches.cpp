#include "batches.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <exception>
#include <thread>

namespace sleepd {

namespace {

// Creating and releasing memory is mostly the kernel's or the driver's work, which runs in
// parallel: a few large regions gain as much as many small ones (on a host backend, committing or
// freeing 1 GiB of pages is several times a memcpy of it), so any batch of two or more is shared out.
constexpr unsigned kMaxThreads = 4;

// Runs work(i) for each i in [0, count), on a few threads that each take the next index left, so
// that one large item does not leave the others idle; rethrows the first failure once all have finished.
// After a failure, items not yet started are tried only if `keep_going`.
template <typename Work>
void in_parallel(size_t count, bool keep_going, Work work) {
  unsigned threads = static_cast<unsigned>(
      std::min<size_t>({kMaxThreads, std::max(1u, std::thread::hardware_concurrency()), count}));
  if (threads <= 1) {
    std::exception_ptr first;
    for (size_t i = 0; i < count && (keep_going || !first); ++i) {
      try {
        work(i);
      } catch (...) {
        if (!first) first = std::current_exception();
      }
    }
    if (first) std::rethrow_exception(first);
    return;
  }
  std::atomic<size_t> next{0};
  std::atomic<bool> failed{false};
  std::vector<std::exception_ptr> failures(threads);
  std::vector<std::thread> workers;
  for (unsigned t = 0; t < threads; ++t) {
    workers.emplace_back([&, t] {
      for (size_t i = next++; i < count && (keep_going || !failed); i = next++) {
        try {
          work(i);
        } catch (...) {
          if (!failures[t]) failures[t] = std::current_exception();
          failed = true;
        }
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
  std::vector<char> created(creations.size(), 0);  // not vector<bool>: several threads write it
  try {
    in_parallel(creations.size(), /*keep_going=*/false, [&](size_t i) {
      handles[i] = backend.create(creations[i].device, creations[i].size, creations[i].label);
      created[i] = 1;
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
  in_parallel(handles.size(), /*keep_going=*/true, [&](size_t i) { backend.release(handles[i]); });
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
