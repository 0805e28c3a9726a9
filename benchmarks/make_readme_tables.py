"""Turn the committed benchmark JSON into the markdown tables of the README's performance section.

Reads benchmarks/results/{airline,airline_speed,electricity,sweep}_<device>.json (those
that exist; <device> is cuda, or cpu_<isa> with the CPU ISA path the run used, one
section per path) and writes benchmarks/results/README_tables.md. Every number in the
output comes from those files; nothing is typed in by hand.

    python benchmarks/make_readme_tables.py [--results DIR] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from registry import result_name  # noqa: E402


def x(v: float) -> str:
    """A speed-up as text: two decimals below 10x, one above."""
    return f"{v:.2f}x" if v < 10 else f"{v:.1f}x"


def load(path: Path) -> dict | None:
    if not path.exists():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def machine_sentence(m: dict) -> str:
    s = f"{C.machine_line(m)}"
    if m.get("cpu_flags"):
        s += f" ({'/'.join(m['cpu_flags'])})"
    if m.get("git_commit"):
        s += f", fastcells commit {m['git_commit']}"
    if m.get("loadavg_1_5_15"):
        s += f", load average {m['loadavg_1_5_15'][0]:.1f} at start"
    if m.get("date_utc"):
        s += f", {m['date_utc'][:10]}"
    load, cpus = (m.get("loadavg_1_5_15") or [0.0])[0], m.get("logical_cpus") or 1
    if load > cpus:
        s += (f". **The machine was busy when this ran (load {load:.1f} on {cpus} CPUs): other jobs competed for "
              f"the cores, absolute times are inflated and the ratios are indicative only; see the min-max spread**")
    return s


def airline_section(d: dict, slower: list[str]) -> str:
    cfg = d["config"]
    out = [f"### Airline passengers (the seed tutorial): `python benchmarks/forecast_airline.py`\n\n",
           f"2-layer hidden-{cfg['hidden']} net + Linear(6, 1), X {tuple(cfg['x_shape'])}, {cfg['n_train']} training "
           f"steps, Adam lr {cfg['lr']}, {cfg['epochs']} full-batch epochs, {cfg['device']} {cfg['dtype']}, "
           f"same initial weights, epochs interleaved in chunks of {cfg['interleave_chunk_epochs']}. "
           f"Machine: {machine_sentence(d['machine'])}.\n\n"]
    rows = []
    for r in d["results"]:
        a, b = r["torch.nn"], r["fastcells"]
        rows.append([r["cell"].upper(),
                     f"{a['ms_per_epoch']['median']:.2f} ({a['ms_per_epoch']['p25']:.2f}-{a['ms_per_epoch']['p75']:.2f})",
                     f"{b['ms_per_epoch']['median']:.2f} ({b['ms_per_epoch']['p25']:.2f}-{b['ms_per_epoch']['p75']:.2f})",
                     f"**{x(r['speedup_median_epoch'])}**", f"{a['total_train_s']:.1f} / {b['total_train_s']:.1f}",
                     f"{a['final_train_loss']:.5f} / {b['final_train_loss']:.5f}",
                     f"{a['test_rmse_passengers']:.1f} / {b['test_rmse_passengers']:.1f}",
                     f"{r['max_abs_pred_diff_passengers']:.3g}"])
        f64 = r.get("torch_nn_float64_reference")
        if f64:
            rows[-1].append(f"{f64['max_abs_pred_diff_passengers_torch.nn_float32']:.3g} / "
                            f"{f64['max_abs_pred_diff_passengers_fastcells_float32']:.3g}")
        if r["speedup_median_epoch"] < 1.0:
            slower.append(f"airline {r['cell'].upper()} training epoch ({r['speedup_median_epoch']:.2f}x)")
    out.append(C.md_table(
        ["cell", "torch.nn ms/epoch (IQR)", "fastcells ms/epoch (IQR)", "speed-up", "total s nn / fc",
         "final train loss nn / fc", "test RMSE nn / fc (thousand passengers)", "max pred diff nn vs fc"]
        + (["max pred diff vs torch.nn float64: nn / fc"] if rows and len(rows[0]) > 8 else []), rows))
    out.append("\nPrediction differences are in thousands of passengers over all 141 steps after training. Adam at "
               "lr 0.1 for many epochs amplifies float32 rounding, so two float32 runs drift apart; the last column "
               "shows how far each float32 run lands from torch.nn trained in float64 from the same weights "
               "(the float32 noise floor of this task).\n")
    return "".join(out)


def speed_section(d: dict, slower: list[str]) -> str:
    cfg = d["config"]
    out = [f"### Op and epoch speed: `python benchmarks/airline_speed.py`\n\n",
           f"torch.utils.benchmark blocked_autorange, torch.nn and fastcells interleaved, medians of "
           f"{cfg['repeats']} (airline) / {cfg['grid_repeats']} (single-layer grid) rounds; speed-up = torch.nn / "
           f"fastcells per round, median (min-max). {cfg['device']} {cfg['dtype']}. "
           f"Machine: {machine_sentence(d['machine'])}.\n\n"]
    rows = []
    for r in d["rows"]:
        sp = r["speedup"]
        tgt = ""
        if "target" in r:
            tgt = f">= {r['target']:g}x: " + ("met" if r["pass"] else "**not met**")
        shape = f"{r['T']},{r['B']},{r['I']},{r['H']}" + (f" ({r['layers']} layers)" if r["layers"] > 1 else "")
        rows.append([r["cell"].upper(), shape, r["what"], C.fmt_ms(r["torch.nn_ms"]["median"] / 1e3),
                     C.fmt_ms(r["fastcells_ms"]["median"] / 1e3), f"{x(sp['median'])} ({sp['min']:.2f}-{sp['max']:.2f})",
                     tgt])
        if sp["median"] < 1.0:
            slower.append(f"{r['cell'].upper()} {shape} {r['what']} ({sp['median']:.2f}x)")
    out.append(C.md_table(["cell", "T,B,I,H", "measure", "torch.nn ms", "fastcells ms", "speed-up", "target"], rows))
    out.append(f"\nTargets met: {d['targets_passed']} of {d['targets_total']}.\n")
    if any(r["what"] == "fixed" for r in d["rows"]):
        out.append("\nRow `fixed`: torch.nn's forward+backward of the airline LSTM on all 112 steps against "
                   "fastcells' on one step (T=1), i.e. the speed-up fastcells would reach if its recurrence "
                   "cost nothing. Its per-call cost (module code, dispatcher, autograd engine, one "
                   "gradient accumulation per parameter) bounds the fwd+bwd ratio there.\n")
    if any(r["what"] == "epoch fixed" for r in d["rows"]):
        out.append("\nRow `epoch fixed`: the same for the training epoch (fastcells' epoch on one step "
                   "against torch.nn's on all 112). Row `epoch bound`: torch.nn's epoch against the same "
                   "epoch around a stand-in RNN that costs nothing (a precomputed output; its parameters' "
                   "gradients preset to zeros, so zero_grad, the Linear head, the loss, backward and Adam "
                   "over every parameter run as usual): no RNN implementation can pass this ratio, since "
                   "the rest of the epoch is the same on both sides.\n")
    return "".join(out)


def electricity_section(d: dict, slower: list[str]) -> str:
    cfg = d["config"]
    out = [f"### Electricity day-ahead (168 h -> 24 h): `python benchmarks/forecast_electricity.py`\n\n",
           f"2 layers, batch {cfg['batch']}, I={cfg['input_size']}, {cfg['epochs']} epoch(s) of "
           f"{cfg['batches_per_epoch']} batches, Adam lr {cfg['lr']}, training steps interleaved by batch, same "
           f"initial weights and batch order; validation: {cfg['val_forecasts']} midnight forecasts after "
           f"{cfg['split_time'][:10]}. {cfg['device']} {cfg['dtype']}. Machine: {machine_sentence(d['machine'])}.\n\n"]
    rows = []
    for r in d["results"]:
        a, b = r["torch.nn"], r["fastcells"]
        rows.append([r["cell"].upper(), r["hidden"], f"{sum(a['epoch_s']) / len(a['epoch_s']):.2f}",
                     f"{sum(b['epoch_s']) / len(b['epoch_s']):.2f}", f"**{x(r['speedup_epoch'])}**",
                     f"{a['val_mae_kw']:.1f} / {b['val_mae_kw']:.1f}", f"{a['val_rmse_kw']:.1f} / {b['val_rmse_kw']:.1f}",
                     f"{r['max_abs_val_pred_diff_kw']:.2g}"])
        if r["speedup_epoch"] < 1.0:
            slower.append(f"electricity {r['cell'].upper()} hidden {r['hidden']} epoch ({r['speedup_epoch']:.2f}x)")
    out.append(C.md_table(["cell", "hidden", "torch.nn s/epoch", "fastcells s/epoch", "speed-up",
                           "val MAE kW nn / fc", "val RMSE kW nn / fc", "max pred diff kW"], rows))
    return "".join(out)


def peak_section(d: dict, slower: list[str]) -> str:
    """benchmarks/cpu_peak.py: FMA peak per path and the per-step product's share of it."""
    m = d["machine"]
    isas = list(d["peaks"])
    out = [f"### Per-step product against the FMA peak: `python benchmarks/cpu_peak.py`\n\n",
           f"One thread, float32, best of 3. Host features: {m['host_features']}. Machine: "
           f"{machine_sentence(m)}. FMA peak (GFLOP/s, independent FMA chains on each path's "
           "vectors): " + ", ".join(f"{i} {d['peaks'][i]['gflops_1_thread']:.0f} on one thread" for i in isas)
           + ". Product y(M, N) = h(M, K) W (N = G*H) in GFLOP/s and as a share of the host's widest "
           "one-thread peak; `brgemm` is ATen's `at::native::cpublas::brgemm` (oneDNN), `torch.mm` is MKL:\n\n"]
    rows = []
    for r in d["rows"]:
        cells = [f"{r['paths'][i]['gflops']:.1f} ({r['paths'][i]['fraction_of_host_peak']:.0%})" for i in isas]
        cells += [f"{r[k]['gflops']:.1f} ({r[k]['fraction_of_host_peak']:.0%})" for k in ("brgemm", "torch_mm")]
        rows.append([r["shape"], f"{r['M']},{r['K']},{r['N']}"] + cells)
    out.append(C.md_table(["shape", "M,K,N"] + isas + ["brgemm", "torch.mm"], rows))
    return "".join(out)


