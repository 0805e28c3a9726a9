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

namespace fastcells {
namespace kernels {

template <typename scalar_t>
struct LayerForwardParams {
  int mode;                     // CellMode
  int T, B, H, P;               // P = proj_size if > 0 else H
  const int64_t* batch_sizes;   // [T], host memory
  const int64_t* row_offsets;   // [T], host memory
  // Device copies of the two arrays above for a GPU backend; both null for
  // dense input (batch_sizes[t] = B, row_offsets[t] = t * B). CPU ignores.
  const int64_t* batch_sizes_dev;
  const int64_t* row_offsets_dev;
  bool reverse;                 // iterate t = T-1 .. 0

  // (N, G*H). In: x W_ih^T + b_ih (+ b_hh for LSTM/RNN, + b_hr, b_hz for
  // GRU). Out: activated gates, LSTM (i, f, g, o), GRU (r, z, n), RNN (h).
  scalar_t* gates;
  // (N, H). Out: LSTM c_t; GRU hh_n = h_prev W_hn^T + b_hn; unused (null) RNN.
  scalar_t* extra;

  const scalar_t* w_hh;         // (G*H, P)
  const scalar_t* b_hn;         // (H) GRU only; null without bias
  const scalar_t* w_hr;         // (P, H) projected LSTM only; else null

  scalar_t* out;                // N rows, leading dim ld_out; P columns written
  int64_t ld_out;

  const scalar_t* h0;           // (B, P)
  const scalar_t* c0;           // (B, H) LSTM only
  scalar_t* hy;                 // (B, P) final states
  scalar_t* cy;                 // (B, H) LSTM only
};

template <typename scalar_t>
struct LayerBackwardParams {
  int mode;
  int T, B, H, P;
  const int64_t* batch_sizes;   // [T], host memory
  const int64_t* row_offsets;   // [T], host memory
  const int64_t* batch_sizes_dev;  // as in LayerForwardParams
  const int64_t* row_offsets_dev;
  bool reverse;

  // Saved by forward.
  const scalar_t* gates;        // (N, G*H) activated gates
  const scalar_t* extra;        // (N, H) LSTM c_t / GRU hh_n / null
  const scalar_t* out;          // N rows, ld_out: h_t of this direction
  int64_t ld_out;
  const scalar_t* h0;           // (B, P)
  const scalar_t* c0;           // (B, H) LSTM only

  const scalar_t* w_hh;         // (G*H, P)
  const scalar_t* w_hr;         // (P, H) or null

  // Incoming gradients; any of them may be null (= zeros).
  const scalar_t* grad_out;     // N rows, leading dim ld_gout, P columns
  int64_t ld_gout;
  const scalar_t* grad_hy;      // (B, P)
  const scalar_t* grad_cy;      // (B, H) LSTM only

  // Outputs, every element written by the backend.
  scalar_t* dgates_x;           // (N, G*H) d pre-activations, input side
  scalar_t* dgates_h;           // (N, G*H) recurrent side; GRU only, else null
                                //   (== dgates_x for LSTM and RNN)
  scalar_t* h_prev;             // (N, P) h_{t-1} seen by each row, for dW_hh
  scalar_t* r_all;              // (N, H) projected LSTM: r_t = o*tanh(c_t)
  scalar_t* dh_all;             // (N, P) projected LSTM: dL/dh_t
  scalar_t* dh0;                // (B, P)
  scalar_t* dc0;                // (B, H) LSTM only
};

}  // namespace kernels
}  // namespace fastcells
