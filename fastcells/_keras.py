"""Keras 3 interchange: from_keras() and to_keras().

Keras and torch.nn store the same recurrent layers differently:

* kernels are transposed: Keras ``kernel`` is (input, G*units) and
  ``recurrent_kernel`` (units, G*units); torch's ``weight_ih`` is (G*H, I) and
  ``weight_hh`` (G*H, H);
* gate order: Keras LSTM i, f, c, o is torch's i, f, g, o; Keras GRU z, r, h
  is torch's r, z, n (reordered here);
* biases: Keras LSTM and SimpleRNN have one bias (torch's ``bias_ih``, with
  ``bias_hh`` zero; going back, Keras gets their sum); a Keras GRU with
  ``reset_after=True`` has an input and a recurrent bias, shape (2, 3*units),
  torch's ``bias_ih`` and ``bias_hh``; with ``reset_after=False`` one bias,
  whose recurrent part is a plain summand, so ``bias_hh`` is zero again;
* Keras layers are batch-major: the modules built here have
  ``batch_first=True``;
* a Keras GRU with ``reset_after=False`` is fastcells' reset-before GRU
  (``fastcells.GRU(..., reset_after=False)``), which torch.nn does not have.

A Keras layer returns the last step unless ``return_sequences=True``; the
fastcells module always returns the whole sequence and the final state
(``out[:, -1]`` is Keras' default output). Keras options without a torch
counterpart (dropout on the input or the recurrent state, ``go_backwards``,
``stateful``, activations other than the standard ones, a Bidirectional
``merge_mode`` other than ``"concat"``) raise a ValueError naming them.
"""
from __future__ import annotations

from typing import Any, List, Tuple

import numpy as np
import torch
from torch import nn

__all__ = ["from_keras", "to_keras"]

# Keras gate blocks in torch's gate order (indices of Keras blocks).
_KERAS_TO_TORCH = {"LSTM": (0, 1, 2, 3), "GRU": (1, 0, 2), "SimpleRNN": (0,)}


def _keras():
    try:
        import keras
    except ImportError as e:  # pragma: no cover - exercised only without keras
        raise ImportError("fastcells.from_keras / to_keras need Keras 3 (pip install -c "
                          "constraints.txt keras, with torch pinned in constraints.txt)") from e
    return keras


def _name(obj) -> str:
    return getattr(obj, "__name__", str(obj))


def _reorder(a: np.ndarray, order: Tuple[int, ...], axis: int) -> np.ndarray:
    """The gate blocks of `a` along `axis` in the order `order` (its own inverse
    for the GRU's swap of the first two blocks)."""
    blocks = np.split(a, len(order), axis=axis)
    return np.concatenate([blocks[k] for k in order], axis=axis)


def _check_keras_layer(layer, kind: str, backward: bool) -> None:
    """Keras options that the torch module cannot express (`backward`: the
    backward layer of a Bidirectional, which goes backwards)."""
    cfg = layer.get_config()
    bad = []
    for key in ("dropout", "recurrent_dropout"):
        if cfg.get(key, 0):
            bad.append(f"{key}={cfg[key]}")
    if bool(cfg.get("go_backwards")) != backward:
        bad.append(f"go_backwards={cfg.get('go_backwards')}")
    if cfg.get("stateful"):
        bad.append("stateful=True")
    act = _name(layer.activation)
    if act not in (("tanh", "relu") if kind == "SimpleRNN" else ("tanh",)):
        bad.append(f"activation={act!r}")
    if kind != "SimpleRNN" and _name(layer.recurrent_activation) != "sigmoid":
        bad.append(f"recurrent_activation={_name(layer.recurrent_activation)!r}")
    if bad:
        raise ValueError(f"fastcells.from_keras: {layer.name} ({kind}) has {', '.join(bad)}, "
                         "which the torch module cannot express")


def _direction_weights(layer, kind: str) -> List[torch.Tensor]:
    """torch's weight_ih, weight_hh[, bias_ih, bias_hh] of one Keras layer."""
    order = _KERAS_TO_TORCH[kind]
    values = layer.cell.get_weights()  # kernel, recurrent_kernel[, bias]
    w_ih = _reorder(values[0], order, axis=1).T
    w_hh = _reorder(values[1], order, axis=1).T
    out = [w_ih, w_hh]
    if layer.use_bias:
        bias = values[2]
        if bias.ndim == 2:  # GRU reset_after=True: input and recurrent biases
            out += [_reorder(bias[0], order, 0), _reorder(bias[1], order, 0)]
        else:
            out += [_reorder(bias, order, 0), np.zeros_like(bias)]
    return [torch.from_numpy(np.ascontiguousarray(a)) for a in out]


def _kind(layer) -> str:
    name = type(layer).__name__
    if name not in _KERAS_TO_TORCH:
        raise ValueError(f"fastcells.from_keras: expected a Keras LSTM, GRU or SimpleRNN layer "
                         f"(or Bidirectional of one), got {name}")
    return name


