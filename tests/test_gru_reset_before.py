"""The reset-before GRU: fastcells.GRU / GRUCell(reset_after=False).

torch.nn has no such module, so the fused op is checked against the
pure-PyTorch reference (fastcells.reference.gru_reset_before_cell, written from
the equations) in float64 over the module options, with gradcheck, on every
CPU ISA path and both thread splits, and against ONNX Runtime's GRU with
linear_before_reset=0.
"""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from conftest import HAVE_FASTCELLS, TOL, assert_close_list, pairwise, row_id

pytestmark = pytest.mark.skipif(not HAVE_FASTCELLS, reason="fastcells extension not built")

import fastcells  # noqa: E402
from fastcells import reference  # noqa: E402

MODE = fastcells.MODES["GRU_RESET_BEFORE"]


class ReferenceGRU(nn.Module):
    """The reset-before GRU written with the reference's per-step loop over the
    fastcells module's own parameters (same arguments and returns)."""

    def __init__(self, m: nn.Module):
        super().__init__()
        self.m = m

    def forward(self, input, hx=None):
        m = self.m
        packed = isinstance(input, nn.utils.rnn.PackedSequence)
        if packed:
            x, batch_sizes = input.data, input.batch_sizes
            B = int(batch_sizes[0])
        else:
            batched = input.dim() == 3
            x = input if batched else input.unsqueeze(1)
            x = x.transpose(0, 1) if m.batch_first and batched else x
            batch_sizes, B = None, x.shape[1]
        D = 2 if m.bidirectional else 1
        if hx is None:
            h0 = x.new_zeros(m.num_layers * D, B, m.hidden_size)
        else:
            h0 = hx if packed or input.dim() == 3 else hx.unsqueeze(1)
            if packed and input.sorted_indices is not None:
                h0 = h0.index_select(1, input.sorted_indices)
        out, hy, _ = reference.rnn_reference(x, m._flat_weights, h0, None, batch_sizes, MODE,
                                             m.num_layers, m.bidirectional, m.bias, 0)
        if packed:
            if input.unsorted_indices is not None:
                hy = hy.index_select(1, input.unsorted_indices)
            return nn.utils.rnn.PackedSequence(out, input.batch_sizes, input.sorted_indices,
                                               input.unsorted_indices), hy
        if not (input.dim() == 3):
            return out.squeeze(1), hy.squeeze(1)
        return (out.transpose(0, 1) if m.batch_first else out), hy


GRID = pairwise({"num_layers": [1, 2], "bidirectional": [False, True],
                 "batch_first": [False, True], "bias": [True, False], "hx": [False, True],
                 "input": ["dense", "packed", "unbatched"], "shape": ["T5B3", "T1B3", "T4B1"]},
                seed=7, base=("bidirectional", "input"))


def _run(m, row, seed=1, source=None):
    """Outputs, final state and every gradient (input, hx, parameters). With
    `source`, the random values are rounded to that dtype first (so that a
    float64 run sees a low-precision run's values)."""
    T, B = {"T5B3": (5, 3), "T1B3": (1, 3), "T4B1": (4, 1)}[row["shape"]]
    g = torch.Generator().manual_seed(seed)
    D = 2 if row["bidirectional"] else 1
    dtype = next(m.parameters()).dtype

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(source or dtype).to(dtype)

    x = rnd(T, B, 3)
    h = rnd(row["num_layers"] * D, B, 5)
    if row["input"] == "unbatched":
        x, h = x[:, 0], h[:, 0]
    if row["batch_first"] and row["input"] != "unbatched":
        x = x.transpose(0, 1).contiguous()
    x.requires_grad_()
    h.requires_grad_()
    hx = h if row["hx"] else None
    if row["input"] == "packed":
        lengths = torch.tensor([T, max(1, T - 1), max(1, T - 2)][:B])
        inp = pack_padded_sequence(x, lengths, batch_first=row["batch_first"],
                                   enforce_sorted=False)
        out, hy = m(inp, hx)
        out = pad_packed_sequence(out, batch_first=row["batch_first"])[0]
    else:
        out, hy = m(x, hx)
    loss = (out * rnd(*out.shape)).sum() + hy.pow(2).sum()
    leaves = [x] + ([h] if row["hx"] else []) + list(m.parameters())
    return [out, hy] + list(torch.autograd.grad(loss, leaves))


