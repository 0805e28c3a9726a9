"""Weights that are recomputed or reassigned between calls, as torch.nn allows.

torch.nn's RNN modules re-read their weights in every forward, so these all
work there and must give the same results with fastcells (float64, outputs,
final states and every gradient that reaches a leaf):

* parametrizations (torch.nn.utils.parametrize, parametrizations.weight_norm),
  whose weights are computed on each attribute access;
* the hook-based torch.nn.utils.weight_norm, which reassigns the weight in a
  forward pre-hook;
* weight drop (AWD-LSTM style): the Parameter is replaced by a plain tensor
  computed from it before each forward; pruning (torch.nn.utils.prune) does the
  same in a pre-hook;
* torch.func.functional_call, which puts tensors straight into _parameters.

``fastcells.convert`` leaves a parametrized torch.nn module alone, with a
warning (its class is a parametrized subclass that cannot be swapped).
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import fastcells
from conftest import HAVE_FASTCELLS, assert_close_list, flatten_result, weighted_loss

pytestmark = pytest.mark.skipif(not HAVE_FASTCELLS, reason="fastcells extension not built")

I, H, T, B = 3, 5, 6, 2


class Scale(nn.Module):
    def forward(self, w):
        return w * 0.5 + 0.01


def _pair(cls_name: str, **kw):
    torch.manual_seed(0)
    ref = getattr(nn, cls_name)(I, H, **kw).double()
    fc = getattr(fastcells, cls_name)(I, H, **kw).double()
    fc.load_state_dict(ref.state_dict())
    return ref, fc


def _run(m: nn.Module, x: torch.Tensor):
    """Outputs and the gradients of every leaf parameter after a fixed loss."""
    flat = flatten_result(m(x))
    return flat, list(torch.autograd.grad(weighted_loss(flat), list(m.parameters())))


def _compare(ref: nn.Module, fc: nn.Module):
    x = torch.randn(T, B, I, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out_r, g_r = _run(ref, x)
    out_f, g_f = _run(fc, x)
    assert_close_list(out_f, out_r, torch.float64)
    assert_close_list(g_f, g_r, torch.float64)


@pytest.mark.parametrize("cls_name", ["LSTM", "GRU", "RNN"])
def test_custom_parametrization(cls_name):
    ref, fc = _pair(cls_name, num_layers=2, bidirectional=True)
    for m in (ref, fc):
        parametrize.register_parametrization(m, "weight_hh_l1_reverse", Scale())
        parametrize.register_parametrization(m, "weight_ih_l0", Scale())
    _compare(ref, fc)


def test_parametrized_weight_norm_follows_updates():
    """parametrizations.weight_norm: results follow an update of the original
    (magnitude / direction) tensors, as torch.nn's do."""
    from torch.nn.utils.parametrizations import weight_norm

    ref, fc = _pair("GRU", num_layers=2)
    for m in (ref, fc):
        weight_norm(m, "weight_ih_l1")
    _compare(ref, fc)
    for m in (ref, fc):
        with torch.no_grad():
            m.parametrizations.weight_ih_l1.original0.mul_(3.0)
    _compare(ref, fc)


