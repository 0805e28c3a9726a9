"""ONNX export: torch.onnx.export of fastcells models, with both of torch's
exporters, gives the standard ONNX LSTM / GRU / RNN operators and runs in ONNX
Runtime with eager's results (float32 tolerance).

``import fastcells`` is all the models here get: the translations register
themselves (fastcells/onnx.py). The grid is pairwise over the dense options
(cell, layers, directions, batch_first, bias, initial state); each row is
exported by both exporters.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from conftest import MODE_NAMES, MODES, TOL, has_cell_state, pairwise, row_id

fastcells = pytest.importorskip("fastcells")
if not hasattr(fastcells, "LSTM"):
    pytest.skip("fastcells extension not built", allow_module_level=True)
ort = pytest.importorskip(
    "onnxruntime", reason="onnxruntime is not installed: the ONNX export tests run the exported "
    "models in it (pip install -c constraints.txt onnx onnxruntime onnxscript)")
onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install -c "
                           "constraints.txt onnx onnxruntime onnxscript)")

from fastcells.onnx import FastcellsOnnxError  # noqa: E402

HAVE_ONNXSCRIPT = importlib.util.find_spec("onnxscript") is not None
EXPORTERS = [
    pytest.param("dynamo", marks=pytest.mark.skipif(
        not HAVE_ONNXSCRIPT, reason="onnxscript is not installed: the dynamo exporter needs it")),
    "torchscript",
]
ONNX_OP = {"LSTM": "LSTM", "GRU": "GRU", "RNN_TANH": "RNN", "RNN_RELU": "RNN"}


class Flat(nn.Module):
    """The recurrent module with its state as separate inputs and outputs, so
    that h0/c0 become graph inputs and hy/cy graph outputs."""

    def __init__(self, rnn: nn.Module) -> None:
        super().__init__()
        self.rnn = rnn

    def forward(self, x, *state):
        hx = None
        if state:
            hx = tuple(state) if len(state) == 2 else state[0]
        out, h = self.rnn(x, hx)
        return (out, *h) if isinstance(h, tuple) else (out, h)


def make_module(mode: str, layers: int, bidirectional: bool, batch_first: bool, bias: bool,
                input_size: int = 3, hidden: int = 5, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cls, _, extra = MODES[mode]
    return getattr(fastcells, cls.__name__)(input_size, hidden, layers, bias=bias,
                                            batch_first=batch_first,
                                            bidirectional=bidirectional, **extra).eval()


def make_inputs(module, T: int, B: int, with_hx: bool, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    shape = (B, T, module.input_size) if module.batch_first else (T, B, module.input_size)
    x = torch.randn(*shape, generator=g)
    if not with_hx:
        return (x,)
    D = 2 if module.bidirectional else 1
    n = 2 if isinstance(module, fastcells.LSTM) else 1
    return (x, *(torch.randn(module.num_layers * D, B, module.hidden_size, generator=g)
                 for _ in range(n)))


def export(model: nn.Module, args, exporter: str, path, **kwargs) -> onnx.ModelProto:
    names = [f"in{k}" for k in range(len(args))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript exporter's deprecation and tracer warnings
        if exporter == "dynamo":
            torch.onnx.export(model, args, str(path), dynamo=True, input_names=names,
                              verbose=False, **kwargs)
        else:
            torch.onnx.export(model, args, str(path), dynamo=False, input_names=names, **kwargs)
    return onnx.load(str(path))


def run_ort(path, args):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feeds = {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)}
    assert len(feeds) == len(args), "every argument must be a graph input"
    return sess.run(None, feeds)


def assert_matches_eager(model, args, path):
    with torch.no_grad():
        expected = model(*args)
    if isinstance(expected, torch.Tensor):
        expected = (expected,)
    got = run_ort(path, args)
    assert len(got) == len(expected)
    for k, (g, e) in enumerate(zip(got, expected)):
        torch.testing.assert_close(torch.from_numpy(g), e, **TOL[torch.float32],
                                   msg=lambda m, k=k: f"output {k}: {m}")


def rnn_nodes(model: onnx.ModelProto, op: str):
    return [n for n in model.graph.node if n.op_type == op]


def assert_standard_ops(model: onnx.ModelProto):
    """Only ONNX's own operators: no fastcells or torchlib domains, no functions."""
    assert not model.functions, [f.name for f in model.functions]
    domains = {n.domain for n in model.graph.node}
    assert domains <= {"", "ai.onnx"}, domains