def shared_section(d: dict, slower: list[str]) -> str:
    """benchmarks/shared_cores.py: quiet, beside a busy process, one thread."""
    out = [f"### Shared cores and one thread: `python benchmarks/shared_cores.py`\n\n",
           f"Machine: {machine_sentence(d['machine'])}. `busy`: another process spins on one core "
           "during the measurement. Median ms per call, speed-up torch.nn / fastcells within a round:\n\n"]
    rows = []
    for r in d["rows"]:
        rows.append([r["setting"], r["threads"], r["cell"].upper(), f"{r['T']},{r['B']},{r['I']},{r['H']}",
                     r["mode"], C.fmt_ms(r["torch_nn_s"]["median"]), C.fmt_ms(r["fastcells_s"]["median"]),
                     x(r["speedup"]["median"])])
        if r["speedup"]["median"] < 1:
            slower.append(f"shared_cores {r['setting']} {r['cell'].upper()} {r['T']},{r['B']},{r['I']},{r['H']} "
                          f"{r['mode']} ({r['speedup']['median']:.2f}x)")
    out.append(C.md_table(["setting", "threads", "cell", "T,B,I,H", "mode", "torch.nn ms", "fastcells ms",
                           "speed-up"], rows))
    return "".join(out)


def decode_section(d: dict, slower: list[str]) -> str:
    """benchmarks/decode.py: one-step decoding loops against torch.nn and ONNX Runtime."""
    cfg = d["config"]
    out = [f"### Decoding loop (one-step calls): `python benchmarks/decode.py`\n\n",
           f"{cfg['steps']} calls at T=1 with explicit state, 2 layers, input 16, each followed by a "
           f"Linear head; inference mode. ONNX Runtime {cfg['onnxruntime']} runs the exported torch.nn "
           f"loop (CPU provider, {cfg['threads']} intra-op threads, spinning off). "
           f"Machine: {machine_sentence(d['machine'])}. Median ms per loop over {cfg['repeats']} "
           "interleaved rounds:\n\n"]
    rows = []
    for r in d["loop"]:
        ort = r.get("onnxruntime_ms")
        vs_nn = r["speedup_vs_torch.nn"]["median"]
        vs_ort = r["speedup_vs_onnxruntime"]["median"] if ort else None
        rows.append([r["cell"], r["B"], r["H"], C.fmt_ms(r["torch.nn_ms"]["median"] / 1e3),
                     C.fmt_ms(ort["median"] / 1e3) if ort else "-",
                     C.fmt_ms(r["fastcells_ms"]["median"] / 1e3), x(vs_nn), x(vs_ort) if ort else "-"])
        shape = f"decode {r['cell']} batch {r['B']} hidden {r['H']}"
        if vs_nn < 1:
            slower.append(f"{shape} ({vs_nn:.2f}x)")
        if vs_ort is not None and vs_ort < 1:
            slower.append(f"{shape}: slower than ONNX Runtime ({vs_ort:.2f}x)")
    out.append(C.md_table(["cell", "batch", "hidden", "torch.nn ms", "ORT ms", "fastcells ms",
                           "vs torch.nn", "vs ORT"], rows))
    out.append(f"\nOne T=1 call at batch 1, 2 layers, hidden 40, one thread, calls inside one "
               f"inference_mode region as in a decoding loop (arithmetic at the measured FMA rate, "
               f"{d['fma_gflops']:.0f} GFLOP/s):\n\n")
    rows = [[r["cell"], f"{r['module_us']:.1f}", f"{r['op_us']:.1f}", f"{r['arithmetic_us']:.2f}",
             f"{r['overhead_us']:.1f}"] for r in d["per_call"]]
    out.append(C.md_table(["cell", "module call us", "op call us", "arithmetic us", "overhead us"], rows))
    return "".join(out)


