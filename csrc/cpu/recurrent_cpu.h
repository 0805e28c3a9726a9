// CPU backend of the recurrent loop (contract in csrc/kernels/params.h). Each
// function runs on the ISA path in use (csrc/cpu/isa.h).
#pragma once

#include <cstdint>

#include "../kernels/params.h"
#include "isa.h"
#include "pack_cpu.h"

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
//
// `bf16`: every value of A and B is a bfloat16 value (inputs of a bfloat16
// call); a path with bfloat16 products may round A to bfloat16 (isa.h).
template <typename T>
void matmul(int64_t M, int64_t N, int64_t K, const T* A, int64_t a_rs, int64_t a_ks,
            const T* B, int64_t ldb, bool trans_b, T* C, int64_t ldc, bool accumulate,
            const T* bias = nullptr, PackedStore<T>* keep_b = nullptr, bool bf16 = false) {
  active_isa().table<T>(bf16).matmul(M, N, K, A, a_rs, a_ks, B, ldb, trans_b, C, ldc, accumulate,
                                 bias, keep_b);
}

// With `keep`, the recurrent weights stay packed there for the later time
// chunks of the same call (same contract as keep_b); `bf16` as in matmul.
template <typename T>
void recurrent_forward(const kernels::LayerForwardParams<T>& p, ForwardPack<T>* keep = nullptr,
                       bool bf16 = false) {
  active_isa().table<T>(bf16).forward(p, keep);
}

// `bf16` as in recurrent_forward: the per-step products of a bfloat16 call
// may run on bfloat16 operands.
template <typename T>
void recurrent_backward(const kernels::LayerBackwardParams<T>& p, bool bf16 = false) {
  active_isa().table<T>(bf16).backward(p);
}

}  // namespace cpu
}  // namespace fastcells
