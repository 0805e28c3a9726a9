"""Drop-in replacements for torch.nn.LSTM / GRU / RNN and the three Cell modules.

Constructor signatures, parameter names, shapes, initialisation, forward
signatures and return structures are torch.nn's: the sequence modules inherit
``torch.nn.RNNBase`` (which creates and initialises the parameters exactly as
torch.nn does), the cells inherit the torch.nn cell classes; only ``forward``
differs, and it runs one fused op for the whole stack of layers and
directions (``fastcells.functional.rnn``).

The sequence modules deliberately do not inherit ``torch.nn.LSTM`` & co:
TorchDynamo refuses to trace those classes, while fastcells modules compile
with ``torch.compile(fullgraph=True)``.
"""
from __future__ import annotations

import copy
import operator
import warnings
from typing import Optional, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.rnn import PackedSequence

from ._cells import CELLS, MODES, Cell, cell_named, cell_of_module
from ._ops import rnn

__all__ = ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell", "LayerNormLSTM",
           "LayerNormGRU", "convert"]


def _sizes(m: nn.RNNBase) -> Tuple[int, int, int]:
    """(D, H, P): directions, hidden size, output size (proj_size or H)."""
    H = m.hidden_size
    return (2 if m.bidirectional else 1), H, (m.proj_size if m.proj_size > 0 else H)


def _inverted_dropout(shape: Tuple[int, ...], p: float, like: Tensor) -> Tensor:
    """Inverted-dropout multipliers of `shape`: 0 with probability p, else 1 / (1 - p)."""
    if p == 1.0:
        return like.new_zeros(shape)
    if like.device.type == "cpu":
        # One draw from torch's generator seeds a parallel counter-based
        # generator (csrc/dropout.cpp): same statistics, a fraction of the time.
        seed = torch.randint(-2**63, 2**63 - 1, (), dtype=torch.int64)
        return torch.ops.fastcells.dropout_masks(shape, p, seed, like.dtype)
    keep = like.new_empty(shape).bernoulli_(1.0 - p)
    return keep.div_(1.0 - p)


def _dropout_masks(module: nn.RNNBase, rows: Tuple[int, ...], like: Tensor) -> Optional[Tensor]:
    """Inverted-dropout multipliers (L-1, *rows, D*P) for the inputs of layers 1..L-1."""
    p = float(module.dropout)
    if not module.training or p == 0.0 or module.num_layers == 1:
        return None
    D, _, P = _sizes(module)
    return _inverted_dropout((module.num_layers - 1, *rows, D * P), p, like)


def _zoneout_weights(module: nn.RNNBase, rows: Tuple[int, ...], like: Tensor,
                     has_cell_state: bool) -> Optional[Tensor]:
    """Zoneout's keep-previous weights (L*D, *rows, Z), Z = P (+ H for the LSTM's c):
    in training 1 with probability p (each unit keeps its previous h and c), else 0,
    drawn in one call from torch's generator; in eval p (the expectation)."""
    p = float(_option(module, "zoneout", 0.0))
    if p == 0.0:
        return None
    D, H, P = _sizes(module)
    shape = (module.num_layers * D, *rows, P + (H if has_cell_state else 0))
    if not module.training or p == 1.0:
        return like.new_full(shape, p)
    # A unit survives inverted dropout at rate 1 - p with probability p.
    return (_inverted_dropout(shape, 1.0 - p, like) != 0).to(like.dtype)


def _recurrent_masks(module: nn.RNNBase, B: int, like: Tensor) -> Optional[Tensor]:
    """Variational recurrent dropout (training only): inverted-dropout multipliers
    (L*D, B, P) of h_{t-1} in the recurrent product, one mask per sequence for all
    its steps, drawn in one call from torch's generator."""
    p = float(_option(module, "recurrent_dropout", 0.0))
    if p == 0.0 or not module.training:
        return None
    D, _, P = _sizes(module)
    return _inverted_dropout((module.num_layers * D, B, P), p, like)


