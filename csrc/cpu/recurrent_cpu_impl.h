// CPU time loop for one layer in one direction: forward and BPTT.
//
// Shape legend (see csrc/kernels/cells.h): T steps, B batch, H hidden,
// P output size (proj_size or H), G gates, N packed rows.
//
// Per step the recurrent product h_{t-1} W_hh^T (M x G*H, M = active rows)
// runs through the register-blocked kernel of gemm_cpu.h over a W_hh^T copy
// packed by the thread team once per call, or once for all the time chunks
// of an inference call (ForwardPack); there is no per-step library call,
// packing or allocation. The gate nonlinearities of csrc/kernels/cells.h and
// the state update follow. Large steps run on an OpenMP team that lives for the whole
// sequence: each thread owns a range of batch rows (no barrier) or a range
// of hidden units of every row (a barrier per step); see Part below.
//
// Compiled once per CPU ISA path into namespace FASTCELLS_CPU_ISA by the
// wrappers csrc/cpu/isa_*.cpp (see gemm_cpu.h), which end with kernels(),
// this path's entry in the dispatch table of csrc/cpu/isa.h.
#pragma once

#include "../kernels/layer_norm.h"
#include "gemm_cpu.h"

namespace fastcells {
namespace cpu {
namespace FASTCELLS_CPU_ISA {
namespace {

using kernels::kGRU;
using kernels::kGRU_RESET_BEFORE;
using kernels::kLSTM;

// Below this many multiply-adds per step the loop runs on one thread. Measured
// on the 2-core development machine (module forward and forward+backward,
// two threads against one, alternating builds): a team pays off from about
// 16 Ki multiply-adds per step, e.g. 1.3x for an LSTM at B=1, H=64 and
// 1.6-1.8x at B=1, H=128 (LSTM) or B=1..2, H=128 (GRU); at 8 Ki (LSTM B=8,
// H=16) it made no difference.
constexpr int64_t kParallelWork = 1 << 14;
// Below this many multiply-adds in the whole call (all steps) the loop runs on
// one thread whatever the per-step work: a short call, such as one decoding
// step (T=1), has nothing to amortise the team's start and its per-step
// exchange of h over. Measured on a 2-core AVX-512 host (a VM whose second
// vCPU is not always its own) with a 2-layer LSTM, hidden 40, batch 100, T=1
// (640 Ki per layer) and a Linear head: about 57-60 us per step on one thread
// at any time; with a team and the packs already cached, 45 us while the
// second core was free and 81 us while it was not.
constexpr int64_t kParallelCall = 1 << 20;
// Below this many multiply-adds a whole-sequence product (cpu::matmul) runs on
// one thread: a team is forked for it alone, with nothing to amortise it over.
constexpr int64_t kParallelGemm = 1 << 20;

// From this many multiply-adds per step a bfloat16 backward runs its per-step
// products on bfloat16 operands (Pairs). Measured on a 2-core AVX-512-BF16
// host (LSTM, bfloat16, module forward+backward, the two thresholds in
// separate processes, alternating, at one and at two threads): 1.05-1.6x
// faster from 256 Ki (batch 32 hidden 64 1.1x, batch 64 hidden 64 1.13x,
// batch 16 hidden 128 1.14x, batch 4 hidden 256 1.6x; with the batch rows
// split among threads as they are now); below 256 Ki within 4% either way,
// where rounding each step's gate gradients costs what the products save.
constexpr int64_t kPairsBackwardWork = 1 << 18;

using gemm::PackedB;

// ---------------------------------------------------------------- threads
// The time loop runs inside one OpenMP team (one fork per call) when the
// per-step work is large enough; each thread owns a fixed Part of the work
// for the whole call.
// Whether the last team_size() of this thread chose one thread because of
// the back-off (TeamBackoff), for run_team to time that call.
inline bool& solo_by_backoff() {
  thread_local bool solo = false;
  return solo;
}

inline int team_size(int64_t work, int64_t threshold = kParallelWork, int64_t steps = 1) {
  solo_by_backoff() = false;
  if (work < threshold || work * steps < kParallelCall || omp_in_parallel()) return 1;
  if (!team_backoff().allow_team()) {
    solo_by_backoff() = true;
    return 1;
  }
  return std::max(1, at::get_num_threads());
}

inline int64_t elapsed_ns(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() -
                                                              start)
      .count();
}

// body(tid, team, barrier): the team's threads meet at `barrier`
// (team_barrier.h), sized to the team OpenMP actually started. How long its
// threads slept there, and with a `key` (nonzero: the call's kind and size)
// how its time compares with the same call on one thread, decide whether the
// next calls start a team (TeamBackoff).
template <typename F>
void run_team(int nt, const F& body, int64_t key = 0) {
  StepBarrier barrier;
  const auto start = std::chrono::steady_clock::now();
  if (nt <= 1) {
    const bool timed = key != 0 && solo_by_backoff();
    body(0, 1, barrier);
    if (timed) team_backoff().report_solo(key, elapsed_ns(start));
    return;
  }
#pragma omp parallel num_threads(nt)
  {
#pragma omp single
    barrier.reset(omp_get_num_threads());  // (single ends with OpenMP's barrier)
    body(omp_get_thread_num(), omp_get_num_threads(), barrier);
  }
  team_backoff().report(barrier, elapsed_ns(start), key);
}

// The back-off key of a time loop (run_team): its pass and size.
inline int64_t loop_key(bool backward, int64_t work, int64_t steps) {
  return 2 * (work * steps) + (backward ? 1 : 0) + 2;
}

// A barrier for a team started by run_team (none for a team of one).
inline void team_barrier(int team, StepBarrier& barrier) {
  if (team > 1) barrier.wait();
}

// [lo, hi) of n items for thread tid of nt, in multiples of q.
inline std::pair<int64_t, int64_t> share(int64_t n, int tid, int nt, int64_t q) {
  const int64_t per = ((n + nt - 1) / nt + q - 1) / q * q;
  const int64_t lo = std::min<int64_t>(n, tid * per);
  return {lo, std::min<int64_t>(n, lo + per)};
}

// What one thread owns for a whole call. Batch rows never interact, so when
// there are enough of them and the packed W_hh fits the L2 cache each thread
// takes a range of rows and runs its own loop with no barrier at all.
// Otherwise (few rows, or a W_hh too large to stream once per thread) each
// thread takes a range of hidden units (and output columns) of every row and
// the team meets at a barrier each step. Either way every element is
// computed by the same arithmetic, so results do not depend on the split.
struct Part {
  int64_t b0, b1;  // batch rows
  int64_t u0, u1;  // hidden units
  int64_t c0, c1;  // output columns (P)
  bool sync;       // units split: barriers needed
};

// Rows are split when the packed W_hh takes at most half of one core's L2
// cache (row_split_bytes(), isa.h), so that each thread's own pass over it
// per step stays in L2 beside its states and gates, and each thread gets at
// least two register blocks of rows (2 kMR), measured on AVX2 hosts.
// On the 512-bit paths (measured on a 2-core AVX-512 host, Zen 5 with 1 MiB
// of L2, LSTM / GRU / RNN, forward and forward+backward, the two rules in
// separate processes, alternating) a thread's rows pay off much earlier,
// because the unit split's barrier per step costs more there than streaming
// W_hh once per thread:
// - from kMR / 2 = 6 rows per thread with a packed W_hh up to 16 times the
//   limit (8 MiB): splitting rows beat splitting units by 1.2-2x for every
//   W_hh from 1 to 4 MiB at batch 64-256, and by 1.1-1.7x at batch 12-32
//   (e.g. LSTM batch 16 hidden 64 1.6x forward, hidden 512 1.24x; batch 32
//   hidden 256 1.13x forward+backward);
// - from 4 rows per thread with W_hh up to 2 times the limit (1 MiB): batch
//   8 gained 1.05-1.5x at hidden 64-256 (LSTM, GRU), where W_hh of 4 MiB
//   (LSTM hidden 512) lost 10%; 2 rows per thread lost 25-35%.
inline bool split_by_rows(int nt, int64_t B, int64_t w_hh_elems, size_t elem_size) {
  if (nt <= 1) return false;
  const int64_t bytes = w_hh_elems * static_cast<int64_t>(elem_size);
#if FASTCELLS_VEC_BYTES >= 64
  return (B >= gemm::kMR / 2 * nt && bytes <= 16 * row_split_bytes()) ||
         (B >= 4 * nt && bytes <= 2 * row_split_bytes());
#else
  return B >= 2 * gemm::kMR * nt && bytes <= row_split_bytes();
#endif
}

inline Part part_of(bool by_rows, int64_t B, int64_t H, int64_t P, int tid, int team,
                    int64_t q) {
  if (team == 1) return {0, B, 0, H, 0, P, false};
  if (by_rows) {
    const auto rows = share(B, tid, team, 1);
    return {rows.first, rows.second, 0, H, 0, P, false};
  }
  const auto units = share(H, tid, team, q);
  const auto cols = share(P, tid, team, q);
  return {0, B, units.first, units.second, cols.first, cols.second, true};
}

// The team of a time loop with `work` multiply-adds per step over `steps`
// steps: its size and whether its threads split batch rows (split_by_rows,
// W_hh of w_hh_elems values of w_elem bytes). `whole_rows` (the LayerNorm
// cells: row statistics need every unit of a row) runs on one thread where
// the rows would not be split.
struct LoopTeam {
  int nt;
  bool by_rows;
};

inline LoopTeam loop_team(int64_t B, int64_t work, int steps, int64_t w_hh_elems,
                          size_t w_elem, bool whole_rows) {
  LoopTeam lt{team_size(work, kParallelWork, steps), false};
  lt.by_rows = split_by_rows(lt.nt, B, w_hh_elems, w_elem);
  if (whole_rows && !lt.by_rows) lt.nt = 1;
  return lt;
}

// Thread tid's share of the panels of b (after b.init); the team must meet
// at a barrier before any thread reads b.
template <typename T>
void pack_share(PackedB<T>& b, const T* B, int64_t ldb, bool trans, int tid, int team) {
  const auto ps = share(b.panels(), tid, team, 1);
  b.pack_panels(B, ldb, trans, ps.first, ps.second);
}

inline void part_barrier(const Part& pt, StepBarrier& barrier) {
  if (pt.sync) barrier.wait();
}

// Elementwise gate loops. One loop reads NI arrays and writes NO arrays at the
// same unit index: in[k] / out[k] point at the first unit of this thread's
// range [u0, u1), and f(in, out, j) computes element j (0 <= j < n) of every
// array. An array updated in place appears in both lists; f reads all of its
// inputs before it writes.
template <typename T, int NI, int NO>
struct Runs {
  const T* in[NI];
  T* out[NO];
};

// dst[0:L) = src[0:rest) padded with zeros, and back, for the last rest < L
// units of a gate loop (for_units_padded); see gemm::load_part.
inline void load_tail(float* dst, const float* src, int64_t rest) {
  gemm::store(dst, gemm::load_part<float>(src, rest));
}
inline void store_tail(float* dst, const float* src, int64_t rest) {
  gemm::store_part<float>(dst, gemm::load<gemm::Simd<float>::V>(src), rest);
}

// Runs f over the n units of r as one SIMD loop with a scalar remainder.
// Short ranges (the forecasting regime's H = 6..16) use 4 lanes so that they
// vectorise at all; longer ones let the compiler pick the widest vectors.
template <typename T, int NI, int NO, typename F>
inline void for_units(int64_t n, const Runs<T, NI, NO>& r, const F& f) {
  const T* const* in = r.in;
  T* const* out = r.out;
  if (n < 16) {
#pragma omp simd simdlen(4)
    for (int64_t j = 0; j < n; ++j) f(in, out, j);
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) f(in, out, j);
  }
}

// The same for loops whose elements cost several exp/tanh each (the forward
// gates) in float: whole vectors, then the last n % L units as one more
// L-lane vector on padded copies. Forecasting models' hidden sizes are often
// not a multiple of the vector width (the airline model's H = 6), and a
// scalar remainder costs as much per unit as a whole vector; for the cheap
// backward loops the copies cost more than they save. Threads split units at
// multiples of the panel width (Part), so a unit falls in the padded tail
// whatever the thread count, and results stay independent of it. double:
// for_units.
template <typename T, int NI, int NO, typename F>
inline void for_units_padded(int64_t n, const Runs<T, NI, NO>& r, const F& f) {
  if constexpr (std::is_same<T, float>::value) {
    constexpr int L = gemm::Simd<float>::kLanes;
    if (n <= 0) return;
    const int64_t full = n / L * L, rest = n - full;
#pragma omp simd simdlen(L)
    for (int64_t j = 0; j < full; ++j) f(r.in, r.out, j);
    if (rest == 0) return;
    alignas(64) float lin[NI][L];
    alignas(64) float lout[NO][L];
    const float* pin[NI];
    float* pout[NO];
    for (int k = 0; k < NI; ++k) {
      load_tail(lin[k], r.in[k] + full, rest);
      pin[k] = lin[k];
    }
    for (int k = 0; k < NO; ++k) pout[k] = lout[k];
#pragma omp simd simdlen(L)
    for (int64_t j = 0; j < L; ++j) f(pin, pout, j);
    for (int k = 0; k < NO; ++k) store_tail(r.out[k] + full, lout[k], rest);
    return;
  }
  for_units(n, r, f);
}

// ---------------------------------------------------------------- gate rows
// One batch row's gate loop over the units [u0, u1) of every gate. The
// structs name the slots of Runs::in and Runs::out.

// LSTM forward. gt (G*H): the whole pre-activations in (the recurrent
// product is accumulated onto the x side in place), activated i, f, g, o
// out; c: c_{t-1} in, c_t out; e: c_t saved for backward; r: r_t =
// o * tanh(c_t) (h_t, or the projection's input).
struct LstmFwd {
  enum In { kAi, kAf, kAg, kAo, kCPrev, kIns };
  enum Out { kI, kF, kG, kO, kCSaved, kCNext, kR, kOuts };
  // (always_inline: called per lane inside the vectorised loops.)
  template <typename T>
  static inline __attribute__((always_inline)) void element(const T* const* in, T* const* out,
                                                            int64_t j) {
    const auto st = kernels::lstm_forward<T>(in[kAi][j], in[kAf][j], in[kAg][j], in[kAo][j],
                                             in[kCPrev][j]);
    out[kI][j] = st.i;
    out[kF][j] = st.f;
    out[kG][j] = st.g;
    out[kO][j] = st.o;
    out[kCSaved][j] = st.c;
    out[kCNext][j] = st.c;
    out[kR][j] = st.r;
  }
};
// Inference: c_t and r_t only (the activated gates and the saved c_t are
// not needed), the same arithmetic.
struct LstmInfer {
  enum In { kAi, kAf, kAg, kAo, kCPrev, kIns };
  enum Out { kCNext, kR, kOuts };
  template <typename T>
  static inline __attribute__((always_inline)) void element(const T* const* in, T* const* out,
                                                            int64_t j) {
    const auto st = kernels::lstm_forward<T>(in[kAi][j], in[kAf][j], in[kAg][j], in[kAo][j],
                                             in[kCPrev][j]);
    out[kCNext][j] = st.c;
    out[kR][j] = st.r;
  }
};
template <typename T>
inline void lstm_infer_row(int64_t H, int64_t u0, int64_t u1, const T* gt, T* c, T* r) {
  using S = LstmInfer;
  const Runs<T, S::kIns, S::kOuts> io{
      {gt + u0, gt + H + u0, gt + 2 * H + u0, gt + 3 * H + u0, c + u0}, {c + u0, r + u0}};
  for_units_padded(u1 - u0, io, [](const T* const* in, T* const* out, int64_t j) {
    S::element<T>(in, out, j);
  });
}

// With zoneout: c_t = zone(z, c_{t-1}, c~_t) saved and carried, r_t from the
// candidate c~_t (Krueger et al.), the activated gates as lstm_forward_row.
template <typename T>
inline void lstm_zone_row(int64_t H, int64_t u0, int64_t u1, T* gt, T* c, T* e, T* r,
                          const T* zc) {
  const Runs<T, 6, 7> io{
      {gt + u0, gt + H + u0, gt + 2 * H + u0, gt + 3 * H + u0, c + u0, zc + u0},
      {gt + u0, gt + H + u0, gt + 2 * H + u0, gt + 3 * H + u0, e + u0, c + u0, r + u0}};
  for_units(u1 - u0, io, [](const T* const* in, T* const* out, int64_t j) {
    const auto st = kernels::lstm_forward<T>(in[0][j], in[1][j], in[2][j], in[3][j], in[4][j]);
    const T cz = kernels::zone<T>(in[5][j], in[4][j], st.c);
    out[0][j] = st.i;
    out[1][j] = st.f;
    out[2][j] = st.g;
    out[3][j] = st.o;
    out[4][j] = cz;
    out[5][j] = cz;
    out[6][j] = st.r;
  });
}

// y[j0, j1) = m * x (recurrent dropout's operand h_{t-1} * m).
template <typename T>
inline void mask_row(int64_t j0, int64_t j1, const T* m, const T* x, T* y) {
  const Runs<T, 2, 1> io{{m + j0, x + j0}, {y + j0}};
  for_units(j1 - j0, io, [](const T* const* in, T* const* out, int64_t j) {
    out[0][j] = in[0][j] * in[1][j];
  });
}

// dh[j0, j1) = (keep ? dh : 0) + m * d: the product's gradient w.r.t.
// h_{t-1} * m joins dh_{t-1}.
template <typename T>
inline void mask_add_row(int64_t j0, int64_t j1, const T* m, const T* d, T* dh, bool keep) {
  const Runs<T, 3, 1> io{{m + j0, d + j0, dh + j0}, {dh + j0}};
  if (keep) {
    for_units(j1 - j0, io, [](const T* const* in, T* const* out, int64_t j) {
      out[0][j] = in[2][j] + in[0][j] * in[1][j];
    });
  } else {
    for_units(j1 - j0, io, [](const T* const* in, T* const* out, int64_t j) {
      out[0][j] = in[0][j] * in[1][j];
    });
  }
}

// h_t = zone(z, h_{t-1}, h~_t) over units [j0, j1) of one row, in place.
template <typename T>
inline void zone_row(int64_t j0, int64_t j1, const T* z, const T* hp, T* hn) {
  const Runs<T, 3, 1> io{{z + j0, hp + j0, hn + j0}, {hn + j0}};
  for_units(j1 - j0, io, [](const T* const* in, T* const* out, int64_t j) {
    out[0][j] = kernels::zone<T>(in[0][j], in[1][j], in[2][j]);
  });
}

template <typename T>
inline void lstm_forward_row(int64_t H, int64_t u0, int64_t u1, T* gt, T* c, T* e, T* r) {
  using S = LstmFwd;
  const Runs<T, S::kIns, S::kOuts> io{
      {gt + u0, gt + H + u0, gt + 2 * H + u0, gt + 3 * H + u0, c + u0},
      {gt + u0, gt + H + u0, gt + 2 * H + u0, gt + 3 * H + u0, e + u0, c + u0, r + u0}};
  for_units_padded(u1 - u0, io, [](const T* const* in, T* const* out, int64_t j) {
    S::element<T>(in, out, j);
  });
}

#if defined(FASTCELLS_AVX512_MASKS)
// Rows of H <= 8 units share vectors: rows b .. b + k - 1 (k = 16 / H) fill
// lanes [j H, (j + 1) H) of one 16-lane vector per stream, so that hidden 6
// runs 12 of 16 lanes instead of 6 (one row per vector leaves the rest as
// padding). Each lane computes the same operations as row by row, so results
// do not change. Stream s of row b starts at in[s] + b * in_ld[s] (out alike).
constexpr int64_t kPackedRowsMaxH = 8;
template <int NI, int NO, typename F>
inline void for_rows_packed(int64_t rows, int64_t H, const float* const (&in)[NI],
                            const int64_t (&in_ld)[NI], float* const (&out)[NO],
                            const int64_t (&out_ld)[NO], const F& f) {
  constexpr int L = 16;
  const int64_t k = L / H;
  const uint32_t row_bits = (1u << H) - 1u;
  alignas(64) float lin[NI][L];
  alignas(64) float lout[NO][L];
  const float* pin[NI];
  float* pout[NO];
  for (int s = 0; s < NI; ++s) pin[s] = lin[s];
  for (int s = 0; s < NO; ++s) pout[s] = lout[s];
  for (int64_t b = 0; b < rows; b += k) {
    const int64_t kk = std::min(k, rows - b);
    for (int s = 0; s < NI; ++s) {
      __m512 v = _mm512_setzero_ps();
      for (int64_t j = 0; j < kk; ++j)  // (row j's lanes start j * H before its address)
        v = _mm512_mask_loadu_ps(v, static_cast<__mmask16>(row_bits << (j * H)),
                                 in[s] + (b + j) * in_ld[s] - j * H);
      _mm512_store_ps(lin[s], v);
    }
#pragma omp simd simdlen(L)
    for (int64_t l = 0; l < L; ++l) f(pin, pout, l);
    for (int s = 0; s < NO; ++s) {
      const __m512 v = _mm512_load_ps(lout[s]);
      for (int64_t j = 0; j < kk; ++j)
        _mm512_mask_storeu_ps(out[s] + (b + j) * out_ld[s] - j * H,
                              static_cast<__mmask16>(row_bits << (j * H)), v);
    }
  }
}

// lstm_forward_row over rows [0, rows) of all H units, H <= kPackedRowsMaxH:
// gt, c, e, r point at row 0 and step by ld_g, H, H and ld_r.
inline void lstm_forward_rows(int64_t rows, int64_t H, float* gt, int64_t ld_g, float* c,
                              float* e, float* r, int64_t ld_r) {
  using S = LstmFwd;
  const float* const in[S::kIns] = {gt, gt + H, gt + 2 * H, gt + 3 * H, c};
  const int64_t in_ld[S::kIns] = {ld_g, ld_g, ld_g, ld_g, H};
  float* const out[S::kOuts] = {gt, gt + H, gt + 2 * H, gt + 3 * H, e, c, r};
  const int64_t out_ld[S::kOuts] = {ld_g, ld_g, ld_g, ld_g, H, H, ld_r};
  for_rows_packed(rows, H, in, in_ld, out, out_ld,
                  [](const float* const* i, float* const* o, int64_t j)
                      __attribute__((always_inline)) { S::element<float>(i, o, j); });
}
#endif

// GRU forward. gt: x-side r, z, n in (b_hr, b_hz folded), activated r, z, n
// out; rc: recurrent products; b_hn; hp: h_{t-1}; e: hh_n = h W_hn^T + b_hn
// saved for backward; hn: h_t.
struct GruFwd {
  enum In { kXr, kXz, kXn, kHr, kHz, kHn, kBhn, kHPrev, kIns };
  enum Out { kR, kZ, kN, kHhn, kHNext, kOuts };
};
template <typename T>
inline void gru_forward_row(int64_t H, int64_t u0, int64_t u1, T* gt, const T* rc, const T* b_hn,
                            const T* hp, T* e, T* hn) {
  using S = GruFwd;
  const Runs<T, S::kIns, S::kOuts> io{
      {gt + u0, gt + H + u0, gt + 2 * H + u0, rc + u0, rc + H + u0, rc + 2 * H + u0, b_hn + u0,
       hp + u0},
      {gt + u0, gt + H + u0, gt + 2 * H + u0, e + u0, hn + u0}};
  for_units_padded(u1 - u0, io, [](const T* const* in, T* const* out, int64_t j) {
    const T hh_n = in[S::kHn][j] + in[S::kBhn][j];
    const auto st = kernels::gru_forward<T>(in[S::kXr][j], in[S::kXz][j], in[S::kXn][j],
                                            in[S::kHr][j], in[S::kHz][j], hh_n, in[S::kHPrev][j]);
    out[S::kR][j] = st.r;
    out[S::kZ][j] = st.z;
    out[S::kN][j] = st.n;
    out[S::kHhn][j] = hh_n;
    out[S::kHNext][j] = st.h;
  });
}

// Reset-before GRU forward, first half. gt: the complete a_r, a_z in, r and z
// out (activated in place); hp: h_{t-1}; rh: r * h_{t-1}, the operand of the
// second product (which adds (r * h_{t-1}) W_hn^T to gt's n slot).
struct GruRbRz {
  enum In { kAr, kAz, kHPrev, kIns };
  enum Out { kR, kZ, kRh, kOuts };
};
template <typename T>
inline void gru_rb_rz_row(int64_t H, int64_t u0, int64_t u1, T* gt, const T* hp, T* rh) {
  using S = GruRbRz;
  const Runs<T, S::kIns, S::kOuts> io{{gt + u0, gt + H + u0, hp + u0},
                                      {gt + u0, gt + H + u0, rh + u0}};
  for_units_padded(u1 - u0, io, [](const T* const* in, T* const* out, int64_t j) {
    const T r = kernels::sigmoid(in[S::kAr][j]);
    out[S::kZ][j] = kernels::sigmoid(in[S::kAz][j]);
    out[S::kR][j] = r;
    out[S::kRh][j] = r * in[S::kHPrev][j];
  });
}

// Second half. gt: the complete a_n in, n out; z (activated); h_t into hn.
struct GruRbN {
  enum In { kAn, kZ, kHPrev, kIns };
  enum Out { kN, kHNext, kOuts };
};
template <typename T>
inline void gru_rb_n_row(int64_t H, int64_t u0, int64_t u1, T* gt, const T* hp, T* hn) {
  using S = GruRbN;
  const Runs<T, S::kIns, S::kOuts> io{{gt + 2 * H + u0, gt + H + u0, hp + u0},
                                      {gt + 2 * H + u0, hn + u0}};
  for_units_padded(u1 - u0, io, [](const T* const* in, T* const* out, int64_t j) {
    const auto st = kernels::gru_rb_forward_h<T>(in[S::kAn][j], in[S::kZ][j], in[S::kHPrev][j]);
    out[S::kN][j] = st.n;
    out[S::kHNext][j] = st.h;
  });
}

// RNN forward: h_t = act(x-side + recurrent), into gt (saved) and hn.
template <typename T>
inline void rnn_forward_row(int mode, int64_t u0, int64_t u1, T* gt, T* hn) {
  const Runs<T, 1, 2> io{{gt + u0}, {gt + u0, hn + u0}};
  for_units_padded(u1 - u0, io, [mode](const T* const* in, T* const* out, int64_t j) {
    const T hv = kernels::rnn_forward<T>(mode, in[0][j]);
    out[0][j] = hv;
    out[1][j] = hv;
  });
}

// LSTM backward. g: activated i, f, g, o; cc, cp: c_t, c_{t-1}; dr: dL/dr_t;
// dc: dL/dc_t from step t+1 in, dL/dc_{t-1} out; dgx: the 4 pre-activation
// gradients.
struct LstmBwd {
  enum In { kI, kF, kG, kO, kC, kCPrev, kDr, kDc, kIns };
  enum Out { kDi, kDf, kDg, kDo, kDcPrev, kOuts };
};
template <typename T>
inline void lstm_backward_row(int64_t H, int64_t u0, int64_t u1, const T* g, const T* cc,
                              const T* cp, const T* dr, T* dc, T* dgx) {
  using S = LstmBwd;
  const Runs<T, S::kIns, S::kOuts> io{
      {g + u0, g + H + u0, g + 2 * H + u0, g + 3 * H + u0, cc + u0, cp + u0, dr + u0, dc + u0},
      {dgx + u0, dgx + H + u0, dgx + 2 * H + u0, dgx + 3 * H + u0, dc + u0}};
  for_units(u1 - u0, io, [](const T* const* in, T* const* out, int64_t j) {
    const auto d = kernels::lstm_backward<T>(in[S::kI][j], in[S::kF][j], in[S::kG][j],
                                             in[S::kO][j], in[S::kC][j], in[S::kCPrev][j],
                                             in[S::kDr][j], in[S::kDc][j]);
    out[S::kDi][j] = d.di;
    out[S::kDf][j] = d.df;
    out[S::kDg][j] = d.dg;
    out[S::kDo][j] = d.do_;
    out[S::kDcPrev][j] = d.dc_prev;
  });
}

// LSTM backward with zoneout: D = dL/dc_t (zoned) splits into z D for c_{t-1}
// and (1 - z) D for the candidate c~_t, recomputed from the saved gates;
// r_all (projection): r_t = o tanh(c~_t).
template <typename T>
inline void lstm_zone_backward_row(int64_t H, const T* g, const T* cp, const T* dr, T* dc,
                                   T* dgx, const T* zc, T* r_all) {
  const Runs<T, 8, 5> io{{g, g + H, g + 2 * H, g + 3 * H, cp, dr, dc, zc},
                         {dgx, dgx + H, dgx + 2 * H, dgx + 3 * H, dc}};
  for_units(H, io, [](const T* const* in, T* const* out, int64_t j) {
    const T i = in[0][j], f = in[1][j], gg = in[2][j], o = in[3][j], c_prev = in[4][j];
    const T z = in[7][j], D = in[6][j];
    const T cand = kernels::lstm_candidate<T>(i, f, gg, c_prev);
    const auto d = kernels::lstm_backward<T>(i, f, gg, o, cand, c_prev, in[5][j], (T(1) - z) * D);
    out[0][j] = d.di;
    out[1][j] = d.df;
    out[2][j] = d.dg;
    out[3][j] = d.do_;
    out[4][j] = d.dc_prev + z * D;
  });
  if (r_all == nullptr) return;
  for (int64_t j = 0; j < H; ++j)
    r_all[j] = g[3 * H + j] *
               kernels::fc_tanh(kernels::lstm_candidate<T>(g[j], g[H + j], g[2 * H + j], cp[j]));
}

// r_t = o * tanh(c_t) of a projected LSTM, for the gradient of W_hr.
template <typename T>
inline void lstm_r_row(int64_t u0, int64_t u1, const T* o, const T* cc, T* r) {
  const Runs<T, 2, 1> io{{o + u0, cc + u0}, {r + u0}};
  for_units(u1 - u0, io, [](const T* const* in, T* const* out, int64_t j) {
    out[0][j] = in[0][j] * kernels::fc_tanh(in[1][j]);
  });
}

// GRU backward. g: activated r, z, n; e: hh_n; hp: h_{t-1}; dh: dL/dh_t;
// dgx, dgh: input-side and recurrent-side gate gradients; dh_direct:
// z * dL/dh_t (the part of dL/dh_{t-1} that bypasses W_hh).
struct GruBwd {
  enum In { kR, kZ, kN, kHhn, kHPrev, kDh, kIns };
  enum Out { kDxr, kDxz, kDxn, kDhr, kDhz, kDhhn, kDhDirect, kOuts };
};
template <typename T>
inline void gru_backward_row(int64_t H, int64_t u0, int64_t u1, const T* g, const T* e,
                             const T* hp, const T* dh, T* dgx, T* dgh, T* dh_direct) {
  using S = GruBwd;
  const Runs<T, S::kIns, S::kOuts> io{
      {g + u0, g + H + u0, g + 2 * H + u0, e + u0, hp + u0, dh + u0},
      {dgx + u0, dgx + H + u0, dgx + 2 * H + u0, dgh + u0, dgh + H + u0, dgh + 2 * H + u0,
       dh_direct + u0}};
  for_units(u1 - u0, io, [](const T* const* in, T* const* out, int64_t j) {
    const auto d = kernels::gru_backward<T>(in[S::kR][j], in[S::kZ][j], in[S::kN][j],
                                            in[S::kHhn][j], in[S::kHPrev][j], in[S::kDh][j]);
    out[S::kDxr][j] = d.dx_r;
    out[S::kDxz][j] = d.dx_z;
    out[S::kDxn][j] = d.dx_n;
    out[S::kDhr][j] = d.dx_r;
    out[S::kDhz][j] = d.dx_z;
    out[S::kDhhn][j] = d.dhh_n;
    out[S::kDhDirect][j] = d.dh_prev_direct;
  });
}

// Reset-before GRU backward, first half. g: activated r, z, n; hp: h_{t-1};
// dh: dL/dh_t; dgx: da_z and da_n out (da_r follows once d(r * h) is known).
struct GruRbBwdNz {
  enum In { kZ, kN, kHPrev, kDh, kIns };
  enum Out { kDaz, kDan, kOuts };
};
template <typename T>
inline void gru_rb_backward_nz_row(int64_t H, int64_t u0, int64_t u1, const T* g, const T* hp,
                                   const T* dh, T* dgx) {
  using S = GruRbBwdNz;
  const Runs<T, S::kIns, S::kOuts> io{{g + H + u0, g + 2 * H + u0, hp + u0, dh + u0},
                                      {dgx + H + u0, dgx + 2 * H + u0}};
  for_units(u1 - u0, io, [](const T* const* in, T* const* out, int64_t j) {
    const auto d = kernels::gru_rb_backward_nz<T>(in[S::kZ][j], in[S::kN][j], in[S::kHPrev][j],
                                                  in[S::kDh][j]);
    out[S::kDaz][j] = d.da_z;
    out[S::kDan][j] = d.da_n;
  });
}

// Second half. d_rh: dL/d(r * h_{t-1}) = da_n W_hn; out: da_r into dgx, the
// part of dL/dh_{t-1} outside W_h[r,z] into dh_prev, and r * h_{t-1} into rh
// (the operand of W_hn's gradient).
struct GruRbBwdR {
  enum In { kR, kZ, kHPrev, kDh, kDrh, kIns };
  enum Out { kDar, kDhPrev, kRh, kOuts };
};
template <typename T>
inline void gru_rb_backward_r_row(int64_t H, int64_t u0, int64_t u1, const T* g, const T* hp,
                                  const T* dh, const T* d_rh, T* dgx, T* dh_prev, T* rh) {
  using S = GruRbBwdR;
  const Runs<T, S::kIns, S::kOuts> io{{g + u0, g + H + u0, hp + u0, dh + u0, d_rh + u0},
                                      {dgx + u0, dh_prev + u0, rh + u0}};
  for_units(u1 - u0, io, [](const T* const* in, T* const* out, int64_t j) {
    const T r = in[S::kR][j], hprev = in[S::kHPrev][j], drh = in[S::kDrh][j];
    out[S::kDar][j] = kernels::gru_rb_backward_r<T>(r, hprev, drh);
    out[S::kDhPrev][j] = kernels::gru_rb_dh_direct<T>(r, in[S::kZ][j], in[S::kDh][j], drh);
    out[S::kRh][j] = r * hprev;
  });
}

// The same with recurrent dropout: hm = h_{t-1} * m is the operand of both
// products, so da_r and r * hm take hm, and d(r * hm) reaches h_{t-1}
// through m.
template <typename T>
inline void gru_rb_backward_r_masked_row(int64_t H, const T* g, const T* hm, const T* m,
                                         const T* dh, const T* d_rh, T* dgx, T* dh_prev,
                                         T* rh) {
  const Runs<T, 6, 3> io{{g, g + H, hm, m, dh, d_rh}, {dgx, dh_prev, rh}};
  for_units(H, io, [](const T* const* in, T* const* out, int64_t j) {
    const T r = in[0][j], h = in[2][j], drh = in[5][j];
    out[0][j] = kernels::gru_rb_backward_r<T>(r, h, drh);
    out[1][j] = kernels::gru_rb_dh_direct<T>(r, in[1][j], in[4][j], in[3][j] * drh);
    out[2][j] = r * h;
  });
}

// RNN backward: the pre-activation gradient from the output h (saved in g).
template <typename T>
inline void rnn_backward_row(int mode, int64_t u0, int64_t u1, const T* g, const T* dh, T* dgx) {
  const Runs<T, 2, 1> io{{g + u0, dh + u0}, {dgx + u0}};
  for_units(u1 - u0, io, [mode](const T* const* in, T* const* out, int64_t j) {
    out[0][j] = kernels::rnn_backward<T>(mode, in[0][j], in[1][j]);
  });
}

// dst[u0, u1) = src[u0, u1): one row's short run of units, inline (a call
// to memmove per row cost 15% of an LSTM forward at hidden 6, batch 256).
template <typename T>
inline void copy_row(int64_t u0, int64_t u1, const T* src, T* dst) {
  const Runs<T, 1, 1> io{{src + u0}, {dst + u0}};
  for_units(u1 - u0, io,
            [](const T* const* in, T* const* out, int64_t j) { out[0][j] = in[0][j]; });
}

// acc[u0, u1) += d[u0, u1) (the per-row running sums of the bias gradients).
template <typename T>
inline void accumulate_row(int64_t u0, int64_t u1, T* acc, const T* d) {
  const Runs<T, 2, 1> io{{acc + u0, d + u0}, {acc + u0}};
  for_units(u1 - u0, io, [](const T* const* in, T* const* out, int64_t j) {
    out[0][j] = in[0][j] + in[1][j];
  });
}

// ---------------------------------------------------------------- LayerNorm cells
// Whole rows only: the statistics of a row need all of its units, so these
// cells split rows among threads, never units (recurrent_forward).

// a (n = G*H): the row's raw recurrent product h_{t-1} W_hh^T in, copied to
// `keep` (null: not needed), LN(a; g) out in place.
template <typename T>
inline void ln_rec_row(int64_t n, T* a, const T* g, T* keep) {
  const auto s = kernels::row_stats(a, n);
  if (keep != nullptr) std::copy(a, a + n, keep);
  for (int64_t j = 0; j < n; ++j) a[j] = kernels::normalized(a[j], s) * g[j];
}

// LSTM_LN: r = o * tanh(LN(c_t; w, b)) over the row's H units, o activated.
template <typename T>
inline void ln_lstm_out_row(int64_t H, const T* o, const T* c, const T* w, const T* b, T* r) {
  const auto s = kernels::row_stats(c, H);
  for (int64_t j = 0; j < H; ++j)
    r[j] = kernels::ln_lstm_out(o[j], kernels::normalized(c[j], s) * w[j] + b[j]);
}

// LSTM_LN backward of one row. g: activated i, f, g, o; cc, cp: c_t, c_{t-1};
// dr: dL/dr_t; dc: dL/dc_t from step t+1 in, dL/dc_{t-1} out; dgx: the four
// pre-activation gradients; dy: dL/dy, y = LN(c_t; w, b).
template <typename T>
inline void ln_lstm_backward_row(int64_t H, const T* g, const T* cc, const T* cp, const T* dr,
                                 const T* w, const T* b, T* dc, T* dgx, T* dy) {
  const auto s = kernels::row_stats(cc, H);
  for (int64_t j = 0; j < H; ++j) {
    const T y = kernels::normalized(cc[j], s) * w[j] + b[j];
    const auto d = kernels::ln_lstm_out_backward(g[3 * H + j], y, dr[j]);
    dy[j] = d.dy;
    dgx[3 * H + j] = d.do_;
  }
  kernels::ln_backward_row(cc, H, s, [&](int64_t j) { return dy[j] * w[j]; }, dc, true);
  for (int64_t j = 0; j < H; ++j) {
    const auto d = kernels::lstm_cell_backward(g[j], g[H + j], g[2 * H + j], cp[j], dc[j]);
    dgx[j] = d.di;
    dgx[H + j] = d.df;
    dgx[2 * H + j] = d.dg;
    dc[j] = d.dc_prev;
  }
}

// da (n = G*H) = the gradient w.r.t. a row's raw recurrent product a, from
// dz, the gradient w.r.t. LN(a; g).
template <typename T>
inline void ln_rec_backward_row(int64_t n, const T* dz, const T* g, const T* a, T* da) {
  const auto s = kernels::row_stats(a, n);
  kernels::ln_backward_row(a, n, s, [&](int64_t j) { return dz[j] * g[j]; }, da, false);
}

}  // namespace

// With Pairs (the bfloat16 table of a path with FASTCELLS_BF16) the
// products run on bfloat16 operands: W_hh and W_hr (bfloat16 values held in
// float) packed as pairs, h_{t-1} and r_t rounded to bfloat16 as each product
// reads them. Gates, states and everything saved stay float32.
// The forward's state carried from step to step (the LSTM's c), its per-step
// scratch, and the gate step over rows [b0, b1) and units [u0, u1).
template <typename T>
struct ForwardRows {
  const kernels::LayerForwardParams<T>& p;
  const int64_t H, P, B, G, GH;
  const bool lstm, gru, rb, ln, proj;
  LineVector<T> c;
  // LSTM, RNN and the reset-before GRU accumulate the recurrent products onto
  // the x side in p.gates; GRU and the LayerNorm cells need the product apart
  // (r multiplies the GRU's n part; LN normalises it first). r: a
  // projection's r_t, or the reset-before GRU's r * h_{t-1}.
  LineVector<T> rec, r;
  LineVector<T> hm;  // recurrent dropout: h_{t-1} * m, the recurrent product's operand
  const std::vector<T> no_bias;
  const T* b_hn;

