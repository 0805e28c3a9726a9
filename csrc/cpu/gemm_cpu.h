// Register-blocked CPU product over a packed right-hand side, used for the
// per-step recurrent products and the whole-sequence GEMMs
// (csrc/cpu/recurrent_cpu.cpp). Internal to csrc/cpu.
//
//   y(M, cols) = [y +] x(M, K) @ B(K, cols),   x(m, k) = x[m * ldx + k * ksx]
//
// Compiled once per CPU ISA path (csrc/cpu/isa_*.cpp) into its own namespace
// FASTCELLS_CPU_ISA: the wrapper defines the vector width in bytes
// (FASTCELLS_VEC_BYTES) and the row block (FASTCELLS_MR) that fit the
// path's register file, and compiles this file for that ISA.
//
// B is packed once per call into column panels of kNB = two SIMD vectors:
// panel p holds K rows of kNB contiguous values (zero padded), so the inner
// loop streams one contiguous block whatever B's layout or leading dimension
// (a power-of-two stride such as G*H = 1024 floats otherwise maps every row
// of a panel onto a handful of cache sets). Columns are grouped in segments
// of S (S = H for a per-gate split of G*H columns, S = N otherwise); each
// segment starts a new panel, so a thread that owns units [u0, u1) of every
// gate owns whole panels.
//
// Each output element is summed in the order k = 0, 1, ..., K-1 starting
// from y (with `accumulate`) or zero; K blocking stores and reloads the
// running sum. Splitting rows, panels or K among threads or blocks therefore
// never changes a result: the products are deterministic and independent of
// the thread count.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <memory>

#include <type_traits>
#include <utility>
#include <vector>

#include "memory_cpu.h"
#include "pack_cpu.h"

#if !defined(FASTCELLS_CPU_ISA) || !defined(FASTCELLS_VEC_BYTES) || !defined(FASTCELLS_MR) || \
    !defined(FASTCELLS_ISA_ID)
#error "gemm_cpu.h is compiled through an ISA wrapper (csrc/cpu/isa_*.cpp)"
#endif