def ecosystem_section(d: dict, slower: list[str]) -> str:
    """benchmarks/ecosystem.py: forecasting libraries stock and under fastcells.patched()."""
    cfg, v = d["config"], d["libraries"]
    out = [f"### Forecasting libraries, unchanged: `python benchmarks/ecosystem.py`\n\n",
           f"gluonts {v['gluonts']}, pytorch-forecasting {v['pytorch_forecasting']}, lightning "
           f"{v['lightning']}; electricity data, batch {cfg['batch']}, {cfg['context']} h context, "
           f"{cfg['horizon']} h ahead, {cfg['layers']} layers of hidden {cfg['hidden']}; "
           f"{cfg['epochs']} epochs of {cfg['batches']} batches per run, {cfg['rounds']} alternating "
           f"runs per side (medians). Machine: {machine_sentence(d['machine'])}.\n\n"]
    rows = []
    for r in d["rows"]:
        s, p = r["stock"], r["patched"]
        speed = s["epoch_s"] / p["epoch_s"]
        rows.append([r["model"], f"{s['epoch_s']:.2f}", f"{p['epoch_s']:.2f}", f"**{x(speed)}**",
                     f"{s['predict_s']:.3f} / {p['predict_s']:.3f}",
                     f"{s['mae_kw']:.1f} / {p['mae_kw']:.1f}",
                     "yes" if p["fused"] and not s["fused"] else "NO"])
        if speed < 1:
            slower.append(f"ecosystem {r['model']} epoch ({speed:.2f}x)")
    out.append(C.md_table(["model", "stock s/epoch", "patched s/epoch", "epoch speed-up",
                           "predict s stock / patched", "MAE kW stock / patched",
                           "fused when patched"], rows))
    return "".join(out)


