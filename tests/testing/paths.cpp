#include "testing/paths.h"

#include <cstdlib>

namespace lmforge::testing {
namespace {
std::string path_from_env(const char* name, const char* built_in) {
  const char* v = std::getenv(name);
  return v && *v ? v : built_in;
}
}  // namespace

std::string lmforge_bin() { return path_from_env("LMFORGE_BIN", LMFORGE_BIN_PATH); }
std::string ref_dir() { return path_from_env("LMFORGE_REF_DIR", LMFORGE_REF_DIR_PATH); }
std::string source_dir() { return path_from_env("LMFORGE_SOURCE_DIR", LMFORGE_SOURCE_DIR_PATH); }
std::string python() { return path_from_env("LMFORGE_PYTHON", LMFORGE_PYTHON_PATH); }

}  // namespace lmforge::testing
