"""ONNX export of the fused op as the standard ONNX LSTM / GRU / RNN operators.

``torch.onnx.export`` sees one ``fastcells::rnn_forward`` call per layer stack.
This module translates it, for both of torch's exporters, into what the
exporters produce for torch.nn's modules: one ONNX ``LSTM`` / ``GRU`` / ``RNN``
node per layer (both directions in one node, ``direction="bidirectional"``),
the weights in ONNX's gate order and the biases as ONNX's ``[Wb, Rb]``.
Exported models run in any ONNX runtime without fastcells.

    import fastcells
    torch.onnx.export(model, (x,), "model.onnx")                # default (dynamo) exporter
    torch.onnx.export(model, (x,), "model.onnx", dynamo=False)  # TorchScript exporter

``import fastcells`` registers both translations, each right after its
exporter's module is imported (so importing fastcells imports neither
torch.onnx nor ONNX Script). The translation can also be passed explicitly::

    torch.onnx.export(model, (x,), f, custom_translation_table=fastcells.onnx.custom_translation_table())

or use :func:`export`, which does that and checks the model first.

What ONNX's operators cannot express raises ``FastcellsOnnxError`` naming the
option: ``proj_size`` (ONNX's LSTM has no projection), PackedSequence input
(the op's packed layout has no ONNX equivalent; pad the batch and pass dense
input) and dropout between layers in training mode (export in eval mode).
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

from ._cells import cell

__all__ = ["export", "custom_translation_table", "check_exportable", "FastcellsOnnxError"]

# ONNX gate order per cell, as indices into torch's gate blocks:
# torch LSTM i,f,g,o -> ONNX i,o,f,c; torch GRU r,z,n -> ONNX z,r,h.
_GATE_ORDER = {"LSTM": (0, 3, 1, 2), "GRU": (1, 0, 2), "RNN": (0,)}  # by nn_class
_ONNX_OP = {"LSTM": "LSTM", "GRU": "GRU", "RNN": "RNN"}
_RNN_ACTIVATION = {"RNN_TANH": "Tanh", "RNN_RELU": "Relu"}
# Opset the TorchScript symbolic needs (Slice/Reshape with tensor inputs).
_TS_OPSET = 11


class FastcellsOnnxError(ValueError):
    """A fastcells configuration that ONNX's RNN operators cannot express."""


_CELL_STATES_MSG = ("LSTM with return_cell_states=True cannot be exported to ONNX: ONNX's LSTM "
                    "operator returns the last cell state only (Y_c), not every step's. Export "
                    "a model with return_cell_states=False.")


_ZONEOUT_MSG = ("zoneout cannot be exported to ONNX: ONNX's RNN operators have no zoneout (nor "
                "its eval-mode mixing of the previous state). Export a model with zoneout=0.")
_RECURRENT_DROPOUT_MSG = ("recurrent dropout in training mode cannot be exported to ONNX: ONNX's "
                          "RNN operators have no dropout. Call model.eval() before exporting.")


_LAYER_NORM_MSG = ("the LayerNorm cells (LayerNormLSTM, LayerNormGRU) cannot be exported to "
                   "ONNX: ONNX's LSTM and GRU operators have no layer normalisation inside "
                   "the recurrence.")


def _option_error(m) -> Optional[str]:
    """Why ONNX cannot express module `m`'s options torch.nn lacks, or None."""
    if getattr(m, "layer_norm", False):
        return _LAYER_NORM_MSG
    if getattr(m, "return_cell_states", False):
        return _CELL_STATES_MSG
    if getattr(m, "recurrent_dropout", 0.0) and m.training:
        return _RECURRENT_DROPOUT_MSG
    if getattr(m, "zoneout", 0.0):
        return f"zoneout={m.zoneout}: {_ZONEOUT_MSG}"
    return None


