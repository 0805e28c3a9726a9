"""fastcells and torch.nn with another busy process on the machine's cores.

Speed at one thread and on shared cores matters: DataLoader workers, DDP with
a thread per rank, several models served side by side. This times the no_grad
forward and the forward+backward of single-layer models whose time loop runs
on a thread team (units split: one or two barriers per step), interleaved
with torch.nn as in sweep.py, in three settings:

* ``quiet``: nothing else runs;
* ``busy``: a second process spins on one core for the whole measurement;
* ``1 thread``: both sides at one thread, quiet.

    python benchmarks/shared_cores.py          # results/shared_cores_<isa>.json and .md
    python benchmarks/shared_cores.py --quick
"""
from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

# (cell, T, B, I, H): team with units split (B too small for a row split).
SHAPES = [
    ("lstm", 112, 1, 16, 128),
    ("lstm", 112, 8, 16, 128),
    ("lstm", 168, 16, 16, 64),
    ("gru", 112, 1, 16, 128),
    ("lstm", 112, 4, 16, 256),
]

BUSY = "import time\nend = time.time() + 3600\nwhile time.time() < end:\n    pass\n"


@contextlib.contextmanager
def busy_neighbour(on: bool):
    """A second process spinning on a core while the block runs."""
    if not on:
        yield
        return
    p = subprocess.Popen([sys.executable, "-c", BUSY])
    try:
        yield
    finally:
        p.kill()
        p.wait()


def modules(fastcells, cell: str, I: int, H: int):
    cls = {"lstm": nn.LSTM, "gru": nn.GRU}[cell]
    torch.manual_seed(0)
    ref = cls(I, H)
    fc = {"lstm": fastcells.LSTM, "gru": fastcells.GRU}[cell](I, H)
    fc.load_state_dict(ref.state_dict())
    return ref, fc


def run(fastcells, setting: str, threads: int, repeats: int, min_run_time: float) -> list[dict]:
    nt = 1 if setting == "1 thread" else threads
    torch.set_num_threads(nt)
    rows = []
    with busy_neighbour(setting == "busy"):
        for cell, T, B, I, H in SHAPES:
            ref, fc = modules(fastcells, cell, I, H)
            x = torch.randn(T, B, I)
            g = torch.randn(T, B, H)
            for mode, (r_stmt, f_stmt) in zip(("fwd", "fwd+bwd"),
                                              zip(C.module_stmts(ref, x, g), C.module_stmts(fc, x, g))):
                t = C.interleaved({"torch.nn": r_stmt, "fastcells": f_stmt}, repeats, min_run_time, nt, "cpu")
                rows.append({"setting": setting, "threads": nt, "cell": cell, "T": T, "B": B, "I": I, "H": H,
                             "mode": mode, "torch_nn_s": C.summary(t["torch.nn"]),
                             "fastcells_s": C.summary(t["fastcells"]),
                             "speedup": C.ratio_summary(t["torch.nn"], t["fastcells"])})
    torch.set_num_threads(threads)
    return rows


def markdown(rows: list[dict], machine: dict) -> str:
    out = [f"# fastcells vs torch.nn on shared cores ({C.machine_line(machine)})\n",
           "Median ms per call; speed-up = torch.nn / fastcells within a round. `busy`: another "
           "process spins on one core meanwhile.\n"]
    body = []
    for r in rows:
        body.append([r["setting"], r["threads"], r["cell"], f"{r['T']},{r['B']},{r['I']},{r['H']}", r["mode"],
                     C.fmt_ms(r["torch_nn_s"]["median"]), C.fmt_ms(r["fastcells_s"]["median"]),
                     f"{r['speedup']['median']:.2f}x"])
    out.append(C.md_table(["setting", "threads", "cell", "T,B,I,H", "mode", "torch.nn ms", "fastcells ms",
                           "speed-up"], body))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one round, short timings (smoke test)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=C.RESULTS)
    ap.add_argument("--name", default=None, help="output stem (default shared_cores_<isa>)")
    args = ap.parse_args(argv)
    fastcells = C.import_fastcells()
    threads = C.set_threads(args.threads)
    repeats, mrt = (1, 0.02) if args.quick else (args.repeats, 0.2)
    machine = C.machine_info("cpu")
    rows = []
    for setting in ("quiet", "busy", "1 thread"):
        rows += run(fastcells, setting, threads, repeats, mrt)
    name = args.name or f"shared_cores_{machine['cpu_isa']}"
    C.write_json(args.out / f"{name}.json", {"machine": machine, "rows": rows})
    md = markdown(rows, machine)
    (args.out / f"{name}.md").write_text(md, encoding="utf-8")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