namespace fastcells {
namespace cpu {
namespace FASTCELLS_CPU_ISA {
namespace gemm {

template <typename T>
struct Simd {
  typedef T V __attribute__((vector_size(FASTCELLS_VEC_BYTES)));
  static constexpr int kLanes = FASTCELLS_VEC_BYTES / sizeof(T);
};

// Panel width (columns) and the row block of the micro-kernel: kMR x 2
// vector accumulators, two panel vectors and a broadcast must fit the
// register file (AVX2: 6 rows in 16 ymm; AVX-512: 12 rows in 32 zmm).
template <typename T>
constexpr int64_t kNB = 2 * Simd<T>::kLanes;
constexpr int kMR = FASTCELLS_MR;
constexpr int64_t kKC = 256;  // K block: a KC x kNB panel slice is 8-16 KiB (L1)
constexpr int64_t kPC = 16;   // panels per column block: KC x 16 panels in L2

template <typename V, typename T>
inline V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V, typename T>
inline void store(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

// The first n (0 <= n <= kLanes) values at p as a vector, zeros in the other
// lanes; and the first n lanes of v stored at p. Memory past p[n) is never
// touched. AVX2 and AVX-512 float: masked loads and stores; elsewhere through
// a buffer. (Partial panels and the gate loops' last units run through here
// once per row: as copies they compiled to memmove calls, which cost more
// than the arithmetic at hidden sizes such as 6.)
#if defined(FASTCELLS_AVX2_MASKS)
inline __m256i lane_mask(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
#elif defined(FASTCELLS_AVX512_MASKS)
inline __mmask16 lane_mask(int64_t n) { return static_cast<__mmask16>((1u << n) - 1u); }
#endif

template <typename T>
inline typename Simd<T>::V load_part(const T* p, int64_t n) {
  using V = typename Simd<T>::V;
#if defined(FASTCELLS_AVX2_MASKS)
  if constexpr (std::is_same<T, float>::value) return (V)_mm256_maskload_ps(p, lane_mask(n));
#elif defined(FASTCELLS_AVX512_MASKS)
  if constexpr (std::is_same<T, float>::value) return (V)_mm512_maskz_loadu_ps(lane_mask(n), p);
#endif
  T tmp[Simd<T>::kLanes] = {};
  for (int64_t j = 0; j < n; ++j) tmp[j] = p[j];
  return load<V>(tmp);
}

template <typename T>
inline void store_part(T* p, const typename Simd<T>::V& v, int64_t n) {
#if defined(FASTCELLS_AVX2_MASKS)
  if constexpr (std::is_same<T, float>::value) {
    _mm256_maskstore_ps(p, lane_mask(n), (__m256)v);
    return;
  }
#elif defined(FASTCELLS_AVX512_MASKS)
  if constexpr (std::is_same<T, float>::value) {
    _mm512_mask_storeu_ps(p, lane_mask(n), (__m512)v);
    return;
  }
#endif
  T tmp[Simd<T>::kLanes];
  store(tmp, v);
  for (int64_t j = 0; j < n; ++j) p[j] = tmp[j];
}

// The two vectors of a 2-vector row of which only the first nb values count.
template <typename T>
inline void load_row(const T* p, int64_t nb, typename Simd<T>::V& v0, typename Simd<T>::V& v1) {
  constexpr int L = Simd<T>::kLanes;
  if (nb == 2 * L) {
    v0 = load<typename Simd<T>::V>(p);
    v1 = load<typename Simd<T>::V>(p + L);
  } else {
    v0 = load_part<T>(p, std::min<int64_t>(nb, L));
    v1 = load_part<T>(p + L, std::max<int64_t>(nb - L, 0));
  }
}

template <typename T>
inline void store_row(T* p, int64_t nb, const typename Simd<T>::V& v0,
                      const typename Simd<T>::V& v1) {
  constexpr int L = Simd<T>::kLanes;
  if (nb == 2 * L) {
    store(p, v0);
    store(p + L, v1);
  } else {
    store_part<T>(p, v0, std::min<int64_t>(nb, L));
    store_part<T>(p + L, v1, std::max<int64_t>(nb - L, 0));
  }
}

// The kMR x 2-vector accumulator block of a micro-kernel: loaded from y
// (`accumulate`), seeded with seed[0:nb) broadcast over the rows (`seed`
// without `accumulate`), or zero; and stored back to y[0:R, 0:nb).
template <typename T, int R>
inline void block_start(typename Simd<T>::V (&c0)[R], typename Simd<T>::V (&c1)[R],
                        const T* __restrict__ y, int64_t ldy, int64_t nb, bool accumulate,
                        const T* __restrict__ seed) {
  using V = typename Simd<T>::V;
  if (!accumulate && seed != nullptr) {
    V s0, s1;
    load_row<T>(seed, nb, s0, s1);
    for (int r = 0; r < R; ++r) {
      c0[r] = s0;
      c1[r] = s1;
    }
  } else if (accumulate) {
    for (int r = 0; r < R; ++r) load_row<T>(y + r * ldy, nb, c0[r], c1[r]);
  } else {
    for (int r = 0; r < R; ++r) {
      c0[r] = V{};
      c1[r] = V{};
    }
  }
}

template <typename T, int R>
inline void block_store(const typename Simd<T>::V (&c0)[R], const typename Simd<T>::V (&c1)[R],
                        T* __restrict__ y, int64_t ldy, int64_t nb) {
  for (int r = 0; r < R; ++r) store_row<T>(y + r * ldy, nb, c0[r], c1[r]);
}

// y[0:R, 0:nb) = [y +] x[0:R, 0:K) @ panel[0:K, 0:nb); panel row k at
// panel + k * ldp (kNB in a packed panel, B's row stride when B is read in
// place, see direct_mm). With `seed` (and not `accumulate`) every row starts
// from seed[0:nb) instead of zero, as if y held seed broadcast over the rows.
template <typename T, int R>
inline void micro_kernel(int64_t K, const T* __restrict__ x, int64_t ldx, int64_t ksx,
                         const T* __restrict__ panel, int64_t ldp, T* __restrict__ y,
                         int64_t ldy, int64_t nb, bool accumulate, const T* __restrict__ seed) {
  using V = typename Simd<T>::V;
  constexpr int L = Simd<T>::kLanes;
  V c0[R], c1[R];
  block_start<T, R>(c0, c1, y, ldy, nb, accumulate, seed);
  const T* xk = x;
  const T* pk = panel;
  for (int64_t k = 0; k < K; ++k, xk += ksx, pk += ldp) {
    const V b0 = load<V>(pk);
    const V b1 = load<V>(pk + L);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const T a = xk[r * ldx];
      c0[r] += a * b0;
      c1[r] += a * b1;
    }
  }
  block_store<T, R>(c0, c1, y, ldy, nb);
}

#if defined(FASTCELLS_BF16)
// ---------------------------------------------------------------- bfloat16
// Products on bfloat16 operands with float32 sums (AVX-512-BF16): both
// operands are rounded to bfloat16 (round to nearest even) and held as pairs
// of rows k, k + 1 (pack_cpu.h); vdpbf16ps adds both products of a pair to
// each float32 sum, pair by pair in k order. Its products of two bfloat16
// values are exact in float32; it treats subnormal operands as zero.

// dst[0:2 ceil(K/2)) = bfloat16(x[k * ks]) for k < K, then a zero if K is odd.
inline void to_bf16(const float* __restrict__ x, int64_t ks, int64_t K, uint16_t* __restrict__ dst) {
  int64_t k = 0;
  for (; k < K; k += 16) {
    const int64_t n = std::min<int64_t>(16, K - k);
    const __mmask16 m = static_cast<__mmask16>((1u << n) - 1);
    __m512 v;
    if (ks == 1) {
      v = _mm512_maskz_loadu_ps(m, x + k);
    } else {
      alignas(64) float tmp[16] = {};
      for (int64_t j = 0; j < n; ++j) tmp[j] = x[(k + j) * ks];
      v = _mm512_load_ps(tmp);
    }
    _mm256_mask_storeu_epi16(dst + k, m, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
  }
  if (K & 1) dst[K] = 0;
}

// One bfloat16 value as float storage bits (round to nearest even, as
// vcvtneps2bf16 rounds; NaN stays NaN).
inline uint16_t bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// y[0:R, 0:nb) = [y +] x[0:R, 0:2 KP) @ panel (KP slot rows of kNB pairs):
// micro_kernel on bfloat16 pairs; the pair kp of x row r (two bfloat16
// values, rows 2 kp and 2 kp + 1 of the sum) at x + r * ldx + kp * ksx
// (ksx = 2: each row of x holds its pairs contiguously), slot row kp of
// the panel at panel + kp * ldp (kNB in a packed panel).
template <int R>
inline void micro_kernel_pairs(int64_t KP, const uint16_t* __restrict__ x, int64_t ldx,
                               int64_t ksx, const float* __restrict__ panel, int64_t ldp,
                               float* __restrict__ y, int64_t ldy, int64_t nb, bool accumulate,
                               const float* __restrict__ seed) {
  using V = Simd<float>::V;
  constexpr int L = Simd<float>::kLanes;
  static_assert(L == 16, "bfloat16 products run on 512-bit vectors");
  // The sums live in c0/c1, which only unrolled loops index, so that GCC
  // keeps them in registers; with t0/t1 (indexed by block_start's loops) in
  // their place it stored every sum to the stack at every k step.
  V t0[R], t1[R], c0[R], c1[R];
  block_start<float, R>(t0, t1, y, ldy, nb, accumulate, seed);
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    c0[r] = t0[r];
    c1[r] = t1[r];
  }
  const uint16_t* xk = x;
  const float* pk = panel;
  for (int64_t kp = 0; kp < KP; ++kp, xk += ksx, pk += ldp) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(pk);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(pk + L);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      int a;
      std::memcpy(&a, xk + r * ldx, sizeof(a));
      const __m512bh av = (__m512bh)_mm512_set1_epi32(a);
      c0[r] = (V)_mm512_dpbf16_ps((__m512)c0[r], av, b0);
      c1[r] = (V)_mm512_dpbf16_ps((__m512)c1[r], av, b1);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    t0[r] = c0[r];
    t1[r] = c1[r];
  }
  block_store<float, R>(t0, t1, y, ldy, nb);
}

// Rows [kp0, kp1) of src (K x N, row stride ld) as bfloat16 pair rows: slot
// (kp, n) of dst (row stride ldd, a multiple of 16) holds src[2 kp][n] in its
// low and src[2 kp + 1][n] in its high half, rounded to nearest even as
// to_bf16 rounds; zeros at n >= N and in place of row K of an odd K. Both
// operands of a product over a long K (the weight gradients' T*B rows) in
// the operand layout of vdpbf16ps.
inline void pack_pair_rows(const float* __restrict__ src, int64_t ld, int64_t K, int64_t N,
                           float* __restrict__ dst, int64_t ldd, int64_t kp0, int64_t kp1) {
  for (int64_t kp = kp0; kp < kp1; ++kp) {
    const float* r0 = src + 2 * kp * ld;
    const bool odd_end = 2 * kp + 1 >= K;
    float* d = dst + kp * ldd;
    for (int64_t n = 0; n < ldd; n += 16) {
      const __mmask16 m = lane_mask(std::max<int64_t>(0, std::min<int64_t>(16, N - n)));
      const __m512 a = _mm512_maskz_loadu_ps(m, r0 + n);
      const __m512 b = odd_end ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m, r0 + ld + n);
      const __m512i lo = _mm512_cvtepu16_epi32(reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(a)));
      const __m512i hi = _mm512_cvtepu16_epi32(reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(b)));
      _mm512_storeu_si512(d + n, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    }
  }
}

using MicroKernelPairs = void (*)(int64_t, const uint16_t*, int64_t, int64_t, const float*,
                                  int64_t, float*, int64_t, int64_t, bool, const float*);
template <size_t... R>
constexpr std::array<MicroKernelPairs, sizeof...(R)> micro_kernels_pairs(std::index_sequence<R...>) {
  return {&micro_kernel_pairs<static_cast<int>(R) + 1>...};
}
#endif  // FASTCELLS_BF16

// C(M, NN) = [C +] A(M, K) B(K, NN) for a right-hand side only NN <= 6
// columns wide and A stored with unit stride along M (A(m, k) = A[m + k * a_ks],
// e.g. the transposed gate gradients of dW_ih = dG^T x with few input
// features), where 16-column panels would be mostly padding. Vectors run along
// M; each element still sums k = 0..K-1 in order from zero or C, with the same
// fused multiply-adds as micro_kernel, so results are bit-identical to it.
template <typename T, int NN>
void narrow_mm(int64_t M, int64_t K, const T* __restrict__ A, int64_t a_ks,
               const T* __restrict__ B, int64_t ldb, T* __restrict__ C, int64_t ldc,
               bool accumulate) {
  using V = typename Simd<T>::V;
  constexpr int L = Simd<T>::kLanes;
  for (int64_t k0 = 0; k0 == 0 || k0 < K; k0 += kKC) {  // K block: A rows stay in L2
    const int64_t k1 = std::min<int64_t>(K, k0 + kKC);
    const bool acc = accumulate || k0 > 0;
    for (int64_t m0 = 0; m0 < M; m0 += 2 * L) {
      const int64_t mb = std::min<int64_t>(2 * L, M - m0);
      T tmp[2 * L] = {};
      V c0[NN], c1[NN];
      for (int n = 0; n < NN; ++n) {
        if (acc)
          for (int64_t i = 0; i < mb; ++i) tmp[i] = C[(m0 + i) * ldc + n];
        c0[n] = acc ? load<V>(tmp) : V{};
        c1[n] = acc ? load<V>(tmp + L) : V{};
      }
      for (int64_t k = k0; k < k1; ++k) {
        const T* a = A + k * a_ks + m0;
        V a0, a1;
        if (mb == 2 * L) {
          a0 = load<V>(a);
          a1 = load<V>(a + L);
        } else {
          std::copy(a, a + mb, tmp);
          a0 = load<V>(tmp);
          a1 = load<V>(tmp + L);
        }
        const T* bk = B + k * ldb;
        for (int n = 0; n < NN; ++n) {
          const T bv = bk[n];
          c0[n] += bv * a0;
          c1[n] += bv * a1;
        }
      }
      for (int n = 0; n < NN; ++n) {
        store(tmp, c0[n]);
        store(tmp + L, c1[n]);
        for (int64_t i = 0; i < mb; ++i) C[(m0 + i) * ldc + n] = tmp[i];
      }
    }
  }
}

// Row counts 1..kMR of the micro-kernel as a table of instantiations.
template <typename T>
using MicroKernel = void (*)(int64_t, const T*, int64_t, int64_t, const T*, int64_t, T*, int64_t,
                             int64_t, bool, const T*);
template <typename T, size_t... R>
constexpr std::array<MicroKernel<T>, sizeof...(R)> micro_kernels(std::index_sequence<R...>) {
  return {&micro_kernel<T, static_cast<int>(R) + 1>...};
}

// Rows of a block of M rows: M split into ceil(M / kMR) near-equal blocks,
// so that M = 64 on a 12-row kernel runs 6 blocks of 10-11 rows instead of
// five full blocks and one of 4. Each output element sums over k in the same
// order whatever its block, so the split changes no result.
inline int64_t row_block(int64_t M) {
  const int64_t blocks = (M + kMR - 1) / kMR;
  return (M + blocks - 1) / blocks;
}

// The blocking of the in-place products below (direct_mm and its bfloat16
// form), as PackedB::mm's (K blocks, then panel groups, row blocks, panels):
// call(k0, kc, m, r, c, acc) for each K block [k0, k0 + kc) of K (in steps of
// kstep), row block [m, m + r) of M and panel c of [c0, c1); acc: the block
// continues y's sums (`accumulate` or a later K block).
template <typename F>
inline void direct_blocks(int64_t M, int64_t c0, int64_t c1, int64_t K, int64_t kstep,
                          int64_t NB, bool accumulate, const F& call) {
  if (M <= 0 || c0 >= c1) return;
  const int64_t rb = row_block(M);
  for (int64_t k0 = 0; k0 == 0 || k0 < K; k0 += kstep) {
    const int64_t kc = std::min<int64_t>(kstep, K - k0);
    const bool acc = accumulate || k0 > 0;
    for (int64_t q0 = c0; q0 < c1; q0 += kPC * NB) {
      const int64_t q1 = std::min<int64_t>(c1, q0 + kPC * NB);
      for (int64_t m = 0; m < M; m += rb) {
        const int64_t r = std::min<int64_t>(rb, M - m);
        for (int64_t c = q0; c < q1; c += NB) call(k0, kc, m, r, c, acc);
      }
    }
  }
}

// y(M, [n0, n1)) = [y +] x(M, K) @ B(K, [n0, n1)) with B read in place,
// B(k, n) = B[k * ldb + n], over whole panels (n1 - n0 a multiple of kNB):
// a row-major right-hand side already holds each panel's k-th row as kNB
// contiguous values, so packing would only copy it. The same sums as
// PackedB::mm.
template <typename T>
void direct_mm(int64_t M, int64_t n0, int64_t n1, int64_t K, const T* x, int64_t ldx,
               int64_t ksx, const T* B, int64_t ldb, T* y, int64_t ldy, bool accumulate) {
  static constexpr auto kernels = micro_kernels<T>(std::make_index_sequence<kMR>());
  constexpr int64_t NB = kNB<T>;
  direct_blocks(M, n0, n1, K, kKC, NB, accumulate,
                [&](int64_t k0, int64_t kc, int64_t m, int64_t r, int64_t c, bool acc) {
                  kernels[r - 1](kc, x + m * ldx + k0 * ksx, ldx, ksx, B + k0 * ldb + c, ldb,
                                 y + m * ldy + c, ldy, NB, acc, nullptr);
                });
}

#if defined(FASTCELLS_BF16)
// direct_mm on bfloat16 pair rows (pack_pair_rows), columns [c0, c1) of y:
// x(m, pair kp) in slot xs[kp * ldxs + m] (a pair-row matrix read
// transposed), B in slot rows of row stride ldb padded to whole panels, so
// that every panel load stays inside B; only the first c1 - c columns of the
// last panel are stored.
inline void direct_mm_pairs(int64_t M, int64_t c0, int64_t c1, int64_t KP, const float* xs,
                            int64_t ldxs, const float* B, int64_t ldb, float* y, int64_t ldy,
                            bool accumulate) {
  static constexpr auto kernels = micro_kernels_pairs(std::make_index_sequence<kMR>());
  constexpr int64_t NB = kNB<float>;
  const uint16_t* x = reinterpret_cast<const uint16_t*>(xs);
  direct_blocks(M, c0, c1, KP, kKC / 2, NB, accumulate,
                [&](int64_t kp0, int64_t kpc, int64_t m, int64_t r, int64_t c, bool acc) {
                  kernels[r - 1](kpc, x + 2 * (kp0 * ldxs + m), 2, 2 * ldxs, B + kp0 * ldb + c,
                                 ldb, y + m * ldy + c, ldy, std::min<int64_t>(NB, c1 - c), acc,
                                 nullptr);
                });
}
#endif

// A view that packs into and multiplies with a PackedStore (pack_cpu.h) in
// this path's panel layout.
template <typename T>
class PackedB {
 public:
  static constexpr int64_t NB = kNB<T>;

