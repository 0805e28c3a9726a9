"""The seed tutorial's airline-passenger forecaster, trained with torch.nn and with fastcells.

The task, exactly as in the tutorial: the 144 monthly passenger counts, min-max
normalised; ``look_back=3`` so X is (141, 1, 3) in (seq, batch, feature) layout and
Y is (141, 1, 1); the first 80% (112 steps) train, the rest (29 steps) test; a
2-layer recurrent net with hidden size 6 and a Linear(6, 1) head; Adam lr 0.1,
MSELoss, 1000 full-batch epochs. Fitted and forecast values come from running the
trained model over all 141 steps, as the tutorial's plot does.

For each cell, one torch.nn model is built from a fixed seed and its state_dict is
loaded into the fastcells model, so both start from the same weights. The two are
trained in alternating chunks of epochs (A B B A ...), each epoch timed on its own.

    python benchmarks/forecast_airline.py                 # LSTM and GRU, CPU, float32
    python benchmarks/forecast_airline.py --cell all --threads 1
    python benchmarks/forecast_airline.py --device cuda   # reference is torch.nn on CUDA (cuDNN)

Writes benchmarks/results/airline_<device>[_<dtype>].json and .png (or into --out).
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

LOOK_BACK = 3
HIDDEN = 6
LAYERS = 2
LR = 0.1
TRAIN_RATE = 0.8
CELLS = ("lstm", "gru", "rnn")
# The project's targets for the training epoch (2-core CPU, float32).
TARGETS = {"lstm": 2.5, "gru": 20.0}


class Forecaster(nn.Module):
    """The tutorial's model: a recurrent stack followed by Linear(hidden, 1) on every step."""

    def __init__(self, rnn_cls: type, input_size: int = LOOK_BACK, hidden: int = HIDDEN, layers: int = LAYERS):
        super().__init__()
        self.rnn = rnn_cls(input_size=input_size, hidden_size=hidden, num_layers=layers)
        self.output = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """A prediction on every step: (T, B, I) -> (T, B, 1)."""
        y, _ = self.rnn(x)
        t, b, h = y.shape
        return self.output(y.reshape(-1, h)).view(t, b, -1)


def make_data(dtype: torch.dtype, device: str):
    """Tutorial steps 1-3: normalise, window with look_back=3, split 80/20 in time."""
    import numpy as np

    from fastcells.datasets import load_airline

    df = load_airline()
    p = df["passengers"].to_numpy(dtype="float64")
    lo, hi = float(p.min()), float(p.max())
    series = (p - lo) / (hi - lo)
    n = len(series) - LOOK_BACK
    xs = np.stack([series[i:i + LOOK_BACK] for i in range(n)])  # (141, 3)
    ys = series[LOOK_BACK:]  # (141,)
    x = torch.tensor(xs, dtype=torch.float64).reshape(-1, 1, LOOK_BACK).to(device=device, dtype=dtype)
    y = torch.tensor(ys, dtype=torch.float64).reshape(-1, 1, 1).to(device=device, dtype=dtype)
    n_train = int(x.shape[0] * TRAIN_RATE)
    return x, y, n_train, lo, hi


def rnn_classes(fastcells, cell: str) -> tuple[type, type]:
    """torch.nn's and fastcells' module class of `cell`."""
    name = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}[cell]
    return getattr(nn, name), getattr(fastcells, name)


