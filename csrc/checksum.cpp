#include "checksum.h"

#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>

#if defined(__x86_64__)
#include <nmmintrin.h>
#endif

namespace sleepd {
namespace {

// CRC32C's polynomial, bit-reflected: bit 31 is x^0 (the CRC32 instructions' convention).
constexpr uint32_t kPolynomial = 0x82F63B78u;

// Slicing by 8: table[k][b] is the CRC of byte b followed by k zero bytes.
using Tables = std::array<std::array<uint32_t, 256>, 8>;

constexpr Tables make_tables() {
  Tables tables{};
  for (uint32_t byte = 0; byte < 256; ++byte) {
    uint32_t crc = byte;
    for (int bit = 0; bit < 8; ++bit) crc = (crc >> 1) ^ (crc & 1 ? kPolynomial : 0);
    tables[0][byte] = crc;
  }
  for (int k = 1; k < 8; ++k)
    for (int byte = 0; byte < 256; ++byte)
      tables[k][byte] = (tables[k - 1][byte] >> 8) ^ tables[0][tables[k - 1][byte] & 0xff];
  return tables;
}

constexpr Tables kTables = make_tables();

uint64_t load64(const unsigned char* p) {
  uint64_t value;
  std::memcpy(&value, p, sizeof value);  // little-endian on every CPU sleepd runs on
  return value;
}

// The CRC register (not inverted) after `size` more bytes.
uint32_t extend_portable(uint32_t crc, const unsigned char* p, size_t size) {
  for (; size >= 8; p += 8, size -= 8) {
    uint64_t word = load64(p) ^ crc;
    crc = kTables[7][word & 0xff] ^ kTables[6][(word >> 8) & 0xff] ^ kTables[5][(word >> 16) & 0xff] ^
          kTables[4][(word >> 24) & 0xff] ^ kTables[3][(word >> 32) & 0xff] ^ kTables[2][(word >> 40) & 0xff] ^
          kTables[1][(word >> 48) & 0xff] ^ kTables[0][word >> 56];
  }
  for (; size > 0; ++p, --size) crc = (crc >> 8) ^ kTables[0][(crc ^ *p) & 0xff];
  return crc;
}

#if defined(__x86_64__)

// a * b modulo the polynomial, both bit-reflected.
constexpr uint32_t multiply(uint32_t a, uint32_t b) {
  uint32_t product = 0;
  for (uint32_t bit = 1u << 31; bit != 0; bit >>= 1) {
    if (a & bit) product ^= b;
    b = (b >> 1) ^ (b & 1 ? kPolynomial : 0);
  }
  return product;
}

// x^(8 * bytes) modulo the polynomial: appending that many zero bytes multiplies a CRC register by it.
constexpr uint32_t zero_bytes(size_t bytes) {
  uint32_t result = 1u << 31, power = 1u << 23;  // x^0, x^8
  for (; bytes != 0; bytes >>= 1) {
    if (bytes & 1) result = multiply(result, power);
    power = multiply(power, power);
  }
  return result;
}

// One CRC32 instruction has a latency of three cycles but starts every cycle: three
// independent lanes keep it busy, then the lanes' registers are joined by shifting
// the first two past the bytes that followed them.
constexpr size_t kLane = 8192;
constexpr uint32_t kAfterOneLane = zero_bytes(kLane);
constexpr uint32_t kAfterTwoLanes = zero_bytes(2 * kLane);

__attribute__((target("sse4.2"))) uint32_t extend_hardware(uint32_t crc, const unsigned char* p, size_t size) {
  uint64_t first = crc;
  for (; size > 0 && reinterpret_cast<uintptr_t>(p) % 8 != 0; ++p, --size) first = _mm_crc32_u8(first, *p);
  for (; size >= 3 * kLane; p += 3 * kLane, size -= 3 * kLane) {
    uint64_t second = 0, third = 0;
    for (size_t at = 0; at < kLane; at += 8) {
      first = _mm_crc32_u64(first, load64(p + at));
      second = _mm_crc32_u64(second, load64(p + kLane + at));
      third = _mm_crc32_u64(third, load64(p + 2 * kLane + at));
    }
    first = multiply(static_cast<uint32_t>(first), kAfterTwoLanes) ^
            multiply(static_cast<uint32_t>(second), kAfterOneLane) ^ static_cast<uint32_t>(third);
  }
  for (; size >= 8; p += 8, size -= 8) first = _mm_crc32_u64(first, load64(p));
  for (; size > 0; ++p, --size) first = _mm_crc32_u8(first, *p);
  return static_cast<uint32_t>(first);
}

bool hardware() {
  static const bool supported = (__builtin_cpu_init(), __builtin_cpu_supports("sse4.2"));
  return supported;
}

#else

bool hardware() { return false; }

#endif

}  // namespace

uint32_t crc32c_portable(const void* data, size_t size, uint32_t crc) {
  return ~extend_portable(~crc, static_cast<const unsigned char*>(data), size);
}

uint32_t crc32c(const void* data, size_t size, uint32_t crc) {
#if defined(__x86_64__)
  if (hardware()) return ~extend_hardware(~crc, static_cast<const unsigned char*>(data), size);
#endif
  return crc32c_portable(data, size, crc);
}

bool crc32c_in_hardware() { return hardware(); }

std::vector<uint32_t> checksum_file(int fd, size_t offset, size_t length) {
  // A buffer that stays in the cache between the read and the checksum.
  constexpr size_t kBuffer = 1u << 20;
  std::unique_ptr<unsigned char[]> buffer(new unsigned char[kBuffer]);
  std::vector<uint32_t> checksums;
  checksums.reserve(checksum_count(length));
  uint32_t crc = 0;
  for (size_t at = 0; at < length;) {
    // Never past the end of a checksum block, even after a short read.
    size_t part = std::min({kBuffer, length - at, kChecksumBlock - at % kChecksumBlock});
    ssize_t got = pread(fd, buffer.get(), part, static_cast<off_t>(offset + at));
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) throw BackendError(std::string("checksum_file: pread: ") + std::strerror(errno));
    if (got == 0)
      throw BackendError("checksum_file: the file ends at byte " + std::to_string(offset + at) + ", before the " +
                         std::to_string(length) + " bytes from " + std::to_string(offset));
    crc = crc32c(buffer.get(), static_cast<size_t>(got), at % kChecksumBlock == 0 ? 0 : crc);
    at += static_cast<size_t>(got);
    if (at % kChecksumBlock == 0 || at == length) checksums.push_back(crc);
  }
  return checksums;
}

namespace {

std::string mismatch_text(size_t block, uint32_t expected, uint32_t found) {
  char text[120];
  std::snprintf(text, sizeof text, "block %zu has CRC32C %08x, not %08x as when it was written", block, found,
                expected);
  return text;
}

}  // namespace

ChecksumMismatch::ChecksumMismatch(size_t block, uint32_t expected, uint32_t found)
    : BackendError(mismatch_text(block, expected, found)), block(block) {}

void check_block(const Checksums& checksums, size_t block, uint32_t found) {
  if (block >= checksums.size())
    throw BackendError("copy: " + std::to_string(checksums.size()) + " checksums do not cover block " +
                       std::to_string(block));
  if (checksums[block] != found) throw ChecksumMismatch(block, checksums[block], found);
}

}  // namespace sleepd
