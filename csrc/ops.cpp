// Op layer: TORCH_LIBRARY schemas, input checks and the layer/direction
// driver shared by the CPU and CUDA backends.
//
// Shape legend (csrc/kernels/cells.h): T steps, B batch, I input features,
// H hidden, P output size (proj_size or H), G gates, L layers, D directions,
// N rows (T*B dense, sum(batch_sizes) packed).
//
// The driver does what is a GEMM over all time steps (input projection,
// weight and input gradients; the CPU's own packed kernel, ATen on CUDA) and
// hands the time loop of each layer/direction to the backend (csrc/cpu or
// csrc/cuda) through the params structs of csrc/kernels/params.h.
//
// Saved for backward (`reserve`, 1-D, compute dtype), in this order:
//   per layer l, direction d (index l*D + d):
//     gates (N, G*H)  activated gates: LSTM i,f,g,o; GRU r,z,n; RNN h
//     extra (N, H)    LSTM c_t; GRU hh_n = h_{t-1} W_hn^T + b_hn; absent RNN
//                     The LayerNorm cells (LSTM_LN, GRU_LN) follow it with
//       (N, G*H)      the raw recurrent products h_{t-1} W_hh^T
//       (N, G*H)      the raw input products x W_ih^T
//   per layer l:
//     y_l (N, D*P)    the layer's output (before dropout)
// The last layer's y is a copy of the op's `output`: backward reads it from
// here, so the caller may modify `output` in place (torch.relu_, +=, an
// inplace Dropout) as torch.nn's GRU and RNN allow.
// `zoneout` (optional): each row's keep-previous weights z in [0, 1], per
// layer and direction, (L*D, T, B, Z) dense or (L*D, N, Z) packed with
// Z = P (+ H for the LSTM's c): h_t = z h_{t-1} + (1 - z) h~_t (and c alike),
// z in {0, 1} in training and p in eval (fastcells/modules.py draws them).
// `recurrent_masks` (optional): variational recurrent dropout, (L*D, B, P)
// multipliers of h_{t-1} in the recurrent product, the same at every step.
// With need_reserve=False (inference; the autograd kernel passes it when no
// gradient is wanted) `reserve` is empty and the activations live in scratch
// reused across layers and time chunks.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>
#include <c10/util/safe_numerics.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "cpu/memory_cpu.h"
#include "cpu/recurrent_cpu.h"
#include "kernels/cells.h"
#include "kernels/layer_norm.h"
#include "kernels/params.h"
#include "op_schema.h"
#include "weight_cache.h"

#ifdef WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda/recurrent_cuda.h"
#endif

namespace fastcells {
namespace {

using at::Tensor;

constexpr const auto& kModeNames = kernels::kCellNames;

std::string shape_str(at::IntArrayRef s) {
  std::ostringstream o;
  o << s;
  return o.str();
}

// Everything the driver needs to know about one call, derived and checked
// from the arguments before any output is allocated.
struct Config {
  int64_t mode = 0, L = 1, D = 1, G = 1, H = 0, P = 0, I = 0, T = 0, B = 0, N = 0;
  int64_t per_dir = 2;  // weights per layer and direction
  int64_t norms = 0;    // layer-norm parameters per layer and direction (the last ones)
  bool bias = true, packed = false;
  // The inputs are bfloat16 (computed in float): the CPU forward may run its
  // products on bfloat16 operands (csrc/cpu/isa.h).
  bool bf16 = false;
  std::vector<int64_t> batch_sizes, offsets;

  int64_t GH() const { return G * H; }
  int64_t EH() const { return kernels::extra_size(static_cast<int>(mode), H); }
  int64_t gates_offset(int64_t idx) const { return idx * N * (GH() + EH()); }
  int64_t extra_offset(int64_t idx) const { return gates_offset(idx) + N * GH(); }
  int64_t inter_offset(int64_t l) const { return L * D * N * (GH() + EH()) + l * N * D * P; }
  int64_t reserve_size() const { return inter_offset(L); }
  int64_t layer_input(int64_t l) const { return l == 0 ? I : D * P; }
  bool ln() const { return norms > 0; }
  // Positions within a layer and direction's weights: w_ih, w_hh, [b_ih,
  // b_hh], [w_hr], [ln_ih_weight, ln_hh_weight, [ln_cell_weight, ln_cell_bias]].
  int64_t hr_index() const { return bias ? 4 : 2; }
  int64_t ln_index() const { return per_dir - norms; }
  const Tensor& w(at::TensorList ws, int64_t l, int64_t d, int64_t k) const {
    return ws[(l * D + d) * per_dir + k];
  }
};

// One layer and direction's weights by name; null where the configuration
// has none (biases, projection, layer-norm parameters).
struct LayerWeights {
  const Tensor* w_ih = nullptr;
  const Tensor* w_hh = nullptr;
  const Tensor* b_ih = nullptr;
  const Tensor* b_hh = nullptr;
  const Tensor* w_hr = nullptr;
  const Tensor* ln_ih = nullptr;   // gains of LN(x W_ih^T)
  const Tensor* ln_hh = nullptr;   // gains of LN(h W_hh^T)
  const Tensor* ln_c_w = nullptr;  // LSTM_LN: LN(c_t)'s gain and bias
  const Tensor* ln_c_b = nullptr;
};

LayerWeights layer_weights(const Config& c, at::TensorList ws, int64_t l, int64_t d) {
  LayerWeights lw;
  lw.w_ih = &c.w(ws, l, d, 0);
  lw.w_hh = &c.w(ws, l, d, 1);
  if (c.bias) {
    lw.b_ih = &c.w(ws, l, d, 2);
    lw.b_hh = &c.w(ws, l, d, 3);
  }
  if (c.P != c.H) lw.w_hr = &c.w(ws, l, d, c.hr_index());
  const Tensor** ln[] = {&lw.ln_ih, &lw.ln_hh, &lw.ln_c_w, &lw.ln_c_b};
  for (int64_t k = 0; k < c.norms; ++k) *ln[k] = &c.w(ws, l, d, c.ln_index() + k);
  return lw;
}

template <typename T>
T* ptr_or_null(const Tensor* t) {
  return t != nullptr ? t->data_ptr<T>() : nullptr;
}

// a * b, or an error naming what is being sized: sizes come from the caller
// (op arguments, or an empty / expanded tensor's shape), so products of them
// may not fit in int64 even when every tensor is valid.
int64_t checked_mul(int64_t a, int64_t b, const char* what) {
  int64_t r = 0;
  TORCH_CHECK(!c10::mul_overflows(a, b, &r), "fastcells: ", what, " (", a, " * ", b,
              ") overflows int64");
  return r;
}

constexpr int64_t kIntMax = std::numeric_limits<int>::max();

bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

at::ScalarType compute_type(at::ScalarType t) {
  return (t == at::kBFloat16 || t == at::kHalf) ? at::kFloat : t;
}

// `name` is a callable returning the argument's name: it only runs when a
// check fails, so the happy path builds no strings.
template <typename Name>
void check_tensor(const Tensor& t, const Name& name, at::IntArrayRef expected,
                  const Tensor& input) {
  TORCH_CHECK(t.defined(), "fastcells: `", name(), "` is required");
  TORCH_CHECK(t.sizes() == expected, "fastcells: expected `", name(), "` of shape ",
              shape_str(expected), ", got ", shape_str(t.sizes()));
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), "fastcells: expected `", name(),
              "` of dtype ", input.scalar_type(), " (the input's), got ", t.scalar_type());
  TORCH_CHECK(t.device() == input.device(), "fastcells: expected `", name(), "` on device ",
              input.device(), " (the input's), got ", t.device());
}

void check_tensor(const Tensor& t, const char* name, at::IntArrayRef expected,
                  const Tensor& input) {
  check_tensor(t, [name] { return name; }, expected, input);
}

// T, B, I, N and the per-step schedule of `input`: packed (batch_sizes) or
// dense (seq_len, batch, input_size).
void sequence_sizes(Config& c, const Tensor& input, at::OptionalIntArrayRef batch_sizes) {
  c.packed = batch_sizes.has_value();
  if (c.packed) {
    TORCH_CHECK(input.dim() == 2, "fastcells: packed `input` must be 2-D (N, input_size), got ",
                input.dim(), "-D of shape ", shape_str(input.sizes()));
    const auto bs = *batch_sizes;
    const auto steps = static_cast<int64_t>(bs.size());
    // Trailing empty steps (batch size 0 after the last non-empty one) hold no
    // rows and change no state: they are dropped, which is what torch.nn's
    // loop over them amounts to. A zero anywhere else is an error.
    int64_t total = 0;
    c.T = steps;
    TORCH_CHECK(steps <= kIntMax, "fastcells: `batch_sizes` has ", steps,
                " steps, at most ", kIntMax, " are supported");
    for (const auto t : c10::irange(steps)) {
      TORCH_CHECK(bs[t] >= 0 && (bs[t] > 0 || t > 0),
                  "fastcells: `batch_sizes` must be positive (only steps after the last "
                  "non-empty one may be 0), got ", bs[t], " at step ", t);
      TORCH_CHECK(t == 0 || bs[t] <= bs[t - 1],
                  "fastcells: `batch_sizes` must be non-increasing, got ", bs[t - 1],
                  " then ", bs[t], " at step ", t);
      if (bs[t] == 0) {
        c.T = std::min(c.T, t);  // the rest are zero too (non-increasing, checked on)
        continue;
      }
      // Checked before adding, so the running sum cannot overflow.
      TORCH_CHECK(bs[t] <= input.size(0) - total, "fastcells: `batch_sizes` sum to more than "
                  "the ", input.size(0), " rows of packed `input` (at step ", t, ")");
      c.batch_sizes.push_back(bs[t]);
      c.offsets.push_back(total);
      total += bs[t];
    }
    TORCH_CHECK(total == input.size(0), "fastcells: `batch_sizes` sum to ", total,
                " but packed `input` has ", input.size(0), " rows");
    c.B = c.T > 0 ? bs[0] : 0;
    c.N = total;
    c.I = input.size(1);
  } else {
    TORCH_CHECK(input.dim() == 3,
                "fastcells: `input` must be 3-D (seq_len, batch, input_size), got ", input.dim(),
                "-D of shape ", shape_str(input.sizes()));
    c.T = input.size(0);
    c.B = input.size(1);
    c.I = input.size(2);
    // An empty input (I = 0) may have any T and B.
    c.N = checked_mul(c.T, c.B, "`input`'s seq_len * batch");
    TORCH_CHECK(c.T <= kIntMax && c.B <= kIntMax, "fastcells: `input` of shape ",
                shape_str(input.sizes()), ": seq_len and batch must be at most ", kIntMax);
    for (const auto t : c10::irange(c.T)) {
      c.batch_sizes.push_back(c.B);
      c.offsets.push_back(t * c.B);
    }
  }
}

