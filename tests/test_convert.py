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
