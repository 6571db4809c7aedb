// Portable random helpers: the same numbers on every platform and standard library.
// std::mt19937_64's output sequence is fixed by the standard, but std::uniform_int_distribution,
// std::normal_distribution and std::shuffle are implementation-defined, so the mapping from raw
// 64-bit draws to indices / reals / normals is written out here instead.
#pragma once
#include <cmath>
#include <cstdint>
#include <random>

namespace longtune {

// Uniform integer in [0, n), n >= 1, by rejection sampling: draws below 2^64 mod n are rejected
// so that x % n is exactly uniform.
inline uint64_t uniform_below(std::mt19937_64& rng, uint64_t n) {
  const uint64_t threshold = (uint64_t(0) - n) % n;  // == 2^64 mod n
  for (;;) {
    const uint64_t x = rng();
    if (x >= threshold) return x % n;
  }
}

// Uniform double in [0, 1) with 53 random bits.
inline double uniform_unit(std::mt19937_64& rng) { return double(rng() >> 11) * 0x1.0p-53; }

// Standard normal by the Box–Muller transform (cosine branch): u1 in (0, 1], u2 in [0, 1).
// Uses two draws per number. (std::log / std::cos are correctly rounded to within an ulp on every
// mainstream libm; the draws themselves are bit-identical everywhere.)
inline double standard_normal(std::mt19937_64& rng) {
  const double u1 = double((rng() >> 11) + 1) * 0x1.0p-53;
  const double u2 = uniform_unit(rng);
  constexpr double kTwoPi = 6.283185307179586476925286766559;
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(kTwoPi * u2);
}

}  // namespace longtune
