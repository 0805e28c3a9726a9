"""convert() on user subclasses of torch.nn.LSTM / GRU / RNN (fastcells/_subclass.py).

The classes below are module-level so that pickle can import them, as a
library's classes are.
"""
from __future__ import annotations

import copy
import io
import os
import pickle
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from conftest import needs_ops

pytestmark = needs_ops

import fastcells  # noqa: E402


class PackingMixin:
    """pytorch-forecasting style: packs unsorted lengths, then super().forward."""

    def forward(self, x, lengths, hx=None):
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        return super().forward(packed, hx)

    def describe(self) -> str:
        return f"{type(self).__name__} with {self.hidden_size} units"


class LibLSTM(PackingMixin, nn.LSTM):
    pass


class LibGRU(PackingMixin, nn.GRU):
    pass


class TaggedRNN(nn.RNN):
    """Own forward, own attribute."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tag = "kept"

    def forward(self, x, hx=None):
        out, h = super().forward(x, hx)
        return out * 2, h


def _ran_fused(fn) -> bool:
    with torch.autograd.profiler.profile() as prof:
        fn()
    return "fastcells::rnn_forward" in {e.name for e in prof.function_events}


def _inputs(cls):
    torch.manual_seed(0)
    x = torch.randn(5, 7, 4, dtype=torch.double)
    lengths = torch.tensor([7, 2, 5, 1, 6])
    return (x, lengths) if issubclass(cls, PackingMixin) else (x.transpose(0, 1),)


def _flat(result):
    return [t.data if hasattr(t, "batch_sizes") else t
            for t in torch.utils._pytree.tree_leaves(result, is_leaf=lambda v: hasattr(v, "batch_sizes"))]


@pytest.mark.parametrize("cls", [LibLSTM, LibGRU, TaggedRNN])
def test_subclass_gets_the_fused_op_and_keeps_everything(cls):
    torch.manual_seed(0)
    model = nn.Sequential(cls(4, 9, num_layers=2)).double()
    args = _inputs(cls)
    expected = model[0](*args)
    grads_expected = torch.autograd.grad(sum(t.sum() for t in _flat(expected)), list(model.parameters()))
    obj, params = model[0], list(model[0].parameters())
    assert not _ran_fused(lambda: model[0](*args))
    fastcells.convert(model)
    m = model[0]
    assert m is obj and list(m.parameters()) == params
    assert all(a is b for a, b in zip(m.parameters(), params))
    assert isinstance(m, cls) and isinstance(m, (nn.LSTM, nn.GRU, nn.RNN))
    assert isinstance(m, PackingMixin) == issubclass(cls, PackingMixin)
    assert type(m) is not cls and type(m).__module__ == "fastcells._subclass"
    assert _ran_fused(lambda: m(*args))
    got = m(*args)
    grads = torch.autograd.grad(sum(t.sum() for t in _flat(got)), list(m.parameters()))
    for a, b in zip(_flat(got), _flat(expected)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    for a, b in zip(grads, grads_expected):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    if cls is TaggedRNN:
        assert m.tag == "kept"
    else:
        assert m.describe() == f"{type(m).__name__} with 9 units"
    fastcells.convert(model)  # idempotent
    assert type(model[0]) is type(m)


def test_subclass_module_itself_and_revert():
    m = LibGRU(4, 6)
    same = fastcells.convert(m)
    assert same is m and type(m).__mro__[1] is LibGRU
    fastcells.revert(nn.Sequential(m))
    assert type(m) is LibGRU
    fastcells.convert(m)
    fastcells.revert(m)
    assert type(m) is LibGRU


def test_pickle_save_and_deepcopy_keep_the_fused_class():
    torch.manual_seed(0)
    model = fastcells.convert(nn.Sequential(LibLSTM(4, 6), nn.Linear(6, 1)))
    args = _inputs(LibLSTM)
    args = (args[0].float(), args[1])
    y = model[0](*args)[0].data
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for other in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model),
                  torch.load(buf, weights_only=False)):
        assert type(other[0]) is type(model[0])
        assert _ran_fused(lambda: other[0](*args))
        assert torch.equal(other[0](*args)[0].data, y)


def test_unpickle_in_a_fresh_process(tmp_path):
    """The generated class is rebuilt by name in a process that never called convert()."""
    model = fastcells.convert(nn.Sequential(TaggedRNN(3, 5)))
    path = tmp_path / "m.pt"
    torch.save(model, path)
    code = (f"import sys, torch; sys.path.insert(0, {os.path.dirname(__file__)!r}); "
            f"m = torch.load({str(path)!r}, weights_only=False); "
            "print(type(m[0]).__module__, type(m[0]).__mro__[1].__name__, m[0].tag)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["fastcells._subclass", "TaggedRNN", "kept"]


def test_generated_names_round_trip():
    from fastcells import _subclass

    for module, qual in [("pytorch_forecasting.models.nn.rnn", "LSTM"), ("a__b", "C_.D"), ("m", "_x_")]:
        assert _subclass._decode(_subclass._encode(module, qual)) == (module, qual)
