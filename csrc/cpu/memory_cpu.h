// Large CPU buffers and transparent huge pages. Internal to the CPU backend
// and the op layer (csrc/ops.cpp).
//
// The fused ops allocate a few large buffers per call (saved gates, gate
// gradients, packed operands: tens to hundreds of MB at hidden 256 and batch
// 256), and the allocator hands them back to the kernel on free, so every
// call touches fresh pages. With 4 KiB pages that costs a page fault per
// 4 KiB: measured ~2.3 us each on the development machine, i.e. ~50 ms for
// an 88 MB gate buffer, and about a third of a forward+backward at
// (T, B, H) = (112, 256, 256). Advising 2 MiB pages cuts the faults 512-fold
// (the same 88 MB then took ~10 ms). Where transparent huge pages are off
// (or not Linux) the advice is a no-op; FASTCELLS_HUGE_PAGES=0 turns it off.
#pragma once

#include <cstddef>
#include <cstdint>
#include <new>
#include <vector>

#include "settings.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastcells {
namespace cpu {

// Buffers from this size up get the advice.
constexpr size_t kHugePageAdviceBytes = size_t(4) << 20;

// The advice can be turned off (settings.h): a kernel that defragments memory
// to find a huge page can stall a fault on a machine whose memory is
// fragmented.
inline bool huge_pages_enabled() { return settings().huge_pages; }

// Advises huge pages for the 2 MiB-aligned part of [p, p + bytes). Call it
// before the buffer is first written.
inline void advise_huge_pages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (p == nullptr || bytes < kHugePageAdviceBytes || !huge_pages_enabled()) return;
  constexpr uintptr_t k2M = uintptr_t(1) << 21;
  const uintptr_t a = (reinterpret_cast<uintptr_t>(p) + k2M - 1) & ~(k2M - 1);
  const uintptr_t e = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(k2M - 1);
  if (e > a) madvise(reinterpret_cast<void*>(a), e - a, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

// Scratch buffers of the time loop start on a 64-byte cache line. When a
// thread team splits the hidden units or columns (in multiples of 16
// floats), each thread's part of a row then has lines of its own; with
// malloc's 16-byte alignment the line at every boundary is written by both
// threads each step and moves between the cores.
template <typename T>
struct LineAllocator {
  using value_type = T;
  static constexpr std::align_val_t kLine{64};
  LineAllocator() = default;
  template <typename U>
  LineAllocator(const LineAllocator<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), kLine)); }
  void deallocate(T* p, size_t) { ::operator delete(p, kLine); }
  template <typename U>
  bool operator==(const LineAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const LineAllocator<U>&) const { return false; }
};

template <typename T>
using LineVector = std::vector<T, LineAllocator<T>>;

}  // namespace cpu
}  // namespace fastcells