def variants_section(d: dict, slower: list[str]) -> str:
    """benchmarks/variants.py: cell variants torch.nn lacks, against their reference loop."""
    out = ["### Cell variants torch.nn lacks, against their reference loop: "
           "`python benchmarks/variants.py`\n\n",
           "The baseline is fastcells.reference's per-step loop of plain PyTorch ops (what a user "
           f"would write without fastcells). Machine: {machine_sentence(d['machine'])}.\n\n"]
    rows = []
    for r in d["rows"]:
        speed = r["speedup"]["median"]
        target = r.get("target")
        rows.append([r["variant"], r["mode"], r["T,B,I,H"],
                     C.fmt_ms(r["reference_ms"]["median"] / 1e3),
                     C.fmt_ms(r["fastcells_ms"]["median"] / 1e3), f"**{x(speed)}**",
                     "" if target is None else f">= {target:g}x " + ("PASS" if speed >= target
                                                                     else "FAIL")])
        if speed < 1:
            slower.append(f"variants {r['variant']} {r['mode']} vs its reference ({speed:.2f}x)")
    out.append(C.md_table(["variant", "mode", "T,B,I,H", "reference ms", "fastcells ms",
                           "speed-up", "target"], rows))
    return "".join(out)


def result_tag(d: dict) -> str:
    """cuda, or cpu_<isa> (results from before the per-ISA paths ran 256-bit AVX2 kernels)."""
    if d["config"]["device"] != "cpu":
        return d["config"]["device"]
    return f"cpu_{d['machine'].get('cpu_isa', 'avx2')}"


