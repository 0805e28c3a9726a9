"""Helpers shared by the benchmark scripts: machine description, statistics,
interleaved timing, JSON output.

Not part of the installed package; the scripts import it from their own folder.
"""
from __future__ import annotations

import copy

import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"


def import_fastcells():
    """Import the built fastcells package or exit with the build command.

    The benchmarks never fall back to torch.nn: a comparison of torch.nn with
    itself would print a meaningless speed-up.
    """
    try:
        import fastcells
    except ImportError as exc:
        sys.exit(
            f"fastcells could not be imported ({exc}).\n"
            "Build it first:  pip install --no-build-isolation -e .   (from the repository root)"
        )
    return fastcells


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (falls back to platform.processor())."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    """The SIMD extensions relevant to the kernels that this CPU reports."""
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni",
              "avx512_bf16", "amx_tile", "amx_bf16")
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [w for w in wanted if w in have]
    except OSError:
        pass
    return []


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def machine_info(device: str = "cpu") -> dict:
    """Everything needed to say where a number was measured."""
    import fastcells

    info = {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "fastcells": getattr(fastcells, "__version__", None),
        # The CPU ISA path fastcells ran on (every CPU result depends on it)
        # and the features the host reports to the extension.
        "cpu_isa": fastcells.cpu_isa(),
        "cpu_isas": fastcells.cpu_isas(),
        "host_features": fastcells.cpu_host_features(),
        "git_commit": git_commit(),
        "mkldnn_enabled": bool(torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": device,
        # Load average when the run started: the machines are shared, and a busy
        # machine moves absolute times (ratios measured in one run move less).
        "loadavg_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
        info["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
        info["cuda_matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    return info


def device_tag(device: str) -> str:
    """The part of a result file name that says where it ran: ``cuda``, or for
    the CPU ``cpu_<isa>`` with the CPU ISA path fastcells runs on (results are
    kept per ISA: ``sweep_cpu_avx2.json``, ``sweep_cpu_avx512.json``)."""
    if device != "cpu":
        return device
    import fastcells

    return f"cpu_{fastcells.cpu_isa()}"


def result_stem(name: str, device: str, dtype: str) -> str:
    """<name>_<device tag>, with _<dtype> unless the run is float32."""
    return f"{name}_{device_tag(device)}" + ("" if dtype == "float32" else f"_{dtype}")


def machine_line(m: dict) -> str:
    s = f"{m['cpu']}, {m['torch_threads']} threads, torch {m['torch']}"
    if m.get("cpu_isa"):
        s += f", fastcells CPU path {m['cpu_isa']}"
    if m.get("gpu"):
        s = f"{m['gpu']} (CUDA {m.get('cuda')}, cuDNN {m.get('cudnn')}), host {s}"
    return s


def quantile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default method)."""
    s = sorted(xs)
    if not s:
        return float("nan")
    pos = (len(s) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summary(xs: Sequence[float]) -> dict:
    """Median, quartiles, IQR, min, max and count of a sample."""
    return {
        "median": statistics.median(xs),
        "p25": quantile(xs, 0.25),
        "p75": quantile(xs, 0.75),
        "iqr": quantile(xs, 0.75) - quantile(xs, 0.25),
        "min": min(xs),
        "max": max(xs),
        "n": len(xs),
    }


def geomean(xs: Sequence[float]) -> float:
    xs = [x for x in xs if x > 0 and math.isfinite(x)]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timer_median(stmt: Callable[[], object], min_run_time: float, threads: int, device: str) -> float:
    """Median seconds per call of ``stmt`` with torch.utils.benchmark (blocked_autorange).

    On CUDA the Timer synchronises around each block.
    """
    from torch.utils import benchmark

    t = benchmark.Timer(stmt="f()", globals={"f": stmt}, num_threads=threads)
    return t.blocked_autorange(min_run_time=min_run_time).median


def interleaved(
    stmts: dict[str, Callable[[], object]], repeats: int, min_run_time: float, threads: int, device: str
) -> dict[str, list[float]]:
    """Time every statement ``repeats`` times, alternating the order each round.

    Round r runs the statements in order (A, B) when r is even and (B, A) when r
    is odd, so drift on a shared machine lands on both sides. Returns the
    per-round medians (seconds) of each statement.
    """
    names = list(stmts)
    out: dict[str, list[float]] = {n: [] for n in names}
    for f in stmts.values():  # warm-up: first-call allocations, lazy init
        f()
    sync(device)
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            out[n].append(timer_median(stmts[n], min_run_time, threads, device))
    return out


def ratio_summary(ref: Sequence[float], new: Sequence[float]) -> dict:
    """Speed-up ref/new per round (both measured in the same round), summarised."""
    return summary([a / b for a, b in zip(ref, new)])


def pair_summary(res: dict[str, list[float]]) -> dict:
    """torch.nn and fastcells per-round seconds (from ``interleaved``) as
    millisecond summaries and their speed-up."""
    return {
        "torch.nn_ms": summary([v * 1e3 for v in res["torch.nn"]]),
        "fastcells_ms": summary([v * 1e3 for v in res["fastcells"]]),
        "speedup": ratio_summary(res["torch.nn"], res["fastcells"]),
    }


def summary_ms(seconds: Sequence[float]) -> dict:
    """``summary`` of a sample in seconds, its values (not the count) in milliseconds."""
    return {k: (v * 1e3 if k != "n" else v) for k, v in summary(seconds).items()}


def module_stmts(m: torch.nn.Module, x: torch.Tensor, g: torch.Tensor):
    """(forward without grad, forward+backward into every parameter and the input) of an
    RNN module whose first output is backpropagated with gradient g."""
    xg = x.detach().clone().requires_grad_(True)

    def fwd():
        with torch.no_grad():
            return m(x)[0]

    def fwd_bwd():
        y = m(xg)[0]
        torch.autograd.backward(y, g)
        return y

    return fwd, fwd_bwd


def make_pair(fastcells, cell: str, I: int, H: int, device, dtype, seed: int = 0, **kw):
    """torch.nn's module `cell` ("lstm", "gru", "rnn") and fastcells' with the same
    weights (a copy of torch.nn's state_dict), `kw` the constructor options."""
    name = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}[cell]
    torch.manual_seed(seed)
    ref = getattr(torch.nn, name)(I, H, **kw).to(device=device, dtype=dtype)
    new = getattr(fastcells, name)(I, H, **kw).to(device=device, dtype=dtype)
    new.load_state_dict(copy.deepcopy(ref.state_dict()))
    return ref, new


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=False, allow_nan=True)
        f.write("\n")


