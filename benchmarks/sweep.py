"""Micro-benchmark sweep: fastcells vs torch.nn, LSTM / GRU / RNN, forward and forward+backward.

Every point builds a torch.nn module from a fixed seed, loads its state_dict into
the fastcells module, and times both with torch.utils.benchmark.Timer
(blocked_autorange), alternating A B / B A over ``--repeats`` rounds. The speed-up
is torch.nn / fastcells within a round; the reported value is its median over the
rounds. Input layout is (T, B, I); forward runs under no_grad; forward+backward
back-propagates a fixed random gradient into every parameter and the input.

Grids (the issue's full grid is T in {24,112,168,512} x B in {1,8,64,256} x I in
{1,3,16,64} x H in {6,...,512} x layers {1,2} x {uni, bi} x 3 cells x 2 dtypes,
~20k measurements, hours on 2 cores; ``--grid full`` runs it):

``standard`` (default, about 5-9 minutes on 2 cores):
  A. heat map, float32: T=112, I=16, 1 layer, unidirectional,
     B in {1, 8, 64, 256} x H in {6, 16, 32, 64, 128, 256};
  B. float32 around (T, B, I, H) = (112, 64, 16, 64): T in {24, 168, 512},
     I in {1, 3, 64}, H = 512, 2 layers, bidirectional, 2 layers bidirectional,
     and the seed's airline model (112, 1, 3, 6, 2 layers);
  C. bfloat16: T=112, I=16, B in {1, 64} x H in {16, 64, 256}.
``quick`` (about a minute): float32, T=112, I=16, B in {1, 64} x H in {16, 128},
  one round.

    python benchmarks/sweep.py              # standard grid
    python benchmarks/sweep.py --quick
    python benchmarks/sweep.py --device cuda    # reference: torch.nn on CUDA (cuDNN)

Writes benchmarks/results/sweep_<device>.json, .md and _heatmap.png (or into --out).
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

CELLS = ("lstm", "gru", "rnn")
MODES = ("fwd", "fwd+bwd")
HEAT_B = (1, 8, 64, 256)
HEAT_H = (6, 16, 32, 64, 128, 256)
FORECAST_MAX_H = 256  # the "forecasting regime" of the target


def point(T, B, I, H, layers=1, bidir=False, dtype="float32", block="A"):
    """One shape of the grid, with the block (table) it belongs to."""
    return {"T": T, "B": B, "I": I, "H": H, "layers": layers, "bidirectional": bidir, "dtype": dtype, "block": block}


def grid(name: str) -> list[dict]:
    """The shapes of grid `name` (standard, quick or full), in measurement order."""
    if name == "quick":
        return [point(112, B, 16, H) for B in (1, 64) for H in (16, 128)]
    if name == "full":
        pts = []
        for dt, T, B, I, H, L, bi in itertools.product(
            ("float32", "bfloat16"), (24, 112, 168, 512), (1, 8, 64, 256), (1, 3, 16, 64),
            (6, 16, 32, 64, 128, 256, 512), (1, 2), (False, True)
        ):
            pts.append(point(T, B, I, H, L, bi, dt, "full"))
        return pts
    pts = [point(112, B, 16, H) for B in HEAT_B for H in HEAT_H]
    base = dict(T=112, B=64, I=16, H=64)
    for T in (24, 168, 512):
        pts.append(point(**{**base, "T": T}, block="B"))
    for I in (1, 3, 64):
        pts.append(point(**{**base, "I": I}, block="B"))
    pts.append(point(**{**base, "H": 512}, block="B"))
    pts.append(point(**base, layers=2, block="B"))
    pts.append(point(**base, bidir=True, block="B"))
    pts.append(point(**base, layers=2, bidir=True, block="B"))
    pts.append(point(112, 1, 3, 6, layers=2, block="B"))
    pts += [point(112, B, 16, H, dtype="bfloat16", block="C") for B in (1, 64) for H in (16, 64, 256)]
    return pts


def make_pair(fastcells, cell, p, device):
    """torch.nn's and fastcells' module of `cell` at shape `p`, with the same weights."""
    return C.make_pair(fastcells, cell, p["I"], p["H"], device, C.dtype_of(p["dtype"]),
                       num_layers=p["layers"], bidirectional=p["bidirectional"])


def stmts_for(m, x, g):
    """The module's statements to time, by mode."""
    return dict(zip(("fwd", "fwd+bwd"), C.module_stmts(m, x, g)))


