"""Serialisation and copying of fastcells modules.

torch.save / torch.load of whole modules and of state_dicts (both ways with
torch.nn), pickle, copy.deepcopy, ``.to(dtype)`` / ``.to(device)`` /
``.double()`` and friends, and ``torch.jit.script``, which either works and
matches eager or raises a clear error that the documentation mentions.
"""
from __future__ import annotations

import copy
import io
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

fastcells = pytest.importorskip("fastcells")
if not hasattr(fastcells, "LSTM"):
    pytest.skip("fastcells extension not built", allow_module_level=True)

REPO = Path(__file__).resolve().parents[1]

MODULES = [
    ("LSTM", dict(input_size=3, hidden_size=5, num_layers=2, bidirectional=True, proj_size=2)),
    ("GRU", dict(input_size=3, hidden_size=5, num_layers=2, batch_first=True, dropout=0.25)),
    ("RNN", dict(input_size=3, hidden_size=5, nonlinearity="relu", bias=False)),
    ("LSTMCell", dict(input_size=3, hidden_size=5)),
    ("GRUCell", dict(input_size=3, hidden_size=5)),
    ("RNNCell", dict(input_size=3, hidden_size=5, nonlinearity="tanh")),
]
IDS = [m[0] for m in MODULES]


def _make(name, kwargs, seed=0):
    torch.manual_seed(seed)
    return getattr(fastcells, name)(**kwargs).eval()


def _input(name, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    if name.endswith("Cell"):
        return torch.randn(4, 3, generator=g).to(dtype)
    return torch.randn(4, 6, 3, generator=g).to(dtype)  # batch_first or not, both valid


def _flat(result):
    if isinstance(result, torch.Tensor):
        return [result]
    out = []
    for r in result:
        out += _flat(r)
    return out


def _assert_same_outputs(a, b, x):
    for u, v in zip(_flat(a(x)), _flat(b(x))):
        assert torch.equal(u, v)


def _assert_same_module(a, b):
    assert type(a) is type(b)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    for attr in ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
                 "bidirectional", "proj_size", "nonlinearity", "training"):
        assert getattr(a, attr, None) == getattr(b, attr, None), attr


@pytest.mark.parametrize("name,kwargs", MODULES, ids=IDS)
def test_torch_save_load_whole_module(name, kwargs, tmp_path):
    mod = _make(name, kwargs)
    path = tmp_path / "module.pt"
    torch.save(mod, path)
    loaded = torch.load(path, weights_only=False)
    _assert_same_module(mod, loaded)
    x = _input(name)
    _assert_same_outputs(mod, loaded, x)
    # The loaded module still trains (parameters are leaves that get gradients).
    out = _flat(loaded.train()(x))[0]
    out.sum().backward()
    assert all(p.grad is not None for p in loaded.parameters())


@pytest.mark.parametrize("name,kwargs", MODULES, ids=IDS)
def test_state_dict_roundtrip_weights_only(name, kwargs):
    mod = _make(name, kwargs, seed=0)
    buf = io.BytesIO()
    torch.save(mod.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    other = _make(name, kwargs, seed=1)
    other.load_state_dict(state)
    _assert_same_outputs(mod, other, _input(name))


@pytest.mark.parametrize("name,kwargs", MODULES, ids=IDS)
def test_state_dict_file_interchange_with_torch_nn(name, kwargs, tmp_path):
    """A checkpoint written by torch.nn loads into fastcells and the reverse."""
    ref_cls = getattr(nn, name)
    torch.manual_seed(3)
    ref = ref_cls(**kwargs).eval()
    torch.save(ref.state_dict(), tmp_path / "nn.pt")
    fc = _make(name, kwargs, seed=4)
    fc.load_state_dict(torch.load(tmp_path / "nn.pt", weights_only=True))
    x = _input(name).double()
    ref, fc = ref.double(), fc.double()
    for u, v in zip(_flat(fc(x)), _flat(ref(x))):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-10)
    torch.save(fc.state_dict(), tmp_path / "fc.pt")
    back = ref_cls(**kwargs).double().eval()
    back.load_state_dict(torch.load(tmp_path / "fc.pt", weights_only=True))
    for u, v in zip(_flat(back(x)), _flat(ref(x))):
        assert torch.equal(u, v)


@pytest.mark.parametrize("name,kwargs", MODULES, ids=IDS)
def test_pickle_roundtrip(name, kwargs):
    mod = _make(name, kwargs)
    loaded = pickle.loads(pickle.dumps(mod))
    _assert_same_module(mod, loaded)
    _assert_same_outputs(mod, loaded, _input(name))


