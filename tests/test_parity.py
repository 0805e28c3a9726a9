"""fastcells.LSTM / GRU / RNN against torch.nn with the same weights.

Outputs, final states and the gradients of every parameter, the input and the
initial state are compared over a pairwise grid of every module option
(conftest.module_grid: layers 1-3, both directions, batch_first, proj_size,
bias off, unbatched, PackedSequence with unsorted lengths, hx given or not,
T = 1, B = 1), in float64 (~1e-10), float32 and bfloat16. Also: state_dict
both ways, seeded initialisation, dropout in eval and train mode.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from conftest import (MODE_NAMES, MODES, SHAPES, assert_close_list, flatten_result, grads_of,
                      make_fastcells_like, make_hx, make_input, make_nn, module_grid,
                      needs_fastcells, row_id, run_functional, weighted_loss)
from fastcells.reference import rnn_reference

# Every test runs once per CPU ISA path the host supports (conftest.cpu_isa).
pytestmark = [needs_fastcells, pytest.mark.usefixtures("cpu_isa")]

GRID = module_grid()
I, H = 3, 4


def _module_kwargs(row: dict) -> dict:
    kw = dict(num_layers=row["num_layers"], bidirectional=row["bidirectional"],
              batch_first=row["batch_first"], bias=row["bias"])
    if row["mode"] == "LSTM":
        kw["proj_size"] = row["proj_size"]
    return kw


def _forward_backward(mod: nn.Module, row: dict, dtype: torch.dtype):
    """Fresh inputs, forward, weighted loss backward. Returns (result, flat, grads)."""
    T, B = SHAPES[row["shape"]]
    leaf, x = make_input(row["kind"], T, B, I, dtype, batch_first=row["batch_first"])
    hx = make_hx(mod, None if row["kind"] == "unbatched" else B, dtype) if row["hx"] else None
    states = [] if hx is None else list(hx if isinstance(hx, tuple) else [hx])
    res = mod(x, hx)
    flat = flatten_result(res)
    weighted_loss(flat).backward()
    params = [p for _, p in mod.named_parameters()]
    return res, flat, grads_of([leaf] + states + params)


def _grad_names(mod: nn.Module, row: dict) -> list[str]:
    states = [] if not row["hx"] else (["grad h0", "grad c0"] if row["mode"] == "LSTM" else ["grad h0"])
    return ["grad input"] + states + [f"grad {n}" for n, _ in mod.named_parameters()]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("row", GRID, ids=row_id)
def test_module_matches_torch_nn(row, dtype):
    ref = make_nn(row["mode"], I, H, dtype=dtype, **_module_kwargs(row))
    mod = make_fastcells_like(ref)
    assert [n for n, _ in mod.named_parameters()] == [n for n, _ in ref.named_parameters()]
    ref_res, ref_flat, ref_grads = _forward_backward(ref, row, dtype)
    res, flat, grads = _forward_backward(mod, row, dtype)
    assert_close_list(flat, ref_flat, dtype, ["output", "h_n", "c_n"][:len(flat)])
    if row["kind"] == "packed":
        assert isinstance(res[0], PackedSequence)
        for field in ("batch_sizes", "sorted_indices", "unsorted_indices"):
            assert torch.equal(getattr(res[0], field), getattr(ref_res[0], field)), field
    assert_close_list(grads, ref_grads, dtype, _grad_names(ref, row))


@pytest.mark.parametrize("row", GRID[::3], ids=row_id)
def test_module_matches_reference(row):
    """Same grid subset against fastcells.reference (float64), so that a torch.nn
    change cannot hide a kernel error."""
    ref = make_nn(row["mode"], I, H, **_module_kwargs(row))
    mod = make_fastcells_like(ref)
    T, B = SHAPES[row["shape"]]
    _, x = make_input(row["kind"], T, B, I, torch.float64, batch_first=row["batch_first"])
    hx = make_hx(ref, None if row["kind"] == "unbatched" else B, torch.float64) if row["hx"] else None
    expect = flatten_result(run_functional(rnn_reference, ref, x, hx))
    assert_close_list(flatten_result(mod(x, hx)), expect, torch.float64)


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


@pytest.mark.parametrize("mode", MODE_NAMES)
@pytest.mark.parametrize("kind", ["dense", "packed"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_module_low_precision_error_within_2x_torch_nn(mode, kind, dtype):
    """bfloat16 and float16 (on the CPU too): error against the float64 result no
    worse than 2x torch.nn's own error in that dtype (plus half an ulp of the
    tensor's scale)."""
    row = dict(mode=mode, kind=kind, bidirectional=True, num_layers=2, batch_first=False,
               proj_size=3 if mode == "LSTM" else 0, bias=True, hx=True, shape="T5B3")
    ref64 = make_nn(mode, I, 8, dtype=torch.float64, **_module_kwargs(row))
    ref16 = make_nn(mode, I, 8, dtype=dtype, **_module_kwargs(row))
    ref16.load_state_dict(ref64.state_dict())
    mod16 = make_fastcells_like(ref16)
    _, flat64, g64 = _forward_backward(ref64, row, torch.float64)
    _, flatnn, gnn = _forward_backward(ref16, row, dtype)
    _, flatfc, gfc = _forward_backward(mod16, row, dtype)
    half_ulp = torch.finfo(dtype).eps / 2
    for name, e, n, f in zip(["output", "h_n", "c_n"] + _grad_names(ref64, row),
                             flat64 + g64, flatnn + gnn, flatfc + gfc):
        assert f.dtype == dtype, name
        floor = half_ulp * max(1.0, e.abs().max().item())
        assert _max_err(f, e) <= 2 * _max_err(n, e) + floor, (
            f"{name}: fastcells {dtype} error {_max_err(f, e):.3g} vs torch.nn {_max_err(n, e):.3g}")


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_state_dict_both_ways_and_seeded_init(mode):
    import fastcells

    cls, _, extra = MODES[mode]
    kw = dict(num_layers=2, bidirectional=True, **extra)
    if mode == "LSTM":
        kw["proj_size"] = 2
    torch.manual_seed(7)
    ref = cls(I, H, **kw)
    torch.manual_seed(7)
    mod = getattr(fastcells, cls.__name__)(I, H, **kw)
    # Same parameter names, shapes, order and (seeded) initial values as torch.nn.
    assert list(mod.state_dict()) == list(ref.state_dict())
    for (n, a), (_, b) in zip(mod.state_dict().items(), ref.state_dict().items()):
        assert a.shape == b.shape, n
        assert torch.equal(a, b), f"{n}: initialisation differs from torch.nn with the same seed"
    # fastcells -> torch.nn and back.
    other = cls(I, H, **kw)
    with torch.no_grad():
        for p in mod.parameters():
            p.normal_()
    other.load_state_dict(mod.state_dict())
    x = torch.randn(4, 2, I)
    assert_close_list(flatten_result(other(x)), flatten_result(mod(x)), torch.float32)
    mod2 = getattr(fastcells, cls.__name__)(I, H, **kw)
    mod2.load_state_dict(other.state_dict())
    assert_close_list(flatten_result(mod2(x)), flatten_result(other(x)), torch.float32)


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_module_attributes_match_torch_nn(mode):
    import fastcells

    cls, _, extra = MODES[mode]
    kw = dict(num_layers=2, bias=False, batch_first=True, dropout=0.25, bidirectional=True, **extra)
    if mode == "LSTM":
        kw["proj_size"] = 3
    ref, mod = cls(I, 5, **kw), getattr(fastcells, cls.__name__)(I, 5, **kw)
    for attr in ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
                 "bidirectional", "proj_size", "nonlinearity"):
        if hasattr(ref, attr):
            assert getattr(mod, attr) == getattr(ref, attr), attr
    assert isinstance(mod, nn.Module)


