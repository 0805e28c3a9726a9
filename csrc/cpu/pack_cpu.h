// Storage of a packed right-hand side, shared by every CPU ISA path.
//
// The op layer (csrc/ops.cpp) keeps packed weights across the time chunks of
// one call without knowing how a path lays them out: panel width and register
// blocks differ between ISA paths (csrc/cpu/isa.h). A path fills the store
// through its own gemm::PackedB view (gemm_cpu.h) and only reuses a store
// that it filled itself (`layout` names the path, `pairs` the element form).
//
// With `pairs`, each 32-bit slot of `data` holds two bfloat16 values, rows k
// and k + 1 of one column (k even, the low half row k): the operand layout of
// AVX-512-BF16's vdpbf16ps. A panel then has ceil(K / 2) slot rows.
#pragma once

#include <cstdint>
#include <memory>

namespace fastcells {
namespace cpu {

template <typename T>
struct PackedStore {
  int layout = -1;  // id of the ISA path that packed it (IsaId), -1 empty
  bool ready = false;
  bool pairs = false;
  int64_t K = 0, S = 1, per_seg = 0, panels = 0;
  std::unique_ptr<T[]> data;
};

// The weights of one layer and direction as the forward packs them, kept
// across the time chunks of one call (the caller guarantees the weights are
// unchanged in between) and across calls by the weight cache: W_ih^T (one
// segment; the whole-sequence input product, or the inference loop's
// product per step), W_hh^T and W_hr^T (the time loop's).
template <typename T>
struct ForwardPack {
  PackedStore<T> w_ih_t, w_hh_t, w_hr_t;
};

}  // namespace cpu
}  // namespace fastcells
