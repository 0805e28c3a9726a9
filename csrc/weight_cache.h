// Packed CPU weights kept across op calls (op layer; CPU only).
//
// A decoding loop calls the op once per step with the same weights, and at
// T=1 packing W_ih and W_hh into the product kernels' panels costs as much
// as the step's arithmetic (hidden 40, batch 1: about a third of the call).
// The cache keeps the packs of each layer and direction and hands them back
// while the weights are provably the same ones:
//   * the same storage (held weakly: a freed storage whose address is reused
//     does not match), data pointer, sizes, strides and dtype;
//   * the same version counter (an optimizer step, load_state_dict and any
//     in-place edit through the Parameter bump it);
//   * the same bytes as when they were packed. The version counter misses
//     edits made through `.data`, numpy views or DLPack aliases, so a hit
//     also compares the weights with a copy taken at packing time (a memcmp,
//     cheaper than packing again).
// Weights that are inference tensors (no version counter) or not contiguous
// are never cached. The packs of a hit are shared read-only; a miss packs into
// fresh storage that publish() then stores, so concurrent calls never write a
// pack another call reads. Weights that change at every call (training) stop
// being stored after one entry that was never hit (weight_cache.cpp). Entries
// of freed weights are dropped at the next
// publish; at most 64 layers and 256 MiB are kept (least recently used
// dropped first). FASTCELLS_WEIGHT_CACHE=0 turns the cache off.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "cpu/pack_cpu.h"

namespace fastcells {

// The packs of one layer and direction (filled by the CPU forward).
template <typename T>
struct LayerPacks {
  cpu::ForwardPack<T> fwd;
};

// Whether the cache is on (FASTCELLS_WEIGHT_CACHE, read once; default on).
bool weight_cache_enabled();

// The packs for the weights `ws` (w_ih, w_hh[, w_hr] of one layer and
// direction, as the caller received them) for products on bfloat16 operands
// or not (`bf16`). Sets *hit when they already hold these weights; otherwise
// returns empty packs for the caller to fill and publish, or nullptr when the
// weights are not to be cached (not cacheable, or changing at every call):
// the caller then packs into its own storage.
template <typename T>
std::shared_ptr<LayerPacks<T>> find_packs(const std::vector<const at::Tensor*>& ws, bool bf16,
                                          bool* hit);

// Stores packs filled for `ws` by the call that find_packs missed.
template <typename T>
void publish_packs(const std::vector<const at::Tensor*>& ws, bool bf16,
                   std::shared_ptr<LayerPacks<T>> packs);

// Drops every entry (torch.ops.fastcells.clear_weight_cache).
void clear_weight_cache();

// [entries, hits, misses, stores] since the last clear
// (torch.ops.fastcells.weight_cache_stats); tombstones count as entries.
std::vector<int64_t> weight_cache_stats();

}  // namespace fastcells
