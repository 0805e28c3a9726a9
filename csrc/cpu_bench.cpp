// Calibration ops for benchmarks/cpu_peak.py: the host's FMA peak on a CPU ISA
// path's vectors, the per-step product of that path, and ATen's
// cpublas::brgemm (oneDNN's micro-kernels) on the same product, so that the
// product's fraction of the peak is measured, not assumed. Not used by the
// fused ops.
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

#include "cpu/isa.h"

namespace fastcells {
namespace {

// GFLOP/s (2 per multiply-add) of `threads` threads each running the path's
// FMA chains at once for about `seconds`.
double cpu_fma_peak(const std::string& isa, int64_t threads, double seconds) {
  TORCH_CHECK(threads >= 1, "fastcells: `threads` must be >= 1, got ", threads);
  TORCH_CHECK(seconds > 0 && seconds <= 60, "fastcells: `seconds` must be in (0, 60], got ",
              seconds);
  const cpu::IsaKernels& k = cpu::isa_by_name(isa);
  std::vector<double> rate(static_cast<size_t>(threads), 0.0);
#pragma omp parallel num_threads(static_cast<int>(threads))
  rate[omp_get_thread_num()] = k.bench.fma_rate(seconds);
  double total = 0;
  for (const double r : rate) total += r;
  return 2.0 * total / 1e9;
}

void check_product(int64_t M, int64_t K, int64_t N, int64_t reps) {
  TORCH_CHECK(M >= 1 && K >= 1 && N >= 1 && M <= 4096 && K <= 8192 && N <= 32768,
              "fastcells: expected 1 <= M <= 4096, 1 <= K <= 8192, 1 <= N <= 32768, got M=", M,
              ", K=", K, ", N=", N);
  TORCH_CHECK(reps >= 1, "fastcells: `reps` must be >= 1, got ", reps);
}

// Seconds per call of the path's per-step product (one thread).
double cpu_step_product(const std::string& isa, int64_t M, int64_t K, int64_t N, int64_t reps) {
  check_product(M, K, N, reps);
  return cpu::isa_by_name(isa).bench.product_seconds(M, K, N, reps);
}

// Seconds per call of the same product through at::native::cpublas::brgemm
// in float32 (B row-major K x N, no packing: oneDNN packs float32 itself).
double cpu_brgemm_product(int64_t M, int64_t K, int64_t N, int64_t reps) {
  check_product(M, K, N, reps);
  std::vector<float> a(static_cast<size_t>(M * K), 0.5f), b(static_cast<size_t>(K * N), 0.25f),
      c(static_cast<size_t>(M * N));
  at::native::cpublas::brgemm(M, N, K, K, N, N, false, a.data(), b.data(), c.data());
  const double t0 = omp_get_wtime();
  for (int64_t r = 0; r < reps; ++r)
    at::native::cpublas::brgemm(M, N, K, K, N, N, false, a.data(), b.data(), c.data());
  const double dt = (omp_get_wtime() - t0) / static_cast<double>(reps);
  at::native::cpublas::brgemm_release(false);
  return dt;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastcells, m) {
  m.def("_cpu_fma_peak(str isa, int threads, float seconds) -> float", &cpu_fma_peak);
  m.def("_cpu_step_product(str isa, int M, int K, int N, int reps) -> float", &cpu_step_product);
  m.def("_cpu_brgemm_product(int M, int K, int N, int reps) -> float", &cpu_brgemm_product);
}

}  // namespace fastcells
