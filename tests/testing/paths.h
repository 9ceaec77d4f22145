// Where tests find things. CMake compiles the build's paths in; an environment variable of the
// same name (LMFORGE_BIN, LMFORGE_REF_DIR, LMFORGE_SOURCE_DIR) overrides.
#pragma once

#include <cstdlib>
#include <string>

namespace lmforge::testing {

inline std::string path_from_env(const char* name, const char* built_in) {
  const char* v = std::getenv(name);
  return v && *v ? v : built_in;
}
inline std::string lmforge_bin() { return path_from_env("LMFORGE_BIN", LMFORGE_BIN_PATH); }
// Fixtures written by tests/reference/make_fixtures.py (the reference_fixtures test).
inline std::string ref_dir() { return path_from_env("LMFORGE_REF_DIR", LMFORGE_REF_DIR_PATH); }
inline std::string source_dir() {
  return path_from_env("LMFORGE_SOURCE_DIR", LMFORGE_SOURCE_DIR_PATH);
}

// The reference venv's python ("" when the build was configured without it).
inline std::string python() { return path_from_env("LMFORGE_PYTHON", LMFORGE_PYTHON_PATH); }

// ../shared beside the checkout: reference tokenizer files (read-only).
inline std::string shared_tokenizers_dir() { return source_dir() + "/../shared/assets/tokenizers"; }

}  // namespace lmforge::testing