// H and P from weight_hh_l0, the size caps, then every weight's shape, dtype
// and device against the configuration.
void check_weights(Config& c, at::TensorList weights, const Tensor& input, int64_t mode,
                   bool has_biases, int64_t proj_size) {
  const int64_t expected_weights = c.L * c.D * c.per_dir;  // L <= weights.size(): no overflow
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == expected_weights, "fastcells: expected ",
              expected_weights, " tensors in `weights` (num_layers=", c.L, ", directions=", c.D,
              ", has_biases=", has_biases, ", proj_size=", proj_size,
              c.ln() ? ", layer-norm parameters=" + std::to_string(c.norms) : std::string(),
              "), got ", weights.size());
  TORCH_CHECK(weights[1].defined() && weights[1].dim() == 2,
              "fastcells: `weights[1]` (weight_hh_l0) must be 2-D");
  TORCH_CHECK(weights[1].size(0) % c.G == 0 && weights[1].size(0) > 0,
              "fastcells: `weights[1]` (weight_hh_l0) must have a positive multiple of ", c.G,
              " rows for ", kModeNames[mode], ", got ", weights[1].size(0));
  c.H = weights[1].size(0) / c.G;
  c.P = proj_size > 0 ? proj_size : c.H;
  TORCH_CHECK(proj_size < c.H || proj_size == 0, "fastcells: `proj_size` (", proj_size,
              ") must be smaller than hidden_size (", c.H, ")");
  // Caps that keep every index of the BLAS (int32) and the kernels in range,
  // and the reserve's offsets in int64.
  TORCH_CHECK(c.N < (int64_t(1) << 31), "fastcells: too many rows (T*B = ", c.N, ", max 2^31-1)");
  TORCH_CHECK(checked_mul(c.GH(), std::max(c.I, c.D * c.P), "weight size") < (int64_t(1) << 31) &&
                  checked_mul(c.N, c.GH(), "gate count") < (int64_t(1) << 40),
              "fastcells: sizes too large (N=", c.N, ", G*H=", c.GH(), ", input_size=", c.I,
              "): the gates of one layer must hold fewer than 2^40 values and each weight "
              "fewer than 2^31");
  checked_mul(checked_mul(c.L * c.D, c.N, "reserve size"), c.GH() + c.EH() + c.P,
              "reserve size");

  const char* names[] = {"weight_ih",    "weight_hh",    "bias_ih",        "bias_hh",
                         "weight_hr",    "ln_ih_weight", "ln_hh_weight", "ln_cell_weight",
                         "ln_cell_bias"};
  for (const auto l : c10::irange(c.L)) {
    for (const auto d : c10::irange(c.D)) {
      for (const auto k : c10::irange(c.per_dir)) {
        int kind = static_cast<int>(k);
        if (k >= c.ln_index()) {
          kind = 5 + static_cast<int>(k - c.ln_index());
        } else if (k >= 2 && !has_biases) {
          kind = 4;
        }
        std::vector<int64_t> shape;
        switch (kind) {
          case 0: shape = {c.GH(), c.layer_input(l)}; break;
          case 1: shape = {c.GH(), c.P}; break;
          case 2:
          case 3:
          case 5:
          case 6: shape = {c.GH()}; break;
          case 4: shape = {c.P, c.H}; break;
          default: shape = {c.H}; break;
        }
        const auto name = [&] {
          return std::string("weights[") + std::to_string((l * c.D + d) * c.per_dir + k) +
                 "] (" + names[kind] + "_l" + std::to_string(l) + (d == 1 ? "_reverse" : "") +
                 ")";
        };
        check_tensor(c.w(weights, l, d, k), name, shape, input);
      }
    }
  }
}

// hx, cx (None: zero initial states) and the dropout masks.
void check_states(const Config& c, const Tensor& input, const std::optional<Tensor>& hx,
                  const std::optional<Tensor>& cx, int64_t mode,
                  const std::optional<Tensor>& dropout_masks) {
  // hx (and for LSTM cx) may be None: zero initial states.
  const bool has_hx = hx.has_value() && hx->defined();
  const bool has_cx = cx.has_value() && cx->defined();
  if (has_hx) check_tensor(*hx, "hx", {c.L * c.D, c.B, c.P}, input);
  if (kernels::has_cell_state(static_cast<int>(mode))) {
    TORCH_CHECK(has_cx == has_hx, "fastcells: `cx` is required for LSTM when `hx` is given, "
                "and must be None when `hx` is None (zero initial states); got hx ",
                has_hx ? "given" : "None", " and cx ", has_cx ? "given" : "None");
    if (has_cx) check_tensor(*cx, "cx", {c.L * c.D, c.B, c.H}, input);
  } else {
    TORCH_CHECK(!cx.has_value() || !cx->defined(), "fastcells: `cx` must be None for ",
                kModeNames[mode]);
  }
  if (dropout_masks.has_value() && dropout_masks->defined() && c.L > 1) {
    std::vector<int64_t> shape{c.L - 1};
    if (c.packed) {
      shape.push_back(c.N);
    } else {
      shape.push_back(c.T);
      shape.push_back(c.B);
    }
    shape.push_back(c.D * c.P);
    check_tensor(*dropout_masks, "dropout_masks", shape, input);
  }
}

// Keep-previous weights per row of the states (Z = P, + H for the LSTM's c).
int64_t zone_width(const Config& c) {
  return c.P + (kernels::has_cell_state(static_cast<int>(c.mode)) ? c.H : 0);
}

// `recurrent_masks`, when given: (L*D, B, P), the CPU.
void check_rmasks(const Config& c, const Tensor& input, const std::optional<Tensor>& m) {
  if (!m.has_value() || !m->defined()) return;
  check_tensor(*m, "recurrent_masks", {c.L * c.D, c.B, c.P}, input);
  TORCH_CHECK(input.is_cpu(), "fastcells: recurrent dropout is computed by the CPU backend "
              "only; got `recurrent_masks` on ", input.device(), ", expected cpu");
}

// `zoneout`, when given: its shape (layout at the top of this file), the CPU.
void check_zoneout(const Config& c, const Tensor& input, const std::optional<Tensor>& zoneout) {
  if (!zoneout.has_value() || !zoneout->defined()) return;
  std::vector<int64_t> shape{c.L * c.D};
  if (c.packed) {
    shape.push_back(c.N);
  } else {
    shape.push_back(c.T);
    shape.push_back(c.B);
  }
  shape.push_back(zone_width(c));
  check_tensor(*zoneout, "zoneout", shape, input);
  TORCH_CHECK(!(c.ln() && kernels::has_cell_state(static_cast<int>(c.mode))),
              "fastcells: zoneout is not supported for mode ", c.mode, " (", kModeNames[c.mode],
              "): its h_t comes from LN(c_t); expected `zoneout` None");
  TORCH_CHECK(input.is_cpu(), "fastcells: zoneout is computed by the CPU backend only; got "
              "`zoneout` on ", input.device(), ", expected cpu");
}

