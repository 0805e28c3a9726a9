"""Zoneout: fastcells.LSTM / GRU / RNN(..., zoneout=p).

Each unit keeps its previous h (and the LSTM's c) with probability p in
training and mixes them by expectation in eval: h_t = z h_{t-1} + (1 - z) h~_t
with z in {0, 1} drawn from torch's generator in one call per forward, or z = p
(Krueger et al. 2016; the LSTM's h~_t uses the candidate c~_t). The fused op
takes the weights z as its `zoneout` argument; checked against the reference
(fastcells.reference.rnn_reference(..., zoneout=z)) in float64, values and
gradients, over the cells and options, with gradcheck, on both thread counts,
and for the module's draws, its eval mode and the errors.
"""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from conftest import (CELLS, HAVE_FASTCELLS, TOL, assert_func_grad_runs_the_reference,
                      assert_op_matches_reference, state_option_case)

pytestmark = pytest.mark.skipif(not HAVE_FASTCELLS, reason="fastcells extension not built")

import fastcells  # noqa: E402
from fastcells import _ops, modules, reference  # noqa: E402

# Every cell of the table, the reset-before GRU included.
# LSTM_LN refuses zoneout (its h_t comes from LN(c_t); tests/test_layer_norm.py).
CELL_NAMES = [c.name for c in CELLS if not (c.layer_norm and c.has_cell_state)]


def _case(cell, layers, D, proj, packed, kind, seed=0):
    """Op arguments (float64 leaves) and zoneout weights for one configuration."""
    x, ws, h0, c0, args, rows, g = state_option_case(cell, layers, D, proj, packed, seed=seed)
    H = ws[1].shape[1] if not proj else ws[-1].shape[1]
    shape = (len(h0), *rows, h0.shape[2] + (H if c0 is not None else 0))
    z = ((torch.rand(shape, generator=g) < 0.3).double() if kind == "binary"
         else torch.full(shape, 0.3, dtype=torch.double))
    return x, ws, h0, c0, args, z


CASES = []
for _cell in CELL_NAMES:
    CASES += [(_cell, 2, 2, 0, False, "binary"), (_cell, 1, 1, 0, True, "fraction"),
              (_cell, 2, 1, 0, True, "binary")]
CASES += [("LSTM", 2, 2, 3, True, "binary"), ("LSTM", 1, 1, 2, False, "fraction")]


@pytest.mark.parametrize("cell,layers,D,proj,packed,kind", CASES,
                         ids=[f"{c}-L{a}-D{b}-proj{p}-{'packed' if k else 'dense'}-{z}"
                              for c, a, b, p, k, z in CASES])
def test_values_and_gradients_match_reference(cell, layers, D, proj, packed, kind):
    x, ws, h0, c0, args, z = _case(cell, layers, D, proj, packed, kind)
    assert_op_matches_reference(x, ws, h0, c0, args, zoneout=z)


def test_zoneout_of_one_keeps_the_initial_state():
    x, ws, h0, c0, args, z = _case("LSTM", 2, 1, 0, False, "binary")
    out, hy, cy = _ops.rnn(x, ws, h0, c0, *args, zoneout=torch.ones_like(z))
    assert torch.equal(hy, h0) and torch.equal(cy, c0)
    assert torch.equal(out, h0[-1].expand_as(out))


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_gradcheck(cell):
    x, ws, h0, c0, args, z = _case(cell, 2, 2, 2 if cell == "LSTM" else 0, True, "binary")
    n = len(ws)

    def f(x, h0, *rest):
        c = rest[0] if c0 is not None else None
        w = list(rest[-n:])
        return tuple(t for t in _ops.rnn(x, w, h0, c, *args, zoneout=z) if t is not None)

    leaves = (x, h0) + ((c0,) if c0 is not None else ()) + tuple(ws)
    assert torch.autograd.gradcheck(f, leaves)


@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
def test_module_training_draws_zeros_and_ones(cell):
    """The module's training forward is the reference with the weights it draws
    (redrawn here from the same generator state)."""
    torch.manual_seed(0)
    m = getattr(fastcells, cell)(3, 6, 2, bidirectional=True, zoneout=0.3).double()
    x = torch.randn(7, 5, 3, dtype=torch.double)
    torch.manual_seed(123)
    z = modules._zoneout_weights(m, (7, 5), x, cell == "LSTM")
    assert set(z.unique().tolist()) <= {0.0, 1.0}
    torch.manual_seed(123)
    out, _ = m(x)
    L, H = 2, 6
    h0 = torch.zeros(2 * L, 5, H, dtype=torch.double)
    c0 = h0.clone() if cell == "LSTM" else None
    want = reference.rnn_reference(x, m._flat_weights, h0, c0, None, fastcells.MODES[m.mode],
                                   L, True, True, 0, None, zoneout=z)[0]
    torch.testing.assert_close(out, want, **TOL[torch.float64])