def _unsupported(proj_size: int, packed: bool, dropout: bool) -> Optional[str]:
    if proj_size > 0:
        return (f"LSTM with proj_size={proj_size} cannot be exported to ONNX: ONNX's LSTM "
                "operator has no output projection (proj_size). Export a model with "
                "proj_size=0.")
    if packed:
        return ("PackedSequence input cannot be exported to ONNX: ONNX's RNN operators take "
                "dense (T, B, I) input. Pass the padded tensor instead (ONNX has no "
                "per-sequence lengths in this export).")
    if dropout:
        return ("dropout between layers in training mode cannot be exported to ONNX: ONNX's "
                "RNN operators have no dropout. Call model.eval() before exporting, or set "
                "dropout=0.")
    return None


def _emit(b, input, weights, hx, cx, batch_sizes, mode: int, num_layers: int,
          bidirectional: bool, has_biases: bool, proj_size: int, dropout_masks):
    """Build the ONNX graph of one rnn_forward call with builder ``b``.

    Returns (output (T, B, D*H), hy (L*D, B, H), cy (L*D, B, H) or empty,
    reserve (empty)). The input is time-major: the modules transpose
    batch_first input before the op, and that transpose is exported with it.
    """
    c = cell(mode)
    msg = _LAYER_NORM_MSG if c.layer_norm else _unsupported(proj_size, batch_sizes is not None,
                                                            dropout_masks is not None)
    if msg is not None:
        raise FastcellsOnnxError(f"fastcells.onnx: {msg}")
    D = 2 if bidirectional else 1
    G = c.gates
    H = b.static_dim(weights[1], 0, "weight_hh_l0") // G
    per_dir = 4 if has_biases else 2
    order = _GATE_ORDER[c.nn_class]
    rows = [g * H + k for g in order for k in range(H)]
    reorder = None if list(order) == list(range(G)) else b.ints(rows)

    def gates(t):
        return t if reorder is None else b.op("Gather", t, reorder, axis=0)

    def stack(parts):  # per-direction tensors -> (D, ...)
        parts = [b.op("Unsqueeze", p, b.ints([0])) for p in parts]
        return parts[0] if D == 1 else b.op("Concat", *parts, axis=0)

    attrs: Dict[str, Any] = {"hidden_size": H,
                             "direction": "bidirectional" if bidirectional else "forward"}
    if c.nn_class == "GRU":
        # 1: torch.nn's GRU applies r after the W_hn h + b_hn product; 0: the
        # reset-before GRU, r * h before the product (b_hn added as is).
        attrs["linear_before_reset"] = int(c.reset_after)
    if c.name in _RNN_ACTIVATION:
        attrs["activations"] = [_RNN_ACTIVATION[c.name]] * D

    x = input
    hys: List[Any] = []
    cys: List[Any] = []
    y = None
    for layer in range(num_layers):
        ws = [weights[(layer * D + d) * per_dir:(layer * D + d + 1) * per_dir] for d in range(D)]
        W = stack([gates(w[0]) for w in ws])
        R = stack([gates(w[1]) for w in ws])
        B = (stack([b.op("Concat", gates(w[2]), gates(w[3]), axis=0) for w in ws])
             if has_biases else None)
        span = (b.ints([layer * D]), b.ints([(layer + 1) * D]), b.ints([0]))
        h0 = None if hx is None else b.op("Slice", hx, *span)
        inputs = [x, W, R, B, None, h0]
        if c.has_cell_state:
            inputs.append(None if cx is None else b.op("Slice", cx, *span))
        outs = b.op(_ONNX_OP[c.nn_class], *inputs, outputs=3 if c.has_cell_state else 2, **attrs)
        y = outs[0]  # (T, D, B, H)
        hys.append(outs[1])
        if c.has_cell_state:
            cys.append(outs[2])
        if D == 1:
            x = b.op("Reshape", y, b.ints([0, -1, H]))
        else:
            x = b.op("Reshape", b.op("Transpose", y, perm=[0, 2, 1, 3]), b.ints([0, 0, -1]))
    hy = hys[0] if num_layers == 1 else b.op("Concat", *hys, axis=0)
    if c.has_cell_state:
        cy = cys[0] if num_layers == 1 else b.op("Concat", *cys, axis=0)
    else:
        cy = b.empty_like(input)
    return x, hy, cy, b.empty_like(input)


