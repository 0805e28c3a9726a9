"""The fake kernels (fastcells/_ops.py) give every output the shape, strides,
dtype and device that the real kernels (csrc/ops.cpp) give it.

Compiled graphs are built from the fake results: inductor asserts the strides
it was promised and AOTAutograd plans views on them, so a fake stride that the
real kernel does not produce breaks compiled training or, with the asserts off,
silently corrupts the gradients that flow out of the op.
"""
from __future__ import annotations

import itertools

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from conftest import MODES, make_nn, needs_fastcells

pytestmark = needs_fastcells


def _layout(t: torch.Tensor):
    return tuple(t.shape), t.stride(), t.dtype, t.device


def _flat(result):
    out = []
    for r in result:
        out.extend(r if isinstance(r, (list, tuple)) else [r])
    return out


def _strided_like(t: torch.Tensor, how: str) -> torch.Tensor:
    """`t`'s values in another layout: its dims reversed in memory, or every
    other element of a twice larger buffer."""
    if how == "reversed" and t.dim() >= 2:
        return t.permute(*reversed(range(t.dim()))).contiguous().permute(
            *reversed(range(t.dim())))
    if how == "gapped" or t.dim() < 2:
        return torch.stack([t, torch.zeros_like(t)], -1)[..., 0]
    return t


def _args(mode, layers, bidir, proj, packed, batch_first, weights_layout, hx_given, dtype,
          B=3, T=4):
    I, H = 3, 4
    ref = make_nn(mode, I, H, dtype=dtype, num_layers=layers, bidirectional=bidir,
                  **({"proj_size": proj} if proj else {}))
    D = 2 if bidir else 1
    P = proj or H
    weights = [w.detach() for w in ref._flat_weights]
    if weights_layout != "contiguous":
        weights = [_strided_like(w, weights_layout) for w in weights]
    if packed:
        batch_sizes = [B] + [max(B - 1, 1)] * (T - 1) if B else []
        x = torch.randn(sum(batch_sizes), I, dtype=dtype)
    else:
        batch_sizes = None
        # batch_first modules hand the op a transposed view of a (B, T, I) input
        x = (torch.randn(B, T, I, dtype=dtype).transpose(0, 1) if batch_first
             else torch.randn(T, B, I, dtype=dtype))
    hx = cx = None
    if hx_given:
        hx = _strided_like(torch.randn(layers * D, B, P, dtype=dtype), "reversed")
        if mode == "LSTM":
            cx = torch.randn(layers * D, B, H, dtype=dtype)
    return [x, weights, hx, cx, batch_sizes, MODES[mode][1], layers, bidir, True, proj, None]


def _fake_call(op, args):
    with FakeTensorMode() as mode:
        fake = [
            [mode.from_tensor(w) for w in a] if isinstance(a, list) and a and
            isinstance(a[0], torch.Tensor) else
            (mode.from_tensor(a) if isinstance(a, torch.Tensor) else a)
            for a in args
        ]
        return op(*fake)


def _compare(op, args):
    real = _flat(op(*args))
    fake = _flat(_fake_call(op, args))
    assert len(real) == len(fake)
    for k, (r, f) in enumerate(zip(real, fake)):
        assert _layout(f) == _layout(r), f"output {k}: fake {_layout(f)} vs real {_layout(r)}"


CONFIGS = [
    # mode, layers, bidirectional, proj, packed, batch_first, weights layout, hx given, dtype
    *[(m, 2, bi, 0, False, bf, wl, hx, torch.float64)
      for m, bi, bf, wl, hx in itertools.product(
          ["LSTM", "GRU", "RNN_TANH"], [False, True], [False, True],
          ["contiguous", "reversed", "gapped"], [False, True])],
    ("LSTM", 2, True, 2, False, True, "reversed", True, torch.float64),
    ("LSTM", 1, False, 2, True, False, "gapped", True, torch.float64),
    ("GRU", 3, True, 0, True, False, "reversed", False, torch.float64),
    ("RNN_RELU", 1, False, 0, True, False, "contiguous", True, torch.float64),
    ("LSTM", 2, False, 0, False, True, "reversed", True, torch.float32),
    ("GRU", 2, True, 0, False, True, "gapped", False, torch.bfloat16),
    ("LSTM", 1, True, 0, False, False, "reversed", True, torch.bfloat16),
]


def _id(c):
    m, L, bi, proj, packed, bf, wl, hx, dt = c
    return (f"{m}-L{L}{'-bi' if bi else ''}{f'-proj{proj}' if proj else ''}"
            f"{'-packed' if packed else ''}{'-bf' if bf else ''}-w_{wl}{'-hx' if hx else ''}"
            f"-{str(dt).split('.')[-1]}")


@pytest.mark.parametrize("config", CONFIGS, ids=[_id(c) for c in CONFIGS])
@pytest.mark.parametrize("need", [True, False], ids=["need", "noneed"])
def test_fake_matches_real_layouts(config, need):
    args = _args(*config)
    fwd = torch.ops.fastcells.rnn_forward.default
    _compare(fwd, args + [need])
    if not need:
        return
    output, hy, cy, reserve = fwd(*args)
    g = torch.Generator().manual_seed(0)
    go = _strided_like(torch.randn(output.shape, generator=g).to(output.dtype), "reversed")
    gh = torch.randn(hy.shape, generator=g).to(hy.dtype)
    gc = torch.randn(cy.shape, generator=g).to(cy.dtype) if config[0] == "LSTM" else None
    bwd = torch.ops.fastcells.rnn_backward.default
    for need_grad_input in (True, False):
        _compare(bwd, args + [reserve, go, gh, gc, need_grad_input])


@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_TANH"])
@pytest.mark.parametrize("B,T", [(0, 4), (3, 0), (1, 1)], ids=["B0", "T0", "B1T1"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["tb", "bf"])
def test_fake_matches_real_layouts_degenerate_sizes(mode, B, T, batch_first):
    args = _args(mode, 2, True, 0, False, batch_first, "contiguous", False, torch.float64,
                 B=B, T=T)
    fwd = torch.ops.fastcells.rnn_forward.default
    _compare(fwd, args)
    output, hy, cy, reserve = fwd(*args)
    bwd = torch.ops.fastcells.rnn_backward.default
    _compare(bwd, args + [reserve, torch.ones_like(output), torch.ones_like(hy),
                          torch.ones_like(cy) if mode == "LSTM" else None, True])
