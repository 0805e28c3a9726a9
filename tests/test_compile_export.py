"""Compiler stack: torch.compile(fullgraph=True), torch.export and opcheck.

fastcells registers its ops with TORCH_LIBRARY schemas, fake kernels and
autograd formulas, so a model built from fastcells modules must trace into a
single graph (no graph breaks, unlike torch.nn's RNNs), give the eager result,
and train the same way.  Sizes are tiny: compilation dominates the run time on
a 2-core CPU, so only a few models are compiled.  FASTCELLS_SLOW=1 adds the
inductor backend for GRU and RNN and more opcheck configurations.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

fastcells = pytest.importorskip("fastcells")
if not hasattr(fastcells, "LSTM"):
    pytest.skip("fastcells extension not built", allow_module_level=True)


from fastcells._cells import CELLS, MODES  # noqa: E402
from conftest import OP_DEVICES, op_call_args, op_case, skip_without_kernel  # noqa: E402


class Forecaster(nn.Module):
    """The seed's model shape: recurrent stack + Linear head on every step."""

    def __init__(self, kind: str, input_size: int = 3, hidden: int = 6, layers: int = 2,
                 **kwargs) -> None:
        super().__init__()
        self.rnn = getattr(fastcells, kind)(input_size, hidden, layers, **kwargs)
        out = hidden * (2 if kwargs.get("bidirectional") else 1)
        self.head = nn.Linear(out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out)


class StateForecaster(nn.Module):
    """Uses the returned final state too (h_n of the last layer), batch_first."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.rnn = getattr(fastcells, kind)(4, 5, 1, batch_first=True)
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
        _, h = self.rnn(x, h0)
        if isinstance(h, tuple):
            h = h[0]
        return self.head(h[-1])


def _torch_nn_twin(model: Forecaster) -> nn.Module:
    """The same model with torch.nn's recurrent module and identical weights."""
    twin = copy.deepcopy(model)
    r = model.rnn
    cls = {"LSTM": nn.LSTM, "GRU": nn.GRU, "RNN": nn.RNN}[type(r).__name__]
    kwargs = {}
    if cls is nn.RNN:
        kwargs["nonlinearity"] = r.nonlinearity
    twin.rnn = cls(r.input_size, r.hidden_size, r.num_layers, bias=r.bias,
                   batch_first=r.batch_first, bidirectional=r.bidirectional,
                   dtype=r.weight_ih_l0.dtype, **kwargs)
    twin.rnn.load_state_dict(r.state_dict())
    return twin


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compiled_matches_eager(kind: str, backend: str) -> None:
    torch.manual_seed(0)
    model = Forecaster(kind)
    eager = copy.deepcopy(model)
    compiled = torch.compile(copy.deepcopy(model), fullgraph=True, backend=backend)
    x = torch.randn(9, 2, 3)
    y = torch.randn(9, 2, 1)

    opt_e = torch.optim.SGD(eager.parameters(), lr=0.1)
    opt_c = torch.optim.SGD(compiled.parameters(), lr=0.1)
    for _ in range(2):  # second step runs the compiled graph on updated weights
        pe = eager(x)
        pc = compiled(x)
        torch.testing.assert_close(pc, pe, rtol=1e-5, atol=1e-6)
        le = F.mse_loss(pe, y)
        lc = F.mse_loss(pc, y)
        opt_e.zero_grad()
        opt_c.zero_grad()
        le.backward()
        lc.backward()
        for (name, pe_), (_, pc_) in zip(eager.named_parameters(), compiled.named_parameters()):
            assert pc_.grad is not None, name
            torch.testing.assert_close(pc_.grad, pe_.grad, rtol=1e-5, atol=1e-6, msg=name)
        opt_e.step()
        opt_c.step()
    for (name, pe_), (_, pc_) in zip(eager.named_parameters(), compiled.named_parameters()):
        torch.testing.assert_close(pc_, pe_, rtol=1e-5, atol=1e-6, msg=name)

    # The eager fastcells model is itself torch.nn's model.
    twin = _torch_nn_twin(eager)
    torch.testing.assert_close(eager(x), twin(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_compile_fullgraph_training_step_aot_eager(kind):
    """fullgraph=True traces forward and (via AOTAutograd) backward with no break."""
    _compiled_matches_eager(kind, "aot_eager")


def test_compile_fullgraph_training_step_inductor_lstm():
    """The default backend (inductor: generated C++ for the Linear head + loss)."""
    _compiled_matches_eager("LSTM", "inductor")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["GRU", "RNN"])
def test_compile_fullgraph_training_step_inductor_slow(kind):
    _compiled_matches_eager(kind, "inductor")


def _non_contiguous_parameters(rnn: nn.Module) -> None:
    """Every weight as a Parameter with the same values in another layout."""
    for name in rnn._flat_weights_names:
        w = getattr(rnn, name).detach()
        w = (w.t().contiguous().t() if w.dim() == 2
             else torch.stack([w, torch.zeros_like(w)], -1)[..., 0])
        assert not w.is_contiguous()
        setattr(rnn, name, nn.Parameter(w))


class LinearIntoRNN(nn.Module):
    """A layer in front of the RNN, so that the RNN's input requires grad."""

    def __init__(self, rnn: nn.Module) -> None:
        super().__init__()
        self.lin = nn.Linear(3, rnn.input_size, dtype=torch.float64)
        self.rnn = rnn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.lin(x))
        return (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).sum()


