// Device memory as the kernel sees it: what the doubles (CUDA, NVML, ACL) count as used.
//
// Each double makes an allocation a memfd named for the test and the device (the CUDA
// double: fakecuda:t<FAKE_CUDA_TAG>:d<gpu>); it is alive while any process holds it
// open or mapped, whatever the runtime's release was called on, as a driver frees
// memory only at its last reference. Counting it here, from every process, makes the
// doubles' memory device-wide, as a device's is.
#pragma once

#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <string>
#include <utility>

namespace fake_memory {

// The GPU whose memory a /proc path names, if the driver double made it for
// this test (FAKE_CUDA_TAG), or -1.
inline int device_of(const std::string& path) {
  const char* tag = std::getenv("FAKE_CUDA_TAG");
  std::string prefix = std::string("/memfd:fakecuda:t") + (tag ? tag : "") + ":d";
  if (path.compare(0, prefix.size(), prefix) != 0) return -1;
  return std::atoi(path.c_str() + prefix.size());
}

// Bytes alive in the memfds whose /proc path (as an fd's link or a mapping names it)
// `ours` accepts, from every process's open descriptors and mappings, each memfd
// counted once at its largest extent.
template <typename Ours>
unsigned long long alive_where(Ours ours) {
  std::map<std::pair<unsigned long, unsigned long>, unsigned long long> extent;  // (dev, inode) -> bytes
  DIR* proc = opendir("/proc");
  if (!proc) return 0;
  while (dirent* entry = readdir(proc)) {
    if (entry->d_name[0] < '0' || entry->d_name[0] > '9') continue;
    std::string base = std::string("/proc/") + entry->d_name;
    if (DIR* fds = opendir((base + "/fd").c_str())) {
      while (dirent* fd = readdir(fds)) {
        std::string link = base + "/fd/" + fd->d_name;
        char target[256];
        ssize_t length = readlink(link.c_str(), target, sizeof target - 1);
        if (length <= 0) continue;
        target[length] = '\0';
        struct stat info;
        if (ours(std::string(target)) && stat(link.c_str(), &info) == 0) {
          auto& bytes = extent[{info.st_dev, info.st_ino}];
          bytes = std::max<unsigned long long>(bytes, info.st_size);
        }
      }
      closedir(fds);
    }
    std::ifstream maps(base + "/maps");
    std::string line;
    while (std::getline(maps, line)) {
      unsigned long long start, end, offset;
      char device[16], path[256] = "";
      unsigned long inode;
      if (std::sscanf(line.c_str(), "%llx-%llx %*s %llx %15s %lu %255s", &start, &end, &offset, device, &inode,
                      path) < 6 ||
          !ours(std::string(path)))
        continue;
      auto& bytes = extent[{0, inode}];  // mappings name the inode only; memfds share one device
      bytes = std::max(bytes, offset + (end - start));
    }
  }
  closedir(proc);
  // An fd and a mapping of the same memfd appear under two keys: keep the larger, per inode.
  std::map<unsigned long, unsigned long long> by_inode;
  for (const auto& [key, bytes] : extent) by_inode[key.second] = std::max(by_inode[key.second], bytes);
  unsigned long long total = 0;
  for (const auto& [inode, bytes] : by_inode) total += bytes;
  return total;
}

// Bytes of CUDA-double memory alive on `gpu`.
inline unsigned long long alive(int gpu) {
  return alive_where([gpu](const std::string& path) { return device_of(path) == gpu; });
}

}  // namespace fake_memory