# ----------------------------------------------------------------------------- dropout

@pytest.mark.parametrize("mode", MODE_NAMES)
def test_dropout_eval_mode_equals_torch_nn(mode):
    row = dict(mode=mode, kind="packed", bidirectional=True, num_layers=3, batch_first=False,
               proj_size=0, bias=True, hx=True, shape="T5B3")
    ref = make_nn(mode, I, H, dropout=0.5, **_module_kwargs(row)).eval()
    mod = make_fastcells_like(ref)
    assert not mod.training
    _, ref_flat, ref_grads = _forward_backward(ref, row, torch.float64)
    _, flat, grads = _forward_backward(mod, row, torch.float64)
    assert_close_list(flat, ref_flat, torch.float64)
    assert_close_list(grads, ref_grads, torch.float64)


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_dropout_zero_in_training_equals_eval(mode):
    row = dict(mode=mode, kind="dense", bidirectional=False, num_layers=2, batch_first=False,
               proj_size=0, bias=True, hx=False, shape="T5B3")
    ref = make_nn(mode, I, H, dropout=0.0, **_module_kwargs(row)).train()
    mod = make_fastcells_like(ref).train()
    _, ref_flat, ref_grads = _forward_backward(ref, row, torch.float64)
    _, flat, grads = _forward_backward(mod, row, torch.float64)
    assert_close_list(flat, ref_flat, torch.float64)
    assert_close_list(grads, ref_grads, torch.float64)
    mod.eval()
    _, flat_eval, _ = _forward_backward(mod, row, torch.float64)
    assert_close_list(flat, flat_eval, torch.float64)


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_dropout_training_differs_from_eval(mode):
    import fastcells

    cls, _, extra = MODES[mode]
    torch.manual_seed(0)
    mod = getattr(fastcells, cls.__name__)(I, 16, num_layers=2, dropout=0.5, **extra,
                                           dtype=torch.float64)
    x = torch.randn(6, 4, I, dtype=torch.float64)
    mod.eval()
    out_eval, _ = mod(x)
    mod.train()
    out_a, _ = mod(x)
    out_b, _ = mod(x)
    assert not torch.allclose(out_a, out_eval)
    assert not torch.allclose(out_a, out_b), "two training forwards drew the same dropout mask"
    # Layer 0 is never dropped: a one-layer model ignores dropout in training.
    one = getattr(fastcells, cls.__name__)(I, 16, num_layers=1, **extra, dtype=torch.float64)
    with pytest.warns(UserWarning):  # torch.nn warns that dropout needs num_layers > 1
        getattr(fastcells, cls.__name__)(I, 16, num_layers=1, dropout=0.5, **extra)
    one.train()
    out_train, _ = one(x)
    one.eval()
    torch.testing.assert_close(out_train, one(x)[0], rtol=0, atol=0)


