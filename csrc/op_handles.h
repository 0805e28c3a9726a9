// Typed dispatcher handles of the fastcells ops, for the C++ kernels that
// call them again below their own dispatch key (autograd.cpp, autocast.cpp).
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

namespace fastcells {

using ForwardFn = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, at::TensorList, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, at::OptionalIntArrayRef, int64_t, int64_t, bool, bool,
    int64_t, const std::optional<at::Tensor>&, bool, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&);
using BackwardFn = std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>>(
    const at::Tensor&, at::TensorList, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, at::OptionalIntArrayRef, int64_t, int64_t, bool, bool,
    int64_t, const std::optional<at::Tensor>&, const at::Tensor&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, bool, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&);

// rnn_backward_reference: rnn_backward's arguments without the reserve.
using BackwardReferenceFn = std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>>(
    const at::Tensor&, at::TensorList, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, at::OptionalIntArrayRef, int64_t, int64_t, bool, bool,
    int64_t, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool);

inline c10::TypedOperatorHandle<ForwardFn> forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastcells::rnn_forward", "")
                             .typed<ForwardFn>();
  return op;
}

inline c10::TypedOperatorHandle<BackwardFn> backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastcells::rnn_backward", "")
                             .typed<BackwardFn>();
  return op;
}

inline c10::TypedOperatorHandle<BackwardReferenceFn> backward_reference_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastcells::rnn_backward_reference", "")
                             .typed<BackwardReferenceFn>();
  return op;
}

}  // namespace fastcells
