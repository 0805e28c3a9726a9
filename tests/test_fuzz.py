"""Property-based fuzzing with hypothesis.

Each example draws a random recurrent configuration (cell type, layers 1-3,
directions, sizes down to 1, bias, batch_first, proj_size, dense / unbatched /
packed with random unsorted lengths, float64 / float32, hx given or not,
train / eval, dropout) and checks outputs, final states and the gradients of
the input, the initial state and every parameter:

* module level: ``fastcells.X`` against ``torch.nn.X`` loaded with the same
  state_dict (train mode uses dropout 0 there, so the two are deterministic);
* op level: ``fastcells.functional.rnn`` against the pure-PyTorch
  ``fastcells.reference.rnn_reference``, with random explicit dropout masks
  between layers (the masks make training-mode dropout deterministic); this
  one also draws the cells torch.nn lacks (the reset-before GRU) and, for
  the LSTM, return_cell_states, zoneout weights and recurrent dropout masks.

Examples are derandomized (CI reproducibility) and there is no per-example
deadline. ``FASTCELLS_FUZZ_EXAMPLES`` sets the number of examples per test
(default 200 for the sequence modules; the cell test runs a quarter of it).
"""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

fastcells = pytest.importorskip("fastcells")
if not hasattr(fastcells, "LSTM"):
    pytest.skip("fastcells extension not built", allow_module_level=True)
try:
    from fastcells.reference import rnn_reference
except ImportError:  # pragma: no cover - the reference is part of the package
    rnn_reference = None
from fastcells._cells import CELLS, cell_named, cell_of_module  # noqa: E402

from conftest import with_layer_norm  # noqa: E402

EXAMPLES = int(os.environ.get("FASTCELLS_FUZZ_EXAMPLES", "200"))

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
CELL_FUZZ = settings(FUZZ, max_examples=max(10, EXAMPLES // 4))

MODE = {c.name: c.code for c in CELLS}
# The cells torch.nn has (the reference-only fuzz also draws the others).
TORCH_NN_MODES = [c.name for c in CELLS if c.in_torch_nn]
# torch.nn cell class, "-nonlinearity" where it takes one: "LSTMCell", ..., "RNNCell-relu"
CELL_KINDS = [c.nn_class + "Cell" + (f"-{c.nonlinearity}" if c.nonlinearity else "")
              for c in CELLS if c.in_torch_nn]
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-4, atol=2e-5),
}


