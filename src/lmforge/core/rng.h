// Rng: a small, fast, fully serializable random generator (xoshiro256**, Blackman & Vigna 2018).
// Its whole state is four words, saved in checkpoints so a resumed run draws the same numbers.
// Distributions are computed here (not with <random>) so results are identical across standard
// libraries.
//
//   Rng rng(1337);
//   float w = rng.normal() * 0.02f;
//   uint64_t i = rng.below(n);
#pragma once

#include <array>
#include <cstdint>

namespace lmforge {

class Rng {
 public:
  explicit Rng(uint64_t seed = 0) { reseed(seed); }
  void reseed(uint64_t seed);

  uint64_t next_u64();
  double uniform();            // [0, 1), 53 random bits
  uint64_t below(uint64_t n);  // uniform in [0, n), unbiased
  double normal();             // standard normal (Box-Muller, both values used)

  using State = std::array<uint64_t, 6>;  // s[0..3], has_spare, spare bits
  State state() const;
  void set_state(const State& st);

 private:
  std::array<uint64_t, 4> s_{};
  bool has_spare_ = false;
  double spare_ = 0;
};

}  // namespace lmforge