@pytest.mark.parametrize("name,kwargs", MODULES, ids=IDS)
def test_deepcopy_is_independent(name, kwargs):
    mod = _make(name, kwargs)
    x = _input(name)
    before = [t.detach().clone() for t in _flat(mod(x))]
    clone = copy.deepcopy(mod)
    _assert_same_module(mod, clone)
    _assert_same_outputs(mod, clone, x)
    for p, q in zip(mod.parameters(), clone.parameters()):
        assert p.data_ptr() != q.data_ptr()
    with torch.no_grad():
        for q in clone.parameters():
            q.add_(0.5)
    # Changing the copy's weights changes its output and leaves the original alone.
    after = _flat(mod(x))
    for u, v in zip(after, before):
        assert torch.equal(u, v)
    assert any(not torch.equal(u, v) for u, v in zip(_flat(clone(x)), before))


@pytest.mark.parametrize("name,kwargs", MODULES, ids=IDS)
def test_to_dtype_and_device(name, kwargs):
    mod = _make(name, kwargs)
    x = _input(name)
    ref = getattr(nn, name)(**kwargs).eval()
    ref.load_state_dict(mod.state_dict())
    for convert, dtype in ((lambda m: m.to(torch.float64), torch.float64),
                           (lambda m: m.double(), torch.float64),
                           (lambda m: m.to(dtype=torch.bfloat16), torch.bfloat16),
                           (lambda m: m.to("cpu", torch.float32), torch.float32),
                           (lambda m: m.float(), torch.float32)):
        m = convert(copy.deepcopy(mod))
        r = convert(copy.deepcopy(ref))
        assert all(p.dtype == dtype for p in m.parameters())
        xd = x.to(dtype)
        outs = _flat(m(xd))
        assert all(o.dtype == dtype for o in outs)
        tol = dict(rtol=5e-2, atol=5e-2) if dtype == torch.bfloat16 else {}
        for u, v in zip(outs, _flat(r(xd))):
            torch.testing.assert_close(u.float(), v.float(), **tol)
    # _flat_weights (torch.nn's view of the parameters) must follow .to().
    if hasattr(mod, "_flat_weights"):
        m = copy.deepcopy(mod).double()
        assert all(w.dtype == torch.float64 for w in m._flat_weights)
        params = {p.data_ptr() for p in m.parameters()}
        assert all(w.data_ptr() in params for w in m._flat_weights)


def test_to_meta_device_keeps_structure():
    mod = _make("LSTM", MODULES[0][1]).to("meta")
    assert all(p.device.type == "meta" for p in mod.parameters())
    mod = mod.to_empty(device="cpu")
    assert all(p.device.type == "cpu" for p in mod.parameters())


def test_save_load_after_convert(tmp_path):
    """A model converted with fastcells.convert saves and reloads as a fastcells model."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("rnn", nn.GRU(3, 6, 2))
    converted = fastcells.convert(copy.deepcopy(model))
    assert isinstance(converted.rnn, fastcells.GRU)
    torch.save(converted, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    assert isinstance(loaded.rnn, fastcells.GRU)
    x = torch.randn(5, 2, 3)
    _assert_same_outputs(converted, loaded, x)
    torch.testing.assert_close(loaded(x)[0], model(x)[0])


def _docs_text() -> str:
    parts = []
    for p in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        if p.exists():
            parts.append(p.read_text(encoding="utf-8"))
    return "\n".join(parts)


@pytest.mark.parametrize("name,kwargs", [MODULES[0], MODULES[1], MODULES[3]],
                         ids=["LSTM", "GRU", "LSTMCell"])
def test_torch_jit_script_works_or_fails_clearly(name, kwargs):
    mod = _make(name, kwargs)
    try:
        scripted = torch.jit.script(mod)
    except Exception as exc:  # noqa: BLE001 - TorchScript raises several types
        msg = str(exc)
        assert msg.strip(), "torch.jit.script failed with an empty message"
        # Clear: the error names the supported alternative rather than a
        # TorchScript type-inference detail deep inside forward.
        assert "torch.compile" in msg or "torch.export" in msg, (
            f"unclear torch.jit.script error ({type(exc).__name__}): {msg.strip()[:300]}")
        docs = _docs_text()
        assert "jit.script" in docs, (
            "torch.jit.script fails; the README or docs/ must say so "
            f"(error was {type(exc).__name__}: {msg.splitlines()[0][:200]})")
        return
    x = _input(name)
    for u, v in zip(_flat(scripted(x)), _flat(mod(x))):
        torch.testing.assert_close(u, v)


@pytest.mark.parametrize("cls_name", ["LSTM", "GRU"])
def test_torch_jit_trace(cls_name):
    """torch.jit.trace (with its default consistency check) records the op; the
    traced module matches eager at another sequence length and batch size, trains
    with the same gradients, and survives torch.jit.save / load."""
    import fastcells

    torch.manual_seed(0)
    m = getattr(fastcells, cls_name)(3, 5, num_layers=2).double()
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    traced = torch.jit.trace(m, (x,))
    x2 = torch.randn(9, 4, 3, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(traced(x2)[0], m(x2)[0], atol=0, rtol=0)
    grads = []
    for f in (traced, m):
        m.zero_grad()
        f(x2)[0].sum().backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    buf = io.BytesIO()
    torch.jit.save(traced, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    torch.testing.assert_close(loaded(x2)[0], m(x2)[0], atol=0, rtol=0)
