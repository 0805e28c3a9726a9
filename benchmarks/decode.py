"""Serving-style decoding: one-step calls with explicit state, as DeepAR and
seq2seq decoders run them (gluonts, pytorch-forecasting, neuralforecast).

The loop: a 2-layer LSTM or GRU (input 16) is called ``--steps`` times at T=1
with the state of the previous call, and a Linear head maps each output back
to the next input. Timed in one run, interleaved, inference mode:

* torch.nn;
* fastcells (same weights);
* ONNX Runtime (CPU provider) running the torch.nn loop exported to ONNX
  (``dynamo=False``: the 24 steps unrolled), with as many intra-op threads as
  torch and spinning off, so that its idle threads do not take the cores from
  the other two while they are timed.

Also the fixed cost of one T=1 call per cell (batch 1, where the arithmetic is
negligible): the module call and the bare op call, and that time minus the
call's multiply-adds at the host's measured FMA rate (cpu_peak.py's
calibration loop).

    python benchmarks/decode.py            # results/decode_cpu_<isa>.json and .md
    python benchmarks/decode.py --quick    # fewer shapes, shorter timings
"""
from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

I, LAYERS = 16, 2
BATCHES = (1, 100, 2800)
HIDDEN = (40, 128)


class Decoder(nn.Module):
    """`steps` one-step calls of `rnn` with explicit state, each followed by a Linear head."""

    def __init__(self, rnn: nn.Module, steps: int):
        super().__init__()
        self.rnn, self.steps = rnn, steps
        self.head = nn.Linear(rnn.hidden_size, rnn.input_size)

    def forward(self, x, h, c=None):
        state = (h, c) if c is not None else h
        outs = []
        for _ in range(self.steps):
            y, state = self.rnn(x, state)
            x = self.head(y)
            outs.append(x)
        return torch.cat(outs)


def decoders(fastcells, cell: str, H: int, steps: int):
    torch.manual_seed(0)
    ref = Decoder(getattr(nn, cell)(I, H, LAYERS), steps).eval()
    new = Decoder(getattr(fastcells, cell)(I, H, LAYERS), steps).eval()
    new.load_state_dict(ref.state_dict())
    return ref, new


def inputs(cell: str, B: int, H: int):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, B, I, generator=gen)
    h = 0.1 * torch.randn(LAYERS, B, H, generator=gen)
    return (x, h, 0.1 * torch.randn(LAYERS, B, H, generator=gen)) if cell == "LSTM" else (x, h)


