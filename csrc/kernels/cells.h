// Gate math for the LSTM, GRU and RNN cells: the only copy of the equations.
//
// Torch-free and header-only so that the CPU code (csrc/cpu) and the CUDA
// code (csrc/cuda) include the very same functions; the CPU tests therefore
// validate the arithmetic the GPU runs.
//
// Shape legend used across csrc/:
//   T  time steps            B  batch (max batch for packed input)
//   I  input features        H  hidden size
//   P  output/recurrent size (proj_size for a projected LSTM, else H)
//   G  gates (cell_table.h): LSTM i, f, g, o; GRU r, z, n; RNN one
//   N  rows of a (packed) sequence: T*B for dense input, sum(batch_sizes) else
//
// Every function works on one (row, unit) element. `acc` is the accumulation
// type (float for float/half/bfloat16 storage, double for double).
#pragma once

#include <cmath>
#include <cstdint>

#include "cell_table.h"  // FC_HD, the cell codes (kLSTM, ...) and num_gates

namespace fastcells {
namespace kernels {

// float exp and tanh. On the GPU: the CUDA math library. On the CPU: branch-
// free polynomial/rational forms that the compiler vectorises (libm's expf
// and tanhf are scalar calls and cost more than the whole recurrent product
// at small H). Accuracy over the float range: exp <= 1e-7 relative (Cephes
// expf polynomial), tanh <= 4e-7 relative (Eigen's rational tanh). NaN in
// gives NaN out. float64 always uses libm.
FC_HD float fc_exp(float x) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return ::expf(x);
#else
  // Clamp keeps 2^n a normal float; comparisons written so NaN passes through.
  x = x > 88.7f ? 88.7f : x;
  x = x < -87.3f ? -87.3f : x;
  // n = round(x / ln 2) by the 1.5 * 2^23 trick (no rounding instruction needed).
  const float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.f;
  // Scale by 2^n through the exponent bits.
  union {
    int32_t i;
    float f;
  } scale;
  scale.i = (static_cast<int32_t>(n) + 127) << 23;
  return p * scale.f;
#endif
}

FC_HD float fc_tanh(float x) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return ::tanhf(x);
#else
  x = x > 7.90531110763549805f ? 7.90531110763549805f : x;
  x = x < -7.90531110763549805f ? -7.90531110763549805f : x;
  const float x2 = x * x;
  float p = -2.76076847742355e-16f;
  p = p * x2 + 2.00018790482477e-13f;
  p = p * x2 + -8.60467152213735e-11f;
  p = p * x2 + 5.12229709037114e-08f;
  p = p * x2 + 1.48572235717979e-05f;
  p = p * x2 + 6.37261928875436e-04f;
  p = p * x2 + 4.89352455891786e-03f;
  p = p * x;
  float q = 1.19825839466702e-06f;
  q = q * x2 + 1.18534705686654e-04f;
  q = q * x2 + 2.26843463243900e-03f;
  q = q * x2 + 4.89352518554385e-03f;
  return p / q;
#endif
}

FC_HD double fc_exp(double x) { return ::exp(x); }
FC_HD double fc_tanh(double x) { return ::tanh(x); }

template <typename acc>
FC_HD acc sigmoid(acc x) {
  return acc(1) / (acc(1) + fc_exp(-x));
}

// ---------------------------------------------------------------- LSTM
// Pre-activations a_* already hold x W_ih^T + b_ih + h W_hh^T + b_hh.
//   i = sig(a_i)  f = sig(a_f)  g = tanh(a_g)  o = sig(a_o)
//   c = f * c_prev + i * g      r = o * tanh(c)   (h = r, or h = W_hr r)
template <typename acc>
struct LstmGates {
  acc i, f, g, o, c, r;
};

// The LSTM's new cell value from its activated gates.
template <typename acc>
FC_HD acc lstm_candidate(acc i, acc f, acc g, acc c_prev) {
  return f * c_prev + i * g;
}

