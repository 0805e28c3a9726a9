"""The CPU weight cache (csrc/weight_cache.h): packed weights are reused across
calls only while the weights are unchanged, whatever way they were changed.

Every case checks the fastcells result against torch.nn in float64 with the
weights as they are at that moment, so a stale pack shows up as a wrong
answer, and checks through the cache statistics that the cache was used.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn

from conftest import needs_fastcells

pytestmark = needs_fastcells

I, H, L, B = 5, 7, 2, 3


def _stats():
    entries, hits, misses, _stores = torch.ops.fastcells.weight_cache_stats()
    return entries, hits, misses


@pytest.fixture(autouse=True)
def _fresh_cache():
    torch.ops.fastcells.clear_weight_cache()
    yield
    torch.ops.fastcells.clear_weight_cache()


def _pair(mode="LSTM", dtype=torch.float64, **kw):
    import fastcells

    torch.manual_seed(0)
    new = getattr(fastcells, mode)(I, H, L, **kw).to(dtype)
    return new


def _reference(new: nn.Module, x, hx=None):
    """torch.nn with the fastcells module's current weights."""
    kw = dict(num_layers=new.num_layers, bias=new.bias, batch_first=new.batch_first,
              bidirectional=new.bidirectional)
    if new.mode == "LSTM":
        kw["proj_size"] = new.proj_size
    ref = getattr(nn, new.mode if new.mode in ("LSTM", "GRU") else "RNN")(new.input_size, new.hidden_size,
                                                                            **kw).to(x.dtype)
    ref.load_state_dict({k: v.detach().clone() for k, v in new.state_dict().items()})
    with torch.no_grad():
        return ref(x, hx)


def _check(new: nn.Module, x, hx=None):
    with torch.no_grad():
        got = new(x, hx)
    want = _reference(new, x, hx)
    torch.testing.assert_close(got[0], want[0], atol=1e-12, rtol=1e-12)
    return got


@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN"])
def test_repeated_calls_hit_and_match(mode):
    new = _pair(mode)
    x = torch.randn(1, B, I, dtype=torch.float64)
    _check(new, x)
    entries, hits, misses = _stats()
    assert (entries, hits, misses) == (L, 0, L)
    for _ in range(3):
        _check(new, x)
    assert _stats() == (L, 3 * L, L)


def test_hit_is_bit_identical_to_a_fresh_pack():
    new = _pair("LSTM", torch.float32)
    x = torch.randn(4, B, I)
    with torch.no_grad():
        first = new(x)[0]
        hit = new(x)[0]
    assert _stats()[1] == L
    torch.ops.fastcells.clear_weight_cache()
    with torch.no_grad():
        fresh = new(x)[0]
    assert torch.equal(first, hit) and torch.equal(hit, fresh)


def test_optimizer_step_is_seen():
    new = _pair("GRU")
    x = torch.randn(6, B, I, dtype=torch.float64)
    opt = torch.optim.Adam(new.parameters(), lr=0.1)
    for _ in range(3):
        before = _check(new, x)[0]
        new(x)[0].sum().backward()
        opt.step()
        opt.zero_grad()
        after = _check(new, x)[0]
        assert not torch.equal(before, after)


def test_load_state_dict_is_seen():
    new = _pair("LSTM")
    other = _pair("LSTM")
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.5)
    x = torch.randn(2, B, I, dtype=torch.float64)
    _check(new, x)
    new.load_state_dict(other.state_dict())
    _check(new, x)


@pytest.mark.parametrize("edit", ["parameter", "data", "numpy", "detach"])
def test_in_place_edits_are_seen(edit):
    new = _pair("LSTM")
    x = torch.randn(2, B, I, dtype=torch.float64)
    _check(new, x)
    w = new.weight_hh_l1
    with torch.no_grad():
        if edit == "parameter":
            w.mul_(1.5)
        elif edit == "data":  # a new version counter: only the byte check sees it
            w.data[0, 0] += 1.0
        elif edit == "numpy":  # no version counter at all
            w.detach().numpy()[1, 2] -= 2.0
        else:
            w.detach().add_(0.25)
    _check(new, x)


