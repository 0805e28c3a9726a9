"""The CUDA issue's speed targets, fastcells against torch.nn (cuDNN) in one run.

Forward + backward of one layer at the issue's (T, B, I, H) shapes, float32 and
bfloat16, LSTM and GRU, interleaved rounds (the order rotates every round);
the speed-up is torch.nn / fastcells within a round and the reported value its
median over the rounds.

fastcells is timed twice: with the loop it picks itself ("auto": the
persistent kernel for small H, the per-step loop beyond) and with the per-step
cuBLAS loop forced (FASTCELLS_CUDA_RECURRENT=stepwise). The second column shows
where the crossover between the two loops lies. TF32 is off on both sides
unless --tf32 is given (as in the other benchmarks).

    python benchmarks/cuda_targets.py --out benchmarks/results

Writes targets_cuda.json and targets_cuda.md into --out. Needs a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils import benchmark

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

SHAPES = [(112, 1, 3, 6), (168, 64, 16, 64), (168, 64, 64, 128), (168, 64, 64, 256),
          (512, 16, 32, 256), (64, 64, 256, 512), (64, 128, 512, 1024)]
# column name -> FASTCELLS_CUDA_RECURRENT (None: the torch.nn module)
VARIANTS = {"torch.nn": None, "fastcells": "auto", "fastcells_stepwise": "stepwise"}


def time_point(fastcells, cell: str, dtype: torch.dtype, shape, rounds: int, min_run_time: float,
               forward_only: bool = False) -> dict:
    T, B, I, H = shape
    torch.manual_seed(0)
    ref = getattr(nn, cell)(I, H).to("cuda", dtype)
    fc = getattr(fastcells, cell)(I, H).to("cuda", dtype)
    fc.load_state_dict(ref.state_dict())
    x = torch.randn(T, B, I, device="cuda", dtype=dtype, requires_grad=True)
    gy = torch.randn(T, B, H, device="cuda", dtype=dtype)

    def step(m):
        if forward_only:
            with torch.no_grad():
                m(x)
            return
        y, _ = m(x)
        y.backward(gy)

    names = list(VARIANTS)
    times: dict[str, list[float]] = {n: [] for n in names}
    saved = os.environ.get("FASTCELLS_CUDA_RECURRENT")
    try:
        for r in range(rounds):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                path = VARIANTS[name]
                if path is not None:
                    os.environ["FASTCELLS_CUDA_RECURRENT"] = path
                m = ref if path is None else fc
                t = benchmark.Timer("step(m); torch.cuda.synchronize()",
                                    globals={"step": step, "m": m, "torch": torch})
                times[name].append(t.blocked_autorange(min_run_time=min_run_time).median)
    finally:
        if saved is None:
            os.environ.pop("FASTCELLS_CUDA_RECURRENT", None)
        else:
            os.environ["FASTCELLS_CUDA_RECURRENT"] = saved
    ratios = [a / b for a, b in zip(times["torch.nn"], times["fastcells"])]
    ratios_sw = [a / b for a, b in zip(times["torch.nn"], times["fastcells_stepwise"])]
    return {"cell": cell, "dtype": str(dtype).replace("torch.", ""), "T": T, "B": B, "I": I, "H": H,
            "torch_nn_ms": 1e3 * statistics.median(times["torch.nn"]),
            "fastcells_ms": 1e3 * statistics.median(times["fastcells"]),
            "fastcells_stepwise_ms": 1e3 * statistics.median(times["fastcells_stepwise"]),
            "speedup": statistics.median(ratios), "speedup_min": min(ratios), "speedup_max": max(ratios),
            "speedup_stepwise": statistics.median(ratios_sw)}


def markdown(meta: dict, rows: list[dict]) -> str:
    tf32 = "on" if meta["cudnn_allow_tf32"] else "off"
    lines = [f"GPU: {meta['gpu']}, torch {meta['torch']}, CUDA {meta['cuda']}, cuDNN {meta['cudnn']}, "
             f"TF32 {tf32} on both sides. One layer, {meta.get('pass', 'forward+backward')}; speed-up = torch.nn / fastcells, "
             "median of interleaved rounds. 'stepwise': fastcells with the per-step cuBLAS loop forced.", "",
             "| cell | dtype | T | B | I | H | torch.nn ms | fastcells ms | speed-up (min-max) "
             "| stepwise ms | stepwise speed-up |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['cell']} | {r['dtype']} | {r['T']} | {r['B']} | {r['I']} | {r['H']} | "
                     f"{r['torch_nn_ms']:.3f} | {r['fastcells_ms']:.3f} | {r['speedup']:.2f}x "
                     f"({r['speedup_min']:.2f}-{r['speedup_max']:.2f}) | "
                     f"{r['fastcells_stepwise_ms']:.3f} | {r['speedup_stepwise']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=C.RESULTS)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--min-run-time", type=float, default=0.15, help="seconds per blocked_autorange")
    ap.add_argument("--forward-only", action="store_true",
                    help="time the no_grad forward instead of forward+backward")
    C.add_tf32_flag(ap)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("cuda_targets.py needs a CUDA device", file=sys.stderr)
        return 2
    C.set_tf32(args.tf32)
    fastcells = C.import_fastcells()

    rows = []
    for cell in ("LSTM", "GRU"):
        for dtype in (torch.float32, torch.bfloat16):
            for shape in SHAPES:
                row = time_point(fastcells, cell, dtype, shape, args.rounds, args.min_run_time,
                                 args.forward_only)
                rows.append(row)
                print(json.dumps(row), flush=True)
    meta = C.machine_info("cuda")
    meta["build"] = fastcells._ops.build_info()
    meta["pass"] = "no_grad forward" if args.forward_only else "forward+backward"
    stem = "targets_cuda" + ("_fwd" if args.forward_only else "") + ("_tf32" if args.tf32 else "")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps({"machine": meta, "rows": rows}, indent=1))
    md = markdown(meta, rows)
    (args.out / f"{stem}.md").write_text(md)
    print(md)
    print(f"wrote {args.out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