// Arguments: FASTCELLS_RNN_STACK_ARGS (op_schema.h), the first ones of every op.
Config check_inputs(FASTCELLS_PARAMS(FASTCELLS_RNN_STACK_ARGS)) {
  Config c;
  TORCH_CHECK(kernels::is_valid_mode(mode), "fastcells: `mode` must be ", kernels::valid_modes(),
              ", got ", mode);
  TORCH_CHECK(num_layers >= 1, "fastcells: `num_layers` must be >= 1, got ", num_layers);
  // Each layer has at least two weights: this bounds every later product with L.
  TORCH_CHECK(num_layers <= static_cast<int64_t>(weights.size()),
              "fastcells: `num_layers` (", num_layers, ") is more than the ", weights.size(),
              " tensors in `weights` can hold (at least 2 per layer and direction)");
  TORCH_CHECK(proj_size >= 0, "fastcells: `proj_size` must be >= 0, got ", proj_size);
  TORCH_CHECK(proj_size == 0 || kernels::allows_proj(static_cast<int>(mode)),
              "fastcells: `proj_size` is only supported for LSTM, got mode ", kModeNames[mode]);
  c.mode = mode;
  c.L = num_layers;
  c.D = bidirectional ? 2 : 1;
  c.G = kernels::num_gates(static_cast<int>(mode));
  c.bias = has_biases;
  c.bf16 = input.scalar_type() == at::kBFloat16;
  c.norms = kernels::num_norms(static_cast<int>(mode));
  c.per_dir = 2 + (has_biases ? 2 : 0) + (proj_size > 0 ? 1 : 0) + c.norms;

  TORCH_CHECK(input.defined(), "fastcells: `input` is required");
  TORCH_CHECK(is_float_type(input.scalar_type()),
              "fastcells: `input` must be a floating point tensor (float32, float64, "
              "bfloat16 or float16), got ", input.scalar_type());
  TORCH_CHECK(input.is_cpu() || input.is_cuda(), "fastcells: `input` must be on CPU or CUDA, got ",
              input.device());
  // The cells without a CUDA kernel (cell_table.h: the reset-before GRU's two
  // dependent products per step, the LayerNorm cells' row statistics).
  TORCH_CHECK(input.is_cpu() || kernels::runs_on_cuda(static_cast<int>(mode)),
              "fastcells: mode ", mode, " (", kModeNames[mode], ") runs on the CPU only; "
              "`input` is on ", input.device(), ", expected cpu");
#ifndef WITH_CUDA
  TORCH_CHECK(input.is_cpu(),
              "fastcells: `input` is on ", input.device(),
              " but this build of fastcells has no CUDA backend (rebuild with FORCE_CUDA=1)");
#endif
  sequence_sizes(c, input, batch_sizes);
  TORCH_CHECK(c.T <= kIntMax && c.B <= kIntMax && c.N < (int64_t(1) << 40),
              "fastcells: sequence too long: T = ", c.T, ", B = ", c.B, ", N = ", c.N);

  check_weights(c, weights, input, mode, has_biases, proj_size);
  check_states(c, input, hx, cx, mode, dropout_masks);
  return c;
}

// The CPU backend's run-time settings (csrc/cpu/settings.h), read from the
// environment once, when the extension loads. An unparsable or negative
// FASTCELLS_BARRIER_SPIN_US keeps the default.
cpu::Settings read_cpu_settings() {
  cpu::Settings s;
  if (const char* v = std::getenv("FASTCELLS_HUGE_PAGES")) s.huge_pages = v[0] != '0';
  if (const char* v = std::getenv("FASTCELLS_BARRIER_SPIN_US"); v != nullptr && *v != '\0') {
    char* end = nullptr;
    const long long us = std::strtoll(v, &end, 10);
    if (end != v && us >= 0) s.barrier_spin_us = static_cast<int64_t>(us);
  }
  return s;
}

[[maybe_unused]] const bool kCpuSettingsRead = (cpu::settings() = read_cpu_settings(), true);

// FASTCELLS_POISON=1 fills every buffer the op allocates with NaN before use,
// so a kernel that reads memory it did not write shows up as NaN in tests.
bool poison_enabled() {
  const char* v = std::getenv("FASTCELLS_POISON");
  return v != nullptr && v[0] == '1';
}

// CPU tensors are created without a trip through the dispatcher: at the
// forecasting sizes an op call allocates a dozen of them and the dispatched
// at::empty costs more than the arithmetic they hold. Large ones are advised
// to use huge pages before anything touches them (csrc/cpu/memory_cpu.h).
Tensor alloc(at::IntArrayRef sizes, const at::TensorOptions& opts, bool poison) {
  Tensor t;
  if (opts.device().is_cpu()) {
    t = at::detail::empty_cpu(sizes, opts.dtype().toScalarType(), false, std::nullopt);
    cpu::advise_huge_pages(t.data_ptr(), t.nbytes());
  } else {
    t = at::empty(sizes, opts);
  }
  if (poison) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

// Rows [row0, row0 + rows) of the (.., cols) matrix stored contiguously from
// element `offset` of t (1-D or 2-D, contiguous), as a (rows, cols) tensor.
// On the CPU the result is a non-owning view made without the dispatcher
// (narrow + view cost more than a small layer's arithmetic); it is only used
// inside the op, while t is alive, and never returned.
Tensor rows_of(const Tensor& t, int64_t offset, int64_t row0, int64_t rows, int64_t cols) {
  const int64_t start = offset + row0 * cols;
  TORCH_INTERNAL_ASSERT(t.is_contiguous() && start + rows * cols <= t.numel(),
                        "fastcells: rows_of outside its tensor");
  if (t.is_cpu()) {
    char* base = static_cast<char*>(t.data_ptr()) + start * t.element_size();
    return at::from_blob(base, {rows, cols}, t.options());
  }
  return t.view({-1}).narrow(0, start, rows * cols).view({rows, cols});
}

// `t` as a dense, contiguous tensor of the compute dtype, which is what the
// kernels' raw pointers assume: a copy for other dtypes, strided, expanded or
// negated views (is_neg: the sign is a flag that raw reads would not see).
Tensor to_compute(const Tensor& t, at::ScalarType cd) {
  TORCH_CHECK(t.layout() == at::kStrided, "fastcells: tensor arguments must be dense (strided), "
              "got a ", t.layout(), " tensor");
  if (t.scalar_type() == cd && t.is_contiguous() && !t.is_neg()) return t;
  return t.resolve_neg().to(cd).contiguous();
}

std::optional<Tensor> to_compute(const std::optional<Tensor>& t, at::ScalarType cd) {
  if (!t.has_value() || !t->defined()) return std::nullopt;
  return to_compute(*t, cd);
}

// An initial state in the compute dtype: `t`, or zeros of `sizes` when None.
Tensor state_or_zeros(const std::optional<Tensor>& t, at::IntArrayRef sizes,
                      const at::TensorOptions& opts, at::ScalarType cd) {
  if (t.has_value() && t->defined()) return to_compute(*t, cd);
  return alloc(sizes, opts, false).zero_();
}

// (h0, c0) in the compute dtype, zeros where hx/cx are None; c0 LSTM only.
std::pair<Tensor, std::optional<Tensor>> initial_states(const Config& c,
                                                        const std::optional<Tensor>& hx,
                                                        const std::optional<Tensor>& cx,
                                                        const at::TensorOptions& opts,
                                                        at::ScalarType cd) {
  Tensor h0 = state_or_zeros(hx, {c.L * c.D, c.B, c.P}, opts, cd);
  if (!kernels::has_cell_state(static_cast<int>(c.mode))) return {h0, std::nullopt};
  return {h0, state_or_zeros(cx, {c.L * c.D, c.B, c.H}, opts, cd)};
}

template <typename T>
const T* ptr_or_null(const std::optional<Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

// FASTCELLS_CUDA_RECURRENT: the CUDA loop to force (auto: the backend's own
// choice). Read at each CUDA call, so that tests and benchmarks may switch it.
kernels::CudaLoop cuda_loop_choice() {
  using kernels::CudaLoop;
  const char* env = std::getenv("FASTCELLS_CUDA_RECURRENT");
  if (env == nullptr || env[0] == '\0' || std::strcmp(env, "auto") == 0) return CudaLoop::kAuto;
  if (std::strcmp(env, "persistent") == 0) return CudaLoop::kPersistent;
  if (std::strcmp(env, "persistent_global") == 0) return CudaLoop::kPersistentGlobal;
  if (std::strcmp(env, "stepwise") == 0) return CudaLoop::kStepwise;
  TORCH_CHECK(false, "fastcells: FASTCELLS_CUDA_RECURRENT must be auto, persistent, "
              "persistent_global or stepwise, got '", env, "'");
}

// Device copies of batch_sizes / offsets for a GPU backend (packed only),
// and the CUDA loop to run.
struct DeviceSchedule {
  Tensor batch_sizes, offsets;
  kernels::CudaLoop cuda_loop = kernels::CudaLoop::kAuto;
};

DeviceSchedule device_schedule(const Config& c, const at::Device& dev) {
  DeviceSchedule s;
  if (dev.is_cuda()) s.cuda_loop = cuda_loop_choice();
  if (dev.is_cuda() && c.packed && c.T > 0) {
    auto opts = at::TensorOptions().dtype(at::kLong);
    s.batch_sizes = at::tensor(c.batch_sizes, opts).to(dev);
    s.offsets = at::tensor(c.offsets, opts).to(dev);
  }
  return s;
}

#ifdef WITH_CUDA
// cuda::GemmFn of the stepwise CUDA loop: torch.mm (cuBLAS) on views of the
// loop's buffers, on the current stream and device (the op's device guard),
// under torch's own settings (TF32 follows torch.backends.cuda.matmul.allow_tf32).
template <typename T>
void aten_gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb,
               bool trans_b, bool accumulate, T* C, int64_t ldc) {
  const auto opts = at::TensorOptions()
                        .dtype(c10::CppTypeToScalarType<T>::value)
                        .device(at::kCUDA, c10::cuda::current_device());
  const Tensor a = at::from_blob(const_cast<T*>(A), {M, K}, {lda, 1}, opts);
  const Tensor b = trans_b ? at::from_blob(const_cast<T*>(B), {N, K}, {ldb, 1}, opts).t()
                           : at::from_blob(const_cast<T*>(B), {K, N}, {ldb, 1}, opts);
  Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, opts);
  if (accumulate) {
    c.addmm_(a, b);
  } else {
    at::mm_out(c, a, b);
  }
}
#endif

