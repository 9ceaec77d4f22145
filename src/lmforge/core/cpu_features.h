// Run-time CPU feature detection. The binary is built for a portable baseline; special kernels
// (AVX-512, AVX512-BF16, AMX) are chosen by asking here, never assumed at compile time.
#pragma once

#include <string>

namespace lmforge {

struct CpuFeatures {
  bool avx2 = false;
  bool avx512f = false;
  bool avx512bw = false, avx512vl = false, avx512dq = false;
  bool avx512_bf16 = false;
  bool amx_bf16 = false;
  std::string brand;            // e.g. "Intel(R) Xeon(R) Platinum 8488C"
  std::string summary() const;  // "avx2 avx512f avx512_bf16 amx_bf16"
};

const CpuFeatures& cpu_features();

}  // namespace lmforge
