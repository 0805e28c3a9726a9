"""Uninitialised memory: no kernel may read memory it did not write.

Two layers of poisoning, both filling fresh floating-point allocations with NaN
so that any read of an unwritten element turns into a NaN in the result:

* the Python layer: ``torch.empty``, ``torch.empty_like``, ``torch.empty_strided``
  and ``Tensor.new_empty`` are patched for the duration of the call;
* the C++ op: ``fastcells.set_poison_outputs(True)`` makes ``fastcells::rnn_forward``
  and ``fastcells::rnn_backward`` fill every buffer they allocate (outputs,
  reserve, workspaces, gradients) with NaN before use.

Each case runs unpoisoned, then poisoned, and requires finite and bit-identical
outputs, final states and gradients.  A last test sprays the heap with NaN-filled
blocks before each call (glibc reuses freed chunks), a best-effort check that
needs no debug hook.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from conftest import CELLS, MODES

fastcells = pytest.importorskip("fastcells")
if not hasattr(fastcells, "LSTM"):
    pytest.skip("fastcells extension not built", allow_module_level=True)

HAS_HOOK = hasattr(fastcells, "set_poison_outputs")
needs_hook = pytest.mark.xfail(
    not HAS_HOOK, reason="awaiting lead: fastcells.set_poison_outputs(bool) debug hook",
    raises=AttributeError, strict=True)


def _nan_filled(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point() or t.is_complex():
        with torch.no_grad():
            t.fill_(float("nan"))
    return t


@contextlib.contextmanager
def python_poison():
    """Patch the Python-level allocators to return NaN-filled memory."""
    mp = pytest.MonkeyPatch()
    orig_empty, orig_like = torch.empty, torch.empty_like
    orig_strided, orig_new = torch.empty_strided, torch.Tensor.new_empty
    mp.setattr(torch, "empty", lambda *a, **k: _nan_filled(orig_empty(*a, **k)))
    mp.setattr(torch, "empty_like", lambda *a, **k: _nan_filled(orig_like(*a, **k)))
    mp.setattr(torch, "empty_strided", lambda *a, **k: _nan_filled(orig_strided(*a, **k)))
    mp.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: _nan_filled(orig_new(self, *a, **k)))
    try:
        yield
    finally:
        mp.undo()


@contextlib.contextmanager
def poisoned():
    fastcells.set_poison_outputs(True)
    try:
        with python_poison():
            yield
    finally:
        fastcells.set_poison_outputs(False)


MODULES = {name: (cls, extra) for name, (cls, _, extra) in MODES.items()}

# (name, T, B, I, H, layers, bidirectional, proj, input kind, give hx)
CASES = [
    ("LSTM", 6, 3, 4, 5, 2, True, 0, "dense", True),
    ("LSTM", 6, 3, 4, 5, 2, True, 3, "packed", False),
    ("LSTM", 7, 4, 3, 40, 1, False, 0, "packed", True),     # H above the tiny-H path
    ("LSTM", 5, 1, 3, 6, 1, False, 0, "unbatched", True),
    ("GRU", 6, 3, 4, 5, 3, True, 0, "packed", True),
    ("GRU", 7, 5, 3, 40, 2, False, 0, "dense", False),
    ("GRU", 1, 1, 1, 1, 1, False, 0, "dense", True),
    ("RNN_TANH", 6, 3, 4, 5, 2, True, 0, "packed", False),
    ("RNN_RELU", 6, 3, 4, 5, 2, False, 0, "dense", True),
]


def _ident(case):
    name, T, B, I, H, L, bi, proj, kind, hx = case
    return f"{name}-T{T}B{B}I{I}H{H}L{L}{'-bi' if bi else ''}{f'-p{proj}' if proj else ''}-{kind}{'-hx' if hx else ''}"


def _run_module(case, dtype):
    """Forward + backward of a fastcells module; returns every result tensor."""
    name, T, B, I, H, L, bi, proj, kind, give_hx = case
    cls, extra = MODULES[name]
    if proj:
        extra = {**extra, "proj_size": proj}
    torch.manual_seed(0)
    ref = cls(I, H, L, bidirectional=bi, **extra).to(dtype)
    mod = getattr(fastcells, cls.__name__)(I, H, L, bidirectional=bi, **extra).to(dtype)
    mod.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(1)
    shape = (T, I) if kind == "unbatched" else (T, B, I)
    x = torch.randn(shape, generator=g).to(dtype).requires_grad_(True)
    leaves = [x]
    inp = x
    if kind == "packed":
        lengths = torch.tensor([T] + [max(1, T - 1 - k) for k in range(B - 1)])[torch.randperm(B, generator=g)]
        inp = nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
    hx = None
    D = 2 if bi else 1
    if give_hx:
        lead = (L * D,) if kind == "unbatched" else (L * D, B)
        h0 = torch.randn(*lead, proj or H, generator=g).to(dtype).requires_grad_(True)
        leaves.append(h0)
        hx = h0
        if name == "LSTM":
            c0 = torch.randn(*lead, H, generator=g).to(dtype).requires_grad_(True)
            leaves.append(c0)
            hx = (h0, c0)
    out, state = mod(inp, hx)
    outs = [out.data if kind == "packed" else out]
    outs += list(state) if isinstance(state, tuple) else [state]
    cot = [torch.randn(o.shape, generator=g).to(dtype) for o in outs]
    grads = torch.autograd.grad(outs, leaves + list(mod.parameters()), cot)
    return [o.detach() for o in outs] + list(grads)


def _assert_same(clean, dirty):
    assert len(clean) == len(dirty)
    for k, (c, d) in enumerate(zip(clean, dirty)):
        assert torch.isfinite(d).all(), f"result {k} has non-finite values under poisoning"
        assert torch.equal(c, d), f"result {k} differs under poisoning (max diff {(c - d).abs().max()})"


@needs_hook
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", CASES, ids=_ident)
def test_poisoned_allocations_do_not_change_results(case, dtype):
    clean = _run_module(case, dtype)
    assert all(torch.isfinite(t).all() for t in clean)
    with poisoned():
        dirty = _run_module(case, dtype)
    _assert_same(clean, dirty)


@needs_hook
@pytest.mark.parametrize("case", [CASES[0], CASES[4], CASES[7]], ids=_ident)
def test_poisoned_bfloat16(case):
    clean = _run_module(case, torch.bfloat16)
    with poisoned():
        dirty = _run_module(case, torch.bfloat16)
    _assert_same(clean, dirty)


@needs_hook
@pytest.mark.parametrize("name", ["LSTMCell", "GRUCell", "RNNCell"])
def test_poisoned_cells(name):
    def run():
        torch.manual_seed(0)
        cell = getattr(fastcells, name)(3, 5).double()
        g = torch.Generator().manual_seed(1)
        x = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
        out = cell(x)
        outs = list(out) if isinstance(out, tuple) else [out]
        cot = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in outs]
        grads = torch.autograd.grad(outs, [x] + list(cell.parameters()), cot)
        return [o.detach() for o in outs] + list(grads)

    clean = run()
    with poisoned():
        dirty = run()
    _assert_same(clean, dirty)


@needs_hook
@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN_TANH"])
def test_poisoned_op_with_dropout_masks_and_partial_grads(name):
    """Op level: dropout masks, and backward with only some output gradients
    (grad_hy / grad_cy None), the cases where a kernel is most tempted to skip
    zero-filling a buffer."""
    from fastcells.functional import rnn

    cls, mode, extra = MODES[name]
    has_c = CELLS[mode].has_cell_state

    def run(which):
        torch.manual_seed(2)
        ref = cls(3, 4, 2, bidirectional=True, **extra).double()
        w = [p.detach().clone().requires_grad_(True) for p in ref._flat_weights]
        g = torch.Generator().manual_seed(3)
        x = torch.randn(5, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
        hx = torch.randn(4, 2, 4, generator=g, dtype=torch.float64, requires_grad=True)
        cx = (torch.randn(4, 2, 4, generator=g, dtype=torch.float64, requires_grad=True)
              if has_c else None)
        masks = (torch.rand(1, 5, 2, 8, generator=g) > 0.5).double() * 2
        out, hy, cy = rnn(x, w, hx, cx, None, mode, 2, True, True, 0, masks)
        target = {"output": out, "hy": hy, "cy": cy if has_c else out}[which]
        leaves = [x, hx] + ([cx] if cx is not None else []) + w
        grads = torch.autograd.grad(target.sum(), leaves, allow_unused=True)
        grads = [torch.zeros_like(l) if gr is None else gr for gr, l in zip(grads, leaves)]
        return [out.detach(), hy.detach()] + grads

    for which in ("output", "hy", "cy"):
        clean = run(which)
        with poisoned():
            dirty = run(which)
        _assert_same(clean, dirty)


def test_poison_hook_roundtrip():
    """The debug hook exists and can be switched on and off (off by default)."""
    if not HAS_HOOK:
        pytest.xfail("awaiting lead: fastcells.set_poison_outputs(bool) debug hook")
    fastcells.set_poison_outputs(True)
    fastcells.set_poison_outputs(False)
    # Off again: a normal call still works and is finite.
    out, _ = fastcells.GRU(2, 3)(torch.randn(4, 1, 2))
    assert torch.isfinite(out).all()


def _spray_heap():
    """Allocate NaN-filled blocks of many sizes and free them, so that the
    allocator hands recycled NaN memory to the next allocations."""
    blocks = []
    size = 16
    while size <= (1 << 20):
        for _ in range(4):
            blocks.append(torch.full((size,), float("nan")))
        size *= 2
    del blocks


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[5], CASES[7]], ids=_ident)
def test_heap_spray_does_not_change_results(case):
    clean = _run_module(case, torch.float32)
    for _ in range(2):
        _spray_heap()
        dirty = _run_module(case, torch.float32)
        _assert_same(clean, dirty)
