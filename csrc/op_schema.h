// The argument lists of the RNN ops, each written once, as a table.
//
// Every op's arguments appear in several places that must agree: the schema
// string m.def registers (ops.cpp), the C++ signatures of its kernels (ops.cpp,
// autograd.cpp, autocast.cpp), the function types of the typed dispatcher
// handles (op_handles.h), and the calls that forward the arguments to the op
// below a dispatch key. All of them are generated from the tables below, so an
// argument added, renamed or moved in a table changes every one of them
// together. The Python functions that name the arguments (fake kernels, the
// reference backward, the ONNX translations) are compared with the registered
// schemas by tests/test_ops.py.
//
// One row per argument, in schema order:
//   ARG(C++ parameter type, name, schema type, schema default)
// The schema text of a row is `<schema type> <name><schema default>`, e.g.
// "bool need_reserve=True".
#pragma once

#include <ATen/ATen.h>

#include <cstddef>
#include <initializer_list>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

// clang-format off

// The layer stack and its input, the first arguments of every RNN op.
#define FASTCELLS_RNN_STACK_ARGS(ARG)                                            \
  ARG(const at::Tensor&,                input,           "Tensor",   "")         \
  ARG(at::TensorList,                   weights,         "Tensor[]", "")         \
  ARG(const std::optional<at::Tensor>&, hx,              "Tensor?",  "")         \
  ARG(const std::optional<at::Tensor>&, cx,              "Tensor?",  "")         \
  ARG(at::OptionalIntArrayRef,          batch_sizes,     "int[]?",   "")         \
  ARG(int64_t,                          mode,            "int",      "")         \
  ARG(int64_t,                          num_layers,      "int",      "")         \
  ARG(bool,                             bidirectional,   "bool",     "")         \
  ARG(bool,                             has_biases,      "bool",     "")         \
  ARG(int64_t,                          proj_size,       "int",      "")         \
  ARG(const std::optional<at::Tensor>&, dropout_masks,   "Tensor?",  "")

// rnn_forward.
#define FASTCELLS_RNN_FORWARD_ARGS(ARG)                                          \
  FASTCELLS_RNN_STACK_ARGS(ARG)                                                  \
  ARG(bool,                             need_reserve,    "bool",     "=True")    \
  ARG(const std::optional<at::Tensor>&, zoneout,         "Tensor?",  "=None")    \
  ARG(const std::optional<at::Tensor>&, recurrent_masks, "Tensor?",  "=None")

// rnn_backward: forward's arguments, its reserve and the incoming gradients.
#define FASTCELLS_RNN_BACKWARD_ARGS(ARG)                                         \
  FASTCELLS_RNN_STACK_ARGS(ARG)                                                  \
  ARG(const at::Tensor&,                reserve,         "Tensor",   "")         \
  ARG(const std::optional<at::Tensor>&, grad_output,     "Tensor?",  "")         \
  ARG(const std::optional<at::Tensor>&, grad_hy,         "Tensor?",  "")         \
  ARG(const std::optional<at::Tensor>&, grad_cy,         "Tensor?",  "")         \
  ARG(bool,                             need_grad_input, "bool",     "=True")    \
  ARG(const std::optional<at::Tensor>&, grad_reserve,    "Tensor?",  "=None")    \
  ARG(const std::optional<at::Tensor>&, zoneout,         "Tensor?",  "=None")    \
  ARG(const std::optional<at::Tensor>&, recurrent_masks, "Tensor?",  "=None")

// rnn_backward_reference: rnn_backward's arguments without the reserve and
// without what its reference path does not support (gradients through the
// cell states, zoneout, recurrent dropout).
#define FASTCELLS_RNN_BACKWARD_REFERENCE_ARGS(ARG)                               \
  FASTCELLS_RNN_STACK_ARGS(ARG)                                                  \
  ARG(const std::optional<at::Tensor>&, grad_output,     "Tensor?",  "")         \
  ARG(const std::optional<at::Tensor>&, grad_hy,         "Tensor?",  "")         \
  ARG(const std::optional<at::Tensor>&, grad_cy,         "Tensor?",  "")         \
  ARG(bool,                             need_grad_input, "bool",     "")

// clang-format on

// What a table expands to. Each row becomes ", <text>" and the leading comma
// of the whole list is dropped, since C++ allows no trailing one.
#define FASTCELLS_ARG_PARAM_(type, name, schema_type, schema_default) , type name
#define FASTCELLS_ARG_NAME_(type, name, schema_type, schema_default) , name
#define FASTCELLS_ARG_SCHEMA_(type, name, schema_type, schema_default) \
  , schema_type " " #name schema_default
#define FASTCELLS_ARG_COUNT_(type, name, schema_type, schema_default) +1
#define FASTCELLS_DROP_FIRST_(first, ...) __VA_ARGS__
#define FASTCELLS_DROP_FIRST(...) FASTCELLS_DROP_FIRST_(__VA_ARGS__)

// `const at::Tensor& input, at::TensorList weights, ...`: a kernel's parameters.
#define FASTCELLS_PARAMS(ARGS) FASTCELLS_DROP_FIRST(ARGS(FASTCELLS_ARG_PARAM_))
// `input, weights, ...`: a call that passes on the variables of those names.
#define FASTCELLS_NAMES(ARGS) FASTCELLS_DROP_FIRST(ARGS(FASTCELLS_ARG_NAME_))
// The number of arguments (a Tensor[] counts as one).
#define FASTCELLS_NUM_ARGS(ARGS) (0 ARGS(FASTCELLS_ARG_COUNT_))
// The schema m.def registers: `name(<rows>) -> returns`.
#define FASTCELLS_SCHEMA(name, ARGS, returns) \
  ::fastcells::op_schema(name, {FASTCELLS_DROP_FIRST(ARGS(FASTCELLS_ARG_SCHEMA_))}, returns)

namespace fastcells {

using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
inline constexpr char kForwardReturns[] =
    "(Tensor output, Tensor hy, Tensor cy, Tensor reserve)";

// rnn_backward and rnn_backward_reference.
using BackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>>;
inline constexpr char kBackwardReturns[] =
    "(Tensor grad_input, Tensor grad_hx, Tensor grad_cx, Tensor[] grad_weights)";

using ForwardFn = ForwardResult(FASTCELLS_PARAMS(FASTCELLS_RNN_FORWARD_ARGS));
using BackwardFn = BackwardResult(FASTCELLS_PARAMS(FASTCELLS_RNN_BACKWARD_ARGS));
using BackwardReferenceFn =
    BackwardResult(FASTCELLS_PARAMS(FASTCELLS_RNN_BACKWARD_REFERENCE_ARGS));

inline std::string op_schema(const char* name, std::initializer_list<const char*> args,
                             const char* returns) {
  std::string s = std::string(name) + "(";
  const char* sep = "";
  for (const char* a : args) {
    s += sep;
    s += a;
    sep = ", ";
  }
  return s + ") -> " + returns;
}

}  // namespace fastcells