class Trainer:
    """One model + optimiser; ``epoch()`` runs one full-batch training step."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        self.model = model
        self.opt = torch.optim.Adam(model.parameters(), lr=LR)
        self.loss_fn = nn.MSELoss()
        self.x, self.y = x, y
        self.times: list[float] = []
        self.losses: list[float] = []

    def epoch(self, device: str) -> None:
        """One training step on the whole training set, its wall time and loss recorded."""
        t0 = time.perf_counter()
        self.opt.zero_grad()
        pred = self.model(self.x)
        loss = self.loss_fn(pred, self.y)
        loss.backward()
        self.opt.step()
        C.sync(device)
        self.times.append(time.perf_counter() - t0)
        self.losses.append(float(loss.detach()))


def agree_until(a: list[float], b: list[float], rtol: float = 1e-4) -> int:
    """Number of leading epochs whose losses agree to ``rtol`` (relative)."""
    for i, (u, v) in enumerate(zip(a, b)):
        if abs(u - v) > rtol * max(abs(u), abs(v), 1e-12):
            return i
    return min(len(a), len(b))


def models_with_same_weights(cell: str, fastcells, args):
    """(torch.nn model, fastcells model, their initial state_dict), seeded by --seed."""
    dtype, device = C.dtype_of(args.dtype), args.device
    nn_cls, fc_cls = rnn_classes(fastcells, cell)
    torch.manual_seed(args.seed)
    ref = Forecaster(nn_cls).to(device=device, dtype=dtype)
    new = Forecaster(fc_cls).to(device=device, dtype=dtype)
    init_state = copy.deepcopy(ref.state_dict())
    new.load_state_dict(init_state)
    init_diff = max((a - b).abs().max().item() for a, b in zip(ref.state_dict().values(), new.state_dict().values()))
    assert init_diff == 0.0, "initial weights differ"
    return ref, new, init_state


def train_interleaved(sides: dict, args, progress) -> None:
    """--epochs epochs of each side, in chunks of --chunk that alternate A B / B A."""
    names = list(sides)
    done = 0
    chunk = max(1, args.chunk)
    k = 0
    while done < args.epochs:
        n = min(chunk, args.epochs - done)
        for name in (names if k % 2 == 0 else names[::-1]):
            for _ in range(n):
                sides[name].epoch(args.device)
            progress.update(n)
        done += n
        k += 1


def side_result(tr, x, y, n_train: int, lo: float, hi: float) -> tuple[dict, torch.Tensor]:
    """One side's epoch times, losses and forecast errors, and its predictions
    (normalised) over every step."""
    tr.model.eval()
    with torch.no_grad():
        p = tr.model(x).reshape(-1).double().cpu()
    tr.model.train()
    actual = y.reshape(-1).double().cpu()
    p_pass = p * (hi - lo) + lo
    a_pass = actual * (hi - lo) + lo
    test_rmse = math.sqrt(((p_pass[n_train:] - a_pass[n_train:]) ** 2).mean().item())
    train_rmse = math.sqrt(((p_pass[:n_train] - a_pass[:n_train]) ** 2).mean().item())
    # The first epoch carries one-off costs (allocations, lazy init); report it apart.
    steady = tr.times[1:] if len(tr.times) > 1 else tr.times
    return {
        "ms_per_epoch": C.summary_ms(steady),
        "first_epoch_ms": tr.times[0] * 1e3,
        "total_train_s": sum(tr.times),
        "final_train_loss": tr.losses[-1],
        "train_rmse_passengers": train_rmse,
        "test_rmse_passengers": test_rmse,
        "loss_every_100": tr.losses[99::100],
        "predictions_passengers": [round(v, 4) for v in p_pass.tolist()],
    }, p


def float64_reference(cell: str, fastcells, args, init_state, data64, n_train: int, lo: float,
                      hi: float, sides: dict, preds: dict, progress) -> dict:
    """Float32 noise floor of this training run: Adam at lr 0.1 for many epochs
    amplifies rounding differences, so both float32 runs are compared with
    torch.nn in float64 from the same initial weights (untimed)."""
    device = args.device
    nn_cls, _ = rnn_classes(fastcells, cell)
    x64, y64 = data64[0], data64[1]
    truth = Forecaster(nn_cls).to(device=device, dtype=torch.float64)
    truth.load_state_dict({k: v.double() for k, v in init_state.items()})
    tr64 = Trainer(truth, x64[:n_train], y64[:n_train])
    for _ in range(args.epochs):
        tr64.epoch(device)
        progress.update(1)
    truth.eval()
    with torch.no_grad():
        p64 = truth(x64).reshape(-1).cpu()
    fp64 = {"final_train_loss": tr64.losses[-1],
            "test_rmse_passengers": math.sqrt(((p64[n_train:] - y64.reshape(-1).cpu()[n_train:]) ** 2).mean().item())
            * (hi - lo)}
    for name in ("torch.nn", "fastcells"):
        fp64[f"max_abs_pred_diff_passengers_{name}_float32"] = (preds[name] - p64).abs().max().item() * (hi - lo)
        fp64[f"loss_curves_agree_epochs_{name}_float32"] = agree_until(sides[name].losses, tr64.losses)
    return fp64


def run_cell(cell: str, fastcells, args, data, progress, data64=None) -> tuple[dict, dict]:
    """Both sides of one cell trained from the same weights, compared."""
    x, y, n_train, lo, hi = data
    ref, new, init_state = models_with_same_weights(cell, fastcells, args)
    xt, yt = x[:n_train], y[:n_train]
    sides = {"torch.nn": Trainer(ref, xt, yt), "fastcells": Trainer(new, xt, yt)}
    train_interleaved(sides, args, progress)

    out = {"cell": cell}
    preds = {}
    for name, tr in sides.items():
        out[name], preds[name] = side_result(tr, x, y, n_train, lo, hi)
    r, f = sides["torch.nn"], sides["fastcells"]
    steady_r, steady_f = r.times[1:] or r.times, f.times[1:] or f.times
    out["speedup_median_epoch"] = C.summary(steady_r)["median"] / C.summary(steady_f)["median"]
    out["speedup_total"] = sum(r.times) / sum(f.times)
    diff = (preds["torch.nn"] - preds["fastcells"]).abs().max().item()
    out["max_abs_pred_diff_normalised"] = diff
    out["max_abs_pred_diff_passengers"] = diff * (hi - lo)
    out["max_abs_loss_curve_diff"] = max(abs(a - b) for a, b in zip(r.losses, f.losses))
    out["loss_curves_agree_epochs"] = agree_until(r.losses, f.losses)
    if data64 is not None:
        out["torch_nn_float64_reference"] = float64_reference(cell, fastcells, args, init_state, data64,
                                                              n_train, lo, hi, sides, preds, progress)
    out["target_epoch_speedup"] = (TARGETS.get(cell) if args.device == "cpu" and args.dtype == "float32"
                                   else None)
    return out, preds


def plot(results: list[dict], preds: dict, data, path: Path, title: str) -> None:
    """Actual, fitted and forecast passengers of both sides, a panel per cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    x, y, n_train, lo, hi = data
    actual = y.reshape(-1).double().cpu().numpy() * (hi - lo) + lo
    n = len(actual)
    fig, axes = plt.subplots(len(results), 1, figsize=(8, 3.2 * len(results)), squeeze=False)
    for ax, res in zip(axes[:, 0], results):
        cell = res["cell"]
        ax.plot(actual, color="tab:blue", label="actual")
        styles = {"torch.nn": ("--", 1.6), "fastcells": (":", 2.2)}
        for name, (ls, lw) in styles.items():
            p = preds[cell][name].numpy() * (hi - lo) + lo
            ax.plot(np.arange(n_train), p[:n_train], color="tab:green", ls=ls, lw=lw, label=f"fitted ({name})")
            ax.plot(np.arange(n_train, n), p[n_train:], color="tab:red", ls=ls, lw=lw, label=f"forecast ({name})")
        ax.axvline(n_train - 0.5, color="0.6", lw=0.8)
        ax.set_title(
            f"{cell.upper()}: test RMSE torch.nn {res['torch.nn']['test_rmse_passengers']:.1f}, "
            f"fastcells {res['fastcells']['test_rmse_passengers']:.1f} passengers (thousands); "
            f"speed-up {res['speedup_median_epoch']:.1f}x",
            fontsize=9,
        )
        ax.set_ylabel("passengers (thousands)")
        ax.legend(fontsize=7, ncol=3, loc="upper left")
    axes[-1, 0].set_xlabel(f"month index of target (look_back={LOOK_BACK}); left of the line: train")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv: list[str] | None):
    """(parser, arguments), the cells checked and expanded into args.cells."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=1000)
    ap.add_argument("--cell", default="lstm,gru", help="lstm, gru, rnn, all, or a comma list (default lstm,gru)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=["float32", "float64", "bfloat16"], default="float32")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    C.add_tf32_flag(ap)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk", type=int, default=10, help="epochs per side before switching (interleaving)")
    ap.add_argument("--out", type=Path, default=C.RESULTS, help="output folder for JSON and PNG")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--no-float64-reference", dest="float64_reference", action="store_false",
                    help="skip the untimed torch.nn float64 run that measures the float32 noise floor")
    args = ap.parse_args(argv)
    if args.dtype == "float64":
        args.float64_reference = False
    args.cells = CELLS if args.cell == "all" else tuple(c.strip() for c in args.cell.split(","))
    bad = [c for c in args.cells if c not in CELLS]
    if bad:
        ap.error(f"--cell: unknown cell {bad}; choose from lstm, gru, rnn, all")
    return ap, args


def summary_table(results: list[dict]) -> str:
    """Both sides of every cell: epoch times, speed-up, loss and errors."""
    header = ["implementation", "cell", "ms/epoch median [IQR]", "total train s", "speed-up",
              "final train loss", "test RMSE (passengers)", "max |pred diff| (passengers)"]
    rows = []
    for r in results:
        for name in ("torch.nn", "fastcells"):
            s = r[name]
            m = s["ms_per_epoch"]
            rows.append([
                name, r["cell"], f"{m['median']:.3f} [{m['p25']:.3f}-{m['p75']:.3f}]", f"{s['total_train_s']:.2f}",
                "1.00x" if name == "torch.nn" else f"{r['speedup_median_epoch']:.2f}x",
                f"{s['final_train_loss']:.6f}", f"{s['test_rmse_passengers']:.2f}",
                "" if name == "torch.nn" else f"{r['max_abs_pred_diff_passengers']:.3g}",
            ])
    return C.md_table(header, rows)


def print_verdicts(results: list[dict]) -> None:
    """The float64 noise floor and the epoch targets, one line each."""
    for r in results:
        f64 = r.get("torch_nn_float64_reference")
        if f64:
            print(f"{r['cell']}: loss curves torch.nn vs fastcells agree (rtol 1e-4) for {r['loss_curves_agree_epochs']} "
                  f"epochs; max |pred diff| vs torch.nn float64: torch.nn "
                  f"{f64['max_abs_pred_diff_passengers_torch.nn_float32']:.3g}, fastcells "
                  f"{f64['max_abs_pred_diff_passengers_fastcells_float32']:.3g} (thousand passengers); "
                  f"float64 test RMSE {f64['test_rmse_passengers']:.2f}")
    for r in results:
        tgt = r["target_epoch_speedup"]
        if tgt:
            verdict = "PASS" if r["speedup_median_epoch"] >= tgt else "FAIL"
            print(f"target {r['cell']}: epoch speed-up {r['speedup_median_epoch']:.2f}x vs >= {tgt}x -> {verdict}")


def train_cells(fastcells, args, data) -> tuple[list[dict], dict]:
    """Every cell in turn, with the float64 reference unless it is off: (results, predictions by cell)."""
    from tqdm import tqdm

    results, preds = [], {}
    data64 = make_data(torch.float64, args.device) if args.float64_reference else None
    with tqdm(total=(3 if data64 else 2) * args.epochs * len(args.cells), unit="epoch", file=sys.stderr,
              disable=args.no_progress, mininterval=0.5) as progress:
        for cell in args.cells:
            progress.set_description(cell)
            res, p = run_cell(cell, fastcells, args, data, progress, data64)
            results.append(res)
            preds[cell] = p
    return results, preds


def write_outputs(results: list[dict], preds: dict, table: str, data, args, machine: dict,
                  threads: int) -> None:
    """JSON and (unless --no-plot) the figure under --out."""
    stem = C.result_stem("airline", args.device, args.dtype)
    out = {
        "benchmark": "forecast_airline",
        "machine": machine,
        "config": {
            "epochs": args.epochs, "look_back": LOOK_BACK, "hidden": HIDDEN, "layers": LAYERS, "lr": LR,
            "optimizer": "Adam", "loss": "MSELoss", "x_shape": list(data[0].shape), "n_train": data[2],
            "n_test": data[0].shape[0] - data[2], "device": args.device, "dtype": args.dtype, "threads": threads,
            "seed": args.seed, "interleave_chunk_epochs": args.chunk, "cells": list(args.cells),
            "timing": "wall time per epoch (zero_grad, forward, loss, backward, Adam step); "
                      "first epoch excluded from the median and reported apart",
        },
        "results": results,
        "table_markdown": table,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    C.write_json(args.out / f"{stem}.json", out)
    if not args.no_plot:
        plot(results, preds, data, args.out / f"{stem}.png",
             f"Airline passengers, 2-layer hidden-{HIDDEN} nets, {args.epochs} epochs, "
             f"{args.device} {args.dtype}: {C.machine_line(machine)}")
    print(f"wrote {args.out / (stem + '.json')}" + ("" if args.no_plot else f" and {stem}.png"))


def main(argv: list[str] | None = None) -> int:
    """Train both sides of every cell, print the comparison and the targets, write the results."""
    ap, args = parse_args(argv)
    fastcells, threads = C.start_training_run(ap, args)
    data = make_data(C.dtype_of(args.dtype), args.device)
    machine = C.machine_info(args.device)
    print(f"airline forecaster | {C.machine_line(machine)} | {args.device} {args.dtype} | "
          f"X {tuple(data[0].shape)}, train {data[2]} steps | {args.epochs} epochs", flush=True)
    results, preds = train_cells(fastcells, args, data)

    table = summary_table(results)
    print(table)
    print_verdicts(results)
    write_outputs(results, preds, table, data, args, machine, threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