def test_draws_keep_with_probability_p():
    m = fastcells.LSTM(4, 32, 2, zoneout=0.3)
    z = modules._zoneout_weights(m, (64, 16), torch.zeros(1), True)
    assert z.shape == (2, 64, 16, 64)
    assert abs(z.mean().item() - 0.3) < 0.01
    z2 = modules._zoneout_weights(m, (64, 16), torch.zeros(1), True)
    assert not torch.equal(z, z2)  # a new draw per forward


@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
def test_eval_mixes_by_the_rate(cell):
    torch.manual_seed(0)
    m = getattr(fastcells, cell)(3, 6, zoneout=0.25).double().eval()
    x = torch.randn(7, 5, 3, dtype=torch.double)
    out, _ = m(x)
    h0 = torch.zeros(1, 5, 6, dtype=torch.double)
    z = torch.full((1, 7, 5, 6 + (6 if cell == "LSTM" else 0)), 0.25, dtype=torch.double)
    want = reference.rnn_reference(x, m._flat_weights, h0, h0.clone() if cell == "LSTM" else None,
                                   None, fastcells.MODES[m.mode], 1, False, True, 0, None,
                                   zoneout=z)[0]
    torch.testing.assert_close(out, want, **TOL[torch.float64])
    m.zoneout = 0.0  # without zoneout: a different result
    assert not torch.allclose(m(x)[0], out)


def test_thread_counts_give_the_same_bits():
    torch.manual_seed(0)
    n = torch.get_num_threads()
    try:
        for B, H in ((2, 64), (64, 16)):  # hidden units split / batch rows split
            m = fastcells.LSTM(4, H, 2, zoneout=0.2).eval()
            x = torch.randn(12, B, 4)
            results = []
            for threads in (1, 2):
                torch.set_num_threads(threads)
                out, _ = m(x)
                results.append([out.detach()] + list(torch.autograd.grad(
                    out.square().sum(), list(m.parameters()))))
            for a, b in zip(*results):
                assert torch.equal(a, b)
    finally:
        torch.set_num_threads(n)


def test_bfloat16_module():
    torch.manual_seed(0)
    m = fastcells.GRU(3, 8, zoneout=0.2).eval()
    x = torch.randn(5, 2, 3)
    want = m(x)[0]
    got = m.bfloat16()(x.bfloat16())[0]
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.detach(), **TOL[torch.bfloat16])


def test_compiled_eval_module_matches_eager():
    torch.manual_seed(0)
    m = fastcells.LSTM(3, 6, 2, zoneout=0.3).eval()
    x = torch.randn(5, 2, 3)
    want = m(x)[0]
    got = torch.compile(m, fullgraph=True, backend="aot_eager")(x)[0]
    torch.testing.assert_close(got, want, **TOL[torch.float32])


def test_torch_func_runs_the_reference(monkeypatch):
    torch.manual_seed(0)
    m = fastcells.GRU(3, 4, zoneout=0.3).double().eval()
    assert_func_grad_runs_the_reference(monkeypatch, m, torch.randn(5, 2, 3, dtype=torch.double),
                                        0)


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("bad", [1.5, -0.1, True, "0.2"])
def test_bad_rate_is_named(bad):
    with pytest.raises(ValueError, match="zoneout must be a number in"):
        fastcells.GRU(3, 4, zoneout=bad)


def test_wrong_weights_shape_is_named():
    x, ws, h0, c0, args, z = _case("LSTM", 1, 1, 0, False, "binary")
    with pytest.raises(RuntimeError, match="zoneout"):
        _ops.rnn(x, ws, h0, c0, *args, zoneout=z[..., :3])


def test_second_derivatives_with_zoneout_raise():
    m = fastcells.LSTM(3, 4, zoneout=0.2).double()
    out, _ = m(torch.randn(5, 2, 3, dtype=torch.double))
    with pytest.raises(RuntimeError, match="second derivatives with zoneout"):
        torch.autograd.grad(out.sum(), list(m.parameters()), create_graph=True)


@pytest.mark.parametrize("option,onnx_words", [("zoneout", "zoneout"),
                                               ("recurrent_dropout", "recurrent dropout")])
def test_revert_onnx_and_keras_refuse_it(option, onnx_words):
    """Options torch.nn, ONNX and Keras' conversion lack (recurrent dropout: in
    training; tests/test_recurrent_dropout.py exports it in eval)."""
    m = fastcells.RNN(3, 4, **{option: 0.1})
    assert f"{option}=0.1" in repr(m)
    with pytest.raises(ValueError, match=option):
        fastcells.revert(m)
    from fastcells.onnx import FastcellsOnnxError, check_exportable
    with pytest.raises(FastcellsOnnxError, match=onnx_words):
        check_exportable(nn.Sequential(m))
    os.environ.setdefault("KERAS_BACKEND", "torch")  # (as tests/test_keras.py)
    pytest.importorskip("keras")
    with pytest.raises(ValueError, match=option):
        fastcells.to_keras(m)
