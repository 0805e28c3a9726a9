// CUDA autocast of fastcells::rnn_forward, as torch.nn's RNNs under
// torch.autocast("cuda"): inside the region the input, weights, initial states
// and dropout masks are cast to the region's dtype (float16 by default, or
// bfloat16), as cuDNN's RNN and torch.nn's cells are. The op then runs in that
// dtype (float32 accumulation) and returns it. Casts go through
// at::autocast::cached_cast, so weights are cast once per region and gradients
// flow back to the float32 parameters. rnn_backward needs no entry: it sees the
// dtypes forward saved.
//
// No CPU entry: under CPU autocast torch.nn's modules differ (LSTM, RNN and
// RNNCell run in the region's dtype, GRU, GRUCell and LSTMCell follow their
// input's), which the op cannot tell apart; the modules cast for it
// (fastcells/modules.py, _cpu_autocast).
#include <ATen/autocast_mode.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "op_handles.h"

namespace fastcells {
namespace {

using at::Tensor;

template <c10::DeviceType device, c10::DispatchKey key>
std::tuple<Tensor, Tensor, Tensor, Tensor> rnn_forward_autocast(
    const Tensor& input, at::TensorList weights, const std::optional<Tensor>& hx,
    const std::optional<Tensor>& cx, at::OptionalIntArrayRef batch_sizes, int64_t mode,
    int64_t num_layers, bool bidirectional, bool has_biases, int64_t proj_size,
    const std::optional<Tensor>& dropout_masks, bool need_reserve,
    const std::optional<Tensor>& zoneout, const std::optional<Tensor>& recurrent_masks) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
  const at::ScalarType dt = at::autocast::get_autocast_dtype(device);
  const auto cast = [dt](const Tensor& t) { return at::autocast::cached_cast(dt, t, device); };
  const auto cast_opt = [&](const std::optional<Tensor>& t) -> std::optional<Tensor> {
    return t.has_value() ? std::optional<Tensor>(cast(*t)) : std::nullopt;
  };
  std::vector<Tensor> w;
  w.reserve(weights.size());
  for (const auto& t : weights) w.push_back(cast(t));
  return forward_op().call(cast(input), w, cast_opt(hx), cast_opt(cx), batch_sizes, mode,
                           num_layers, bidirectional, has_biases, proj_size,
                           cast_opt(dropout_masks), need_reserve, cast_opt(zoneout),
                           cast_opt(recurrent_masks));
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcells, AutocastCUDA, m) {
  m.impl("rnn_forward",
         &rnn_forward_autocast<c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA>);
}

}  // namespace fastcells