def _compiled_input_grad_matches_torch_nn(kind: str, backend: str, batch_first: bool,
                                          non_contiguous: bool, **kwargs) -> None:
    torch.manual_seed(6)
    cls = getattr(fastcells, kind)
    rnn = cls(8, 5, 2, batch_first=batch_first, dtype=torch.float64, **kwargs)
    model = LinearIntoRNN(rnn)
    twin = _torch_nn_twin(model)  # torch.nn's RNN, same weights, before the relayout
    if non_contiguous:
        _non_contiguous_parameters(model.rnn)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    x = torch.randn((4, 10, 3) if batch_first else (10, 4, 3), dtype=torch.float64)
    for step in range(2):  # the second call reuses the compiled graph
        xc = x.clone().requires_grad_()
        xt = x.clone().requires_grad_()
        model.zero_grad()
        twin.zero_grad()
        lc, lt = compiled(xc), twin(xt)
        lc.backward()
        lt.backward()
        torch.testing.assert_close(lc, lt, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(xc.grad, xt.grad, rtol=1e-10, atol=1e-10)
        for (name, pc), (_, pt) in zip(model.named_parameters(), twin.named_parameters()):
            torch.testing.assert_close(pc.grad, pt.grad, rtol=1e-10, atol=1e-10, msg=name)
        x = x + 0.5


@pytest.mark.parametrize("non_contiguous", [False, True], ids=["weights", "strided_weights"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["tb", "bf"])
@pytest.mark.parametrize("kind,kwargs", [("GRU", {}), ("LSTM", {"bidirectional": True}),
                                         ("RNN", {"nonlinearity": "relu"})],
                         ids=["GRU", "LSTM-bi", "RNN-relu"])
def test_compile_training_with_input_grad_aot_eager(kind, kwargs, batch_first, non_contiguous):
    """Gradients that flow out of the op into the layer before it (and into
    strided weight Parameters) equal torch.nn's, in float64."""
    _compiled_input_grad_matches_torch_nn(kind, "aot_eager", batch_first, non_contiguous,
                                          **kwargs)


@pytest.mark.parametrize("kind,non_contiguous", [("GRU", False), ("LSTM", True)],
                         ids=["GRU", "LSTM-strided_weights"])
def test_compile_training_with_input_grad_inductor(kind, non_contiguous):
    """Inductor checks the fake kernel's strides at run time and plans the
    Linear's backward on them."""
    _compiled_input_grad_matches_torch_nn(kind, "inductor", True, non_contiguous)


def test_compile_fullgraph_state_output_and_hx():
    """batch_first, explicit h0/c0 and use of the final state, in one graph."""
    torch.manual_seed(1)
    for kind in ("LSTM", "GRU"):
        torch._dynamo.reset()
        model = StateForecaster(kind)
        x = torch.randn(3, 7, 4)
        h0 = torch.randn(1, 3, 5)
        if kind == "LSTM":
            h0 = (h0, torch.randn(1, 3, 5))
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x, h0), model(x, h0), rtol=1e-6, atol=1e-6)


