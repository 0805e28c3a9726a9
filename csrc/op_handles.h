// Typed dispatcher handles of the fastcells ops, for the C++ kernels that
// call them again below their own dispatch key (autograd.cpp, autocast.cpp).
// Their function types come from the argument tables of op_schema.h.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ATen.h>

#include "op_schema.h"

namespace fastcells {

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
