// Parameter blocks for the recurrent part of one layer in one direction.
//
// The op layer (csrc/ops.cpp) does everything that is a plain GEMM over all
// time steps (input projection, weight gradients, input gradient) and hands
// the time loop to a backend through these structs: csrc/cpu/recurrent_cpu.cpp
// or csrc/cuda/recurrent_cuda.cu. Torch-free: raw pointers, row-major,
// contiguous unless a leading dimension (ld_*) is given. Shape legend in
// cells.h.
//
// Sequences are stored "packed" (as torch.nn.utils.rnn.PackedSequence.data):
// step t owns rows [row_offsets[t], row_offsets[t] + batch_sizes[t]), and
// batch_sizes is non-increasing, so the rows active at step t are the first
// batch_sizes[t] rows of the (B, .) state. Dense input is the special case
// batch_sizes[t] = B, row_offsets[t] = t * B. A row that is inactive keeps
// its state, which gives the right final states for both directions:
// forward, the last update of sequence b is at its last step; reverse
// (t = T-1 .. 0), sequence b starts from h0 when it becomes active.
#pragma once

#include <cstdint>

#include "cells.h"  // FC_HD

namespace fastcells {
namespace kernels {

// The CUDA backend's loop for a layer (csrc/cuda/recurrent_cuda.cu): its own
// choice, or one forced by the op layer (FASTCELLS_CUDA_RECURRENT).
enum class CudaLoop : int { kAuto, kPersistent, kPersistentGlobal, kStepwise };

// What both passes of one layer and direction share: the cell, the sizes
// and the time schedule.
struct LayerSchedule {
  int mode;                     // CellMode
  int T, B, H, P;               // P = proj_size if > 0 else H
  const int64_t* batch_sizes;   // [T], host memory
  const int64_t* row_offsets;   // [T], host memory
  // Device copies of the two arrays above for a GPU backend; both null for
  // dense input (batch_sizes[t] = B, row_offsets[t] = t * B). CPU ignores.
  const int64_t* batch_sizes_dev;
  const int64_t* row_offsets_dev;
  bool reverse;                 // iterate t = T-1 .. 0
  CudaLoop cuda_loop;           // CUDA only (the CPU backend ignores it)
};

template <typename scalar_t>
struct LayerForwardParams : LayerSchedule {
  // (N, G*H). In: x W_ih^T + b_ih (+ b_hh for LSTM/RNN/reset-before GRU, + b_hr,
  // b_hz for GRU; the LayerNorm cells: LN(x W_ih^T; ln_ih) in place of
  // x W_ih^T). Out: activated gates, LSTM (i, f, g, o), GRU and reset-before
  // GRU (r, z, n), RNN (h).
  scalar_t* gates;
  // (N, H). Out: LSTM c_t; GRU hh_n = h_prev W_hn^T + b_hn; unused (null) RNN
  // and reset-before GRU.
  scalar_t* extra;
  // Zoneout (null: none): row r's keep-previous weights at zone + r * ld_zone,
  // P for h then (LSTM) H for c: h_t = z h_{t-1} + (1 - z) h~_t.
  const scalar_t* zone;
  int64_t ld_zone;
  // Recurrent dropout (null: none): (B, P) multipliers of h_{t-1} in the
  // recurrent product, the same at every step.
  const scalar_t* rmask;
  // Whether backward will read gates and extra. Without it (inference) they
  // are scratch, and a backend may leave the activated gates and the LSTM's
  // saved c_t unwritten.
  bool save;
  // LayerNorm cells (cell_table.h, norms > 0), else null: the recurrent
  // product's LN gain (G*H) and the LSTM cell state's LN gain and bias (H).
  const scalar_t* ln_hh;
  const scalar_t* ln_c_w;
  const scalar_t* ln_c_b;
  // (N, G*H) out with save: each row's raw recurrent product h_{t-1} W_hh^T.
  scalar_t* ln_rec;

  const scalar_t* w_hh;         // (G*H, P)
  const scalar_t* b_hn;         // (H) GRU only; null without bias
  // Inference only, else null: the input product runs inside the loop, step
  // by step, instead of arriving in `gates`: gates = x_bias + x W_ih^T, x (N
  // rows, leading dim ld_x, I columns), w_ih (G*H, I), x_bias (G*H: b_ih and
  // the folded part of b_hh) or null. `gates` and `extra` then hold one step:
  // row b of every step at gates + b * G*H and extra + b * H (B rows).
  const scalar_t* x;
  int64_t ld_x;
  int I;
  const scalar_t* w_ih;
  const scalar_t* x_bias;
  const scalar_t* w_hr;         // (P, H) projected LSTM only; else null

  scalar_t* out;                // N rows, leading dim ld_out; P columns written
  int64_t ld_out;