def test_hook_weight_norm():
    ref, fc = _pair("LSTM", proj_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.nn.utils.weight_norm is deprecated
        for m in (ref, fc):
            torch.nn.utils.weight_norm(m, "weight_hh_l0")
    for m in (ref, fc):
        with torch.no_grad():
            m.weight_hh_l0_g.mul_(0.5)
    _compare(ref, fc)


class WeightDrop(nn.Module):
    """AWD-LSTM style: weight_hh_l0 is recomputed from a raw Parameter before
    every forward (deterministic mask here, so both sides see the same)."""

    def __init__(self, rnn: nn.Module):
        super().__init__()
        self.rnn = rnn
        raw = rnn.weight_hh_l0
        del rnn._parameters["weight_hh_l0"]
        self.raw = nn.Parameter(raw.detach().clone())
        g = torch.Generator().manual_seed(3)
        self.register_buffer("mask", (torch.rand(raw.shape, generator=g) > 0.3).double() / 0.7)

    def forward(self, x):
        setattr(self.rnn, "weight_hh_l0", self.raw * self.mask)
        return self.rnn(x)


def test_weight_drop_reassignment():
    ref, fc = _pair("LSTM")
    _compare(WeightDrop(ref), WeightDrop(fc))


def test_convert_leaves_parametrized_modules_with_a_warning():
    model = nn.Sequential(nn.LSTM(I, H), nn.GRU(H, H))
    parametrize.register_parametrization(model[0], "weight_hh_l0", Scale())
    with pytest.warns(UserWarning, match="parametriz"):
        fastcells.convert(model)
    assert parametrize.is_parametrized(model[0]) and not isinstance(model[0], fastcells.LSTM)
    assert isinstance(model[1], fastcells.GRU)


def test_parametrized_module_compiles_fullgraph():
    """A parametrized fastcells module still compiles to one graph, and the
    gradient reaches the parametrization's original tensors."""
    from torch.nn.utils.parametrizations import weight_norm

    ref, fc = _pair("LSTM", num_layers=2)
    for m in (ref, fc):
        weight_norm(m, "weight_hh_l0")
    x = torch.randn(T, B, I, dtype=torch.float64)
    compiled = torch.compile(fc, fullgraph=True, backend="aot_eager")
    out = compiled(x)[0]
    expect = ref(x)[0]
    assert_close_list([out], [expect], torch.float64)
    out.sum().backward()
    expect.sum().backward()
    assert_close_list([fc.parametrizations.weight_hh_l0.original1.grad],
                      [ref.parametrizations.weight_hh_l0.original1.grad], torch.float64)


@pytest.mark.parametrize("cls_name", ["LSTM", "GRU"])
def test_functional_call_uses_the_given_tensors(cls_name):
    """torch.func.functional_call puts tensors straight into _parameters: the
    call must use them (outputs and gradients w.r.t. them as torch.nn's), and the
    module's own weights again afterwards."""
    from torch.func import functional_call

    ref, fc = _pair(cls_name, num_layers=2, bidirectional=True)
    x = torch.randn(T, B, I, dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    given = {k: (v.detach() * 1.5 + 0.01 * torch.randn(v.shape, generator=g, dtype=v.dtype))
             .requires_grad_() for k, v in ref.named_parameters()}
    results = []
    for m in (ref, fc):
        out = functional_call(m, given, (x,))[0]
        grads = torch.autograd.grad(out.sum(), list(given.values()))
        results.append(([out], list(grads)))
    assert_close_list(results[1][0], results[0][0], torch.float64)
    assert_close_list(results[1][1], results[0][1], torch.float64)
    assert_close_list([fc(x)[0]], [ref(x)[0]], torch.float64)


def test_pruning():
    """torch.nn.utils.prune replaces the weight with a masked tensor in a
    forward pre-hook."""
    import torch.nn.utils.prune as prune

    ref, fc = _pair("LSTM", num_layers=2)
    for m in (ref, fc):
        prune.l1_unstructured(m, "weight_hh_l1", amount=0.5)
    _compare(ref, fc)


def test_convert_warns_about_cell_subclasses_and_skips_fastcells_modules():
    """A user subclass of a torch.nn Cell class is left alone with a warning
    (subclasses of the sequence classes are fused: test_convert_subclass.py);
    modules that already are fastcells (whose cells subclass torch.nn's) are
    skipped without one."""

    class MyGRUCell(nn.GRUCell):
        pass

    model = nn.Sequential(MyGRUCell(I, H), nn.LSTM(H, H), fastcells.GRUCell(H, H))
    with pytest.warns(UserWarning, match="MyGRUCell"):
        fastcells.convert(model)
    assert type(model[0]) is MyGRUCell and isinstance(model[1], fastcells.LSTM)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastcells.convert(nn.Sequential(fastcells.LSTMCell(I, H), fastcells.GRU(I, H)))