#ifdef WITH_CUDA
// Runs one CUDA loop (`run`: cuda::recurrent_forward or _backward) with a
// workspace of `bytes(p)` bytes from torch's caching allocator, on the
// current stream.
template <typename T, typename Params, typename Bytes, typename Run>
void run_cuda(const Params& p, const at::Device& dev, Bytes bytes, Run run) {
  Tensor ws = at::empty({static_cast<int64_t>(bytes(p))},
                        at::TensorOptions().dtype(at::kByte).device(dev));
  run(p, ws.data_ptr(), at::cuda::getCurrentCUDAStream().stream(), &aten_gemm<T>);
}
#endif

template <typename T>
void run_forward(const kernels::LayerForwardParams<T>& p, const at::Device& dev,
                 cpu::ForwardPack<T>* cpu_keep = nullptr, bool bf16 = false) {
  if (dev.is_cpu()) {
    cpu::recurrent_forward<T>(p, cpu_keep, bf16);
    return;
  }
#ifdef WITH_CUDA
  run_cuda<T>(p, dev, &cuda::forward_workspace_bytes<T>, &cuda::recurrent_forward<T>);
#else
  TORCH_CHECK(false, "fastcells: no CUDA backend in this build");
#endif
}

// The schedule of one layer and direction: T steps from `batch_sizes` and
// `row_offsets` (host), the device copies when `sched` holds them.
void fill_schedule(kernels::LayerSchedule& p, const Config& c, int64_t T,
                   const int64_t* batch_sizes, const int64_t* row_offsets,
                   const DeviceSchedule& sched, bool reverse) {
  p.mode = static_cast<int>(c.mode);
  p.T = static_cast<int>(T);
  p.B = static_cast<int>(c.B);
  p.H = static_cast<int>(c.H);
  p.P = static_cast<int>(c.P);
  p.batch_sizes = batch_sizes;
  p.row_offsets = row_offsets;
  p.batch_sizes_dev = sched.batch_sizes.defined() ? sched.batch_sizes.data_ptr<int64_t>() : nullptr;
  p.row_offsets_dev = sched.offsets.defined() ? sched.offsets.data_ptr<int64_t>() : nullptr;
  p.reverse = reverse;
  p.cuda_loop = sched.cuda_loop;
}

template <typename T>
void run_backward(const kernels::LayerBackwardParams<T>& p, const at::Device& dev,
                  bool bf16 = false) {
  if (dev.is_cpu()) {
    cpu::recurrent_backward<T>(p, bf16);
    return;
  }
#ifdef WITH_CUDA
  run_cuda<T>(p, dev, &cuda::backward_workspace_bytes<T>, &cuda::recurrent_backward<T>);
#else
  TORCH_CHECK(false, "fastcells: no CUDA backend in this build");
#endif
}

// Input of layer l (N, I_l): the packed input, or the previous layer's
// output with its dropout mask applied.
Tensor layer_input(const Config& c, int64_t l, const Tensor& x, const Tensor& reserve,
                   const std::optional<Tensor>& masks) {
  if (l == 0) return x;
  Tensor y = rows_of(reserve, c.inter_offset(l - 1), 0, c.N, c.D * c.P);
  if (masks.has_value()) return y * masks->select(0, l - 1).reshape({c.N, c.D * c.P});
  return y;
}

// ---------------------------------------------------------------- GEMMs
// The whole-sequence products. On the CPU they run the backend's own blocked
// kernel directly on the data (cpu::matmul): at forecasting sizes the
// dispatcher and temporaries of at::mm cost more than the arithmetic, and its
// BLAS gives different bits for different thread counts. Elsewhere they are
// ATen calls. All matrices are 2-D with unit column stride.

// out (M, N) = [out +] op(a) op(b); on the CPU optionally bias (N) + op(a) op(b).
// On the CPU, `keep_b` (optional) keeps op(b) packed for later products with
// the same b (see cpu::matmul); `bf16` as in cpu::matmul.
template <typename T>
void matmul(const Tensor& out, const Tensor& a, bool trans_a, const Tensor& b, bool trans_b,
            bool accumulate, const T* cpu_bias = nullptr,
            cpu::PackedStore<T>* keep_b = nullptr, bool bf16 = false) {
  if (out.is_cpu()) {
    const int64_t K = trans_a ? a.size(0) : a.size(1);
    cpu::matmul<T>(out.size(0), out.size(1), K, a.data_ptr<T>(), trans_a ? 1 : a.stride(0),
                   trans_a ? a.stride(0) : 1, b.data_ptr<T>(), b.stride(0), trans_b,
                   out.data_ptr<T>(), out.stride(0), accumulate, cpu_bias, keep_b, bf16);
    return;
  }
  const Tensor A = trans_a ? a.t() : a;
  const Tensor B = trans_b ? b.t() : b;
  if (accumulate) {
    const_cast<Tensor&>(out).addmm_(A, B);
  } else {
    at::mm_out(const_cast<Tensor&>(out), A, B);
  }
}

// The biases that enter the x side: b_ih + b_hh, where the GRU keeps b_hn
// out (it sits inside r * (h W_hn^T + b_hn)): b_hr and b_hz fold in.
int64_t folded_bias_size(const Config& c) {
  return kernels::base_cell(static_cast<int>(c.mode)) == kernels::kGRU ? 2 * c.H : c.GH();
}

template <typename T>
std::vector<T> folded_bias(const Config& c, const Tensor& b_ih, const Tensor& b_hh) {
  std::vector<T> bias(b_ih.data_ptr<T>(), b_ih.data_ptr<T>() + c.GH());
  const T* bh = b_hh.data_ptr<T>();
  for (int64_t j = 0; j < folded_bias_size(c); ++j) bias[j] += bh[j];
  return bias;
}

// x W_ih^T + folded biases, written into `gates` (N, G*H).
// `keep` as in matmul (W_ih^T packed once for all time chunks).
template <typename T>
void input_projection(const Config& c, const Tensor& gates, const Tensor& x, const Tensor& w_ih,
                      const Tensor* b_ih, const Tensor* b_hh,
                      cpu::PackedStore<T>* keep = nullptr) {
  if (!c.bias) {
    matmul<T>(gates, x, false, w_ih, true, false, nullptr, keep, c.bf16);
    return;
  }
  const int64_t folded = folded_bias_size(c);
  if (gates.is_cpu()) {
    const std::vector<T> bias = folded_bias<T>(c, *b_ih, *b_hh);
    matmul<T>(gates, x, false, w_ih, true, false, bias.data(), keep, c.bf16);  // starts from bias
    return;
  }
  Tensor bias = b_ih->clone();
  bias.narrow(0, 0, folded).add_(b_hh->narrow(0, 0, folded));
  at::addmm_out(const_cast<Tensor&>(gates), bias, x, w_ih.t());
}

// Grains of the LayerNorm cells' whole-sequence passes (rows of G*H values,
// columns summed over all rows).
constexpr int64_t kLnGrainRows = 256;
constexpr int64_t kLnGrainCols = 64;

// The LayerNorm cells' input side (CPU): the raw x W_ih^T into `raw` (rows,
// G*H; backward reads it), then gates = LN(raw; ln_ih) + folded biases.
template <typename T>
void ln_input_projection(const Config& c, const Tensor& gates, const Tensor& raw,
                         const Tensor& x, const Tensor& w_ih, const Tensor& ln_ih,
                         const Tensor* b_ih, const Tensor* b_hh, cpu::PackedStore<T>* keep) {
  matmul<T>(raw, x, false, w_ih, true, false, nullptr, keep, c.bf16);
  const std::vector<T> bias = c.bias ? folded_bias<T>(c, *b_ih, *b_hh) : std::vector<T>();
  std::vector<kernels::RowStats<T>> st(raw.size(0));
  at::parallel_for(0, raw.size(0), kLnGrainRows, [&](int64_t r0, int64_t r1) {
    kernels::ln_rows_forward<T>(r0, r1, c.GH(), raw.data_ptr<T>(), ln_ih.data_ptr<T>(),
                                c.bias ? bias.data() : nullptr, st.data(), gates.data_ptr<T>());
  });
}

// The gradients of y = LN(a; g) + b over the N rows of a (N, n), from dy:
// dg and db (optional; both overwritten) and, with `da`, dL/da (which may be
// dy: in place, after the sums have read it).
template <typename T>
void ln_backward(int64_t N, int64_t n, const T* a, const T* g, T* dy, T* dg, T* db, T* da) {
  std::vector<kernels::RowStats<T>> st(N);
  at::parallel_for(0, N, kLnGrainRows, [&](int64_t r0, int64_t r1) {
    kernels::ln_rows_forward<T>(r0, r1, n, a, g, nullptr, st.data(), static_cast<T*>(nullptr));
  });
  std::fill(dg, dg + n, T(0));
  if (db != nullptr) std::fill(db, db + n, T(0));
  at::parallel_for(0, n, kLnGrainCols, [&](int64_t j0, int64_t j1) {
    kernels::ln_cols_grads<T>(N, n, j0, j1, a, st.data(), dy, dg, db);
  });
  if (da == nullptr) return;
  at::parallel_for(0, N, kLnGrainRows, [&](int64_t r0, int64_t r1) {
    kernels::ln_rows_backward<T>(r0, r1, n, a, st.data(), g, dy, da);
  });
}