def _mask_probe(p: float, packed: bool, bidirectional: bool):
    """A 2-layer RNN_RELU whose layer 1 passes its (dropped) input through:
    layer 0 has a large positive bias so its output h0 > 0, layer 1 has
    W_ih = identity, W_hh = 0, b = 0, so output = mask * h0 exactly and the mask
    the module drew can be read off as output / eval output."""
    import fastcells

    D = 2 if bidirectional else 1
    Hp = 16
    mod = fastcells.RNN(I, Hp, num_layers=2, nonlinearity="relu", dropout=p,
                        bidirectional=bidirectional, dtype=torch.float64)
    # Its own generator and a bias that bounds h0 away from 0 whatever the
    # input (|W_ih x| + |W_hh h| stays far below 10 here): output / eval output
    # must never be 0 / 0, whatever random numbers earlier tests consumed.
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for sfx in ([""] if D == 1 else ["", "_reverse"]):
            getattr(mod, f"weight_ih_l0{sfx}").uniform_(-0.3, 0.3, generator=g)
            getattr(mod, f"weight_hh_l0{sfx}").uniform_(-0.01, 0.01, generator=g)
            getattr(mod, f"bias_ih_l0{sfx}").fill_(10.0)
            getattr(mod, f"bias_hh_l0{sfx}").zero_()
            w = torch.zeros(Hp, D * Hp, dtype=torch.float64)
            d = 1 if sfx else 0
            w[:, d * Hp:(d + 1) * Hp] = torch.eye(Hp)
            getattr(mod, f"weight_ih_l1{sfx}").copy_(w)
            getattr(mod, f"weight_hh_l1{sfx}").zero_()
            getattr(mod, f"bias_ih_l1{sfx}").zero_()
            getattr(mod, f"bias_hh_l1{sfx}").zero_()
    return mod


