// Row-major GEMM for the CPU backend: C = alpha * op(A) op(B) + beta * C.
// Calls the BLAS that libtorch_cpu ships (sgemm_/dgemm_) directly, with no
// dispatcher or tensor construction per call; falls back to at::mm_out when
// that BLAS symbol is not exported by the installed torch. Shape legend in
// csrc/kernels/cells.h.
#pragma once

#include <cstdint>

namespace fastcells {
namespace cpu {

// op(A): (M, K), op(B): (K, N), C: (M, N); lda/ldb/ldc are row strides of
// the stored (untransposed) matrices.
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha, const T* A,
          int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc);

// True when the direct BLAS path is available (reported by fastcells.build_info()).
bool has_direct_blas();

}  // namespace cpu
}  // namespace fastcells