def test_new_weights_at_a_reused_address_are_not_confused():
    x = torch.randn(2, B, I, dtype=torch.float64)
    for seed in range(6):
        torch.manual_seed(seed)
        import fastcells

        new = fastcells.GRU(I, H, L).double()
        _check(new, x)
        del new


def test_assigned_parameter_is_seen():
    new = _pair("RNN")
    x = torch.randn(3, B, I, dtype=torch.float64)
    _check(new, x)
    new.weight_ih_l0 = nn.Parameter(torch.randn_like(new.weight_ih_l0))
    _check(new, x)


def test_inference_tensor_weights_are_not_cached():
    import fastcells

    with torch.inference_mode():
        new = fastcells.LSTM(I, H, L).double()
        x = torch.randn(2, B, I, dtype=torch.float64)
        got = new(x)[0]
        want = _reference(new, x)[0]
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    assert _stats() == (0, 0, 0)


def test_bfloat16_weights_are_cached_and_match():
    new = _pair("LSTM", torch.bfloat16)
    x = torch.randn(3, B, I).to(torch.bfloat16)
    with torch.no_grad():
        first = new(x)[0]
        second = new(x)[0]
    assert _stats()[1] == L
    assert torch.equal(first, second)
    with torch.no_grad():
        new.weight_ih_l0.mul_(-1)
        third = new(x)[0]
    torch.ops.fastcells.clear_weight_cache()
    with torch.no_grad():
        fresh = new(x)[0]
    assert torch.equal(third, fresh)


def test_training_gradients_unchanged_by_hits():
    new = _pair("LSTM")
    x = torch.randn(4, B, I, dtype=torch.float64)

    def grads():
        new.zero_grad()
        new(x)[0].sum().backward()
        return [p.grad.clone() for p in new.parameters()]

    torch.ops.fastcells.clear_weight_cache()
    cold = grads()
    warm = grads()
    assert _stats()[1] >= L
    for a, b in zip(cold, warm):
        assert torch.equal(a, b)


def test_concurrent_calls_share_packs_safely():
    new = _pair("GRU", torch.float32)
    x = torch.randn(1, 64, I)
    with torch.no_grad():
        want = new(x)[0]
    errors = []

    def worker():
        try:
            for _ in range(50):
                with torch.no_grad():
                    got = new(x)[0]
                if not torch.equal(got, want):
                    errors.append("mismatch")
        except Exception as e:  # pragma: no cover - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_cache_is_bounded():
    import fastcells

    x = torch.randn(1, 1, I)
    models = [fastcells.RNN(I, H) for _ in range(80)]
    with torch.no_grad():
        for m in models:
            m(x)
    assert _stats()[0] <= 64


def test_deepcopy_gets_its_own_entry():
    new = _pair("LSTM")
    x = torch.randn(2, B, I, dtype=torch.float64)
    _check(new, x)
    twin = copy.deepcopy(new)
    with torch.no_grad():
        twin.weight_hh_l0.add_(1.0)
    _check(twin, x)
    _check(new, x)


def test_entries_of_freed_weights_are_dropped():
    import gc

    import fastcells

    x = torch.randn(1, 1, I)
    first = fastcells.LSTM(I, H, L)
    with torch.no_grad():
        first(x)
    assert _stats()[0] == L
    del first
    gc.collect()
    second = fastcells.GRU(I, H, L)
    with torch.no_grad():
        second(x)
    assert _stats()[0] == L  # only the live model's layers


def test_training_stops_storing_and_decoding_gets_the_cache_back():
    """Weights that change at every call are stored once, then left alone (no
    copy per call); once they stop changing the cache serves them again."""
    new = _pair("GRU")
    x = torch.randn(5, B, I, dtype=torch.float64)
    opt = torch.optim.SGD(new.parameters(), lr=0.01)
    for _ in range(10):
        out = new(x)[0]
        out.sum().backward()
        opt.step()
        opt.zero_grad()
    stores = torch.ops.fastcells.weight_cache_stats()[3]
    assert stores == L  # the first call's entries, never hit, became tombstones
    _check(new, x)  # still right while not stored
    for _ in range(2 * 16):  # fixed weights: stored again at a retry, then hit
        _check(new, x)
    entries, hits, misses, stores = torch.ops.fastcells.weight_cache_stats()
    assert stores == 2 * L and hits > 0
