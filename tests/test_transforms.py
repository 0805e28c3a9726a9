"""Second derivatives, forward-mode AD and torch.func transforms.

The fused op differentiates once, with its hand-derived backward; these run
through the pure-PyTorch reference (fastcells/_transforms.py). Each is checked
against torch.nn in float64 where torch.nn supports it (second derivatives,
forward AD, torch.func.grad), and against a loop of single-model calls where
it does not (vmap over an ensemble; torch.nn has no batching rule for its
RNN ops). First derivatives must keep the fused op.
"""
from __future__ import annotations

import pytest
import torch

from conftest import HAVE_FASTCELLS, MODE_NAMES, assert_close_list, make_fastcells_like, make_nn

pytestmark = [
    pytest.mark.skipif(not HAVE_FASTCELLS, reason="fastcells extension not built"),
    # The reference path's warning, checked once below.
    pytest.mark.filterwarnings("ignore:fastcells. second derivatives:UserWarning"),
]

import fastcells  # noqa: E402
import fastcells._transforms as transforms  # noqa: E402

T, B, I, H = 4, 3, 3, 5

# (mode, constructor kwargs, packed input, initial state given)
CASES = [
    ("LSTM", dict(num_layers=2), False, False),
    ("GRU", dict(num_layers=2, bidirectional=True), False, True),
    ("RNN_TANH", dict(), True, True),
    ("RNN_RELU", dict(num_layers=2), False, False),
    ("LSTM", dict(proj_size=2, bidirectional=True), True, True),
]


def _id(case):
    mode, kw, packed, state = case
    return "-".join([mode, *(f"{k}{v}" for k, v in kw.items()), "packed" * packed,
                     "hx" * state]).strip("-")


def _pair(mode, kw):
    ref = make_nn(mode, I, H, **kw)
    return ref, make_fastcells_like(ref)


def _inputs(ref, packed, state, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, I, generator=g, dtype=torch.float64)
    hx = None
    if state:
        D = 2 if ref.bidirectional else 1
        P = getattr(ref, "proj_size", 0) or H
        h = torch.randn(ref.num_layers * D, B, P, generator=g, dtype=torch.float64)
        hx = (h, torch.randn(ref.num_layers * D, B, H, generator=g, dtype=torch.float64)) \
            if isinstance(ref, torch.nn.LSTM) else h
    return x, hx


def _call(m, x, hx, packed):
    """Output (padded back for packed input) and final states of m."""
    if packed:
        lengths = torch.tensor([T, T - 1, 2][:B])
        seq = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
        out, state = m(seq, hx)
        out = torch.nn.utils.rnn.pad_packed_sequence(out)[0]
    else:
        out, state = m(x, hx)
    return [out] + (list(state) if isinstance(state, tuple) else [state])


def _penalty_grads(m, x, hx, packed):
    """A gradient penalty: d/d(params, x, hx) of |dL/dx|^2 + |dL/dh0|^2."""
    xi = x.clone().requires_grad_()
    states = [] if hx is None else [t.clone().requires_grad_() for t in
                                    (hx if isinstance(hx, tuple) else (hx,))]
    h = None if hx is None else (tuple(states) if isinstance(hx, tuple) else states[0])
    outs = _call(m, xi, h, packed)
    loss = sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)).pow(2).sum()
               for o in outs)
    wrt = [xi] + states
    firsts = torch.autograd.grad(loss, wrt, create_graph=True)
    penalty = sum(f.pow(2).sum() for f in firsts)
    leaves = list(m.parameters()) + wrt
    return list(firsts) + list(torch.autograd.grad(penalty, leaves))


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_second_derivatives_match_torch_nn(case):
    """Gradient penalty: first gradients under create_graph=True, then their
    gradients with respect to every parameter, the input and the states."""
    mode, kw, packed, state = case
    ref, fc = _pair(mode, kw)
    x, hx = _inputs(ref, packed, state)
    assert_close_list(_penalty_grads(fc, x, hx, packed), _penalty_grads(ref, x, hx, packed),
                      torch.float64)


def test_gradgradcheck():
    """Second derivatives against finite differences of the first (float64),
    with respect to the input and one recurrent weight of a 2-layer LSTM."""
    from torch.func import functional_call

    _, fc = _pair("LSTM", dict(num_layers=2))
    x = torch.randn(3, 2, I, dtype=torch.float64, requires_grad=True)
    w = fc.weight_hh_l1.detach().clone().requires_grad_()
    assert torch.autograd.gradgradcheck(
        lambda x, w: functional_call(fc, {"weight_hh_l1": w}, (x,))[0], (x, w))


def _dual_states(hx, tangent_seed):
    """hx (a tensor or an (h, c) tuple) as duals with random tangents."""
    import torch.autograd.forward_ad as fwAD

    if hx is None:
        return None
    g = torch.Generator().manual_seed(tangent_seed)
    duals = [fwAD.make_dual(t, torch.randn(t.shape, generator=g, dtype=t.dtype))
             for t in (hx if isinstance(hx, tuple) else (hx,))]
    return tuple(duals) if isinstance(hx, tuple) else duals[0]


