// Errors. Two kinds, kept apart on purpose:
//  - lmforge::Error: a user error (bad config key, missing file, corrupt shard). Thrown, caught
//    once in main(), printed as one line "lmforge: <what>, <where>; <fix>", exit code 1.
//  - LMF_CHECK: an internal invariant. Aborts with file:line and the message (shapes, sizes);
//    it means a bug in lmforge, not in the user's input.
//
//   if (!file) throw Error(fmt::format("{}: cannot open ({}); check the path", path,
//   strerror(errno))); LMF_CHECK(a.numel() == b.numel(), "numel {} vs {}", a.numel(), b.numel());
#pragma once

#include <fmt/format.h>

#include <stdexcept>
#include <string>

namespace lmforge {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

template <typename... Args>
[[noreturn]] void fail(fmt::format_string<Args...> f, Args&&... args) {
  throw Error(fmt::format(f, std::forward<Args>(args)...));
}

// The fix for a failed file operation by its errno (a full disk, ulimit -f, -n or -v, a
// read-only filesystem, permissions), or `otherwise`.
const char* io_fix(int err, const char* otherwise);

[[noreturn]] void check_failed(const char* file, int line, const char* cond,
                               const std::string& msg);

}  // namespace lmforge

#define LMF_CHECK(cond, ...)                                                             \
  do {                                                                                   \
    if (!(cond)) [[unlikely]]                                                            \
      ::lmforge::check_failed(__FILE__, __LINE__, #cond, ::fmt::format("" __VA_ARGS__)); \
  } while (0)