def sweep_section(d: dict, slower: list[str]) -> str:
    cfg = d["config"]
    tag = result_tag(d)
    out = [f"### Micro-benchmark sweep: `python benchmarks/sweep.py`\n\n",
           f"Grid `{cfg['grid']}` ({len(d['rows'])} measurements; see the script's docstring), {cfg['repeats']} "
           f"interleaved rounds of blocked_autorange({cfg['min_run_time_s']}s), reference {cfg['reference']}. "
           f"Machine: {machine_sentence(d['machine'])}. Heat map: `benchmarks/results/sweep_{tag}"
           f"_heatmap.png`; every point: `benchmarks/results/sweep_{tag}.md`.\n\n",
           "Geometric-mean speed-up (torch.nn time / fastcells time):\n\n"]
    geo = d["geomean_speedup"]
    rows = []
    dtypes = sorted({k.split("/")[2] for k in geo})
    for dt in dtypes:
        for cell in cfg["cells"]:
            if f"{cell}/all/{dt}" not in geo:
                continue
            rows.append([cell.upper(), dt, x(geo[f"{cell}/fwd/{dt}"]["geomean"]),
                         x(geo[f"{cell}/fwd+bwd/{dt}"]["geomean"]), x(geo[f"{cell}/all/{dt}"]["min"]),
                         x(geo[f"{cell}/all/{dt}"]["max"]), geo[f"{cell}/all/{dt}"]["n"]])
    out.append(C.md_table(["cell", "dtype", "forward", "forward+backward", "worst", "best", "points"], rows))
    for s in d["slower_than_torch_nn"]:
        slower.append(f"sweep {s['cell'].upper()} {s['shape']} {s['dtype']} {s['mode']} ({s['speedup']:.2f}x)")
    return "".join(out)


def title(device: str) -> str:
    """"CPU, avx2 path" for cpu_avx2, "CUDA" for cuda."""
    if device.startswith("cpu_"):
        return f"CPU, {device[4:]} path"
    return device.upper()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, default=C.RESULTS)
    ap.add_argument("--out", type=Path, default=None, help="default: <results>/README_tables.md")
    args = ap.parse_args(argv)
    out_path = args.out or args.results / "README_tables.md"

    parts = ["<!-- generated by benchmarks/make_readme_tables.py from benchmarks/results/*.json; do not edit -->\n\n"]
    found = []
    for device in ("cpu_avx512_bf16", "cpu_avx512", "cpu_avx2", "cpu_generic", "cuda"):
        slower: list[str] = []
        sections = []
        for stem, fn in (("airline", airline_section), ("airline_speed", speed_section),
                         ("electricity", electricity_section), ("sweep", sweep_section),
                         ("cpu_peak", peak_section), ("shared_cores", shared_section),
                         ("decode", decode_section), ("ecosystem", ecosystem_section),
                         ("variants", variants_section)):
            name = result_name(stem, device)
            d = load(args.results / name) if name else None
            if d is not None:
                sections.append(fn(d, slower))
                found.append(name)
        if not sections:
            continue
        parts.append(f"## Results on {title(device)}\n\n")
        parts.append("\n".join(sections))
        parts.append(f"\n### Where fastcells is slower than torch.nn, or than ONNX Runtime where named ({title(device)})\n\n")
        if slower:
            parts += [f"- {s}\n" for s in slower]
        else:
            parts.append("Nowhere in the measurements above.\n")
        parts.append("\n")
    if not found:
        sys.exit(f"no benchmark JSON found in {args.results}")
    text = "".join(parts).rstrip() + "\n"
    out_path.write_text(text, encoding="utf-8")
    print(text)
    print(f"wrote {out_path} from {', '.join(found)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
