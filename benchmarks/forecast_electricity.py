"""Day-ahead forecasting of hourly electricity consumption: torch.nn vs fastcells.

Data: ``fastcells.datasets.load_electricity()`` (26,304 hourly values in kW, with
the three daylight-saving artefacts interpolated; see fastcells/data/README.md).
Task: from the last 168 hours (one week) predict the next 24 hours. Inputs per hour:
the standardised load and four calendar features (sin/cos of hour of day and of day
of week), so I = 5; the target is the standardised load of the next 24 hours.
Split by time: the first 80% of hours train (windows whose 24 targets all lie there,
stride 1, shuffled, batch 64); validation forecasts are issued at every midnight in
the last 20% (inputs may reach back into the training period; targets never do).
Model: 2-layer LSTM or GRU (hidden 64 or 128) over the 168 steps, Linear(H, 24) on
the last step; Adam lr 3e-3, MSE.

For each (cell, hidden), the torch.nn model is built from a fixed seed and its
state_dict is loaded into the fastcells model; both see the same batches in the same
order. Training steps alternate between the two (A B / B A by batch), each step
timed; time per epoch is the sum of its step times (batch assembly excluded).

    python benchmarks/forecast_electricity.py                   # 2 epochs x 100 batches, < 5 min
    python benchmarks/forecast_electricity.py --max-batches 0   # full epochs (~330 batches)

Writes benchmarks/results/electricity_<device>.json, .md and .png (or into --out).
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

LOOKBACK = 168
HORIZON = 24
TRAIN_FRACTION = 0.8
# The project's targets (2-core CPU, float32): minimum epoch speed-up by hidden size.
TARGETS = {64: 2.0, 128: 1.0}


class DayAhead(nn.Module):
    """Recurrent encoder over (T=168, B, I=5) and a Linear(H, 24) head on the last step."""

    def __init__(self, rnn_cls: type, input_size: int, hidden: int, layers: int = 2):
        super().__init__()
        self.rnn = rnn_cls(input_size, hidden, num_layers=layers)
        self.head = nn.Linear(hidden, HORIZON)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The next 24 hours from the last step's state: (T, B, I) -> (B, 24)."""
        y, _ = self.rnn(x)
        return self.head(y[-1])