def attrs(node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


GRID = pairwise({"mode": MODE_NAMES, "num_layers": [1, 2, 3], "bidirectional": [False, True],
                 "batch_first": [False, True], "bias": [True, False], "hx": [False, True]},
                seed=3, base=("mode", "bidirectional"))


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("row", GRID, ids=row_id)
def test_export_matches_eager(row, exporter, tmp_path):
    rnn = make_module(row["mode"], row["num_layers"], row["bidirectional"],
                      row["batch_first"], row["bias"])
    model = Flat(rnn).eval()
    args = make_inputs(rnn, T=4, B=3, with_hx=row["hx"])
    path = tmp_path / "model.onnx"
    proto = export(model, args, exporter, path)
    assert_standard_ops(proto)
    nodes = rnn_nodes(proto, ONNX_OP[row["mode"]])
    assert len(nodes) == row["num_layers"], "one ONNX node per layer"
    for node in nodes:
        a = attrs(node)
        assert a["hidden_size"] == rnn.hidden_size
        assert a.get("direction", b"forward") == (b"bidirectional" if row["bidirectional"]
                                                  else b"forward")
        if row["mode"] == "GRU":
            assert a["linear_before_reset"] == 1
        if row["mode"] == "RNN_RELU":
            assert set(a["activations"]) == {b"Relu"}
        assert (len(node.input) > 3 and node.input[3] != "") == row["bias"], "B: the biases"
    graph_inputs = [i.name for i in proto.graph.input]
    assert len(graph_inputs) == len(args), graph_inputs
    assert len(proto.graph.output) == (3 if has_cell_state(row["mode"]) else 2)
    assert_matches_eager(model, args, path)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_dynamic_batch_and_time(exporter, tmp_path):
    """One export serves other batch sizes and sequence lengths."""
    rnn = make_module("LSTM", 2, True, True, True)
    model = Flat(rnn).eval()
    args = make_inputs(rnn, T=4, B=3, with_hx=True)
    path = tmp_path / "model.onnx"
    if exporter == "dynamo":
        batch, time = torch.export.Dim("batch"), torch.export.Dim("time")
        # Flat.forward(x, *state): the state is one tuple argument to torch.export
        kw = {"dynamic_shapes": ({0: batch, 1: time}, ({1: batch}, {1: batch}))}
    else:
        kw = {"dynamic_axes": {"in0": {0: "batch", 1: "time"}, "in1": {1: "batch"},
                               "in2": {1: "batch"}}}
    export(model, args, exporter, path, **kw)
    for T, B in ((7, 2), (1, 5)):
        assert_matches_eager(model, make_inputs(rnn, T=T, B=B, with_hx=True, seed=T), path)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_unbatched_input(exporter, tmp_path):
    rnn = make_module("GRU", 2, True, False, True)
    model = Flat(rnn).eval()
    args = (torch.randn(4, 3), torch.randn(4, 5))
    path = tmp_path / "model.onnx"
    export(model, args, exporter, path)
    assert_matches_eager(model, args, path)


class CellModel(nn.Module):
    def __init__(self, cell: nn.Module) -> None:
        super().__init__()
        self.cell = cell

    def forward(self, x, *state):
        out = self.cell(x, tuple(state) if len(state) == 2 else state[0])
        return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell", "RNNCell"])
def test_cells(kind, exporter, tmp_path):
    torch.manual_seed(0)
    cell = getattr(fastcells, kind)(3, 5)
    model = CellModel(cell).eval()
    n = 2 if kind == "LSTMCell" else 1
    args = (torch.randn(2, 3), *(torch.randn(2, 5) for _ in range(n)))
    path = tmp_path / "model.onnx"
    proto = export(model, args, exporter, path)
    assert_standard_ops(proto)
    assert len(rnn_nodes(proto, kind[:-len("Cell")])) == 1
    assert_matches_eager(model, args, path)


def test_model_with_head_and_explicit_table(tmp_path):
    """A forecaster (recurrent stack + Linear head) through fastcells.onnx.export
    and through an explicit custom_translation_table."""
    if not HAVE_ONNXSCRIPT:
        pytest.skip("onnxscript is not installed: the dynamo exporter needs it")

    class Forecaster(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = fastcells.LSTM(3, 6, 2, batch_first=True)
            self.head = nn.Linear(6, 1)

        def forward(self, x):
            return self.head(self.rnn(x)[0])

    torch.manual_seed(0)
    model = Forecaster().eval()
    args = (torch.randn(2, 5, 3),)
    for how in ("helper", "table"):
        path = tmp_path / f"{how}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if how == "helper":
                fastcells.onnx.export(model, args, str(path), verbose=False)
            else:
                torch.onnx.export(model, args, str(path), verbose=False,
                                  custom_translation_table=fastcells.onnx.custom_translation_table())
        assert_standard_ops(onnx.load(str(path)))
        assert_matches_eager(model, args, path)


# --- what ONNX cannot express -------------------------------------------------------------

class PackedModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = fastcells.GRU(3, 4)

    def forward(self, x):
        packed = pack_padded_sequence(x, torch.tensor([4, 2]), enforce_sorted=False)
        return self.rnn(packed)[1]


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("case", ["proj_size", "dropout", "PackedSequence"])
def test_unsupported_options_raise(case, exporter, tmp_path):
    x = torch.randn(4, 2, 3)
    kwargs = {}
    if case == "proj_size":
        model, match = fastcells.LSTM(3, 4, proj_size=2).eval(), "proj_size"
    elif case == "dropout":
        model, match = fastcells.LSTM(3, 4, 2, dropout=0.5).train(), "dropout"
        if exporter == "torchscript":  # it would switch the model to eval mode
            kwargs["training"] = torch.onnx.TrainingMode.PRESERVE
    else:
        model, match = PackedModel().eval(), "PackedSequence"
    path = tmp_path / "model.onnx"
    dynamo = exporter == "dynamo"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not (dynamo and case == "PackedSequence"):
            # torch.onnx.export itself: the translation raises, the exporter wraps it
            with pytest.raises(Exception, match=match) as info:
                torch.onnx.export(model, (x,), str(path), dynamo=dynamo, **kwargs)
            assert "fastcells.onnx" in str(info.value)
        # torch.export fails on the packed batch sizes before any translation runs,
        # so only the helper, which watches the modules' inputs, can name the option.
        with pytest.raises(FastcellsOnnxError, match=match):
            fastcells.onnx.export(model, (x,), str(path), dynamo=dynamo, **kwargs)


def test_check_exportable():
    fastcells.onnx.check_exportable(nn.Sequential(fastcells.LSTM(3, 4, 2, dropout=0.5).eval()))
    with pytest.raises(FastcellsOnnxError, match=r"`0`.*proj_size=2"):
        fastcells.onnx.check_exportable(nn.Sequential(fastcells.LSTM(3, 4, proj_size=2)))
    with pytest.raises(FastcellsOnnxError, match="dropout"):
        fastcells.onnx.check_exportable(fastcells.GRU(3, 4, 2, dropout=0.5).train())


def test_import_registers_lazily():
    """``import fastcells`` imports neither torch.onnx nor ONNX Script, and the
    exporters find the translations whether they are imported before or after it."""
    code = r"""
import io, sys, warnings
import torch
first = sys.argv[1] == "before"
if first:
    import torch.onnx, onnxscript.function_libs.torch_lib.ops
import fastcells
if not first:
    assert "torch.onnx" not in sys.modules and "onnxscript" not in sys.modules, \
        [m for m in sys.modules if "onnx" in m]
m = fastcells.GRU(3, 4).eval()
x = torch.randn(2, 1, 3)
warnings.simplefilter("ignore")
torch.onnx.export(m, (x,), io.BytesIO(), dynamo=False)
if %r:
    torch.onnx.export(m, (x,), io.BytesIO(), dynamo=True, verbose=False)
print("ok")
""" % HAVE_ONNXSCRIPT
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    for when in ("after", "before"):
        if when == "before" and not HAVE_ONNXSCRIPT:
            continue
        res = subprocess.run([sys.executable, "-c", code, when], capture_output=True, text=True,
                             env=env, timeout=600)
        assert res.returncode == 0 and res.stdout.strip().endswith("ok"), \
            f"{when}: {res.stdout[-2000:]}\n{res.stderr[-4000:]}"


def test_exported_weights_are_torch_nn_gate_order(tmp_path):
    """The exported GRU equals torch.nn's own export (the reference for the
    gate orders and bias layout), not just fastcells' eager output."""
    rnn = make_module("GRU", 2, True, False, True)
    ref = nn.GRU(3, 5, 2, bidirectional=True).eval()
    ref.load_state_dict(rnn.state_dict())
    args = make_inputs(rnn, T=4, B=3, with_hx=True)
    export(Flat(rnn).eval(), args, "torchscript", tmp_path / "fast.onnx")
    export(Flat(ref).eval(), args, "torchscript", tmp_path / "ref.onnx")
    a = run_ort(tmp_path / "fast.onnx", args)
    b = run_ort(tmp_path / "ref.onnx", args)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