  explicit PackedB(PackedStore<T>& s) : s_(s) {}

  // Packs B(k, n) = trans ? B[n * ldb + k] : B[k * ldb + n], for k < K,
  // n < N, in parts so that a thread team can fill disjoint panel ranges:
  // init() sizes the (uninitialised) storage, S dividing N into segments
  // (S = N: one segment); pack_panels() writes panels [p0, p1), padding
  // included; set_ready() records that every panel is written (a pack can
  // then serve several products, see holds()). With `pairs` (float only, on
  // a path with FASTCELLS_BF16) the panels hold bfloat16 pairs (pack_cpu.h)
  // and mm() rounds x to bfloat16 too.
  void init(int64_t K, int64_t N, int64_t S, bool pairs = false) {
    s_.ready = false;
    s_.layout = FASTCELLS_ISA_ID;
#if defined(FASTCELLS_BF16)
    s_.pairs = pairs && std::is_same<T, float>::value;
#else
    // No pairs form without bfloat16 products: such a path's bfloat16 table
    // is its float one (isa.h), which never asks for it.
    s_.pairs = false;
    (void)pairs;
#endif
    s_.K = K;
    s_.S = S > 0 ? S : 1;
    s_.per_seg = (s_.S + NB - 1) / NB;
    s_.panels = panel_count(N, s_.S);
    const size_t n = static_cast<size_t>(std::max<int64_t>(1, s_.panels * rows() * NB));
    s_.data.reset(new T[n]);
    advise_huge_pages(s_.data.get(), n * sizeof(T));
  }

