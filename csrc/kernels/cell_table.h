// The table of cells: the only place where the C++ code numbers the cells and
// says how many gates each has, whether it carries a cell state, how much it
// saves for backward and whether it takes a projection. fastcells/_cells.py
// is the Python copy; tests/test_cell_table.py checks the two agree through
// torch.ops.fastcells.cell_table() (csrc/cell_table.cpp).
//
// Torch-free and usable from CUDA: the lookups are FC_HD constexpr functions
// (a switch, so device code needs no table in device memory).
//
// Adding a cell: one row here and in fastcells/_cells.py, its gate functions in
// cells.h, its reference in fastcells/reference.py and its module.
#pragma once

#include <cstdint>
#include <string>

// On the host, always_inline: the CPU kernels are compiled once per ISA path
// under `#pragma GCC target` (csrc/cpu/isa.h), and these functions, defined
// before that switch, must be inlined into the vectorised gate loops. GCC
// silently refuses to inline across differing target options (a `tune=` in a
// path's pragma did that, a 3x slowdown); with always_inline it is a compile
// error instead.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define FC_HD __host__ __device__ __forceinline__
#else
#define FC_HD inline __attribute__((always_inline))
#endif

// X(code, name, gates, cell_state, extra, proj, base, norms, cuda)
//   code        the `mode` argument of the ops; rows are numbered 0, 1, ... in order
//   name        torch.nn's mode string (RNNBase.mode)
//   gates       G: the weights have G*H rows (torch.nn gate order)
//   cell_state  carries c (cx / cy) besides h
//   extra       columns of the saved "extra" block per row, in units of H
//               (csrc/ops.cpp's reserve layout: LSTM c_t, GRU hh_n, and the
//               LayerNorm cells' raw products)
//   proj        proj_size > 0 is allowed
//   base        the cell whose gate functions (cells.h) this one runs
//   norms       layer-norm parameters per layer and direction, after the
//               torch.nn weights: ln_ih_weight, ln_hh_weight (G*H each) and
//               for the LSTM ln_cell_weight, ln_cell_bias (H each)
//   cuda        the CUDA backend has a kernel for it
// GRU is torch.nn's (reset gate after the recurrent product); GRU_RESET_BEFORE
// the original GRU (Keras reset_after=False, ONNX linear_before_reset=0),
// which torch.nn does not have; LSTM_LN and GRU_LN layer-normalise the two
// products inside the recurrence (and the LSTM its cell state), haste's
// LayerNormLSTM / LayerNormGRU formulation (fastcells/reference.py).
#define FASTCELLS_CELL_TABLE(X)                            \
  X(0, LSTM, 4, true, 1, true, 0, 0, true)                 \
  X(1, GRU, 3, false, 1, false, 1, 0, true)                \
  X(2, RNN_TANH, 1, false, 0, false, 2, 0, true)           \
  X(3, RNN_RELU, 1, false, 0, false, 3, 0, true)           \
  X(4, GRU_RESET_BEFORE, 3, false, 0, false, 4, 0, false)  \
  X(5, LSTM_LN, 4, true, 9, false, 0, 4, false)            \
  X(6, GRU_LN, 3, false, 7, false, 1, 2, false)

namespace fastcells {
namespace kernels {

// Cell codes shared with the op layer (csrc/ops.cpp) and Python.
#define FC_CELL_ENUM(code, name, gates, cell_state, extra, proj, base, norms, cuda) k##name = code,
enum CellMode : int { FASTCELLS_CELL_TABLE(FC_CELL_ENUM) };
#undef FC_CELL_ENUM

#define FC_CELL_COUNT(code, name, gates, cell_state, extra, proj, base, norms, cuda) +1
constexpr int kNumCells = 0 FASTCELLS_CELL_TABLE(FC_CELL_COUNT);
#undef FC_CELL_COUNT

struct CellInfo {
  int code;
  const char* name;
  int gates;
  bool cell_state;
  int extra;
  bool proj;
  int base;
  int norms;
  bool cuda;
};

// The row of `mode`; an invalid mode gets code -1, no name and no gates.
FC_HD constexpr CellInfo cell_info(int mode) {
#define FC_CELL_CASE(code, name, gates, cell_state, extra, proj, base, norms, cuda) \
  case code:                                                       \
    return CellInfo{code, #name, gates, cell_state, extra, proj, base, norms, cuda};
  switch (mode) {
    FASTCELLS_CELL_TABLE(FC_CELL_CASE)
    default:
      return CellInfo{-1, nullptr, 0, false, 0, false, -1, 0, false};
  }
#undef FC_CELL_CASE
}

// Codes are positions, so that a range check validates a mode and Python can
// index its table by code.
constexpr bool codes_are_positions() {
  int position = 0;
  bool ok = true;
#define FC_CELL_POSITION(code, name, gates, cell_state, extra, proj, base, norms, cuda) \
  ok = ok && (code) == position++;
  FASTCELLS_CELL_TABLE(FC_CELL_POSITION)
#undef FC_CELL_POSITION
  return ok;
}
static_assert(codes_are_positions(), "cell codes must be 0, 1, ... in table order");

// int64_t: the ops take `mode` as an int64, which must not wrap into range.
FC_HD constexpr bool is_valid_mode(int64_t mode) { return mode >= 0 && mode < kNumCells; }

FC_HD constexpr int num_gates(int mode) { return cell_info(mode).gates; }
FC_HD constexpr bool has_cell_state(int mode) { return cell_info(mode).cell_state; }
FC_HD constexpr bool allows_proj(int mode) { return cell_info(mode).proj; }
FC_HD constexpr int base_cell(int mode) { return cell_info(mode).base; }
FC_HD constexpr int num_norms(int mode) { return cell_info(mode).norms; }
FC_HD constexpr bool layer_norm(int mode) { return cell_info(mode).norms > 0; }
FC_HD constexpr bool runs_on_cuda(int mode) { return cell_info(mode).cuda; }
// Columns of the saved extra block per row (H for LSTM and GRU, 0 for RNN).
FC_HD constexpr int64_t extra_size(int mode, int64_t H) { return cell_info(mode).extra * H; }
FC_HD constexpr const char* cell_name(int mode) { return cell_info(mode).name; }

// Names indexed by code (host code; device code uses cell_name).
#define FC_CELL_NAME(code, name, gates, cell_state, extra, proj, base, norms, cuda) #name,
constexpr const char* kCellNames[kNumCells] = {FASTCELLS_CELL_TABLE(FC_CELL_NAME)};
#undef FC_CELL_NAME

// "0 (LSTM), 1 (GRU), ... or 6 (GRU_LN)", for error messages.
inline std::string valid_modes() {
  std::string s;
  for (int m = 0; m < kNumCells; ++m) {
    if (m > 0) s += m + 1 == kNumCells ? " or " : ", ";
    s += std::to_string(m) + " (" + kCellNames[m] + ")";
  }
  return s;
}

}  // namespace kernels
}  // namespace fastcells