class _TorchScriptBuilder:
    """Builder on a TorchScript exporter graph context (``g.op``)."""

    def __init__(self, g):
        self.g = g

    def ints(self, values):
        return self.g.op("Constant", value_t=torch.tensor(values, dtype=torch.int64))

    def static_dim(self, value, axis, name):
        from torch.onnx import symbolic_helper
        sizes = symbolic_helper._get_tensor_sizes(value)
        if not sizes or sizes[axis] is None:
            raise FastcellsOnnxError(f"fastcells.onnx: the shape of {name} is unknown")
        return int(sizes[axis])

    def empty_like(self, value):
        from torch.onnx import symbolic_helper
        dtype = symbolic_helper._try_get_scalar_type(value)
        dt = dtype.dtype() if dtype is not None else torch.float32
        return self.g.op("Constant", value_t=torch.empty(0, dtype=dt))

    def op(self, name, *inputs, outputs=1, **attrs):
        from torch.onnx import symbolic_opset9
        ins = [symbolic_opset9.unused(self.g) if v is None else v for v in inputs]
        while inputs and inputs[-1] is None:  # trailing optional inputs are simply left off
            inputs = inputs[:-1]
            ins.pop()
        kw = {}
        for k, v in attrs.items():
            if isinstance(v, str) or (isinstance(v, list) and v and isinstance(v[0], str)):
                kw[k + "_s"] = v
            elif isinstance(v, float):
                kw[k + "_f"] = v
            else:
                kw[k + "_i"] = v
        return self.g.op(name, *ins, outputs=outputs, **kw)


def _symbolic(g, input, weights, hx, cx, batch_sizes, mode, num_layers, bidirectional,
              has_biases, proj_size, dropout_masks, need_reserve=None, zoneout=None,
              recurrent_masks=None):
    """TorchScript exporter symbolic of ``fastcells::rnn_forward``."""
    from torch.onnx import symbolic_helper as sh
    if recurrent_masks is not None and not sh._is_none(recurrent_masks):
        raise FastcellsOnnxError(f"fastcells.onnx: {_RECURRENT_DROPOUT_MSG}")
    if zoneout is not None and not sh._is_none(zoneout):
        raise FastcellsOnnxError(f"fastcells.onnx: {_ZONEOUT_MSG}")
    b = _TorchScriptBuilder(g)
    return _emit(b, input, sh._unpack_list(weights), None if sh._is_none(hx) else hx,
                 None if sh._is_none(cx) else cx, None if sh._is_none(batch_sizes) else batch_sizes,
                 sh._get_const(mode, "i", "mode"), sh._get_const(num_layers, "i", "num_layers"),
                 bool(sh._get_const(bidirectional, "b", "bidirectional")),
                 bool(sh._get_const(has_biases, "b", "has_biases")),
                 sh._get_const(proj_size, "i", "proj_size"),
                 None if sh._is_none(dropout_masks) else dropout_masks)


def _dropout_error(*args, **kwargs):
    """Translation of ``fastcells::dropout_masks`` (both exporters): the masks
    exist only in training mode with dropout, which ONNX cannot express."""
    raise FastcellsOnnxError(f"fastcells.onnx: {_unsupported(0, False, True)}")


class _ScriptBuilder:
    """Builder for the dynamo exporter: ONNX Script ops, traced (eager Python)."""

    def __init__(self):
        from onnxscript import opset18
        self.opset = opset18

    def ints(self, values):
        return self.opset.Constant(value_ints=list(values))

    def static_dim(self, value, axis, name):
        shape = getattr(value, "shape", None)
        dim = None if shape is None else shape[axis]
        if not isinstance(dim, int):
            raise FastcellsOnnxError(f"fastcells.onnx: the shape of {name} is unknown")
        return dim

    def empty_like(self, value):
        return self.opset.Slice(self.opset.Reshape(value, self.ints([-1])), self.ints([0]),
                                self.ints([0]))

    def op(self, name, *inputs, outputs=1, **attrs):
        out = getattr(self.opset, name)(*inputs, **attrs)
        if outputs > 1:
            return tuple(out)[:outputs]
        return out