// Whether a CPU inference call runs the input product inside the time loop,
// one step at a time (LayerForwardParams::x), instead of as one product over
// the whole sequence before it: each step's gates are then written, updated
// and read while they are in the cache, where the whole-sequence product
// streams all of them through memory three times. That pays once the gates
// of the sequence outgrow the L2 cache (4 times row_split_bytes, isa.h) and
// each step has rows enough for the product kernel; a small sequence is
// faster as one product. Measured on a 2-core AVX-512 host, no_grad forward,
// both forms in separate processes, alternating: 1.04-1.18x from 3.7 MB of
// gates (LSTM 112,8,16,256 1.08x, 168,64,16,64 1.14x, 112,256,16,32 1.14x,
// 64,128,256,512 1.07x; GRU and RNN alike; level where threads split hidden
// units, batch 8 hidden 512); 0.4-0.8x below 1 MB or at batch 1-4, measured
// when a split of units still added a barrier per step (a product call per
// step for a few rows). Training calls keep the whole-sequence product: with
// the per-step product writing every step's gates into the reserve (same
// results, bit for bit), forward+backward on the same host was 1.0-1.1x for
// the LSTM (168,64,16,64 1.05-1.10x, hidden 40 level), 0.74x at 112,8,16,256,
// and a third of the GRU processes at 168,64,16,64 ran 25-30% slower.
bool input_product_per_step(const Config& c, bool keep, bool cpu) {
  if (!cpu || keep || c.ln() || c.B < 8) return false;
  return c.N * c.GH() * static_cast<int64_t>(sizeof(float)) >= 4 * cpu::row_split_bytes();
}

// Time chunks [t0, t1) of one direction, in processing order. With `keep`
// (training) one chunk: the gates of every step are saved anyway; with the
// input product per step one chunk too (the scratch holds one step).
// Otherwise (inference on the CPU) chunks of about kChunkElems gate values,
// so the scratch stays small whatever T is.
std::vector<std::pair<int64_t, int64_t>> time_chunks(const Config& c, bool keep, bool reverse,
                                                     bool cpu) {
  constexpr int64_t kChunkElems = int64_t(1) << 20;
  const bool whole = keep || !cpu || input_product_per_step(c, keep, cpu);
  const int64_t step = whole ? std::max<int64_t>(c.T, 1)
                                      : std::max<int64_t>(1, kChunkElems / std::max<int64_t>(1, c.B * c.GH()));
  std::vector<std::pair<int64_t, int64_t>> chunks;
  for (int64_t t0 = 0; t0 < c.T; t0 += step) chunks.emplace_back(t0, std::min(c.T, t0 + step));
  if (chunks.empty()) chunks.emplace_back(0, 0);  // T = 0: the states pass through
  if (reverse) std::reverse(chunks.begin(), chunks.end());
  return chunks;
}

// The CPU packs of layer l, direction d: from the weight cache when it holds
// these weights (`hit`), else fresh ones (stored by publish_packs once
// filled), or a private set when the weights are not to be cached (`ws`
// then empty). `src`: the weights as the op received them (before any
// widening to the compute type).
template <typename T>
std::shared_ptr<LayerPacks<T>> layer_packs(const Config& c, at::TensorList src, int64_t l,
                                           int64_t d, std::vector<const Tensor*>* ws, bool* hit) {
  const LayerWeights lw = layer_weights(c, src, l, d);
  ws->assign({lw.w_ih, lw.w_hh});
  if (lw.w_hr != nullptr) ws->push_back(lw.w_hr);
  auto packs = find_packs<T>(*ws, c.bf16, hit);
  if (packs) return packs;
  ws->clear();  // not cacheable: nothing to publish
  return std::make_shared<LayerPacks<T>>();
}

// A time chunk of one direction: steps [t0, t1), its first row and row count,
// and the steps' row offsets counted from row0.
struct Chunk {
  int64_t t0, t1, row0, rows;
  std::vector<int64_t> rel_offsets;
};

Chunk chunk_of(const Config& c, std::pair<int64_t, int64_t> steps) {
  Chunk k{steps.first, steps.second, 0, 0, {}};
  if (k.t1 > k.t0) {
    k.row0 = c.offsets[k.t0];
    k.rows = c.offsets[k.t1 - 1] + c.batch_sizes[k.t1 - 1] - k.row0;
  }
  k.rel_offsets.assign(c.offsets.begin() + k.t0, c.offsets.begin() + k.t1);
  for (auto& o : k.rel_offsets) o -= k.row0;
  return k;
}

// What both passes of every layer and direction read besides the weights:
// the initial states, the per-step options and the schedule.
struct LayerIO {
  const Tensor& h0;
  const std::optional<Tensor>& c0;
  const std::optional<Tensor>& zone;
  const std::optional<Tensor>& rmasks;
  const DeviceSchedule& sched;
};

// The forward's own: the final states, and where gates and outputs go.
struct ForwardIO : LayerIO {
  const Tensor& hy;
  const Tensor& cy;
  bool keep;  // training: gates and outputs go to the reserve
};

// The loop's params for chunk k of layer l, direction d: gates and extra of
// the chunk (one step's with the input product per step), `out` the layer's
// output. Later chunks start from the state the previous one left in hy/cy
// (the CPU backend reads h0 before it writes hy).
template <typename T>
kernels::LayerForwardParams<T> forward_params(const Config& c, const LayerWeights& lw, int64_t l,
                                              int64_t d, const Chunk& k, const ForwardIO& io,
                                              T* gates, T* extra, T* out, bool first_chunk) {
  const int64_t idx = l * c.D + d;
  const bool lstm = kernels::has_cell_state(static_cast<int>(c.mode));
  const bool gru = kernels::base_cell(static_cast<int>(c.mode)) == kernels::kGRU;
  kernels::LayerForwardParams<T> p{};
  // (Device schedules only exist for a single whole-sequence chunk.)
  fill_schedule(p, c, k.t1 - k.t0, c.batch_sizes.data() + k.t0, k.rel_offsets.data(), io.sched,
                d == 1);
  p.gates = gates;
  p.extra = extra;
  p.save = io.keep;
  p.ld_zone = zone_width(c);
  p.zone = io.zone ? io.zone->data_ptr<T>() + (idx * c.N + k.row0) * p.ld_zone : nullptr;
  p.rmask = io.rmasks ? io.rmasks->data_ptr<T>() + idx * c.B * c.P : nullptr;
  p.w_hh = lw.w_hh->data_ptr<T>();
  p.b_hn = gru && lw.b_hh ? lw.b_hh->data_ptr<T>() + 2 * c.H : nullptr;
  p.w_hr = ptr_or_null<T>(lw.w_hr);
  p.ln_hh = ptr_or_null<T>(lw.ln_hh);
  p.ln_c_w = ptr_or_null<T>(lw.ln_c_w);
  p.ln_c_b = ptr_or_null<T>(lw.ln_c_b);
  p.ln_rec = c.ln() ? extra + k.rows * c.H : nullptr;  // (extra's layout at the top)
  p.out = out + k.row0 * c.D * c.P + d * c.P;
  p.ld_out = c.D * c.P;
  p.h0 = (first_chunk ? io.h0.data_ptr<T>() : io.hy.data_ptr<T>()) + idx * c.B * c.P;
  p.hy = io.hy.data_ptr<T>() + idx * c.B * c.P;
  if (lstm) {
    p.c0 = (first_chunk ? io.c0->data_ptr<T>() : io.cy.data_ptr<T>()) + idx * c.B * c.H;
    p.cy = io.cy.data_ptr<T>() + idx * c.B * c.H;
  }
  return p;
}

// Layer l, direction d: per time chunk the input side (a whole-chunk
// product, or the loop's own per step), then the backend's loop. With
// io.keep, gates and extra go to `reserve`; otherwise to `scratch`.
template <typename T>
void forward_layer(const Config& c, const LayerWeights& lw, at::TensorList src_w, int64_t l,
                   int64_t d, const Tensor& xl, const Tensor& out_l, const ForwardIO& io,
                   const Tensor& reserve, const Tensor& scratch, bool step_x) {
  const bool cpu = xl.is_cpu();
  const int64_t idx = l * c.D + d;
  // CPU: the weights are packed by the first chunk and reused by the rest,
  // and by later calls through the weight cache.
  std::vector<const Tensor*> ws;
  bool hit = false;
  const auto packs = cpu ? layer_packs<T>(c, src_w, l, d, &ws, &hit)
                         : std::make_shared<LayerPacks<T>>();
  const std::vector<T> x_bias =
      step_x && c.bias ? folded_bias<T>(c, *lw.b_ih, *lw.b_hh) : std::vector<T>();
  bool first_chunk = true;
  for (const auto& steps : time_chunks(c, io.keep, d == 1, cpu)) {
    const Chunk k = chunk_of(c, steps);
    const int64_t scratch_rows = step_x ? c.B : k.rows;
    const Tensor gates = io.keep ? rows_of(reserve, c.gates_offset(idx), 0, c.N, c.GH())
                                 : rows_of(scratch, 0, 0, scratch_rows, c.GH());
    T* extra = nullptr;
    if (c.EH() > 0)
      extra = io.keep ? reserve.data_ptr<T>() + c.extra_offset(idx)
                      : scratch.data_ptr<T>() + scratch_rows * c.GH();
    const Tensor x_rows = rows_of(xl, 0, k.row0, k.rows, xl.size(1));
    if (c.ln()) {  // the raw x W_ih^T: extra's last block
      const Tensor raw =
          at::from_blob(extra + k.rows * (c.H + c.GH()), {k.rows, c.GH()}, xl.options());
      ln_input_projection<T>(c, gates, raw, x_rows, *lw.w_ih, *lw.ln_ih, lw.b_ih, lw.b_hh,
                             &packs->fwd.w_ih_t);
    } else if (!step_x) {
      input_projection<T>(c, gates, x_rows, *lw.w_ih, lw.b_ih, lw.b_hh, &packs->fwd.w_ih_t);
    }
    auto p = forward_params<T>(c, lw, l, d, k, io, gates.data_ptr<T>(), extra,
                               out_l.data_ptr<T>(), first_chunk);
    if (step_x) {
      p.x = x_rows.data_ptr<T>();
      p.ld_x = xl.size(1);
      p.I = static_cast<int>(xl.size(1));
      p.w_ih = lw.w_ih->data_ptr<T>();
      p.x_bias = c.bias ? x_bias.data() : nullptr;
    }
    run_forward<T>(p, xl.device(), &packs->fwd, c.bf16);
    first_chunk = false;
  }
  if (cpu && !hit && !ws.empty()) publish_packs<T>(ws, c.bf16, packs);
}

