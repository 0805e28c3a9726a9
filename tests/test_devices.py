"""Arguments on different devices raise the error torch.nn raises, at every
entry point (modules, cells, fastcells.functional.rnn, the ops themselves).

A meta tensor among CPU arguments would otherwise send the call to the fake
kernels, which return uninitialised tensors. All-meta calls (shape inference,
as with torch.nn) still work.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fastcells
from conftest import (MODE_NAMES, MODES, make_fastcells_like, make_nn, needs_fastcells, op_call_args,
                      op_case)

pytestmark = needs_fastcells

I, H, T, B = 3, 4, 5, 2
MATCH = r"not at the same device.*{arg}.*meta|not at the same device.*meta.*{arg}"


def _hx(mode, device_h="cpu", device_c="cpu", L=2):
    h = torch.zeros(L, B, H, dtype=torch.float64, device=device_h)
    if mode == "LSTM":
        return h, torch.zeros(L, B, H, dtype=torch.float64, device=device_c)
    return h


def _both_raise(ref, mod, arg, *args, requires_grad=False):
    """torch.nn raises RuntimeError; fastcells raises it too, naming `arg` and meta."""
    with pytest.raises(RuntimeError):
        ref(*args)
    if requires_grad:
        args = (args[0].detach().requires_grad_(),) + args[1:]
    with pytest.raises(RuntimeError, match=MATCH.format(arg=arg)):
        mod(*args)


@pytest.mark.parametrize("mode", MODE_NAMES)
@pytest.mark.parametrize("which", ["hx", "cx"])
@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
def test_meta_state_with_cpu_module(mode, which, requires_grad):
    if which == "cx" and mode != "LSTM":
        pytest.skip("only LSTM has a cell state")
    ref = make_nn(mode, I, H, num_layers=2)
    mod = make_fastcells_like(ref)
    hx = _hx(mode, "meta" if which == "hx" else "cpu", "meta" if which == "cx" else "cpu")
    _both_raise(ref, mod, which, torch.randn(T, B, I, dtype=torch.float64), hx,
                requires_grad=requires_grad)


@pytest.mark.parametrize("mode", MODE_NAMES)
@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
def test_module_on_meta_with_cpu_input(mode, requires_grad):
    ref = make_nn(mode, I, H, num_layers=2).to("meta")
    mod = make_fastcells_like(make_nn(mode, I, H, num_layers=2)).to("meta")
    _both_raise(ref, mod, "weights", torch.randn(T, B, I, dtype=torch.float64),
                requires_grad=requires_grad)


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_one_meta_weight_after_partial_checkpoint(mode):
    """Built on meta, loaded from a checkpoint that misses one key: that weight stays meta."""
    src = make_nn(mode, I, H, num_layers=2)
    state = src.state_dict()
    del state["weight_hh_l1"]
    cls, _, extra = MODES[mode]
    with torch.device("meta"):
        ref = cls(I, H, 2, dtype=torch.float64, **extra)
        mod = getattr(fastcells, cls.__name__)(I, H, 2, dtype=torch.float64, **extra)
    for m in (ref, mod):
        m.load_state_dict(state, strict=False, assign=True)
    assert mod.weight_hh_l1.is_meta and not mod.weight_ih_l0.is_meta
    # weights[5] is weight_hh_l1 in torch.nn's flat order (4 tensors per layer)
    _both_raise(ref, mod, r"weights\[5\]", torch.randn(T, B, I, dtype=torch.float64))


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_meta_input_with_cpu_module(mode):
    ref = make_nn(mode, I, H, num_layers=2)
    mod = make_fastcells_like(ref)
    x = torch.randn(T, B, I, dtype=torch.float64, device="meta")
    with pytest.raises(RuntimeError):
        ref(x)
    with pytest.raises(RuntimeError, match=r"not at the same device.*meta.*weights\[0\]"):
        mod(x)


@pytest.mark.parametrize("cell", ["LSTMCell", "GRUCell", "RNNCell"])
def test_cells_meta_state(cell):
    ref = getattr(nn, cell)(I, H, dtype=torch.float64)
    mod = getattr(fastcells, cell)(I, H, dtype=torch.float64)
    mod.load_state_dict(ref.state_dict())
    h = torch.zeros(B, H, dtype=torch.float64, device="meta")
    hx = (h, torch.zeros(B, H, dtype=torch.float64)) if cell == "LSTMCell" else h
    _both_raise(ref, mod, "hx", torch.randn(B, I, dtype=torch.float64), hx)


def _op_args(mode):
    return list(op_call_args(op_case(mode, False, 2, False, T=T, B=B, I=I, H=H)))


@pytest.mark.parametrize("mode", MODE_NAMES)
@pytest.mark.parametrize("entry", ["op", "functional"])
@pytest.mark.parametrize("arg", ["weights", "hx", "cx", "dropout_masks"])
def test_functional_and_op_mixed_devices(mode, entry, arg):
    if arg == "cx" and mode != "LSTM":
        pytest.skip("only LSTM has a cell state")
    args = _op_args(mode)
    fn = (torch.ops.fastcells.rnn_forward.default if entry == "op"
          else fastcells.functional.rnn)
    fn(*args)  # valid on CPU
    if arg == "weights":
        args[1] = list(args[1])
        args[1][2] = args[1][2].to("meta")
        name = r"weights\[2\]"
    elif arg == "hx":
        args[2], name = args[2].to("meta"), "hx"
    elif arg == "cx":
        args[3], name = args[3].to("meta"), "cx"
    else:
        args[10], name = torch.ones(1, T, B, H, dtype=torch.float64, device="meta"), arg
    with pytest.raises(RuntimeError, match=MATCH.format(arg=name)):
        fn(*args)


@pytest.mark.parametrize("mode", MODE_NAMES)
@pytest.mark.parametrize("arg", ["reserve", "grad_output", "grad_hy"])
def test_backward_op_mixed_devices(mode, arg):
    args = _op_args(mode)
    output, hy, cy, reserve = torch.ops.fastcells.rnn_forward.default(*args)
    tail = dict(reserve=reserve, grad_output=torch.ones_like(output),
                grad_hy=torch.ones_like(hy),
                grad_cy=torch.ones_like(cy) if mode == "LSTM" else None)
    bwd = torch.ops.fastcells.rnn_backward.default
    names = ["reserve", "grad_output", "grad_hy", "grad_cy"]
    bwd(*args, *[tail[n] for n in names])  # valid on CPU
    tail[arg] = tail[arg].to("meta")
    with pytest.raises(RuntimeError, match=MATCH.format(arg=arg)):
        bwd(*args, *[tail[n] for n in names])


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_all_meta_gives_meta_shapes_like_torch_nn(mode):
    ref = make_nn(mode, I, H, num_layers=2, bidirectional=True).to("meta")
    mod = make_fastcells_like(make_nn(mode, I, H, num_layers=2, bidirectional=True)).to("meta")
    x = torch.randn(T, B, I, dtype=torch.float64, device="meta", requires_grad=True)
    expect, got = ref(x), mod(x)
    flat = lambda r: [r[0]] + (list(r[1]) if isinstance(r[1], tuple) else [r[1]])  # noqa: E731
    for g, e in zip(flat(got), flat(expect)):
        assert g.is_meta and g.shape == e.shape and g.dtype == e.dtype
    got[0].sum().backward()
    assert x.grad.is_meta and x.grad.shape == x.shape
