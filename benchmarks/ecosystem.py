"""Forecasting libraries as their users run them, stock and under
``fastcells.patched()``: gluonts' DeepAR (its LSTM) and pytorch-forecasting's
RecurrentNetwork (LSTM and GRU), trained and used for prediction on the
electricity data shipped with fastcells, with the libraries' code unchanged.

For each model, the stock and the patched run alternate (``--rounds`` each),
from the same seed; each run trains ``--epochs`` epochs of ``--batches``
batches (batch 64, 168 h of context, 24 h ahead, 2 layers of hidden 40) and
then forecasts the 24 hours after the training data. Reported: seconds per
epoch, prediction time, the forecast's MAE in kW against the held-out day, and
whether the patch was active (the model's RNN still an instance of the
torch.nn class, and its forward the fused one).

The libraries are optional (not test dependencies); install them with torch
pinned, or pip pulls a CUDA torch:

    pip install -c constraints.txt "gluonts[torch]==0.17.0" pytorch-forecasting==1.4.0 lightning
    python benchmarks/ecosystem.py          # results/ecosystem_cpu_<isa>.json and .md
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

HORIZON, CONTEXT, HIDDEN, LAYERS, BATCH = 24, 168, 40, 2, 64


def quiet_libraries() -> None:
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)


def series():
    from fastcells.datasets import load_electricity

    df = load_electricity()
    cut = len(df) - HORIZON * 7  # training data ends a week before the end
    return df, cut


def patch_ctx(fastcells, patched: bool):
    return fastcells.patched() if patched else contextlib.nullcontext()


def fused(fastcells, rnn: torch.nn.Module) -> bool:
    """Whether `rnn` (a torch.nn LSTM/GRU/RNN, or a library subclass whose
    forward calls theirs) runs fastcells' fused forward now."""
    base = next((c for c in (torch.nn.LSTM, torch.nn.GRU, torch.nn.RNN) if isinstance(rnn, c)), None)
    return base is not None and base.forward is fastcells.patch._patched_forward


def gluonts_deepar(fastcells, patched: bool, args) -> dict:
    from gluonts.dataset.pandas import PandasDataset
    from gluonts.torch.model.deepar import DeepAREstimator

    df, cut = series()
    train = PandasDataset(df.iloc[:cut].set_index("ts")[["y"]], target="y", freq="h")
    torch.manual_seed(0)
    np.random.seed(0)
    est = DeepAREstimator(freq="h", prediction_length=HORIZON, context_length=CONTEXT,
                          num_layers=LAYERS, hidden_size=HIDDEN, batch_size=BATCH,
                          num_batches_per_epoch=args.batches,
                          trainer_kwargs=dict(max_epochs=args.epochs, enable_progress_bar=False,
                                              enable_model_summary=False, logger=False,
                                              default_root_dir=args.scratch))
    with patch_ctx(fastcells, patched):
        t0 = time.perf_counter()
        predictor = est.train(train, cache_data=True)
        fit_s = time.perf_counter() - t0
        rnn = predictor.prediction_net.model.rnn
        active = fused(fastcells, rnn)
        t0 = time.perf_counter()
        forecast = next(iter(predictor.predict(train, num_samples=100)))
        predict_s = time.perf_counter() - t0
    actual = df["y"].to_numpy()[cut:cut + HORIZON]
    mae = float(np.abs(forecast.mean - actual).mean())
    return {"fit_s": fit_s, "epoch_s": fit_s / args.epochs, "predict_s": predict_s, "mae_kw": mae,
            "rnn_class": f"{type(rnn).__module__}.{type(rnn).__qualname__}", "fused": active}


def pf_recurrent(fastcells, patched: bool, args, cell: str) -> dict:
    import lightning.pytorch as pl
    from pytorch_forecasting import TimeSeriesDataSet
    from pytorch_forecasting.models import RecurrentNetwork

    df, cut = series()
    df = df.assign(time_idx=np.arange(len(df)), series="all", y=df["y"].astype("float32"))
    ds = TimeSeriesDataSet(df.iloc[:cut], time_idx="time_idx", target="y", group_ids=["series"],
                           max_encoder_length=CONTEXT, max_prediction_length=HORIZON,
                           time_varying_unknown_reals=["y"])
    test = TimeSeriesDataSet.from_dataset(ds, df.iloc[:cut + HORIZON], predict=True,
                                          stop_randomization=True)
    torch.manual_seed(0)
    train_dl = ds.to_dataloader(train=True, batch_size=BATCH, num_workers=0)
    test_dl = test.to_dataloader(train=False, batch_size=BATCH, num_workers=0)
    with patch_ctx(fastcells, patched):
        model = RecurrentNetwork.from_dataset(ds, cell_type=cell, hidden_size=HIDDEN,
                                              rnn_layers=LAYERS)
        trainer = pl.Trainer(max_epochs=args.epochs, limit_train_batches=args.batches,
                             enable_progress_bar=False, enable_model_summary=False, logger=False,
                             enable_checkpointing=False, default_root_dir=args.scratch)
        t0 = time.perf_counter()
        trainer.fit(model, train_dl)
        fit_s = time.perf_counter() - t0
        active = fused(fastcells, model.rnn)
        t0 = time.perf_counter()
        pred = model.predict(test_dl, trainer_kwargs=dict(logger=False, enable_progress_bar=False))
        predict_s = time.perf_counter() - t0
    actual = df["y"].to_numpy()[cut:cut + HORIZON]
    mae = float(np.abs(pred.numpy().reshape(-1)[:HORIZON] - actual).mean())
    return {"fit_s": fit_s, "epoch_s": fit_s / args.epochs, "predict_s": predict_s, "mae_kw": mae,
            "rnn_class": f"{type(model.rnn).__module__}.{type(model.rnn).__qualname__}",
            "fused": active}


