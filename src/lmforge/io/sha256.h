// SHA-256 (FIPS 180-4), for checkpoint manifests: a file's digest detects a torn or bit-flipped
// copy. On x86-64 CPUs with the SHA extensions the compression runs on them (~1.5-2 GB/s per core);
// elsewhere a portable implementation (~0.3 GB/s) gives the same digests.
//
//   Sha256 h;
//   h.update(data, n);
//   std::string hex = h.hex_digest();                // 64 lowercase hex digits
//   std::string f = sha256_file("model.safetensors");  // throws Error naming the file
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace lmforge {

class Sha256 {
 public:
  enum class Impl { kAuto, kPortable };  // kPortable: skip the SHA extensions (tests compare both)
  explicit Sha256(Impl impl = Impl::kAuto);

  void update(const void* data, size_t n);
  void update(std::string_view s) { update(s.data(), s.size()); }
  // Finishes the hash; the object must not be updated afterwards.
  std::array<uint8_t, 32> digest();
  std::string hex_digest();

 private:
  void compress(const uint8_t* blocks, size_t n);

  uint32_t state_[8];
  uint8_t buf_[64];
  size_t buf_len_ = 0;
  uint64_t total_ = 0;  // bytes hashed
  bool hw_ = false;
};

// True when this CPU has the SHA extensions (and Impl::kAuto uses them).
bool sha256_hardware();

std::string sha256_hex(std::string_view data);
// Digest of a file's contents, read in 1 MiB pieces; *bytes (if given) receives its size.
std::string sha256_file(const std::string& path, uint64_t* bytes = nullptr);

}  // namespace lmforge