  void pack_panels(const T* B, int64_t ldb, bool trans, int64_t p0, int64_t p1) {
#if defined(FASTCELLS_BF16)
    if (s_.pairs) {
      pack_pairs(B, ldb, trans, p0, p1);
      return;
    }
#endif
    const int64_t K = s_.K;
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t c0 = col0(p), nb = width(p);
      T* dst = s_.data.get() + p * K * NB;
      if (trans) {
        // Column c of the panel is row c0 + c of B, read as one sequential
        // stream (B is often not in cache: the weights are read once per
        // call), written down the panel (K x kNB values, cache resident).
        for (int64_t c = 0; c < nb; ++c) {
          const T* src = B + (c0 + c) * ldb;
          for (int64_t k = 0; k < K; ++k) dst[k * NB + c] = src[k];
        }
      } else {
        // Row by row as two vectors (a partial panel's padding comes back as
        // zeros): a copy call per row of a few values cost more than the data.
        using V = typename Simd<T>::V;
        constexpr int L = Simd<T>::kLanes;
        for (int64_t k = 0; k < K; ++k) {
          V v0, v1;
          load_row<T>(B + k * ldb + c0, nb, v0, v1);
          store(dst + k * NB, v0);
          store(dst + k * NB + L, v1);
        }
        continue;
      }
      for (int64_t k = 0; nb < NB && k < K; ++k)  // padding of a partial panel
        std::fill(dst + k * NB + nb, dst + (k + 1) * NB, T(0));
    }
  }