  // Row b of step row0's gates and extra (one step's buffer when the input
  // product runs per step, p.x; extra null when the cell saves none).
  T* step_gates(int64_t row0, int64_t b) const { return p.gates + ((p.x ? 0 : row0) + b) * GH; }
  T* step_extra(int64_t row0, int64_t b) const {
    return p.extra ? p.extra + ((p.x ? 0 : row0) + b) * H : nullptr;
  }

  explicit ForwardRows(const kernels::LayerForwardParams<T>& params)
      : p(params), H(p.H), P(p.P), B(p.B), G(kernels::num_gates(p.mode)), GH(G * H),
        lstm(kernels::base_cell(p.mode) == kLSTM), gru(kernels::base_cell(p.mode) == kGRU),
        rb(p.mode == kGRU_RESET_BEFORE), ln(kernels::layer_norm(p.mode)),
        proj(p.w_hr != nullptr),
        c(lstm ? p.c0 : nullptr, lstm ? p.c0 + B * H : nullptr),
        rec(gru || ln ? static_cast<size_t>(B * GH) : 0),
        r(proj || rb ? static_cast<size_t>(B * H) : 0),
        hm(p.rmask ? static_cast<size_t>(B * P) : 0),
        no_bias(gru && !p.b_hn ? static_cast<size_t>(H) : 0, T(0)),
        b_hn(p.b_hn ? p.b_hn : no_bias.data()) {}

