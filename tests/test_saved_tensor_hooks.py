"""Backward reads its saved tensors in whatever layout autograd hands them back.

torch.autograd.graph.saved_tensors_hooks may unpack a saved tensor into new
memory with other strides (offloading to the host and back, compression,
quantisation round trips). The op's backward must give the same gradients as
without the hooks, which are torch.nn's.
"""
from __future__ import annotations

import pytest
import torch

from conftest import (MODE_NAMES, assert_close_list, flatten_result, grads_of, make_fastcells_like,
                      make_hx, make_input, make_nn, needs_fastcells, weighted_loss)

pytestmark = needs_fastcells


def _relayout(t: torch.Tensor, how: str) -> torch.Tensor:
    """The values of `t` in fresh memory laid out differently (floating tensors)."""
    if not t.is_floating_point():
        return t
    if how == "reversed" and t.dim() >= 2:
        perm = list(reversed(range(t.dim())))
        return t.permute(*perm).contiguous().permute(*perm)
    if how == "gapped" or t.dim() < 2:  # every other element of a twice larger buffer
        return torch.stack([t, torch.full_like(t, float("nan"))], -1)[..., 0]
    if how == "offset":  # inside a larger buffer, not at its start
        buf = torch.full((t.numel() + 7,), float("nan"), dtype=t.dtype)
        return buf[7:].view(t.shape).copy_(t)
    raise ValueError(how)


def _run(mod, ref, kind, hooks, batch_first, seed=0):
    params = list(mod.parameters())
    leaf, inp = make_input(kind, 6, 3, 4, torch.float64, batch_first=batch_first)
    hx = make_hx(ref, None if kind == "unbatched" else 3, torch.float64)
    hxs = list(hx) if isinstance(hx, tuple) else [hx]
    torch.manual_seed(seed)
    if hooks is None:
        res = mod(inp, hx)
    else:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, hooks):
            res = mod(inp, hx)
    outs = flatten_result(res)
    weighted_loss(outs).backward()
    return [o.detach() for o in outs], grads_of([leaf, *hxs, *params])


@pytest.mark.parametrize("mode", MODE_NAMES)
@pytest.mark.parametrize("how", ["reversed", "gapped", "offset"])
@pytest.mark.parametrize("config", [
    dict(kind="dense", layers=1, bidirectional=False, batch_first=False),
    dict(kind="dense", layers=2, bidirectional=True, batch_first=True),
    dict(kind="packed", layers=2, bidirectional=False, batch_first=False),
    dict(kind="unbatched", layers=3, bidirectional=True, batch_first=False),
], ids=["dense-L1", "bf-L2-bi", "packed-L2", "unbatched-L3-bi"])
def test_relaid_saved_tensors_give_torch_nn_gradients(mode, how, config):
    kw = dict(num_layers=config["layers"], bidirectional=config["bidirectional"],
              batch_first=config["batch_first"])
    if mode == "LSTM" and config["layers"] == 2:
        kw["proj_size"] = 2
    ref = make_nn(mode, 4, 5, **kw)
    mod = make_fastcells_like(ref)
    seen = []

    def unpack(t):
        seen.append(t.dim())
        return _relayout(t, how)

    expect = _run(ref, ref, config["kind"], None, config["batch_first"])
    got = _run(mod, ref, config["kind"], unpack, config["batch_first"])
    assert seen, "the hooks saw no saved tensor"
    assert 1 in seen  # the reserve (1-D) went through the hook too
    assert_close_list(got[0], expect[0], torch.float64)
    assert_close_list(got[1], expect[1], torch.float64)


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_relaid_saved_tensors_with_dropout_masks(mode):
    """Training-mode dropout between layers: the saved masks come back relaid too."""
    ref = make_nn(mode, 4, 5, num_layers=3, dropout=0.4)
    mod = make_fastcells_like(ref).train()
    expect = _run(mod, ref, "dense", None, False, seed=7)
    got = _run(mod, ref, "dense", lambda t: _relayout(t, "reversed"), False, seed=7)
    assert_close_list(got[0], expect[0], torch.float64, atol=0, rtol=0)
    assert_close_list(got[1], expect[1], torch.float64)