// Zoneout (Krueger et al. 2016): a unit keeps its previous value with weight
// z (0 or 1 in training, the rate p in eval) and takes the new one otherwise.
template <typename acc>
FC_HD acc zone(acc z, acc prev, acc fresh) {
  return z * prev + (acc(1) - z) * fresh;
}

template <typename acc>
FC_HD LstmGates<acc> lstm_forward(acc a_i, acc a_f, acc a_g, acc a_o, acc c_prev) {
  LstmGates<acc> s;
  s.i = sigmoid(a_i);
  s.f = sigmoid(a_f);
  s.g = fc_tanh(a_g);
  s.o = sigmoid(a_o);
  s.c = lstm_candidate(s.i, s.f, s.g, c_prev);
  s.r = s.o * fc_tanh(s.c);
  return s;
}

// Backward of one LSTM element from the activated gates saved in forward.
//   dr      gradient w.r.t. r = o*tanh(c) (dh, or dh W_hr for a projection)
//   dc_next gradient w.r.t. c flowing back from step t+1
// Writes the pre-activation gradients and returns dc_prev.
template <typename acc>
struct LstmGrads {
  acc di, df, dg, do_, dc_prev;
};

// The cell update's part: from dc = dL/dc_t (every path into c_t summed),
// the gradients of i, f, g and c_{t-1}.
template <typename acc>
struct LstmCellGrads {
  acc di, df, dg, dc_prev;
};

template <typename acc>
FC_HD LstmCellGrads<acc> lstm_cell_backward(acc i, acc f, acc g, acc c_prev, acc dc) {
  // Each product takes the bounded sigmoid derivative (<= 1/4) before the
  // unbounded factor (c_prev), so that a saturated gate (derivative 0) gives 0
  // and not inf * 0 = NaN when |c_prev| is near the float range.
  LstmCellGrads<acc> d;
  d.di = dc * (i * (acc(1) - i)) * g;
  d.df = dc * (f * (acc(1) - f)) * c_prev;
  d.dg = dc * i * (acc(1) - g * g);
  d.dc_prev = dc * f;
  return d;
}

template <typename acc>
FC_HD LstmGrads<acc> lstm_backward(acc i, acc f, acc g, acc o, acc c, acc c_prev,
                                   acc dr, acc dc_next) {
  const acc tc = fc_tanh(c);
  const acc dc = dc_next + dr * o * (acc(1) - tc * tc);
  const LstmCellGrads<acc> cg = lstm_cell_backward(i, f, g, c_prev, dc);
  LstmGrads<acc> d;
  d.di = cg.di;
  d.df = cg.df;
  d.dg = cg.dg;
  d.do_ = dr * (o * (acc(1) - o)) * tc;
  d.dc_prev = cg.dc_prev;
  return d;
}

// ---------------------------------------------------------------- GRU
// torch.nn convention (reset applied after the recurrent matmul):
//   r = sig(x_r + hh_r)   z = sig(x_z + hh_z)
//   n = tanh(x_n + r * hh_n)        with hh_n = h_prev W_hn^T + b_hn
//   h = (1 - z) * n + z * h_prev
// x_* hold x W_ih^T + b_ih (and b_hr, b_hz folded in); hh_r, hh_z the
// recurrent products without bias.
template <typename acc>
struct GruGates {
  acc r, z, n, h;
};

template <typename acc>
FC_HD GruGates<acc> gru_forward(acc x_r, acc x_z, acc x_n, acc hh_r, acc hh_z, acc hh_n,
                                acc h_prev) {
  GruGates<acc> s;
  s.r = sigmoid(x_r + hh_r);
  s.z = sigmoid(x_z + hh_z);
  s.n = fc_tanh(x_n + s.r * hh_n);
  s.h = (acc(1) - s.z) * s.n + s.z * h_prev;
  return s;
}

// Gradients of one GRU element. dx_* go to the input side (W_ih, b_ih, x),
// dhh_* to the recurrent side (W_hh, b_hh, h_prev through W_hh); they differ
// only in the n slot. dh_prev_direct is the z * dh path that skips W_hh.
template <typename acc>
struct GruGrads {
  acc dx_r, dx_z, dx_n, dhh_n, dh_prev_direct;
};

