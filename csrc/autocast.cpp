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

// Each argument as the op sees it inside the region: its tensors cast to the
// region's dtype, everything else as given.
template <c10::DeviceType device>
struct AutocastArg {
  at::ScalarType dt;
  Tensor operator()(const Tensor& t) const { return at::autocast::cached_cast(dt, t, device); }
  std::optional<Tensor> operator()(const std::optional<Tensor>& t) const {
    return t.has_value() ? std::optional<Tensor>((*this)(*t)) : std::nullopt;
  }
  std::vector<Tensor> operator()(at::TensorList ts) const {
    std::vector<Tensor> out;
    out.reserve(ts.size());
    for (const auto& t : ts) out.push_back((*this)(t));
    return out;
  }
  template <typename T>
  T operator()(T value) const {
    return value;
  }
};

// Passes every argument of the table through `cast` (the vector a Tensor[]
// becomes lives until the call returns).
#define FASTCELLS_CAST_ARG_(type, name, schema_type, schema_default) , cast(name)

template <c10::DeviceType device, c10::DispatchKey key>
ForwardResult rnn_forward_autocast(FASTCELLS_PARAMS(FASTCELLS_RNN_FORWARD_ARGS)) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
  const AutocastArg<device> cast{at::autocast::get_autocast_dtype(device)};
  return forward_op().call(
      FASTCELLS_DROP_FIRST(FASTCELLS_RNN_FORWARD_ARGS(FASTCELLS_CAST_ARG_)));
}

#undef FASTCELLS_CAST_ARG_

}  // namespace

TORCH_LIBRARY_IMPL(fastcells, AutocastCUDA, m) {
  m.impl("rnn_forward",
         &rnn_forward_autocast<c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA>);
}

}  // namespace fastcells