def _module(row, dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    return fastcells.GRU(3, 5, num_layers=row["num_layers"], bias=row["bias"],
                         batch_first=row["batch_first"], bidirectional=row["bidirectional"],
                         reset_after=False, dtype=dtype, **kw)


@pytest.mark.parametrize("row", GRID, ids=row_id)
def test_matches_the_reference(row, cpu_isa):
    """Outputs, final states and every gradient against the reference loop, in
    float64 (1e-10), on every CPU ISA path the host runs."""
    m = _module(row)
    assert_close_list(_run(m, row), _run(ReferenceGRU(m), row), torch.float64)


def test_differs_from_torch_nn_gru():
    """Same parameters, another cell: reset_after=False is not torch.nn's GRU."""
    torch.manual_seed(0)
    ref = nn.GRU(3, 5).double()
    m = fastcells.GRU(3, 5, reset_after=False).double()
    m.load_state_dict(ref.state_dict())
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    assert (m(x)[0] - ref(x)[0]).abs().max() > 1e-3


@pytest.mark.parametrize("B,H", [(40, 64), (70, 33), (1, 130)])
def test_thread_splits_and_thread_counts(B, H):
    """Large enough for a thread team: units split with barriers (B=40, B=1)
    and batch rows split (B=70); the results are the reference's, and the
    same bits for one and two threads."""
    torch.manual_seed(0)
    m = fastcells.GRU(8, H, num_layers=2, reset_after=False).double()
    # T=24: every case has the 1 Mi multiply-adds per call a team needs.
    x = torch.randn(24, B, 8, dtype=torch.float64, requires_grad=True)
    results = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out, hy = m(x)
            grads = torch.autograd.grad(out.sum() + hy.pow(2).sum(), [x] + list(m.parameters()))
            results.append([out, hy, *grads])
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(*results):
        assert torch.equal(a, b)
    expected_out, expected_hy = ReferenceGRU(m)(x)
    torch.testing.assert_close(results[0][0], expected_out, **TOL[torch.float64])
    torch.testing.assert_close(results[0][1], expected_hy, **TOL[torch.float64])


def test_gradcheck():
    """Hand-derived backward against finite differences (float64), through the
    op: input, initial state and every weight of a bidirectional 2-layer stack."""
    torch.manual_seed(0)
    m = fastcells.GRU(2, 3, num_layers=2, bidirectional=True, reset_after=False).double()
    x = torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True)
    h = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    ws = [w.detach().clone().requires_grad_() for w in m._flat_weights]

    def f(x, h, *ws):
        out, hy, _ = fastcells.functional.rnn(x, list(ws), h, None, None, MODE, 2, True, True, 0)
        return out, hy

    assert torch.autograd.gradcheck(f, (x, h, *ws))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_low_precision_close_to_float64(dtype, cpu_isa):
    """float32 and bfloat16 (on every CPU ISA path) against the float64 run of
    the same values."""
    row = {"num_layers": 2, "bidirectional": True, "batch_first": False, "bias": True,
           "hx": True, "input": "dense", "shape": "T5B3"}
    m = _module(row, dtype=dtype)
    exact = _module(row).double()
    exact.load_state_dict({k: v.double() for k, v in m.state_dict().items()})
    got = _run(m, row)
    expected = _run(exact, row, source=dtype)
    tol = {torch.float32: 1e-4, torch.bfloat16: 6e-2}[dtype]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.double(), e, atol=tol, rtol=tol)