// Forward of the whole stack. With `keep`, gates and intermediate outputs go
// to `reserve` (layout at the top of this file); without it, to scratch that
// is reused across layers, directions and time chunks.
template <typename T>
void forward_stack(const Config& c, const Tensor& x, const std::vector<Tensor>& w,
                   at::TensorList src_w, const Tensor& h0, const std::optional<Tensor>& c0,
                   const std::optional<Tensor>& masks, const Tensor& output, const Tensor& hy,
                   const Tensor& cy, const Tensor& reserve, const DeviceSchedule& sched,
                   bool keep, bool poison, const std::optional<Tensor>& zone,
                   const std::optional<Tensor>& rmasks) {
  const bool cpu = x.is_cpu();
  const bool step_x = input_product_per_step(c, keep, cpu);
  const auto opts = x.options();
  // Inference scratch: two layer outputs (ping-pong) and one gate block (of
  // one step with the input product per step).
  Tensor inter[2];
  Tensor scratch;
  if (!keep) {
    for (int k = 0; k < std::min<int64_t>(2, c.L - 1); ++k)
      inter[k] = alloc({c.N, c.D * c.P}, opts, poison);
    int64_t rows = 0;
    for (const auto& steps : time_chunks(c, keep, false, cpu))
      rows = std::max(rows, chunk_of(c, steps).rows);
    if (step_x) rows = c.B;
    scratch = alloc({rows * (c.GH() + c.EH())}, opts, poison);
  }
  const ForwardIO io{{h0, c0, zone, rmasks, sched}, hy, cy, keep};
  Tensor prev_out;  // output of layer l-1 (N, D*P)
  for (const auto l : c10::irange(c.L)) {
    Tensor xl = x;
    if (l > 0) {
      xl = masks.has_value() ? prev_out * masks->select(0, l - 1).reshape({c.N, c.D * c.P})
                             : prev_out;
    }
    const Tensor out_l = keep ? rows_of(reserve, c.inter_offset(l), 0, c.N, c.D * c.P)
                              : (l < c.L - 1 ? inter[l % 2] : output);
    for (const auto d : c10::irange(c.D))
      forward_layer<T>(c, layer_weights(c, w, l, d), src_w, l, d, xl, out_l, io, reserve,
                       scratch, step_x);
    prev_out = out_l;
  }
}

// The arguments both ops start from, in the compute type: the input as
// (N, I) rows, the weights, the initial states (zeros where absent), the
// inter-layer dropout masks where they apply (L > 1), the zoneout weights
// ((L*D, T, B, Z) or (L*D, N, Z)) and the recurrent dropout masks.
struct StackArgs {
  at::TensorOptions opts;
  Tensor x;
  std::vector<Tensor> w;
  Tensor h0;
  std::optional<Tensor> c0, masks, zone, rmasks;
};

StackArgs stack_args(const Config& c, const Tensor& input, at::TensorList weights,
                     const std::optional<Tensor>& hx, const std::optional<Tensor>& cx,
                     const std::optional<Tensor>& dropout_masks,
                     const std::optional<Tensor>& zoneout,
                     const std::optional<Tensor>& recurrent_masks, at::ScalarType cd) {
  StackArgs a;
  a.opts = input.options().dtype(cd);
  a.x = to_compute(input, cd).view({c.N, c.I});
  a.w.reserve(weights.size());
  for (const auto& t : weights) a.w.push_back(to_compute(t, cd));
  std::tie(a.h0, a.c0) = initial_states(c, hx, cx, a.opts, cd);
  const bool use_masks = dropout_masks.has_value() && dropout_masks->defined() && c.L > 1;
  if (use_masks) a.masks = to_compute(dropout_masks, cd);
  a.zone = to_compute(zoneout, cd);
  a.rmasks = to_compute(recurrent_masks, cd);
  return a;
}

// Arguments: FASTCELLS_RNN_FORWARD_ARGS (op_schema.h).
ForwardResult rnn_forward(FASTCELLS_PARAMS(FASTCELLS_RNN_FORWARD_ARGS)) {
  const Config c = check_inputs(FASTCELLS_NAMES(FASTCELLS_RNN_STACK_ARGS));
  check_zoneout(c, input, zoneout);
  check_rmasks(c, input, recurrent_masks);
  // The ATen calls below are internal arithmetic of a kernel that autograd
  // sees as one op: keep them off the autograd and tracing layers.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
#ifdef WITH_CUDA
  const c10::OptionalDeviceGuard guard(input.device());
#endif
  const bool poison = poison_enabled();
  const at::ScalarType cd = compute_type(input.scalar_type());
  const StackArgs a = stack_args(c, input, weights, hx, cx, dropout_masks, zoneout,
                                 recurrent_masks, cd);
  const auto& opts = a.opts;

  Tensor reserve = alloc({need_reserve ? c.reserve_size() : 0}, opts, poison);
  Tensor output = alloc({c.N, c.D * c.P}, opts, poison);
  Tensor hy = alloc({c.L * c.D, c.B, c.P}, opts, poison);
  const bool cell_state = kernels::has_cell_state(static_cast<int>(c.mode));
  Tensor cy = alloc({cell_state ? c.L * c.D : 0, c.B, c.H}, opts, poison);
  if (!cell_state) cy = cy.view({0});
  const DeviceSchedule sched = device_schedule(c, input.device());

  AT_DISPATCH_FLOATING_TYPES(cd, "fastcells::rnn_forward", [&] {
    forward_stack<scalar_t>(c, a.x, a.w, weights, a.h0, a.c0, a.masks, output, hy, cy, reserve,
                            sched, need_reserve, poison, a.zone, a.rmasks);
  });
  if (need_reserve && output.numel() > 0) {
    // The last layer ran into the reserve; the caller gets its own copy.
    const Tensor last = rows_of(reserve, c.inter_offset(c.L - 1), 0, c.N, c.D * c.P);
    if (output.is_cpu()) {
      std::memcpy(output.data_ptr(), last.data_ptr(), output.nbytes());
    } else {
      output.copy_(last);
    }
  }

  if (!c.packed) output = output.view({c.T, c.B, c.D * c.P});
  const auto out_t = input.scalar_type();
  if (out_t == cd) return {output, hy, cy, reserve};
  return {output.to(out_t), hy.to(out_t), cy.to(out_t), reserve};
}


// The backward's scratch, reused by every layer and direction. r_all: a
// projection's r_t, or the reset-before GRU's r * h_{t-1} (W_hn's operand);
// hprev_m: with recurrent dropout, W_hh's gradient operand h_{t-1} * m; the
// LayerNorm cells' gradients w.r.t. the raw recurrent products (W_hh's
// operand) and, LSTM_LN, w.r.t. LN(c_t).
struct BackwardScratch {
  Tensor dgx, dgh, dln_rec, dln_c, hprev, hprev_m, r_all, dh_all;
};

BackwardScratch backward_scratch(const Config& c, const at::TensorOptions& opts, bool poison,
                                 bool rmasks) {
  const int mode = static_cast<int>(c.mode);
  const bool gru = kernels::base_cell(mode) == kernels::kGRU;
  const bool proj = c.P != c.H, rb = c.mode == kernels::kGRU_RESET_BEFORE;
  BackwardScratch s;
  s.dgx = alloc({c.N, c.GH()}, opts, poison);
  s.dgh = gru ? alloc({c.N, c.GH()}, opts, poison) : s.dgx;
  s.dln_rec = c.ln() ? alloc({c.N, c.GH()}, opts, poison) : s.dgh;
  if (c.ln() && kernels::has_cell_state(mode)) s.dln_c = alloc({c.N, c.H}, opts, poison);
  s.hprev = alloc({c.N, c.P}, opts, poison);
  s.hprev_m = rmasks ? alloc({c.N, c.P}, opts, poison) : s.hprev;
  if (proj || rb) s.r_all = alloc({c.N, c.H}, opts, poison);
  if (proj) s.dh_all = alloc({c.N, c.P}, opts, poison);
  return s;
}

// The backward's own, besides the scratch and the gradient w.r.t. the
// layer's output: the saved reserve, the incoming state gradients and the
// state gradients it writes.
struct BackwardIO : LayerIO {
  const Tensor& reserve;
  const std::optional<Tensor>& grad_hy;
  const std::optional<Tensor>& grad_cy;
  const std::optional<Tensor>& grad_reserve;
  const Tensor& dhx;
  const Tensor& dcx;
};

