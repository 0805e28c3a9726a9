"""fastcells.reference.rnn_reference against torch.nn directly (no extension needed).

The reference is what the fused kernels are later compared with, so it is
first checked here, in float64, against torch.nn: outputs, final states and the
gradients of every parameter, input and initial state, over the module grid.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from conftest import (MODE_NAMES, SHAPES, assert_close_list, flatten_result, grads_of, make_hx,
                      make_input, make_nn, module_grid, row_id, run_functional, weighted_loss)
from fastcells.reference import (gru_cell, lstm_cell, rnn_reference, rnn_relu_cell,
                                 rnn_tanh_cell)

GRID = module_grid()
I, H = 3, 4


def _run_both(row: dict, dtype: torch.dtype = torch.float64):
    T, B = SHAPES[row["shape"]]
    kw = dict(num_layers=row["num_layers"], bidirectional=row["bidirectional"],
              batch_first=row["batch_first"], bias=row["bias"])
    if row["mode"] == "LSTM":
        kw["proj_size"] = row["proj_size"]
    mod = make_nn(row["mode"], I, H, dtype=dtype, **kw)
    results = []
    for fn in (None, rnn_reference):
        leaf, x = make_input(row["kind"], T, B, I, dtype, batch_first=row["batch_first"])
        hx = make_hx(mod, None if row["kind"] == "unbatched" else B, dtype) if row["hx"] else None
        leaves = [leaf] + list(mod.parameters()) + ([] if hx is None else
                                                    list(hx if isinstance(hx, tuple) else [hx]))
        res = mod(x, hx) if fn is None else run_functional(fn, mod, x, hx)
        flat = flatten_result(res)
        weighted_loss(flat).backward()
        results.append((res, flat, grads_of(leaves)))
    return results, [n for n, _ in mod.named_parameters()]


@pytest.mark.parametrize("row", GRID, ids=row_id)
def test_reference_matches_torch_nn(row):
    (ref_res, ref_flat, ref_grads), (res, flat, grads) = _run_both(row)[0]
    names = ["output", "h_n", "c_n"][:len(flat)]
    assert_close_list(flat, ref_flat, torch.float64, names)
    if row["kind"] == "packed":
        assert isinstance(res[0], PackedSequence)
        assert torch.equal(res[0].batch_sizes, ref_res[0].batch_sizes)
        assert torch.equal(res[0].unsorted_indices, ref_res[0].unsorted_indices)
    for g in ref_grads:
        assert g is not None
    assert_close_list(grads, ref_grads, torch.float64)


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_reference_float32(mode):
    row = dict(mode=mode, kind="packed", bidirectional=True, num_layers=2, batch_first=False,
               proj_size=2 if mode == "LSTM" else 0, bias=True, hx=True, shape="T5B3")
    (ref_res, ref_flat, ref_grads), (res, flat, grads) = _run_both(row, torch.float32)[0]
    assert_close_list(flat, ref_flat, torch.float32)
    assert_close_list(grads, ref_grads, torch.float32)


def _split_single_layers(mod: nn.Module, mode: str) -> list[nn.Module]:
    """One single-layer torch.nn module per layer of ``mod`` holding its weights."""
    D = 2 if mod.bidirectional else 1
    P = getattr(mod, "proj_size", 0) or mod.hidden_size
    layers = []
    for layer in range(mod.num_layers):
        kw = dict(bidirectional=mod.bidirectional, bias=mod.bias, dtype=torch.float64)
        if mode == "LSTM":
            kw["proj_size"] = mod.proj_size
        single = make_nn(mode, mod.input_size if layer == 0 else D * P, mod.hidden_size, **kw)
        sd = {k.replace(f"_l{layer}", "_l0"): v for k, v in mod.state_dict().items()
              if f"_l{layer}" in k}
        single.load_state_dict(sd)
        layers.append(single)
    return layers


@pytest.mark.parametrize("mode", MODE_NAMES)
@pytest.mark.parametrize("packed", [False, True])
def test_reference_dropout_masks(mode, packed):
    """dropout_masks multiply the input of layers 1..L-1: check against a stack of
    single-layer torch.nn modules with the mask applied by hand in between."""
    T, B, L = 5, 3, 3
    kw = dict(num_layers=L, bidirectional=True)
    if mode == "LSTM":
        kw["proj_size"] = 2
    mod = make_nn(mode, I, H, **kw)
    P = 2 if mode == "LSTM" else H
    _, x = make_input("packed" if packed else "dense", T, B, I, torch.float64)
    rows = x.data.shape[0] if packed else None
    g = torch.Generator().manual_seed(5)
    shape = (L - 1, rows, 2 * P) if packed else (L - 1, T, B, 2 * P)
    masks = (torch.rand(shape, generator=g, dtype=torch.float64) > 0.4).double() / 0.6
    out, _ = run_functional(rnn_reference, mod, x, dropout_masks=masks)

    y = x
    for layer, single in enumerate(_split_single_layers(mod, mode)):
        if layer > 0:
            y = PackedSequence(y.data * masks[layer - 1], *y[1:]) if packed else y * masks[layer - 1]
        y, _ = single(y)
    expect = y.data if packed else y
    got = out.data if packed else out
    torch.testing.assert_close(got, expect, atol=1e-12, rtol=1e-12)


def test_reference_cells_match_torch_nn_cells():
    torch.manual_seed(0)
    x, h, c = torch.randn(3, I, dtype=torch.float64), torch.randn(3, H, dtype=torch.float64), \
        torch.randn(3, H, dtype=torch.float64)
    for cls, fn in ((nn.LSTMCell, None), (nn.GRUCell, gru_cell), (nn.RNNCell, rnn_tanh_cell)):
        cell = cls(I, H, dtype=torch.float64)
        w = (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
        if cls is nn.LSTMCell:
            got = lstm_cell(x, h, c, *w, None)
            expect = cell(x, (h, c))
            torch.testing.assert_close(got, expect, atol=1e-14, rtol=1e-14)
        else:
            torch.testing.assert_close(fn(x, h, *w), cell(x, h), atol=1e-14, rtol=1e-14)
    cell = nn.RNNCell(I, H, nonlinearity="relu", dtype=torch.float64)
    torch.testing.assert_close(
        rnn_relu_cell(x, h, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh),
        cell(x, h), atol=1e-14, rtol=1e-14)


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_reference_empty_sequences(mode):
    """T = 0 gives an empty output and hy = hx; B = 0 gives empty everything."""
    mod = make_nn(mode, I, H, num_layers=2)
    hx = make_hx(mod, 2, torch.float64)
    out, state = run_functional(rnn_reference, mod, torch.zeros(0, 2, I, dtype=torch.float64), hx)
    assert out.shape == (0, 2, H)
    for s, s0 in zip(state if isinstance(state, tuple) else (state,),
                     hx if isinstance(hx, tuple) else (hx,)):
        torch.testing.assert_close(s, s0)
    out, state = run_functional(rnn_reference, mod, torch.zeros(4, 0, I, dtype=torch.float64))
    ref_out, ref_state = mod(torch.zeros(4, 0, I, dtype=torch.float64))
    assert out.shape == ref_out.shape


def test_reference_rejects_bad_mode_and_weights():
    mod = make_nn("GRU", I, H)
    x = torch.zeros(2, 1, I, dtype=torch.float64)
    h = torch.zeros(1, 1, H, dtype=torch.float64)
    with pytest.raises(ValueError, match="mode"):
        rnn_reference(x, mod._flat_weights, h, None, None, 7, 1, False, True, 0)
    with pytest.raises(ValueError, match="weights"):
        rnn_reference(x, mod._flat_weights[:3], h, None, None, 1, 1, False, True, 0)