def _make_translation():
    """The ONNX Script (traced) function for ``fastcells.rnn_forward.default``."""
    from onnxscript.function_libs.torch_lib.tensor_typing import TFloat

    def fastcells_rnn_forward(input, weights, hx, cx, batch_sizes=None, mode=0, num_layers=1,
                              bidirectional=False, has_biases=True, proj_size=0,
                              dropout_masks=None, need_reserve=True, zoneout=None,
                              recurrent_masks=None):
        if recurrent_masks is not None:
            raise FastcellsOnnxError(f"fastcells.onnx: {_RECURRENT_DROPOUT_MSG}")
        if zoneout is not None:
            raise FastcellsOnnxError(f"fastcells.onnx: {_ZONEOUT_MSG}")
        return _emit(_ScriptBuilder(), input, list(weights), hx, cx, batch_sizes, mode,
                     num_layers, bidirectional, has_biases, proj_size, dropout_masks)

    # The exporter reads the ONNX signature (inputs vs attributes) from these
    # annotations; real objects, because this module's are strings.
    fastcells_rnn_forward.__annotations__ = {
        "input": TFloat, "weights": Sequence[TFloat], "hx": Optional[TFloat],
        "cx": Optional[TFloat], "batch_sizes": Optional[Sequence[int]], "mode": int,
        "num_layers": int, "bidirectional": bool, "has_biases": bool, "proj_size": int,
        "dropout_masks": Optional[TFloat], "need_reserve": bool, "zoneout": Optional[TFloat],
        "recurrent_masks": Optional[TFloat]}
    return fastcells_rnn_forward


_translation = None


def _translation_fn():
    global _translation
    if _translation is None:
        _translation = _make_translation()
    return _translation


def custom_translation_table() -> Dict[Any, Any]:
    """The translations of fastcells' ops (``rnn_forward``; ``dropout_masks``,
    which raises the dropout error) for the ``custom_translation_table``
    argument of ``torch.onnx.export(dynamo=True)``."""
    return {torch.ops.fastcells.rnn_forward.default: _translation_fn(),
            torch.ops.fastcells.dropout_masks.default: _dropout_error}


def check_exportable(model: nn.Module) -> None:
    """Raise ``FastcellsOnnxError`` if a fastcells module in ``model`` uses an
    option that ONNX cannot express (proj_size; dropout in training mode)."""
    from .modules import _FusedRNNBase
    for name, m in model.named_modules():
        if not isinstance(m, _FusedRNNBase):
            continue
        dropout = m.training and m.dropout > 0 and m.num_layers > 1
        msg = _unsupported(m.proj_size, False, dropout)
        if msg is None:
            msg = _option_error(m)
        if msg is not None:
            raise FastcellsOnnxError(f"fastcells.onnx: `{name or type(m).__name__}`: {msg}")


def _packed_check(seen: List[FastcellsOnnxError]):
    def hook(module, args, kwargs):
        from torch.nn.utils.rnn import PackedSequence
        x = args[0] if args else kwargs.get("input")
        if isinstance(x, PackedSequence):
            seen.append(FastcellsOnnxError(f"fastcells.onnx: {type(module).__name__}: "
                                           f"{_unsupported(0, True, False)}"))
            raise seen[-1]
    return hook


