// Autograd of fastcells::rnn_forward, registered in C++ on the Autograd key.
//
// A Python autograd registration (torch.library.register_autograd) costs
// several hundred microseconds per call in argument flattening alone, more
// than the whole fused LSTM of a small forecasting model; this node costs a
// few. Forward and backward both go through the dispatcher (below autograd),
// so fake tensors, torch.compile and torch.export see the two ops as usual.
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <vector>

#include "kernels/cell_table.h"
#include "op_handles.h"

namespace fastcells {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::optional<Tensor> defined_or_null(const Tensor& t) {
  return t.defined() ? std::optional<Tensor>(t) : std::nullopt;
}

class RnnFunction : public torch::autograd::Function<RnnFunction> {
 public:
  // Saved: input, hx, cx, dropout_masks, reserve, zoneout, recurrent_masks,
  // weights... Not `output`: the reserve holds a copy of it, so the caller
  // may modify it in place.
  static variable_list forward(AutogradContext* ctx,
                               FASTCELLS_PARAMS(FASTCELLS_RNN_FORWARD_ARGS)) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    // Backward reads the reserve, whatever the caller asked for.
    need_reserve = true;
    auto [output, hy, cy, reserve] =
        forward_op().call(FASTCELLS_NAMES(FASTCELLS_RNN_FORWARD_ARGS));
    variable_list to_save{input, hx.value_or(Tensor()), cx.value_or(Tensor()),
                          dropout_masks.value_or(Tensor()), reserve, zoneout.value_or(Tensor()),
                          recurrent_masks.value_or(Tensor())};
    to_save.insert(to_save.end(), weights.begin(), weights.end());
    ctx->save_for_backward(to_save);
    ctx->saved_data["packed"] = batch_sizes.has_value();
    ctx->saved_data["batch_sizes"] =
        batch_sizes.has_value() ? batch_sizes->vec() : std::vector<int64_t>{};
    ctx->saved_data["mode"] = mode;
    ctx->saved_data["num_layers"] = num_layers;
    ctx->saved_data["bidirectional"] = bidirectional;
    ctx->saved_data["has_biases"] = has_biases;
    ctx->saved_data["proj_size"] = proj_size;
    // The reserve is differentiable only so that the LSTM cell states a
    // module returns (views of its c_t rows, return_cell_states) pass their
    // gradients back: rnn_backward reads those rows of its gradient.
    ctx->set_materialize_grads(false);
    return {output, hy, cy, reserve};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor& input = saved[0];
    const std::optional<Tensor> hx = defined_or_null(saved[1]);
    const std::optional<Tensor> cx = defined_or_null(saved[2]);
    const std::optional<Tensor> dropout_masks = defined_or_null(saved[3]);
    const Tensor& reserve = saved[4];
    const std::optional<Tensor> zoneout = defined_or_null(saved[5]);
    const std::optional<Tensor> recurrent_masks = defined_or_null(saved[6]);
    const std::vector<Tensor> weights(saved.begin() + 7, saved.end());
    const int64_t mode = ctx->saved_data["mode"].toInt();
    const std::vector<int64_t> bs = ctx->saved_data["batch_sizes"].toIntVector();
    const at::OptionalIntArrayRef batch_sizes =
        ctx->saved_data["packed"].toBool() ? at::OptionalIntArrayRef(bs) : std::nullopt;
    const std::optional<Tensor> grad_output = defined_or_null(grads[0]);
    const std::optional<Tensor> grad_hy = defined_or_null(grads[1]);
    // forward ran, so `mode` is valid.
    const std::optional<Tensor> grad_cy = kernels::has_cell_state(static_cast<int>(mode))
                                              ? defined_or_null(grads[2])
                                              : std::nullopt;
    const std::optional<Tensor> grad_reserve = defined_or_null(grads[3]);

    // Gradients in the order of forward's arguments, a TensorList counting
    // one slot per tensor; non-tensor arguments get undefined gradients.
    variable_list result(FASTCELLS_NUM_ARGS(FASTCELLS_RNN_FORWARD_ARGS) - 1 + weights.size());
    if (!grad_output && !grad_hy && !grad_cy && !grad_reserve) return result;
    // The input gradient is a whole GEMM of the first layer: skip it when
    // the input does not require grad (the usual case in training).
    const bool need_grad_input = ctx->needs_input_grad(0);
    // Under create_graph=True (grad mode on here) the gradients must be
    // differentiable again: rnn_backward has no derivative formula, so they
    // come from the pure-PyTorch reference instead (second derivatives at the
    // reference's speed, documented in the README).
    const bool create_graph = at::GradMode::is_enabled();
    const int64_t num_layers = ctx->saved_data["num_layers"].toInt();
    const bool bidirectional = ctx->saved_data["bidirectional"].toBool();
    const bool has_biases = ctx->saved_data["has_biases"].toBool();
    const int64_t proj_size = ctx->saved_data["proj_size"].toInt();
    TORCH_CHECK(!create_graph || (!zoneout && !recurrent_masks),
                "fastcells: second derivatives with zoneout or recurrent dropout are not "
                "supported (their reference path is not written); use create_graph=False, or "
                "zoneout=0 and recurrent_dropout=0");
    TORCH_CHECK(!create_graph || !grad_reserve,
                "fastcells: second derivatives through the cell states (return_cell_states=True) "
                "are not supported: differentiate a loss that uses the output and final states "
                "only, or use create_graph=False");
    // Both ops take the variables of their arguments' names defined above.
    auto [grad_input, grad_hx, grad_cx, grad_weights] = [&] {
      if (create_graph)
        return backward_reference_op().call(
            FASTCELLS_NAMES(FASTCELLS_RNN_BACKWARD_REFERENCE_ARGS));
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      return backward_op().call(FASTCELLS_NAMES(FASTCELLS_RNN_BACKWARD_ARGS));
    }();
    size_t k = 0;
    result[k++] = need_grad_input ? grad_input : Tensor();
    for (auto& g : grad_weights) result[k++] = std::move(g);
    result[k++] = hx.has_value() ? grad_hx : Tensor();
    result[k++] = cx.has_value() ? grad_cx : Tensor();
    return result;
  }
};

ForwardResult rnn_forward_autograd(FASTCELLS_PARAMS(FASTCELLS_RNN_FORWARD_ARGS)) {
  const auto requires_grad = [](const std::optional<Tensor>& t) {
    return t.has_value() && t->defined() && t->requires_grad();
  };
  bool wants_grad = false;
  if (at::GradMode::is_enabled()) {
    wants_grad = input.requires_grad() || requires_grad(hx) || requires_grad(cx);
    for (const auto& w : weights) wants_grad = wants_grad || w.requires_grad();
  }
  if (!wants_grad) {
    // No graph will be recorded: run the inference form, which saves nothing.
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return forward_op().call(FASTCELLS_NAMES(FASTCELLS_RNN_FORWARD_ARGS));
  }
  auto out = RnnFunction::apply(FASTCELLS_NAMES(FASTCELLS_RNN_FORWARD_ARGS));
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcells, Autograd, m) {
  m.impl("rnn_forward", &rnn_forward_autograd);
}

}  // namespace fastcells
