"""The table of cells: fastcells/_cells.py (Python) and csrc/kernels/cell_table.h
(C++, read through torch.ops.fastcells.cell_table()) agree entry by entry, the
Python table agrees with torch.nn, and a bad `mode` gets an error naming the
argument and the valid codes."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import needs_ops, skip_without_kernel, with_layer_norm
from fastcells._cells import CELLS, MODES, cell, cell_named, cell_of_module, valid_modes

ROOT = Path(__file__).resolve().parents[1]


def _cpp_table() -> list[dict[str, str]]:
    text = torch.ops.fastcells.cell_table()
    return [dict(kv.split("=", 1) for kv in line.split()) for line in text.splitlines() if line]


@needs_ops
def test_cpp_and_python_tables_agree():
    rows = _cpp_table()
    assert [int(r["code"]) for r in rows] == [c.code for c in CELLS]
    for r, c in zip(rows, CELLS):
        got = (int(r["code"]), r["name"], int(r["gates"]), bool(int(r["cell_state"])),
               int(r["extra"]), bool(int(r["proj"])), int(r["base"]), int(r["norms"]),
               bool(int(r["cuda"])))
        assert got == (c.code, c.name, c.gates, c.has_cell_state, c.extra, c.proj, c.base_code,
                       c.norms, c.cuda), c.name


@pytest.mark.parametrize("c", CELLS, ids=lambda c: c.name)
def test_op_tests_skip_exactly_the_cells_without_a_cuda_kernel(c):
    """The op tests' CUDA runs (conftest.OP_DEVICES) skip a cell by the table's
    cuda column, never by a list of their own."""
    skip_without_kernel(c.name, "cpu")  # never skips on the CPU
    if c.cuda:
        skip_without_kernel(c.name, "cuda")
    else:
        with pytest.raises(pytest.skip.Exception, match="CPU only"):
            skip_without_kernel(c.name, "cuda")


def test_codes_are_positions_and_names_unique():
    assert [c.code for c in CELLS] == list(range(len(CELLS)))
    assert MODES == {c.name: c.code for c in CELLS}
    assert len({c.name for c in CELLS}) == len(CELLS)
    assert len({(c.nn_class, c.nonlinearity, c.reset_after, c.layer_norm)
                for c in CELLS}) == len(CELLS)
    # A cell runs the gate functions of a cell with the same gates and state.
    for c in CELLS:
        b = CELLS[c.base_code]
        assert (b.gates, b.has_cell_state, b.base_code) == (c.gates, c.has_cell_state, b.code)


def test_public_codes_unchanged():
    """Codes are public (fastcells.MODES, the ops' `mode`): existing ones never
    change, a new cell takes the next code."""
    import fastcells

    assert list(fastcells.MODES.items())[:4] == [("LSTM", 0), ("GRU", 1), ("RNN_TANH", 2),
                                                  ("RNN_RELU", 3)]
    assert fastcells.MODES == MODES


@pytest.mark.parametrize("c", CELLS, ids=lambda c: c.name)
def test_python_table_matches_torch_nn(c):
    """Each row describes the torch.nn module it stands for (whose parameters a
    row without a torch.nn twin shares): mode string, gate count (weight rows),
    cell state (tuple state), proj_size support."""
    H, I = 5, 3
    kwargs = {"nonlinearity": c.nonlinearity} if c.nonlinearity else {}
    mod = getattr(nn, c.nn_class)(I, H, **kwargs)
    assert mod.mode == (c.name if c.in_torch_nn else c.nn_class)
    assert mod.weight_ih_l0.shape == (c.gates * H, I)
    assert mod.weight_hh_l0.shape == (c.gates * H, H)
    _, state = mod(torch.zeros(2, 1, I))
    assert isinstance(state, tuple) == c.has_cell_state
    cell_mod = getattr(nn, c.nn_class + "Cell")(I, H, **kwargs)
    assert cell_mod.weight_ih.shape == (c.gates * H, I)
    if c.proj:
        getattr(nn, c.nn_class)(I, H, proj_size=2, **kwargs)
    else:
        import fastcells  # the LayerNorm cells' own modules refuse what torch.nn's allow

        make = getattr(fastcells, "LayerNorm" + c.nn_class) if c.layer_norm else \
            getattr(nn, c.nn_class)
        with pytest.raises(ValueError, match="proj_size"):
            make(I, H, proj_size=2, **kwargs)
    assert cell_of_module(c.nn_class, c.nonlinearity, c.reset_after, c.layer_norm) is c
    assert cell_of_module(c.nn_class + "Cell", c.nonlinearity, c.reset_after,
                          c.layer_norm) is c
    assert cell_named(c.name) is c and cell(c.code) is c


@needs_ops
@pytest.mark.parametrize("c", CELLS, ids=lambda c: c.name)
def test_reserve_layout_uses_gates_and_extra(c):
    """The reserve the op returns is what the table says: per layer, direction
    and row G*H gates plus extra*H saved values, then each layer's output (H per row)."""
    H, I, T, B = 4, 3, 5, 2
    kwargs = {"nonlinearity": c.nonlinearity} if c.nonlinearity else {}
    ref = getattr(nn, c.nn_class)(I, H, **kwargs).double()
    x = torch.randn(T, B, I, dtype=torch.float64)
    h = torch.zeros(1, B, H, dtype=torch.float64)
    cx = h.clone() if c.has_cell_state else None
    ws = with_layer_norm(c, list(ref._flat_weights), H, torch.Generator().manual_seed(0))
    out, hy, cy, reserve = torch.ops.fastcells.rnn_forward(
        x, ws, h, cx, None, c.code, 1, False, True, 0, None, True)
    assert reserve.numel() == T * B * (c.gates * H + c.extra_size(H) + H)
    assert cy.numel() == (B * H if c.has_cell_state else 0)


@needs_ops
@pytest.mark.parametrize("mode", [len(CELLS), -1, 2**32])
def test_bad_mode_names_the_argument(mode):
    """The op's error names `mode` and lists the codes from the C++ table;
    2**32 checks the int64 mode is not narrowed into range."""
    c = CELLS[0]
    H, I = 4, 3
    ref = getattr(nn, c.nn_class)(I, H).double()
    x = torch.zeros(2, 1, I, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"`mode` must be " + re.escape(valid_modes())) as e:
        torch.ops.fastcells.rnn_forward(x, list(ref._flat_weights), None, None, None, mode, 1,
                                        False, True, 0, None)
    assert f"got {mode}" in str(e.value)
    for row in _cpp_table():
        assert f"{row['code']} ({row['name']})" in str(e.value)


@pytest.mark.parametrize("mode", [len(CELLS), -1, True, 1.0, "LSTM"])
def test_python_lookup_names_the_argument(mode):
    with pytest.raises(ValueError, match=r"`mode` must be " + re.escape(valid_modes())):
        cell(mode)


def test_reference_bad_mode_names_the_argument():
    from fastcells.reference import rnn_reference

    ref = nn.GRU(3, 4).double()
    x = torch.zeros(2, 1, 3, dtype=torch.float64)
    h = torch.zeros(1, 1, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="`mode`"):
        rnn_reference(x, ref._flat_weights, h, None, None, len(CELLS), 1, False, True, 0)


def test_no_cell_codes_written_out_in_python():
    """Python code reads the table instead of comparing modes with literal codes
    or spelling gate-count dicts."""
    pattern = re.compile(r"\bmode(_id)?[\"']?\]?\s*(==|!=)\s*\d"  # mode == 0, c["mode"] == 0
                         r"|\bmode(_id)?\s+(not\s+)?in\s*\(\s*\d"  # mode in (0, 1)
                         r"|\{\s*0\s*:\s*4\s*,\s*1\s*:\s*3")  # {0: 4, 1: 3}
    offenders = []
    for path in sorted((ROOT / "fastcells").glob("*.py")) + sorted((ROOT / "tests").glob("*.py")):
        if path.name == Path(__file__).name:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