def export(model: nn.Module, args, f=None, *, dynamo: bool = True, **kwargs):
    """``torch.onnx.export`` with the fastcells translation, checking the model
    first (:func:`check_exportable`) and the modules' inputs while it traces
    (PackedSequence input fails in torch.export before any translation runs).
    Arguments are torch.onnx.export's; returns what it returns (an
    ``ONNXProgram`` with ``dynamo=True``)."""
    import torch.onnx

    from .modules import _FusedRNNBase
    check_exportable(model)
    if dynamo:
        table = dict(kwargs.pop("custom_translation_table", None) or {})
        for op, fn in custom_translation_table().items():
            table.setdefault(op, fn)
        kwargs["custom_translation_table"] = table
    else:
        _register_torchscript()
    seen: List[FastcellsOnnxError] = []
    handles = [m.register_forward_pre_hook(_packed_check(seen), with_kwargs=True)
               for m in model.modules() if isinstance(m, _FusedRNNBase)]
    try:
        return torch.onnx.export(model, args, f, dynamo=dynamo, **kwargs)
    except Exception as e:
        if seen and e is not seen[0]:  # the exporter wraps it in its own error
            raise seen[0] from e
        raise
    finally:
        for h in handles:
            h.remove()


# --- registration ---------------------------------------------------------------------------
# ``import fastcells`` must stay cheap, so neither torch.onnx (70 ms) nor ONNX
# Script (seconds) is imported for the registrations: each is made right after
# the module it needs has been imported, by whoever imports it.

_registered = set()


def _register_torchscript(torch_onnx=None) -> None:
    """The symbolic of ``fastcells::rnn_forward`` for torch.onnx.export(dynamo=False)."""
    if "torchscript" in _registered:
        return
    torch_onnx = torch_onnx or importlib.import_module("torch.onnx")
    torch_onnx.register_custom_op_symbolic("fastcells::rnn_forward", _symbolic, _TS_OPSET)
    torch_onnx.register_custom_op_symbolic("fastcells::dropout_masks", _dropout_error, _TS_OPSET)
    _registered.add("torchscript")


def _register_dynamo(_module=None) -> None:
    """Add the translation to ONNX Script's torchlib registry, which every
    torch.onnx.export(dynamo=True) copies into its own registry."""
    if "dynamo" in _registered:
        return
    from onnxscript.function_libs.torch_lib.registration import torch_op
    torch_op("fastcells::rnn_forward", trace_only=True)(_translation_fn())
    torch_op("fastcells::dropout_masks", trace_only=True)(_dropout_error)
    _registered.add("dynamo")


# module -> registration to run once it is imported. torch's
# ONNXRegistry.from_torchlib imports the torchlib ops package, then reads the
# torchlib registry, so registering after that import is in time.
_AFTER_IMPORT = {
    "torch.onnx": _register_torchscript,
    "onnxscript.function_libs.torch_lib.ops": _register_dynamo,
}


class _AfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Import hook: runs the registration of a module of ``_AFTER_IMPORT`` right
    after that module's own code."""

    def __init__(self):
        self._loaders = {}

    def find_spec(self, fullname, path, target=None):
        if fullname not in _AFTER_IMPORT or fullname in self._loaders:
            return None
        self._loaders[fullname] = None  # find the real spec without finding ourselves
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            del self._loaders[fullname]
        if spec is None or spec.loader is None:
            return None
        self._loaders[fullname] = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self._loaders[spec.name].create_module(spec)

    def exec_module(self, module):
        name = module.__spec__.name
        loader = self._loaders.pop(name)
        module.__spec__.loader = module.__loader__ = loader
        loader.exec_module(module)
        try:
            _AFTER_IMPORT[name](module)
        except Exception as e:  # an exporter must keep working for models without fastcells
            warnings.warn(f"fastcells.onnx: could not register the ONNX translation of "
                          f"fastcells::rnn_forward after importing {name} ({e!r}); use "
                          "fastcells.onnx.export(...) instead.", stacklevel=2)
        if not self._loaders and all(n in sys.modules for n in _AFTER_IMPORT):
            sys.meta_path.remove(self)


def _install() -> None:
    """Called by ``import fastcells``: register now what is already imported,
    the rest when it is."""
    pending = False
    for name, register in _AFTER_IMPORT.items():
        if name in sys.modules:
            register(sys.modules[name])
        else:
            pending = True
    if pending and not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())
