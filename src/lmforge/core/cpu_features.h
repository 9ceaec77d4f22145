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
  // bf16 products run faster than fp32 ones here: AMX tiles, or AVX512-BF16 on AMD (Zen 4:
  // vdpbf16ps at twice the fp32 FMA rate). Intel's AVX512-BF16 without AMX (Sapphire and Emerald
  // Rapids whose AMX state a hypervisor withholds; Cooper Lake) multiplies bf16 at about half the
  // fp32 rate, and AVX-512 without it only by emulation (measured: bench matmul). Read from the
  // hardware, not capped by LMFORGE_MAX_ISA (which caps lmforge's kernels, not oneDNN's).
  bool fast_bf16_products = false;
  std::string brand;            // e.g. "Intel(R) Xeon(R) Platinum 8488C"
  std::string summary() const;  // "avx2 avx512f avx512_bf16 amx_bf16"
};

const CpuFeatures& cpu_features();
// Whether LMFORGE_MAX_ISA leaves lmforge's kernels every feature this CPU has (or is unset): they
// run as without it.
bool max_isa_takes_nothing();

}  // namespace lmforge