  void set_ready() { s_.ready = true; }
  // Whether the store holds a K x N right-hand side in segments of S, packed
  // by this path in the form `pairs` names.
  bool holds(int64_t K, int64_t N, int64_t S, bool pairs = false) const {
    return s_.ready && s_.layout == FASTCELLS_ISA_ID && s_.pairs == pairs && s_.K == K &&
           s_.S == S && s_.panels == panel_count(N, S);
  }
  // Slot rows of a panel: K, or ceil(K / 2) bfloat16 pairs.
  int64_t rows() const { return s_.pairs ? (s_.K + 1) / 2 : s_.K; }

  // Panels of a K x N right-hand side in segments of S (S > 0): each segment
  // is padded to whole panels.
  static int64_t panel_count(int64_t N, int64_t S) {
    return N > 0 ? (N / S) * ((S + NB - 1) / NB) : 0;
  }

  int64_t panels() const { return s_.panels; }
  // The panel holding column c.
  int64_t panel_at(int64_t c) const { return (c / s_.S) * s_.per_seg + (c % s_.S) / NB; }
  int64_t col0(int64_t p) const { return (p / s_.per_seg) * s_.S + (p % s_.per_seg) * NB; }
  int64_t width(int64_t p) const {
    return std::min<int64_t>(NB, s_.S - (p % s_.per_seg) * NB);
  }