def label(p) -> str:
    """A shape as the tables show it: T,B,I,H, then L<layers> and bi where they apply."""
    s = f"{p['T']},{p['B']},{p['I']},{p['H']}"
    if p["layers"] > 1:
        s += f" L{p['layers']}"
    if p["bidirectional"]:
        s += " bi"
    return s


def heat_panel(ax, sel: list[dict], cell: str, mode: str, Bs: list[int], Hs: list[int], norm):
    """One cell and mode of the heat map: log2 speed-up over B x H, each square labelled."""
    import numpy as np

    grid_ = np.full((len(Bs), len(Hs)), np.nan)
    for r in sel:
        if r["cell"] == cell and r["mode"] == mode:
            grid_[Bs.index(r["B"]), Hs.index(r["H"])] = r["speedup"]["median"]
    im = ax.imshow(np.log2(grid_), cmap="RdBu", norm=norm, aspect="auto")
    for a in range(len(Bs)):
        for b in range(len(Hs)):
            if np.isfinite(grid_[a, b]):
                v = grid_[a, b]
                ax.text(b, a, f"{v:.1f}" if v >= 1 else f"{v:.2f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(Hs)), [str(h) for h in Hs], fontsize=7)
    ax.set_yticks(range(len(Bs)), [str(b) for b in Bs], fontsize=7)
    ax.set_xlabel("H", fontsize=8)
    ax.set_ylabel("B", fontsize=8)
    ax.set_title(f"{cell.upper()} {mode}", fontsize=9)
    return im


def heatmap(rows, path: Path, title: str) -> None:
    """The float32 heat-map block's speed-ups as a figure, a panel per cell and mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    sel = [r for r in rows if r["block"] in ("A", "quick") and r["dtype"] == "float32"]
    Bs = sorted({r["B"] for r in sel})
    Hs = sorted({r["H"] for r in sel})
    if not Bs or not Hs:
        return
    cells = [c for c in CELLS if any(r["cell"] == c for r in sel)]
    fig, axes = plt.subplots(len(MODES), len(cells), figsize=(3.3 * len(cells), 2.9 * len(MODES)), squeeze=False,
                             layout="constrained")
    vals = [np.log2(r["speedup"]["median"]) for r in sel]
    lim = max(1.0, max(abs(v) for v in vals))
    norm = TwoSlopeNorm(vcenter=0.0, vmin=-lim, vmax=lim)
    im = None
    for i, mode in enumerate(MODES):
        for j, cell in enumerate(cells):
            im = heat_panel(axes[i, j], sel, cell, mode, Bs, Hs, norm)
    cbar = fig.colorbar(im, ax=axes, shrink=0.8)
    ticks = [t for t in range(-int(lim), int(lim) + 1)]
    cbar.set_ticks(ticks, labels=[f"{2.0 ** t:g}x" for t in ticks])
    cbar.set_label("speed-up torch.nn / fastcells (blue: fastcells faster)", fontsize=8)
    fig.suptitle(title, fontsize=8)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command line, with --quick expanded and the cells and device checked."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--grid", choices=["standard", "quick", "full"], default="standard")
    ap.add_argument("--quick", action="store_true", help="same as --grid quick --repeats 1 --min-run-time 0.05")
    ap.add_argument("--cells", default="lstm,gru,rnn")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    C.add_tf32_flag(ap)
    ap.add_argument("--repeats", type=int, default=2, help="interleaved rounds per point")
    ap.add_argument("--min-run-time", type=float, default=0.1, help="seconds per blocked_autorange")
    ap.add_argument("--no-bf16", action="store_true", help="skip the bfloat16 points")
    ap.add_argument("--out", type=Path, default=C.RESULTS)
    ap.add_argument("--name", default=None, help="output stem (default sweep_<device>[_quick], <device> = cuda or cpu_<isa>)")
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="stop starting new shapes after this many minutes and write what was measured "
                         "(the JSON and markdown then say the grid is incomplete)")
    args = ap.parse_args(argv)
    if args.quick:
        args.grid, args.repeats, args.min_run_time = "quick", 1, 0.05
    args.cells = tuple(c.strip() for c in args.cells.split(","))
    if any(c not in CELLS for c in args.cells):
        ap.error(f"--cells: choose from {CELLS}")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    return args


def points_of(args) -> list[dict]:
    """The grid's shapes, without bfloat16 under --no-bf16."""
    pts = grid(args.grid)
    if args.no_bf16:
        pts = [p for p in pts if p["dtype"] != "bfloat16"]
    if args.grid == "quick":
        for p in pts:
            p["block"] = "quick"
    return pts


def measure_shape(fastcells, p: dict, args, threads: int, bar) -> list[dict]:
    """Both modes of every cell at one shape: torch.nn and fastcells interleaved."""
    device = args.device
    dtype = C.dtype_of(p["dtype"])
    D = 2 if p["bidirectional"] else 1
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(p["T"], p["B"], p["I"], generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    g = torch.randn(p["T"], p["B"], D * p["H"], generator=gen, dtype=torch.float64).to(device=device,
                                                                                          dtype=dtype)
    rows = []
    for cell in args.cells:
        ref, new = make_pair(fastcells, cell, p, device)
        with torch.no_grad():
            diff = (ref(x)[0].float() - new(x)[0].float()).abs().max().item()
        s_ref, s_new = stmts_for(ref, x, g), stmts_for(new, x, g)
        for mode in MODES:
            res = C.interleaved({"torch.nn": s_ref[mode], "fastcells": s_new[mode]}, args.repeats,
                                args.min_run_time, threads, device)
            row = {**p, "cell": cell, "mode": mode, **C.pair_summary(res), "max_abs_output_diff": diff}
            rows.append(row)
            bar.set_description(f"{cell} {label(p)} {p['dtype']} {mode}: x{row['speedup']['median']:.2f}")
            bar.update(1)
        del ref, new
    return rows


def measure(fastcells, pts: list[dict], args, threads: int) -> tuple[list[dict], int]:
    """Every shape in order, until --max-minutes: (rows, shapes not measured)."""
    from tqdm import tqdm

    rows = []
    t_start = time.time()
    with tqdm(total=len(pts) * len(args.cells) * len(MODES), file=sys.stderr, unit="pair",
              mininterval=1.0) as bar:
        for i, p in enumerate(pts):
            # The first shape always runs: a limit checked before it would
            # depend on how long start-up took (the progress bar alone can
            # take tens of milliseconds).
            if i > 0 and args.max_minutes is not None and time.time() - t_start > 60 * args.max_minutes:
                skipped = len(pts) - i
                print(f"\n--max-minutes {args.max_minutes}: stopping with {skipped} of {len(pts)} shapes "
                      "not measured", file=sys.stderr, flush=True)
                return rows, skipped
            rows += measure_shape(fastcells, p, args, threads, bar)
    return rows, 0


def geomeans(rows: list[dict], cells) -> dict:
    """Geometric-mean speed-up (and range) per cell, mode and dtype."""
    geo = {}
    for dt in sorted({r["dtype"] for r in rows}):
        for cell in cells:
            for mode in MODES + ("all",):
                sel = [r["speedup"]["median"] for r in rows if r["dtype"] == dt and r["cell"] == cell
                       and (mode == "all" or r["mode"] == mode)]
                if sel:
                    geo[f"{cell}/{mode}/{dt}"] = {"geomean": C.geomean(sel), "min": min(sel), "max": max(sel),
                                                  "n": len(sel)}
    return geo


def speedup_table(rows: list[dict], cells, dt: str) -> str:
    """One dtype's speed-ups: a line per shape, a column per cell and mode."""
    shapes = []
    for r in rows:
        if r["dtype"] == dt and label(r) not in shapes:
            shapes.append(label(r))
    header = ["T,B,I,H"] + [f"{c.upper()} {m}" for c in cells for m in MODES] + ["torch.nn ms (LSTM f+b)"]
    body = []
    for s in shapes:
        line = [s]
        for c in cells:
            for m in MODES:
                hit = [r for r in rows if r["dtype"] == dt and label(r) == s and r["cell"] == c and r["mode"] == m]
                line.append(f"{hit[0]['speedup']['median']:.2f}x" if hit else "")
        ref_ms = [r for r in rows if r["dtype"] == dt and label(r) == s and r["mode"] == "fwd+bwd"]
        line.append(C.fmt_ms(ref_ms[0]["torch.nn_ms"]["median"] / 1e3) if ref_ms else "")
        body.append(line)
    return C.md_table(header, body)


def markdown(rows: list[dict], geo: dict, slower: list[dict], args, machine: dict, elapsed: float,
             n_points: int, skipped: int) -> str:
    """The results as markdown: geometric means, a table per dtype, the slower points."""
    cells, device = args.cells, args.device
    md = [f"# fastcells vs torch.nn sweep ({device}, grid `{args.grid}`)\n\n",
          f"Machine: {C.machine_line(machine)}; load average at start {machine.get('loadavg_1_5_15')}. "
          f"Speed-up = torch.nn time / fastcells time, median of {args.repeats} interleaved rounds of "
          f"blocked_autorange({args.min_run_time}s). Shapes are T,B,I,H (1 layer, unidirectional unless "
          f"marked). Below 1.00x fastcells is slower. Run time {elapsed / 60:.1f} min.\n\n"]
    if skipped:
        md.append(f"**Incomplete grid:** stopped by --max-minutes {args.max_minutes} with {skipped} of "
                  f"{n_points} shapes not measured; the tables below hold the {n_points - skipped} that were.\n\n")
    md.append("## Geometric-mean speed-up per cell\n\n")
    md.append(C.md_table(["cell", "dtype", "fwd", "fwd+bwd", "all", "min", "max"],
                         [[c.upper(), dt, f"{geo[f'{c}/fwd/{dt}']['geomean']:.2f}x",
                           f"{geo[f'{c}/fwd+bwd/{dt}']['geomean']:.2f}x", f"{geo[f'{c}/all/{dt}']['geomean']:.2f}x",
                           f"{geo[f'{c}/all/{dt}']['min']:.2f}x", f"{geo[f'{c}/all/{dt}']['max']:.2f}x"]
                          for dt in sorted({r['dtype'] for r in rows}) for c in cells
                          if f"{c}/all/{dt}" in geo]))
    for dt in sorted({r["dtype"] for r in rows}):
        md.append(f"\n## Speed-up, {dt}\n\n")
        md.append(speedup_table(rows, cells, dt))
    md.append("\n## Where fastcells is slower than torch.nn\n\n")
    if slower:
        md.append(C.md_table(["cell", "T,B,I,H", "dtype", "mode", "torch.nn ms", "fastcells ms", "speed-up"],
                             [[r["cell"].upper(), label(r), r["dtype"], r["mode"],
                               C.fmt_ms(r["torch.nn_ms"]["median"] / 1e3),
                               C.fmt_ms(r["fastcells_ms"]["median"] / 1e3), f"{r['speedup']['median']:.2f}x"]
                              for r in slower]))
    else:
        md.append("Nowhere in this grid.\n")
    return "".join(md)


def verdict(slower_forecast: list[dict], skipped: int) -> str:
    """PASS or FAIL on the forecasting regime; no PASS for an incomplete grid."""
    if skipped and not slower_forecast:
        return "incomplete grid, no verdict"
    return "PASS" if not slower_forecast else "FAIL"


def results(rows: list[dict], geo: dict, slower: list[dict], slower_forecast: list[dict], args,
            machine: dict, threads: int, elapsed: float, n_points: int, skipped: int) -> dict:
    """The JSON record: machine, configuration and method, geometric means, slower points, rows."""
    device = args.device
    return {
        "benchmark": "sweep",
        "machine": machine,
        "config": {"grid": args.grid, "device": device, "threads": threads, "repeats": args.repeats,
                   "min_run_time_s": args.min_run_time, "cells": list(args.cells), "elapsed_s": elapsed,
                   "shapes_total": n_points, "shapes_not_measured": skipped,
                   "layout": "(T, B, I), batch_first=False",
                   "method": "torch.utils.benchmark.Timer.blocked_autorange medians; torch.nn and fastcells "
                             "alternate A B / B A each round; speed-up = torch.nn / fastcells per round",
                   "reference": "torch.nn on CUDA (cuDNN)" if device == "cuda" else "torch.nn on CPU"},
        "geomean_speedup": geo,
        "slower_than_torch_nn": [{"cell": r["cell"], "shape": label(r), "dtype": r["dtype"], "mode": r["mode"],
                                  "speedup": r["speedup"]["median"]} for r in slower],
        "forecast_regime_pass": (not slower_forecast) if not skipped else (False if slower_forecast else None),
        "rows": rows,
    }


def write_outputs(out: dict, md_text: str, args, machine: dict, elapsed: float) -> None:
    """JSON, markdown and heat map under --out, named by --name or the device and grid."""
    device = args.device
    stem = args.name or (f"sweep_{C.device_tag(device)}" + ("_quick" if args.grid == "quick" else ""))
    args.out.mkdir(parents=True, exist_ok=True)
    C.write_json(args.out / f"{stem}.json", out)
    (args.out / f"{stem}.md").write_text(md_text, encoding="utf-8")
    heatmap(out["rows"], args.out / f"{stem}_heatmap.png",
            f"fastcells speed-up over torch.nn, T=112, I=16, 1 layer, float32 ({device}): {C.machine_line(machine)}")
    print(f"wrote {args.out / stem}.json, .md, _heatmap.png ({elapsed / 60:.1f} min)")


def main(argv: list[str] | None = None) -> int:
    """Measure the grid, print the tables and the verdict, write the results."""
    args = parse_args(argv)
    fastcells = C.import_fastcells()
    C.set_tf32(args.tf32)
    threads = C.set_threads(args.threads)
    device = args.device
    machine = C.machine_info(device)
    pts = points_of(args)
    n_meas = len(pts) * len(args.cells) * len(MODES)
    print(f"sweep ({args.grid}) | {C.machine_line(machine)} | {device} | {len(pts)} shapes x {len(args.cells)} cells x "
          f"2 modes = {n_meas} pairs, {args.repeats} rounds, blocked_autorange({args.min_run_time}s)", flush=True)
    t_start = time.time()
    rows, skipped = measure(fastcells, pts, args, threads)
    elapsed = time.time() - t_start

    geo = geomeans(rows, args.cells)
    slower = [r for r in rows if r["speedup"]["median"] < 1.0]
    slower_forecast = [r for r in slower if r["H"] <= FORECAST_MAX_H and r["dtype"] == "float32"]
    md_text = markdown(rows, geo, slower, args, machine, elapsed, len(pts), skipped)
    print()
    print(md_text)
    print(f"forecasting regime (float32, H <= {FORECAST_MAX_H}): {len(slower_forecast)} point(s) slower than "
          f"torch.nn -> {verdict(slower_forecast, skipped)}")
    out = results(rows, geo, slower, slower_forecast, args, machine, threads, elapsed, len(pts), skipped)
    write_outputs(out, md_text, args, machine, elapsed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