class Data:
    """Standardised series with calendar features, and window index sets."""

    def __init__(self, dtype: torch.dtype, device: str):

        from fastcells.datasets import load_electricity

        df = load_electricity(repair_dst=True)
        y = df["y"].to_numpy(dtype="float64")
        n = len(y)
        self.split = int(n * TRAIN_FRACTION)
        self.mean = float(y[: self.split].mean())
        self.std = float(y[: self.split].std())
        z = (y - self.mean) / self.std
        hour = df["ts"].dt.hour.to_numpy()
        dow = df["ts"].dt.day_of_week.to_numpy()
        feats = np.stack([z, np.sin(2 * np.pi * hour / 24), np.cos(2 * np.pi * hour / 24),
                          np.sin(2 * np.pi * dow / 7), np.cos(2 * np.pi * dow / 7)], axis=1)
        self.feats = torch.tensor(feats, dtype=dtype, device=device)  # (N, 5)
        self.z = torch.tensor(z, dtype=dtype, device=device)  # (N,)
        self.y_kw = y
        self.ts = df["ts"]
        # A window starting at s uses inputs s..s+167 and targets s+168..s+191.
        last_train_start = self.split - LOOKBACK - HORIZON
        self.train_starts = torch.arange(0, last_train_start + 1)
        # Validation: forecast origin (first target hour) at every midnight after the split.
        origins = [o for o in range(self.split, n - HORIZON + 1) if hour[o] == 0]
        self.val_starts = torch.tensor([o - LOOKBACK for o in origins])
        self.input_size = feats.shape[1]
        self.device = device

    def batch(self, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs (168, B, 5) and targets (B, 24) for window starts (B,)."""
        s = starts.to(self.device)
        ix = s[None, :] + torch.arange(LOOKBACK, device=self.device)[:, None]  # (168, B)
        iy = s[:, None] + LOOKBACK + torch.arange(HORIZON, device=self.device)[None, :]  # (B, 24)
        return self.feats[ix].contiguous(), self.z[iy]


def evaluate(model: nn.Module, data: Data, batch: int = 256) -> tuple[dict, torch.Tensor, float]:
    """Validation MAE/RMSE in kW over every midnight forecast; returns (metrics, preds kW (N, 24), seconds)."""
    model.eval()
    preds = []
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(data.val_starts), batch):
            x, _ = data.batch(data.val_starts[i:i + batch])
            preds.append(model(x).double().cpu())
    C.sync(data.device)
    secs = time.perf_counter() - t0
    model.train()
    p = torch.cat(preds) * data.std + data.mean  # (N, 24) kW
    starts = data.val_starts + LOOKBACK
    truth = torch.from_numpy(np.stack([data.y_kw[s:s + HORIZON] for s in starts.tolist()])).double()
    err = p - truth
    return {"mae_kw": err.abs().mean().item(), "rmse_kw": math.sqrt((err ** 2).mean().item())}, p, secs


def batches_per_epoch(data: Data, args) -> int:
    """Training batches per epoch: every window, or --max-batches of them."""
    n = len(data.train_starts) // args.batch
    return min(n, args.max_batches) if args.max_batches else n


def timed_step(m, opt, loss_fn, x, y, device: str) -> tuple[float, float]:
    """One training step (zero_grad, forward, loss, backward, Adam): (seconds, loss)."""
    C.sync(device)
    t0 = time.perf_counter()
    opt.zero_grad()
    loss = loss_fn(m(x), y)
    loss.backward()
    opt.step()
    C.sync(device)
    return time.perf_counter() - t0, float(loss.detach())


def train_sides(sides: dict, data: Data, args, progress) -> dict:
    """--epochs epochs of both sides on the same batches, their steps alternating
    A B / B A by batch; per side: step times, epoch times, training losses and
    the validation metrics after each epoch."""
    opts = {k: torch.optim.Adam(m.parameters(), lr=args.lr) for k, m in sides.items()}
    loss_fn = nn.MSELoss()
    hist = {s: {"step": [], "epoch": [], "loss": [], "val": []} for s in sides}
    gen = torch.Generator().manual_seed(args.seed)
    n_batches = batches_per_epoch(data, args)
    k = 0
    for _ in range(args.epochs):
        perm = data.train_starts[torch.randperm(len(data.train_starts), generator=gen)]
        ep = {s: 0.0 for s in sides}
        ep_loss = {s: 0.0 for s in sides}
        for b in range(n_batches):
            x, y = data.batch(perm[b * args.batch:(b + 1) * args.batch])
            order = list(sides) if k % 2 == 0 else list(sides)[::-1]
            k += 1
            for s in order:
                dt, loss = timed_step(sides[s], opts[s], loss_fn, x, y, args.device)
                hist[s]["step"].append(dt)
                ep[s] += dt
                ep_loss[s] += loss
            progress.update(1)
        for s in sides:
            hist[s]["epoch"].append(ep[s])
            hist[s]["loss"].append(ep_loss[s] / n_batches)
            hist[s]["val"].append(evaluate(sides[s], data)[0])
    return hist


def side_result(m: nn.Module, hist: dict, data: Data) -> tuple[dict, torch.Tensor]:
    """One side's epoch and step times, losses and validation errors, and its
    validation forecasts (kW)."""
    metrics, p, val_s = evaluate(m, data)
    steps = hist["step"]
    # The first step carries one-off costs (allocations, lazy init); report it apart.
    st = steps[1:] if len(steps) > 1 else steps
    return {
        "epoch_s": hist["epoch"],
        "step_ms": C.summary_ms(st),
        "first_step_ms": steps[0] * 1e3,
        "train_loss_per_epoch": hist["loss"],
        "val_per_epoch": hist["val"],
        "val_mae_kw": metrics["mae_kw"],
        "val_rmse_kw": metrics["rmse_kw"],
        "val_inference_s": val_s,
    }, p


def run_config(cell: str, hidden: int, fastcells, data: Data, args, progress) -> tuple[dict, dict]:
    """Both sides of one cell and hidden size trained from the same weights, compared."""
    dtype, device = C.dtype_of(args.dtype), args.device
    name = {"lstm": "LSTM", "gru": "GRU"}[cell]
    torch.manual_seed(args.seed)
    ref = DayAhead(getattr(nn, name), data.input_size, hidden).to(device=device, dtype=dtype)
    new = DayAhead(getattr(fastcells, name), data.input_size, hidden).to(device=device, dtype=dtype)
    new.load_state_dict(copy.deepcopy(ref.state_dict()))
    sides = {"torch.nn": ref, "fastcells": new}
    hist = train_sides(sides, data, args, progress)

    out = {"cell": cell, "hidden": hidden, "batches_per_epoch": batches_per_epoch(data, args)}
    preds = {}
    for s, m in sides.items():
        out[s], preds[s] = side_result(m, hist[s], data)
    r, f = out["torch.nn"], out["fastcells"]
    out["speedup_epoch"] = sum(r["epoch_s"]) / sum(f["epoch_s"])
    out["speedup_epoch_per_epoch"] = [a / b for a, b in zip(r["epoch_s"], f["epoch_s"])]
    out["speedup_median_step"] = r["step_ms"]["median"] / f["step_ms"]["median"]
    out["max_abs_val_pred_diff_kw"] = (preds["torch.nn"] - preds["fastcells"]).abs().max().item()
    out["val_mae_diff_kw"] = abs(r["val_mae_kw"] - f["val_mae_kw"])
    out["target_epoch_speedup"] = TARGETS.get(hidden) if device == "cpu" and args.dtype == "float32" else None
    return out, preds


def plot(results, preds, data: Data, path: Path, title: str) -> None:
    """The first validation week's forecasts of both sides against the actual load, a panel per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    days = 7
    first = data.val_starts[0].item() + LOOKBACK
    hours = np.arange(days * HORIZON)
    truth = data.y_kw[first:first + days * HORIZON]
    n = len(results)
    cols = 2 if n > 1 else 1
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 2.8 * rows), squeeze=False, sharey=True,
                             layout="constrained")
    for ax, res in zip(axes.flat, results):
        key = (res["cell"], res["hidden"])
        ax.plot(hours, truth, color="black", lw=1.2, label="actual")
        for s, (ls, color) in {"torch.nn": ("--", "tab:orange"), "fastcells": (":", "tab:blue")}.items():
            p = preds[key][s][:days].reshape(-1).numpy()
            ax.plot(hours, p, ls=ls, color=color, lw=1.6, label=f"{s} (val MAE {res[s]['val_mae_kw']:.0f} kW)")
        for d in range(1, days):
            ax.axvline(d * HORIZON, color="0.85", lw=0.6)
        ax.set_title(f"{res['cell'].upper()} hidden {res['hidden']}: speed-up {res['speedup_epoch']:.2f}x per epoch",
                     fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
        ax.set_xlabel(f"hours from {data.ts.iloc[first]:%Y-%m-%d %H:%M} (each day forecast at midnight)", fontsize=8)
        ax.set_ylabel("kW")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(title, fontsize=8)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv: list[str] | None):
    """(parser, arguments), with args.cells and args.hiddens as lists."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--max-batches", type=int, default=100, help="training batches per epoch (0: all)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--cells", default="lstm,gru")
    ap.add_argument("--hidden", default="64,128")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=["float32", "float64", "bfloat16"], default="float32")
    ap.add_argument("--threads", type=int, default=None)
    C.add_tf32_flag(ap)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=C.RESULTS)
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    args.cells = [c.strip() for c in args.cells.split(",")]
    args.hiddens = [int(h) for h in args.hidden.split(",")]
    if any(c not in ("lstm", "gru") for c in args.cells):
        ap.error("--cells: choose from lstm, gru")
    return ap, args


def summary_table(results: list[dict]) -> str:
    """Every configuration: epoch and step times, speed-up, validation errors."""
    header = ["cell", "hidden", "torch.nn s/epoch", "fastcells s/epoch", "speed-up", "step ms nn [IQR]",
              "step ms fc [IQR]", "val MAE kW nn / fc", "val RMSE kW nn / fc", "max |pred diff| kW"]
    rows = []
    for r in results:
        a, b = r["torch.nn"], r["fastcells"]
        rows.append([r["cell"].upper(), r["hidden"], f"{sum(a['epoch_s']) / len(a['epoch_s']):.2f}",
                     f"{sum(b['epoch_s']) / len(b['epoch_s']):.2f}", f"{r['speedup_epoch']:.2f}x",
                     f"{a['step_ms']['median']:.1f} [{a['step_ms']['p25']:.1f}-{a['step_ms']['p75']:.1f}]",
                     f"{b['step_ms']['median']:.1f} [{b['step_ms']['p25']:.1f}-{b['step_ms']['p75']:.1f}]",
                     f"{a['val_mae_kw']:.1f} / {b['val_mae_kw']:.1f}", f"{a['val_rmse_kw']:.1f} / {b['val_rmse_kw']:.1f}",
                     f"{r['max_abs_val_pred_diff_kw']:.3g}"])
    return C.md_table(header, rows)


def write_outputs(results, preds, table: str, data: Data, args, machine: dict, threads: int,
                  n_batches: int) -> None:
    """JSON, markdown and (unless --no-plot) the figure under --out."""
    stem = C.result_stem("electricity", args.device, args.dtype)
    cfg = {"lookback_h": LOOKBACK, "horizon_h": HORIZON, "input_size": data.input_size, "layers": 2,
           "batch": args.batch, "epochs": args.epochs, "batches_per_epoch": n_batches,
           "train_windows": len(data.train_starts), "val_forecasts": len(data.val_starts), "lr": args.lr,
           "optimizer": "Adam", "loss": "MSELoss on standardised load", "device": args.device, "dtype": args.dtype,
           "threads": threads, "seed": args.seed, "split_time": str(data.ts.iloc[data.split]),
           "dst_lows": "interpolated (load_electricity(repair_dst=True))",
           "timing": "sum of per-step wall times (zero_grad, forward, loss, backward, Adam step); steps alternate "
                     "torch.nn / fastcells A B / B A by batch; batch assembly excluded"}
    out = {"benchmark": "forecast_electricity", "machine": machine, "config": cfg, "results": results,
           "table_markdown": table}
    args.out.mkdir(parents=True, exist_ok=True)
    C.write_json(args.out / f"{stem}.json", out)
    with open(args.out / f"{stem}.md", "w", encoding="utf-8") as f:
        f.write(f"# Electricity day-ahead forecasting: torch.nn vs fastcells ({args.device}, {args.dtype})\n\n")
        f.write(f"Machine: {C.machine_line(machine)}. 168 h -> 24 h, batch 64, 2 layers, {args.epochs} epoch(s) of "
                f"{n_batches} batches; validation: {len(data.val_starts)} midnight forecasts after "
                f"{data.ts.iloc[data.split]:%Y-%m-%d}.\n\n")
        f.write(table)
    if not args.no_plot:
        plot(results, preds, data, args.out / f"{stem}.png",
             f"Electricity, first validation week, day-ahead forecasts ({args.epochs} epochs x {n_batches} batches): "
             f"{C.machine_line(machine)}")
    print(f"wrote {args.out / stem}.json, .md" + ("" if args.no_plot else ", .png"))


def train_configs(fastcells, data: Data, args, n_batches: int) -> tuple[list[dict], dict]:
    """Every (cell, hidden) in turn: (results, validation forecasts by configuration)."""
    from tqdm import tqdm

    configs = [(c, h) for h in args.hiddens for c in args.cells]
    results, preds = [], {}
    with tqdm(total=len(configs) * args.epochs * n_batches, unit="batch", file=sys.stderr, mininterval=1.0) as bar:
        for cell, hidden in configs:
            bar.set_description(f"{cell} H={hidden}")
            res, p = run_config(cell, hidden, fastcells, data, args, bar)
            results.append(res)
            preds[(cell, hidden)] = p
    return results, preds


def print_verdicts(results: list[dict]) -> None:
    """The epoch speed-up targets, one line each."""
    for r in results:
        tgt = r["target_epoch_speedup"]
        if tgt:
            verdict = "PASS" if r["speedup_epoch"] >= tgt else "FAIL"
            print(f"target {r['cell']} H={r['hidden']}: epoch speed-up {r['speedup_epoch']:.2f}x vs >= {tgt:g}x "
                  f"-> {verdict}")


def main(argv: list[str] | None = None) -> int:
    """Train both sides of every configuration, print the comparison and the targets, write the results."""
    ap, args = parse_args(argv)
    fastcells, threads = C.start_training_run(ap, args)
    data = Data(C.dtype_of(args.dtype), args.device)
    machine = C.machine_info(args.device)
    print(f"electricity day-ahead | {C.machine_line(machine)} | {args.device} {args.dtype} | "
          f"{len(data.train_starts)} train windows, {len(data.val_starts)} validation days | "
          f"split at {data.ts.iloc[data.split]:%Y-%m-%d %H:%M}", flush=True)
    n_batches = batches_per_epoch(data, args)
    results, preds = train_configs(fastcells, data, args, n_batches)

    table = summary_table(results)
    print(table)
    print_verdicts(results)
    write_outputs(results, preds, table, data, args, machine, threads, n_batches)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
