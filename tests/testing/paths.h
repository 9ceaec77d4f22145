// Where tests find things: the build's paths (compiled into testing/paths.cpp alone); an
// environment variable of the same name (LMFORGE_BIN, LMFORGE_REF_DIR, LMFORGE_SOURCE_DIR,
// LMFORGE_PYTHON) overrides.
#pragma once

#include <string>

namespace lmforge::testing {

std::string lmforge_bin();
// Fixtures written by tests/reference/make_fixtures.py (the reference_fixtures test).
std::string ref_dir();
std::string source_dir();
// The reference venv's python ("" when the build was configured without it).
std::string python();

// ../shared beside the checkout: reference tokenizer files (read-only).
inline std::string shared_tokenizers_dir() { return source_dir() + "/../shared/assets/tokenizers"; }

}  // namespace lmforge::testing