def test_compile_counts_one_graph():
    """A graph break would show up as more than one captured graph."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(2)
    model = Forecaster("GRU", bidirectional=True)
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(model, backend=counter)
    x = torch.randn(5, 2, 3)
    torch.testing.assert_close(compiled(x), model(x))
    assert counter.frame_count == 1
    ops = [str(n.target) for g in counter.graphs for n in g.graph.nodes
           if n.op == "call_function"]
    assert any("fastcells" in o for o in ops), ops


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_export_forecaster_runs_and_matches(kind):
    torch.manual_seed(3)
    model = Forecaster(kind).eval()
    x = torch.randn(12, 1, 3)
    ep = torch.export.export(model, (x,))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert any("fastcells" in t for t in targets), targets
    torch.testing.assert_close(ep.module()(x), model(x), rtol=0, atol=0)
    # A new input of the same shape.
    x2 = torch.randn(12, 1, 3)
    torch.testing.assert_close(ep.module()(x2), model(x2), rtol=0, atol=0)


def test_export_dynamic_sequence_length():
    """Export once with a symbolic time dimension, run at other lengths."""
    torch.manual_seed(4)
    model = Forecaster("LSTM").eval()
    T = torch.export.Dim("T", min=2, max=1024)
    ep = torch.export.export(model, (torch.randn(12, 1, 3),), dynamic_shapes={"x": {0: T}})
    for steps in (2, 5, 40):
        x = torch.randn(steps, 1, 3)
        torch.testing.assert_close(ep.module()(x), model(x), rtol=0, atol=0)


def test_export_save_load_roundtrip(tmp_path):
    torch.manual_seed(5)
    model = Forecaster("GRU").eval()
    x = torch.randn(6, 2, 3)
    ep = torch.export.export(model, (x,))
    path = tmp_path / "forecaster.pt2"
    torch.export.save(ep, str(path))
    loaded = torch.export.load(str(path))
    torch.testing.assert_close(loaded.module()(x), model(x), rtol=0, atol=0)


# ---------------------------------------------------------------- opcheck

def _op_args(mode: int, layers: int, bidirectional: bool, bias: bool, proj: int,
             packed: bool, masks: bool, dtype: torch.dtype = torch.float64,
             requires_grad: bool = True, device: str = "cpu"):
    """Arguments for fastcells::rnn_forward (conftest.op_case) on `device`, every
    tensor a leaf that requires grad unless `requires_grad` is False."""
    skip_without_kernel(CELLS[mode].name, device)
    c = op_case(CELLS[mode].name, packed, layers, bidirectional, proj_size=proj, bias=bias,
                masks=masks, T=5, B=3, I=3, H=4, dtype=dtype, seed=10 + mode + 3 * layers,
                device=device)
    for t in [c["input"], c["hx"], c["cx"]] + c["weights"]:
        if t is not None:
            t.requires_grad_(requires_grad)
    return op_call_args(c)


FORWARD_CASES = [
    # mode, layers, bidirectional, bias, proj, packed, masks[, dtype]
    pytest.param((MODES["LSTM"], 2, False, True, 0, False, False), id="lstm-2l"),
    pytest.param((MODES["LSTM"], 1, False, True, 0, False, False, torch.float32), id="lstm-float32"),
    pytest.param((MODES["GRU"], 2, True, True, 0, True, False, torch.float32),
                 id="gru-bi-packed-float32"),
    pytest.param((MODES["LSTM"], 2, True, True, 2, True, True), id="lstm-bi-proj-packed-masks"),
    pytest.param((MODES["GRU"], 1, True, False, 0, False, False), id="gru-bi-nobias"),
    pytest.param((MODES["GRU"], 2, False, True, 0, True, True), id="gru-packed-masks"),
    pytest.param((MODES["RNN_TANH"], 1, False, True, 0, False, False), id="rnn-tanh"),
    pytest.param((MODES["LSTM_LN"], 2, True, True, 0, True, True), id="lstm-ln-bi-packed-masks"),
    pytest.param((MODES["GRU_LN"], 1, False, False, 0, False, False), id="gru-ln-nobias"),
]
SLOW_FORWARD_CASES = [
    pytest.param((MODES["RNN_RELU"], 3, True, True, 0, True, True),
                 id="rnn-relu-3l-bi-packed-masks"),
    pytest.param((MODES["LSTM"], 1, False, False, 3, False, False), id="lstm-proj-nobias"),
    pytest.param((MODES["GRU"], 3, True, True, 0, False, True), id="gru-3l-bi-masks"),
]


def _opcheck(op, args):
    result = torch.library.opcheck(op, args, test_utils=(
        "test_schema", "test_autograd_registration", "test_faketensor",
        "test_aot_dispatch_dynamic"))
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.parametrize("device", OP_DEVICES)
@pytest.mark.parametrize("case", FORWARD_CASES)
def test_opcheck_rnn_forward(case, device):
    _opcheck(torch.ops.fastcells.rnn_forward.default, _op_args(*case, device=device))


@pytest.mark.slow
@pytest.mark.parametrize("device", OP_DEVICES)
@pytest.mark.parametrize("case", SLOW_FORWARD_CASES)
def test_opcheck_rnn_forward_slow(case, device):
    _opcheck(torch.ops.fastcells.rnn_forward.default, _op_args(*case, device=device))


def test_opcheck_rnn_forward_trailing_empty_steps():
    """Packed batch sizes ending in empty steps (dropped by the op): the fake
    kernel's shapes match the real ones, with gradients."""
    args = list(_op_args(MODES["LSTM"], 2, True, True, 0, True, False))
    args[4] = args[4] + [0, 0]
    _opcheck(torch.ops.fastcells.rnn_forward.default, tuple(args))


