"""In-place operations on what the modules return (torch.relu_, an inplace
Dropout, +=) are allowed and give torch.nn's gradients, in float64.

torch.nn's GRU and RNN (and its float64 LSTM) allow them; a backward that
saved the returned tensors would raise "modified by an inplace operation".
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

import fastcells
from conftest import (MODE_NAMES, assert_close_list, grads_of, make_fastcells_like, make_hx,
                      make_input, make_nn, needs_fastcells, weighted_loss)

pytestmark = needs_fastcells


def _relu_(t):
    return torch.relu_(t)


def _dropout_(t):
    torch.manual_seed(11)
    return nn.Dropout(0.3, inplace=True)(t)


def _iadd(t):
    t += 0.5
    return t


def _mul_(t):
    return t.mul_(t.detach() + 2.0)


OPS = {"relu_": _relu_, "dropout_inplace": _dropout_, "iadd": _iadd, "mul_": _mul_}


def _dropout(t):
    torch.manual_seed(11)
    return nn.Dropout(0.3)(t)


# The same functions out of place, for references that do not allow them in place.
OUT_OF_PLACE = {"relu_": torch.relu, "dropout_inplace": _dropout, "iadd": lambda t: t + 0.5,
                "mul_": lambda t: t * (t.detach() + 2.0)}


def _run(mod, kind, op, target, batch_first, hx_given):
    leaf, inp = make_input(kind, 5, 3, 4, torch.float64, batch_first=batch_first)
    hx = make_hx(mod, None if kind == "unbatched" else 3, torch.float64) if hx_given else None
    out, state = mod(inp, hx)
    data = out.data if isinstance(out, PackedSequence) else out
    states = list(state) if isinstance(state, tuple) else [state]
    if target == "output":
        data = op(data)
    else:
        states = [op(s) for s in states]
    weighted_loss([data, *states]).backward()
    hxs = [] if hx is None else (list(hx) if isinstance(hx, tuple) else [hx])
    return [data.detach(), *[s.detach() for s in states]], grads_of(
        [leaf, *hxs, *mod.parameters()])


@pytest.mark.parametrize("mode", MODE_NAMES)
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("target", ["output", "state"])
@pytest.mark.parametrize("config", [
    dict(kind="dense", layers=1, bidirectional=False, batch_first=False, hx=False),
    dict(kind="dense", layers=2, bidirectional=True, batch_first=True, hx=True),
    dict(kind="packed", layers=2, bidirectional=False, batch_first=False, hx=True),
    dict(kind="unbatched", layers=1, bidirectional=True, batch_first=False, hx=False),
], ids=["dense-L1", "bf-L2-bi-hx", "packed-L2-hx", "unbatched-bi"])
def test_inplace_on_outputs_like_torch_nn(mode, op, target, config):
    ref = make_nn(mode, 4, 5, num_layers=config["layers"], bidirectional=config["bidirectional"],
                  batch_first=config["batch_first"])
    mod = make_fastcells_like(ref)
    args = (config["kind"], OPS[op], target, config["batch_first"], config["hx"])
    expect = _run(ref, *args)
    got = _run(mod, *args)
    assert_close_list(got[0], expect[0], torch.float64)
    assert_close_list(got[1], expect[1], torch.float64)


@pytest.mark.parametrize("cell", ["LSTMCell", "GRUCell", "RNNCell"])
@pytest.mark.parametrize("op", list(OPS))
def test_inplace_on_cell_outputs_like_torch_nn(cell, op):
    """torch.nn's tanh RNNCell refuses in-place ops on its output; the reference
    applies the same function out of place."""
    torch.manual_seed(5)
    ref = getattr(nn, cell)(4, 5, dtype=torch.float64)
    mod = getattr(fastcells, cell)(4, 5, dtype=torch.float64)
    mod.load_state_dict(ref.state_dict())
    results = []
    for m, fn in ((ref, OUT_OF_PLACE[op]), (mod, OPS[op])):
        x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1),
                        requires_grad=True)
        out = m(x)
        outs = [fn(o) for o in (out if isinstance(out, tuple) else (out,))]
        weighted_loss(outs).backward()
        results.append(([o.detach() for o in outs], grads_of([x, *m.parameters()])))
    assert_close_list(results[1][0], results[0][0], torch.float64)
    assert_close_list(results[1][1], results[0][1], torch.float64)


def test_inplace_on_output_under_compile():
    """The compiled graph (AOTAutograd functionalises the in-place op) agrees too."""
    torch._dynamo.reset()
    ref = make_nn("GRU", 4, 5, num_layers=2)
    mod = make_fastcells_like(ref)

    def f(m, x):
        out, h = m(x)
        out += 1.0
        torch.relu_(out)
        return (out * out).sum() + h.sum()

    x0 = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    x1 = x0.detach().clone().requires_grad_()
    compiled = torch.compile(lambda x: f(mod, x), fullgraph=True, backend="aot_eager")
    f(ref, x0).backward()
    compiled(x1).backward()
    torch.testing.assert_close(x1.grad, x0.grad, rtol=1e-10, atol=1e-10)
    for (n, p), q in zip(ref.named_parameters(), mod.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-10, msg=n)
    torch._dynamo.reset()