  // y(M, columns of panels [p0, p1)) = [y +] x(M, K) @ B. With `bias`
  // (length N, ignored with `accumulate`) y = bias + x @ B, summed exactly as
  // if y had been filled with bias first and accumulated into.
  //
  // x stored transposed (ldx == 1) with a long stride between its k rows
  // (the gate gradients dG^T of the weight-gradient GEMMs, ksx = G*H) is
  // copied block by block (kKC x kMC) into rows of kMC contiguous values
  // first: read in place, a 4 KiB or larger power-of-two stride maps every k
  // of a block onto the same few cache sets. Only worth it when the block is
  // reused by enough panels. The sums are the same either way.
  void mm(int64_t M, int64_t p0, int64_t p1, const T* x, int64_t ldx, int64_t ksx, T* y,
          int64_t ldy, bool accumulate, const T* bias = nullptr) const {
    if (M <= 0 || p0 >= p1) return;
#if defined(FASTCELLS_BF16)
    if (s_.pairs) {
      mm_pairs(M, p0, p1, x, ldx, ksx, y, ldy, accumulate, bias);
      return;
    }
#endif
    constexpr int64_t kMC = 16 * kMR;
    const int64_t K = s_.K;
    const bool copy_x = ldx == 1 && ksx * static_cast<int64_t>(sizeof(T)) >= 4096 &&
                        (p1 - p0) * NB >= 256 && M >= kMR && bias == nullptr;
    std::unique_ptr<T[]> xbuf(copy_x ? new T[kKC * kMC] : nullptr);
    for (int64_t k0 = 0; k0 == 0 || k0 < K; k0 += kKC) {
      const int64_t kc = std::min<int64_t>(kKC, K - k0);
      const bool acc = accumulate || k0 > 0;
      const bool seeded = !acc && bias != nullptr;
      if (copy_x) {
        for (int64_t m0 = 0; m0 < M; m0 += kMC) {
          const int64_t mc = std::min<int64_t>(kMC, M - m0);
          for (int64_t k = 0; k < kc; ++k) {
            const T* src = x + (k0 + k) * ksx + m0;
            std::copy(src, src + mc, xbuf.get() + k * kMC);
          }
          block(mc, p0, p1, k0, kc, xbuf.get(), 1, kMC, y + m0 * ldy, ldy, acc, nullptr);
        }
      } else {
        block(M, p0, p1, k0, kc, x + k0 * ksx, ldx, ksx, y, ldy, acc,
              seeded ? bias : nullptr);
      }
    }
  }

