// CPU backend of the recurrent loop (contract in csrc/kernels/params.h).
#pragma once

#include <cstdint>

#include "../kernels/params.h"
#include "gemm_cpu.h"

namespace fastcells {
namespace cpu {

// C(M, N) = [C +] A(M, K) @ B(K, N), row-major, A(m, k) = A[m * a_rs + k * a_ks];
// with trans_b, B is stored (N, K) with row stride ldb. With `bias` (length
// N; not with accumulate) C = bias + A @ B, bias broadcast over the rows.
// Deterministic: each element sums k = 0..K-1 in order (after the bias)
// whatever the thread count.
//
// With `keep_b`, B is packed into *keep_b (if it does not hold it already)
// and the pack is reused by later calls with the same B: the caller
// guarantees B is unchanged in between (one op call, several time chunks).
template <typename scalar_t>
void matmul(int64_t M, int64_t N, int64_t K, const scalar_t* A, int64_t a_rs, int64_t a_ks,
            const scalar_t* B, int64_t ldb, bool trans_b, scalar_t* C, int64_t ldc,
            bool accumulate, const scalar_t* bias = nullptr,
            gemm::PackedB<scalar_t>* keep_b = nullptr);

// The recurrent weights of one layer and direction as the forward loop packs
// them, kept across the time chunks of one call (same contract as keep_b).
template <typename scalar_t>
struct ForwardPack {
  gemm::PackedB<scalar_t> w_hh_t, w_hr_t;
};

template <typename scalar_t>
void recurrent_forward(const kernels::LayerForwardParams<scalar_t>& p,
                       ForwardPack<scalar_t>* keep = nullptr);

template <typename scalar_t>
void recurrent_backward(const kernels::LayerBackwardParams<scalar_t>& p);

}  // namespace cpu
}  // namespace fastcells
