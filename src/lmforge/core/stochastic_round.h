// Stochastic rounding of fp32 to bf16, for bf16 master weights (train.master_weights: bf16).
// An fp32 value x between the bf16 neighbours lo < x < hi becomes hi with probability
// (x - lo) / (hi - lo), else lo: adding 16 uniformly random bits below bf16's mantissa and
// truncating does exactly that, so the rounding is unbiased and small AdamW updates that
// nearest rounding would drop still move the weights on average.
//
// The random bits are a counter-based hash of (seed, optimizer step, flat parameter index), not
// a generator's state: every backend (CPU vector and scalar loops, CUDA) and every resumed run
// rounds each element identically, whatever the chunking or thread count.
//
//   const uint32_t key = sr_key(seed, step, index >> 32);
//   uint16_t h = bf16_round_stochastic(x, sr_bits(key, static_cast<uint32_t>(index)));
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define LMF_HD __host__ __device__ __forceinline__
#else
#define LMF_HD inline
#endif

namespace lmforge {

// Chris Wellons' "lowbias32" integer hash: a bijection on 32 bits with near-ideal avalanche.
LMF_HD uint32_t hash32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// The per-call key: the seed, the step (1-based optimizer step) and the high word of the flat
// index (models above 2^32 parameters; callers split ranges at 2^32 boundaries).
inline uint32_t sr_key(uint64_t seed, int64_t step, uint32_t index_hi) {
  uint32_t k = hash32(static_cast<uint32_t>(seed) ^ 0x9e3779b9u);
  k = hash32(k ^ static_cast<uint32_t>(seed >> 32));
  k = hash32(k ^ static_cast<uint32_t>(step));
  k = hash32(k ^ static_cast<uint32_t>(static_cast<uint64_t>(step) >> 32));
  return hash32(k ^ index_hi);
}

// 32 random bits for element index_lo under key (the vector kernels compute the same lanewise).
LMF_HD uint32_t sr_bits(uint32_t key, uint32_t index_lo) {
  return hash32((index_lo * 0x9e3779b9u) ^ key);
}

// fp32 -> bf16 with the low 16 of `bits` as the random offset. Inf stays inf (its low bits are
// zero, so no carry), NaN stays NaN (quiet bit set); denormals round like any other value.
LMF_HD uint16_t bf16_round_stochastic(float f, uint32_t bits) {
#if defined(__CUDA_ARCH__)
  const uint32_t u = __float_as_uint(f);
#else
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
#endif
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN
  if ((u & 0x7f800000u) == 0x7f800000u) return static_cast<uint16_t>(u >> 16);          // inf
  return static_cast<uint16_t>((u + (bits & 0xffffu)) >> 16);
}

}  // namespace lmforge