@pytest.mark.parametrize("case", [c for c in CASES if not c[2]], ids=_id)
def test_forward_ad_matches_torch_nn(case):
    """Tangents of the output and final states for tangents on the input,
    the initial states and one weight (torch.autograd.forward_ad)."""
    import torch.autograd.forward_ad as fwAD
    from torch.func import functional_call

    mode, kw, _, state = case
    ref, fc = _pair(mode, kw)
    x, hx = _inputs(ref, False, state)
    g = torch.Generator().manual_seed(5)
    tx = torch.randn(x.shape, generator=g, dtype=torch.float64)
    tw = torch.randn(ref.weight_hh_l0.shape, generator=g, dtype=torch.float64)
    results = []
    for m in (ref, fc):
        with fwAD.dual_level():
            w = fwAD.make_dual(m.weight_hh_l0.detach(), tw)
            out, state_n = functional_call(m, {"weight_hh_l0": w},
                                           (fwAD.make_dual(x, tx), _dual_states(hx, 6)))
            outs = [out] + (list(state_n) if isinstance(state_n, tuple) else [state_n])
            results.append([fwAD.unpack_dual(o).tangent for o in outs])
    assert_close_list(results[1], results[0], torch.float64)


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_torch_func_grad_matches_torch_nn(mode):
    """torch.func.grad of a loss over functional_call: the weights' gradients."""
    from torch.func import functional_call, grad

    ref, fc = _pair(mode, dict(num_layers=2))
    x, _ = _inputs(ref, False, False)
    results = []
    for m in (ref, fc):
        params = {k: v.detach() for k, v in m.named_parameters()}
        g = grad(lambda p: functional_call(m, p, (x,))[0].pow(2).sum())(params)
        results.append([g[k] for k in params])
    assert_close_list(results[1], results[0], torch.float64)


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_vmap_over_an_ensemble(mode):
    """vmap of functional_call over stacked parameters of 3 models (which
    torch.nn cannot batch): the same as calling each model."""
    from torch.func import functional_call, stack_module_state, vmap

    models = [make_fastcells_like(make_nn(mode, I, H, seed=s, num_layers=2)) for s in range(3)]
    params, buffers = stack_module_state(models)
    x, _ = _inputs(models[0], False, False)
    out = vmap(lambda p, b: functional_call(models[0], (p, b), (x,))[0])(params, buffers)
    expected = torch.stack([m(x)[0] for m in models])
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)


def test_jacrev_matches_a_loop_of_torch_nn_gradients():
    """jacrev (vmap over vjp) against torch.autograd.functional.jacobian of
    torch.nn, which loops over the output elements instead."""
    from torch.func import jacrev

    ref, fc = _pair("GRU", dict())
    x = torch.randn(3, 2, I, dtype=torch.float64)
    got = jacrev(lambda x: fc(x)[1])(x)
    expected = torch.autograd.functional.jacobian(lambda x: ref(x)[1], x)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)


def test_the_reference_path_is_visible_and_first_derivatives_stay_fused(monkeypatch):
    """The reference path warns once per process, for a transform and for
    create_graph=True; ordinary training never runs it."""
    from torch.func import functional_call, grad

    ref, fc = _pair("LSTM", dict())
    x, _ = _inputs(ref, False, False)
    params = {k: v.detach() for k, v in fc.named_parameters()}
    for run in (lambda: grad(lambda p: functional_call(fc, p, (x,))[0].sum())(params),
                lambda: torch.autograd.grad(fc(x)[0].sum(), list(fc.parameters()),
                                            create_graph=True)):
        monkeypatch.setattr(transforms, "_warned", False)
        with pytest.warns(UserWarning, match="pure-PyTorch reference"):
            run()

    def refuse(*args, **kwargs):
        raise AssertionError("the reference ran")

    monkeypatch.setattr(transforms, "reference_rnn", refuse)
    monkeypatch.setattr(transforms, "rnn_reference", refuse)
    fc(x)[0].sum().backward()
    assert fc.weight_hh_l0.grad is not None


@pytest.mark.parametrize("name", ["LSTMCell", "GRUCell", "RNNCell"])
def test_torch_func_grad_of_a_cell_matches_torch_nn(name):
    """The cells take the same path: torch.func.grad over one step."""
    from torch.func import functional_call, grad

    torch.manual_seed(0)
    ref = getattr(torch.nn, name)(I, H, dtype=torch.float64)
    fc = getattr(fastcells, name)(I, H, dtype=torch.float64)
    fc.load_state_dict(ref.state_dict())
    x = torch.randn(B, I, dtype=torch.float64)
    results = []
    for m in (ref, fc):
        params = {k: v.detach() for k, v in m.named_parameters()}
        out = grad(lambda p: functional_call(m, p, (x,))[0].pow(2).sum())(params)
        results.append([out[k] for k in params])
    assert_close_list(results[1], results[0], torch.float64)
