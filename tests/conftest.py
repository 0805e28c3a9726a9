"""Shared helpers for the fastcells tests.

Helpers are plain functions (``from conftest import ...``) so that test files
can use them inside parametrised grids; fixtures are kept to a minimum.

Tolerances (``TOL``): float64 compares to ~1e-10; float32 to the usual
single-precision tolerance for a different summation order; bfloat16 is checked
with the "no worse than 2x torch.nn's own error against float64" rule plus the
loose absolute floor in ``TOL``.
"""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Callable, Sequence

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

try:
    from fastcells._cells import CELLS, cell_named, cell_of_module
except ImportError:  # pragma: no cover - the package without its extension: the table alone
    import importlib.util
    import sys
    from pathlib import Path

    _spec = importlib.util.spec_from_file_location(
        "fastcells_cells_table", Path(__file__).resolve().parents[1] / "fastcells" / "_cells.py")
    _cells = importlib.util.module_from_spec(_spec)
    sys.modules[_spec.name] = _cells
    _spec.loader.exec_module(_cells)
    CELLS, cell_named, cell_of_module = _cells.CELLS, _cells.cell_named, _cells.cell_of_module

# name -> (torch.nn class, op mode, extra constructor kwargs), from the table of
# cells: the cells torch.nn implements, which the parity suites compare with it.
# The reset-before GRU has no torch.nn twin: tests/test_gru_reset_before.py
# checks it against the reference.
MODES: dict[str, tuple[type, int, dict]] = {
    c.name: (getattr(nn, c.nn_class), c.code,
             {"nonlinearity": c.nonlinearity} if c.nonlinearity else {})
    for c in CELLS if c.in_torch_nn
}
MODE_NAMES = list(MODES)


def gates(mode_name: str) -> int:
    """G of a cell by name: its weights have G*H rows."""
    return cell_named(mode_name).gates


def has_cell_state(mode_name: str) -> bool:
    """Whether the cell carries c besides h (the state is a tuple (h, c))."""
    return cell_named(mode_name).has_cell_state


TOL: dict[torch.dtype, dict[str, float]] = {
    torch.float64: {"atol": 1e-10, "rtol": 1e-10},
    torch.float32: {"atol": 2e-5, "rtol": 1e-4},
    torch.bfloat16: {"atol": 5e-2, "rtol": 5e-2},
}

# FASTCELLS_SLOW=1 (any value but "" and "0") runs the tests marked
# `@pytest.mark.slow` (pyproject.toml) and the longer variants that read SLOW;
# this is the only place that reads the variable.
SLOW = os.environ.get("FASTCELLS_SLOW", "") not in ("", "0")


