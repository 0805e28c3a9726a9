"""Every step's cell state: fastcells.LSTM(..., return_cell_states=True).

The fused op reads the last layer's c_t from its saved activations and passes
their gradient back into the hand-derived backward (rnn_backward's
`grad_reserve`). Checked against the pure-PyTorch reference
(fastcells.reference.rnn_reference(..., return_cell_states=True)) in float64,
values and gradients, over the module options; with gradcheck; for the
caller's layouts (batch_first, packed, unbatched); on both thread counts; and
for the errors of what is not supported.
"""
from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_sequence, pad_packed_sequence

from conftest import HAVE_FASTCELLS, TOL, assert_close_list, assert_func_grad_runs_the_reference

pytestmark = pytest.mark.skipif(not HAVE_FASTCELLS, reason="fastcells extension not built")

import fastcells  # noqa: E402
from fastcells import _ops, reference  # noqa: E402

LSTM = fastcells.MODES["LSTM"]


def _weights(I, H, L, D, proj, seed=0):
    torch.manual_seed(seed)
    m = nn.LSTM(I, H, L, bidirectional=D == 2, proj_size=proj).double()
    return [w.detach().clone().requires_grad_() for w in m._flat_weights]


def _states(L, D, B, H, P, seed=1):
    g = torch.Generator().manual_seed(seed)
    h0 = torch.randn(L * D, B, P, generator=g, dtype=torch.double, requires_grad=True)
    c0 = torch.randn(L * D, B, H, generator=g, dtype=torch.double, requires_grad=True)
    return h0, c0


GRID = list(itertools.product((1, 2), (1, 2), (0, 3), ("dense", "packed")))


@pytest.mark.parametrize("L,D,proj,kind", GRID,
                         ids=[f"L{a}-D{b}-proj{c}-{d}" for a, b, c, d in GRID])
def test_values_and_gradients_match_reference(L, D, proj, kind):
    I, H, B, T = 3, 5, 4, 6
    P = proj or H
    ws = _weights(I, H, L, D, proj)
    h0, c0 = _states(L, D, B, H, P)
    g = torch.Generator().manual_seed(2)
    if kind == "dense":
        x = torch.randn(T, B, I, generator=g, dtype=torch.double, requires_grad=True)
        batch_sizes = None
    else:
        batch_sizes = [4, 4, 3, 2, 2, 1]
        x = torch.randn(sum(batch_sizes), I, generator=g, dtype=torch.double, requires_grad=True)
    args = (None if batch_sizes is None else batch_sizes, LSTM, L, D == 2, True, proj, None)
    got = _ops.rnn(x, ws, h0, c0, *args, return_cell_states=True)
    want = reference.rnn_reference(x, ws, h0, c0, *args, return_cell_states=True)
    assert got[3].shape == want[3].shape == (*x.shape[:-1], D * H)
    assert_close_list(got, want, torch.float64)
    # The cell states' gradient alone, and together with the output's.
    leaves = [x, h0, c0, *ws]
    for outs in ((3,), (0, 3), (0, 1, 2, 3)):
        cot = [torch.randn(want[k].shape, generator=g, dtype=torch.double) for k in outs]
        ga = torch.autograd.grad([got[k] for k in outs], leaves, cot, retain_graph=True)
        gb = torch.autograd.grad([want[k] for k in outs], leaves, cot, retain_graph=True)
        assert_close_list(ga, gb, torch.float64)


def test_last_step_is_the_final_cell_state():
    m = fastcells.LSTM(3, 5, 2, bidirectional=True, return_cell_states=True)
    out, (h, c), cs = m(torch.randn(7, 4, 3))
    assert cs.shape == (7, 4, 10)
    assert torch.equal(cs[-1, :, :5], c[-2])  # forward direction ends at t = T-1
    assert torch.equal(cs[0, :, 5:], c[-1])   # reverse direction ends at t = 0


def test_layouts_follow_output():
    torch.manual_seed(0)
    m = fastcells.LSTM(3, 5, 2, return_cell_states=True)
    mb = fastcells.LSTM(3, 5, 2, batch_first=True, return_cell_states=True)
    mb.load_state_dict(m.state_dict())
    x = torch.randn(6, 4, 3)
    _, _, cs = m(x)
    _, _, cs_b = mb(x.transpose(0, 1))
    assert torch.equal(cs_b, cs.transpose(0, 1))
    _, _, cs_u = m(x[:, 1])
    assert torch.equal(cs_u, cs[:, 1])
    seqs = [torch.randn(n, 3) for n in (4, 6, 2)]
    _, (_, c), cs_p = mb(pack_sequence(seqs, enforce_sorted=False))
    assert isinstance(cs_p, nn.utils.rnn.PackedSequence)
    padded, lengths = pad_packed_sequence(cs_p, batch_first=True)
    for i, n in enumerate(lengths.tolist()):
        _, _, alone = mb(seqs[i].unsqueeze(0))
        torch.testing.assert_close(padded[i, :n], alone[0])
        torch.testing.assert_close(padded[i, n - 1], c[-1, i])