@pytest.mark.parametrize("packed", [False, True])
def test_dropout_mask_statistics(packed):
    p, T, B = 0.3, 20, 8
    mod = _mask_probe(p, packed, bidirectional=True)
    torch.manual_seed(3)
    x = torch.randn(T, B, I, dtype=torch.float64)
    if packed:
        x = pack_padded_sequence(x, torch.tensor([T - (3 * b) % 7 for b in range(B)]),
                                 enforce_sorted=False)
    mod.eval()
    base = mod(x)[0]
    mod.train()
    out = mod(x)[0]
    base, out = (base.data, out.data) if packed else (base, out)
    assert (base > 0).all()
    mask = out / base
    keep = torch.isclose(mask, torch.full_like(mask, 1 / (1 - p)), rtol=1e-12, atol=0)
    drop = mask == 0
    assert (keep | drop).all(), "mask values must be 0 or 1/(1-p)"
    frac = drop.double().mean().item()
    n = mask.numel()
    assert abs(frac - p) < 6 * (p * (1 - p) / n) ** 0.5 + 1e-3, f"dropped fraction {frac} for p={p}"
    # Not one mask reused for every step or every sequence.
    rows = drop.reshape(-1, drop.shape[-1])
    assert not (rows == rows[0]).all()


@pytest.mark.parametrize("mode", MODE_NAMES)
@pytest.mark.parametrize("packed", [False, True])
def test_dropout_training_gradients_match_reference(mode, packed):
    """Read the mask the module draws (probe model, same shapes and seed), then
    compare a real model's training output and gradients with the reference
    using that mask. Assumes the mask depends only on its shape and the RNG
    state, which holds when it is drawn with torch's generator before the op."""
    import fastcells

    p, T, B, Hp = 0.4, 6, 3, 16
    probe = _mask_probe(p, packed, bidirectional=True).train()
    torch.manual_seed(11)
    x = torch.randn(T, B, I, dtype=torch.float64)
    lengths = torch.tensor([4, 6, 2])
    xin = pack_padded_sequence(x, lengths, enforce_sorted=False) if packed else x
    probe.eval()
    base = probe(xin)[0]
    assert ((base.data if packed else base) > 0).all()
    probe.train()
    torch.manual_seed(123)
    out = probe(xin)[0]
    mask = (out.data / base.data) if packed else (out / base)
    masks = mask.unsqueeze(0)  # (L-1, ...) with L = 2

    cls, _, extra = MODES[mode]
    kw = dict(num_layers=2, dropout=p, bidirectional=True, dtype=torch.float64, **extra)
    torch.manual_seed(1)
    mod = getattr(fastcells, cls.__name__)(I, Hp, **kw).train()
    leaf = x.clone().requires_grad_()
    xin = pack_padded_sequence(leaf, lengths, enforce_sorted=False) if packed else leaf
    torch.manual_seed(123)
    flat = flatten_result(mod(xin))
    weighted_loss(flat).backward()
    grads = grads_of([leaf] + list(mod.parameters()))

    leaf2 = x.clone().requires_grad_()
    xin2 = pack_padded_sequence(leaf2, lengths, enforce_sorted=False) if packed else leaf2
    expect = flatten_result(run_functional(rnn_reference, mod, xin2, dropout_masks=masks))
    weighted_loss(expect).backward()
    expect_grads = grads_of([leaf2] + list(mod.parameters()))
    assert_close_list(flat, expect, torch.float64)
    assert_close_list(grads, expect_grads, torch.float64)


# ----------------------------------------------------------------------------- larger sizes
# The small grid above runs single-threaded steps with one or two column
# panels. These cases cross into the OpenMP team (per-step work of at least
# 2^17 multiply-adds, hidden units split per gate across threads, packed
# steps on both sides of the threshold), hidden sizes that leave a partial
# panel in every gate segment (H = 40, 260), and K blocking of the packed
# products (input size 300 and recurrent size 260 both exceed the 256-row
# K block, in the input projection, the steps and the weight gradients),
# weight gradients only a few columns wide (narrow-weight-grads), and weight
# gradients whose transposed gate gradients are copied block by block first
# (rows of G*H >= 4 KiB, >= 256 output columns, over more than one K block
# and a partial row block: copied-grad-blocks).

