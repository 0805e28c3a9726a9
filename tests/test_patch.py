"""fastcells.patch_torch_nn(): torch.nn's own RNN classes run the fused op.

Library-style classes written here stand in for the forecasting libraries:
a model that builds its nn.LSTM inside, a subclass whose forward calls
super().forward with packed unsorted sequences (as pytorch-forecasting's
`class LSTM(RNN, nn.LSTM)` does), subclasses defined before and after the
patch, and models reloaded from a pickle.
"""
from __future__ import annotations

import io
import pickle
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from conftest import needs_ops

pytestmark = needs_ops

import fastcells  # noqa: E402


@pytest.fixture(autouse=True)
def _unpatched():
    """Every test starts and ends with torch.nn unpatched."""
    fastcells.unpatch_torch_nn()
    yield
    fastcells.unpatch_torch_nn()


def _ran_fused(fn) -> bool:
    """Whether fn() dispatched fastcells' fused op (and not ATen's RNN ops)."""
    with torch.autograd.profiler.profile() as prof:
        fn()
    names = {e.name for e in prof.function_events}
    return "fastcells::rnn_forward" in names


class _Forecaster(nn.Module):
    """A model that builds its RNN itself, as library code does."""

    def __init__(self, cell=nn.LSTM, hidden=12):
        super().__init__()
        self.rnn = cell(3, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


class _PackingMixin:
    """pytorch-forecasting style: packs unsorted lengths and calls super().forward."""

    def forward(self, x, lengths, hx=None):
        packed = pack_padded_sequence(x, lengths, batch_first=self.batch_first, enforce_sorted=False)
        out, state = super().forward(packed, hx)
        return out, state

    def describe(self) -> str:
        return f"packing {type(self).__name__}"


class _EarlyLSTM(_PackingMixin, nn.LSTM):  # defined before any patch
    pass


def _same(a, b):
    for x, y in zip(torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)):
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y)


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU, nn.RNN])
def test_existing_and_new_modules_run_the_fused_op(cell):
    torch.manual_seed(0)
    before = _Forecaster(cell).double()
    x = torch.randn(4, 9, 3, dtype=torch.double)
    expected = before(x)
    grads_expected = torch.autograd.grad(expected.sum(), list(before.parameters()))
    assert not _ran_fused(lambda: before(x))
    with fastcells.patched():
        assert fastcells.is_patched()
        assert _ran_fused(lambda: before(x))
        got = before(x)
        grads = torch.autograd.grad(got.sum(), list(before.parameters()))
        after = _Forecaster(cell).double()
        assert _ran_fused(lambda: after(x))
        assert isinstance(before.rnn, cell) and type(before.rnn) is cell
    assert not fastcells.is_patched()
    assert not _ran_fused(lambda: before(x))
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
    for g, e in zip(grads, grads_expected):
        torch.testing.assert_close(g, e, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_patched_module_equals_the_fastcells_module_bitwise(cell):
    torch.manual_seed(0)
    ref = getattr(nn, cell)(5, 16, num_layers=2, bidirectional=True)
    fc = getattr(fastcells, cell)(5, 16, num_layers=2, bidirectional=True)
    fc.load_state_dict(ref.state_dict())
    x = torch.randn(7, 3, 5)
    with fastcells.patched():
        _same(ref(x), fc(x))


def test_subclasses_defined_before_and_after_the_patch():
    torch.manual_seed(0)
    x = torch.randn(5, 8, 4)
    lengths = torch.tensor([8, 3, 6, 1, 5])
    early = _EarlyLSTM(4, 10, batch_first=True).double()
    expected = early(x.double(), lengths)
    with fastcells.patched():

        class _LateGRU(_PackingMixin, nn.GRU):  # defined while patched
            pass

        late = _LateGRU(4, 10, batch_first=True)
        assert _ran_fused(lambda: early(x.double(), lengths))
        assert _ran_fused(lambda: late(x, lengths))
        got = early(x.double(), lengths)
        assert early.describe() == "packing _EarlyLSTM" and isinstance(early, nn.LSTM)
    torch.testing.assert_close(got[0].data, expected[0].data, atol=1e-10, rtol=1e-10)
    for g, e in zip(got[1], expected[1]):
        torch.testing.assert_close(g, e, atol=1e-10, rtol=1e-10)
    late_out = late(x, lengths)  # unpatched again: torch.nn's own forward
    assert not _ran_fused(lambda: late(x, lengths))
    assert late_out[0].data.shape == (int(lengths.sum()), 10)


def test_unpatch_restores_torch_nn_exactly():
    import torch._dynamo

    forwards = {c: c.__dict__["forward"] for c in (nn.LSTM, nn.GRU, nn.RNN)}
    allow_rnn = torch._dynamo.config.allow_rnn
    had_weights = "_current_weights" in nn.RNNBase.__dict__
    fastcells.patch_torch_nn()
    fastcells.patch_torch_nn()  # idempotent
    assert torch._dynamo.config.allow_rnn is True
    fastcells.unpatch_torch_nn()
    fastcells.unpatch_torch_nn()
    for c, f in forwards.items():
        assert c.__dict__["forward"] is f
    assert torch._dynamo.config.allow_rnn == allow_rnn
    assert ("_current_weights" in nn.RNNBase.__dict__) == had_weights


def test_patched_context_keeps_an_active_patch():
    fastcells.patch_torch_nn()
    with fastcells.patched():
        assert fastcells.is_patched()
    assert fastcells.is_patched()


def test_pickled_models_reload_as_torch_nn_and_run_fused_while_patched():
    torch.manual_seed(0)
    model = _Forecaster(nn.GRU)
    x = torch.randn(2, 6, 3)
    with fastcells.patched():
        y = model(x)
        blob = pickle.dumps(model)
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        for loaded in (pickle.loads(blob), torch.load(buf, weights_only=False)):
            assert type(loaded.rnn) is nn.GRU
            assert _ran_fused(lambda: loaded(x))
            assert torch.equal(loaded(x), y)


def test_training_with_the_patch_matches_torch_nn():
    torch.manual_seed(0)
    a = _Forecaster(nn.LSTM).double()
    b = _Forecaster(nn.LSTM).double()
    b.load_state_dict(a.state_dict())
    x, target = torch.randn(8, 10, 3, dtype=torch.double), torch.randn(8, 10, 1, dtype=torch.double)
    opt_a, opt_b = torch.optim.Adam(a.parameters(), 0.05), torch.optim.Adam(b.parameters(), 0.05)
    for _ in range(5):
        opt_a.zero_grad()
        nn.functional.mse_loss(a(x), target).backward()
        opt_a.step()
    with fastcells.patched():
        for _ in range(5):
            opt_b.zero_grad()
            nn.functional.mse_loss(b(x), target).backward()
            opt_b.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(q, p, atol=1e-9, rtol=1e-9)


def test_compile_fullgraph_while_patched():
    torch.manual_seed(0)
    model = _Forecaster(nn.LSTM)
    x = torch.randn(3, 7, 3)
    with fastcells.patched():
        eager = model(x)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        got = compiled(x)
        torch.testing.assert_close(got, eager, atol=1e-6, rtol=1e-5)
        g_eager = torch.autograd.grad(model(x).sum(), list(model.parameters()))
        g_comp = torch.autograd.grad(compiled(x).sum(), list(model.parameters()))
        for a, b in zip(g_comp, g_eager):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    torch._dynamo.reset()


def test_inputs_fastcells_cannot_run_use_torch_nn_visibly():
    m = nn.GRU(3, 5).to("meta")
    x = torch.randn(4, 2, 3, device="meta")
    with fastcells.patched():
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            fastcells.patch._warned.clear()
            got = m(x)[0]
        assert any("runs torch.nn's own forward" in str(e.message) and "'meta'" in str(e.message)
                   for e in w)
    assert got.device.type == "meta" and got.shape == (4, 2, 5)


def test_float16_on_cpu_runs_fused_while_patched():
    torch.manual_seed(0)
    m = nn.LSTM(3, 5, 2).half()
    x = torch.randn(4, 2, 3).half()
    expected = m(x)[0]
    with fastcells.patched():
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback warning
            got = m(x)[0]
    assert got.dtype == torch.float16
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=2e-3)
