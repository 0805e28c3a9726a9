"""fastcells.LSTMCell / GRUCell / RNNCell against the torch.nn cells.

Batched and unbatched input, hx given or not, bias on/off, tanh and relu, in
float64 and float32: outputs and the gradients of input, states and weights.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import CELLS as TABLE
from conftest import TOL, assert_close_list, grads_of, needs_fastcells, weighted_loss

pytestmark = needs_fastcells

I, H, B = 3, 5, 4

# "LSTMCell", "GRUCell", "RNNCell_tanh", "RNNCell_relu" -> (torch.nn cell class,
# constructor kwargs, carries c), from the table of cells
CELLS = {
    c.nn_class + "Cell" + (f"_{c.nonlinearity}" if c.nonlinearity else ""):
        (getattr(nn, c.nn_class + "Cell"),
         {"nonlinearity": c.nonlinearity} if c.nonlinearity else {}, c.has_cell_state)
    for c in TABLE
}


def _pair(name: str, bias: bool, dtype: torch.dtype):
    import fastcells

    cls, extra, _ = CELLS[name]
    torch.manual_seed(0)
    ref = cls(I, H, bias=bias, dtype=dtype, **extra)
    mod = getattr(fastcells, cls.__name__)(I, H, bias=bias, dtype=dtype, **extra)
    mod.load_state_dict(ref.state_dict())
    return ref, mod


def _run(cell: nn.Module, lstm: bool, batched: bool, with_hx: bool, dtype: torch.dtype):
    g = torch.Generator().manual_seed(1)
    lead = (B,) if batched else ()
    x = torch.randn(*lead, I, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    leaves = [x]
    hx = None
    if with_hx:
        h = torch.randn(*lead, H, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
        c = torch.randn(*lead, H, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
        hx = (h, c) if lstm else h
        leaves += [h, c] if lstm else [h]
    out = cell(x, hx)
    outs = list(out) if lstm else [out]
    weighted_loss(outs).backward()
    return outs, grads_of(leaves + list(cell.parameters()))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("with_hx", [False, True], ids=["no_hx", "hx"])
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("name", list(CELLS))
def test_cell_matches_torch_nn(name, batched, with_hx, dtype):
    bias = not (batched and with_hx)  # bias off in one combination per cell
    ref, mod = _pair(name, bias, dtype)
    lstm = CELLS[name][2]
    ref_out, ref_grads = _run(ref, lstm, batched, with_hx, dtype)
    out, grads = _run(mod, lstm, batched, with_hx, dtype)
    for o, r in zip(out, ref_out):
        assert o.shape == r.shape
    assert_close_list(out, ref_out, dtype, ["h'", "c'"])
    assert_close_list(grads, ref_grads, dtype)


@pytest.mark.parametrize("name", list(CELLS))
def test_cell_state_dict_and_seeded_init(name):
    import fastcells

    cls, extra, _ = CELLS[name]
    torch.manual_seed(5)
    ref = cls(I, H, **extra)
    torch.manual_seed(5)
    mod = getattr(fastcells, cls.__name__)(I, H, **extra)
    assert list(mod.state_dict()) == list(ref.state_dict())
    for (n, a), (_, b) in zip(mod.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), n
    ref.load_state_dict(mod.state_dict())


@pytest.mark.parametrize("name", list(CELLS))
def test_cell_bad_input_like_torch_nn(name):
    ref, mod = _pair(name, True, torch.float32)
    for bad in (torch.randn(2, 3, I), torch.randn(B, I + 1)):
        with pytest.raises((RuntimeError, ValueError)):
            ref(bad)
        with pytest.raises((RuntimeError, ValueError), match=r"(?i)input|size|shape|dim"):
            mod(bad)


def test_cell_bfloat16_close_to_float64():
    for name in CELLS:
        ref64, _ = _pair(name, True, torch.float64)
        _, mod16 = _pair(name, True, torch.bfloat16)
        mod16.load_state_dict(ref64.state_dict())
        x = torch.randn(B, I, dtype=torch.float64)
        lstm = CELLS[name][2]
        exp = ref64(x)
        got = mod16(x.bfloat16())
        for g_, e_ in zip(got if lstm else [got], exp if lstm else [exp]):
            assert g_.dtype == torch.bfloat16
            torch.testing.assert_close(g_.double(), e_, **TOL[torch.bfloat16])


@pytest.mark.parametrize("name", list(CELLS))
def test_cell_bad_state_and_dtypes(name):
    ref, mod = _pair(name, True, torch.float32)
    lstm = CELLS[name][2]

    def state(b, dtype=torch.float32):
        h = torch.zeros(b, H, dtype=dtype)
        return (h, h.clone()) if lstm else h

    x = torch.randn(B, I)
    for args, match in (((x, state(B + 1)), r"(?i)hx|hidden|batch"),
                        ((x, state(B, torch.float64)), r"(?i)hx|dtype"),
                        ((x.double(),), r"(?i)input|weight|dtype"),
                        ((x.long(),), r"(?i)input|weight|dtype")):
        with pytest.raises((RuntimeError, ValueError)):
            ref(*args)
        with pytest.raises((RuntimeError, ValueError), match=match):
            mod(*args)


@pytest.mark.parametrize("name", list(CELLS))
def test_cell_empty_batch(name):
    ref, mod = _pair(name, True, torch.float64)
    x = torch.randn(0, I, dtype=torch.float64)
    got, expect = mod(x), ref(x)
    lstm = CELLS[name][2]
    for g_, e_ in zip(got if lstm else [got], expect if lstm else [expect]):
        assert g_.shape == e_.shape == (0, H)
