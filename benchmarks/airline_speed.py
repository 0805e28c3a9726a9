"""Speed targets of the fused-module issue: fastcells vs torch.nn, ratios measured in one run.

1. The seed's airline model (T=112, B=1, I=3, H=6, 2 layers), LSTM and GRU:
   forward (no grad), forward+backward of the recurrent module, and a whole training
   epoch (zero_grad, forward, Linear head, MSE loss, backward, Adam step).
   Also two bounds on the LSTM ratios, each timed against torch.nn on all 112 steps:
   row "fixed", fastcells' forward+backward (and row "epoch fixed", its training
   epoch) on one step (T=1): the speed-up reachable by making the recurrence itself
   faster; row "epoch bound", the same epoch around a stand-in RNN that costs
   nothing (see FreeRNN): the speed-up no RNN implementation can pass.
2. Single-layer forward and forward+backward at (T, B, I, H) = (128, 32, 8, 32),
   (168, 64, 16, 64), (168, 64, 64, 128), (256, 32, 128, 256), (64, 128, 256, 512).

Every measurement is torch.utils.benchmark.Timer.blocked_autorange; the torch.nn
and fastcells statements (identical weights and inputs) alternate A B / B A over
several rounds; the speed-up is torch.nn / fastcells within each round, reported as
the median over rounds with its min-max. PASS/FAIL lines against the targets are
informative: the script exits 0 either way.

    python benchmarks/airline_speed.py            # ~2 minutes on 2 cores
    python benchmarks/airline_speed.py --quick    # ~30 s, fewer rounds

Writes benchmarks/results/airline_speed_<device>.json and .md (or into --out).
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

AIRLINE = (112, 1, 3, 6)
GRID = [(128, 32, 8, 32), (168, 64, 16, 64), (168, 64, 64, 128), (256, 32, 128, 256), (64, 128, 256, 512)]
# The project's speed targets for the airline model (CPU float32): minimum speed-ups.
AIRLINE_TARGETS = {("lstm", "fwd+bwd"): 10.0, ("lstm", "epoch"): 2.5, ("gru", "fwd+bwd"): 50.0, ("gru", "epoch"): 20.0}
GRID_TARGET = 1.0  # never slower


def make_pair(fastcells, cell: str, I: int, H: int, layers: int, dtype, device):
    """torch.nn's and fastcells' module of `cell`, with the same weights."""
    return C.make_pair(fastcells, cell, I, H, device, dtype, num_layers=layers)


class FreeRNN(nn.Module):
    """A stand-in for the recurrent module of the tutorial's model that costs nothing.

    It holds parameters of the same shapes as ``like`` and returns a precomputed output
    (T, B, H); its forward also sets every parameter's ``.grad`` to a preallocated zero
    tensor, so that zero_grad, the head, the loss, backward and Adam's update of every
    parameter run exactly as in the real epoch. An epoch around it is the part of the
    epoch that no RNN implementation can remove.
    """

    def __init__(self, like: nn.Module, T: int, B: int, H: int):
        super().__init__()
        self.params = nn.ParameterList([nn.Parameter(p.detach().clone()) for p in like.parameters()])
        p0 = self.params[0]
        self.out = torch.zeros(T, B, H, device=p0.device, dtype=p0.dtype)
        self.zero_grads = [torch.zeros_like(p) for p in self.params]

    def forward(self, x: torch.Tensor):
        """The precomputed output, every parameter's gradient preset to zeros."""
        for p, g in zip(self.params, self.zero_grads):
            p.grad = g
        return (self.out,)


def epoch_stmt(m: nn.Module, x: torch.Tensor, y: torch.Tensor, H: int):
    """A training epoch of the tutorial's model around the recurrent module ``m``."""
    head = nn.Linear(H, 1).to(device=x.device, dtype=x.dtype)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in head.parameters():
            p.uniform_(-0.3, 0.3)
    params = list(m.parameters()) + list(head.parameters())
    opt = torch.optim.Adam(params, lr=0.1)
    loss_fn = nn.MSELoss()

    def epoch():
        opt.zero_grad()
        out = m(x)[0]
        t, b, h = out.shape
        pred = head(out.reshape(-1, h)).view(t, b, 1)
        loss = loss_fn(pred, y)
        loss.backward()
        opt.step()
        return loss

    epoch.optimizer = opt  # for inspection (tests)
    return epoch


def measure(stmts_ref, stmts_new, args, device) -> dict:
    """torch.nn's and fastcells' statement timed interleaved: their times and speed-up."""
    res = C.interleaved({"torch.nn": stmts_ref, "fastcells": stmts_new}, args.repeats, args.min_run_time,
                        torch.get_num_threads(), device)
    return C.pair_summary(res)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command line, with --quick expanded and the device checked."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=["float32", "float64", "bfloat16"], default="float32")
    ap.add_argument("--threads", type=int, default=None)
    C.add_tf32_flag(ap)
    ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds per measurement")
    ap.add_argument("--grid-repeats", type=int, default=3, help="rounds for the single-layer grid")
    ap.add_argument("--min-run-time", type=float, default=0.2, help="seconds per blocked_autorange")
    ap.add_argument("--quick", action="store_true", help="2 rounds, 0.05 s per measurement")
    ap.add_argument("--skip-grid", action="store_true")
    ap.add_argument("--out", type=Path, default=C.RESULTS)
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats, args.grid_repeats, args.min_run_time = 2, 1, 0.05
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    return args