  // The gates of step row0's rows [b0, b1), units [u0, u1), after the
  // recurrent product: h_t into hn (or r_t of a projection), c_t, and what
  // backward reads (p.save).
  void gates(int64_t row0, int64_t b0, int64_t b1, int64_t u0, int64_t u1, bool sync,
             const T* h_cur, T* h_next) {
    // Hidden sizes up to 8: several rows per vector (results unchanged).
    bool packed_rows = false;
#if defined(FASTCELLS_AVX512_MASKS)
    if constexpr (std::is_same<T, float>::value) {
      packed_rows = lstm && !ln && !sync && H <= kPackedRowsMaxH && p.zone == nullptr;
      if (packed_rows)
        lstm_forward_rows(b1 - b0, H, step_gates(row0, b0), GH, c.data() + b0 * H,
                          step_extra(row0, b0),
                          proj ? r.data() + b0 * H : h_next + b0 * P, proj ? H : P);
    }
#endif
    for (int64_t b = packed_rows ? b1 : b0; b < b1; ++b) {
      T* gt = step_gates(row0, b);
      T* e = step_extra(row0, b);
      const T* hp = h_cur + b * P;
      T* hn = h_next + b * P;
      if (ln) {  // (whole rows: u0 = 0, u1 = H)
        T* a = rec.data() + b * GH;
        ln_rec_row(GH, a, p.ln_hh, p.save ? p.ln_rec + (row0 + b) * GH : nullptr);
        if (lstm) {  // the LSTM's step, then h_t again from LN(c_t) in place of c_t
          accumulate_row(0, GH, gt, a);
          lstm_forward_row(H, 0, H, gt, c.data() + b * H, e, hn);
          ln_lstm_out_row(H, gt + 3 * H, c.data() + b * H, p.ln_c_w, p.ln_c_b, hn);
          continue;
        }
      }
      if (lstm) {
        T* out_r = proj ? r.data() + b * H : hn;
        if (p.zone)
          lstm_zone_row(H, u0, u1, gt, c.data() + b * H, e, out_r,
                        p.zone + (row0 + b) * p.ld_zone + P);
        else if (p.save)
          lstm_forward_row(H, u0, u1, gt, c.data() + b * H, e, out_r);
        else
          lstm_infer_row(H, u0, u1, gt, c.data() + b * H, out_r);
      } else if (gru) {
        gru_forward_row(H, u0, u1, gt, rec.data() + b * GH, b_hn, hp, e, hn);
      } else if (rb) {
        gru_rb_n_row(H, u0, u1, gt, hp, hn);
      } else {
        rnn_forward_row(p.mode, u0, u1, gt, hn);
      }
    }
  }
};

// The packed weights of one forward call: W_hh^T (P, G*H) in segments of
// `seg` (one per gate when the units are split among threads or the gates'
// products run apart), W_hr^T (H, P) with a projection, and W_ih^T (I, G*H)
// when the input product runs per step (p.x). They live in `keep` when it is
// empty or already holds them in this layout; a `keep` filled in another
// layout (another team split) is left as it is, since other calls may be
// reading it (csrc/weight_cache.h), and the call packs its own.
template <typename T>
class ForwardWeights {
 public:
  ForwardWeights(const kernels::LayerForwardParams<T>& p, ForwardPack<T>* keep, int64_t seg,
                 bool pairs)
      : p_(p), GH_(kernels::num_gates(p.mode) * p.H), seg_(seg), pairs_(pairs),
        proj_(p.w_hr != nullptr), step_x_(p.x != nullptr),
        store_(keep && (!keep->w_hh_t.ready || holds(*keep)) ? *keep : local_),
        w_hh_t(store_.w_hh_t), w_hr_t(store_.w_hr_t), w_ih_t(store_.w_ih_t),
        fill(!holds(store_)) {
    if (!fill) return;
    w_hh_t.init(p.P, GH_, seg, pairs);
    if (proj_) w_hr_t.init(p.H, p.P, p.P, pairs);
    if (step_x_) w_ih_t.init(p.I, GH_, seg, pairs);
  }
  ForwardWeights(const ForwardWeights&) = delete;
  ForwardWeights& operator=(const ForwardWeights&) = delete;

