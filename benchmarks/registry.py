"""The benchmarks, in one table that run.py, make_readme_tables.py and the
smoke tests share: each script's file, what it measures, the stem of its
result files and the arguments of its quick form.

A result file is <stem>_<device>.json with <device> cuda or cpu_<isa>, except
for the CPU-only benchmarks (``cpu_only``), named <stem>_<isa>.json; the
CUDA-only ones (``cuda_only``) have only <stem>_cuda.json.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Benchmark:
    name: str
    script: str
    what: str
    stem: str | None  # None: writes no result of its own
    quick: tuple[str, ...] = ()  # arguments of the quick form
    cpu_only: bool = False
    cuda_only: bool = False
    needs: tuple[str, ...] = ()  # optional libraries it imports


BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark("airline", "forecast_airline.py",
              "the tutorial's airline forecaster trained with torch.nn and fastcells",
              "airline", ("--epochs", "50")),
    Benchmark("airline_speed", "airline_speed.py",
              "airline model forward, forward+backward and epoch; single-layer grid",
              "airline_speed", ("--quick",)),
    Benchmark("electricity", "forecast_electricity.py",
              "day-ahead electricity load forecasting, 2-layer LSTM/GRU",
              "electricity", ("--max-batches", "5", "--epochs", "1")),
    Benchmark("sweep", "sweep.py", "Timer sweep over shapes, cells, dtypes and modes",
              "sweep", ("--quick",)),
    Benchmark("cpu_peak", "cpu_peak.py",
              "FMA peak per ISA path and the per-step product's share of it",
              "cpu_peak", ("--quick",), cpu_only=True),
    Benchmark("shared_cores", "shared_cores.py",
              "team-split shapes quiet, beside a busy core and at one thread",
              "shared_cores", ("--quick",), cpu_only=True),
    Benchmark("decode", "decode.py",
              "one-step decoding loop against torch.nn and ONNX Runtime; T=1 call cost",
              "decode", ("--quick",)),
    Benchmark("ecosystem", "ecosystem.py",
              "gluonts DeepAR and pytorch-forecasting, stock and under fastcells.patched()",
              "ecosystem", ("--epochs", "1"), needs=("gluonts", "pytorch_forecasting")),
    Benchmark("variants", "variants.py",
              "cell variants (LayerNorm, zoneout, ...) against their reference loops",
              "variants", ("--quick",)),
    Benchmark("cuda_targets", "cuda_targets.py",
              "CUDA speed targets against cuDNN (needs a GPU)",
              "targets", ("--rounds", "1"), cuda_only=True),
)

BY_NAME = {b.name: b for b in BENCHMARKS}


def result_name(stem: str, device: str) -> str | None:
    """The file a benchmark with `stem` writes for `device` (cuda or cpu_<isa>),
    None where it does not run there."""
    b = next((b for b in BENCHMARKS if b.stem == stem), None)
    if b is not None and b.cuda_only and device != "cuda":
        return None
    if b is not None and b.cpu_only:
        return f"{stem}_{device[4:]}.json" if device.startswith("cpu_") else None
    return f"{stem}_{device}.json"
