// The user-error contract in tests: exit code 1 and exactly one line on stderr, "lmforge: ...",
// naming every needle (the file, key or fix), never an internal error; and error_of(), the
// message of the Error a call throws.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <string>
#include <vector>

#include "lmforge/core/error.h"
#include "testing/process.h"

namespace lmforge::testing {

inline void expect_one_line_error(const RunResult& r, const std::vector<std::string>& needles) {
  EXPECT_EQ(r.exit_code, 1) << r.err;
  ASSERT_FALSE(r.err.empty());
  EXPECT_EQ(r.err.rfind("lmforge: ", 0), 0u) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  EXPECT_EQ(r.err.find("internal error"), std::string::npos) << r.err;
  for (auto& n : needles)
    EXPECT_NE(r.err.find(n), std::string::npos) << "missing '" << n << "' in " << r.err;
}

// The message of the lmforge::Error that f() throws ("" if it throws none).
template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace lmforge::testing