template <typename acc>
FC_HD GruGrads<acc> gru_backward(acc r, acc z, acc n, acc hh_n, acc h_prev, acc dh) {
  GruGrads<acc> d;
  // Bounded derivatives first, unbounded factors (hh_n, h_prev) last, as in
  // lstm_backward: no inf * 0 where the true gradient is finite.
  const acc dn = dh * (acc(1) - z);
  d.dx_n = dn * (acc(1) - n * n);
  d.dhh_n = d.dx_n * r;
  d.dx_r = d.dx_n * (r * (acc(1) - r)) * hh_n;
  d.dx_z = dh * (z * (acc(1) - z)) * (h_prev - n);
  d.dh_prev_direct = dh * z;
  return d;
}

// ---------------------------------------------------------------- GRU, reset before
// The original GRU (reset gate applied before the recurrent product):
//   r = sig(a_r)   z = sig(a_z)   a_* = x W_i*^T + b_i* + h_prev W_h*^T + b_h*
//   n = tanh(a_n)  a_n = x W_in^T + b_in + (r * h_prev) W_hn^T + b_hn
//   h = (1 - z) * n + z * h_prev
// Every bias is a plain summand here (b_hn is not multiplied by r), so all of
// b_hh folds into the x side. A step runs two recurrent products: h_prev
// W_h[r,z]^T for a_r and a_z, then, once r is known, (r * h_prev) W_hn^T.
// Backward runs them in the opposite order: da_n and da_z need only dh, then
// d(r * h_prev) = da_n W_hn gives da_r, then [da_r, da_z] W_h[r,z].
template <typename acc>
struct GruRbState {
  acc n, h;
};

// n and h_t from the complete a_n, the activated z and h_prev (r and z are
// sigmoid(a_r), sigmoid(a_z)).
template <typename acc>
FC_HD GruRbState<acc> gru_rb_forward_h(acc a_n, acc z, acc h_prev) {
  GruRbState<acc> s;
  s.n = fc_tanh(a_n);
  s.h = (acc(1) - z) * s.n + z * h_prev;
  return s;
}

template <typename acc>
struct GruRbGrads {
  acc da_n, da_z;
};

// da_n and da_z of one element from the activated z, n and dL/dh_t.
template <typename acc>
FC_HD GruRbGrads<acc> gru_rb_backward_nz(acc z, acc n, acc h_prev, acc dh) {
  GruRbGrads<acc> d;
  // Bounded derivatives first, the unbounded h_prev last (see lstm_backward).
  d.da_n = dh * (acc(1) - z) * (acc(1) - n * n);
  d.da_z = dh * (z * (acc(1) - z)) * (h_prev - n);
  return d;
}

// da_r from d_rh = dL/d(r * h_prev) = da_n W_hn.
template <typename acc>
FC_HD acc gru_rb_backward_r(acc r, acc h_prev, acc d_rh) {
  return d_rh * (r * (acc(1) - r)) * h_prev;
}

// The part of dL/dh_{t-1} that does not pass through W_h[r,z]: through z and
// through r * h_prev.
template <typename acc>
FC_HD acc gru_rb_dh_direct(acc r, acc z, acc dh, acc d_rh) {
  return dh * z + d_rh * r;
}

// ---------------------------------------------------------------- RNN
template <typename acc>
FC_HD acc rnn_forward(int mode, acc a) {
  // `a < 0 ? 0 : a` keeps NaN as NaN, like torch.relu.
  return mode == kRNN_RELU ? (a < acc(0) ? acc(0) : a) : fc_tanh(a);
}

// Gradient w.r.t. the pre-activation from the activated output h.
template <typename acc>
FC_HD acc rnn_backward(int mode, acc h, acc dh) {
  // threshold_backward semantics: zero where h <= 0, dh elsewhere (NaN too).
  return mode == kRNN_RELU ? (h <= acc(0) ? acc(0) : dh) : dh * (acc(1) - h * h);
}

}  // namespace kernels
}  // namespace fastcells