// The loop's params for layer l, direction d; `go` the gradient w.r.t. the
// layer's output (N, D*P) or none; db_x, db_h where the loop sums the bias
// gradients (else null).
template <typename T>
kernels::LayerBackwardParams<T> backward_params(const Config& c, const LayerWeights& lw,
                                                int64_t l, int64_t d, const BackwardIO& io,
                                                const BackwardScratch& s,
                                                const std::optional<Tensor>& go, T* db_x,
                                                T* db_h) {
  const int64_t idx = l * c.D + d;
  const bool lstm = kernels::has_cell_state(static_cast<int>(c.mode));
  const bool gru = kernels::base_cell(static_cast<int>(c.mode)) == kernels::kGRU;
  kernels::LayerBackwardParams<T> p{};
  fill_schedule(p, c, c.T, c.batch_sizes.data(), c.offsets.data(), io.sched, d == 1);
  p.gates = io.reserve.data_ptr<T>() + c.gates_offset(idx);
  p.extra = c.EH() > 0 ? io.reserve.data_ptr<T>() + c.extra_offset(idx) : nullptr;
  p.grad_extra = lstm && io.grad_reserve.has_value()
                     ? io.grad_reserve->data_ptr<T>() + c.extra_offset(idx)
                     : nullptr;
  p.ld_zone = zone_width(c);
  p.zone = io.zone ? io.zone->data_ptr<T>() + idx * c.N * p.ld_zone : nullptr;
  p.rmask = io.rmasks ? io.rmasks->data_ptr<T>() + idx * c.B * c.P : nullptr;
  p.h_prev_m = io.rmasks ? s.hprev_m.data_ptr<T>() : nullptr;
  p.out = io.reserve.data_ptr<T>() + c.inter_offset(l) + d * c.P;
  p.ld_out = c.D * c.P;
  p.h0 = io.h0.data_ptr<T>() + idx * c.B * c.P;
  p.c0 = lstm ? io.c0->data_ptr<T>() + idx * c.B * c.H : nullptr;
  p.w_hh = lw.w_hh->data_ptr<T>();
  p.w_hr = ptr_or_null<T>(lw.w_hr);
  p.ln_hh = ptr_or_null<T>(lw.ln_hh);
  p.ln_c_w = ptr_or_null<T>(lw.ln_c_w);
  p.ln_c_b = ptr_or_null<T>(lw.ln_c_b);
  if (c.ln()) {  // blocks after the (N, H) one of extra (layout at the top)
    p.ln_rec = p.extra + c.N * c.H;
    p.dln_rec = s.dln_rec.data_ptr<T>();
    p.dln_c = lstm ? s.dln_c.data_ptr<T>() : nullptr;
  }
  p.grad_out = go.has_value() ? go->data_ptr<T>() + d * c.P : nullptr;
  p.ld_gout = c.D * c.P;
  p.grad_hy = io.grad_hy.has_value() ? io.grad_hy->data_ptr<T>() + idx * c.B * c.P : nullptr;
  p.grad_cy = lstm && io.grad_cy.has_value() ? io.grad_cy->data_ptr<T>() + idx * c.B * c.H
                                             : nullptr;
  p.dgates_x = s.dgx.data_ptr<T>();
  p.dgates_h = gru ? s.dgh.data_ptr<T>() : nullptr;
  p.h_prev = s.hprev.data_ptr<T>();
  p.r_all = s.r_all.defined() ? s.r_all.data_ptr<T>() : nullptr;
  p.dh_all = s.dh_all.defined() ? s.dh_all.data_ptr<T>() : nullptr;
  p.dh0 = io.dhx.data_ptr<T>() + idx * c.B * c.P;
  p.dc0 = lstm ? io.dcx.data_ptr<T>() + idx * c.B * c.H : nullptr;
  p.db_x = db_x;
  p.db_h = db_h;
  return p;
}

// The LayerNorm cells' parameter gradients of one layer and direction
// (`grad`: its gradient tensors by name) after the time loop: the biases and
// LN gains from the gradients w.r.t. the normalised pre-activations (dgx; the
// GRU's recurrent side dgh), the cell state's LN from dln_c; then dgx becomes
// the gradient w.r.t. the raw x W_ih^T, which the weight and input GEMMs
// read. Sums in row order.
template <typename T>
void ln_gradients(const Config& c, const T* extra, const BackwardScratch& s,
                  const LayerWeights& lw, const LayerWeights& grad) {
  const int64_t N = c.N, H = c.H, GH = c.GH();
  const T* rec = extra + N * H;  // raw h_{t-1} W_hh^T, then raw x W_ih^T
  const T* raw_x = rec + N * GH;
  ln_backward<T>(N, GH, rec, lw.ln_hh->data_ptr<T>(), s.dgh.data_ptr<T>(),
                 grad.ln_hh->data_ptr<T>(), ptr_or_null<T>(grad.b_hh), nullptr);
  ln_backward<T>(N, GH, raw_x, lw.ln_ih->data_ptr<T>(), s.dgx.data_ptr<T>(),
                 grad.ln_ih->data_ptr<T>(), ptr_or_null<T>(grad.b_ih), s.dgx.data_ptr<T>());
  if (lw.ln_c_w != nullptr) {  // y = LN(c_t; w_c, b_c): c_t is extra's first block
    ln_backward<T>(N, H, extra, lw.ln_c_w->data_ptr<T>(), s.dln_c.data_ptr<T>(),
                   grad.ln_c_w->data_ptr<T>(), grad.ln_c_b->data_ptr<T>(), nullptr);
  }
}

// Layer l, direction d's weight gradients after its loop: one GEMM each over
// all time steps; the biases' where the loop did not sum them (`loop_bias`).
template <typename T>
void weight_gradients(const Config& c, int64_t idx, const Tensor& xl, const BackwardScratch& s,
                      const std::vector<Tensor>& gw, bool loop_bias) {
  const bool gru = kernels::base_cell(static_cast<int>(c.mode)) == kernels::kGRU;
  const int64_t base = idx * c.per_dir, H = c.H;
  matmul<T>(gw[base + 0], s.dgx, true, xl, false, false, nullptr, nullptr, c.bf16);
  if (c.mode == kernels::kGRU_RESET_BEFORE) {  // W_h[r,z] from h_{t-1}, W_hn from r * h_{t-1}
    matmul<T>(gw[base + 1].narrow(0, 0, 2 * H), s.dgh.narrow(1, 0, 2 * H), true, s.hprev_m,
              false, false, nullptr, nullptr, c.bf16);
    matmul<T>(gw[base + 1].narrow(0, 2 * H, H), s.dgh.narrow(1, 2 * H, H), true, s.r_all, false,
              false, nullptr, nullptr, c.bf16);
  } else {
    matmul<T>(gw[base + 1], s.dln_rec, true, s.hprev_m, false, false, nullptr, nullptr, c.bf16);
  }
  if (c.bias && !c.ln()) {  // (the LayerNorm cells': ln_gradients)
    if (!loop_bias) {
      at::sum_out(const_cast<Tensor&>(gw[base + 2]), s.dgx, {0});
      if (gru) at::sum_out(const_cast<Tensor&>(gw[base + 3]), s.dgh, {0});
    }
    // LSTM/RNN: both biases enter the same pre-activation.
    if (!gru) gw[base + 3].copy_(gw[base + 2]);
  }
  if (c.P != c.H)
    matmul<T>(gw[base + c.hr_index()], s.dh_all, true, s.r_all, false, false, nullptr, nullptr,
              c.bf16);
}

template <typename T>
void backward_stack(const Config& c, const Tensor& x, const std::vector<Tensor>& w,
                    const Tensor& h0, const std::optional<Tensor>& c0,
                    const std::optional<Tensor>& masks,
                    const Tensor& reserve, const std::optional<Tensor>& grad_output,
                    const std::optional<Tensor>& grad_hy, const std::optional<Tensor>& grad_cy,
                    const std::optional<Tensor>& grad_reserve,
                    const Tensor& grad_input, const Tensor& dhx, const Tensor& dcx,
                    const std::vector<Tensor>& gw, const DeviceSchedule& sched, bool poison,
                    bool need_grad_input, const std::optional<Tensor>& zone,
                    const std::optional<Tensor>& rmasks) {
  const bool gru = kernels::base_cell(static_cast<int>(c.mode)) == kernels::kGRU;
  const auto opts = x.options();
  const BackwardScratch s = backward_scratch(c, opts, poison, rmasks.has_value());
  const BackwardIO io{{h0, c0, zone, rmasks, sched}, reserve, grad_hy, grad_cy, grad_reserve, dhx,
                      dcx};
  // The CPU backend sums the bias gradients inside its time loop (the
  // LayerNorm cells': ln_gradients, after it).
  const bool loop_bias = c.bias && x.is_cpu() && !c.ln();
  std::optional<Tensor> go = grad_output;  // gradient w.r.t. layer l's output (N, D*P)
  for (int64_t l = c.L - 1; l >= 0; --l) {
    const Tensor xl = layer_input(c, l, x, reserve, masks);
    Tensor dxl = l == 0 ? grad_input : alloc({c.N, c.D * c.P}, opts, poison);
    for (const auto d : c10::irange(c.D)) {
      const int64_t idx = l * c.D + d, base = idx * c.per_dir;
      const LayerWeights lw = layer_weights(c, w, l, d);
      T* const db_x = loop_bias ? gw[base + 2].data_ptr<T>() : nullptr;
      T* const db_h = loop_bias && gru ? gw[base + 3].data_ptr<T>() : nullptr;
      const auto p = backward_params<T>(c, lw, l, d, io, s, go, db_x, db_h);
      run_backward<T>(p, x.device(), c.bf16);
      if (c.ln()) ln_gradients<T>(c, p.extra, s, lw, layer_weights(c, gw, l, d));
      weight_gradients<T>(c, idx, xl, s, gw, loop_bias);
      // Layer 0's input gradient only when the caller wants it (autograd asks
      // for it only if the input requires grad): a whole GEMM saved otherwise.
      if (l > 0 || need_grad_input) matmul<T>(dxl, s.dgx, false, *lw.w_ih, false, d > 0);
    }
    if (l > 0) {
      go = masks.has_value() ? dxl * masks->select(0, l - 1).reshape({c.N, c.D * c.P}) : dxl;
    }
  }
}

