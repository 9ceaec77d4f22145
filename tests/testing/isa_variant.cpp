// Linked into the test binaries that CTest runs again under LMFORGE_MAX_ISA
// (tests/CMakeLists.txt's lmforge_isa_variants, which sets LMFORGE_ISA_VARIANT): where the cap
// takes nothing from this CPU (avx512 on an AVX2-only one), the run would repeat the uncapped one,
// so it exits before any test with CTest's skip code, saying why.
#include <cstdio>
#include <cstdlib>

#include "lmforge/core/cpu_features.h"

namespace {
const bool kChecked = [] {
  const char* cap = std::getenv("LMFORGE_MAX_ISA");
  if (std::getenv("LMFORGE_ISA_VARIANT") && cap && *cap && lmforge::max_isa_takes_nothing()) {
    std::printf("LMFORGE_MAX_ISA=%s takes nothing from this CPU (%s): the uncapped run covers it\n",
                cap, lmforge::cpu_features().summary().c_str());
    std::exit(77);
  }
  return true;
}();
}  // namespace