  // Thread tid's share of the packing, when the call fills the packs; the
  // team meets at a barrier before any product reads them.
  void pack(int tid, int team, StepBarrier& barrier) {
    if (!fill) return;
    pack_share(w_hh_t, p_.w_hh, p_.P, true, tid, team);
    if (proj_) pack_share(w_hr_t, p_.w_hr, p_.H, true, tid, team);
    if (step_x_) pack_share(w_ih_t, p_.w_ih, p_.I, true, tid, team);
    team_barrier(team, barrier);
  }

  // After the team: a pack this call filled may serve later calls (a pack it
  // did not fill may be shared: no write at all).
  void finish() {
    if (!fill) return;
    w_hh_t.set_ready();
    if (proj_) w_hr_t.set_ready();
    if (step_x_) w_ih_t.set_ready();
  }

 private:
  bool holds(ForwardPack<T>& f) const {
    return PackedB<T>(f.w_hh_t).holds(p_.P, GH_, seg_, pairs_) &&
           (!proj_ || PackedB<T>(f.w_hr_t).holds(p_.H, p_.P, p_.P, pairs_)) &&
           (!step_x_ || PackedB<T>(f.w_ih_t).holds(p_.I, GH_, seg_, pairs_));
  }

  const kernels::LayerForwardParams<T>& p_;
  const int64_t GH_, seg_;
  const bool pairs_, proj_, step_x_;
  ForwardPack<T> local_;
  ForwardPack<T>& store_;

