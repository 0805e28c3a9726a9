"""Registration of the fused ops with PyTorch: fake (meta) kernels and autograd.

The C++ library (``fastcells._C``) defines ``torch.ops.fastcells.rnn_forward``
and ``torch.ops.fastcells.rnn_backward`` with TORCH_LIBRARY schemas and CPU
(and CUDA) kernels. This module adds:

* fake kernels, so that torch.compile / torch.export can trace the ops.

The autograd formula of ``rnn_forward`` (which calls ``rnn_backward``) is
registered in C++ on the Autograd key (csrc/autograd.cpp): a Python
registration would cost more per call than the whole fused op at the sizes
forecasting models use. Second derivatives, forward-mode AD and torch.func
transforms go through the reference instead (fastcells/_transforms.py).

Shape legend: T steps, B batch, I input size, H hidden, P output size
(proj_size or H), G gates, L layers, D directions, N rows.
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple

import torch

from . import _C  # noqa: F401  (loads the library and its registrations)
from . import _transforms
from ._cells import CELLS, MODES, cell  # noqa: F401  (MODES is public here)

_forward = torch.ops.fastcells.rnn_forward.default


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def _layout(input: torch.Tensor, weights: Sequence[torch.Tensor], batch_sizes, mode: int,
            num_layers: int, bidirectional: bool, proj_size: int):
    """(N, T, B, H, P, D, reserve_size) exactly as csrc/ops.cpp's Config."""
    c = cell(mode)
    D = 2 if bidirectional else 1
    H = weights[1].shape[0] // c.gates
    P = proj_size if proj_size > 0 else H
    if batch_sizes is not None:
        N = input.shape[0]
        T = len(batch_sizes)
        B = batch_sizes[0] if T > 0 else 0
    else:
        T, B = input.shape[0], input.shape[1]
        N = T * B
    GH = c.gates * H
    EH = c.extra_size(H)
    reserve = num_layers * D * N * (GH + EH) + num_layers * N * D * P
    return N, T, B, H, P, D, reserve


def _check_devices(input: torch.Tensor, **named) -> None:
    """Every tensor argument on the input's device, as the real kernels check.

    A meta tensor among CPU (or CUDA) arguments sends the whole call to the
    fake kernels; without this check they would return uninitialised tensors
    on the input's device instead of the error torch.nn gives.
    """
    for name, t in named.items():
        ts = t if isinstance(t, (list, tuple)) else [t]
        for k, x in enumerate(ts):
            if x is None or x.device == input.device:
                continue
            arg = f"{name}[{k}]" if isinstance(t, (list, tuple)) else name
            kind = {"weights": "parameter", "hx": "hidden", "cx": "hidden"}.get(name, "argument")
            raise RuntimeError(
                f"fastcells: Input and {kind} tensors are not at the same device, found input "
                f"tensor at {input.device} and `{arg}` at {x.device}; expected `{arg}` on "
                f"{input.device} (the input's device)")


@torch.library.register_fake("fastcells::dropout_masks")
def _dropout_masks_fake(shape, p, seed, dtype):
    return seed.new_empty(shape, dtype=dtype)


@torch.library.register_fake("fastcells::rnn_forward")
def _forward_fake(input, weights, hx, cx, batch_sizes, mode, num_layers, bidirectional,
                  has_biases, proj_size, dropout_masks, need_reserve=True, zoneout=None,
                  recurrent_masks=None):
    _check_devices(input, weights=weights, hx=hx, cx=cx, dropout_masks=dropout_masks)
    N, T, B, H, P, D, reserve = _layout(input, weights, batch_sizes, mode, num_layers,
                                        bidirectional, proj_size)
    if batch_sizes is not None:
        output = input.new_empty((N, D * P))
    else:
        output = input.new_empty((T, B, D * P))
    hy = input.new_empty((num_layers * D, B, P))
    cy = (input.new_empty((num_layers * D, B, H)) if CELLS[mode].has_cell_state
          else input.new_empty((0,)))
    res = input.new_empty((reserve if need_reserve else 0,), dtype=_compute_dtype(input.dtype))
    return output, hy, cy, res


@torch.library.register_fake("fastcells::rnn_backward")
def _backward_fake(input, weights, hx, cx, batch_sizes, mode, num_layers, bidirectional,
                   has_biases, proj_size, dropout_masks, reserve, grad_output, grad_hy, grad_cy,
                   need_grad_input=True, grad_reserve=None, zoneout=None,
                   recurrent_masks=None):
    _check_devices(input, weights=weights, hx=hx, cx=cx, dropout_masks=dropout_masks,
                   reserve=reserve, grad_output=grad_output, grad_hy=grad_hy,
                   grad_cy=grad_cy)
    N, T, B, H, P, D, _ = _layout(input, weights, batch_sizes, mode, num_layers, bidirectional,
                                  proj_size)
    grad_hx = input.new_empty((num_layers * D, B, P))
    grad_cx = (input.new_empty((num_layers * D, B, H)) if CELLS[mode].has_cell_state
               else input.new_empty((0,)))
    # The real kernel allocates every gradient contiguous, whatever the layout
    # of the tensor it belongs to (a batch_first input is a transposed view,
    # weights may be non-contiguous Parameters): compiled graphs rely on these
    # strides, so empty_like (which keeps the argument's strides) would not do.
    grad_input = input.new_empty(input.shape if need_grad_input else (0,))
    return (grad_input, grad_hx, grad_cx,
            [input.new_empty(w.shape) for w in weights])