def test_cell_matches_the_reference_cell():
    torch.manual_seed(0)
    cell = fastcells.GRUCell(3, 5, reset_after=False).double()
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    h = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    results = []
    for f in (lambda: cell(x, h),
              lambda: reference.gru_reset_before_cell(x, h, cell.weight_ih, cell.weight_hh,
                                                      cell.bias_ih, cell.bias_hh)):
        y = f()
        results.append([y, *torch.autograd.grad(y.pow(2).sum(), [x, h, *cell.parameters()])])
    assert_close_list(results[0], results[1], torch.float64)
    assert "reset_after=False" in repr(cell)


def test_module_api():
    """torch.nn.GRU's parameters (load_state_dict both ways), the repr, pickle
    and deepcopy keep reset_after, a bad reset_after is refused."""
    torch.manual_seed(0)
    nn_gru = nn.GRU(3, 5, num_layers=2)
    m = fastcells.GRU(3, 5, num_layers=2, reset_after=False)
    assert [n for n, _ in m.named_parameters()] == [n for n, _ in nn_gru.named_parameters()]
    m.load_state_dict(nn_gru.state_dict())
    nn_gru.load_state_dict(m.state_dict())
    assert "reset_after=False" in repr(m) and "reset_after" not in repr(fastcells.GRU(3, 5))
    x = torch.randn(4, 2, 3)
    for clone in (pickle.loads(pickle.dumps(m)), copy.deepcopy(m)):
        assert clone.reset_after is False
        torch.testing.assert_close(clone(x)[0], m(x)[0], atol=0, rtol=0)
    with pytest.raises(TypeError, match="reset_after"):
        fastcells.GRU(3, 5, reset_after="no")


def test_revert_leaves_it_with_a_warning():
    """torch.nn has no reset-before GRU: revert() keeps it (warning) inside a
    model and refuses it alone; a reset-after GRU beside it is reverted."""
    model = nn.Sequential(fastcells.GRU(3, 5, reset_after=False), fastcells.GRU(5, 5))
    with pytest.warns(UserWarning, match="reset_after=False"):
        fastcells.revert(model)
    assert type(model[0]) is fastcells.GRU and type(model[1]) is nn.GRU
    with pytest.raises(ValueError, match="reset_after=False"):
        fastcells.revert(fastcells.GRU(3, 5, reset_after=False))


def test_compile_fullgraph_training_step():
    torch.manual_seed(0)
    m = fastcells.GRU(3, 5, num_layers=2, reset_after=False, batch_first=True)
    x = torch.randn(2, 4, 3)

    def step(x):
        out, h = m(x)
        return out.pow(2).sum() + h.sum()

    eager = torch.autograd.grad(step(x), list(m.parameters()))
    compiled = torch.autograd.grad(torch.compile(step, fullgraph=True, backend="aot_eager")(x),
                                   list(m.parameters()))
    assert_close_list(compiled, eager, torch.float32)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_onnx_export_runs_linear_before_reset_0(exporter, tmp_path):
    """ONNX's GRU with linear_before_reset=0 is this cell: ONNX Runtime gives
    eager's results."""
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    if exporter == "dynamo":
        pytest.importorskip("onnxscript")
    import warnings

    torch.manual_seed(0)
    m = fastcells.GRU(3, 5, num_layers=2, bidirectional=True, reset_after=False).eval()
    x, h = torch.randn(4, 2, 3), torch.randn(4, 2, 5)
    path = tmp_path / "gru.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (x, h), str(path), dynamo=exporter == "dynamo",
                          input_names=["x", "h"])
    proto = onnx.load(str(path))
    nodes = [n for n in proto.graph.node if n.op_type == "GRU"]
    assert len(nodes) == 2
    for node in nodes:
        a = {t.name: onnx.helper.get_attribute_value(t) for t in node.attribute}
        assert a["linear_before_reset"] == 0
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": x.numpy(), "h": h.numpy()})
    with torch.no_grad():
        expected = m(x, h)
    for g, e in zip(got, expected):
        torch.testing.assert_close(torch.from_numpy(g), e, **TOL[torch.float32])
