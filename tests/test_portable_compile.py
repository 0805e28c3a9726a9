"""The CPU backend builds for a non-x86 host: csrc/cpu compiled for aarch64.

Off x86 the only CPU ISA path is `generic` (csrc/cpu/isa.h); the x86 wrappers
must compile to nothing and the dispatch must reference the generic path
alone. This cross-compiles the ISA layer with aarch64-linux-gnu-g++ (Debian's
g++-aarch64-linux-gnu) against the installed torch's headers and checks the
symbols. Warnings count as failures. Skipped when the cross-compiler is absent.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CXX = shutil.which("aarch64-linux-gnu-g++")
NM = shutil.which("aarch64-linux-gnu-nm")

pytestmark = pytest.mark.skipif(CXX is None or NM is None,
                                reason="aarch64-linux-gnu-g++ not installed (apt install g++-aarch64-linux-gnu)")

SOURCES = ["isa.cpp", "isa_generic.cpp", "isa_avx2.cpp", "isa_avx512.cpp", "isa_avx512_layout.cpp"]


def _compile(src: str, out: str) -> None:
    inc = os.path.join(os.path.dirname(torch.__file__), "include")
    cmd = [CXX, "-std=c++17", "-O1", "-fopenmp", "-fno-trapping-math", "-fno-math-errno", "-Wall",
           "-Werror", "-Wno-unused-parameter", "-I", inc, "-I", os.path.join(inc, "torch", "csrc", "api", "include"),
           "-I", sysconfig.get_paths()["include"], "-c", os.path.join(ROOT, "csrc", "cpu", src), "-o", out]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]


def _symbols(obj: str) -> str:
    return subprocess.run([NM, "-C", obj], capture_output=True, text=True, check=True).stdout


def test_cpu_layer_cross_compiles_for_aarch64(tmp_path):
    objs = {}
    for src in SOURCES:
        objs[src] = str(tmp_path / (src + ".o"))
        _compile(src, objs[src])
    assert " T fastcells::cpu::generic::kernels()" in _symbols(objs["isa_generic.cpp"])
    dispatch = _symbols(objs["isa.cpp"])
    assert "U fastcells::cpu::generic::kernels()" in dispatch
    assert "avx2::" not in dispatch and "avx512" not in dispatch
    for src in ("isa_avx2.cpp", "isa_avx512.cpp", "isa_avx512_layout.cpp"):
        assert "fastcells" not in _symbols(objs[src]), f"{src} is x86-only and must be empty here"
