"""fastcells.revert: back to torch.nn modules with the same Parameter objects."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

fastcells = pytest.importorskip("fastcells")
if not hasattr(fastcells, "LSTM"):
    pytest.skip("fastcells extension not built", allow_module_level=True)

SEQ = [("LSTM", {}), ("LSTM", {"proj_size": 2}), ("GRU", {}), ("RNN", {"nonlinearity": "tanh"}),
       ("RNN", {"nonlinearity": "relu"})]


class Model(nn.Module):
    def __init__(self, kind: str, **kwargs) -> None:
        super().__init__()
        self.enc = nn.Sequential(getattr(fastcells, kind)(3, 5, 2, batch_first=True,
                                                          bidirectional=True, **kwargs))
        out = 2 * (kwargs.get("proj_size") or 5)
        self.head = nn.Linear(out, 1)

    def forward(self, x):
        return self.head(self.enc[0](x)[0])


@pytest.mark.parametrize("kind,kwargs", SEQ, ids=[f"{k}{kw}" for k, kw in SEQ])
def test_revert_sequence_modules(kind, kwargs):
    torch.manual_seed(0)
    model = Model(kind, **kwargs).eval()
    x = torch.randn(2, 4, 3)
    before = model(x)
    params = {n: p for n, p in model.named_parameters()}
    state = copy.deepcopy(model.state_dict())
    assert fastcells.revert(model) is model
    rnn = model.enc[0]
    assert type(rnn) is getattr(nn, kind)
    if kind == "RNN":
        assert rnn.nonlinearity == kwargs["nonlinearity"]
    after_params = dict(model.named_parameters())
    assert after_params.keys() == params.keys()
    assert all(after_params[n] is p for n, p in params.items()), "same Parameter objects"
    assert all(w is params[f"enc.0.{n}"] for n, w in zip(rnn._flat_weights_names,
                                                          rnn._flat_weights))
    torch.testing.assert_close(model(x), before, atol=2e-5, rtol=1e-4)
    # state_dict round trips, both ways
    assert model.state_dict().keys() == state.keys()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)
    twin = Model(kind, **kwargs)
    twin.load_state_dict(model.state_dict())
    torch.testing.assert_close(twin.eval()(x), before, atol=2e-5, rtol=1e-4)
    # and forward again
    assert fastcells.convert(model) is model
    assert type(model.enc[0]) is getattr(fastcells, kind)
    assert all(dict(model.named_parameters())[n] is p for n, p in params.items())
    torch.testing.assert_close(model(x), before, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell", "RNNCell"])
def test_revert_cells_and_top_level(kind):
    torch.manual_seed(0)
    cell = getattr(fastcells, kind)(3, 4)
    x = torch.randn(2, 3)
    before = cell(x)
    params = list(cell.parameters())
    back = fastcells.revert(cell)  # the module itself: a new torch.nn module is returned
    assert type(back) is getattr(nn, kind)
    assert all(a is b for a, b in zip(back.parameters(), params))
    got = back(x)
    for a, b in zip(got if isinstance(got, tuple) else (got,),
                    before if isinstance(before, tuple) else (before,)):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    again = fastcells.convert(back)
    assert type(again) is getattr(fastcells, kind)
    assert all(a is b for a, b in zip(again.parameters(), params))


def test_revert_keeps_optimizer_training_and_allows_torchscript():
    torch.manual_seed(0)
    model = nn.Sequential(fastcells.GRU(3, 4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fastcells.revert(model)
    w = model[0].weight_ih_l0.detach().clone()
    model[0](torch.randn(5, 2, 3))[0].sum().backward()
    opt.step()
    assert not torch.equal(model[0].weight_ih_l0.detach(), w), "the optimizer trains it"
    torch.jit.script(model)  # torch.nn's GRU scripts; the fused module does not


def test_revert_leaves_torch_nn_and_warns_on_subclasses_and_parametrizations():
    class Sub(fastcells.LSTM):
        pass

    torch.manual_seed(0)
    model = nn.ModuleDict({"torch": nn.LSTM(3, 4), "sub": Sub(3, 4), "par": fastcells.GRU(3, 4)})
    parametrize.register_parametrization(model["par"], "weight_hh_l0", nn.Identity())
    plain = model["torch"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fastcells.revert(model)
    assert model["torch"] is plain
    assert type(model["sub"]) is Sub
    assert parametrize.type_before_parametrizations(model["par"]) is fastcells.GRU
    text = " ".join(str(w.message) for w in caught)
    assert "`sub`" in text and "`par`" in text and "parametrizations" in text


def test_hooks_on_the_reverted_module_do_not_fire_on_the_old_one():
    """revert() copies the hook dicts as convert() does (one level deep)."""
    old = fastcells.GRU(3, 4)
    new = fastcells.revert(old)
    calls = []
    new.register_forward_hook(lambda m, i, o: calls.append(type(m)))
    x = torch.randn(2, 1, 3)
    old(x)
    assert calls == []
    new(x)
    assert calls == [nn.GRU]
