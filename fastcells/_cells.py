"""The table of cells: the only place where the Python code numbers the cells
and says how many gates each has.

The C++ copy is ``csrc/kernels/cell_table.h`` (``FASTCELLS_CELL_TABLE``);
``tests/test_cell_table.py`` checks the two agree through
``torch.ops.fastcells.cell_table()``. This module needs neither torch nor the
compiled extension, so the pure-PyTorch reference can use it on its own.

Adding a cell: one row here and in cell_table.h, its gate functions in
csrc/kernels/cells.h, its step in fastcells/reference.py and its module.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

__all__ = ["Cell", "CELLS", "MODES", "cell", "cell_named", "cell_of_module", "valid_modes"]


@dataclass(frozen=True)
class Cell:
    code: int                # the ``mode`` argument of the ops
    name: str                # torch.nn's mode string (``RNNBase.mode``)
    gates: int               # G: the weights have G*H rows
    has_cell_state: bool     # carries c (cx / cy) besides h
    extra: int               # saved "extra" block per row, in units of H (LSTM c_t, GRU hh_n)
    proj: bool               # proj_size > 0 allowed
    nn_class: str            # the torch.nn sequence module; its cell is nn_class + "Cell"
    nonlinearity: Optional[str] = None  # the torch.nn ``nonlinearity`` argument, if any
    reset_after: bool = True  # GRU convention; False: the original GRU, which torch.nn lacks
    base: Optional[int] = None  # the cell whose gate functions it runs (None: its own)
    norms: int = 0           # layer-norm parameters per layer and direction (LayerNorm cells)
    cuda: bool = True        # the CUDA backend has a kernel for it

    @property
    def in_torch_nn(self) -> bool:
        """Whether torch.nn implements this cell (its class computes the same)."""
        return self.reset_after and not self.layer_norm

    @property
    def layer_norm(self) -> bool:
        """Layer norm inside the recurrence (fastcells.LayerNormLSTM / LayerNormGRU)."""
        return self.norms > 0

    @property
    def base_code(self) -> int:
        return self.code if self.base is None else self.base

    def extra_size(self, H: int) -> int:
        """Columns of the saved extra block per row."""
        return self.extra * H


# Indexed by code: CELLS[mode].
CELLS: Tuple[Cell, ...] = (
    Cell(0, "LSTM", 4, True, 1, True, "LSTM"),
    Cell(1, "GRU", 3, False, 1, False, "GRU"),
    Cell(2, "RNN_TANH", 1, False, 0, False, "RNN", "tanh"),
    Cell(3, "RNN_RELU", 1, False, 0, False, "RNN", "relu"),
    # The original GRU: fastcells.GRU(..., reset_after=False); no torch.nn twin.
    Cell(4, "GRU_RESET_BEFORE", 3, False, 0, False, "GRU", reset_after=False, cuda=False),
    # fastcells.LayerNormLSTM / LayerNormGRU; extra: the LSTM's c_t or the GRU's
    # hh_n, then the raw recurrent and input products (G*H each).
    Cell(5, "LSTM_LN", 4, True, 9, False, "LSTM", base=0, norms=4, cuda=False),
    Cell(6, "GRU_LN", 3, False, 7, False, "GRU", base=1, norms=2, cuda=False),
)
assert all(c.code == k for k, c in enumerate(CELLS)), "codes must be 0, 1, ... in order"

# name -> code, e.g. MODES["GRU"] == 1 (public as fastcells.MODES).
MODES: Dict[str, int] = {c.name: c.code for c in CELLS}

_BY_NAME: Dict[str, Cell] = {c.name: c for c in CELLS}
_BY_MODULE: Dict[Tuple[str, Optional[str], bool, bool], Cell] = {
    (c.nn_class, c.nonlinearity, c.reset_after, c.layer_norm): c for c in CELLS}


def valid_modes() -> str:
    """``"0 (LSTM), 1 (GRU), ... or 4 (GRU_RESET_BEFORE)"``, as the C++ error says."""
    items = [f"{c.code} ({c.name})" for c in CELLS]
    return ", ".join(items[:-1]) + " or " + items[-1] if len(items) > 1 else items[0]


def cell(mode: int) -> Cell:
    """The row of op code ``mode``; ValueError naming ``mode`` if there is none."""
    try:
        k = operator.index(mode)
    except TypeError:
        k = None
    # bool is an int, but True is no cell code; a negative index must not wrap.
    if k is None or isinstance(mode, bool) or not 0 <= k < len(CELLS):
        raise ValueError(f"`mode` must be {valid_modes()}, got {mode!r}")
    return CELLS[k]


def cell_named(name: str) -> Cell:
    """The row of a torch.nn mode string ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown cell {name!r}; expected one of {list(_BY_NAME)}") from None


def cell_of_module(class_name: str, nonlinearity: Optional[str] = None,
                   reset_after: bool = True, layer_norm: bool = False) -> Cell:
    """The row of a module class ("LSTM", "GRUCell", "RNN", ...) and, for the
    Elman RNN, its ``nonlinearity``; for a GRU, its ``reset_after``; for the
    LayerNorm modules, ``layer_norm=True``."""
    base = class_name[:-len("Cell")] if class_name.endswith("Cell") else class_name
    found = (_BY_MODULE.get((base, nonlinearity, reset_after, layer_norm))
             or _BY_MODULE.get((base, None, reset_after, layer_norm)))
    if found is None:
        raise ValueError(f"no fastcells cell for {class_name} (nonlinearity={nonlinearity!r}, "
                         f"reset_after={reset_after!r}, layer_norm={layer_norm!r})")
    return found