 public:
  PackedB<T> w_hh_t, w_hr_t, w_ih_t;
  const bool fill;
};

namespace {

// One step of a forward time loop for a thread's Part: the input product
// (p.x), the recurrent product, the gates, the projection and the outputs.
// h_cur is h_{t-1}, h_next receives h_t.
template <typename T>
struct ForwardStep {
  ForwardRows<T>& st;
  ForwardWeights<T>& w;
  const Part& pt;
  StepBarrier& barrier;

  __attribute__((always_inline)) void run(int t, const T* h_cur, T* h_next) const {
    const auto& p = st.p;
    const int64_t P = st.P;
    const int64_t M = p.batch_sizes[t], row0 = p.row_offsets[t];
    const int64_t b1 = std::min<int64_t>(M, pt.b1);  // this thread's active rows: [pt.b0, b1)
    // Inactive rows keep their state in the buffer written this step.
    for (int64_t b = std::max<int64_t>(M, pt.b0); b < pt.b1; ++b)
      copy_row(pt.c0, pt.c1, h_cur + b * P, h_next + b * P);
    if (p.x) input_product(M, row0, b1);
    recurrent_products(M, row0, b1, operand(M, b1, h_cur));
    st.gates(row0, pt.b0, b1, pt.u0, pt.u1, pt.sync, h_cur, h_next);
    if (st.proj) {
      part_barrier(pt, barrier);  // every unit of r is written
      w.w_hr_t.mm_cols(b1 - pt.b0, pt.c0, pt.c1, st.r.data() + pt.b0 * st.H, st.H,
                       h_next + pt.b0 * P, P, false);
    }
    outputs(row0, b1, h_cur, h_next);
  }

  // x_t W_ih^T + bias: the columns this thread's product and gates use
  // (W_ih^T in one segment per gate when the units are split, as W_hh^T).
  __attribute__((always_inline)) void input_product(int64_t M, int64_t row0, int64_t b1) const {
    const auto& p = st.p;
    const int64_t GH = st.GH, b0 = pt.b0;
    const T* xt = p.x + row0 * p.ld_x;
    T* const g0 = st.step_gates(row0, 0);
    if (!pt.sync) {
      w.w_ih_t.mm(b1 - b0, 0, w.w_ih_t.panels(), xt + b0 * p.ld_x, p.ld_x, 1, g0 + b0 * GH, GH,
                  false, p.x_bias);
      return;
    }
    if (pt.u1 <= pt.u0) return;
    for (int64_t g = 0; g < st.G; ++g) {
      const int64_t first = w.w_ih_t.panel_at(g * st.H + pt.u0);
      const int64_t last = w.w_ih_t.panel_at(g * st.H + pt.u1 - 1);
      w.w_ih_t.mm(M, first, last + 1, xt, p.ld_x, 1, g0, GH, false, p.x_bias);
    }
  }

  // The recurrent product's operand: h_{t-1}, or h_{t-1} * m with recurrent
  // dropout (this thread's rows, or its columns of every row, which every
  // thread's product then reads).
  __attribute__((always_inline)) const T* operand(int64_t M, int64_t b1, const T* h_cur) const {
    const auto& p = st.p;
    if (!p.rmask) return h_cur;
    const int64_t P = st.P, r0 = pt.sync ? 0 : pt.b0, r1 = pt.sync ? M : b1;
    for (int64_t b = r0; b < r1; ++b)
      mask_row(pt.sync ? pt.c0 : 0, pt.sync ? pt.c1 : P, p.rmask + b * P, h_cur + b * P,
               st.hm.data() + b * P);
    part_barrier(pt, barrier);
    return st.hm.data();
  }

  // Recurrent product of gates [g0, g1) for this thread's rows, or its units
  // of those gates; x (ld ldx) is h_{t-1} or r * h_{t-1}. GRU and the
  // LayerNorm cells take it apart (st.rec), the others onto the gates.
  __attribute__((always_inline)) void product(int64_t M, int64_t row0, int64_t b1, int64_t g0, int64_t g1, const T* x,
               int64_t ldx) const {
    const bool apart = st.gru || st.ln;
    const int64_t H = st.H, GH = st.GH, b0 = pt.b0;
    T* const prod = apart ? st.rec.data() : st.step_gates(row0, 0);
    if (!pt.sync) {
      w.w_hh_t.mm_cols(b1 - b0, g0 * H, g1 * H, x + b0 * ldx, ldx, prod + b0 * GH, GH, !apart);
      return;
    }
    for (int64_t g = g0; g < g1; ++g)
      w.w_hh_t.mm_cols(M, g * H + pt.u0, g * H + pt.u1, x, ldx, prod, GH, !apart);
  }

