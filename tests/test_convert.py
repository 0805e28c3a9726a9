"""fastcells.convert(model): swaps every nn.LSTM/GRU/RNN and nn.LSTMCell/GRUCell/
RNNCell nested in a model for the fastcells module, in place, keeping the weights
(and so the outputs), and returns the model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import needs_fastcells

pytestmark = needs_fastcells

SWAPPED = {nn.LSTM: "LSTM", nn.GRU: "GRU", nn.RNN: "RNN", nn.LSTMCell: "LSTMCell",
           nn.GRUCell: "GRUCell", nn.RNNCell: "RNNCell"}


class Zoo(nn.Module):
    """Every recurrent module type, nested at different depths and in containers."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(3, 6, num_layers=2, batch_first=True, proj_size=4, dropout=0.2)
        self.body = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
        self.inner = nn.ModuleDict({
            "gru": nn.GRU(4, 5, bidirectional=True, bias=False, batch_first=True),
            "stack": nn.ModuleList([nn.RNN(10, 3, nonlinearity="relu", batch_first=True),
                                    nn.RNN(3, 3, num_layers=2, batch_first=True)]),
        })
        self.lstm_cell = nn.LSTMCell(3, 4)
        self.gru_cell = nn.GRUCell(4, 4, bias=False)
        self.rnn_cell = nn.RNNCell(4, 2, nonlinearity="relu")
        self.head = nn.Linear(3 + 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.lstm(x)
        y = self.body(y)
        y, _ = self.inner["gru"](y)
        for rnn in self.inner["stack"]:
            y, _ = rnn(y)
        h, c = self.lstm_cell(x[:, -1])
        h = self.gru_cell(h)
        h = self.rnn_cell(h)
        return self.head(torch.cat([y[:, -1], h], dim=1))


def _recurrent(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules()
            if any(type(m).__name__ == v for v in SWAPPED.values())}


def test_convert_swaps_in_place_and_keeps_weights():
    import fastcells

    torch.manual_seed(0)
    model = Zoo().double().eval()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    expect = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = dict(_recurrent(model))
    assert len(before) == 7

    returned = fastcells.convert(model)
    assert returned is model
    after = _recurrent(model)
    assert set(after) == set(before)
    for name, new in after.items():
        old = before[name]
        assert type(new) is getattr(fastcells, SWAPPED[type(old)]), name
        assert new is not old
        assert new.training == old.training, name
    assert list(model.state_dict()) == list(state)
    for k, v in model.state_dict().items():
        assert v.dtype == state[k].dtype and torch.equal(v, state[k]), k
    torch.testing.assert_close(model(x), expect, atol=1e-12, rtol=1e-12)
    # Parameters are the model's: an optimizer over model.parameters() trains the new modules.
    names = {n for n, _ in model.named_parameters()}
    assert {"lstm.weight_hr_l1", "inner.gru.weight_hh_l0_reverse", "rnn_cell.bias_ih"} <= names


def test_convert_gradients_and_training_mode_preserved():
    import fastcells

    torch.manual_seed(1)
    ref = Zoo().double()
    model = Zoo().double()
    model.load_state_dict(ref.state_dict())
    ref.eval()
    model.eval()
    fastcells.convert(model)
    x = torch.randn(3, 4, 3, dtype=torch.float64)
    ref(x).sum().backward()
    model(x).sum().backward()
    grads = dict(model.named_parameters())
    for n, p in ref.named_parameters():
        torch.testing.assert_close(grads[n].grad, p.grad, atol=1e-10, rtol=1e-10, msg=n)


def test_convert_top_level_module_and_idempotent():
    import fastcells

    torch.manual_seed(2)
    lstm = nn.LSTM(3, 4)
    x = torch.randn(5, 2, 3)
    expect = lstm(x)[0]
    new = fastcells.convert(lstm)
    assert isinstance(new, fastcells.LSTM)
    torch.testing.assert_close(new(x)[0], expect)
    again = fastcells.convert(new)
    assert again is new
    seq = nn.Sequential(nn.GRU(3, 4))
    assert fastcells.convert(seq) is seq
    assert isinstance(seq[0], fastcells.GRU)
    model = nn.Sequential(nn.Linear(2, 2))
    assert fastcells.convert(model) is model
    assert isinstance(model[0], nn.Linear)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_convert_keeps_dtype(dtype):
    import fastcells

    model = nn.Sequential(nn.GRU(3, 4, dtype=dtype))
    fastcells.convert(model)
    assert all(p.dtype == dtype for p in model.parameters())


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell"])
def test_convert_hooks_and_containers_are_the_new_modules_own(kind):
    """Hooks, buffers and submodules registered on the converted module after
    convert() stay off the old module, and the other way round; hooks that
    were registered before convert() carry over."""
    import fastcells

    torch.manual_seed(3)
    old = getattr(nn, kind)(3, 4, dtype=torch.float64)
    x = torch.randn(2, 3, dtype=torch.float64)
    if kind in ("LSTM", "GRU", "RNN"):
        x = x.unsqueeze(0)
    fired = []
    old.register_forward_hook(lambda m, i, o: fired.append(("before", type(m).__name__)))
    new = fastcells.convert(nn.Sequential(old))[0]
    assert type(new) is getattr(fastcells, kind)

    new.register_forward_hook(lambda m, i, o: fired.append(("new", type(m).__name__)))
    new.register_forward_pre_hook(lambda m, i: fired.append(("new-pre", type(m).__name__)))
    new.register_full_backward_hook(lambda m, gi, go: fired.append(("new-bwd", None)))
    new.register_state_dict_post_hook(lambda m, sd, p, lm: fired.append(("new-sd", None)))
    new.register_buffer("extra", torch.zeros(1))
    old.register_forward_hook(lambda m, i, o: fired.append(("old", type(m).__name__)))

    out_old = old(x)
    old.state_dict()
    assert fired == [("before", kind), ("old", kind)]
    assert "extra" not in old._buffers and "extra" not in old.state_dict()

    fired.clear()
    out_new = new(x)
    first = lambda o: o[0] if isinstance(o, tuple) else o  # noqa: E731
    first(out_new).sum().backward()
    new.state_dict()
    assert ("before", kind) in fired and ("new", kind) in fired and ("new-pre", kind) in fired
    assert ("new-bwd", None) in fired and ("new-sd", None) in fired
    assert ("old", kind) not in fired
    torch.testing.assert_close(first(out_new), first(out_old), atol=1e-12, rtol=1e-12)
    # Parameters are still shared (an optimizer built before convert() keeps training).
    assert all(a is b for a, b in zip(old.parameters(), new.parameters()))


def test_convert_shared_module_stays_shared():
    """A module held twice (two names, two parents, twice in one Sequential)
    becomes one fastcells module, as parameters() and state_dict() see it."""
    import fastcells

    torch.manual_seed(4)
    gru = nn.GRU(4, 4, dtype=torch.float64)
    cell = nn.LSTMCell(4, 4, dtype=torch.float64)

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = gru
            self.b = gru
            self.seq = nn.Sequential(gru, gru)
            self.cell1 = cell
            self.inner = nn.ModuleDict({"cell2": cell})

        def forward(self, x):
            y = self.b(self.a(x)[0])[0]
            for m in self.seq:
                y = m(y)[0]
            h, c = self.cell1(y[-1])
            return self.inner["cell2"](h, (h, c))[0]

    model = Shared()
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    expect = model(x)
    n_params = len(list(model.parameters()))
    fastcells.convert(model)
    assert isinstance(model.a, fastcells.GRU)
    assert model.a is model.b is model.seq[0] is model.seq[1]
    assert isinstance(model.cell1, fastcells.LSTMCell) and model.cell1 is model.inner["cell2"]
    assert len(list(model.parameters())) == n_params
    torch.testing.assert_close(model(x), expect, atol=1e-12, rtol=1e-12)