def _check_rate(m, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not 0.0 <= value <= 1.0:
        raise ValueError(f"{type(m).__name__}: {name} must be a number in [0, 1], got "
                         f"{value!r}")
    return float(value)


class _NoTorchScript:
    """TorchScript cannot compile the fused modules; say what to use instead."""

    def __prepare_scriptable__(self):
        raise RuntimeError(
            f"fastcells.{type(self).__name__} cannot be compiled with torch.jit.script "
            "(its custom op and PackedSequence handling are outside TorchScript). Use "
            "torch.compile(model, fullgraph=True) or torch.export.export(model, args) instead.")


# ---------------------------------------------------------------- forward steps
# Each works on any torch.nn.RNNBase (m).


def _current_weights(m):
    """The weights in torch.nn's flat order, as this call must see them.

    ``_flat_weights`` follows assignments through RNNBase.__setattr__ (new
    Parameters, hook-based weight_norm / spectral_norm). It does not follow
    parametrizations (torch.nn.utils.parametrize, parametrizations.weight_norm:
    recomputed on every attribute access), tensors put straight into
    ``_parameters`` (torch.func.functional_call) or weights moved out of
    ``_parameters`` (weight drop). torch.nn re-reads its weights in forward for
    these, and so does this: when any flat weight is not the registered
    Parameter, every weight is read by attribute.
    """
    flat = m._flat_weights
    # (map over C callables: a Python loop here cost about 0.3 us per call.)
    if all(map(operator.is_, map(m._parameters.get, m._flat_weights_names), flat)):
        return flat
    return [getattr(m, n) for n in m._flat_weights_names]


def _unpack_input(m, input):
    """(time-major data, batch, batched, batch_sizes list or None, sorted_indices)."""
    if isinstance(input, PackedSequence):
        batch_sizes = input.batch_sizes.tolist()
        B = batch_sizes[0] if batch_sizes else 0
        return input.data, B, True, batch_sizes, input.sorted_indices
    if input.dim() not in (2, 3):
        raise ValueError(f"{type(m).__name__}: Expected input to be 2D or 3D, got "
                         f"{input.dim()}D tensor instead")
    batched = input.dim() == 3
    x = input if batched else input.unsqueeze(1)
    if m.batch_first and batched:
        x = x.transpose(0, 1)
    return x, x.shape[1], batched, None, None


def _check_input(m, x: Tensor) -> None:
    """torch.nn's check_input: dtype against the weights, feature size."""
    w0 = m._flat_weights[0]
    if (w0 is not None and x.dtype != w0.dtype
            and not torch._C._is_any_autocast_enabled()):
        # torch.nn's exception class and message.
        raise ValueError(f"RNN input dtype ({x.dtype}) does not match weight dtype "
                         f"({w0.dtype}). Convert input: input.to({w0.dtype}), or convert "
                         f"model: model.to({x.dtype})")
    if x.shape[-1] != m.input_size:
        raise RuntimeError(f"{type(m).__name__}: input.size(-1) must be equal to "
                           f"input_size. Expected {m.input_size}, got {x.shape[-1]}")


# The torch.nn modules whose ATen op is on CPU autocast's lower-precision list
# (torch 2.13: mkldnn_rnn_layer for LSTM, rnn_tanh / rnn_relu and their cells):
# under torch.autocast("cpu") they run in the region's dtype whatever the
# input's. GRU, GRUCell and LSTMCell are composite there: an input in the
# region's dtype gives that dtype, any other float32.
_CPU_AUTOCAST_CASTS = frozenset({"LSTM", "RNN", "RNNCell"})


def _cpu_autocast(torch_name: str, x: Tensor, weights, h0, c0, masks):
    """The op's arguments under torch.autocast("cpu"), in the dtype torch.nn's
    module `torch_name` returns there (float64 is never cast, as autocast
    leaves it); unchanged outside a CPU autocast region."""
    if (not torch._C._is_any_autocast_enabled() or x.device.type != "cpu"
            or not torch.is_autocast_enabled("cpu")):
        return x, weights, h0, c0, masks
    dt = torch.get_autocast_dtype("cpu")
    if torch_name not in _CPU_AUTOCAST_CASTS and x.dtype != dt:
        dt = torch.float32

    def cast(t):
        return t.to(dt) if t is not None and t.is_floating_point() and \
            t.dtype != torch.float64 else t

    return cast(x), [cast(w) for w in weights], cast(h0), cast(c0), cast(masks)


def _option(m, name: str, default):
    """An option torch.nn modules lack (reset_after, return_cell_states): from the
    instance or its class, else `default`. Not getattr: on a miss it runs
    nn.Module.__getattr__ and its exception, about 0.5 us per call."""
    d = m.__dict__
    return d[name] if name in d else getattr(type(m), name, default)


def _op_cell(m) -> Cell:
    """The table row a module runs: its torch.nn mode, the reset-before GRU for
    ``reset_after=False``, or a LayerNorm cell (torch.nn modules have neither
    attribute)."""
    c = cell_named(m.mode)
    reset_after, layer_norm = _option(m, "reset_after", True), _option(m, "layer_norm", False)
    if reset_after and not layer_norm:
        return c
    return cell_of_module(c.nn_class, c.nonlinearity, reset_after, layer_norm)


def _initial_state(m, hx, has_cell_state: bool, B: int, batched: bool, sorted_indices):
    """(h_0, c_0) in the op's layout, or (None, None) for zero states."""
    if hx is None:
        return None, None  # zero initial states, created inside the op
    D, H, P = _sizes(m)
    L = m.num_layers
    if batched and sorted_indices is None:  # the common case: shapes checked at once
        h0, c0 = hx if has_cell_state and isinstance(hx, tuple) and len(hx) == 2 else (hx, None)
        if isinstance(h0, Tensor) and h0.shape == (L * D, B, P) and (
                (c0 is None and not has_cell_state) or
                (isinstance(c0, Tensor) and c0.shape == (L * D, B, H))):
            return h0, c0
    name = type(m).__name__
    if has_cell_state:
        if not isinstance(hx, (tuple, list)) or len(hx) != 2:
            raise ValueError(f"{name}: hx must be a tuple (h_0, c_0)")
        h0, c0 = hx
    else:
        h0, c0 = hx, None
    want = 3 if batched else 2
    for t, n in ((h0, "h_0"), (c0, "c_0")):
        if t is not None and t.dim() != want:
            raise RuntimeError(
                f"{name}: for {'batched 3-D' if batched else 'unbatched 2-D'} input, "
                f"{n} should be {want}-D but got {t.dim()}-D tensor")
    if not batched:
        h0 = h0.unsqueeze(1)
        c0 = c0.unsqueeze(1) if c0 is not None else None
    if sorted_indices is not None:
        h0 = h0.index_select(1, sorted_indices)
        c0 = c0.index_select(1, sorted_indices) if c0 is not None else None
    if h0.shape != (L * D, B, P):  # (torch.Size compares with a tuple)
        raise RuntimeError(f"{name}: Expected hidden{'[0]' if has_cell_state else ''} size "
                           f"{(L * D, B, P)}, got {list(h0.shape)}")
    if c0 is not None and c0.shape != (L * D, B, H):
        raise RuntimeError(f"{name}: Expected hidden[1] size {(L * D, B, H)}, "
                           f"got {list(c0.shape)}")
    return h0, c0


def _wrap_sequence(m, input, seq: Tensor, batched: bool):
    """A per-step result (output or cell states) in the caller's layout."""
    if isinstance(input, PackedSequence):
        return PackedSequence(seq, input.batch_sizes, input.sorted_indices,
                              input.unsorted_indices)
    if m.batch_first and batched:
        seq = seq.transpose(0, 1)
    return seq if batched else seq.squeeze(1)


def _wrap_output(m, input, out: Tensor, hy: Tensor, cy: Optional[Tensor], batched: bool):
    """The op's results in the caller's layout (packed, batch_first, unbatched)."""
    output = _wrap_sequence(m, input, out, batched)
    if isinstance(input, PackedSequence):
        if input.unsorted_indices is not None:
            hy = hy.index_select(1, input.unsorted_indices)
            cy = cy.index_select(1, input.unsorted_indices) if cy is not None else None
    elif not batched:
        hy = hy.squeeze(1)
        cy = cy.squeeze(1) if cy is not None else None
    return output, hy, cy


class _OptionsRepr:
    """The torch.nn repr, with the options torch.nn lacks when not at their
    defaults (reset_after=False, return_cell_states=True, zoneout=p)."""

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if not _option(self, "reset_after", True):
            s += ", reset_after=False"
        if _option(self, "return_cell_states", False):
            s += ", return_cell_states=True"
        if _option(self, "zoneout", 0.0):
            s += f", zoneout={self.zoneout}"
        if _option(self, "recurrent_dropout", 0.0):
            s += f", recurrent_dropout={self.recurrent_dropout}"
        return s


class _FusedRNNBase(_NoTorchScript, nn.RNNBase):
    """Shared forward of LSTM, GRU and RNN (torch.nn semantics).

    ``forward`` and the functions it calls only use torch.nn.RNNBase's
    attributes, so patch_torch_nn() and convert() of subclasses run it on
    torch.nn's own classes as it is.
    """

    def forward(self, input: Union[Tensor, PackedSequence], hx=None):
        c = _op_cell(self)
        has_cell_state = c.has_cell_state
        x, B, batched, batch_sizes, sorted_indices = _unpack_input(self, input)
        _check_input(self, x)
        h0, c0 = _initial_state(self, hx, has_cell_state, B, batched, sorted_indices)
        rows = (x.shape[0],) if batch_sizes is not None else (x.shape[0], B)
        masks = _dropout_masks(self, rows, x)
        zone = _zoneout_weights(self, rows, x, has_cell_state)
        rmasks = _recurrent_masks(self, B, x)
        input_dtype = x.dtype
        x, weights, h0, c0, masks = _cpu_autocast(c.nn_class, x, _current_weights(self), h0, c0,
                                                  masks)
        cell_states = _option(self, "return_cell_states", False)
        if (cell_states or zone is not None or rmasks is not None or c.layer_norm) and \
                torch.onnx.is_in_onnx_export():
            from .onnx import FastcellsOnnxError, _option_error
            raise FastcellsOnnxError(f"fastcells.onnx: {_option_error(self)}")
        out, hy, cy, *cs = rnn(x, weights, h0, c0, batch_sizes, c.code, self.num_layers,
                               self.bidirectional, self.bias, self.proj_size, masks,
                               return_cell_states=cell_states, zoneout=zone,
                               recurrent_masks=rmasks)
        if cy is not None and self.proj_size > 0 and x.dtype != input_dtype:
            # Cast by CPU autocast: torch.nn's projected LSTM is composite there
            # and keeps c_n in the input's dtype.
            cy = cy.to(input_dtype)
        output, hy, cy = _wrap_output(self, input, out, hy, cy, batched)
        state = (hy, cy) if has_cell_state else hy
        if cell_states:
            return output, state, _wrap_sequence(self, input, cs[0], batched)
        return output, state


class LSTM(_OptionsRepr, _FusedRNNBase):
    """Fused drop-in for :class:`torch.nn.LSTM` (same arguments, parameters and returns).

    ``return_cell_states=True`` (not in torch.nn) makes forward return a third
    value: the last layer's cell state c_t at every step, laid out like
    ``output`` (a PackedSequence for packed input, batch-first with
    ``batch_first``) with ``D * hidden_size`` features (hidden_size, not
    proj_size, per direction). Gradients flow through it (first derivatives,
    on the CPU); ``output, (h_n, c_n), cell_states = lstm(x)``.
    """

    def __init__(self, *args, return_cell_states: bool = False, zoneout: float = 0.0,
                 recurrent_dropout: float = 0.0, **kwargs):
        if not isinstance(return_cell_states, bool):
            raise TypeError(f"LSTM: return_cell_states must be a bool, got "
                            f"{return_cell_states!r}")
        zoneout = _check_rate(self, "zoneout", zoneout)
        recurrent_dropout = _check_rate(self, "recurrent_dropout", recurrent_dropout)
        super().__init__("LSTM", *args, **kwargs)
        self.return_cell_states = return_cell_states
        self.zoneout = zoneout
        self.recurrent_dropout = recurrent_dropout


def _check_reset_after(m, reset_after) -> None:
    if not isinstance(reset_after, bool):
        raise TypeError(f"{type(m).__name__}: reset_after must be a bool, got {reset_after!r}")


class GRU(_OptionsRepr, _FusedRNNBase):
    """Fused drop-in for :class:`torch.nn.GRU`.

    ``reset_after=True`` (the default) is torch.nn's convention, the reset gate
    applied after the recurrent product: ``n = tanh(W_in x + b_in + r * (W_hn h
    + b_hn))``. ``reset_after=False`` is the original GRU (Cho et al. 2014; Keras
    ``reset_after=False``, ONNX ``linear_before_reset=0``), which torch.nn does
    not have: ``n = tanh(W_in x + b_in + W_hn (r * h) + b_hn)``. Both have
    torch.nn's GRU parameters, names and shapes.
    """

    def __init__(self, *args, reset_after: bool = True, zoneout: float = 0.0,
                 recurrent_dropout: float = 0.0, **kwargs):
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        _check_reset_after(self, reset_after)
        zoneout = _check_rate(self, "zoneout", zoneout)
        recurrent_dropout = _check_rate(self, "recurrent_dropout", recurrent_dropout)
        super().__init__("GRU", *args, **kwargs)
        self.reset_after = reset_after
        self.zoneout = zoneout
        self.recurrent_dropout = recurrent_dropout


class RNN(_OptionsRepr, _FusedRNNBase):
    """Fused drop-in for :class:`torch.nn.RNN` (``nonlinearity`` 'tanh' or 'relu')."""

    def __init__(self, *args, zoneout: float = 0.0, recurrent_dropout: float = 0.0, **kwargs):
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        zoneout = _check_rate(self, "zoneout", zoneout)
        recurrent_dropout = _check_rate(self, "recurrent_dropout", recurrent_dropout)
        if len(args) > 3:
            self.nonlinearity = args[3]
            args = args[:3] + args[4:]
        else:
            self.nonlinearity = kwargs.pop("nonlinearity", "tanh")
        if self.nonlinearity == "tanh":
            mode = "RNN_TANH"
        elif self.nonlinearity == "relu":
            mode = "RNN_RELU"
        else:
            raise ValueError(f"Unknown nonlinearity '{self.nonlinearity}'. "
                             "Select from 'tanh' or 'relu'.")
        super().__init__(mode, *args, **kwargs)
        self.zoneout = zoneout
        self.recurrent_dropout = recurrent_dropout


class _LayerNormRNN(_OptionsRepr, _FusedRNNBase):
    """torch.nn's recurrent parameters plus the layer-norm ones, after them in
    each layer and direction's flat weights (the op's order, fastcells/_ops.py):
    ``ln_ih_weight_l{k}``, ``ln_hh_weight_l{k}`` (G*H, the gains of LN(x W_ih^T)
    and LN(h W_hh^T)) and for the LSTM ``ln_cell_weight_l{k}``,
    ``ln_cell_bias_l{k}`` (H, LN(c_t)), ``_reverse`` for the second direction.
    Gains start at 1, the cell state's LN bias at 0."""

    layer_norm = True  # read by _op_cell: the table's LayerNorm row of this mode

    def __init__(self, mode: str, input_size: int, hidden_size: int, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, recurrent_dropout: float = 0.0,
                 zoneout: float = 0.0, device=None, dtype=None):
        zoneout = _check_rate(self, "zoneout", zoneout)
        recurrent_dropout = _check_rate(self, "recurrent_dropout", recurrent_dropout)
        super().__init__(mode, input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, device=device, dtype=dtype)
        H, G = hidden_size, cell_named(mode).gates
        sizes = [("ln_ih_weight", G * H), ("ln_hh_weight", G * H)]
        if cell_named(mode).has_cell_state:
            sizes += [("ln_cell_weight", H), ("ln_cell_bias", H)]
        D = 2 if bidirectional else 1
        for k, names in enumerate(self._all_weights):
            suffix = f"_l{k // D}" + ("_reverse" if k % D else "")
            for base, n in sizes:
                setattr(self, base + suffix, nn.Parameter(torch.empty(n, device=device,
                                                                      dtype=dtype)))
                names.append(base + suffix)
        self._flat_weights_names = [n for names in self._all_weights for n in names]
        self._init_flat_weights()
        self._reset_layer_norm()
        self.zoneout = zoneout
        self.recurrent_dropout = recurrent_dropout

    def _layer_norm_names(self):
        return [n for n in self._flat_weights_names if n.startswith("ln_")]

    def _reset_layer_norm(self) -> None:
        with torch.no_grad():
            for n in self._layer_norm_names():
                getattr(self, n).fill_(0.0 if n.startswith("ln_cell_bias") else 1.0)

    def reset_parameters(self) -> None:
        """torch.nn's initialisation of its parameters; gains 1, LN bias 0."""
        super().reset_parameters()
        if hasattr(self, "_flat_weights_names"):  # (RNNBase.__init__ calls this first)
            self._reset_layer_norm()

    def flatten_parameters(self) -> None:
        """No-op: cuDNN's flat weight layout has no place for the layer-norm
        parameters, and the LayerNorm cells run on the CPU."""


class LayerNormLSTM(_LayerNormRNN):
    """LSTM with layer normalisation inside the recurrence (haste's LayerNormLSTM):
    ``gates = LN(x W_ih^T; g_ih) + LN(h W_hh^T; g_hh) + b_ih + b_hh``,
    ``c' = f * c + i * g``, ``h' = o * tanh(LN(c'; g_c, b_c))``, LN over the
    last dimension with eps 1e-5. Arguments, forward and returns as
    torch.nn.LSTM without ``proj_size``; parameters as _LayerNormRNN says.
    ``recurrent_dropout`` and ``return_cell_states`` (the c_t before their LN)
    as in :class:`LSTM`. Fused on the CPU."""

    def __init__(self, *args, return_cell_states: bool = False, **kwargs):
        if not isinstance(return_cell_states, bool):
            raise TypeError(f"LayerNormLSTM: return_cell_states must be a bool, got "
                            f"{return_cell_states!r}")
        if kwargs.get("proj_size"):
            raise ValueError("LayerNormLSTM: proj_size is not supported (the LayerNorm LSTM "
                             "has no output projection)")
        kwargs.pop("proj_size", None)
        if kwargs.get("zoneout"):
            raise ValueError("LayerNormLSTM: zoneout is not supported (h_t comes from "
                             "LN(c_t)); use LayerNormGRU or LSTM for zoneout")
        super().__init__("LSTM", *args, **kwargs)
        self.return_cell_states = return_cell_states


class LayerNormGRU(_LayerNormRNN):
    """GRU with layer normalisation of its two products inside the recurrence:
    torch.nn's GRU (reset gate after the product) with ``x W_ih^T`` replaced by
    ``LN(x W_ih^T; g_ih)`` and ``h W_hh^T`` by ``LN(h W_hh^T; g_hh)``, the
    biases added after. Arguments, forward and returns as torch.nn.GRU;
    ``zoneout`` and ``recurrent_dropout`` as in :class:`GRU`. Fused on the CPU."""

    def __init__(self, *args, **kwargs):
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        super().__init__("GRU", *args, **kwargs)


def _cell_forward(cell: nn.RNNCellBase, mode: int, input: Tensor, h0: Optional[Tensor],
                  c0: Optional[Tensor]):
    name = type(cell).__name__
    if input.dim() not in (1, 2):
        raise ValueError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
    batched = input.dim() == 2
    for t, n in ((h0, "hx"), (c0, "cx")):
        if t is not None and t.dim() != input.dim():
            raise ValueError(f"{name}: Expected {n} to be {input.dim()}D, got {t.dim()}D "
                             "instead")
    x = input if batched else input.unsqueeze(0)
    if x.shape[1] != cell.input_size:
        raise RuntimeError(f"{name}: input has inconsistent input_size: got {x.shape[1]} "
                           f"expected {cell.input_size}")
    B, H = x.shape[0], cell.hidden_size
    h = None if h0 is None else (h0 if batched else h0.unsqueeze(0)).unsqueeze(0)
    c = None
    if CELLS[mode].has_cell_state:
        c = None if c0 is None else (c0 if batched else c0.unsqueeze(0)).unsqueeze(0)
        if (h is None) != (c is None):  # the op takes both states or neither
            h = x.new_zeros((1, B, H)) if h is None else h
            c = x.new_zeros((1, B, H)) if c is None else c
    weights = [cell.weight_ih, cell.weight_hh]
    if cell.bias:
        weights += [cell.bias_ih, cell.bias_hh]
    for t, n in ((h, "hx"), (c, "cx")):
        if t is not None and tuple(t.shape[1:]) != (B, H):
            raise RuntimeError(f"{name}: Expected {n} of shape {(B, H)}, got "
                               f"{list(t.shape[1:])}")
    x, weights, h, c, _ = _cpu_autocast(CELLS[mode].nn_class + "Cell", x, weights, h, c, None)
    _, hy, cy = rnn(x.unsqueeze(0), weights, h, c, None, mode, 1, False, cell.bias, 0)
    hy = hy[0] if batched else hy[0, 0]
    if cy is None:
        return hy
    return hy, (cy[0] if batched else cy[0, 0])


class LSTMCell(_NoTorchScript, nn.LSTMCell):
    """Fused drop-in for :class:`torch.nn.LSTMCell`; returns ``(h_1, c_1)``."""

    def forward(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None):
        h0, c0 = hx if hx is not None else (None, None)
        return _cell_forward(self, MODES["LSTM"], input, h0, c0)


class GRUCell(_OptionsRepr, _NoTorchScript, nn.GRUCell):
    """Fused drop-in for :class:`torch.nn.GRUCell`; returns ``h_1``.
    ``reset_after`` as in :class:`GRU`."""

    def __init__(self, *args, reset_after: bool = True, **kwargs):
        _check_reset_after(self, reset_after)
        super().__init__(*args, **kwargs)
        self.reset_after = reset_after

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        reset_after = getattr(self, "reset_after", True)  # absent on a converted torch.nn cell
        return _cell_forward(self, cell_of_module("GRUCell", None, reset_after).code, input, hx,
                             None)


class RNNCell(_NoTorchScript, nn.RNNCell):
    """Fused drop-in for :class:`torch.nn.RNNCell`; returns ``h_1``."""

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        return _cell_forward(self, cell_of_module("RNNCell", self.nonlinearity).code, input, hx,
                             None)


_SWAPS = {nn.LSTM: LSTM, nn.GRU: GRU, nn.RNN: RNN,
          nn.LSTMCell: LSTMCell, nn.GRUCell: GRUCell, nn.RNNCell: RNNCell}


def _swap(module: nn.Module) -> nn.Module:
    """A fastcells module that shares ``module``'s Parameter objects (no copy)."""
    return _rebuild_as(module, _SWAPS[type(module)])


def _rebuild_as(module: nn.Module, cls: type) -> nn.Module:
    """A `cls` module with `module`'s state and the very same Parameter objects."""
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    # Containers (parameters, buffers, hook dicts, ...) are copied one level
    # deep: hooks registered on the new module must not fire on the old one.
    for name, value in module.__dict__.items():
        if isinstance(value, (dict, list, set)):
            new.__dict__[name] = copy.copy(value)
    if isinstance(new, nn.RNNBase):
        new._init_flat_weights()
    return new


def convert(model: nn.Module) -> nn.Module:
    """Swap every torch.nn LSTM/GRU/RNN (and Cell) inside ``model`` for fastcells.

    The swap is in place and keeps the very same Parameter objects, so an
    optimizer built before the call keeps training the converted model.
    Returns ``model``, or the fastcells module when ``model`` itself is one of
    the six torch.nn classes. A user subclass of torch.nn.LSTM / GRU / RNN keeps
    its object, class relations, methods and Parameters and gets a generated
    class whose ``super().forward`` is the fused op (fastcells/_subclass.py).
    Modules it cannot swap are left as they are with a warning: ones with
    parametrizations (convert first, then parametrize) and user subclasses of
    the torch.nn Cell classes.
    """
    from . import _subclass

    if type(model) in _SWAPS:
        return _swap(model)
    if _subclass.convertible(type(model)):
        model.__class__ = _subclass.fused_subclass(type(model))
        return model
    # One swap per module object: a module held under several names (or by
    # several parents) stays one shared module.
    swapped = {}
    for parent in list(model.modules()):
        # parent._modules, not named_children(): that skips a second name for
        # a module already seen under the same parent.
        for child_name, child in list(parent._modules.items()):
            if child is None:
                continue
            base = parametrize.type_before_parametrizations(child)
            if type(child) in _SWAPS:
                if id(child) not in swapped:
                    swapped[id(child)] = _swap(child)
                setattr(parent, child_name, swapped[id(child)])
            elif base in _SWAPS:
                warnings.warn(
                    f"fastcells.convert: left `{child_name}` ({base.__name__}) as torch.nn: it "
                    "has parametrizations, whose class cannot be swapped. Convert first, then "
                    "register the parametrizations on the fastcells module.", stacklevel=2)
            elif _subclass.convertible(type(child)):
                child.__class__ = _subclass.fused_subclass(type(child))
            elif (isinstance(child, tuple(_SWAPS))
                  and not isinstance(child, tuple(_SWAPS.values()))
                  and not _subclass.is_generated(type(child))):
                warnings.warn(
                    f"fastcells.convert: left `{child_name}` ({type(child).__name__}) as torch.nn: "
                    "it subclasses a torch.nn cell class, and its own code may depend on that "
                    "class. Make it subclass the fastcells class instead to use the fused op.",
                    stacklevel=2)
    return model


__all__ += ["revert"]

_REVERTS = {fast: torch_cls for torch_cls, fast in _SWAPS.items()}


def _no_twin_reason(module: nn.Module) -> Optional[str]:
    """Why torch.nn has no module that computes what ``module`` does, or None."""
    if isinstance(module, _LayerNormRNN):
        return (f"{type(module).__name__} normalises inside the recurrence, which torch.nn's "
                "recurrent modules do not")
    if not _option(module, "reset_after", True):
        return "it has reset_after=False (the reset-before GRU), which torch.nn does not have"
    if _option(module, "return_cell_states", False):
        return ("it has return_cell_states=True, which torch.nn's LSTM does not have (its "
                "forward would return two values instead of three)")
    if _option(module, "zoneout", 0.0):
        return f"it has zoneout={module.zoneout}, which torch.nn does not have"
    if _option(module, "recurrent_dropout", 0.0):
        return (f"it has recurrent_dropout={module.recurrent_dropout}, which torch.nn does not "
                "have")
    return None


def _swap_back(module: nn.Module) -> nn.Module:
    """The torch.nn module that shares ``module``'s Parameter objects (no copy)."""
    new = _rebuild_as(module, _REVERTS[type(module)])
    new.__dict__.pop("reset_after", None)
    new.__dict__.pop("return_cell_states", None)
    new.__dict__.pop("zoneout", None)
    new.__dict__.pop("recurrent_dropout", None)
    return new


def revert(model: nn.Module) -> nn.Module:
    """The inverse of :func:`convert`: swap every fastcells LSTM/GRU/RNN (and
    Cell) inside ``model`` back to the torch.nn module of the same configuration,
    for tools that only know torch.nn (torch.jit.script, quantization, ...).

    Like convert, the swap is in place and keeps the very same Parameter objects
    (an optimizer keeps training the model), hooks and buffers. Returns
    ``model``, or the torch.nn module when ``model`` itself is a fastcells
    module. User subclasses of the torch.nn classes that convert() gave the
    fused forward get their own class back. Left as they are, with a warning:
    modules with parametrizations and user subclasses of the fastcells classes.
    """
    from . import _subclass

    if type(model) in _REVERTS or isinstance(model, _LayerNormRNN):
        reason = _no_twin_reason(model)
        if reason is not None:
            raise ValueError(f"fastcells.revert: cannot revert this {type(model).__name__}: "
                             f"{reason}")
        return _swap_back(model)
    if _subclass.is_generated(type(model)):
        model.__class__ = _subclass.original_class(type(model))
        return model
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            base = parametrize.type_before_parametrizations(child)
            if (type(child) in _REVERTS or isinstance(child, _LayerNormRNN)) and \
                    _no_twin_reason(child) is not None:
                warnings.warn(
                    f"fastcells.revert: left `{child_name}` ({type(child).__name__}) as "
                    f"fastcells: {_no_twin_reason(child)}.", stacklevel=2)
            elif type(child) in _REVERTS:
                setattr(parent, child_name, _swap_back(child))
            elif _subclass.is_generated(type(child)):  # a user subclass convert() fused
                child.__class__ = _subclass.original_class(type(child))
            elif base in _REVERTS:
                warnings.warn(
                    f"fastcells.revert: left `{child_name}` ({base.__name__}) as fastcells: it "
                    "has parametrizations, whose class cannot be swapped. Remove them "
                    "(torch.nn.utils.parametrize.remove_parametrizations), revert, then "
                    "register them again.", stacklevel=2)
            elif isinstance(child, tuple(_REVERTS)):
                warnings.warn(
                    f"fastcells.revert: left `{child_name}` ({type(child).__name__}) as "
                    "fastcells: it subclasses a fastcells class, and its own code may depend "
                    "on that class.", stacklevel=2)
    return model