def test_gradcheck():
    ws = _weights(2, 3, 2, 2, 0)
    h0, c0 = _states(2, 2, 2, 3, 3)
    x = torch.randn(4, 2, 2, dtype=torch.double, requires_grad=True)

    def f(x, h0, c0, *ws):
        out, _, _, cs = _ops.rnn(x, list(ws), h0, c0, None, LSTM, 2, True, True, 0, None,
                                 return_cell_states=True)
        return out, cs

    assert torch.autograd.gradcheck(f, (x, h0, c0, *ws))


def test_inference_mode_gives_the_same_values():
    torch.manual_seed(0)
    m = fastcells.LSTM(3, 8, 2, return_cell_states=True)
    x = torch.randn(5, 3, 3)
    _, _, cs = m(x)
    with torch.inference_mode():
        _, _, cs_inf = m(x)
    assert torch.equal(cs_inf, cs.detach())


def test_thread_counts_give_the_same_bits():
    # Batch 2 at hidden 64: the backward splits hidden units among threads.
    torch.manual_seed(0)
    m = fastcells.LSTM(4, 64, 2, return_cell_states=True)
    x = torch.randn(12, 2, 4)
    n = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            _, _, cs = m(x)
            results.append([cs.detach()] + list(torch.autograd.grad((cs ** 2).sum(),
                                                                   list(m.parameters()))))
    finally:
        torch.set_num_threads(n)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_bfloat16_cell_states_in_the_input_dtype():
    torch.manual_seed(0)
    m = fastcells.LSTM(3, 8, return_cell_states=True)
    x = torch.randn(5, 2, 3)
    _, _, want = m(x)
    _, _, got = m.bfloat16()(x.bfloat16())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.detach(), **TOL[torch.bfloat16])
    got.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_torch_func_runs_the_reference(monkeypatch):
    torch.manual_seed(0)
    m = fastcells.LSTM(3, 4, return_cell_states=True).double()
    assert_func_grad_runs_the_reference(monkeypatch, m, torch.randn(5, 2, 3, dtype=torch.double),
                                        2)


def test_compiled_module_matches_eager():
    torch.manual_seed(0)
    m = fastcells.LSTM(3, 6, 2, return_cell_states=True)
    x = torch.randn(5, 2, 3)

    def step(mod):
        out, _, cs = mod(x)
        (out.sum() + cs.square().sum()).backward()
        grads = [p.grad.clone() for p in mod.parameters()]
        mod.zero_grad()
        return [out.detach(), cs.detach()] + grads

    want = step(m)
    got = step(torch.compile(m, fullgraph=True, backend="aot_eager"))
    assert_close_list(got, want, torch.float32)


# ---------------------------------------------------------------- errors

def test_argument_must_be_a_bool():
    with pytest.raises(TypeError, match="return_cell_states must be a bool"):
        fastcells.LSTM(3, 4, return_cell_states=1)


def test_only_the_lstm_has_cell_states():
    x, h = torch.randn(3, 2, 4), torch.zeros(1, 2, 5)
    ws = list(nn.GRU(4, 5)._flat_weights)
    with pytest.raises(ValueError, match="return_cell_states"):
        _ops.rnn(x, ws, h, None, None, fastcells.MODES["GRU"], 1, False, True, 0, None,
                 return_cell_states=True)
    with pytest.raises(ValueError, match="return_cell_states"):
        reference.rnn_reference(x, ws, h, None, None, fastcells.MODES["GRU"], 1, False, True,
                                0, None, return_cell_states=True)


def test_second_derivatives_through_cell_states_raise():
    m = fastcells.LSTM(3, 4, return_cell_states=True).double()
    _, _, cs = m(torch.randn(5, 2, 3, dtype=torch.double))
    with pytest.raises(RuntimeError, match="second derivatives through the cell states"):
        torch.autograd.grad(cs.sum(), list(m.parameters()), create_graph=True)


def test_grad_reserve_of_the_wrong_shape_is_named():
    m = nn.LSTM(3, 4)
    x = torch.randn(5, 2, 3)
    out, hy, cy, reserve = torch.ops.fastcells.rnn_forward(
        x, m._flat_weights, None, None, None, LSTM, 1, False, True, 0, None)
    with pytest.raises(RuntimeError, match="`grad_reserve` must be a 1-D"):
        torch.ops.fastcells.rnn_backward(x, m._flat_weights, None, None, None, LSTM, 1, False,
                                         True, 0, None, reserve, torch.ones_like(out), None,
                                         None, True, torch.ones(3))


def test_revert_and_onnx_refuse_it():
    m = fastcells.LSTM(3, 4, return_cell_states=True)
    with pytest.raises(ValueError, match="return_cell_states=True"):
        fastcells.revert(m)
    with pytest.warns(UserWarning, match="return_cell_states=True"):
        model = fastcells.revert(nn.Sequential(m))
    assert model[0] is m
    from fastcells.onnx import FastcellsOnnxError, check_exportable
    with pytest.raises(FastcellsOnnxError, match="return_cell_states"):
        check_exportable(nn.Sequential(m))