  // All gates at once, or for the reset-before GRU r and z first, then n
  // from (r * h_{t-1}) W_hn^T.
  __attribute__((always_inline)) void recurrent_products(int64_t M, int64_t row0, int64_t b1, const T* hx) const {
    if (!st.rb) {
      product(M, row0, b1, 0, st.G, hx, st.P);
      return;
    }
    product(M, row0, b1, 0, 2, hx, st.P);
    T* const g0 = st.step_gates(row0, 0);
    for (int64_t b = pt.b0; b < b1; ++b)
      gru_rb_rz_row(st.H, pt.u0, pt.u1, g0 + b * st.GH, hx + b * st.P, st.r.data() + b * st.H);
    part_barrier(pt, barrier);  // every unit of r * h_{t-1} is written
    product(M, row0, b1, 2, 3, st.r.data(), st.H);
  }

  // h_t (after zoneout) into the output rows of this step.
  __attribute__((always_inline)) void outputs(int64_t row0, int64_t b1, const T* h_cur, T* h_next) const {
    const auto& p = st.p;
    const int64_t P = st.P;
    const int64_t j0 = st.proj ? pt.c0 : pt.u0, j1 = st.proj ? pt.c1 : pt.u1;
    for (int64_t b = pt.b0; b < b1; ++b) {
      if (p.zone)
        zone_row(j0, j1, p.zone + (row0 + b) * p.ld_zone, h_cur + b * P, h_next + b * P);
      copy_row(j0, j1, h_next + b * P, p.out + (row0 + b) * p.ld_out);
    }
  }
};

}  // namespace

template <typename T, bool Pairs = false>
void recurrent_forward(const kernels::LayerForwardParams<T>& p, ForwardPack<T>* keep) {
  const int64_t H = p.H, P = p.P, B = p.B;
  const int64_t GH = kernels::num_gates(p.mode) * H;
  ForwardRows<T> st(p);
  // Double-buffered hidden state: step t reads h[cur], writes h[1 - cur].
  LineVector<T> h_a(p.h0, p.h0 + B * P), h_b(h_a);
  // Pairs pack two bfloat16 values in each float slot: half the bytes.
  const int64_t work = int64_t(B) * GH * P;
  const LoopTeam lt = loop_team(B, work, p.T, GH * P, Pairs ? sizeof(T) / 2 : sizeof(T), st.ln);
  const int nt = lt.nt;  // (a lambda must not capture LoopTeam or Part, internal types)
  const bool by_rows = lt.by_rows;
  ForwardWeights<T> w(p, keep, (nt > 1 && !by_rows) || st.rb ? H : GH, Pairs);

  run_team(nt, [&](int tid, int team, StepBarrier& barrier) {
    w.pack(tid, team, barrier);
    const Part pt = part_of(by_rows, B, H, P, tid, team, PackedB<T>::NB);
    const ForwardStep<T> step{st, w, pt, barrier};
    T* h_cur = h_a.data();
    T* h_next = h_b.data();
    for (int s = 0; s < p.T; ++s) {
      step.run(p.reverse ? p.T - 1 - s : s, h_cur, h_next);
      std::swap(h_cur, h_next);
      part_barrier(pt, barrier);  // h_t complete before step t+1 reads it
    }
    if (!pt.sync || tid == 0) {  // final states of this thread's rows (all rows: tid 0)
      std::copy(h_cur + pt.b0 * P, h_cur + pt.b1 * P, p.hy + pt.b0 * P);
      if (st.lstm)
        std::copy(st.c.begin() + pt.b0 * H, st.c.begin() + pt.b1 * H, p.cy + pt.b0 * H);
    }
  }, loop_key(false, work, p.T));
  w.finish();
}

// Pairs: the per-step products dh_{t-1} = dgates W_hh (and dr = dh W_hr) on
// bfloat16 operands from kPairsBackwardWork multiply-adds per step, as in
// recurrent_forward: the weights packed as pairs, the gate gradients rounded
// to bfloat16 as each product reads them.
// The backward's state carried from step to step (dh, dc), its per-step
// scratch and the per-row bias sums, with the elementwise steps over rows
// [b0, b1) of step t (row0: the step's first row).
template <typename T>
struct BackwardRows {
  const kernels::LayerBackwardParams<T>& p;
  const int64_t H, P, B, G, GH;
  const bool lstm, gru, rb, ln, proj;
  // Bias sums (params.h). GRU's recurrent side differs from the input side
  // only in the n slot, so acc_h holds that slot alone.
  const bool sum_x, sum_h;
  // dh: gradient w.r.t. the state entering the step processed next (B, P);
  // dc: the LSTM's (B, H); dtot: dh plus the output's gradient; dr: dL/dr_t
  // of a projection, or the reset-before GRU's dL/d(r * h_{t-1}); dz: with
  // zoneout, the part of dL/dh_t that goes straight to h_{t-1} (z dtot).
  // dprod: with recurrent dropout, the product's d(h_{t-1} * m).
  LineVector<T> dh, dc, dtot, dr, acc_x, acc_h, dz, dprod;

  explicit BackwardRows(const kernels::LayerBackwardParams<T>& params)
      : p(params), H(p.H), P(p.P), B(p.B), G(kernels::num_gates(p.mode)), GH(G * H),
        lstm(kernels::base_cell(p.mode) == kLSTM), gru(kernels::base_cell(p.mode) == kGRU),
        rb(p.mode == kGRU_RESET_BEFORE), ln(kernels::layer_norm(p.mode)),
        proj(p.w_hr != nullptr), sum_x(p.db_x != nullptr),
        sum_h(sum_x && gru && p.db_h != nullptr),
        dh(static_cast<size_t>(B * P), T(0)),
        dc(lstm ? static_cast<size_t>(B * H) : 0, T(0)),
        dtot(static_cast<size_t>(B * P)),
        dr(proj || rb ? static_cast<size_t>(B * H) : 0),
        acc_x(sum_x ? static_cast<size_t>(B * GH) : 0, T(0)),
        acc_h(sum_h ? static_cast<size_t>(B * H) : 0, T(0)),
        dz(p.zone ? static_cast<size_t>(B * P) : 0),
        dprod(p.rmask ? static_cast<size_t>(B * P) : 0) {
    if (p.grad_hy) std::copy(p.grad_hy, p.grad_hy + B * P, dh.begin());
    if (lstm && p.grad_cy) std::copy(p.grad_cy, p.grad_cy + B * H, dc.begin());
  }

  int64_t prev(int t, int64_t b) const {
    return kernels::prev_row(p.batch_sizes, p.row_offsets, p.T, p.B, t, b, p.reverse);
  }

  // 1. h_{t-1} of each row (for dW_hh) and the total gradient w.r.t. h_t.
  void totals(int t, int64_t row0, int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t pr = prev(t, b);
      const T* hp = pr >= 0 ? p.out + pr * p.ld_out : p.h0 + b * P;
      copy_row(0, P, hp, p.h_prev + (row0 + b) * P);
      if (p.rmask) mask_row(0, P, p.rmask + b * P, hp, p.h_prev_m + (row0 + b) * P);
      T* dt = dtot.data() + b * P;
      const T* go = p.grad_out ? p.grad_out + (row0 + b) * p.ld_gout : nullptr;
      for (int64_t j = 0; j < P; ++j) dt[j] = dh[b * P + j] + (go ? go[j] : T(0));
      if (p.zone) {  // h_t = z h_{t-1} + (1 - z) h~_t
        const T* z = p.zone + (row0 + b) * p.ld_zone;
        T* dzb = dz.data() + b * P;
        for (int64_t j = 0; j < P; ++j) {
          dzb[j] = z[j] * dt[j];
          dt[j] = (T(1) - z[j]) * dt[j];
        }
      }
      if (proj) copy_row(0, P, dt, p.dh_all + (row0 + b) * P);
    }
  }

