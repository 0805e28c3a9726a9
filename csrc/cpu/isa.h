// CPU ISA paths and the dispatch between them.
//
// One build holds the CPU kernels (gemm_cpu.h, recurrent_cpu_impl.h) several
// times, each compiled for one x86 level by a wrapper csrc/cpu/isa_*.cpp into
// its own namespace, as ATen's CPU_CAPABILITY does. The path is chosen once,
// when first used, from the CPU's features: the widest the host supports, or
// the one FASTCELLS_CPU_ISA names. Speed therefore does not depend on the
// machine the extension was built on. Paths:
//   generic        portable C++ with 16-byte vectors (SSE2 on x86-64, NEON on
//                  aarch64); the only path off x86
//   avx2           AVX2 + FMA, 8-lane float vectors, 6-row register blocks
//   avx512         AVX-512 F/BW/DQ/VL, 16-lane float vectors, 12-row blocks
//   avx512_bf16    avx512 plus AVX-512-BF16: float32 and float64 run avx512's
//                  kernels unchanged; bfloat16 inputs run the forward
//                  products on bfloat16 operands (vdpbf16ps, float32 sums)
//                  instead of widening them to float32 first
//   avx512_layout  avx512's kernel source, vector width and register blocks
//                  on AVX2 instructions. Never chosen automatically: it lets a
//                  host without AVX-512 test that path's tiling, tails and
//                  panel layout (the instructions themselves only run on an
//                  AVX-512 host).
// Every path sums each product element over k in the same order; a path
// differs from another at most in the last bits (the generic path on x86-64
// has no fused multiply-add), never from run to run or between thread counts.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "../kernels/params.h"
#include "pack_cpu.h"

namespace fastcells {
namespace cpu {

enum IsaId : int {
  kIsaGeneric = 0,
  kIsaAvx2 = 1,
  kIsaAvx512 = 2,
  kIsaAvx512Layout = 3,
  kIsaAvx512Bf16 = 4
};

// The whole-sequence product, forward loop and backward loop of one path for
// one compute type (contracts in recurrent_cpu.h).
template <typename T>
struct KernelTable {
  void (*matmul)(int64_t M, int64_t N, int64_t K, const T* A, int64_t a_rs, int64_t a_ks,
                 const T* B, int64_t ldb, bool trans_b, T* C, int64_t ldc, bool accumulate,
                 const T* bias, PackedStore<T>* keep_b);
  void (*forward)(const kernels::LayerForwardParams<T>& p, ForwardPack<T>* keep);
  void (*backward)(const kernels::LayerBackwardParams<T>& p);
};

// Calibration hooks for benchmarks/cpu_peak.py, on this path's own vectors.
struct BenchHooks {
  // Multiply-adds per second of one thread running independent vector FMA
  // chains for about `seconds` (the host's peak for this vector width).
  double (*fma_rate)(double seconds);
  // Seconds per call of the per-step product y(M, N) = x(M, K) @ B(K, N) over
  // a packed B (as the forward loop runs it on one thread), over `reps` calls.
  double (*product_seconds)(int64_t M, int64_t K, int64_t N, int64_t reps);
};

struct IsaKernels {
  IsaId id;
  const char* name;
  int vec_bytes;  // bytes per SIMD vector of the products
  int mr;         // rows of the products' register block
  KernelTable<float> f32;
  // bfloat16 inputs, widened to float by the op layer: every value of the
  // inputs, weights and initial states is a bfloat16 value.
  KernelTable<float> bf16;
  KernelTable<double> f64;
  BenchHooks bench;

  // The table for compute type T; bf16: the inputs are bfloat16 (float only).
  template <typename T>
  const KernelTable<T>& table(bool bf16 = false) const;
};

template <>
inline const KernelTable<float>& IsaKernels::table<float>(bool bf16) const {
  return bf16 ? this->bf16 : f32;
}
template <>
inline const KernelTable<double>& IsaKernels::table<double>(bool) const {
  return f64;
}

// The path in use. The first call selects it (FASTCELLS_CPU_ISA or the
// host's best) and raises a clear error if the switch names an unknown path
// or one the host cannot run; later calls raise the same error.
const IsaKernels& active_isa();
// Makes `name` the path in use (for tests and A/B runs); the same errors as
// FASTCELLS_CPU_ISA. Calls already running finish on the path they started on.
void set_active_isa(const std::string& name);
// The path called `name` without making it the one in use (benchmarks); the
// same errors as set_active_isa.
const IsaKernels& isa_by_name(const std::string& name);
// Names of the paths this host can run, narrowest first.
std::vector<std::string> supported_isas();
// Names of every path in this build.
std::vector<std::string> built_isas();
// The largest packed W_hh for which the forward and backward loops give each
// thread a range of batch rows (and the whole W_hh) rather than a range of
// hidden units with a barrier per step: half of one core's L2 cache as the
// OS reports it (256 KiB when it reports none).
int64_t row_split_bytes();
// The host's x86 features that the paths depend on, e.g. "avx2 fma avx512f".
std::string host_features();

}  // namespace cpu
}  // namespace fastcells
