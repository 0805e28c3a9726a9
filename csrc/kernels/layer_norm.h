// Layer normalisation inside the recurrence: the LayerNorm cells of
// cell_table.h (LSTM_LN, GRU_LN; haste's formulation, equations in
// fastcells/reference.py):
//
//   LN(v; g[, b]) = (v - mean(v)) / sqrt(var(v) + eps) * g [+ b]
//
// over one row of n values (the G*H pre-activations of a product, or the H
// units of the LSTM's c_t), var the biased variance and eps 1e-5, as
// torch.nn.LayerNorm.
//
// The row sums run as kLnLanes interleaved partial sums added in a fixed
// order at the end: the compiler vectorises them (a single running sum would
// be a chain of dependent adds, which cost more than the recurrent product at
// the forecasting sizes), and their bits do not depend on the thread count or
// the split, because the order of the additions never does.
//
// Torch-free: the CPU time loop (csrc/cpu) works row by row with these, the
// op layer (csrc/ops.cpp) runs the whole-sequence parts (the input side, the
// parameters' gradients) through the *_rows functions at the end.
#pragma once

#include <cmath>
#include <cstdint>

#include "cells.h"  // FC_HD, fc_tanh, lstm_cell_backward

namespace fastcells {
namespace kernels {

constexpr double kLayerNormEps = 1e-5;
constexpr int kLnLanes = 16;

// sum of f(j) over j in [0, n) in the fixed order described above.
template <typename T, typename F>
FC_HD T lane_sum(int64_t n, const F& f) {
  T part[kLnLanes] = {};
  int64_t j = 0;
  for (; j + kLnLanes <= n; j += kLnLanes) {
    for (int k = 0; k < kLnLanes; ++k) part[k] += f(j + k);
  }
  for (int k = 0; j + k < n; ++k) part[k] += f(j + k);
  T s = 0;
  for (int k = 0; k < kLnLanes; ++k) s += part[k];
  return s;
}

template <typename T>
struct RowStats {
  T mean, rstd;
};

// Mean and 1 / sqrt(var + eps) of v[0, n) (two passes: no cancellation).
template <typename T>
FC_HD RowStats<T> row_stats(const T* v, int64_t n) {
  using std::sqrt;
  const T mean = lane_sum<T>(n, [&](int64_t j) { return v[j]; }) / T(n);
  const T var = lane_sum<T>(n, [&](int64_t j) {
                  const T d = v[j] - mean;
                  return d * d;
                }) / T(n);
  return {mean, T(1) / sqrt(var + T(kLayerNormEps))};
}

// The normalised value (v - mean) / sqrt(var + eps) of one element.
template <typename T>
FC_HD T normalized(T v, const RowStats<T>& s) {
  return (v - s.mean) * s.rstd;
}

// Backward of the normalisation of one row v[0, n) with statistics s:
//   dv = rstd * (d - mean(d) - v^ * mean(d * v^)),   v^ = normalized(v)
// where d(j) is the gradient w.r.t. v^_j (the caller's upstream gradient
// times the gain). Writes dv, or adds to it with `accumulate`.
template <typename T, typename D>
FC_HD void ln_backward_row(const T* v, int64_t n, const RowStats<T>& s, const D& d, T* dv,
                           bool accumulate) {
  const T md = lane_sum<T>(n, [&](int64_t j) { return d(j); }) / T(n);
  const T mdv = lane_sum<T>(n, [&](int64_t j) { return d(j) * normalized(v[j], s); }) / T(n);
  for (int64_t j = 0; j < n; ++j) {
    const T g = s.rstd * (d(j) - md - normalized(v[j], s) * mdv);
    dv[j] = accumulate ? dv[j] + g : g;
  }
}

// ---------------------------------------------------------------- LSTM_LN
// The LSTM's output from its normalised cell state:
//   y = LN(c_t; w_c, b_c)    r = o * tanh(y)
// Backward from dr = dL/dr: dy (for w_c, b_c, and through LN to c_t) and the
// pre-activation gradient of o.
template <typename acc>
struct LnLstmOutGrads {
  acc dy, do_;
};

template <typename acc>
FC_HD acc ln_lstm_out(acc o, acc y) {
  return o * fc_tanh(y);
}

template <typename acc>
FC_HD LnLstmOutGrads<acc> ln_lstm_out_backward(acc o, acc y, acc dr) {
  const acc th = fc_tanh(y);
  LnLstmOutGrads<acc> d;
  d.dy = dr * o * (acc(1) - th * th);
  d.do_ = dr * (o * (acc(1) - o)) * th;
  return d;
}

// ---------------------------------------------------------------- whole sequences
// Host code: the op layer's passes over the N rows of a layer, in pieces it
// may run on several threads. Rows are independent; the parameters'
// gradients are column sums, each column summed over all rows in row order
// by one caller, so the results do not depend on how the work is split.

// Rows [r0, r1) of a (rows, n): their statistics into st[r], and with `out`
// out[r] = LN(a[r]; g) + bias (bias may be null).
template <typename T>
void ln_rows_forward(int64_t r0, int64_t r1, int64_t n, const T* a, const T* g, const T* bias,
                     RowStats<T>* st, T* out) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* ar = a + r * n;
    st[r] = row_stats(ar, n);
    if (out == nullptr) continue;
    T* o = out + r * n;
    for (int64_t j = 0; j < n; ++j)
      o[j] = normalized(ar[j], st[r]) * g[j] + (bias ? bias[j] : T(0));
  }
}

// Columns [j0, j1) of the gradients of y = LN(a; g) + b over `rows` rows,
// from dy: dg[j] += sum over rows of dy * normalized(a), db[j] (optional) +=
// sum of dy, in row order.
template <typename T>
void ln_cols_grads(int64_t rows, int64_t n, int64_t j0, int64_t j1, const T* a,
                   const RowStats<T>* st, const T* dy, T* dg, T* db) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* ar = a + r * n;
    const T* d = dy + r * n;
    for (int64_t j = j0; j < j1; ++j) dg[j] += d[j] * normalized(ar[j], st[r]);
    if (db == nullptr) continue;
    for (int64_t j = j0; j < j1; ++j) db[j] += d[j];
  }
}

// Rows [r0, r1): da = the gradient w.r.t. a of LN(a; g), from dy (da may be
// dy itself: in place).
template <typename T>
void ln_rows_backward(int64_t r0, int64_t r1, int64_t n, const T* a, const RowStats<T>* st,
                      const T* g, const T* dy, T* da) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* d = dy + r * n;
    ln_backward_row(a + r * n, n, st[r], [&](int64_t j) { return d[j] * g[j]; }, da + r * n,
                    false);
  }
}

}  // namespace kernels
}  // namespace fastcells
