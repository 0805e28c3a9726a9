"""The seed's airline forecaster trained with fastcells and with torch.nn.

Model: 2-layer LSTM (input 3 = look-back, hidden 6) + Linear(6, 1), Adam lr 0.1,
MSE, full batch: the 112 training windows are fed as one sequence of T = 112
steps with batch 1, as in the seed tutorial. 200 epochs in float64 from the
same initial weights must give the same loss curve to 1e-8. Also a GRU version,
for 50 epochs by default (torch.nn's GRU is the slow side of this test) and 200
with FASTCELLS_SLOW=1.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import SLOW, needs_fastcells

pytestmark = needs_fastcells

LOOK_BACK, HIDDEN, EPOCHS = 3, 6, 200


def airline_windows(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max scaled passengers as (T, 1, 3) windows and (T, 1, 1) next values,
    first 80% only (the seed's training split)."""
    from fastcells.datasets import load_airline

    y = torch.tensor(load_airline()["passengers"].to_numpy(), dtype=dtype)
    y = (y - y.min()) / (y.max() - y.min())
    n = len(y) - LOOK_BACK
    x = torch.stack([y[i:i + LOOK_BACK] for i in range(n)]).reshape(n, 1, LOOK_BACK)
    target = y[LOOK_BACK:].reshape(n, 1, 1)
    n_train = int(n * 0.8)
    return x[:n_train], target[:n_train]


class Forecaster(nn.Module):
    def __init__(self, rnn: nn.Module):
        super().__init__()
        self.rnn = rnn
        self.output = nn.Linear(HIDDEN, 1, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        T, B, C = out.shape
        return self.output(out.reshape(-1, C)).reshape(T, B, -1)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = EPOCHS) -> list[float]:
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    loss_fn = nn.MSELoss()
    losses = []
    for _ in range(epochs):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_airline_loss_curve_matches_torch_nn(cell):
    import fastcells

    x, y = airline_windows()
    assert x.shape == (112, 1, LOOK_BACK)
    torch.manual_seed(0)
    ref = Forecaster(getattr(nn, cell)(LOOK_BACK, HIDDEN, num_layers=2, dtype=torch.float64))
    fast = Forecaster(getattr(fastcells, cell)(LOOK_BACK, HIDDEN, num_layers=2,
                                               dtype=torch.float64))
    fast.load_state_dict(ref.state_dict())
    epochs = EPOCHS if cell == "LSTM" or SLOW else 50
    ref_losses = train(ref, x, y, epochs)
    fast_losses = train(fast, x, y, epochs)
    assert len(fast_losses) == epochs
    assert ref_losses[-1] < 0.5 * ref_losses[0]  # the model does learn
    diff = max(abs(a - b) for a, b in zip(fast_losses, ref_losses))
    assert diff <= 1e-8, f"loss curves differ by {diff:.3g}"
    # The trained weights agree too, more loosely: 200 Adam steps at lr 0.1 amplify
    # round-off differences (m / sqrt(v) of a near-zero gradient), the more so for GRU.
    for (n, a), (_, b) in zip(fast.state_dict().items(), ref.state_dict().items()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=f"{n} after training")
