// Counter-based random numbers for dropout masks (CPU and CUDA).
//
// Element i of a draw with seed s is a pure function of (s, i): a mask comes
// out the same whatever the thread count or the order the elements are filled
// in, and a thread fills any range without a shared generator state. The
// mixing is splitmix64's finaliser over the Weyl sequence s + (i + 1) * phi,
// which passes BigCrush as a generator; the seed itself is drawn from torch's
// generator by the caller, so torch.manual_seed still fixes every mask.
#pragma once

#include <cstdint>

#include "cell_table.h"  // FC_HD

namespace fastcells {
namespace kernels {

FC_HD uint64_t mix64(uint64_t seed, uint64_t i) {
  uint64_t z = seed + (i + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Whether element i is kept: a uniform 53-bit draw below keep * 2^53.
FC_HD bool keep_element(uint64_t seed, uint64_t i, uint64_t keep_threshold) {
  return (mix64(seed, i) >> 11) < keep_threshold;
}

// keep_threshold for a keep probability q in [0, 1].
FC_HD uint64_t keep_threshold(double q) {
  return static_cast<uint64_t>(q * 9007199254740992.0);  // q * 2^53
}

}  // namespace kernels
}  // namespace fastcells
