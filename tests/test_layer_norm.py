"""The LayerNorm cells (fastcells.LayerNormLSTM / LayerNormGRU; table rows LSTM_LN,
GRU_LN): the fused op against the pure-PyTorch reference in float64 (values and
the gradients of every input, state and parameter, the layer-norm ones included)
over layers, directions, packed input, biases and the state options, gradcheck,
every CPU ISA path, bit-identical results across thread counts, the modules'
parameters and torch.nn-like behaviour, and the clear errors for what these
cells do not support."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

from conftest import (HAVE_FASTCELLS, TOL, assert_close_list, assert_op_matches_reference,
                      random_batch_sizes, with_layer_norm)

pytestmark = pytest.mark.skipif(not HAVE_FASTCELLS, reason="fastcells extension not built")

if HAVE_FASTCELLS:
    import fastcells
    from fastcells import _ops, reference
    from fastcells._cells import cell_named

LN_CELLS = ["LSTM_LN", "GRU_LN"]
MODULES = {"LSTM_LN": "LayerNormLSTM", "GRU_LN": "LayerNormGRU"}


def _case(name, layers=1, D=1, packed=False, bias=True, T=6, B=4, I=3, H=5, seed=0):
    """Float64 leaves for _ops.rnn: (x, weights, h0, c0 or None, positional args, rows)."""
    c = cell_named(name)
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.5):
        return torch.randn(*shape, generator=g, dtype=torch.double) * scale

    ws = []
    for layer in range(layers):
        for _ in range(D):
            ws += [rnd(c.gates * H, I if layer == 0 else D * H), rnd(c.gates * H, H)]
            if bias:
                ws += [rnd(c.gates * H, scale=0.2), rnd(c.gates * H, scale=0.2)]
    ws = with_layer_norm(c, ws, H, g, per=4 if bias else 2)
    ws = [w.requires_grad_() for w in ws]
    batch_sizes = random_batch_sizes(T, B, g) if packed else None
    rows = (sum(batch_sizes),) if packed else (T, B)
    x = rnd(*rows, I, scale=1.0).requires_grad_()
    h0 = rnd(layers * D, B, H, scale=1.0).requires_grad_()
    c0 = rnd(layers * D, B, H, scale=1.0).requires_grad_() if c.has_cell_state else None
    args = (batch_sizes, c.code, layers, D == 2, bias, 0, None)
    return x, ws, h0, c0, args, rows


GRID = [(name, layers, D, packed, bias)
        for name in LN_CELLS
        for layers, D, packed, bias in [(1, 1, False, True), (2, 2, False, True),
                                        (2, 1, True, True), (1, 2, True, False),
                                        (2, 2, True, False)]]


@pytest.mark.parametrize("name,layers,D,packed,bias", GRID,
                         ids=[f"{n}-L{a}-D{b}-{'packed' if p else 'dense'}-bias{int(c)}"
                              for n, a, b, p, c in GRID])
def test_values_and_gradients_match_reference(name, layers, D, packed, bias):
    x, ws, h0, c0, args, _ = _case(name, layers, D, packed, bias)
    assert_op_matches_reference(x, ws, h0, c0, args)


@pytest.mark.parametrize("name", LN_CELLS)
def test_wide_hidden_and_many_rows(name):
    """Hidden 40 (vector loops with tails), 70 rows (split among threads)."""
    x, ws, h0, c0, args, _ = _case(name, 2, 1, False, True, T=5, B=70, H=40)
    assert_op_matches_reference(x, ws, h0, c0, args)


@pytest.mark.parametrize("name", LN_CELLS)
def test_every_cpu_isa_path(name, cpu_isa):
    x, ws, h0, c0, args, _ = _case(name, 2, 2, True, True, B=5, H=20)
    assert_op_matches_reference(x, ws, h0, c0, args)


@pytest.mark.parametrize("name", LN_CELLS)
def test_gradcheck(name):
    x, ws, h0, c0, args, _ = _case(name, 2, 2, True, True, T=3, B=2, I=2, H=3)
    n = len(ws)

    def f(x, h0, *rest):
        c = rest[0] if c0 is not None else None
        return tuple(t for t in _ops.rnn(x, list(rest[-n:]), h0, c, *args) if t is not None)

    leaves = (x, h0) + ((c0,) if c0 is not None else ()) + tuple(ws)
    assert torch.autograd.gradcheck(f, leaves, atol=1e-8, rtol=1e-6)


def test_reference_layer_norm_is_torch_layer_norm():
    """The reference's LN is torch.nn.functional.layer_norm (biased variance, eps
    1e-5), with and without the shift."""
    g = torch.Generator().manual_seed(0)
    v = torch.randn(7, 12, generator=g, dtype=torch.double) * 3 + 1
    w = torch.randn(12, generator=g, dtype=torch.double)
    b = torch.randn(12, generator=g, dtype=torch.double)
    torch.testing.assert_close(reference.layer_norm(v, w, b), F.layer_norm(v, (12,), w, b))
    torch.testing.assert_close(reference.layer_norm(v, w), F.layer_norm(v, (12,), w))


@pytest.mark.parametrize("name", LN_CELLS)
def test_bit_identical_across_thread_counts(name):
    """Rows split among two threads give the bits of one thread, forward and
    backward (the row statistics never depend on the split)."""
    x, ws, h0, c0, args, _ = _case(name, 2, 2, False, True, T=7, B=64, H=16)
    xf, h0f = x.detach().float().requires_grad_(), h0.detach().float().requires_grad_()
    c0f = c0.detach().float().requires_grad_() if c0 is not None else None
    wf = [w.detach().float().requires_grad_() for w in ws]
    leaves = [xf, h0f] + ([c0f] if c0f is not None else []) + wf

    def run():
        res = [t for t in _ops.rnn(xf, wf, h0f, c0f, *args) if t is not None]
        grads = torch.autograd.grad([r.square().sum() for r in res], leaves)
        return [r.detach() for r in res] + list(grads)

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(2)
        two = run()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", LN_CELLS)
def test_recurrent_dropout_matches_reference(name):
    x, ws, h0, c0, args, _ = _case(name, 2, 2, True, True)
    g = torch.Generator().manual_seed(5)
    masks = (torch.rand(len(h0), h0.shape[1], h0.shape[2], generator=g) > 0.3).double() / 0.7
    assert_op_matches_reference(x, ws, h0, c0, args, recurrent_masks=masks)


def test_gru_zoneout_matches_reference():
    x, ws, h0, c0, args, rows = _case("GRU_LN", 2, 1, True, True)
    g = torch.Generator().manual_seed(6)
    z = (torch.rand(len(h0), *rows, h0.shape[2], generator=g) < 0.3).double()
    assert_op_matches_reference(x, ws, h0, c0, args, zoneout=z)


def test_lstm_cell_states_match_reference():
    x, ws, h0, c0, args, _ = _case("LSTM_LN", 2, 2, False, True)
    assert_op_matches_reference(x, ws, h0, c0, args, return_cell_states=True)


def test_lstm_zoneout_is_refused():
    x, ws, h0, c0, args, rows = _case("LSTM_LN", 1, 1, False, True)
    z = torch.zeros(1, *rows, 2 * h0.shape[2], dtype=torch.double)
    with pytest.raises(RuntimeError, match=r"zoneout is not supported for mode 5 \(LSTM_LN\)"):
        _ops.rnn(x, ws, h0, c0, *args, zoneout=z)
    with pytest.raises(ValueError, match="LayerNormLSTM: zoneout is not supported"):
        fastcells.LayerNormLSTM(3, 5, zoneout=0.1)


@pytest.mark.parametrize("name", LN_CELLS)
def test_bad_layer_norm_weights_name_the_argument(name):
    x, ws, h0, c0, args, _ = _case(name, 1, 1, False, True)
    bad = list(ws)
    bad[4] = bad[4][:-1]
    with pytest.raises(RuntimeError, match=r"`weights\[4\] \(ln_ih_weight_l0\)` of shape"):
        _ops.rnn(x, bad, h0, c0, *args)
    with pytest.raises(RuntimeError, match=r"layer-norm parameters=\d"):
        _ops.rnn(x, ws[:4], h0, c0, *args)


# ---------------------------------------------------------------- modules

@pytest.mark.parametrize("name", LN_CELLS)
def test_module_parameters(name):
    c = cell_named(name)
    m = getattr(fastcells, MODULES[name])(3, 5, num_layers=2, bidirectional=True)
    H, G = 5, c.gates
    ln = {n: p for n, p in m.named_parameters() if n.startswith("ln_")}
    want = {}
    for suffix in ("_l0", "_l0_reverse", "_l1", "_l1_reverse"):
        want["ln_ih_weight" + suffix] = G * H
        want["ln_hh_weight" + suffix] = G * H
        if c.has_cell_state:
            want["ln_cell_weight" + suffix] = H
            want["ln_cell_bias" + suffix] = H
    assert {n: p.numel() for n, p in ln.items()} == want
    for n, p in ln.items():
        assert torch.equal(p, torch.zeros_like(p) if "bias" in n else torch.ones_like(p)), n
    # torch.nn's parameters, shapes and names are all there too.
    ref = getattr(torch.nn, c.nn_class)(3, 5, num_layers=2, bidirectional=True)
    assert {n: p.shape for n, p in m.named_parameters() if not n.startswith("ln_")} == \
        {n: p.shape for n, p in ref.named_parameters()}
    # The op's order: each layer and direction's own weights, then its LN ones.
    assert m._flat_weights_names[4:4 + c.norms] == [n for n in want if n.endswith("_l0")]
    m.reset_parameters()
    assert all(torch.equal(p, torch.ones_like(p)) for n, p in ln.items() if "weight" in n)


def _module_and_reference(name, batch_first=True, **kw):
    torch.manual_seed(0)
    m = getattr(fastcells, MODULES[name])(3, 5, num_layers=2, bidirectional=True,
                                          batch_first=batch_first, **kw).double()
    with torch.no_grad():  # gains away from 1 so that they matter
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("name", LN_CELLS)
def test_module_forward_matches_reference(name):
    c = cell_named(name)
    m = _module_and_reference(name)
    x = torch.randn(4, 7, 3, dtype=torch.double)
    h0 = torch.randn(4, 4, 5, dtype=torch.double)
    hx = (h0, torch.randn(4, 4, 5, dtype=torch.double)) if c.has_cell_state else h0
    out, state = m(x, hx)
    want = reference.rnn_reference(x.transpose(0, 1), m._flat_weights, h0,
                                   hx[1] if c.has_cell_state else None, None, c.code, 2, True,
                                   True, 0)
    got = [out.transpose(0, 1)] + (list(state) if c.has_cell_state else [state])
    assert_close_list(got, [t for t in want if t is not None], torch.float64)


@pytest.mark.parametrize("name", LN_CELLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lower_precision_close_to_float64(name, dtype):
    m = _module_and_reference(name)
    x = torch.randn(4, 9, 3, dtype=torch.double)
    want = m(x)[0]
    got = copy.deepcopy(m).to(dtype)(x.to(dtype))[0]
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, **TOL[dtype])


@pytest.mark.parametrize("name", LN_CELLS)
def test_module_serialises(name):
    m = _module_and_reference(name)
    x = torch.randn(2, 5, 3, dtype=torch.double)
    out = m(x)[0]
    assert torch.equal(pickle.loads(pickle.dumps(m))(x)[0], out)
    fresh = getattr(fastcells, MODULES[name])(3, 5, num_layers=2, bidirectional=True,
                                              batch_first=True).double()
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(fresh(x)[0], out)


def test_module_options():
    m = fastcells.LayerNormLSTM(3, 5, return_cell_states=True).double()
    x = torch.randn(6, 2, 3, dtype=torch.double)
    out, (h, c), cs = m(x)
    assert cs.shape == (6, 2, 5) and torch.equal(cs[-1], c[0])
    g = fastcells.LayerNormGRU(3, 5, zoneout=0.2, recurrent_dropout=0.3)
    assert "zoneout=0.2" in repr(g) and "recurrent_dropout=0.3" in repr(g)
    g.eval()
    assert g(x.float())[0].shape == (6, 2, 5)


def test_module_refusals():
    with pytest.raises(ValueError, match="proj_size"):
        fastcells.LayerNormLSTM(3, 5, proj_size=2)
    with pytest.raises(ValueError, match="proj_size"):
        fastcells.LayerNormGRU(3, 5, proj_size=2)
    m = fastcells.LayerNormGRU(3, 5)
    with pytest.raises(ValueError, match="normalises inside the recurrence"):
        fastcells.revert(m)
    with pytest.raises(ValueError, match="expected a fastcells LSTM, GRU or RNN"):
        fastcells.to_keras(m)


@pytest.mark.parametrize("name", LN_CELLS)
def test_onnx_export_is_refused(name, tmp_path):
    pytest.importorskip("onnx")
    m = getattr(fastcells, MODULES[name])(3, 5).eval()
    with pytest.raises(fastcells.onnx.FastcellsOnnxError, match="no layer normalisation"):
        fastcells.onnx.export(m, (torch.randn(4, 2, 3),), str(tmp_path / "m.onnx"))


@pytest.mark.parametrize("name", LN_CELLS)
def test_compile_fullgraph(name):
    m = _module_and_reference(name).float()
    x = torch.randn(3, 6, 3)
    want = m(x)[0]
    got = torch.compile(m, backend="aot_eager", fullgraph=True)(x)[0]
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name", LN_CELLS)
def test_second_derivatives_run_the_reference(name):
    """create_graph=True (a gradient penalty) goes through the reference, as for
    every cell (fastcells/_transforms.py): the penalty's gradients equal the
    reference's own double backward."""
    import warnings

    c = cell_named(name)
    m = _module_and_reference(name, batch_first=False)
    x = torch.randn(4, 2, 3, dtype=torch.double, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the reference path warns once per process)
        g, = torch.autograd.grad(m(x)[0].square().sum(), x, create_graph=True)
    g.square().sum().backward()
    x2 = x.detach().requires_grad_()
    ws = [w.detach().requires_grad_() for w in m._flat_weights]
    h0 = torch.zeros(4, 2, 5, dtype=torch.double)
    out = reference.rnn_reference(x2, ws, h0, h0 if c.has_cell_state else None, None, c.code, 2,
                                  True, True, 0)[0]
    g2, = torch.autograd.grad(out.square().sum(), x2, create_graph=True)
    g2.square().sum().backward()
    assert_close_list([g] + [w.grad for w in m._flat_weights],
                      [g2] + [w.grad for w in ws], torch.float64)