def rnn(input: torch.Tensor, weights: Sequence[torch.Tensor], hx: Optional[torch.Tensor],
        cx: Optional[torch.Tensor], batch_sizes: Optional[List[int]], mode: int,
        num_layers: int, bidirectional: bool, has_biases: bool, proj_size: int,
        dropout_masks: Optional[torch.Tensor] = None, return_cell_states: bool = False,
        zoneout: Optional[torch.Tensor] = None,
        recurrent_masks: Optional[torch.Tensor] = None) -> Tuple[Optional[torch.Tensor], ...]:
    """Fused multi-layer RNN over a whole sequence (one op call for the stack).

    Args:
        input: (T, B, I) time-major, or packed data (N, I) when ``batch_sizes`` is given.
        weights: torch.nn ``_flat_weights`` order: per layer, per direction
            ``w_ih (G*H, I_l), w_hh (G*H, P), [b_ih (G*H), b_hh (G*H)], [w_hr (P, H)]``.
        hx: (L*D, B, P) initial hidden state, or None for zeros.
        cx: (L*D, B, H) initial cell state for LSTM (None for zeros, together with hx),
            else None.
        batch_sizes: PackedSequence batch sizes (non-increasing), or None for dense input.
        mode: the cell's code, ``MODES[name]`` (the table in fastcells/_cells.py).
        dropout_masks: None or (L-1, T, B, D*P) / (L-1, N, D*P) multipliers applied to
            the inputs of layers 1..L-1.
        return_cell_states: LSTM only: also return the last layer's cell state c_t
            of every step, laid out like ``output`` with H (not P) features per
            direction. Gradients flow through it (first derivatives).
        zoneout: None, or keep-previous weights (L*D, T, B, Z) / (L*D, N, Z) with
            Z = P (+ H for the LSTM): h_t = z h_{t-1} + (1 - z) h~_t, c_t alike
            (the modules draw them: 0/1 in training, the rate in eval). CPU.
        recurrent_masks: None, or (L*D, B, P) multipliers of h_{t-1} in the
            recurrent product, the same at every step (variational recurrent
            dropout; the modules draw them in training). CPU; not the
            reset-before GRU.

    Returns:
        output (T, B, D*P) or (N, D*P); h_n (L*D, B, P); c_n (L*D, B, H) or None;
        with ``return_cell_states`` also the cell states (T, B, D*H) or (N, D*H).
    """
    if return_cell_states and not cell(mode).has_cell_state:
        raise ValueError(f"return_cell_states: only the LSTM has cell states, got mode {mode}")
    if _transforms.needs_reference(input, weights, hx, cx):
        return _transforms.reference_rnn(input, list(weights), hx, cx, batch_sizes, mode,
                                         num_layers, bidirectional, has_biases, proj_size,
                                         dropout_masks, return_cell_states, zoneout,
                                         recurrent_masks)
    # Without grad mode nothing will be differentiated: skip saving activations.
    # A torch.jit.trace graph keeps them (it may later run with grad mode on).
    # The cell states are read from the saved activations, so they need them.
    keep = return_cell_states or torch.is_grad_enabled() or torch.jit.is_tracing()
    out, hy, cy, reserve = _forward(input, list(weights), hx, cx, batch_sizes, mode,
                                    num_layers, bidirectional, has_biases, proj_size,
                                    dropout_masks, keep, zoneout, recurrent_masks)
    # The op has checked `mode`, so it indexes the table.
    result = (out, hy, (cy if CELLS[mode].has_cell_state else None))
    if not return_cell_states:
        return result
    return result + (_cell_states(reserve, input, weights, batch_sizes, mode, num_layers,
                                  bidirectional, proj_size).to(out.dtype),)


def _cell_states(reserve: torch.Tensor, input: torch.Tensor, weights, batch_sizes, mode: int,
                 num_layers: int, bidirectional: bool, proj_size: int) -> torch.Tensor:
    """The last layer's c_t rows in the reserve (layout of csrc/ops.cpp: per layer
    and direction, gates (N, G*H) then extra (N, H), the LSTM's c_t), as one
    (T, B, D*H) or (N, D*H) tensor. Views and a cat: differentiable, and their
    gradient reaches rnn_backward as `grad_reserve`."""
    N, T, B, H, P, D, _ = _layout(input, weights, batch_sizes, mode, num_layers,
                                  bidirectional, proj_size)
    GH, EH = CELLS[mode].gates * H, CELLS[mode].extra_size(H)
    parts = []
    for d in range(D):
        start = ((num_layers - 1) * D + d) * N * (GH + EH) + N * GH
        parts.append(reserve[start:start + N * H].view(N, H))
    cs = parts[0] if D == 1 else torch.cat(parts, dim=1)
    return cs if batch_sizes is not None else cs.view(T, B, D * H)


def build_info() -> str:
    """How the extension was built and runs, e.g.
    ``"cpu=1;cuda=0;cpu_isa=avx2;cpu_isas=generic,avx2,avx512_layout;host=avx avx2 fma ..."``
    (``cpu_isa``: the CPU ISA path in use; ``cpu_isas``: those the host runs).
    """
    return torch.ops.fastcells.build_info()


def set_poison_outputs(enabled: bool) -> None:
    """Debug switch: the ops fill every buffer they allocate with NaN before use.

    A kernel that reads memory it did not write then shows up as NaN in the
    results. Same as setting the environment variable ``FASTCELLS_POISON=1``.
    """
    if enabled:
        os.environ["FASTCELLS_POISON"] = "1"
    else:
        os.environ.pop("FASTCELLS_POISON", None)