def test_opcheck_rnn_forward_bfloat16_fake():
    """The fake kernel must give reserve's float32 dtype for bf16 inputs."""
    args = _op_args(MODES["LSTM"], 2, False, True, 0, False, False, dtype=torch.bfloat16,
                    requires_grad=False)
    result = torch.library.opcheck(torch.ops.fastcells.rnn_forward.default, args,
                                   test_utils=("test_schema", "test_faketensor"))
    assert set(result.values()) == {"SUCCESS"}, result


def _backward_args(case, grads_require_grad: bool, device: str = "cpu"):
    fwd = _op_args(*case, requires_grad=False, device=device)
    (x, weights, hx, cx, batch_sizes, mode, layers, bidirectional, bias, proj, masks) = fwd
    output, hy, cy, reserve = torch.ops.fastcells.rnn_forward(*fwd)
    g = torch.Generator().manual_seed(99)

    def draw(like):
        return torch.randn(like.shape, dtype=like.dtype, generator=g).to(device)

    grad_output, grad_hy = draw(output), draw(hy)
    grad_cy = draw(cy) if CELLS[mode].has_cell_state else None
    for t in (grad_output, grad_hy, grad_cy):
        if t is not None:
            t.requires_grad_(grads_require_grad)
    return (x, weights, hx, cx, batch_sizes, mode, layers, bidirectional, bias, proj, masks,
            reserve, grad_output, grad_hy, grad_cy)


BACKWARD_CASES = [
    pytest.param((MODES["LSTM"], 2, True, True, 2, True, True), id="lstm-bi-proj-packed-masks"),
    pytest.param((MODES["GRU"], 2, False, True, 0, False, False), id="gru-2l"),
]


@pytest.mark.parametrize("device", OP_DEVICES)
@pytest.mark.parametrize("case", BACKWARD_CASES)
def test_opcheck_rnn_backward(case, device):
    """rnn_backward: schema, fake kernel, and a clean compile; it is the
    backward formula of rnn_forward, so its own autograd is only checked to be
    registered correctly (no silently-differentiable kernel)."""
    op = torch.ops.fastcells.rnn_backward.default
    args = _backward_args(case, grads_require_grad=False, device=device)
    result = torch.library.opcheck(op, args, test_utils=(
        "test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    assert set(result.values()) == {"SUCCESS"}, result
    args = _backward_args(case, grads_require_grad=True, device=device)
    result = torch.library.opcheck(op, args, test_utils=("test_autograd_registration",))
    assert set(result.values()) == {"SUCCESS"}, result


def test_opcheck_rnn_backward_with_grad_reserve():
    """rnn_backward given a gradient of the reserve (the LSTM cell states,
    return_cell_states): schema, fake kernel and a clean compile."""
    case = (MODES["LSTM"], 2, True, True, 0, True, False)
    args = _backward_args(case, grads_require_grad=False)
    reserve = args[11]
    grad_reserve = torch.randn(reserve.shape, dtype=reserve.dtype,
                               generator=torch.Generator().manual_seed(7))
    result = torch.library.opcheck(torch.ops.fastcells.rnn_backward.default,
                                   args + (True, grad_reserve), test_utils=(
                                       "test_schema", "test_faketensor",
                                       "test_aot_dispatch_dynamic"))
    assert set(result.values()) == {"SUCCESS"}, result


def test_opcheck_with_zoneout_and_recurrent_dropout():
    """Both ops given zoneout weights and recurrent dropout masks: schema,
    autograd registration, fake kernels and a clean compile."""
    case = (MODES["GRU"], 2, True, True, 0, True, False)
    fwd = _op_args(*case)
    n_rows = fwd[0].shape[0]
    zone = (torch.rand((4, n_rows, 4), generator=torch.Generator().manual_seed(3)) < 0.3)
    zone = zone.to(torch.float64)
    rmasks = torch.full((4, 3, 4), 1 / 0.7, dtype=torch.float64)
    _opcheck(torch.ops.fastcells.rnn_forward.default, fwd + (True, zone, rmasks))
    args = _backward_args(case, grads_require_grad=False)
    result = torch.library.opcheck(torch.ops.fastcells.rnn_backward.default,
                                   args + (True, None, zone, rmasks), test_utils=(
                                       "test_schema", "test_faketensor",
                                       "test_aot_dispatch_dynamic"))
    assert set(result.values()) == {"SUCCESS"}, result
