// CPU time loop for one layer in one direction: forward and BPTT.
//
// Shape legend (see csrc/kernels/cells.h): T steps, B batch, H hidden,
// P output size (proj_size or H), G gates, N packed rows.
//
// Per step the recurrent product h_{t-1} W_hh^T (M x G*H, M = active rows)
// is either a BLAS call (large sizes) or, below kSmallProduct multiply-adds,
// a plain loop over a W_hh^T copy made once per call, so that the
// forecasting regime (H <= 32, small B) pays no per-step call overhead. The
// gate nonlinearities come from csrc/kernels/cells.h, fused with the state
// update. Nothing is allocated inside the loop.
#include "recurrent_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../kernels/cells.h"
#include "blas_cpu.h"

namespace fastcells {
namespace cpu {
namespace {

using kernels::kGRU;
using kernels::kLSTM;

// Below this many multiply-adds per step product a plain loop beats BLAS.
constexpr int64_t kSmallProduct = 8192;
// Pointwise work (rows * G*H) per thread before the step is split across threads.
constexpr int64_t kPointwiseGrain = 16384;

// Transposed copy: src (R, C) row-major -> dst (C, R).
template <typename T>
std::vector<T> transposed(const T* src, int64_t R, int64_t C) {
  std::vector<T> dst(static_cast<size_t>(R * C));
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < C; ++c) dst[c * R + r] = src[r * C + c];
  return dst;
}

// y(M, N) = beta * y + x(M, K) @ Wt(K, N); row-major, Wt contiguous.
template <typename T>
void small_mm(int64_t M, int64_t N, int64_t K, const T* __restrict__ x, int64_t ldx,
              const T* __restrict__ Wt, T* __restrict__ y, int64_t ldy, bool accumulate) {
  for (int64_t m = 0; m < M; ++m) {
    T* __restrict__ yr = y + m * ldy;
    if (!accumulate) std::fill(yr, yr + N, T(0));
    const T* xr = x + m * ldx;
    for (int64_t k = 0; k < K; ++k) {
      const T a = xr[k];
      const T* __restrict__ w = Wt + k * N;
      for (int64_t j = 0; j < N; ++j) yr[j] += a * w[j];
    }
  }
}

// y(M, N) = x(M, K) @ W^T with W (N, K); Wt is W^T (K, N) for the loop path.
template <typename T>
void mm_nt(int64_t M, int64_t N, int64_t K, const T* x, int64_t ldx, const T* W,
           const std::vector<T>& Wt, T* y, int64_t ldy) {
  if (M * N * K <= kSmallProduct) {
    small_mm(M, N, K, x, ldx, Wt.data(), y, ldy, false);
  } else {
    gemm<T>(false, true, M, N, K, T(1), x, ldx, W, K, T(0), y, ldy);
  }
}

// y(M, N) = (accumulate ? y : 0) + x(M, K) @ W with W (K, N).
template <typename T>
void mm_nn(int64_t M, int64_t N, int64_t K, const T* x, int64_t ldx, const T* W, T* y,
           int64_t ldy, bool accumulate) {
  if (M * N * K <= kSmallProduct) {
    small_mm(M, N, K, x, ldx, W, y, ldy, accumulate);
  } else {
    gemm<T>(false, false, M, N, K, T(1), x, ldx, W, N, accumulate ? T(1) : T(0), y, ldy);
  }
}

// Runs fn(b0, b1) over the rows [0, M), in parallel when the step is big.
template <typename F>
void for_rows(int64_t M, int64_t width, const F& fn) {
  if (M * width >= 2 * kPointwiseGrain && M > 1) {
    const int64_t grain = std::max<int64_t>(1, kPointwiseGrain / std::max<int64_t>(width, 1));
    at::parallel_for(0, M, grain, fn);
  } else {
    fn(0, M);
  }
}

// Row index of the state a row of step t was computed from, or -1 for h0.
inline int64_t prev_row(const int64_t* bs, const int64_t* off, int T, int t, int64_t b,
                        bool reverse) {
  if (!reverse) return t > 0 ? off[t - 1] + b : -1;
  return (t + 1 < T && b < bs[t + 1]) ? off[t + 1] + b : -1;
}

}  // namespace

template <typename T>
void recurrent_forward(const kernels::LayerForwardParams<T>& p) {
  const int64_t H = p.H, P = p.P, B = p.B;
  const int64_t GH = kernels::num_gates(p.mode) * H;
  const bool lstm = p.mode == kLSTM, gru = p.mode == kGRU, proj = p.w_hr != nullptr;

  std::vector<T> h(p.h0, p.h0 + B * P);
  std::vector<T> c(lstm ? p.c0 : nullptr, lstm ? p.c0 + B * H : nullptr);
  std::vector<T> rec(static_cast<size_t>(B * GH));
  std::vector<T> r(proj ? static_cast<size_t>(B * H) : 0);
  const std::vector<T> w_hh_t = transposed(p.w_hh, GH, P);
  const std::vector<T> w_hr_t = proj ? transposed(p.w_hr, P, H) : std::vector<T>();

  for (int s = 0; s < p.T; ++s) {
    const int t = p.reverse ? p.T - 1 - s : s;
    const int64_t M = p.batch_sizes[t], row0 = p.row_offsets[t];
    mm_nt(M, GH, P, h.data(), P, p.w_hh, w_hh_t, rec.data(), GH);
    for_rows(M, GH, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        T* g = p.gates + (row0 + b) * GH;
        const T* rc = rec.data() + b * GH;
        T* hb = h.data() + b * P;
        if (lstm) {
          T* cb = c.data() + b * H;
          T* e = p.extra + (row0 + b) * H;
          T* out_r = proj ? r.data() + b * H : hb;
          for (int64_t j = 0; j < H; ++j) {
            const auto st = kernels::lstm_forward<T>(g[j] + rc[j], g[H + j] + rc[H + j],
                                                     g[2 * H + j] + rc[2 * H + j],
                                                     g[3 * H + j] + rc[3 * H + j], cb[j]);
            g[j] = st.i;
            g[H + j] = st.f;
            g[2 * H + j] = st.g;
            g[3 * H + j] = st.o;
            e[j] = st.c;
            cb[j] = st.c;
            out_r[j] = st.r;
          }
        } else if (gru) {
          T* e = p.extra + (row0 + b) * H;
          for (int64_t j = 0; j < H; ++j) {
            const T hh_n = rc[2 * H + j] + (p.b_hn ? p.b_hn[j] : T(0));
            const auto st = kernels::gru_forward<T>(g[j], g[H + j], g[2 * H + j], rc[j],
                                                    rc[H + j], hh_n, hb[j]);
            g[j] = st.r;
            g[H + j] = st.z;
            g[2 * H + j] = st.n;
            e[j] = hh_n;
            hb[j] = st.h;
          }
        } else {
          for (int64_t j = 0; j < H; ++j) {
            const T hv = kernels::rnn_forward<T>(p.mode, g[j] + rc[j]);
            g[j] = hv;
            hb[j] = hv;
          }
        }
      }
    });
    if (proj) mm_nt(M, P, H, r.data(), H, p.w_hr, w_hr_t, h.data(), P);
    for (int64_t b = 0; b < M; ++b)
      std::memcpy(p.out + (row0 + b) * p.ld_out, h.data() + b * P, sizeof(T) * P);
  }
  std::copy(h.begin(), h.end(), p.hy);
  if (lstm) std::copy(c.begin(), c.end(), p.cy);
}