@st.composite
def rnn_configs(draw, kinds=tuple(MODE)):
    kind = draw(st.sampled_from(list(kinds)))
    hidden = draw(st.integers(1, 6))
    proj = 0
    if cell_named(kind).proj and hidden > 1 and draw(st.booleans()):
        proj = draw(st.integers(1, hidden - 1))
    layers = draw(st.integers(1, 3))
    steps = draw(st.integers(1, 6))
    batch = draw(st.integers(1, 4))
    layout = draw(st.sampled_from(["dense", "unbatched", "packed"]))
    lengths = None
    if layout == "packed":
        lengths = draw(st.lists(st.integers(1, steps), min_size=batch, max_size=batch))
    train = draw(st.booleans())
    # Dropout is random in training mode; module-level comparisons use it only
    # in eval mode, where torch.nn and fastcells both ignore it.
    dropout = 0.0 if (train or layers == 1) else draw(st.sampled_from([0.0, 0.4]))
    return dict(
        kind=kind,
        input_size=draw(st.integers(1, 5)),
        hidden=hidden,
        proj=proj,
        layers=layers,
        bidirectional=draw(st.booleans()),
        bias=draw(st.booleans()),
        batch_first=draw(st.booleans()),
        steps=steps,
        batch=batch,
        layout=layout,
        lengths=lengths,
        dtype=draw(st.sampled_from([torch.float64, torch.float32])),
        give_hx=draw(st.booleans()),
        train=train,
        dropout=dropout,
        masks=layers > 1 and draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _make_pair(cfg, with_fastcells=True):
    """(torch.nn module, fastcells module or None) with identical weights."""
    c = cell_named(cfg["kind"])
    kwargs = dict(num_layers=cfg["layers"], bias=cfg["bias"], batch_first=cfg["batch_first"],
                  dropout=cfg["dropout"], bidirectional=cfg["bidirectional"])
    if c.proj:
        kwargs["proj_size"] = cfg["proj"]
    if c.nonlinearity:
        kwargs["nonlinearity"] = c.nonlinearity
    torch.manual_seed(cfg["seed"])
    ref = getattr(nn, c.nn_class)(cfg["input_size"], cfg["hidden"], **kwargs).to(cfg["dtype"])
    ref.train(cfg["train"])
    if not with_fastcells:
        return ref, None
    fc = getattr(fastcells, c.nn_class)(cfg["input_size"], cfg["hidden"], **kwargs).to(cfg["dtype"])
    fc.load_state_dict(ref.state_dict())
    fc.train(cfg["train"])
    return ref, fc


def _flatten(result):
    """Module output -> list of tensors (PackedSequence data, h, c)."""
    out, state = result
    tensors = [out.data if isinstance(out, nn.utils.rnn.PackedSequence) else out]
    tensors += list(state) if isinstance(state, tuple) else [state]
    return tensors


def _assert_close_list(actual, expected, tol, what):
    assert len(actual) == len(expected), what
    for k, (a, e) in enumerate(zip(actual, expected)):
        if e is None:
            assert a is None, f"{what}[{k}]: expected no gradient"
            continue
        assert a is not None, f"{what}[{k}]: missing gradient"
        torch.testing.assert_close(a, e, **tol, msg=lambda m: f"{what}[{k}]: {m}")


def _cotangents(tensors, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(t.shape, dtype=t.dtype, generator=g) for t in tensors]


@FUZZ
@given(cfg=rnn_configs(TORCH_NN_MODES))
def test_module_matches_torch_nn(cfg):
    ref, fc = _make_pair(cfg)
    dtype, L, B, T = cfg["dtype"], cfg["layers"], cfg["batch"], cfg["steps"]
    D = 2 if cfg["bidirectional"] else 1
    P = cfg["proj"] or cfg["hidden"]
    g = torch.Generator().manual_seed(cfg["seed"] + 1)

    def rand(*shape):
        return torch.randn(*shape, dtype=dtype, generator=g)

    unbatched = cfg["layout"] == "unbatched"
    if unbatched:
        x = rand(T, cfg["input_size"])
    elif cfg["batch_first"]:
        x = rand(B, T, cfg["input_size"])
    else:
        x = rand(T, B, cfg["input_size"])
    x.requires_grad_(True)
    leaves = [x]

    hx = None
    if cfg["give_hx"]:
        hshape = (L * D, P) if unbatched else (L * D, B, P)
        h0 = rand(*hshape).requires_grad_(True)
        leaves.append(h0)
        hx = h0
        if cell_named(cfg["kind"]).has_cell_state:
            cshape = (L * D, cfg["hidden"]) if unbatched else (L * D, B, cfg["hidden"])
            c0 = rand(*cshape).requires_grad_(True)
            leaves.append(c0)
            hx = (h0, c0)

    def run(module):
        inp = x
        if cfg["layout"] == "packed":
            inp = nn.utils.rnn.pack_padded_sequence(
                x, torch.tensor(cfg["lengths"]), batch_first=cfg["batch_first"],
                enforce_sorted=False)
        result = module(inp, hx)
        if cfg["layout"] == "packed":
            out = result[0]
            ref_packed = inp
            assert torch.equal(out.batch_sizes, ref_packed.batch_sizes)
            assert torch.equal(out.sorted_indices, ref_packed.sorted_indices)
            assert torch.equal(out.unsorted_indices, ref_packed.unsorted_indices)
        return _flatten(result)

    expected = run(ref)
    actual = run(fc)
    tol = TOL[dtype]
    assert [t.shape for t in actual] == [t.shape for t in expected]
    assert all(t.dtype == dtype for t in actual)
    _assert_close_list(actual, expected, tol, "outputs")

    cot = _cotangents(expected, cfg["seed"] + 2)
    ref_params = list(ref.parameters())
    fc_params = list(fc.parameters())
    ge = torch.autograd.grad(expected, leaves + ref_params, cot, allow_unused=True)
    ga = torch.autograd.grad(actual, leaves + fc_params, cot, allow_unused=True)
    _assert_close_list(ga, ge, tol, "grads")


@FUZZ
@given(cfg=rnn_configs())
def test_functional_matches_reference(cfg):
    if rnn_reference is None:
        pytest.skip("fastcells.reference.rnn_reference is not available")
    from fastcells.functional import rnn

    if cell_named(cfg["kind"]).layer_norm:
        # LN over a few near-equal values (G*H = 4 at hidden 1) amplifies float32
        # rounding by 1 / sqrt(var + eps) on both sides alike; the LayerNorm cells
        # are compared in float64 here and their float32 error against float64 in
        # tests/test_layer_norm.py.
        cfg = dict(cfg, dtype=torch.float64)
    ref, _ = _make_pair(cfg, with_fastcells=False)
    dtype, L, B, T = cfg["dtype"], cfg["layers"], cfg["batch"], cfg["steps"]
    D = 2 if cfg["bidirectional"] else 1
    P = cfg["proj"] or cfg["hidden"]
    g = torch.Generator().manual_seed(cfg["seed"] + 3)
    c = cell_named(cfg["kind"])

    per = 2 + 2 * cfg["bias"] + (cfg["proj"] > 0)  # (the LayerNorm cells' parameters follow)
    weights = [w.detach().clone().requires_grad_(True)
               for w in with_layer_norm(c, list(ref._flat_weights), cfg["hidden"], g, per)]
    x = torch.randn(T, B, cfg["input_size"], dtype=dtype, generator=g)
    batch_sizes = None
    if cfg["layout"] == "packed":
        packed = nn.utils.rnn.pack_padded_sequence(x, torch.tensor(cfg["lengths"]),
                                                   enforce_sorted=False)
        x = packed.data
        batch_sizes = [int(b) for b in packed.batch_sizes]
    x.requires_grad_(True)
    hx = torch.randn(L * D, B, P, dtype=dtype, generator=g)
    if not cfg["give_hx"]:
        hx = torch.zeros_like(hx)
    hx.requires_grad_(True)
    cx = None
    if cell_named(cfg["kind"]).has_cell_state:
        cx = torch.randn(L * D, B, cfg["hidden"], dtype=dtype, generator=g).requires_grad_(True)
    masks = None
    if cfg["masks"]:
        rows = (x.shape[0],) if batch_sizes is not None else (T, B)
        keep = torch.rand((L - 1, *rows, D * P), generator=g) > 0.4
        masks = keep.to(dtype) / 0.6

    args = (batch_sizes, MODE[cfg["kind"]], L, cfg["bidirectional"], cfg["bias"],
            cfg["proj"], masks)
    # Every other LSTM example also returns (and differentiates) the cell states;
    # every third example has zoneout weights (0/1 as in training, or a rate;
    # not LSTM_LN, which has no zoneout).
    cell_states = c.has_cell_state and cfg["seed"] % 2 == 0
    zone = None
    if cfg["seed"] % 3 == 0 and not (c.layer_norm and c.has_cell_state):
        rows = (x.shape[0],) if batch_sizes is not None else (T, B)
        width = P + (cfg["hidden"] if cell_named(cfg["kind"]).has_cell_state else 0)
        zone = torch.rand((L * D, *rows, width), generator=g, dtype=dtype)
        zone = (zone < 0.3).to(dtype) if cfg["seed"] % 2 else zone
    # Every fourth example has recurrent dropout masks.
    rmasks = None
    if cfg["seed"] % 4 == 1:
        rmasks = (torch.rand((L * D, B, P), generator=g) > 0.3).to(dtype) / 0.7
    expected = rnn_reference(x, weights, hx, cx, *args, return_cell_states=cell_states,
                             zoneout=zone, recurrent_masks=rmasks)
    actual = rnn(x, weights, hx, cx, *args, return_cell_states=cell_states, zoneout=zone,
                 recurrent_masks=rmasks)

    def present(ts):
        return [t for t in ts if t is not None and t.numel() > 0]

    expected, actual = present(expected), present(actual)
    tol = TOL[dtype]
    _assert_close_list(actual, expected, tol, "outputs")
    leaves = [x, hx] + ([cx] if cx is not None else []) + weights
    cot = _cotangents(expected, cfg["seed"] + 4)
    ge = torch.autograd.grad(expected, leaves, cot, allow_unused=True)
    ga = torch.autograd.grad(actual, leaves, cot, allow_unused=True)
    _assert_close_list(ga, ge, tol, "grads")


@CELL_FUZZ
@given(
    kind=st.sampled_from(CELL_KINDS),
    input_size=st.integers(1, 5),
    hidden=st.integers(1, 6),
    batch=st.integers(0, 4),  # 0: unbatched
    bias=st.booleans(),
    give_hx=st.booleans(),
    dtype=st.sampled_from([torch.float64, torch.float32]),
    seed=st.integers(0, 2**31 - 1),
)
def test_cells_match_torch_nn(kind, input_size, hidden, batch, bias, give_hx, dtype, seed):
    name, _, nonlin = kind.partition("-")
    kwargs = dict(bias=bias)
    if nonlin:
        kwargs["nonlinearity"] = nonlin
    torch.manual_seed(seed)
    ref = getattr(nn, name)(input_size, hidden, **kwargs).to(dtype)
    fc = getattr(fastcells, name)(input_size, hidden, **kwargs).to(dtype)
    fc.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(seed + 1)
    lead = () if batch == 0 else (batch,)
    x = torch.randn(*lead, input_size, dtype=dtype, generator=g).requires_grad_(True)
    leaves = [x]
    hx = None
    if give_hx:
        h0 = torch.randn(*lead, hidden, dtype=dtype, generator=g).requires_grad_(True)
        leaves.append(h0)
        hx = h0
        if cell_of_module(name, nonlin or None).has_cell_state:
            c0 = torch.randn(*lead, hidden, dtype=dtype, generator=g).requires_grad_(True)
            leaves.append(c0)
            hx = (h0, c0)

    def run(module):
        out = module(x, hx)
        return list(out) if isinstance(out, tuple) else [out]

    expected, actual = run(ref), run(fc)
    tol = TOL[dtype]
    _assert_close_list(actual, expected, tol, "outputs")
    cot = _cotangents(expected, seed + 2)
    ge = torch.autograd.grad(expected, leaves + list(ref.parameters()), cot, allow_unused=True)
    ga = torch.autograd.grad(actual, leaves + list(fc.parameters()), cot, allow_unused=True)
    _assert_close_list(ga, ge, tol, "grads")


# ------------------------------------------------------------------ conditions
# The same module comparison under what a caller can change around the call:
# strided inputs and weights, saved-tensor hooks that unpack into another
# layout, input magnitudes from 1e-3 to 1e3 (saturated gates), CPU autocast,
# torch.compile, and meta tensors among CPU arguments.

def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous layout (every other element of a
    buffer twice as long along the last dimension)."""
    buf = t.new_zeros(*t.shape[:-1], 2 * t.shape[-1])
    buf[..., ::2] = t
    return buf[..., ::2]


def _other_layout_hooks():
    """saved_tensors_hooks whose unpack returns each saved tensor copied into
    the reversed dimension order (column-major for a matrix), as offloading
    and compression hooks may."""
    def unpack(t):
        order = list(reversed(range(t.dim())))
        return t.permute(*order).contiguous().permute(*order)
    return torch.autograd.graph.saved_tensors_hooks(lambda t: t, unpack)


@st.composite
def conditions(draw):
    return dict(strided_input=draw(st.booleans()), strided_weights=draw(st.booleans()),
                hooks=draw(st.booleans()), scale=draw(st.sampled_from([1e-3, 1.0, 30.0, 1e3])),
                autocast=draw(st.booleans()))


@FUZZ
@given(cfg=rnn_configs(TORCH_NN_MODES), cond=conditions())
def test_module_matches_torch_nn_under_conditions(cfg, cond):
    import contextlib

    if cond["autocast"] and cfg["layout"] == "packed":
        cond = dict(cond, autocast=False)  # torch.nn's packed LSTM has no bfloat16 kernel
    ref, fc = _make_pair(cfg)
    if cond["strided_weights"]:
        for name, p in list(fc.named_parameters()):
            setattr(fc, name, nn.Parameter(_strided(p.detach())))
    g = torch.Generator().manual_seed(cfg["seed"] + 5)
    T, B, I = cfg["steps"], cfg["batch"], cfg["input_size"]
    shape = (T, I) if cfg["layout"] == "unbatched" else \
        ((B, T, I) if cfg["batch_first"] else (T, B, I))
    x0 = torch.randn(*shape, generator=g, dtype=cfg["dtype"]) * cond["scale"]
    x = (_strided(x0) if cond["strided_input"] else x0.clone()).requires_grad_(True)

    def run(module, with_hooks):
        inp = x
        if cfg["layout"] == "packed":
            inp = nn.utils.rnn.pack_padded_sequence(x, torch.tensor(cfg["lengths"]),
                                                    batch_first=cfg["batch_first"],
                                                    enforce_sorted=False)
        region = torch.autocast("cpu", dtype=torch.bfloat16) if cond["autocast"] \
            else contextlib.nullcontext()
        hooks = _other_layout_hooks() if with_hooks else contextlib.nullcontext()
        with hooks:
            with region:
                outs = _flatten(module(inp))
            loss = sum((o.float() * o.float()).sum() for o in outs)
            grads = torch.autograd.grad(loss, [x] + list(module.parameters()), allow_unused=True)
        return outs, list(grads)

    # torch.nn runs without the hooks: a hook must not change the gradients,
    # and torch.nn's own float32 (oneDNN) LSTM backward does change them when
    # its saved tensors come back in another layout.
    (exp, gexp), (act, gact) = run(ref, False), run(fc, cond["hooks"])
    assert [t.dtype for t in act] == [t.dtype for t in exp]
    if cond["autocast"]:
        # torch.nn rounds some or all products to bfloat16 there (even where it
        # returns float32): compare at bfloat16's resolution, values only. With
        # inputs scaled up, bfloat16's rounding of the summands (2^-9 of terms
        # of size ~scale) exceeds any fixed tolerance where they cancel (relu
        # RNN): then only the finite / non-finite pattern must agree.
        for a, e in zip(act, exp):
            if cond["scale"] <= 1:
                torch.testing.assert_close(a.float(), e.float(), atol=0.1, rtol=0.1)
            else:
                assert torch.equal(a.isfinite(), e.isfinite())
        return
    tol = TOL[cfg["dtype"]]
    if cond["scale"] >= 30:  # saturated gates: gradients are tiny differences of large terms
        tol = dict(rtol=tol["rtol"] * 10, atol=tol["atol"] * cond["scale"])
    _assert_close_list(act, exp, tol, "outputs")
    _assert_close_list(gact, gexp, tol, "grads")


@settings(FUZZ, max_examples=max(5, EXAMPLES // 40))
@given(cfg=rnn_configs(TORCH_NN_MODES))
def test_compiled_module_matches_torch_nn(cfg):
    """torch.compile (aot_eager) of the fastcells module: outputs and gradients
    equal torch.nn's in eager mode."""
    torch._dynamo.reset()
    ref, fc = _make_pair(cfg)
    g = torch.Generator().manual_seed(cfg["seed"] + 6)
    T, B, I = cfg["steps"], cfg["batch"], cfg["input_size"]
    shape = (T, I) if cfg["layout"] == "unbatched" else \
        ((B, T, I) if cfg["batch_first"] else (T, B, I))
    x = torch.randn(*shape, generator=g, dtype=cfg["dtype"]).requires_grad_(True)

    def run(module, x):
        return _flatten(module(x))

    exp = run(ref, x)
    act = torch.compile(run, backend="aot_eager", fullgraph=True)(fc, x)
    tol = TOL[cfg["dtype"]]
    _assert_close_list(act, exp, tol, "outputs")
    loss_e = sum(o.sum() for o in exp)
    loss_a = sum(o.sum() for o in act)
    ge = torch.autograd.grad(loss_e, [x] + list(ref.parameters()), allow_unused=True)
    ga = torch.autograd.grad(loss_a, [x] + list(fc.parameters()), allow_unused=True)
    _assert_close_list(list(ga), list(ge), tol, "grads")


@CELL_FUZZ
@given(cfg=rnn_configs(TORCH_NN_MODES), which=st.sampled_from(["input", "h0", "c0", "weight"]))
def test_a_meta_argument_raises_like_torch_nn(cfg, which):
    """One argument on the meta device among CPU ones: fastcells raises the
    RuntimeError torch.nn raises ("not at the same device"), never returns."""
    c = cell_named(cfg["kind"])
    if which == "c0" and not c.has_cell_state:
        which = "h0"
    ref, fc = _make_pair(cfg)
    T, B, I = cfg["steps"], cfg["batch"], cfg["input_size"]
    D = 2 if cfg["bidirectional"] else 1
    P = cfg["proj"] or cfg["hidden"]
    dev = {k: "meta" if k == which else "cpu" for k in ("input", "h0", "c0")}
    x = torch.randn(T, B, I, dtype=cfg["dtype"], device=dev["input"])
    if cfg["batch_first"]:
        x = x.transpose(0, 1)
    h0 = torch.zeros(cfg["layers"] * D, B, P, dtype=cfg["dtype"], device=dev["h0"])
    c0 = torch.zeros(cfg["layers"] * D, B, cfg["hidden"], dtype=cfg["dtype"], device=dev["c0"])
    hx = (h0, c0) if c.has_cell_state else h0
    if which == "weight":
        fc.weight_hh_l0 = nn.Parameter(fc.weight_hh_l0.detach().to("meta"))
    with pytest.raises(RuntimeError, match="same device"):
        fc(x, hx)
