"""The per-step recurrent product against the host's measured FMA peak, per CPU ISA path.

For every CPU ISA path the host runs (fastcells.cpu_isas(), without the
testing path avx512_layout) this measures, on one thread:

* the FMA peak: independent vector FMA chains on the path's own vector width
  (a calibration kernel in the extension, ``torch.ops.fastcells._cpu_fma_peak``);
  also on all threads at once;
* the per-step product y(B, G*H) = h(B, P) @ W_hh^T, as the forward loop runs
  it over a packed W_hh (``_cpu_step_product``), in GFLOP/s and as a fraction
  of that path's peak and of the host's widest peak;
* the same product through ATen's ``at::native::cpublas::brgemm`` (oneDNN's
  micro-kernels, which pick their own ISA) and through ``torch.mm`` (MKL), on
  one thread.

    python benchmarks/cpu_peak.py            # writes results/cpu_peak_<isa>.json and .md
    python benchmarks/cpu_peak.py --quick

<isa> in the file name is the path automatic selection takes on this host.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

# (label, M = batch rows, K = P, N = G*H): LSTM steps (G = 4) from the
# forecasting regime, plus GRU's G = 3 at H = 128.
SHAPES = [
    ("LSTM B=1 H=64", 1, 64, 256),
    ("LSTM B=8 H=64", 8, 64, 256),
    ("LSTM B=16 H=64", 16, 64, 256),
    ("LSTM B=64 H=64", 64, 64, 256),
    ("LSTM B=16 H=128", 16, 128, 512),
    ("LSTM B=64 H=128", 64, 128, 512),
    ("GRU B=64 H=128", 64, 128, 384),
    ("LSTM B=16 H=256", 16, 256, 1024),
    ("LSTM B=64 H=256", 64, 256, 1024),
    ("LSTM B=256 H=256", 256, 256, 1024),
    ("LSTM B=64 H=512", 64, 512, 2048),
]


def reps_for(M: int, K: int, N: int, seconds: float) -> int:
    """Calls that take about `seconds` at ~50 GFLOP/s."""
    return max(3, int(seconds * 50e9 / (2 * M * K * N)))


def best_of(f, rounds: int) -> float:
    """Fastest of `rounds` measurements (seconds per call): the product is
    deterministic work, so the minimum is its cost without interference."""
    return min(f() for _ in range(rounds))


def torch_mm_seconds(M: int, K: int, N: int, reps: int) -> float:
    import time

    a, b = torch.full((M, K), 0.5), torch.full((K, N), 0.25)
    out = torch.empty(M, N)
    torch.mm(a, b, out=out)
    t0 = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b, out=out)
    return (time.perf_counter() - t0) / reps


def measure(isas: list[str], seconds: float, rounds: int, threads: int) -> dict:
    ops = torch.ops.fastcells
    peaks = {}
    for isa in isas:
        one = max(ops._cpu_fma_peak(isa, 1, seconds) for _ in range(rounds))
        all_ = max(ops._cpu_fma_peak(isa, threads, seconds) for _ in range(rounds))
        peaks[isa] = {"gflops_1_thread": one, f"gflops_{threads}_threads": all_}
    widest = max(p["gflops_1_thread"] for p in peaks.values())
    rows = []
    torch.set_num_threads(1)
    for label, M, K, N in SHAPES:
        reps = reps_for(M, K, N, seconds)
        flop = 2.0 * M * K * N
        row = {"shape": label, "M": M, "K": K, "N": N, "paths": {}}
        for isa in isas:
            s = best_of(lambda: ops._cpu_step_product(isa, M, K, N, reps), rounds)
            g = flop / s / 1e9
            row["paths"][isa] = {"seconds": s, "gflops": g,
                                 "fraction_of_path_peak": g / peaks[isa]["gflops_1_thread"],
                                 "fraction_of_host_peak": g / widest}
        s = best_of(lambda: ops._cpu_brgemm_product(M, K, N, reps), rounds)
        row["brgemm"] = {"seconds": s, "gflops": flop / s / 1e9, "fraction_of_host_peak": flop / s / 1e9 / widest}
        s = best_of(lambda: torch_mm_seconds(M, K, N, reps), rounds)
        row["torch_mm"] = {"seconds": s, "gflops": flop / s / 1e9, "fraction_of_host_peak": flop / s / 1e9 / widest}
        rows.append(row)
    torch.set_num_threads(threads)
    return {"peaks": peaks, "host_peak_gflops_1_thread": widest, "rows": rows}


def markdown(res: dict, isas: list[str], machine: dict) -> str:
    out = [f"# Per-step product against the FMA peak ({C.machine_line(machine)})\n",
           f"CPU ISA path selected on this host: `{machine['cpu_isa']}`; host features: "
           f"{machine['host_features']}; commit {machine.get('git_commit')}.\n",
           "FMA peak (GFLOP/s, independent vector FMA chains on each path's vectors):\n"]
    hdr = ["path"] + list(next(iter(res["peaks"].values())).keys())
    out.append(C.md_table(hdr, [[i] + [f"{v:.1f}" for v in res["peaks"][i].values()] for i in isas]))
    out.append("\nPer-step product y(M, N) = x(M, K) @ W (N = G*H), one thread: GFLOP/s "
               "(fraction of the host's widest one-thread peak):\n")
    hdr = ["shape", "M,K,N"] + isas + ["brgemm (oneDNN)", "torch.mm (MKL)"]
    body = []
    for r in res["rows"]:
        cells = [f"{r['paths'][i]['gflops']:.1f} ({r['paths'][i]['fraction_of_host_peak']:.0%})" for i in isas]
        cells += [f"{r[k]['gflops']:.1f} ({r[k]['fraction_of_host_peak']:.0%})" for k in ("brgemm", "torch_mm")]
        body.append([r["shape"], f"{r['M']},{r['K']},{r['N']}"] + cells)
    out.append(C.md_table(hdr, body))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short measurements (smoke test)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=C.RESULTS)
    ap.add_argument("--name", default=None, help="output stem (default cpu_peak_<isa>)")
    args = ap.parse_args(argv)
    fastcells = C.import_fastcells()
    threads = C.set_threads(args.threads)
    # avx512_layout is a testing path (AVX-512's layout on AVX2 instructions,
    # never chosen automatically): its speed means nothing.
    isas = [i for i in fastcells.cpu_isas() if i != "avx512_layout"]
    seconds, rounds = (0.05, 1) if args.quick else (0.3, 3)
    machine = C.machine_info("cpu")
    res = measure(isas, seconds, rounds, threads)
    name = args.name or f"cpu_peak_{machine['cpu_isa']}"
    C.write_json(args.out / f"{name}.json", {"machine": machine, **res})
    md = markdown(res, isas, machine)
    (args.out / f"{name}.md").write_text(md, encoding="utf-8")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
