"""fastcells::dropout_masks (csrc/dropout.cpp): the CPU modules' inter-layer
dropout masks, drawn in parallel from a counter-based generator seeded from
torch's generator."""

from __future__ import annotations

import pytest
import torch

from conftest import needs_fastcells

pytestmark = needs_fastcells

SHAPE = (2, 50, 33, 40)


def _masks(p=0.3, seed=1234, dtype=torch.float64, shape=SHAPE):
    return torch.ops.fastcells.dropout_masks(shape, p, torch.tensor(seed), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_values_and_statistics(dtype, p):
    m = _masks(p, dtype=dtype)
    assert m.dtype == dtype and m.shape == SHAPE and m.is_contiguous()
    keep = torch.tensor(1.0 / (1.0 - p), dtype=torch.float64).to(dtype)
    assert ((m == 0) | (m == keep)).all()
    frac = (m == 0).double().mean().item()
    n = m.numel()
    assert abs(frac - p) < 6 * (p * (1 - p) / n) ** 0.5
    # No structure along any axis: rows and feature columns drop independently.
    drop = (m == 0).double()
    for dim in range(drop.dim()):
        per_slice = drop.mean(dim=tuple(d for d in range(drop.dim()) if d != dim))
        spread = 6 * (p * (1 - p) / (n / drop.shape[dim])) ** 0.5
        assert (per_slice - p).abs().max().item() < spread + 1e-3


def test_same_seed_same_mask_whatever_the_threads():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _masks(seed=77)
        torch.set_num_threads(max(2, threads))
        many = _masks(seed=77)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)
    assert not torch.equal(_masks(seed=77), _masks(seed=78))


def test_neighbouring_seeds_are_not_shifted_copies():
    a, b = _masks(seed=10).flatten(), _masks(seed=11).flatten()
    for shift in range(1, 4):
        assert not torch.equal(a[shift:], b[:-shift])
        assert not torch.equal(b[shift:], a[:-shift])


def test_module_masks_follow_torch_manual_seed():
    import fastcells

    m = fastcells.LSTM(3, 8, num_layers=3, dropout=0.25).double().train()
    x = torch.randn(7, 4, 3, dtype=torch.float64)
    torch.manual_seed(5)
    a = m(x)[0]
    torch.manual_seed(5)
    b = m(x)[0]
    c = m(x)[0]  # the generator moved on: another mask
    assert torch.equal(a, b) and not torch.equal(b, c)


@pytest.mark.parametrize("bad,match", [
    (dict(p=1.0), "`p`"), (dict(p=-0.1), "`p`"),
    (dict(seed=torch.tensor([1, 2])), "`seed`"), (dict(seed=torch.tensor(1.0)), "`seed`"),
    (dict(dtype=torch.int32), "`dtype`"), (dict(shape=(2, -1)), "`shape`"),
])
def test_bad_arguments(bad, match):
    args = dict(shape=(2, 3), p=0.5, seed=torch.tensor(1), dtype=torch.float32)
    args.update(bad)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.fastcells.dropout_masks(args["shape"], args["p"], args["seed"], args["dtype"])


def test_opcheck_and_compile():
    torch.library.opcheck(torch.ops.fastcells.dropout_masks.default,
                          ((3, 4, 5), 0.2, torch.tensor(9), torch.float32),
                          test_utils=("test_schema", "test_faketensor"))
    import fastcells

    m = fastcells.GRU(3, 6, num_layers=2, dropout=0.3).train()
    x = torch.randn(5, 2, 3)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    torch.manual_seed(3)
    got = compiled(x)[0]
    torch.manual_seed(3)
    want = m(x)[0]
    torch.testing.assert_close(got, want)