  const scalar_t* h0;           // (B, P)
  const scalar_t* c0;           // (B, H) LSTM only
  scalar_t* hy;                 // (B, P) final states
  scalar_t* cy;                 // (B, H) LSTM only
};

template <typename scalar_t>
struct LayerBackwardParams : LayerSchedule {
  // Saved by forward.
  const scalar_t* gates;        // (N, G*H) activated gates
  const scalar_t* extra;        // (N, H) LSTM c_t / GRU hh_n / null
  const scalar_t* out;          // N rows, ld_out: h_t of this direction
  int64_t ld_out;
  const scalar_t* h0;           // (B, P)
  const scalar_t* c0;           // (B, H) LSTM only

  const scalar_t* w_hh;         // (G*H, P)
  const scalar_t* w_hr;         // (P, H) or null
  // LayerNorm cells, as in LayerForwardParams; ln_rec as forward saved it.
  const scalar_t* ln_hh;
  const scalar_t* ln_c_w;
  const scalar_t* ln_c_b;
  const scalar_t* ln_rec;

  // Incoming gradients; any of them may be null (= zeros).
  const scalar_t* grad_out;     // N rows, leading dim ld_gout, P columns
  int64_t ld_gout;
  const scalar_t* grad_hy;      // (B, P)
  const scalar_t* grad_cy;      // (B, H) LSTM only
  const scalar_t* grad_extra;   // (N, H) LSTM: gradient w.r.t. each row's c_t (the cell
                                //   states a module returns with return_cell_states)
  const scalar_t* zone;         // zoneout weights as in LayerForwardParams, or null
  int64_t ld_zone;
  const scalar_t* rmask;        // recurrent dropout as in LayerForwardParams, or null
  scalar_t* h_prev_m;           // (N, P) out with rmask: h_{t-1} * m, W_hh's gradient operand

  // Outputs, every element written by the backend.
  scalar_t* dgates_x;           // (N, G*H) d pre-activations, input side
  scalar_t* dgates_h;           // (N, G*H) recurrent side; GRU only, else null
                                //   (== dgates_x for LSTM and RNN)
  scalar_t* h_prev;             // (N, P) h_{t-1} seen by each row, for dW_hh
  scalar_t* r_all;              // (N, H) projected LSTM: r_t = o*tanh(c_t); reset-before
                                //   GRU: r * h_{t-1} (W_hn's gradient operand)
  scalar_t* dh_all;             // (N, P) projected LSTM: dL/dh_t
  scalar_t* dh0;                // (B, P)
  scalar_t* dc0;                // (B, H) LSTM only
  // LayerNorm cells: dgates_x (and the GRU's dgates_h) are the gradients
  // w.r.t. the normalised pre-activations; these are the rest.
  scalar_t* dln_rec;            // (N, G*H) w.r.t. the raw recurrent product (W_hh's
                                //   gradient and dh_{t-1}'s operand)
  scalar_t* dln_c;              // (N, H) LSTM_LN: w.r.t. y = LN(c_t; ln_c_w, ln_c_b)
  // Optional (null: not computed). Bias gradients, the sums of dgates_x and
  // dgates_h over all rows: each row summed over its steps in processing
  // order, then the rows added in order 0..B-1, so the result does not depend
  // on how a backend splits the rows. The CPU backend fills them; the CUDA
  // backend is given null and the op layer sums the rows instead.
  scalar_t* db_x;               // (G*H)
  scalar_t* db_h;               // (G*H) GRU only, together with db_x
};

// Rows active at step t (n) and the row where step t starts (row0), from
// the packed schedule, or dense (n = B, row0 = t * B) when `bs` is null.
FC_HD void step_rows(const int64_t* bs, const int64_t* off, int t, int B, int& n,
                     int64_t& row0) {
  if (bs != nullptr) {
    n = static_cast<int>(bs[t]);
    row0 = off[t];
  } else {
    n = B;
    row0 = static_cast<int64_t>(t) * B;
  }
}

// The step whose states step t continues from (t-1 going forward, t+1 in
// reverse): its active rows n and first row row0; n = 0 for the first step
// processed (every row starts from h0).
FC_HD void prev_step_rows(const int64_t* bs, const int64_t* off, int T, int B, int t,
                          bool reverse, int& n, int64_t& row0) {
  const int tp = reverse ? t + 1 : t - 1;
  n = 0;
  row0 = 0;
  if (tp >= 0 && tp < T) step_rows(bs, off, tp, B, n, row0);
}

// Row whose state row b of step t continues from, or -1 for h0: step t-1
// going forward; going in reverse, step t+1 if b is still active there.
FC_HD int64_t prev_row(const int64_t* bs, const int64_t* off, int T, int B, int t, int64_t b,
                       bool reverse) {
  int n;
  int64_t row0;
  prev_step_rows(bs, off, T, B, t, reverse, n, row0);
  return b < n ? row0 + b : -1;
}

}  // namespace kernels
}  // namespace fastcells
