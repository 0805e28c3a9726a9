"""Variational recurrent dropout: fastcells.LSTM / GRU / RNN(..., recurrent_dropout=p).

In training the recurrent product reads h_{t-1} * m, with one inverted-dropout
mask m per sequence (and layer and direction) for all its steps (Gal and
Ghahramani 2016; Keras' recurrent_dropout), the reset-before GRU's r * h_{t-1}
included; a GRU's update z * h_{t-1} reads h_{t-1} itself. Eval uses no mask. The fused op takes the masks as its
`recurrent_masks` argument; checked against the reference
(fastcells.reference.rnn_reference(..., recurrent_masks=m)) in float64, values
and gradients, over the cells and options, with gradcheck, on both thread
splits, with zoneout, and for the module's draws and the errors.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import HAVE_FASTCELLS, TOL, assert_close_list

pytestmark = pytest.mark.skipif(not HAVE_FASTCELLS, reason="fastcells extension not built")

import fastcells  # noqa: E402
from fastcells import _ops, modules, reference  # noqa: E402

NN = {"LSTM": nn.LSTM, "GRU": nn.GRU, "GRU_RESET_BEFORE": nn.GRU, "RNN_TANH": nn.RNN,
      "RNN_RELU": nn.RNN}


def _case(cell, layers, D, proj, packed, B=4, H=5, T=6, zone=False, seed=0):
    I = 3
    P = proj or H
    torch.manual_seed(seed)
    kw = {"proj_size": proj} if proj else {}
    if cell == "RNN_RELU":
        kw["nonlinearity"] = "relu"
    m = NN[cell](I, H, layers, bidirectional=D == 2, **kw).double()
    ws = [w.detach().clone().requires_grad_() for w in m._flat_weights]
    g = torch.Generator().manual_seed(seed + 1)
    batch_sizes = None
    if packed:
        lengths = sorted(torch.randint(1, T + 1, (B,), generator=g).tolist(), reverse=True)
        lengths[0] = T
        batch_sizes = [sum(1 for n in lengths if n > t) for t in range(T)]
    rows = (sum(batch_sizes),) if packed else (T, B)
    x = torch.randn(*rows, I, generator=g, dtype=torch.double, requires_grad=True)
    h0 = torch.randn(layers * D, B, P, generator=g, dtype=torch.double, requires_grad=True)
    lstm = cell == "LSTM"
    c0 = (torch.randn(layers * D, B, H, generator=g, dtype=torch.double, requires_grad=True)
          if lstm else None)
    masks = (torch.rand((layers * D, B, P), generator=g) > 0.3).double() / 0.7
    z = None
    if zone:
        z = (torch.rand((layers * D, *rows, P + (H if lstm else 0)), generator=g) < 0.2).double()
    args = (batch_sizes, fastcells.MODES[cell], layers, D == 2, True, proj, None)
    return x, ws, h0, c0, args, masks, z


CASES = []
for _cell in NN:
    CASES += [(_cell, 2, 2, 0, False, False), (_cell, 1, 1, 0, True, False),
              (_cell, 2, 1, 0, True, True)]
CASES += [("LSTM", 2, 2, 3, True, False), ("LSTM", 1, 1, 2, False, True)]


def _check(x, ws, h0, c0, args, masks, z):
    got = [t for t in _ops.rnn(x, ws, h0, c0, *args, zoneout=z, recurrent_masks=masks)
           if t is not None]
    want = [t for t in reference.rnn_reference(x, ws, h0, c0, *args, zoneout=z,
                                               recurrent_masks=masks) if t is not None]
    assert_close_list(got, want, torch.float64)
    leaves = [x, h0] + ([c0] if c0 is not None else []) + ws
    g = torch.Generator().manual_seed(9)
    cot = [torch.randn(t.shape, generator=g, dtype=torch.double) for t in want]
    assert_close_list(torch.autograd.grad(got, leaves, cot),
                      torch.autograd.grad(want, leaves, cot), torch.float64)


@pytest.mark.parametrize("cell,layers,D,proj,packed,zone", CASES,
                         ids=[f"{c}-L{a}-D{b}-proj{p}-{'packed' if k else 'dense'}"
                              f"{'-zoneout' if z else ''}" for c, a, b, p, k, z in CASES])
def test_values_and_gradients_match_reference(cell, layers, D, proj, packed, zone):
    _check(*_case(cell, layers, D, proj, packed, zone=zone))


@pytest.mark.parametrize("cell", ["LSTM", "GRU", "GRU_RESET_BEFORE"])
@pytest.mark.parametrize("B,H", [(2, 64), (64, 16)])
def test_both_thread_splits_match_reference_and_each_other(cell, B, H):
    """Long enough for a thread team: batch 2 splits hidden units (the masked
    operand is built by columns, then shared), batch 64 splits rows."""
    n = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            case = _case(cell, 1, 1, 0, False, B=B, H=H, T=40)
            _check(*case)
            x, ws, h0, c0, args, masks, _ = case
            out = _ops.rnn(x, ws, h0, c0, *args, recurrent_masks=masks)[0]
            results.append([out.detach()] + list(torch.autograd.grad(out.square().sum(), ws)))
        for a, b in zip(*results):
            assert torch.equal(a, b)
    finally:
        torch.set_num_threads(n)


def test_gradcheck():
    x, ws, h0, c0, args, masks, z = _case("GRU", 2, 2, 0, True, zone=True)
    n = len(ws)

    def f(x, h0, *w):
        return tuple(_ops.rnn(x, list(w[-n:]), h0, None, *args, zoneout=z,
                              recurrent_masks=masks)[:2])

    assert torch.autograd.gradcheck(f, (x, h0, *ws))


@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
def test_module_training_uses_one_mask_per_sequence(cell):
    torch.manual_seed(0)
    m = getattr(fastcells, cell)(3, 6, 2, bidirectional=True, recurrent_dropout=0.4).double()
    x = torch.randn(7, 5, 3, dtype=torch.double)
    torch.manual_seed(123)
    masks = modules._recurrent_masks(m, 5, x)
    assert masks.shape == (4, 5, 6)
    assert set(masks.unique().tolist()) <= {0.0, 1 / 0.6}
    torch.manual_seed(123)
    out, _ = m(x)
    h0 = torch.zeros(4, 5, 6, dtype=torch.double)
    want = reference.rnn_reference(x, m._flat_weights, h0, h0.clone() if cell == "LSTM" else None,
                                   None, fastcells.MODES[m.mode], 2, True, True, 0, None,
                                   recurrent_masks=masks)[0]
    torch.testing.assert_close(out, want, **TOL[torch.float64])


def test_draws_keep_with_probability_one_minus_p():
    m = fastcells.GRU(4, 64, 2, recurrent_dropout=0.25)
    masks = modules._recurrent_masks(m, 256, torch.zeros(1))
    assert abs((masks != 0).float().mean().item() - 0.75) < 0.01
    assert not torch.equal(masks, modules._recurrent_masks(m, 256, torch.zeros(1)))


def test_eval_uses_no_mask():
    torch.manual_seed(0)
    m = fastcells.LSTM(3, 6, recurrent_dropout=0.5).eval()
    plain = fastcells.LSTM(3, 6)
    plain.load_state_dict(m.state_dict())
    x = torch.randn(5, 2, 3)
    assert torch.equal(m(x)[0], plain(x)[0])


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("bad", [1.5, -0.1, True, "0.2"])
def test_bad_rate_is_named(bad):
    with pytest.raises(ValueError, match="recurrent_dropout must be a number in"):
        fastcells.LSTM(3, 4, recurrent_dropout=bad)


def test_reset_before_gru_module():
    torch.manual_seed(0)
    m = fastcells.GRU(3, 6, reset_after=False, recurrent_dropout=0.3).double()
    x = torch.randn(7, 5, 3, dtype=torch.double)
    torch.manual_seed(5)
    masks = modules._recurrent_masks(m, 5, x)
    torch.manual_seed(5)
    out, _ = m(x)
    want = reference.rnn_reference(x, m._flat_weights, torch.zeros(1, 5, 6, dtype=torch.double),
                                   None, None, fastcells.MODES["GRU_RESET_BEFORE"], 1, False,
                                   True, 0, None, recurrent_masks=masks)[0]
    torch.testing.assert_close(out, want, **TOL[torch.float64])


def test_wrong_mask_shape_is_named():
    x, ws, h0, c0, args, masks, _ = _case("LSTM", 1, 1, 0, False)
    with pytest.raises(RuntimeError, match="recurrent_masks"):
        _ops.rnn(x, ws, h0, c0, *args, recurrent_masks=masks[:, :2])


def test_revert_and_onnx_refuse_it():
    m = fastcells.LSTM(3, 4, recurrent_dropout=0.1)
    assert "recurrent_dropout=0.1" in repr(m)
    with pytest.raises(ValueError, match="recurrent_dropout"):
        fastcells.revert(m)
    from fastcells.onnx import FastcellsOnnxError, check_exportable
    with pytest.raises(FastcellsOnnxError, match="recurrent dropout"):
        check_exportable(nn.Sequential(m))
    check_exportable(nn.Sequential(m).eval())  # eval: no mask, exportable
