"""What the fused op cannot differentiate runs through the reference.

The fused op's autograd (csrc/autograd.cpp) computes first derivatives with
the hand-derived backward, ``rnn_backward``. That kernel has no derivative of
its own, and PyTorch's function transforms do not accept a C++ autograd node.
Three things therefore take the pure-PyTorch reference
(:func:`fastcells.reference.rnn_reference`, the same equations as plain
differentiable PyTorch ops), explicitly and at the reference's speed:

* second derivatives: a backward under ``create_graph=True`` computes its
  gradients by differentiating the reference (op ``rnn_backward_reference``,
  called by the C++ node), so that they can be differentiated again;
* forward-mode AD (``torch.autograd.forward_ad``, ``torch.func.jvp``);
* ``torch.func`` transforms (``grad``, ``vjp``, ``vmap``, ``jacrev``, ...).

The last two are decided per call in :func:`fastcells._ops.rnn`. The first
use of the reference in a process warns. Under create_graph=True the first
derivatives come from the reference too: whether they will be differentiated
again is not known when the backward runs. Ordinary first derivatives,
inference and torch.compile keep the fused op.
"""
from __future__ import annotations

import warnings
from typing import List, Optional, Sequence

import torch
import torch.autograd.forward_ad as fwAD

from ._cells import CELLS
from .reference import rnn_reference

_warned = False


def _initial_states(input, weights, hx, cx, batch_sizes, mode, num_layers, bidirectional,
                    proj_size):
    """(hx, cx) with zeros in place of a state not given (cx None for cells
    without a cell state), as the op assumes."""
    c = CELLS[mode]
    H = weights[1].shape[0] // c.gates
    L_D = num_layers * (2 if bidirectional else 1)
    B = input.shape[1] if batch_sizes is None else int(batch_sizes[0])
    if hx is None:
        hx = input.new_zeros(L_D, B, proj_size or H)
    if c.has_cell_state and cx is None:
        cx = input.new_zeros(L_D, B, H)
    return hx, (cx if c.has_cell_state else None)


def _announce() -> None:
    """The first use of the reference in a process warns."""
    global _warned
    if not _warned:
        _warned = True
        warnings.warn("fastcells: second derivatives, forward-mode AD and torch.func transforms "
                      "run the pure-PyTorch reference (fastcells.reference.rnn_reference), not "
                      "the fused op: same results, at the reference's speed", stacklevel=4)


def _differentiable(t: torch.Tensor) -> torch.Tensor:
    """t itself when it takes part in the caller's graph, else a fresh leaf."""
    return t if t.requires_grad else t.detach().requires_grad_()


def rnn_backward_reference(input, weights, hx, cx, batch_sizes, mode, num_layers,
                           bidirectional, has_biases, proj_size, dropout_masks, grad_output,
                           grad_hy, grad_cy, need_grad_input):
    """rnn_backward's results, differentiable: the reference is run again on the
    saved arguments and differentiated with create_graph=True. Arguments that
    take part in the caller's graph (parameters, an input that requires grad,
    incoming gradients) stay connected, so the results can be differentiated
    with respect to them."""
    _announce()
    h0, c0 = _initial_states(input, weights, hx, cx, batch_sizes, mode, num_layers,
                             bidirectional, proj_size)
    with torch.enable_grad():
        x = _differentiable(input)
        ws = [_differentiable(w) for w in weights]
        h0 = _differentiable(h0)
        c0 = _differentiable(c0) if c0 is not None else None
        out, hy, cy = rnn_reference(x, ws, h0, c0, batch_sizes, mode, num_layers,
                                    bidirectional, has_biases, proj_size, dropout_masks)
        outs: List[torch.Tensor] = []
        grads: List[torch.Tensor] = []
        for o, g in ((out, grad_output), (hy, grad_hy), (cy, grad_cy)):
            if o is not None and g is not None:
                outs.append(o)
                grads.append(g)
        wrt = [x, *ws, h0] + ([c0] if c0 is not None else [])
        result = torch.autograd.grad(outs, wrt, grads, create_graph=True, allow_unused=True)
    result = [torch.zeros_like(t) if g is None else g for g, t in zip(result, wrt)]
    grad_input = result[0] if need_grad_input else input.new_empty(0)
    grad_w = result[1:1 + len(ws)]
    grad_hx = result[1 + len(ws)]
    grad_cx = result[2 + len(ws)] if c0 is not None else input.new_empty(0)
    return grad_input, grad_hx, grad_cx, grad_w


# Registered by a call, not as a decorator, which would bind the name to None:
# tests/test_ops.py compares this function's parameters with the op's schema.
torch.library.impl("fastcells::rnn_backward_reference", "CompositeImplicitAutograd",
                   rnn_backward_reference)


def _has_tangent(tensors: Sequence[Optional[torch.Tensor]]) -> bool:
    return any(t is not None and fwAD.unpack_dual(t).tangent is not None for t in tensors)


def needs_reference(input: torch.Tensor, weights: Sequence[torch.Tensor],
                    hx: Optional[torch.Tensor], cx: Optional[torch.Tensor]) -> bool:
    """Whether this call runs under a torch.func transform or carries forward-mode
    tangents, which the fused op's C++ autograd cannot serve."""
    if torch.compiler.is_compiling():
        return False  # a compiled graph keeps the op
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return True
    return fwAD._current_level >= 0 and _has_tangent([input, hx, cx, *weights])


def reference_rnn(input, weights, hx, cx, batch_sizes, mode, num_layers, bidirectional,
                  has_biases, proj_size, dropout_masks, return_cell_states=False, zoneout=None,
                  recurrent_masks=None):
    """fastcells._ops.rnn through the reference, with zero initial states where
    none are given. Warns once per process."""
    _announce()
    hx, cx = _initial_states(input, weights, hx, cx, batch_sizes, mode, num_layers,
                             bidirectional, proj_size)
    return rnn_reference(input, weights, hx, cx, batch_sizes, mode, num_layers, bidirectional,
                         has_biases, proj_size, dropout_masks, return_cell_states, zoneout,
                         recurrent_masks)