def pytest_collection_modifyitems(config, items):
    if SLOW:
        return
    skip = pytest.mark.skip(reason="slow: set FASTCELLS_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)

try:  # the compiled extension may be missing while only the reference is tested
    import fastcells  # noqa: F401

    HAVE_FASTCELLS = hasattr(fastcells, "LSTM")
    HAVE_OPS = hasattr(getattr(fastcells, "functional", None), "rnn")
except ImportError:  # pragma: no cover - depends on the build
    HAVE_FASTCELLS = HAVE_OPS = False

needs_fastcells = pytest.mark.skipif(not HAVE_FASTCELLS, reason="fastcells modules not available")
needs_ops = pytest.mark.skipif(not HAVE_OPS, reason="fastcells extension not built")

# Every CPU ISA path in the build (csrc/cpu/isa.h). Suites that use the
# ``cpu_isa`` fixture run once per path; a path the host cannot run is skipped
# with a reason naming it and the host's features.
CPU_ISAS: list[str] = fastcells.cpu_isas(built=True) if HAVE_OPS else ["default"]


@pytest.fixture(params=CPU_ISAS)
def cpu_isa(request, monkeypatch):
    """Runs the test on one CPU ISA path, in this process (fastcells.use_cpu_isa)
    and in any subprocess it starts (FASTCELLS_CPU_ISA), then restores the path."""
    name = request.param
    if not HAVE_OPS:
        yield name
        return
    if name not in fastcells.cpu_isas():
        pytest.skip(f"CPU ISA path {name!r} needs features this host lacks "
                    f"(host: {fastcells.cpu_host_features()})")
    if name == "avx512_layout" and "avx512" in fastcells.cpu_isas():
        pytest.skip("avx512_layout stands in for the avx512 path on hosts without AVX-512; "
                    "this host runs the avx512 path itself")
    monkeypatch.setenv("FASTCELLS_CPU_ISA", name)
    with fastcells.use_cpu_isa(name):
        yield name


def _cuda_skip_reason() -> str | None:
    """Why the CUDA backend cannot be tested here, or None when it can."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    if not HAVE_OPS or "cuda=1" not in fastcells._ops.build_info():
        return "fastcells was built without its CUDA backend"
    return None


# The devices the op tests run on: the CPU, and CUDA where a device and the
# CUDA backend are present (skipped with the reason otherwise).
OP_DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[
        pytest.mark.cuda,
        pytest.mark.skipif(_cuda_skip_reason() is not None, reason=str(_cuda_skip_reason()))]),
]


def skip_without_kernel(cell: str, device: str) -> None:
    """Skips a test of `cell` on `device` where the table says the device's
    backend has no kernel for it (the op rejects such calls; test_bad_input
    checks the error)."""
    if device == "cuda" and not cell_named(cell).cuda:
        pytest.skip(f"{cell} runs on the CPU only (no CUDA kernel)")


def mode_of(module: nn.Module) -> int:
    """Op mode (the table's code) of an nn.LSTM/GRU/RNN-like module."""
    return cell_of_module(type(module).__name__, getattr(module, "nonlinearity", None)).code


def make_nn(mode_name: str, input_size: int, hidden_size: int, dtype: torch.dtype = torch.float64,
            seed: int = 0, **kwargs) -> nn.Module:
    """A seeded torch.nn recurrent module of the given mode."""
    cls, _, extra = MODES[mode_name]
    torch.manual_seed(seed)
    return cls(input_size, hidden_size, dtype=dtype, **extra, **kwargs)


def make_fastcells_like(ref: nn.Module) -> nn.Module:
    """The fastcells module with the same constructor arguments and weights as ``ref``."""
    import fastcells

    name = type(ref).__name__
    kwargs = dict(num_layers=ref.num_layers, bias=ref.bias, batch_first=ref.batch_first,
                  dropout=ref.dropout, bidirectional=ref.bidirectional,
                  dtype=ref.weight_ih_l0.dtype, device=ref.weight_ih_l0.device)
    if name == "LSTM":
        kwargs["proj_size"] = ref.proj_size
    if name == "RNN":
        kwargs["nonlinearity"] = ref.nonlinearity
    mod = getattr(fastcells, name)(ref.input_size, ref.hidden_size, **kwargs)
    mod.load_state_dict(ref.state_dict())
    mod.train(ref.training)
    return mod


def packed_lengths(T: int, B: int) -> list[int]:
    """Unsorted lengths in [1, T] with max T (B >= 2 gives a non-sorted order)."""
    desc = [max(1, T - k) for k in (0, 2, 3, 1, 4, 5, 6, 7)]
    desc = (desc * (B // len(desc) + 1))[:B]
    return desc[1:2] + desc[:1] + desc[2:] if B >= 2 else desc


def make_input(kind: str, T: int, B: int, I: int, dtype: torch.dtype, batch_first: bool = False,
               seed: int = 1) -> tuple[Tensor, object]:
    """Returns (leaf tensor that requires grad, module input).

    kind: "dense" (T, B, I) or (B, T, I) if batch_first, "unbatched" (T, I), or
    "packed": a PackedSequence (enforce_sorted=False) built from a padded leaf.
    """
    g = torch.Generator().manual_seed(seed)
    if kind == "unbatched":
        leaf = torch.randn(T, I, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
        return leaf, leaf
    shape = (B, T, I) if batch_first else (T, B, I)
    leaf = torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    if kind == "dense":
        return leaf, leaf
    lengths = torch.tensor(packed_lengths(T, B))
    return leaf, pack_padded_sequence(leaf, lengths, batch_first=batch_first, enforce_sorted=False)


def make_hx(module: nn.Module, B: int | None, dtype: torch.dtype, seed: int = 2):
    """Random initial state(s) that require grad; B None means unbatched."""
    g = torch.Generator().manual_seed(seed)
    D = 2 if module.bidirectional else 1
    H = module.hidden_size
    P = getattr(module, "proj_size", 0) or H
    lead = (module.num_layers * D,) if B is None else (module.num_layers * D, B)
    h = torch.randn(*lead, P, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    if not CELLS[mode_of(module)].has_cell_state:
        return h
    c = torch.randn(*lead, H, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    return (h, c)


def run_functional(fn: Callable, module: nn.Module, input, hx=None,
                   dropout_masks: Tensor | None = None):
    """Run torch.nn's RNNBase.forward logic around a functional ``fn`` with the
    signature of fastcells.functional.rnn (e.g. reference.rnn_reference).

    Returns what the module would: (output, h_n) or (output, (h_n, c_n)).
    """
    mode = mode_of(module)
    has_c = CELLS[mode].has_cell_state
    D = 2 if module.bidirectional else 1
    H = module.hidden_size
    P = getattr(module, "proj_size", 0) or H
    L = module.num_layers
    packed = isinstance(input, PackedSequence)
    batched = True
    if packed:
        data, batch_sizes, sorted_idx, unsorted_idx = input
        B = int(batch_sizes[0])
        sizes = [int(s) for s in batch_sizes]
    else:
        batched = input.dim() == 3
        data = input if batched else input.unsqueeze(1)
        if module.batch_first and batched:
            data = data.transpose(0, 1)
        B, sizes, sorted_idx, unsorted_idx = data.shape[1], None, None, None
    if hx is None:
        z = torch.zeros(L * D, B, P, dtype=data.dtype)
        h0, c0 = z, (torch.zeros(L * D, B, H, dtype=data.dtype) if has_c else None)
    else:
        h0, c0 = hx if has_c else (hx, None)
        if not batched:
            h0 = h0.unsqueeze(1)
            c0 = c0.unsqueeze(1) if c0 is not None else None
        if sorted_idx is not None:
            h0 = h0.index_select(1, sorted_idx)
            c0 = c0.index_select(1, sorted_idx) if c0 is not None else None
    out, hy, cy = fn(data, list(module._flat_weights), h0, c0, sizes, mode, L, module.bidirectional,
                     module.bias, getattr(module, "proj_size", 0), dropout_masks)
    if packed:
        out = PackedSequence(out, input.batch_sizes, sorted_idx, unsorted_idx)
        hy = hy.index_select(1, unsorted_idx)
        cy = cy.index_select(1, unsorted_idx) if has_c else None
    else:
        if module.batch_first and batched:
            out = out.transpose(0, 1)
        if not batched:
            out, hy = out.squeeze(1), hy.squeeze(1)
            cy = cy.squeeze(1) if has_c else None
    return (out, (hy, cy)) if has_c else (out, hy)


def flatten_result(result) -> list[Tensor]:
    """(output, h) / (output, (h, c)) with output maybe a PackedSequence -> list of tensors."""
    out, state = result
    data = out.data if isinstance(out, PackedSequence) else out
    states = list(state) if isinstance(state, tuple) else [state]
    return [data] + states


def weighted_loss(tensors: Sequence[Tensor], seed: int = 3) -> Tensor:
    """sum_i <t_i, r_i> with fixed random r_i, so every output element gets its own gradient."""
    g = torch.Generator().manual_seed(seed)
    total = 0
    for t in tensors:
        r = torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype)
        total = total + (t * r).sum()
    return total


def grads_of(tensors: Sequence[Tensor]) -> list[Tensor | None]:
    out = []
    for t in tensors:
        out.append(None if t.grad is None else t.grad.clone())
        t.grad = None
    return out


def assert_close_list(actual: Sequence, expected: Sequence, dtype: torch.dtype,
                      names: Sequence[str] | None = None, **override) -> None:
    """assert_close over two lists with the per-dtype tolerance; names label failures."""
    tol = {**TOL[dtype], **override}
    assert len(actual) == len(expected)
    for k, (a, e) in enumerate(zip(actual, expected)):
        label = names[k] if names is not None else str(k)
        if e is None or a is None:
            assert a is None and e is None, f"{label}: one side has no value/gradient"
            continue
        torch.testing.assert_close(a, e, **tol, equal_nan=True, msg=lambda m, label=label: f"{label}: {m}")


def pairwise(factors: dict[str, Sequence], valid: Callable[[dict], bool] = lambda row: True,
             seed: int = 0, base: Sequence[str] = ()) -> list[dict]:
    """A small set of rows covering every valid pair of factor values (greedy).

    ``base`` names factors whose full cartesian product is included; the other
    factors are chosen greedily so that every pair of values appears in some
    row. ``valid`` rejects impossible rows (e.g. proj_size for a GRU).
    """
    rng = random.Random(seed)
    names = list(factors)
    def pairs_of(row):
        return {(a, row[a], b, row[b]) for a, b in itertools.combinations(names, 2)}
    # All pairs that occur in at least one valid row.
    all_rows = [dict(zip(names, vals)) for vals in itertools.product(*factors.values())]
    all_rows = [r for r in all_rows if valid(r)]
    uncovered = set().union(*(pairs_of(r) for r in all_rows))
    rows: list[dict] = []
    base_vals = itertools.product(*(factors[b] for b in base)) if base else [()]
    for bv in base_vals:
        fixed = dict(zip(base, bv))
        cands = [r for r in all_rows if all(r[k] == v for k, v in fixed.items())]
        if not cands:
            continue
        rng.shuffle(cands)
        best = max(cands, key=lambda r: len(pairs_of(r) & uncovered))
        rows.append(best)
        uncovered -= pairs_of(best)
    while uncovered:
        rng.shuffle(all_rows)
        best = max(all_rows, key=lambda r: len(pairs_of(r) & uncovered))
        rows.append(best)
        uncovered -= pairs_of(best)
    return rows


def row_id(row: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in row.items())


SHAPES = {"T5B3": (5, 3), "T1B3": (1, 3), "T5B1": (5, 1), "T4B4": (4, 4)}


def module_grid(seed: int = 0) -> list[dict]:
    """Pairwise grid over every module option, with the full product of
    (mode, input kind, bidirectional) so each cell type sees packed reverse etc."""
    factors = {
        "mode": MODE_NAMES,
        "kind": ["dense", "unbatched", "packed"],
        "bidirectional": [False, True],
        "num_layers": [1, 2, 3],
        "batch_first": [False, True],
        "proj_size": [0, 2],
        "bias": [True, False],
        "hx": [False, True],
        "shape": list(SHAPES),
    }
    return pairwise(factors, valid=lambda r: r["mode"] == "LSTM" or r["proj_size"] == 0,
                    seed=seed, base=("mode", "kind", "bidirectional"))


# ---------------------------------------------------------------- op arguments

def op_case(mode: str, packed: bool, num_layers: int, bidirectional: bool, proj_size: int = 0,
          bias: bool = True, masks: bool = False, T: int = 3, B: int = 2, I: int = 2, H: int = 3,
          dtype: torch.dtype = torch.float64, seed: int = 0,
          batch_sizes: list[int] | None = None, device: str = "cpu") -> dict:
    """Arguments of functional.rnn / the ops for one configuration, random values
    (`batch_sizes`: packed input of these batch sizes instead of drawn lengths),
    drawn on the CPU and moved to `device` (the same values on every device).
    The one sample-input factory of the op tests."""
    g = torch.Generator().manual_seed(seed)
    cl = cell_named(mode)  # any row of the table
    mode_id = cl.code
    G = gates(mode)
    D = 2 if bidirectional else 1
    P = proj_size or H

    def rnd(*shape):
        return (torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1).to(dtype)

    weights = []
    for layer in range(num_layers):
        for _ in range(D):
            weights += [rnd(G * H, I if layer == 0 else D * P), rnd(G * H, P)]
            if bias:
                weights += [rnd(G * H), rnd(G * H)]
            if proj_size:
                weights.append(rnd(P, H))
            # The LayerNorm cells' gains and LN bias (G*H, G*H[, H, H]).
            weights += [1 + 0.2 * rnd(n) for n in [G * H, G * H, H, H][:cl.norms]]
    if packed:
        if batch_sizes is None:
            lengths = sorted(packed_lengths(T, B), reverse=True)
            batch_sizes = [sum(1 for n in lengths if n > t) for t in range(max(lengths))]
        x = rnd(sum(batch_sizes), I)
        rows = (sum(batch_sizes),)
    else:
        batch_sizes = None
        x = rnd(T, B, I)
        rows = (T, B)
    hx = rnd(num_layers * D, B, P)
    cx = rnd(num_layers * D, B, H) if has_cell_state(mode) else None
    dropout_masks = None
    if masks and num_layers > 1:
        keep = torch.rand(num_layers - 1, *rows, D * P, generator=g) > 0.3
        dropout_masks = (keep.to(torch.float64) / 0.7).to(dtype)
    if device != "cpu":
        x, hx, cx, dropout_masks = (None if t is None else t.to(device)
                                    for t in (x, hx, cx, dropout_masks))
        weights = [w.to(device) for w in weights]
    return dict(input=x, weights=weights, hx=hx, cx=cx, batch_sizes=batch_sizes, mode=mode_id,
                num_layers=num_layers, bidirectional=bidirectional, has_biases=bias,
                proj_size=proj_size, dropout_masks=dropout_masks)


def op_call_args(c: dict) -> tuple:
    return (c["input"], c["weights"], c["hx"], c["cx"], c["batch_sizes"], c["mode"],
            c["num_layers"], c["bidirectional"], c["has_biases"], c["proj_size"],
            c["dropout_masks"])


def random_batch_sizes(T: int, B: int, g: torch.Generator) -> list[int]:
    """PackedSequence batch sizes of B sequences with random lengths in [1, T], the
    longest T."""
    lengths = sorted(torch.randint(1, T + 1, (B,), generator=g).tolist(), reverse=True)
    lengths[0] = T
    return [sum(1 for n in lengths if n > t) for t in range(T)]


def state_option_case(cell: str, layers: int, D: int, proj: int, packed: bool, B: int = 4,
                      H: int = 5, T: int = 6, seed: int = 0):
    """Float64 leaves for fastcells._ops.rnn over any cell of the table (the
    reset-before GRU included), for the suites of the per-step state options
    (zoneout, recurrent dropout): (x, weights, h0, c0 or None, the remaining
    positional arguments, rows of x without features, generator for more draws)."""
    import fastcells

    I, P = 3, proj or H
    torch.manual_seed(seed)
    c = cell_named(cell)
    kw = {"proj_size": proj} if proj else {}
    if c.nonlinearity:
        kw["nonlinearity"] = c.nonlinearity
    m = getattr(nn, c.nn_class)(I, H, layers, bidirectional=D == 2, **kw).double()
    g = torch.Generator().manual_seed(seed + 1)
    ws = [w.detach().clone().requires_grad_()
          for w in with_layer_norm(c, list(m._flat_weights), H, g)]
    batch_sizes = random_batch_sizes(T, B, g) if packed else None
    rows = (sum(batch_sizes),) if packed else (T, B)
    x = torch.randn(*rows, I, generator=g, dtype=torch.double, requires_grad=True)
    h0 = torch.randn(layers * D, B, P, generator=g, dtype=torch.double, requires_grad=True)
    c0 = (torch.randn(layers * D, B, H, generator=g, dtype=torch.double, requires_grad=True)
          if c.has_cell_state else None)
    args = (batch_sizes, fastcells.MODES[cell], layers, D == 2, True, proj, None)
    return x, ws, h0, c0, args, rows, g


def with_layer_norm(c, ws: list, H: int, g: torch.Generator, per: int = 4) -> list:
    """The flat weights `ws` (torch.nn order, `per` tensors per layer and
    direction) with cell `c`'s layer-norm parameters after each layer and
    direction's own (none for a cell without them): gains 1 + 0.2 N(0, 1), the
    cell state's LN bias 0.1 N(0, 1), so that none of them is neutral."""
    if not c.layer_norm:
        return ws
    sizes = [c.gates * H, c.gates * H, H, H][:c.norms]
    out = []
    for k in range(0, len(ws), per):
        out += ws[k:k + per]
        for j, n in enumerate(sizes):
            v = torch.randn(n, generator=g, dtype=torch.float64)
            out.append((0.1 * v if j == 3 else 1 + 0.2 * v).to(ws[0].dtype))
    return out


def assert_op_matches_reference(x, ws, h0, c0, args, **options) -> None:
    """fastcells._ops.rnn against the reference with the same keyword `options`
    (zoneout=, recurrent_masks=, ...): every result and the gradients of x, h0,
    c0 and the weights, in float64."""
    from fastcells import _ops
    from fastcells.reference import rnn_reference

    got = [t for t in _ops.rnn(x, ws, h0, c0, *args, **options) if t is not None]
    want = [t for t in rnn_reference(x, ws, h0, c0, *args, **options) if t is not None]
    assert_close_list(got, want, torch.float64)
    leaves = [x, h0] + ([c0] if c0 is not None else []) + list(ws)
    g = torch.Generator().manual_seed(9)
    cot = [torch.randn(t.shape, generator=g, dtype=torch.double) for t in want]
    assert_close_list(torch.autograd.grad(got, leaves, cot, retain_graph=True),
                      torch.autograd.grad(want, leaves, cot), torch.float64)


def assert_func_grad_runs_the_reference(monkeypatch, m, x, output: int) -> None:
    """torch.func.grad through module `m` (float64) takes the reference, warns
    that it does, and matches autograd's gradients of the same loss (the square
    sum of forward's result number `output`)."""
    from fastcells import _transforms

    monkeypatch.setattr(_transforms, "_warned", False)  # it warns once per process
    params = dict(m.named_parameters())

    def loss(p):
        return torch.func.functional_call(m, p, (x,))[output].square().sum()

    with pytest.warns(UserWarning, match="reference"):
        got = torch.func.grad(loss)(params)
    want = torch.autograd.grad(loss(params), list(params.values()))
    assert_close_list(list(got.values()), want, torch.float64)