  // Same over the columns [c0, c1) of one segment (c0 at a panel boundary).
  void mm_cols(int64_t M, int64_t c0, int64_t c1, const T* x, int64_t ldx, T* y, int64_t ldy,
               bool accumulate) const {
    if (c0 >= c1) return;
    mm(M, panel_at(c0), panel_at(c1 - 1) + 1, x, ldx, 1, y, ldy, accumulate);
  }

 private:
  // One K block [k0, k0 + kc) of mm over rows [0, M); xk points at its k0.
  // `seed` (bias) only on a first block without accumulation.
  void block(int64_t M, int64_t p0, int64_t p1, int64_t k0, int64_t kc, const T* xk,
             int64_t ldx, int64_t ksx, T* y, int64_t ldy, bool acc, const T* seed) const {
    static constexpr auto kernels = micro_kernels<T>(std::make_index_sequence<kMR>());
    const int64_t rb = row_block(M);
    for (int64_t q0 = p0; q0 < p1; q0 += kPC) {
      const int64_t q1 = std::min<int64_t>(p1, q0 + kPC);
      for (int64_t m = 0; m < M; m += rb) {
        const T* xm = xk + m * ldx;
        const MicroKernel<T> kernel = kernels[std::min<int64_t>(rb, M - m) - 1];
        for (int64_t p = q0; p < q1; ++p) {
          const T* panel = s_.data.get() + p * rows() * NB + k0 * NB;
          const T* sd = seed ? seed + col0(p) : nullptr;
          kernel(kc, xm, ldx, ksx, panel, NB, y + m * ldy + col0(p), ldy, width(p), acc, sd);
        }
      }
    }
  }

#if defined(FASTCELLS_BF16)
  // pack_panels in pairs: slot (k/2, c) holds rows k, k + 1 of column c.
  void pack_pairs(const T* B, int64_t ldb, bool trans, int64_t p0, int64_t p1) {
    const int64_t K = s_.K, KP = rows();
    const auto at = [&](int64_t k, int64_t n) -> uint32_t {
      if (k >= K) return 0;
      return bf16_bits(static_cast<float>(trans ? B[n * ldb + k] : B[k * ldb + n]));
    };
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t c0 = col0(p), nb = width(p);
      T* dst = s_.data.get() + p * KP * NB;
      for (int64_t kp = 0; kp < KP; ++kp) {
        for (int64_t c = 0; c < NB; ++c) {
          const uint32_t v = c < nb ? at(2 * kp, c0 + c) | (at(2 * kp + 1, c0 + c) << 16) : 0u;
          std::memcpy(dst + kp * NB + c, &v, sizeof(v));
        }
      }
    }
  }