// rnn_backward's own arguments: the reserve and the incoming gradients.
// Returns whether the gradient w.r.t. the reserve is read (an LSTM's cell
// states).
bool check_backward_inputs(const Config& c, const Tensor& input, at::ScalarType cd,
                           const Tensor& reserve, const std::optional<Tensor>& grad_output,
                           const std::optional<Tensor>& grad_hy,
                           const std::optional<Tensor>& grad_cy,
                           const std::optional<Tensor>& grad_reserve) {
  std::vector<int64_t> out_shape = c.packed ? std::vector<int64_t>{c.N, c.D * c.P}
                                            : std::vector<int64_t>{c.T, c.B, c.D * c.P};
  TORCH_CHECK(reserve.defined() && reserve.dim() == 1 && reserve.size(0) == c.reserve_size() &&
                  reserve.scalar_type() == cd && reserve.device() == input.device(),
              "fastcells: `reserve` must be the 1-D ", cd, " tensor of ", c.reserve_size(),
              " elements returned by rnn_forward for these arguments, got ",
              reserve.scalar_type(), " of shape ", shape_str(reserve.sizes()));
  if (grad_output.has_value() && grad_output->defined())
    check_tensor(*grad_output, "grad_output", out_shape, input);
  if (grad_hy.has_value() && grad_hy->defined())
    check_tensor(*grad_hy, "grad_hy", {c.L * c.D, c.B, c.P}, input);
  const bool lstm = kernels::has_cell_state(static_cast<int>(c.mode));
  if (lstm && grad_cy.has_value() && grad_cy->defined())
    check_tensor(*grad_cy, "grad_cy", {c.L * c.D, c.B, c.H}, input);
  // Gradient w.r.t. the reserve: only an LSTM's c_t rows are read (what
  // return_cell_states exposes); the rest of the reserve is not an output.
  const bool use_grad_reserve = lstm && grad_reserve.has_value() && grad_reserve->defined();
  if (use_grad_reserve) {
    TORCH_CHECK(grad_reserve->dim() == 1 && grad_reserve->size(0) == c.reserve_size() &&
                    grad_reserve->scalar_type() == cd &&
                    grad_reserve->device() == input.device(),
                "fastcells: `grad_reserve` must be a 1-D ", cd, " tensor of ",
                c.reserve_size(), " elements on ", input.device(), " (the reserve's shape), got ",
                grad_reserve->scalar_type(), " of shape ", shape_str(grad_reserve->sizes()),
                " on ", grad_reserve->device());
    TORCH_CHECK(input.is_cpu(),
                "fastcells: gradients through the cell states (return_cell_states=True) are "
                "computed by the CPU backend only; got `grad_reserve` on ", input.device(),
                ", expected cpu");
  }
  return use_grad_reserve;
}

// Arguments: FASTCELLS_RNN_BACKWARD_ARGS (op_schema.h).
BackwardResult rnn_backward(FASTCELLS_PARAMS(FASTCELLS_RNN_BACKWARD_ARGS)) {
  const Config c = check_inputs(FASTCELLS_NAMES(FASTCELLS_RNN_STACK_ARGS));
  check_zoneout(c, input, zoneout);
  check_rmasks(c, input, recurrent_masks);
  const at::ScalarType cd = compute_type(input.scalar_type());
  const bool lstm = kernels::has_cell_state(static_cast<int>(c.mode));
  const bool use_grad_reserve = check_backward_inputs(c, input, cd, reserve, grad_output, grad_hy,
                                                      grad_cy, grad_reserve);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
#ifdef WITH_CUDA
  const c10::OptionalDeviceGuard guard(input.device());
#endif
  const bool poison = poison_enabled();
  const StackArgs a = stack_args(c, input, weights, hx, cx, dropout_masks, zoneout,
                                 recurrent_masks, cd);
  const auto& opts = a.opts;
  // Saved tensors may come back from autograd in another layout
  // (saved_tensors_hooks that offload or compress); the kernels read raw
  // pointers, so every buffer is made contiguous here (a no-op when it is).
  const Tensor res = reserve.contiguous();
  auto go = to_compute(grad_output, cd);
  if (go.has_value()) go = go->view({c.N, c.D * c.P});
  const auto ghy = to_compute(grad_hy, cd);
  const auto gcy = lstm ? to_compute(grad_cy, cd) : std::nullopt;
  const std::optional<Tensor> gres =
      use_grad_reserve ? to_compute(grad_reserve, cd) : std::nullopt;

  // Without need_grad_input, grad_input is an empty (0-element) tensor.
  Tensor grad_input = alloc({need_grad_input ? c.N : 0, c.I}, opts, poison);
  Tensor dhx = alloc({c.L * c.D, c.B, c.P}, opts, poison);
  Tensor dcx = alloc({lstm ? c.L * c.D : 0, c.B, c.H}, opts, poison);
  if (!lstm) dcx = dcx.view({0});
  std::vector<Tensor> gw;
  gw.reserve(a.w.size());
  for (const auto& t : a.w) gw.push_back(alloc(t.sizes(), opts, poison));
  const DeviceSchedule sched = device_schedule(c, input.device());

  if (c.N == 0) {
    // No step ran: the states pass straight through, nothing else has a gradient.
    if (need_grad_input) grad_input.zero_();
    for (auto& g : gw) g.zero_();
    if (ghy.has_value()) dhx.copy_(*ghy); else dhx.zero_();
    if (lstm) { if (gcy.has_value()) dcx.copy_(*gcy); else dcx.zero_(); }
  } else {
    AT_DISPATCH_FLOATING_TYPES(cd, "fastcells::rnn_backward", [&] {
      backward_stack<scalar_t>(c, a.x, a.w, a.h0, a.c0, a.masks, res, go, ghy, gcy, gres,
                               grad_input, dhx, dcx, gw, sched, poison, need_grad_input, a.zone,
                               a.rmasks);
    });
  }
  const auto out_t = input.scalar_type();
  grad_input = need_grad_input ? grad_input.view(input.sizes()) : grad_input.view({0});
  if (out_t == cd) return {grad_input, dhx, dcx, gw};
  for (auto& g : gw) g = g.to(out_t);
  return {grad_input.to(out_t), dhx.to(out_t), dcx.to(out_t), gw};
}

std::string build_info() {
  std::ostringstream o;
  o << "cpu=1";
#ifdef WITH_CUDA
  o << ";cuda=1";
#else
  o << ";cuda=0";
#endif
  o << ";cpu_isa=" << cpu::active_isa().name << ";cpu_isas=";
  const auto isas = cpu::supported_isas();
  for (size_t i = 0; i < isas.size(); ++i) o << (i ? "," : "") << isas[i];
  o << ";host=" << cpu::host_features();
  return o.str();
}

// The CPU ISA path in use, and switching it (csrc/cpu/isa.h).
std::string cpu_isa() { return cpu::active_isa().name; }

std::string set_cpu_isa(const std::string& name) {
  const std::string previous = cpu::active_isa().name;
  cpu::set_active_isa(name);
  return previous;
}

std::vector<std::string> cpu_isas(bool built) {
  return built ? cpu::built_isas() : cpu::supported_isas();
}

std::string cpu_host_features() { return cpu::host_features(); }

}  // namespace

TORCH_LIBRARY(fastcells, m) {
  // The schemas are generated from the argument tables of op_schema.h.
  m.def(FASTCELLS_SCHEMA("rnn_forward", FASTCELLS_RNN_FORWARD_ARGS, kForwardReturns).c_str());
  m.def(FASTCELLS_SCHEMA("rnn_backward", FASTCELLS_RNN_BACKWARD_ARGS, kBackwardReturns).c_str());
  // Gradients of rnn_forward computed through the pure-PyTorch reference
  // (fastcells/_transforms.py registers its CompositeImplicitAutograd kernel):
  // the backward under create_graph=True, whose results must be differentiable.
  m.def(FASTCELLS_SCHEMA("rnn_backward_reference", FASTCELLS_RNN_BACKWARD_REFERENCE_ARGS,
                         kBackwardReturns)
            .c_str());
  m.def("build_info() -> str", &build_info);
  m.def("cpu_isa() -> str", &cpu_isa);
  m.def("set_cpu_isa(str name) -> str", &set_cpu_isa);
  m.def("cpu_isas(bool built=False) -> str[]", &cpu_isas);
  m.def("cpu_host_features() -> str", &cpu_host_features);
}

TORCH_LIBRARY_IMPL(fastcells, CPU, m) {
  m.impl("rnn_forward", &rnn_forward);
  m.impl("rnn_backward", &rnn_backward);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(fastcells, CUDA, m) {
  m.impl("rnn_forward", &rnn_forward);
  m.impl("rnn_backward", &rnn_backward);
}
#endif

}  // namespace fastcells

// A Python module so that `import fastcells._C` loads the library and runs
// the registrations above; the ops themselves live in torch.ops.fastcells.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