def ort_session(model: nn.Module, args, threads: int):
    """An ONNX Runtime session of `model` exported with the legacy exporter, or None."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    buf = io.BytesIO()
    names = ["x", "h", "c"][: len(args)]
    with torch.no_grad():
        torch.onnx.export(model, args, buf, dynamo=False, input_names=names, output_names=["y"])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    sess = ort.InferenceSession(buf.getvalue(), so, providers=["CPUExecutionProvider"])
    feeds = {n: a.numpy() for n, a in zip(names, args)}
    return sess, feeds


def loop_row(fastcells, cell, B, H, args, threads):
    ref, new = decoders(fastcells, cell, H, args.steps)
    a = inputs(cell, B, H)
    with torch.inference_mode():
        want = ref(*a)
        got = new(*a)
    stmts = {}

    def run(m):
        def f():
            with torch.inference_mode():
                return m(*a)
        return f

    stmts["torch.nn"], stmts["fastcells"] = run(ref), run(new)
    ort = ort_session(ref, a, threads)
    ort_diff = None
    if ort is not None:
        sess, feeds = ort
        ort_diff = float(abs(torch.from_numpy(sess.run(None, feeds)[0]) - want).max())
        stmts["onnxruntime"] = lambda: sess.run(None, feeds)
    res = C.interleaved(stmts, args.repeats, args.min_run_time, threads, "cpu")
    row = {"cell": cell, "B": B, "H": H, "steps": args.steps,
           "max_abs_diff_fastcells": float((got - want).abs().max()),
           "max_abs_diff_onnxruntime": ort_diff}
    for name, times in res.items():
        row[f"{name}_ms"] = C.summary([t * 1e3 for t in times])
    row["speedup_vs_torch.nn"] = C.ratio_summary(res["torch.nn"], res["fastcells"])
    if "onnxruntime" in res:
        row["speedup_vs_onnxruntime"] = C.ratio_summary(res["onnxruntime"], res["fastcells"])
    return row


def macs_per_call(cell: str, B: int, H: int) -> int:
    G = {"LSTM": 4, "GRU": 3, "RNN": 1}[cell]
    return B * G * H * ((I + H) + (LAYERS - 1) * (H + H))


def call_row(fastcells, cell, H, args, peak_gflops):
    """The fixed cost of one T=1 call (batch 1)."""
    torch.manual_seed(0)
    m = getattr(fastcells, cell)(I, H, LAYERS).eval()
    a = inputs(cell, 1, H)
    hx = (a[1], a[2]) if cell == "LSTM" else a[1]
    w = m._flat_weights
    mode = fastcells.MODES[m.mode]
    op = torch.ops.fastcells.rnn_forward.default

    def module():
        return m(a[0], hx)

    def bare_op():
        return op(a[0], w, a[1], a[2] if cell == "LSTM" else None, None, mode, LAYERS, False,
                  True, 0, None)

    # Calls made inside one inference_mode region, as a decoding loop makes
    # them: entering the region (about 1.5 us) is the caller's, once per loop.
    with torch.inference_mode():
        res = C.interleaved({"module": module, "op": bare_op}, args.repeats, args.min_run_time, 1,
                            "cpu")
    arith_us = 2 * macs_per_call(cell, 1, H) / (peak_gflops * 1e9) * 1e6
    module_us = sorted(res["module"])[len(res["module"]) // 2] * 1e6
    op_us = sorted(res["op"])[len(res["op"]) // 2] * 1e6
    return {"cell": cell, "B": 1, "H": H, "module_us": module_us, "op_us": op_us,
            "arithmetic_us": arith_us, "overhead_us": module_us - arith_us}


def markdown(out: dict) -> str:
    m = out["machine"]
    lines = [f"# Decoding loop: {out['config']['steps']} one-step calls, 2 layers, input 16, Linear head\n",
             C.machine_line(m) + f" ONNX Runtime {out['config']['onnxruntime']} (CPU provider, "
             f"{out['config']['threads']} intra-op threads, spinning off). Times per loop, inference mode, "
             f"median of {out['config']['repeats']} interleaved rounds; speed-up = other / fastcells.\n"]
    rows = []
    for r in out["loop"]:
        ort = r.get("onnxruntime_ms")
        rows.append([r["cell"], r["B"], r["H"], C.fmt_ms(r["torch.nn_ms"]["median"] / 1e3),
                     C.fmt_ms(ort["median"] / 1e3) if ort else "-",
                     C.fmt_ms(r["fastcells_ms"]["median"] / 1e3),
                     f"{r['speedup_vs_torch.nn']['median']:.2f}x",
                     f"{r['speedup_vs_onnxruntime']['median']:.2f}x" if ort else "-"])
    lines.append(C.md_table(["cell", "batch", "hidden", "torch.nn ms", "ORT ms", "fastcells ms",
                             "vs torch.nn", "vs ORT"], rows))
    lines.append(f"\nOne T=1 call at batch 1 (2 layers, one thread, calls inside one inference_mode "
                 f"region as in a decoding loop; FMA rate {out['fma_gflops']:.0f} GFLOP/s measured on "
                 f"this path):\n")
    rows = [[r["cell"], r["H"], f"{r['module_us']:.1f}", f"{r['op_us']:.1f}", f"{r['arithmetic_us']:.2f}",
             f"{r['overhead_us']:.1f}"] for r in out["per_call"]]
    lines.append(C.md_table(["cell", "hidden", "module call us", "op call us", "arithmetic us",
                             "overhead us (module - arithmetic)"], rows))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--min-run-time", type=float, default=0.2)
    ap.add_argument("--quick", action="store_true", help="batch 1 and 100, hidden 40, 1 round")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    fastcells = C.import_fastcells()
    threads = C.set_threads(args.threads)
    batches, hidden = BATCHES, HIDDEN
    if args.quick:
        batches, hidden, args.repeats, args.min_run_time = (1, 100), (40,), 1, 0.05
    try:
        import onnxruntime
        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = None
        print("onnxruntime is not installed: the ORT column is left out", file=sys.stderr)
    peak = torch.ops.fastcells._cpu_fma_peak(fastcells.cpu_isa(), 1, 0.2)
    out = {"benchmark": "decode", "machine": C.machine_info("cpu"),
           "config": {"steps": args.steps, "layers": LAYERS, "input": I, "threads": threads,
                      "repeats": args.repeats, "min_run_time": args.min_run_time,
                      "onnxruntime": ort_version},
           "fma_gflops": peak, "loop": [], "per_call": []}
    for cell in ("LSTM", "GRU"):
        for H in hidden:
            for B in batches:
                row = loop_row(fastcells, cell, B, H, args, threads)
                out["loop"].append(row)
                print(f"{cell} B={B} H={H}: x{row['speedup_vs_torch.nn']['median']:.2f} torch.nn"
                      + (f", x{row['speedup_vs_onnxruntime']['median']:.2f} ORT"
                         if "speedup_vs_onnxruntime" in row else ""), file=sys.stderr, flush=True)
    for cell in ("LSTM", "GRU", "RNN"):
        out["per_call"].append(call_row(fastcells, cell, 40, args, peak))
    stem = f"decode_{C.device_tag('cpu')}" + ("_quick" if args.quick else "")
    C.write_results(args.out, stem, out, markdown(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