  // mm on bfloat16 pairs: x is rounded to bfloat16 block by block (kMC rows
  // x all of K, in a per-thread buffer), then multiplied K block by K block.
  void mm_pairs(int64_t M, int64_t p0, int64_t p1, const T* x, int64_t ldx, int64_t ksx, T* y,
                int64_t ldy, bool accumulate, const T* bias) const {
    if constexpr (std::is_same<T, float>::value) {
      static constexpr auto kernels = micro_kernels_pairs(std::make_index_sequence<kMR>());
      constexpr int64_t kMC = 16 * kMR, kKP = kKC / 2;
      const int64_t KP = rows(), ld = 2 * KP;
      thread_local std::vector<uint16_t> xbuf;
      xbuf.resize(static_cast<size_t>(std::max<int64_t>(1, std::min(M, kMC) * ld)));
      for (int64_t m0 = 0; m0 < M; m0 += kMC) {
        const int64_t mc = std::min<int64_t>(kMC, M - m0);
        for (int64_t m = 0; m < mc; ++m)
          to_bf16(x + (m0 + m) * ldx, ksx, s_.K, xbuf.data() + m * ld);
        for (int64_t kp0 = 0; kp0 == 0 || kp0 < KP; kp0 += kKP) {
          const int64_t kpc = std::min<int64_t>(kKP, KP - kp0);
          const bool acc = accumulate || kp0 > 0;
          const T* seed = !acc ? bias : nullptr;
          const int64_t rb = row_block(mc);
          for (int64_t q0 = p0; q0 < p1; q0 += kPC) {
            const int64_t q1 = std::min<int64_t>(p1, q0 + kPC);
            for (int64_t m = 0; m < mc; m += rb) {
              const MicroKernelPairs kernel = kernels[std::min<int64_t>(rb, mc - m) - 1];
              for (int64_t p = q0; p < q1; ++p) {
                const T* panel = s_.data.get() + p * KP * NB + kp0 * NB;
                kernel(kpc, xbuf.data() + m * ld + 2 * kp0, ld, 2, panel, NB,
                       y + (m0 + m) * ldy + col0(p), ldy, width(p), acc,
                       seed ? seed + col0(p) : nullptr);
              }
            }
          }
        }
      }
    }
  }
#endif

  PackedStore<T>& s_;
};

}  // namespace gemm
}  // namespace FASTCELLS_CPU_ISA
}  // namespace cpu
}  // namespace fastcells
