// CUDA backend of the recurrent loop (see csrc/kernels/params.h). Torch-free:
// ops.cpp includes this header when the extension is built WITH_CUDA.
// All pointers in the params are device pointers except batch_sizes and
// row_offsets (host); batch_sizes_dev/row_offsets_dev are device copies or
// null for dense input. `stream` is a cudaStream_t; `workspace` is device
// memory of at least *_workspace_bytes(p) bytes, allocated by the caller.
// `gemm` is the matrix product the per-step (large H) path runs on, supplied
// by the caller (ops.cpp: torch.mm, i.e. cuBLAS) so that this backend stays
// torch-free.
#pragma once

#include <cstddef>
#include <cstdint>

#include "../kernels/params.h"

namespace fastcells {
namespace cuda {

// Row-major C (M, N) = A (M, K) op(B) (+ C when `accumulate`), where op(B) is
// B (K, N) or, with `trans_b`, the transpose of a (N, K) B; lda / ldb / ldc
// are leading dimensions. Must run on the current CUDA stream, which is the
// `stream` given to the recurrent_* call, and must not synchronise.
template <typename scalar_t>
using GemmFn = void (*)(int64_t M, int64_t N, int64_t K, const scalar_t* A, int64_t lda,
                        const scalar_t* B, int64_t ldb, bool trans_b, bool accumulate,
                        scalar_t* C, int64_t ldc);

template <typename scalar_t>
size_t forward_workspace_bytes(const kernels::LayerForwardParams<scalar_t>& p);

template <typename scalar_t>
void recurrent_forward(const kernels::LayerForwardParams<scalar_t>& p, void* workspace,
                       void* stream, GemmFn<scalar_t> gemm);

template <typename scalar_t>
size_t backward_workspace_bytes(const kernels::LayerBackwardParams<scalar_t>& p);

template <typename scalar_t>
void recurrent_backward(const kernels::LayerBackwardParams<scalar_t>& p, void* workspace,
                        void* stream, GemmFn<scalar_t> gemm);

}  // namespace cuda
}  // namespace fastcells