def write_results(out_dir: str | Path, stem: str, obj: dict, markdown: str) -> None:
    """<out_dir>/<stem>.json and .md, and the markdown on stdout."""
    path = Path(out_dir)
    write_json(path / f"{stem}.json", obj)
    (path / f"{stem}.md").write_text(markdown)
    print(markdown)


def dtype_of(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
            "float16": torch.float16}[name]


def add_tf32_flag(ap) -> None:
    ap.add_argument("--tf32", action="store_true",
                    help="CUDA float32: let torch.nn (cuDNN, cuBLAS) use TF32 tensor cores, as torch does "
                         "by default for cuDNN. Off by default, so that both sides compute in full float32 "
                         "and their predictions can be compared. fastcells' cuBLAS products follow the "
                         "same switch; its persistent kernels never use TF32")


def set_tf32(enabled: bool) -> None:
    """Sets torch's TF32 switches for cuDNN and CUDA matmuls (machine_info records them)."""
    torch.backends.cudnn.allow_tf32 = bool(enabled)
    torch.backends.cuda.matmul.allow_tf32 = bool(enabled)


def set_threads(n: int | None) -> int:
    if n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def start_training_run(ap, args):
    """Checks shared by the forecasting scripts, then (fastcells module, thread count)."""
    if args.epochs < 1:
        ap.error("--epochs must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    set_tf32(args.tf32)
    return import_fastcells(), set_threads(args.threads)


def fmt_ms(s: float) -> str:
    ms = s * 1e3
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def md_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"