template <typename T>
void recurrent_backward(const kernels::LayerBackwardParams<T>& p) {
  const int64_t H = p.H, P = p.P, B = p.B;
  const int64_t GH = kernels::num_gates(p.mode) * H;
  const bool lstm = p.mode == kLSTM, gru = p.mode == kGRU, proj = p.w_hr != nullptr;

  // dh: gradient w.r.t. the state entering the step processed next (B, P).
  std::vector<T> dh(static_cast<size_t>(B * P), T(0));
  if (p.grad_hy) std::copy(p.grad_hy, p.grad_hy + B * P, dh.begin());
  std::vector<T> dc(lstm ? static_cast<size_t>(B * H) : 0, T(0));
  if (lstm && p.grad_cy) std::copy(p.grad_cy, p.grad_cy + B * H, dc.begin());
  std::vector<T> dtot(static_cast<size_t>(B * P));
  std::vector<T> dr(proj ? static_cast<size_t>(B * H) : 0);
  T* dgh_base = gru ? p.dgates_h : p.dgates_x;

  for (int s = 0; s < p.T; ++s) {
    const int t = p.reverse ? s : p.T - 1 - s;
    const int64_t M = p.batch_sizes[t], row0 = p.row_offsets[t];
    for (int64_t b = 0; b < M; ++b) {
      const int64_t pr = prev_row(p.batch_sizes, p.row_offsets, p.T, t, b, p.reverse);
      const T* hp = pr >= 0 ? p.out + pr * p.ld_out : p.h0 + b * P;
      std::memcpy(p.h_prev + (row0 + b) * P, hp, sizeof(T) * P);
      T* dt = dtot.data() + b * P;
      const T* go = p.grad_out ? p.grad_out + (row0 + b) * p.ld_gout : nullptr;
      for (int64_t j = 0; j < P; ++j) dt[j] = dh[b * P + j] + (go ? go[j] : T(0));
    }
    if (proj) {
      std::memcpy(p.dh_all + row0 * P, dtot.data(), sizeof(T) * M * P);
      mm_nn(M, H, P, dtot.data(), P, p.w_hr, dr.data(), H, false);
    }
    const T* drow_base = proj ? dr.data() : dtot.data();
    for_rows(M, GH, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t row = row0 + b;
        const T* g = p.gates + row * GH;
        const T* d_in = drow_base + b * (proj ? H : P);
        T* dgx = p.dgates_x + row * GH;
        if (lstm) {
          const int64_t pr = prev_row(p.batch_sizes, p.row_offsets, p.T, t, b, p.reverse);
          const T* cp = pr >= 0 ? p.extra + pr * H : p.c0 + b * H;
          const T* cc = p.extra + row * H;
          T* dcb = dc.data() + b * H;
          T* rr = proj ? p.r_all + row * H : nullptr;
          for (int64_t j = 0; j < H; ++j) {
            const auto d = kernels::lstm_backward<T>(g[j], g[H + j], g[2 * H + j], g[3 * H + j],
                                                     cc[j], cp[j], d_in[j], dcb[j]);
            dgx[j] = d.di;
            dgx[H + j] = d.df;
            dgx[2 * H + j] = d.dg;
            dgx[3 * H + j] = d.do_;
            dcb[j] = d.dc_prev;
            if (rr) rr[j] = g[3 * H + j] * kernels::fc_tanh(cc[j]);
          }
        } else if (gru) {
          const T* e = p.extra + row * H;
          const T* hp = p.h_prev + row * P;
          T* dgh = p.dgates_h + row * GH;
          T* dhb = dh.data() + b * P;
          for (int64_t j = 0; j < H; ++j) {
            const auto d = kernels::gru_backward<T>(g[j], g[H + j], g[2 * H + j], e[j], hp[j],
                                                    d_in[j]);
            dgx[j] = d.dx_r;
            dgx[H + j] = d.dx_z;
            dgx[2 * H + j] = d.dx_n;
            dgh[j] = d.dx_r;
            dgh[H + j] = d.dx_z;
            dgh[2 * H + j] = d.dhh_n;
            dhb[j] = d.dh_prev_direct;
          }
        } else {
          for (int64_t j = 0; j < H; ++j) dgx[j] = kernels::rnn_backward<T>(p.mode, g[j], d_in[j]);
        }
      }
    });
    // dh_{t-1} = (GRU: z * dh_t) + dgates_h @ W_hh
    mm_nn(M, P, GH, dgh_base + row0 * GH, GH, p.w_hh, dh.data(), P, gru);
  }
  std::copy(dh.begin(), dh.end(), p.dh0);
  if (lstm) std::copy(dc.begin(), dc.end(), p.dc0);
}

template void recurrent_forward<float>(const kernels::LayerForwardParams<float>&);
template void recurrent_forward<double>(const kernels::LayerForwardParams<double>&);
template void recurrent_backward<float>(const kernels::LayerBackwardParams<float>&);
template void recurrent_backward<double>(const kernels::LayerBackwardParams<double>&);

}  // namespace cpu
}  // namespace fastcells
