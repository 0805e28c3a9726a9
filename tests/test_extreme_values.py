"""Backward at the edge of the float32 range (issue: extreme values).

With cell states near the largest float32 and weights large enough to
saturate the gates, a gate's sigmoid derivative is exactly 0. torch.nn's
gradients stay finite there; a backward that multiplies the unbounded factor
(c_prev, hh_n) first overflows to inf and then gives inf * 0 = NaN. The cases
below are drawn so that the gates saturate; each must give NaN exactly where
torch.nn does, inf where it does, and agree with it elsewhere.
"""
from __future__ import annotations

import pytest
import torch

import fastcells
from conftest import needs_ops

pytestmark = needs_ops


def _grads(module, x, h0, c0):
    x = x.clone().requires_grad_()
    h0 = h0.clone().requires_grad_()
    state = h0
    if c0 is not None:
        c0 = c0.clone().requires_grad_()
        state = (h0, c0)
    module.zero_grad()
    y, _ = module(x, state)
    y.sum().backward()
    leaves = [x, h0] + ([c0] if c0 is not None else [])
    return [t.grad for t in leaves] + [p.grad for p in module.parameters()]


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("state_scale,weight_scale", [(1e38, 1e3), (3e38, 1e20), (1e30, 1e20)])
def test_saturated_gates_with_huge_states_give_torch_nn_gradients(cell, seed, state_scale,
                                                                  weight_scale):
    torch.manual_seed(seed)
    ref = getattr(torch.nn, cell)(4, 8)
    with torch.no_grad():
        for p in ref.parameters():
            p.mul_(weight_scale)
    fused = getattr(fastcells, cell)(4, 8)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(5, 3, 4)
    if cell == "LSTM":
        h0, c0 = torch.randn(1, 3, 8), torch.randn(1, 3, 8) * state_scale
    else:
        h0, c0 = torch.randn(1, 3, 8) * state_scale, None
    for want, got in zip(_grads(ref, x, h0, c0), _grads(fused, x, h0, c0)):
        assert torch.equal(torch.isnan(got), torch.isnan(want))
        assert torch.equal(torch.isinf(got), torch.isinf(want))
        finite = torch.isfinite(want)
        # Saturated gates differ from torch.nn's by float32 rounding of exp
        # near its limits: compare on the scale of each gradient tensor.
        scale = float(want[finite].abs().max()) if finite.any() else 0.0
        torch.testing.assert_close(got[finite], want[finite], rtol=1e-4, atol=1e-4 * scale + 1e-6)