MODELS = {
    "gluonts DeepAR (LSTM)": gluonts_deepar,
    "pytorch-forecasting RecurrentNetwork LSTM": functools.partial(pf_recurrent, cell="LSTM"),
    "pytorch-forecasting RecurrentNetwork GRU": functools.partial(pf_recurrent, cell="GRU"),
}


def versions() -> dict | None:
    try:
        import gluonts
        import lightning
        import pytorch_forecasting
    except ImportError as exc:
        return {"missing": str(exc)}
    return {"gluonts": gluonts.__version__, "pytorch_forecasting": pytorch_forecasting.__version__,
            "lightning": lightning.__version__}


def markdown(out: dict) -> str:
    cfg = out["config"]
    v = out["libraries"]
    lines = [f"# Forecasting libraries, stock and under fastcells.patched()\n",
             f"gluonts {v['gluonts']}, pytorch-forecasting {v['pytorch_forecasting']}, lightning "
             f"{v['lightning']}. Electricity data, batch {BATCH}, {CONTEXT} h context, {HORIZON} h "
             f"ahead, {LAYERS} layers of hidden {HIDDEN}; {cfg['epochs']} epochs of {cfg['batches']} "
             f"batches per run, {cfg['rounds']} alternating runs per side (medians). "
             + C.machine_line(out["machine"]) + ".\n"]
    rows = []
    for r in out["rows"]:
        s, p = r["stock"], r["patched"]
        rows.append([r["model"], f"{s['epoch_s']:.2f}", f"{p['epoch_s']:.2f}",
                     f"**{s['epoch_s'] / p['epoch_s']:.2f}x**", f"{s['predict_s']:.3f}",
                     f"{p['predict_s']:.3f}", f"{s['mae_kw']:.1f} / {p['mae_kw']:.1f}",
                     "yes" if p["fused"] and not s["fused"] else "NO"])
    lines.append(C.md_table(["model", "stock s/epoch", "patched s/epoch", "epoch speed-up",
                             "stock predict s", "patched predict s", "MAE kW stock / patched",
                             "fused when patched"], rows))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batches", type=int, default=30, help="batches per epoch")
    ap.add_argument("--rounds", type=int, default=2, help="alternating runs per side")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    if min(args.epochs, args.batches, args.rounds) < 1:
        ap.error("--epochs, --batches and --rounds must be >= 1")
    libs = versions()
    if "missing" in libs:
        sys.exit(f"ecosystem.py needs gluonts, pytorch-forecasting and lightning ({libs['missing']});"
                 " install them with torch pinned: pip install -c constraints.txt "
                 "\"gluonts[torch]==0.17.0\" pytorch-forecasting==1.4.0 lightning")
    quiet_libraries()
    # gluonts' trainer always saves a checkpoint: keep it out of the working tree.
    scratch = tempfile.TemporaryDirectory(prefix="fastcells_ecosystem_")
    args.scratch = scratch.name
    fastcells = C.import_fastcells()
    threads = C.set_threads(args.threads)
    out = {"benchmark": "ecosystem", "machine": C.machine_info("cpu"), "libraries": libs,
           "config": {"epochs": args.epochs, "batches": args.batches, "rounds": args.rounds,
                      "threads": threads, "batch": BATCH, "context": CONTEXT, "horizon": HORIZON,
                      "hidden": HIDDEN, "layers": LAYERS}, "rows": []}
    for name, run in MODELS.items():
        runs = {"stock": [], "patched": []}
        for r in range(args.rounds):
            order = ("stock", "patched") if r % 2 == 0 else ("patched", "stock")
            for side in order:
                runs[side].append(run(fastcells, side == "patched", args))
        row = {"model": name}
        for side, rs in runs.items():
            med = {k: float(np.median([x[k] for x in rs])) for k in ("fit_s", "epoch_s", "predict_s", "mae_kw")}
            row[side] = {**med, "runs": rs, "fused": all(x["fused"] for x in rs),
                         "rnn_class": rs[0]["rnn_class"]}
        out["rows"].append(row)
        print(f"{name}: epoch x{row['stock']['epoch_s'] / row['patched']['epoch_s']:.2f}", file=sys.stderr,
              flush=True)
    stem = f"ecosystem_{C.device_tag('cpu')}"
    C.write_results(args.out, stem, out, markdown(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