def from_keras(layer) -> nn.Module:
    """The fastcells module equivalent to a built Keras 3 ``LSTM``, ``GRU``
    (either ``reset_after``) or ``SimpleRNN`` layer, or a ``Bidirectional`` of
    one (``merge_mode="concat"``), with its weights, ``batch_first=True`` and
    float32 parameters."""
    import fastcells

    keras = _keras()
    bidirectional = isinstance(layer, keras.layers.Bidirectional)
    directions = [layer.forward_layer, layer.backward_layer] if bidirectional else [layer]
    if bidirectional and layer.merge_mode != "concat":
        raise ValueError(f"fastcells.from_keras: Bidirectional merge_mode={layer.merge_mode!r}; "
                         "torch concatenates the two directions (merge_mode='concat')")
    kind = _kind(directions[0])
    for k, d in enumerate(directions):
        if not d.built:
            raise ValueError(f"fastcells.from_keras: {d.name} is not built; call it once or "
                             "build it with its input shape first")
        _check_keras_layer(d, kind, backward=k == 1)
    first = directions[0]
    units, input_size = first.units, int(first.cell.kernel.shape[0])
    kw = dict(batch_first=True, bias=first.use_bias, bidirectional=bidirectional)
    if kind == "LSTM":
        module = fastcells.LSTM(input_size, units, **kw)
    elif kind == "GRU":
        module = fastcells.GRU(input_size, units, reset_after=bool(first.reset_after), **kw)
    else:
        module = fastcells.RNN(input_size, units, nonlinearity=_name(first.activation), **kw)
    weights = [w for d in directions for w in _direction_weights(d, kind)]
    with torch.no_grad():
        for p, w in zip(module._flat_weights, weights):
            p.copy_(w.to(p.dtype))
    return module


def _kind_of_module(module: nn.Module) -> str:
    import fastcells

    if isinstance(module, fastcells.LSTM):
        return "LSTM"
    return "GRU" if isinstance(module, fastcells.GRU) else "SimpleRNN"


def _new_keras_layer(keras, module: nn.Module, return_state: bool):
    """An unbuilt Keras layer configured as `module`'s layers (return_sequences=True)."""
    kind = _kind_of_module(module)
    kw = dict(use_bias=module.bias, return_sequences=True, return_state=return_state)
    if kind == "LSTM":
        return keras.layers.LSTM(module.hidden_size, **kw)
    if kind == "GRU":
        reset_after = getattr(module, "reset_after", True)
        return keras.layers.GRU(module.hidden_size, reset_after=reset_after, **kw)
    return keras.layers.SimpleRNN(module.hidden_size, activation=module.nonlinearity, **kw)


def _set_keras_weights(keras_layer, module: nn.Module, layer_index: int, direction: int) -> None:
    """The built `keras_layer` gets `module`'s weights of layer `layer_index`,
    direction `direction`, in Keras' layout."""
    kind = _kind_of_module(module)
    per = 4 if module.bias else 2
    start = (layer_index * (2 if module.bidirectional else 1) + direction) * per
    ws = [w.detach().to(torch.float32).cpu().numpy()
          for w in module._flat_weights[start:start + per]]
    order = _KERAS_TO_TORCH[kind]  # a permutation that is its own inverse
    values = [_reorder(ws[0].T, order, axis=1), _reorder(ws[1].T, order, axis=1)]
    if module.bias:
        b_ih, b_hh = _reorder(ws[2], order, 0), _reorder(ws[3], order, 0)
        if kind == "GRU" and getattr(module, "reset_after", True):
            values.append(np.stack([b_ih, b_hh]))
        else:
            values.append(b_ih + b_hh)
    keras_layer.set_weights(values)


def to_keras(module: nn.Module) -> Any:
    """A built Keras 3 layer computing what a fastcells (or torch.nn-configured)
    ``LSTM``, ``GRU`` (either ``reset_after``) or ``RNN`` module computes, with
    its weights, on batch-major input: one layer with ``return_sequences=True``
    and ``return_state=True``; a bidirectional module gives a ``Bidirectional``
    layer (``merge_mode="concat"``); several layers a ``keras.Sequential`` of
    them (sequences only, no states). Modules Keras cannot express
    (``proj_size``, dropout between layers) raise a ValueError."""
    import fastcells

    if not isinstance(module, (fastcells.LSTM, fastcells.GRU, fastcells.RNN)):
        raise ValueError("fastcells.to_keras: expected a fastcells LSTM, GRU or RNN module, got "
                         f"{type(module).__name__}")
    keras = _keras()
    if getattr(module, "proj_size", 0):
        raise ValueError(f"fastcells.to_keras: proj_size={module.proj_size}: Keras' LSTM has "
                         "no output projection")
    if getattr(module, "zoneout", 0.0):
        raise ValueError(f"fastcells.to_keras: zoneout={module.zoneout}: Keras' recurrent layers "
                         "have no zoneout")
    if getattr(module, "recurrent_dropout", 0.0):
        raise ValueError(f"fastcells.to_keras: recurrent_dropout={module.recurrent_dropout}: "
                         "Keras' LSTM and GRU cells draw one recurrent dropout mask per gate, "
                         "fastcells one for all gates")
    if getattr(module, "return_cell_states", False):
        raise ValueError("fastcells.to_keras: return_cell_states=True: Keras' LSTM returns the "
                         "last cell state only")
    if module.num_layers > 1 and module.dropout:
        raise ValueError(f"fastcells.to_keras: dropout={module.dropout} between layers: the "
                         "Keras layers would need Dropout layers between them")
    layers = []
    input_size = module.input_size
    single = module.num_layers == 1  # a stack passes sequences on, without states
    for layer_index in range(module.num_layers):
        layer = _new_keras_layer(keras, module, single)
        if module.bidirectional:
            # Weights are set after building: Bidirectional makes its own
            # copies of the layer it is given.
            layer = keras.layers.Bidirectional(layer, merge_mode="concat")
        layer.build((None, None, input_size))
        if module.bidirectional:
            _set_keras_weights(layer.forward_layer, module, layer_index, 0)
            _set_keras_weights(layer.backward_layer, module, layer_index, 1)
        else:
            _set_keras_weights(layer, module, layer_index, 0)
        input_size = module.hidden_size * (2 if module.bidirectional else 1)
        layers.append(layer)
    return layers[0] if single else keras.Sequential(layers)
