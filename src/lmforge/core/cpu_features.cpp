#include "lmforge/core/cpu_features.h"

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__)
#include <cpuid.h>
#endif

namespace lmforge {

namespace {
CpuFeatures detect_hardware() {
  CpuFeatures f;
#if defined(__x86_64__)
  unsigned a, b, c, d;
  // CPUID says what the CPU has; XCR0 says which register states the OS saves and so lets
  // programs use (a kernel or hypervisor may leave AVX-512's or AMX's off: their instructions
  // then fault).
  uint64_t xcr0 = 0;
  if (__get_cpuid(1, &a, &b, &c, &d) && (c & (1u << 27))) {  // OSXSAVE: xgetbv is available
    unsigned lo = 0, hi = 0;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    xcr0 = (static_cast<uint64_t>(hi) << 32) | lo;
  }
  const bool os_avx = (xcr0 & 0x6) == 0x6;          // XMM and YMM state
  const bool os_avx512 = (xcr0 & 0xe6) == 0xe6;     // plus opmask and ZMM state
  const bool os_amx = (xcr0 & 0x60000) == 0x60000;  // XTILECFG and XTILEDATA
  const bool fma = __get_cpuid(1, &a, &b, &c, &d) && (c & (1u << 12));
  unsigned max_sub = 0;
  if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) {
    max_sub = a;
    f.avx2 = os_avx && fma && (b & (1u << 5));  // the AVX2 kernels use FMA too
    f.avx512f = os_avx512 && (b & (1u << 16));
    f.avx512dq = os_avx512 && (b & (1u << 17));
    f.avx512bw = os_avx512 && (b & (1u << 30));
    f.avx512vl = os_avx512 && (b & (1u << 31));
    // AMX-BF16 and AMX-TILE; lmforge's AMX kernels pack their operands with AVX-512 (as
    // oneDNN's): a VM that grants tiles but not ZMM state gets neither.
    f.amx_bf16 = os_amx && (d & (1u << 22)) && (d & (1u << 24)) && f.avx512f && f.avx512bw &&
                 f.avx512vl && f.avx512dq;
  }
  if (max_sub >= 1 && __get_cpuid_count(7, 1, &a, &b, &c, &d))
    f.avx512_bf16 = os_avx512 && (a & (1u << 5));
  char vendor[13] = {};
  if (__get_cpuid(0, &a, &b, &c, &d)) {
    std::memcpy(vendor, &b, 4);
    std::memcpy(vendor + 4, &d, 4);
    std::memcpy(vendor + 8, &c, 4);
  }
  f.fast_bf16_products = f.amx_bf16 || (f.avx512_bf16 && std::strcmp(vendor, "AuthenticAMD") == 0);
  char brand[49] = {};
  for (unsigned i = 0; i < 3; ++i) {
    if (!__get_cpuid(0x80000002u + i, &a, &b, &c, &d)) break;
    std::memcpy(brand + 16 * i, &a, 4);
    std::memcpy(brand + 16 * i + 4, &b, 4);
    std::memcpy(brand + 16 * i + 8, &c, 4);
    std::memcpy(brand + 16 * i + 12, &d, 4);
  }
  f.brand = brand;
  while (!f.brand.empty() && f.brand.back() == ' ') f.brand.pop_back();
#endif
  return f;
}

const CpuFeatures& hardware() {
  static const CpuFeatures f = detect_hardware();
  return f;
}

CpuFeatures detect() {
  CpuFeatures f = hardware();
  // LMFORGE_MAX_ISA caps what the kernels may use (as oneDNN's ONEDNN_MAX_CPU_ISA): to compare
  // paths, or to test the AVX-512 (without BF16), AVX2 and portable kernels on a CPU that has
  // more. oneDNN keeps its own choice (fast_bf16_products: its bf16 matmuls or widened ones).
  if (const char* cap = std::getenv("LMFORGE_MAX_ISA"); cap && *cap) {
    const std::string v = cap;
    if (v == "avx512_bf16") {
      f.amx_bf16 = false;        // lmforge's own AMX kernels off (oneDNN still picks its own)
    } else if (v == "avx512") {  // Skylake-X to Ice Lake: AVX-512 without its bf16 instructions
      f.avx512_bf16 = f.amx_bf16 = false;
    } else if (v == "avx2" || v == "baseline") {
      f.avx512f = f.avx512bw = f.avx512vl = f.avx512dq = f.avx512_bf16 = f.amx_bf16 = false;
      if (v == "baseline") f.avx2 = false;
    } else {
      std::fprintf(
          stderr,
          "warning: LMFORGE_MAX_ISA=%s: expected avx512, avx512_bf16, avx2 or baseline; ignored\n",
          cap);
    }
  }
  return f;
}
}  // namespace

std::string CpuFeatures::summary() const {
  std::string s;
  auto add = [&](bool on, const char* n) {
    if (!on) return;
    if (!s.empty()) s += ' ';
    s += n;
  };
  add(avx2, "avx2");
  add(avx512f, "avx512f");
  add(avx512_bf16, "avx512_bf16");
  add(amx_bf16, "amx_bf16");
  return s.empty() ? "baseline" : s;
}

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = detect();
  return f;
}

bool max_isa_takes_nothing() {
  const CpuFeatures &a = hardware(), &b = cpu_features();
  return a.avx2 == b.avx2 && a.avx512f == b.avx512f && a.avx512bw == b.avx512bw &&
         a.avx512vl == b.avx512vl && a.avx512dq == b.avx512dq && a.avx512_bf16 == b.avx512_bf16 &&
         a.amx_bf16 == b.amx_bf16;
}

}  // namespace lmforge
