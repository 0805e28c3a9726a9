"""Compile check of every CUDA source with nvcc, no GPU needed.

The kernels in csrc/cuda/*.cu are torch-free (CUDA runtime + csrc/kernels
only), so nvcc compiles them on its own in seconds. Each file is compiled for
sm_80 and sm_90, the two architectures the extension targets by default; the
two compilations of a file run in parallel. sm_80 is compiled with the
build's full optimisation (so ptxas checks register use under the kernels'
launch bounds as built); sm_90 with light optimisation (-Xcicc -O1 -Xptxas
-O0), which still runs the whole front end and ptxas at about half the cost.
Warnings count as failures.
Skipped only when nvcc cannot be found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin).
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CU_FILES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
# arch -> extra nvcc flags
ARCHS = {"sm_80": [], "sm_90": ["-Xcicc", "-O1", "-Xptxas", "-O0"]}


def find_nvcc() -> str | None:
    """nvcc from PATH, $CUDA_HOME/bin or /usr/local/cuda/bin."""
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            cand = os.path.join(home, "bin", "nvcc")
            if os.path.isfile(cand) and os.access(cand, os.X_OK):
                return cand
    return None


NVCC = find_nvcc()
needs_nvcc = pytest.mark.skipif(
    NVCC is None, reason="nvcc not found in PATH, $CUDA_HOME/bin or /usr/local/cuda/bin")


def test_cuda_sources_exist() -> None:
    names = {os.path.basename(f) for f in CU_FILES}
    assert "recurrent_cuda.cu" in names, f"csrc/cuda has {sorted(names)}"


@needs_nvcc
@pytest.mark.parametrize("path", CU_FILES, ids=[os.path.basename(f) for f in CU_FILES])
def test_nvcc_compiles(path: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        procs = {}
        for arch, extra in ARCHS.items():
            obj = os.path.join(tmp, f"{arch}.o")
            cmd = [NVCC, "-std=c++17", "-c", "-o", obj, f"--gpu-architecture={arch}",
                   "-Xcompiler", "-Wall", *extra, path]
            procs[arch] = (obj, subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                                 stderr=subprocess.STDOUT, text=True))
        failures = []
        for arch, (obj, proc) in procs.items():
            out, _ = proc.communicate(timeout=300)
            if proc.returncode != 0 or "warning" in out.lower():
                failures.append(f"--- {arch} (exit {proc.returncode}) ---\n{out}")
            elif not os.path.getsize(obj):
                failures.append(f"--- {arch}: empty object file ---")
        assert not failures, "\n".join(failures)