  // 3. Gate gradients from dr (projection) or dtot; the reset-before GRU then
  // takes d(r * h_{t-1}) = da_n W_hn, da_r and the direct part of dh_{t-1}.
  void gate_grads(int t, int64_t row0, int64_t b0, int64_t b1, const PackedB<T>& w_hn) {
    const T* drow_base = proj ? dr.data() : dtot.data();
    const int64_t ld_d = proj ? H : P;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t row = row0 + b;
      const T* g = p.gates + row * GH;
      const T* d_in = drow_base + b * ld_d;
      T* dgx = p.dgates_x + row * GH;
      if (lstm) {
        const int64_t pr = prev(t, b);
        const T* cp = pr >= 0 ? p.extra + pr * H : p.c0 + b * H;
        const T* cc = p.extra + row * H;
        // c_t's own incoming gradient joins the one from step t+1.
        if (p.grad_extra) accumulate_row(0, H, dc.data() + b * H, p.grad_extra + row * H);
        if (ln) {
          ln_lstm_backward_row(H, g, cc, cp, d_in, p.ln_c_w, p.ln_c_b, dc.data() + b * H, dgx,
                               p.dln_c + row * H);
          ln_rec_backward_row(GH, dgx, p.ln_hh, p.ln_rec + row * GH, p.dln_rec + row * GH);
          continue;
        }
        if (p.zone) {
          lstm_zone_backward_row(H, g, cp, d_in, dc.data() + b * H, dgx,
                                 p.zone + row * p.ld_zone + P, proj ? p.r_all + row * H : nullptr);
          continue;
        }
        lstm_backward_row(H, 0, H, g, cc, cp, d_in, dc.data() + b * H, dgx);
        if (proj) lstm_r_row(0, H, g + 3 * H, cc, p.r_all + row * H);
      } else if (gru) {
        gru_backward_row(H, 0, H, g, p.extra + row * H, p.h_prev + row * P, d_in, dgx,
                         p.dgates_h + row * GH, dh.data() + b * P);
        if (ln)
          ln_rec_backward_row(GH, p.dgates_h + row * GH, p.ln_hh, p.ln_rec + row * GH,
                              p.dln_rec + row * GH);
      } else if (rb) {
        gru_rb_backward_nz_row(H, 0, H, g, p.h_prev + row * P, d_in, dgx);
      } else {
        rnn_backward_row(p.mode, 0, H, g, d_in, dgx);
      }
    }
    if (rb) rb_second_product(row0, b0, b1, w_hn);
    // Zoneout: z dtot joins dh_{t-1} (GRU: beside the direct part the gate
    // step wrote; LSTM, RNN: the W_hh product accumulates onto it).
    for (int64_t b = b0; p.zone && b < b1; ++b) {
      if (gru || rb)
        accumulate_row(0, P, dh.data() + b * P, dz.data() + b * P);
      else
        copy_row(0, P, dz.data() + b * P, dh.data() + b * P);
    }
  }

  // The reset-before GRU: d(r * h_{t-1}) = da_n W_hn, then da_r and the
  // direct part of dh_{t-1}.
  void rb_second_product(int64_t row0, int64_t b0, int64_t b1, const PackedB<T>& w_hn) {
    w_hn.mm_cols(b1 - b0, 0, P, p.dgates_x + (row0 + b0) * GH + 2 * H, GH, dr.data() + b0 * H,
                 H, false);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t row = row0 + b;
      if (p.rmask) {
        gru_rb_backward_r_masked_row(H, p.gates + row * GH, p.h_prev_m + row * P,
                                     p.rmask + b * P, dtot.data() + b * P, dr.data() + b * H,
                                     p.dgates_x + row * GH, dh.data() + b * P,
                                     p.r_all + row * H);
        continue;
      }
      gru_rb_backward_r_row(H, 0, H, p.gates + row * GH, p.h_prev + row * P,
                            dtot.data() + b * P, dr.data() + b * H, p.dgates_x + row * GH,
                            dh.data() + b * P, p.r_all + row * H);
    }
  }

  // Each row's running sums of its gate gradients.
  void sum_bias_rows(int64_t row0, int64_t b0, int64_t b1) {
    for (int64_t b = b0; sum_x && b < b1; ++b) {
      const int64_t row = row0 + b;
      const T* dgx = p.dgates_x + row * GH;
      for (int64_t k = 0; k < G; ++k)
        accumulate_row(0, H, acc_x.data() + b * GH + k * H, dgx + k * H);
      if (sum_h) accumulate_row(0, H, acc_h.data() + b * H, p.dgates_h + row * GH + 2 * H);
    }
  }

  // Bias gradients: the per-row sums (n values wide) added in row order.
  void reduce_biases() const {
    const auto reduce = [&](const LineVector<T>& acc, int64_t n, T* db) {
      std::fill(db, db + n, T(0));
      for (int64_t b = 0; b < B; ++b) {
        const T* __restrict__ a = acc.data() + b * n;
#pragma omp simd
        for (int64_t k = 0; k < n; ++k) db[k] += a[k];
      }
    };
    if (sum_x) reduce(acc_x, GH, p.db_x);
    if (sum_h) {  // r, z slots: the same gradients as the input side
      std::copy(p.db_x, p.db_x + 2 * H, p.db_h);
      reduce(acc_h, H, p.db_h + 2 * H);
    }
  }
};

template <typename T, bool Pairs = false>
void recurrent_backward(const kernels::LayerBackwardParams<T>& p) {
  const int64_t H = p.H, P = p.P, B = p.B;
  const int64_t GH = kernels::num_gates(p.mode) * H;
  const bool pairs = Pairs && int64_t(B) * GH * P >= kPairsBackwardWork;
  BackwardRows<T> st(p);
  const bool gru = st.gru, rb = st.rb, proj = st.proj;
  // The per-step product's operand: the gradient w.r.t. h_{t-1} W_hh^T.
  const T* dgh_base = st.ln ? p.dln_rec : gru ? p.dgates_h : p.dgates_x;
  const int64_t work = int64_t(B) * GH * P;
  const LoopTeam lt = loop_team(B, work, p.T, GH * P, sizeof(T), st.ln);
  const int nt = lt.nt;
  const bool by_rows = lt.by_rows;
  // W_hh (G*H, P) for dh_{t-1} = dgates_h W_hh; the reset-before GRU takes
  // its rows apart: W_h[r,z] (2H, P) for that product, W_hn (H, P) for
  // d(r * h_{t-1}) = da_n W_hn. W_hr (P, H) of a projection.
  PackedStore<T> w_hh_store, w_hr_store, w_hn_store;
  PackedB<T> w_hh(w_hh_store), w_hr(w_hr_store), w_hn(w_hn_store);
  w_hh.init(rb ? 2 * H : GH, P, P, pairs);
  if (proj) w_hr.init(P, H, H, pairs);
  if (rb) w_hn.init(H, P, P, pairs);
  constexpr int64_t q = PackedB<T>::NB;

  run_team(nt, [&](int tid, int team, StepBarrier& barrier) {
    pack_share(w_hh, p.w_hh, P, false, tid, team);
    if (proj) pack_share(w_hr, p.w_hr, H, false, tid, team);
    if (rb) pack_share(w_hn, p.w_hh + 2 * H * P, P, false, tid, team);
    team_barrier(team, barrier);
    const Part pt = part_of(by_rows, B, H, P, tid, team, q);
    for (int s = 0; s < p.T; ++s) {
      const int t = p.reverse ? s : p.T - 1 - s;
      const int64_t M = p.batch_sizes[t], row0 = p.row_offsets[t];
      // Steps 1-3 take whole rows: this thread's rows, or with the units
      // split a share of the active rows, so that each thread streams whole
      // rows of saved gates and writes whole rows of gate gradients; only
      // the product (step 4) splits columns. Split units made these steps
      // 4x slower on two threads than on one (LSTM (112, 8, 256); its
      // backward on two threads 4.4 -> 3.7 ms with whole rows).
      const auto er = pt.sync ? share(M, tid, team, 1)
                              : std::make_pair(pt.b0, std::min<int64_t>(M, pt.b1));
      const int64_t b0 = er.first, b1 = er.second;
      st.totals(t, row0, b0, b1);
      // 2. Projection: dr = dh_t W_hr.
      if (proj)
        w_hr.mm_cols(b1 - b0, 0, H, st.dtot.data() + b0 * P, P, st.dr.data() + b0 * H, H,
                     false);
      st.gate_grads(t, row0, b0, b1, w_hn);
      st.sum_bias_rows(row0, b0, b1);
      part_barrier(pt, barrier);  // every gate gradient of the step is written
      // 4. dh_{t-1} = (GRU: z * dh_t) + dgates_h W_hh, own rows / columns
      //    (reset-before GRU: its direct part + [da_r, da_z] W_h[r,z]).
      const int64_t m0 = pt.b0, m1 = std::min<int64_t>(M, pt.b1);
      // dh already holds a direct part (GRU, zoneout) that the product adds to.
      const bool direct = gru || rb || p.zone != nullptr;
      if (p.rmask) {  // the product gives d(h_{t-1} * m)
        w_hh.mm_cols(m1 - m0, pt.c0, pt.c1, dgh_base + (row0 + m0) * GH, GH,
                     st.dprod.data() + m0 * P, P, false);
        for (int64_t b = m0; b < m1; ++b)
          mask_add_row(pt.c0, pt.c1, p.rmask + b * P, st.dprod.data() + b * P,
                       st.dh.data() + b * P, direct);
      } else {
        w_hh.mm_cols(m1 - m0, pt.c0, pt.c1, dgh_base + (row0 + m0) * GH, GH,
                     st.dh.data() + m0 * P, P, direct);
      }
      part_barrier(pt, barrier);
    }
    if (!pt.sync || tid == 0) {  // gradients of this thread's rows (all rows: tid 0)
      std::copy(st.dh.begin() + pt.b0 * P, st.dh.begin() + pt.b1 * P, p.dh0 + pt.b0 * P);
      if (st.lstm)
        std::copy(st.dc.begin() + pt.b0 * H, st.dc.begin() + pt.b1 * H, p.dc0 + pt.b0 * H);
    }
  }, loop_key(true, work, p.T));
  st.reduce_biases();
}

namespace {

// Columns a product over n columns computes: whole panels of kNB.
template <typename T>
int64_t padded(int64_t n) {
  return (n + gemm::kNB<T> - 1) / gemm::kNB<T> * gemm::kNB<T>;
}

// Whether C(M, N) = A(M, K) B(K, N) with A stored transposed costs fewer
// padded columns as C^T = B^T A^T (vectors along M) than as it stands
// (vectors along N). For the weight gradients dW = dG^T X, M is the G*H gate
// units and N the input features or the hidden size: an LSTM with 16 inputs
// and hidden 16 computes 64 x 16 columns as 16 x 64 instead of 64 x 32.
template <typename T>
bool transposed_pays(int64_t M, int64_t N) {
  return N * padded<T>(M) <= M * padded<T>(N);
}

// C^T (N x M) in a buffer: C's values transposed with `accumulate`, else
// zeros (overwritten).
template <typename T>
std::vector<T> transposed_start(int64_t M, int64_t N, const T* C, int64_t ldc, bool accumulate) {
  std::vector<T> ct(static_cast<size_t>(N * M));
  if (accumulate)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) ct[n * M + m] = C[m * ldc + n];
  return ct;
}

template <typename T>
void transposed_finish(const std::vector<T>& ct, int64_t M, int64_t N, T* C, int64_t ldc) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) C[m * ldc + n] = ct[n * M + m];
}

// Thread tid's part of C^T (N rows, `panels` column panels): rows [n0, n0 +
// nr) and panels [p0, p1); the larger side is split.
struct OutPart {
  int64_t n0, nr, p0, p1;
};
inline OutPart out_part(int64_t N, int64_t M, int64_t panels, int tid, int team) {
  if (N >= M) {
    const auto rows = share(N, tid, team, gemm::kMR);
    return {rows.first, rows.second - rows.first, 0, panels};
  }
  const auto cols = share(panels, tid, team, 1);
  return {0, N, cols.first, cols.second};
}