class Report:
    """The measured rows, each printed as it arrives; a target is judged on
    CPU float32 runs only."""

    def __init__(self, device: str, dtype: str):
        self.device, self.dtype, self.rows = device, dtype, []

    def add(self, group, cell, T, B, I, H, layers, what, r, target=None):
        """Record one measurement `r` (with its target, if judged) and print it."""
        row = {"group": group, "cell": cell, "T": T, "B": B, "I": I, "H": H, "layers": layers, "what": what, **r}
        if target is not None and self.device == "cpu" and self.dtype == "float32":
            row["target"] = target
            row["pass"] = r["speedup"]["median"] >= target
        self.rows.append(row)
        sp = r["speedup"]
        tag = "" if "pass" not in row else (f"  target >= {target:g}x: " + ("PASS" if row["pass"] else "FAIL"))
        print(f"{group:8s} {cell:4s} T={T:3d} B={B:3d} I={I:3d} H={H:3d} L={layers} {what:11s} "
              f"nn {r['torch.nn_ms']['median']:9.3f} ms  fc {r['fastcells_ms']['median']:9.3f} ms  "
              f"x{sp['median']:7.2f} [{sp['min']:.2f}-{sp['max']:.2f}]{tag}", flush=True)


def airline_rows(fastcells, cell: str, args, dtype, rep: Report) -> None:
    """The airline model: forward, forward+backward and a training epoch (for the
    LSTM also its fixed-cost and bound rows)."""
    device = args.device
    T, B, I, H = AIRLINE
    ref, new = make_pair(fastcells, cell, I, H, 2, dtype, device)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(T, B, I, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    y = torch.rand(T, B, 1, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    gy = torch.randn(T, B, H, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    f_ref, fb_ref = C.module_stmts(ref, x, gy)
    f_new, fb_new = C.module_stmts(new, x, gy)
    rep.add("airline", cell, T, B, I, H, 2, "fwd", measure(f_ref, f_new, args, device))
    rep.add("airline", cell, T, B, I, H, 2, "fwd+bwd", measure(fb_ref, fb_new, args, device),
            AIRLINE_TARGETS[(cell, "fwd+bwd")])
    if cell == "lstm":
        # The fixed cost of one fastcells fwd+bwd call: the same module on one
        # step (T=1), timed against torch.nn on the whole sequence. Its ratio is
        # the speed-up fastcells would reach if its 112 steps cost nothing.
        _, fb_one = C.module_stmts(new, x[:1], gy[:1])
        rep.add("airline", cell, 1, B, I, H, 2, "fixed", measure(fb_ref, fb_one, args, device))
    ref_e, new_e = make_pair(fastcells, cell, I, H, 2, dtype, device)
    rep.add("airline", cell, T, B, I, H, 2, "epoch",
            measure(epoch_stmt(ref_e, x, y, H), epoch_stmt(new_e, x, y, H), args, device),
            AIRLINE_TARGETS[(cell, "epoch")])
    if cell == "lstm":
        # Bounds on the epoch ratio: fastcells' epoch on one step, and an epoch whose
        # RNN costs nothing, each against torch.nn's epoch on all 112 steps.
        ref_b, new_b = make_pair(fastcells, cell, I, H, 2, dtype, device)
        rep.add("airline", cell, 1, B, I, H, 2, "epoch fixed",
                measure(epoch_stmt(ref_b, x, y, H), epoch_stmt(new_b, x[:1], y[:1], H), args, device))
        ref_f, _ = make_pair(fastcells, cell, I, H, 2, dtype, device)
        free = FreeRNN(ref_f, T, B, H)
        rep.add("airline", cell, T, B, I, H, 2, "epoch bound",
                measure(epoch_stmt(ref_f, x, y, H), epoch_stmt(free, x, y, H), args, device))


def grid_rows(fastcells, args, dtype, rep: Report) -> None:
    """The single-layer grid: forward and forward+backward, LSTM and GRU."""
    device = args.device
    grid_args = copy.copy(args)
    grid_args.repeats = args.grid_repeats
    for (T, B, I, H) in GRID:
        for cell in ("lstm", "gru"):
            ref, new = make_pair(fastcells, cell, I, H, 1, dtype, device)
            g = torch.Generator().manual_seed(0)
            x = torch.randn(T, B, I, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
            gy = torch.randn(T, B, H, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
            f_ref, fb_ref = C.module_stmts(ref, x, gy)
            f_new, fb_new = C.module_stmts(new, x, gy)
            rep.add("grid", cell, T, B, I, H, 1, "fwd", measure(f_ref, f_new, grid_args, device), GRID_TARGET)
            rep.add("grid", cell, T, B, I, H, 1, "fwd+bwd", measure(fb_ref, fb_new, grid_args, device),
                    GRID_TARGET)


def markdown_table(rows: list[dict]) -> str:
    """The rows as one markdown table, with each target's verdict."""
    header = ["group", "cell", "T,B,I,H", "layers", "measure", "torch.nn ms", "fastcells ms",
              "speed-up (min-max)", "target"]
    md_rows = []
    for r in rows:
        tgt = ""
        if "target" in r:
            tgt = f">= {r['target']:g}x " + ("PASS" if r["pass"] else "FAIL")
        sp = r["speedup"]
        md_rows.append([r["group"], r["cell"].upper(), f"{r['T']},{r['B']},{r['I']},{r['H']}", r["layers"], r["what"],
                        C.fmt_ms(r["torch.nn_ms"]["median"] / 1e3), C.fmt_ms(r["fastcells_ms"]["median"] / 1e3),
                        f"{sp['median']:.2f}x ({sp['min']:.2f}-{sp['max']:.2f})", tgt])
    return C.md_table(header, md_rows)


def results(rows: list[dict], args, machine: dict, threads: int, n_tgt: int, n_fail: int) -> dict:
    """The JSON record: machine, configuration and method, rows, targets met."""
    return {
        "benchmark": "airline_speed",
        "machine": machine,
        "config": {"device": args.device, "dtype": args.dtype, "threads": threads, "repeats": args.repeats,
                   "grid_repeats": args.grid_repeats, "min_run_time_s": args.min_run_time,
                   "method": "torch.utils.benchmark.Timer.blocked_autorange medians; torch.nn and fastcells "
                             "alternate A B / B A each round; speed-up = torch.nn / fastcells per round",
                   "fwd": "module(x) under no_grad", "fwd+bwd": "module(x) then backward with a fixed grad "
                   "output into all parameters and x",
                   "epoch": "zero_grad, forward, Linear(H,1), MSELoss, backward, Adam(lr=0.1) step",
                   "fixed": "torch.nn fwd+bwd at T=112 against fastcells fwd+bwd of the same model at T=1 "
                   "(row T=1): the speed-up bound set by fastcells' per-call cost",
                   "epoch fixed": "torch.nn epoch at T=112 against fastcells' epoch of the same model at T=1",
                   "epoch bound": "torch.nn epoch at T=112 against the same epoch around FreeRNN: "
                   "precomputed output, parameter gradients preset to zeros, so zero_grad, head, loss, "
                   "backward and Adam over every parameter run as usual: the bound for any RNN"},
        "rows": rows,
        "targets_passed": n_tgt - n_fail,
        "targets_total": n_tgt,
    }


def measure_all(fastcells, args) -> list[dict]:
    """Every row: the airline model for each cell, then the grid unless --skip-grid."""
    dtype = C.dtype_of(args.dtype)
    rep = Report(args.device, args.dtype)
    for cell in ("lstm", "gru"):
        airline_rows(fastcells, cell, args, dtype, rep)
    if not args.skip_grid:
        grid_rows(fastcells, args, dtype, rep)
    return rep.rows


def write_outputs(rows: list[dict], table: str, args, machine: dict, threads: int, n_tgt: int,
                  n_fail: int) -> None:
    """JSON and markdown under --out."""
    device = args.device
    stem = C.result_stem("airline_speed", device, args.dtype)
    args.out.mkdir(parents=True, exist_ok=True)
    C.write_json(args.out / f"{stem}.json", results(rows, args, machine, threads, n_tgt, n_fail))
    with open(args.out / f"{stem}.md", "w", encoding="utf-8") as f:
        f.write(f"# fastcells vs torch.nn: speed targets of the airline model ({device}, {args.dtype})\n\n")
        f.write(f"Machine: {C.machine_line(machine)}. Medians of {args.repeats} (airline) / {args.grid_repeats} "
                f"(grid) interleaved rounds of blocked_autorange; speed-up = torch.nn / fastcells.\n\n")
        f.write(table)
    print(f"wrote {args.out / (stem + '.json')} and {stem}.md")


def main(argv: list[str] | None = None) -> int:
    """Time every row, print the table and the targets met, write the results."""
    args = parse_args(argv)
    fastcells = C.import_fastcells()
    C.set_tf32(args.tf32)
    threads = C.set_threads(args.threads)
    machine = C.machine_info(args.device)
    print(f"airline_speed | {C.machine_line(machine)} | {args.device} {args.dtype} | "
          f"{args.repeats} rounds x blocked_autorange({args.min_run_time}s)", flush=True)
    rows = measure_all(fastcells, args)

    table = markdown_table(rows)
    n_fail = sum(1 for r in rows if r.get("pass") is False)
    n_tgt = sum(1 for r in rows if "pass" in r)
    print()
    print(table)
    if n_tgt:
        print(f"targets: {n_tgt - n_fail}/{n_tgt} PASS" + (f", {n_fail} FAIL" if n_fail else ""))
    write_outputs(rows, table, args, machine, threads, n_tgt, n_fail)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
