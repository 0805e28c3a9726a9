"""Variational recurrent dropout: fastcells.LSTM / GRU / RNN(..., recurrent_dropout=p).

In training the recurrent product reads h_{t-1} * m, with one inverted-dropout
mask m per sequence (and layer and direction) for all its steps and gates (Gal
and Ghahramani 2016; Keras' recurrent_dropout draws one mask per gate), the
reset-before GRU's r * h_{t-1} included; a GRU's update z * h_{t-1} reads
h_{t-1} itself. Eval uses no mask. The fused op takes the masks as its
`recurrent_masks` argument; checked against the reference
(fastcells.reference.rnn_reference(..., recurrent_masks=m)) in float64, values
and gradients, over the cells and options, with gradcheck, on both thread
splits, with zoneout, and for the module's draws and the errors.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import CELLS, HAVE_FASTCELLS, TOL, assert_op_matches_reference, state_option_case

pytestmark = pytest.mark.skipif(not HAVE_FASTCELLS, reason="fastcells extension not built")

import fastcells  # noqa: E402
from fastcells import _ops, modules, reference  # noqa: E402


def _case(cell, layers, D, proj, packed, B=4, H=5, T=6, zone=False, seed=0):
    """Op arguments (float64 leaves), recurrent dropout masks and (with `zone`)
    zoneout weights for one configuration."""
    x, ws, h0, c0, args, rows, g = state_option_case(cell, layers, D, proj, packed, B, H, T,
                                                     seed)
    P = h0.shape[2]
    masks = (torch.rand((len(h0), B, P), generator=g) > 0.3).double() / 0.7
    z = None
    if zone:
        width = P + (H if c0 is not None else 0)
        z = (torch.rand((len(h0), *rows, width), generator=g) < 0.2).double()
    return x, ws, h0, c0, args, masks, z


CASES = []
for _c in CELLS:
    # (with zoneout where the cell has it: not LSTM_LN, tests/test_layer_norm.py)
    CASES += [(_c.name, 2, 2, 0, False, False), (_c.name, 1, 1, 0, True, False),
              (_c.name, 2, 1, 0, True, not (_c.layer_norm and _c.has_cell_state))]
CASES += [("LSTM", 2, 2, 3, True, False), ("LSTM", 1, 1, 2, False, True)]


def _check(x, ws, h0, c0, args, masks, z):
    assert_op_matches_reference(x, ws, h0, c0, args, zoneout=z, recurrent_masks=masks)


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


def test_eval_module_exports_to_onnx():
    """Recurrent dropout exists in training only (test_zoneout.py checks that
    revert, ONNX and Keras refuse both options)."""
    from fastcells.onnx import check_exportable
    check_exportable(nn.Sequential(fastcells.LSTM(3, 4, recurrent_dropout=0.1)).eval())