// C(M, N) = [C +] A(M, K) B(K, N), A(m, k) = A[m + k * a_ks], B row-major, as
// C^T = B^T A^T: A^T is row-major K x M with row stride a_ks, so its whole
// panels are read in place (gemm::direct_mm) and only a last partial panel
// is packed; B^T's rows are B's columns, read with unit stride along them.
// C^T lives in a small buffer (N x M) and is transposed into C at the end.
// Each element still sums k = 0..K-1 in order from zero or C: the same bits
// as the untransposed product.
template <typename T>
void transposed_product(int64_t M, int64_t N, int64_t K, const T* A, int64_t a_ks, const T* B,
                        int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  constexpr int64_t NB = PackedB<T>::NB;
  const int64_t full = M / NB * NB, tail = M - full;
  std::vector<T> ct = transposed_start(M, N, C, ldc, accumulate);
  PackedStore<T> tail_store;
  PackedB<T> tail_b(tail_store);
  if (tail > 0) tail_b.init(K, tail, tail);
  const int64_t panels = full / NB + (tail > 0 ? 1 : 0);
  const int nt = team_size(M * N * std::max<int64_t>(K, 1), kParallelGemm);
  run_team(nt, [&](int tid, int team, StepBarrier& barrier) {
    if (tail > 0) {
      pack_share(tail_b, A + full, a_ks, false, tid, team);
      team_barrier(team, barrier);
    }
    const OutPart o = out_part(N, M, panels, tid, team);
    if (o.nr <= 0) return;
    T* y = ct.data() + o.n0 * M;
    gemm::direct_mm(o.nr, o.p0 * NB, std::min(full, o.p1 * NB), K, B + o.n0, 1, ldb, A, a_ks, y,
                    M, accumulate);
    if (tail > 0 && o.p1 * NB > full)
      tail_b.mm(o.nr, 0, 1, B + o.n0, 1, ldb, y + full, M, accumulate);
  });
  transposed_finish(ct, M, N, C, ldc);
}

#if defined(FASTCELLS_BF16)
// A bfloat16 call's weight gradients run on bfloat16 operands
// (transposed_pairs) from this many rows of C^T (input features or hidden
// size: the multiply-adds each rounded and packed gate gradient serves) and
// this many gate units. Measured on a 2-core AVX-512-BF16 host (LSTM, batch
// 8-256, paired against widening in one build): 1.15-1.4x faster with 64-256
// rows at 512 and 1024 units; no faster with 64 rows at 256 units (hidden
// 64), where packing the gate gradients costs what the products save.
constexpr int64_t kPairsGemmRows = 64;
constexpr int64_t kPairsGemmUnits = 512;

// transposed_product on bfloat16 operands: A^T (the gate gradients) and B
// (the layer input or h_{t-1}) packed as bfloat16 pair rows by the team,
// then vdpbf16ps products with float32 sums, pair by pair in k order.
inline void transposed_pairs(int64_t M, int64_t N, int64_t K, const float* A, int64_t a_ks,
                             const float* B, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  constexpr int64_t NB = PackedB<float>::NB;
  const int64_t KP = (K + 1) / 2, ldg = padded<float>(M), ldx = (N + 15) / 16 * 16;
  std::unique_ptr<float[]> gp(new float[std::max<int64_t>(1, KP * ldg)]);
  std::unique_ptr<float[]> xp(new float[std::max<int64_t>(1, KP * ldx)]);
  std::vector<float> ct = transposed_start(M, N, C, ldc, accumulate);
  const int nt = team_size(M * N * std::max<int64_t>(K, 1), kParallelGemm);
  run_team(nt, [&](int tid, int team, StepBarrier& barrier) {
    const auto kps = share(KP, tid, team, 1);
    gemm::pack_pair_rows(A, a_ks, K, M, gp.get(), ldg, kps.first, kps.second);
    gemm::pack_pair_rows(B, ldb, K, N, xp.get(), ldx, kps.first, kps.second);
    team_barrier(team, barrier);
    const OutPart o = out_part(N, M, ldg / NB, tid, team);
    if (o.nr <= 0) return;
    gemm::direct_mm_pairs(o.nr, o.p0 * NB, std::min(M, o.p1 * NB), KP, xp.get() + o.n0, ldx,
                          gp.get(), ldg, ct.data() + o.n0 * M, M, accumulate);
  });
  transposed_finish(ct, M, N, C, ldc);
}
#endif

}  // namespace

// Pairs: on bfloat16 operands, as in recurrent_forward.
template <typename T, bool Pairs = false>
void matmul(int64_t M, int64_t N, int64_t K, const T* A, int64_t a_rs, int64_t a_ks, const T* B,
            int64_t ldb, bool trans_b, T* C, int64_t ldc, bool accumulate, const T* bias,
            PackedStore<T>* keep_b) {
  if (M == 0 || N == 0) return;
  if (a_rs == 1 && !trans_b && N <= 6 && bias == nullptr && M >= gemm::kNB<T> && !keep_b) {
    // Few output columns (dW_ih with few input features): no padded panels.
    const int nt = team_size(M * N * std::max<int64_t>(K, 1), kParallelGemm);
    run_team(nt, [&](int tid, int team, StepBarrier& barrier) {
      const auto rows = share(M, tid, team, gemm::kNB<T>);
      const int64_t m0 = rows.first, mr = rows.second - rows.first;
      if (mr <= 0) return;
      const T* a = A + m0;
      T* c = C + m0 * ldc;
      switch (N) {
        case 1: gemm::narrow_mm<T, 1>(mr, K, a, a_ks, B, ldb, c, ldc, accumulate); break;
        case 2: gemm::narrow_mm<T, 2>(mr, K, a, a_ks, B, ldb, c, ldc, accumulate); break;
        case 3: gemm::narrow_mm<T, 3>(mr, K, a, a_ks, B, ldb, c, ldc, accumulate); break;
        case 4: gemm::narrow_mm<T, 4>(mr, K, a, a_ks, B, ldb, c, ldc, accumulate); break;
        case 5: gemm::narrow_mm<T, 5>(mr, K, a, a_ks, B, ldb, c, ldc, accumulate); break;
        default: gemm::narrow_mm<T, 6>(mr, K, a, a_ks, B, ldb, c, ldc, accumulate); break;
      }
    });
    return;
  }
  const bool transposed = a_rs == 1 && !trans_b && bias == nullptr && !keep_b;
#if defined(FASTCELLS_BF16)
  if constexpr (Pairs) {
    if (transposed && N >= kPairsGemmRows && M >= kPairsGemmUnits) {
      transposed_pairs(M, N, K, A, a_ks, B, ldb, C, ldc, accumulate);
      return;
    }
  }
#endif
  if (transposed && transposed_pays<T>(M, N)) {
    transposed_product(M, N, K, A, a_ks, B, ldb, C, ldc, accumulate);
    return;
  }
  // A `keep_b` already filled in another form is left as it is, as in
  // recurrent_forward.
  PackedStore<T> local;
  const bool use_keep = keep_b && (!keep_b->ready || PackedB<T>(*keep_b).holds(K, N, N, Pairs));
  PackedB<T> b(use_keep ? *keep_b : local);
  const bool fill = !b.holds(K, N, N, Pairs);
  if (fill) b.init(K, N, N, Pairs);
  const int nt = team_size(M * N * std::max<int64_t>(K, 1), kParallelGemm);
  // Split the larger output side; every element keeps its own k order.
  const bool split_rows = M >= N;
  run_team(nt, [&](int tid, int team, StepBarrier& barrier) {
    if (fill) {
      pack_share(b, B, ldb, trans_b, tid, team);
      team_barrier(team, barrier);
    }
    if (split_rows) {
      const auto rows = share(M, tid, team, gemm::kMR);
      b.mm(rows.second - rows.first, 0, b.panels(), A + rows.first * a_rs, a_rs, a_ks,
           C + rows.first * ldc, ldc, accumulate, bias);
    } else {
      const auto panels = share(b.panels(), tid, team, 1);
      b.mm(M, panels.first, panels.second, A, a_rs, a_ks, C, ldc, accumulate, bias);
    }
  });
  if (fill) b.set_ready();
}

namespace {

double fma_rate(double seconds) {
  // 12 independent accumulators: enough chains to cover the FMA latency
  // (4-5 cycles) on two pipes.
  using V = gemm::Simd<float>::V;
  constexpr int kChains = 12;
  constexpr int64_t kInner = 1 << 16;
  V acc[kChains];
  for (int c = 0; c < kChains; ++c) acc[c] = V{} + static_cast<float>(c) * 1e-3f;
  const V a = V{} + 0.999999f, b = V{} + 1e-7f;
  int64_t rounds = 0;
  const double t0 = omp_get_wtime();
  double elapsed = 0;
  do {
    for (int64_t i = 0; i < kInner; ++i) {
#pragma GCC unroll 12
      for (int c = 0; c < kChains; ++c) acc[c] = acc[c] * a + b;
    }
    ++rounds;
    elapsed = omp_get_wtime() - t0;
  } while (elapsed < seconds);
  float sink = 0;
  for (int c = 0; c < kChains; ++c) sink += acc[c][0];
  volatile float keep = sink;  // the chains must not be optimised away
  (void)keep;
  return static_cast<double>(rounds) * kInner * kChains * gemm::Simd<float>::kLanes / elapsed;
}

double product_seconds(int64_t M, int64_t K, int64_t N, int64_t reps) {
  std::vector<float> x(static_cast<size_t>(std::max<int64_t>(1, M * K)), 0.5f);
  std::vector<float> b(static_cast<size_t>(std::max<int64_t>(1, K * N)), 0.25f);
  std::vector<float> y(static_cast<size_t>(std::max<int64_t>(1, M * N)));
  PackedStore<float> store;
  PackedB<float> pb(store);
  pb.init(K, N, N);
  pb.pack_panels(b.data(), K, true, 0, pb.panels());
  pb.set_ready();
  pb.mm(M, 0, pb.panels(), x.data(), K, 1, y.data(), N, false);  // warm-up
  const double t0 = omp_get_wtime();
  for (int64_t r = 0; r < reps; ++r) pb.mm(M, 0, pb.panels(), x.data(), K, 1, y.data(), N, false);
  return (omp_get_wtime() - t0) / static_cast<double>(std::max<int64_t>(1, reps));
}

}  // namespace

// Whether this path's bfloat16 table runs bfloat16 products; without them
// it is the float table (bfloat16 values widened to float32 first).
#if defined(FASTCELLS_BF16)
constexpr bool kBf16Products = true;
#else
constexpr bool kBf16Products = false;
#endif

// This path's entry in the dispatch table (csrc/cpu/isa.h).
const IsaKernels& kernels() {
  static const IsaKernels k{static_cast<IsaId>(FASTCELLS_ISA_ID),
                            FASTCELLS_ISA_NAME,
                            FASTCELLS_VEC_BYTES,
                            FASTCELLS_MR,
                            {&matmul<float>, &recurrent_forward<float>, &recurrent_backward<float>},
                            {&matmul<float, kBf16Products>, &recurrent_forward<float, kBf16Products>,
                             &recurrent_backward<float, kBf16Products>},
                            {&matmul<double>, &recurrent_forward<double>, &recurrent_backward<double>},
                            {&fma_rate, &product_seconds}};
  return k;
}

}  // namespace FASTCELLS_CPU_ISA
}  // namespace cpu
}  // namespace fastcells