LARGE = {
    "team-dense-bidir-2layer": dict(T=6, B=20, I=16, H=48, num_layers=2, bidirectional=True,
                                    kind="dense"),
    "team-packed-mixed": dict(T=7, B=20, I=16, H=48, num_layers=1, bidirectional=True,
                              kind="packed"),
    "threads-packed": dict(T=3, B=96, I=8, H=128, num_layers=1, bidirectional=True,
                           kind="packed"),
    "ragged-panels-packed": dict(T=4, B=40, I=20, H=40, num_layers=2, bidirectional=True,
                                 kind="packed"),
    "k-blocks": dict(T=3, B=4, I=300, H=260, num_layers=1, bidirectional=False, kind="dense"),
    # Weight gradients with at most 6 columns (input size 5, hidden 6) over more
    # than 256 rows: the narrow product, K blocks and a partial row block.
    "narrow-weight-grads": dict(T=50, B=9, I=5, H=6, num_layers=2, bidirectional=True,
                                kind="dense"),
    "copied-grad-blocks": dict(T=30, B=10, I=8, H=260, num_layers=1, bidirectional=False,
                               kind="dense"),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", list(LARGE))
@pytest.mark.parametrize("mode", MODE_NAMES)
def test_module_matches_torch_nn_larger_sizes(mode, case, dtype):
    c = LARGE[case]
    kw = dict(num_layers=c["num_layers"], bidirectional=c["bidirectional"])
    if mode == "LSTM" and case in ("team-dense-bidir-2layer", "k-blocks"):
        kw["proj_size"] = 24 if case == "team-dense-bidir-2layer" else 258
    ref = make_nn(mode, c["I"], c["H"], dtype=dtype, **kw)
    mod = make_fastcells_like(ref)
    results = []
    for m in (ref, mod):
        g = torch.Generator().manual_seed(1)
        leaf = torch.randn(c["T"], c["B"], c["I"], generator=g, dtype=torch.float64)
        leaf = leaf.to(dtype).requires_grad_()
        x = leaf
        if c["kind"] == "packed":
            lengths = torch.randint(1, c["T"] + 1, (c["B"],), generator=g)
            lengths[c["B"] // 2] = c["T"]
            x = pack_padded_sequence(leaf, lengths, enforce_sorted=False)
        hx = make_hx(m, c["B"], dtype)
        states = list(hx) if isinstance(hx, tuple) else [hx]
        flat = flatten_result(m(x, hx))
        weighted_loss(flat).backward()
        results.append((flat, grads_of([leaf] + states + list(m.parameters()))))
    (ref_flat, ref_grads), (flat, grads) = results
    override = {} if dtype == torch.float64 else {"atol": 1e-4, "rtol": 1e-4}
    assert_close_list(flat, ref_flat, dtype, ["output", "h_n", "c_n"], **override)
    assert_close_list(grads, ref_grads, dtype, **override)


# ----------------------------------------------------------------------------- autograd corners


@pytest.mark.parametrize("which", ["output", "h_n", "c_n", "frozen_weights", "input_no_grad"])
@pytest.mark.parametrize("mode", MODE_NAMES)
def test_partial_gradients(mode, which):
    """Losses that use only some of the outputs (undefined incoming gradients),
    and leaves of which only some require grad."""
    if which == "c_n" and mode != "LSTM":
        pytest.skip("only LSTM has c_n")
    row = dict(mode=mode, kind="packed", bidirectional=True, num_layers=2, batch_first=False,
               proj_size=2 if mode == "LSTM" else 0, bias=True, hx=True, shape="T5B3")
    ref = make_nn(mode, I, H, **_module_kwargs(row))
    results = []
    for m in (ref, make_fastcells_like(ref)):
        for p in m.parameters():
            p.requires_grad_(which != "frozen_weights")
        T, B = SHAPES[row["shape"]]
        leaf, x = make_input("packed", T, B, I, torch.float64)
        leaf.requires_grad_(which != "input_no_grad")
        hx = make_hx(m, B, torch.float64)
        states = list(hx) if isinstance(hx, tuple) else [hx]
        flat = flatten_result(m(x, hx))
        pick = {"output": flat[:1], "h_n": flat[1:2], "c_n": flat[2:3]}.get(which, flat)
        weighted_loss(pick).backward()
        results.append(grads_of([leaf] + states + list(m.parameters())))
    assert_close_list(results[1], results[0], torch.float64)


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_no_grad_and_inference_mode(mode):
    ref = make_nn(mode, I, H, num_layers=2, bidirectional=True)
    mod = make_fastcells_like(ref)
    x = torch.randn(5, 3, I, dtype=torch.float64)
    expect = flatten_result(ref(x))
    with torch.no_grad():
        got = flatten_result(mod(x))
    assert_close_list(got, expect, torch.float64)
    with torch.inference_mode():
        got = flatten_result(mod(x))
    assert_close_list(got, expect, torch.float64)
    assert all(not t.requires_grad for t in got)


@pytest.mark.parametrize("mode", MODE_NAMES)
@pytest.mark.parametrize("hidden,proj", [(5, 0), (40, 0), (40, 3), (64, 0)])
def test_inference_forward_has_the_training_forward_bits(mode, hidden, proj):
    """The inference loop (no saved activations; the LSTM writes only c and h)
    computes the same bits as the training forward."""
    if proj and mode != "LSTM":
        pytest.skip("proj_size is an LSTM option")
    torch.manual_seed(0)
    mod = make_fastcells_like(make_nn(mode, 7, hidden, num_layers=2, bidirectional=True,
                                      **({"proj_size": proj} if proj else {})).float())
    x = torch.randn(30, 9, 7)
    train = flatten_result(mod(x))
    with torch.inference_mode():
        infer = flatten_result(mod(x))
    for a, b in zip(train, infer):
        assert torch.equal(a.detach(), b)


STEP_CASES = ["LSTM", "LSTM-proj", "LSTM-packed", "GRU", "GRU-reset_before", "RNN_TANH",
              "LSTM-bfloat16", "GRU-float64", "LSTM-units", "GRU-units", "LSTM-zoneout"]


@pytest.mark.parametrize("case", STEP_CASES)
def test_inference_with_the_input_product_per_step(case):
    """Inference calls whose gates outgrow the L2 cache run the input product
    inside the time loop, step by step (csrc/ops.cpp, input_product_per_step;
    these sizes hold 4-11 MB of gates, over the threshold on any host): the
    bits of the training forward, which runs it as one product, on one thread
    and on two. "units": batch 8 with hidden 512, where two threads split the
    hidden units (each computes its own columns of the input product)."""
    import fastcells

    name, _, opt = case.partition("-")
    dtype = {"bfloat16": torch.bfloat16, "float64": torch.float64}.get(opt, torch.float32)
    kw = {"num_layers": 2, "bidirectional": True}
    if opt == "proj":
        kw["proj_size"] = 24
    if opt == "reset_before":
        kw["reset_after"] = False
    if opt == "zoneout":
        kw["zoneout"] = 0.3
    H = 256 if name.startswith("RNN") else 64
    T, B = 160, 64
    if opt == "units":
        H, T, B, kw = 512, 96, 8, {}
    torch.manual_seed(0)
    cls = fastcells.RNN if name.startswith("RNN") else getattr(fastcells, name)
    mod = cls(7, H, **kw).to(dtype)
    if opt == "zoneout":
        mod.eval()  # (the expectation: the same weights in both calls)
    x = torch.randn(T, B, 7, dtype=dtype)
    inp = x
    if opt == "packed":
        lengths = torch.randint(100, T + 1, (B,))
        lengths[0] = T
        inp = pack_padded_sequence(x, lengths, enforce_sorted=False)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            train = flatten_result(mod(inp))
            with torch.inference_mode():
                infer = flatten_result(mod(inp))
            for a, b in zip(train, infer):
                assert torch.equal(a.detach(), b)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_backward_twice_with_retain_graph(mode):
    ref = make_nn(mode, I, H, num_layers=2)
    mod = make_fastcells_like(ref)
    x = torch.randn(5, 3, I, dtype=torch.float64, requires_grad=True)
    out, _ = mod(x)
    out.sum().backward(retain_graph=True)
    first = x.grad.clone()
    out.sum().backward()
    torch.testing.assert_close(x.grad, 2 * first, atol=1e-12, rtol=1e-12)
