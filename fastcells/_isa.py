"""The CPU ISA path the fused ops run on (see csrc/cpu/isa.h).

One build holds the CPU kernels for several x86 levels and picks one when the
library loads: the widest the host supports (``avx512_bf16``, else
``avx512``, else ``avx2``, else the portable ``generic`` path, which is also
the only one off x86), or the one
the environment variable ``FASTCELLS_CPU_ISA`` names. A switch that names an
unknown path, or one the host cannot run, raises at ``import fastcells``.

``avx512_layout`` is a testing path: the avx512 path's kernel source, vector
width and register blocks on AVX2 instructions, so that hosts without
AVX-512 test its tiling and tails. It is never picked automatically.

``avx512_bf16`` is ``avx512`` (bit for bit, in float32 and float64) plus
products on bfloat16 operands (``vdpbf16ps``, float32 sums) for bfloat16
inputs, where ``avx512`` widens them to float32 first.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List

import torch

from . import _C  # noqa: F401  (loads the library and its registrations)


def cpu_isa() -> str:
    """Name of the CPU ISA path in use, e.g. ``"avx2"``."""
    return torch.ops.fastcells.cpu_isa()


def cpu_isas(built: bool = False) -> List[str]:
    """Paths this host can run (narrowest first); with ``built``, every path in the build."""
    return list(torch.ops.fastcells.cpu_isas(built))


def cpu_host_features() -> str:
    """The host's x86 features the paths depend on, e.g. ``"avx avx2 fma avx512f ..."``."""
    return torch.ops.fastcells.cpu_host_features()


def set_cpu_isa(name: str) -> str:
    """Makes ``name`` (a path of :func:`cpu_isas`, or ``"auto"``) the path in use.

    Returns the previous path. Raises ``RuntimeError`` naming the host's
    features if the host cannot run it. Calls already running finish on the
    path they started on. For tests and A/B runs; ``FASTCELLS_CPU_ISA`` does the
    same for a whole process.
    """
    return torch.ops.fastcells.set_cpu_isa(name)


@contextlib.contextmanager
def use_cpu_isa(name: str) -> Iterator[str]:
    """Runs the block on the CPU ISA path ``name``, then restores the previous one."""
    previous = set_cpu_isa(name)
    try:
        yield name
    finally:
        set_cpu_isa(previous)


# Select the path now, so that a bad FASTCELLS_CPU_ISA fails the import with
# its message rather than the first forward.
cpu_isa()
