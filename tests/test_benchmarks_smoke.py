"""Smoke tests of the forecasting benchmarks.

The README's main command (benchmarks/forecast_airline.py),
benchmarks/forecast_electricity.py and benchmarks/airline_speed.py run end to
end and write sane JSON.
"""
import json
import math
import subprocess
import sys
from pathlib import Path

import fastcells

REPO = Path(__file__).resolve().parent.parent
# CPU results are named per CPU ISA path (benchmarks/_common.device_tag).
TAG = f"cpu_{fastcells.cpu_isa()}"


def _finite_numbers(obj):
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        assert math.isfinite(obj), obj
    elif isinstance(obj, dict):
        for v in obj.values():
            _finite_numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            _finite_numbers(v)


def test_forecast_airline_runs(tmp_path):
    cmd = [sys.executable, str(REPO / "benchmarks" / "forecast_airline.py"), "--epochs", "3", "--cell", "lstm,gru",
           "--out", str(tmp_path), "--no-progress", "--threads", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "fastcells" in proc.stdout and "torch.nn" in proc.stdout
    out = json.loads((tmp_path / f"airline_{TAG}.json").read_text())
    assert (tmp_path / f"airline_{TAG}.png").stat().st_size > 0
    assert out["config"]["x_shape"] == [141, 1, 3]
    assert out["config"]["n_train"] == 112 and out["config"]["epochs"] == 3
    for key in ("cpu", "torch", "torch_threads"):
        assert key in out["machine"]
    assert [r["cell"] for r in out["results"]] == ["lstm", "gru"]
    for r in out["results"]:
        for side in ("torch.nn", "fastcells"):
            s = r[side]
            for key in ("ms_per_epoch", "total_train_s", "final_train_loss", "test_rmse_passengers"):
                assert key in s
            assert s["ms_per_epoch"]["median"] > 0
            assert len(s["predictions_passengers"]) == 141
        for key in ("speedup_median_epoch", "max_abs_pred_diff_passengers", "max_abs_loss_curve_diff"):
            assert key in r
        # Same initial weights, three epochs: predictions agree to float32 noise (in thousands of passengers).
        assert r["max_abs_pred_diff_passengers"] < 1e-2
    _finite_numbers(out["results"])


def test_airline_speed_runs_with_bound_rows(tmp_path):
    """airline_speed (airline part) writes every row, the two epoch bounds included."""
    cmd = [sys.executable, str(REPO / "benchmarks" / "airline_speed.py"), "--quick", "--skip-grid",
           "--repeats", "1", "--min-run-time", "0.01", "--threads", "1", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads((tmp_path / f"airline_speed_{TAG}.json").read_text())
    got = [(r["cell"], r["what"], r["T"]) for r in out["rows"]]
    assert got == [("lstm", "fwd", 112), ("lstm", "fwd+bwd", 112), ("lstm", "fixed", 1), ("lstm", "epoch", 112),
                   ("lstm", "epoch fixed", 1), ("lstm", "epoch bound", 112),
                   ("gru", "fwd", 112), ("gru", "fwd+bwd", 112), ("gru", "epoch", 112)]
    for r in out["rows"]:
        assert r["torch.nn_ms"]["median"] > 0 and r["fastcells_ms"]["median"] > 0
        assert r["speedup"]["min"] <= r["speedup"]["median"] <= r["speedup"]["max"]
    # Only the four airline targets are judged; the bound rows are informative.
    assert out["targets_total"] == 4
    assert "epoch bound" in out["config"] and "epoch fixed" in out["config"]
    assert "| epoch bound |" in (tmp_path / f"airline_speed_{TAG}.md").read_text()
    _finite_numbers(out["rows"])


def test_free_rnn_stand_in_costs_nothing_but_trains_like_the_model():
    """The stand-in of the `epoch bound` row: the LSTM's parameter shapes, a fixed output,
    and a zero gradient on every parameter after each forward, so Adam updates all of them."""
    import torch
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import airline_speed as S
    finally:
        sys.path.pop(0)
    lstm = torch.nn.LSTM(3, 6, num_layers=2)
    free = S.FreeRNN(lstm, 112, 1, 6)
    assert [p.shape for p in free.parameters()] == [p.shape for p in lstm.parameters()]
    x = torch.rand(112, 1, 3)
    y = torch.rand(112, 1, 1)
    epoch = S.epoch_stmt(free, x, y, 6)
    loss = epoch()
    assert torch.isfinite(loss)
    assert free(x)[0].shape == (112, 1, 6)
    for p in free.parameters():
        assert p.grad is not None and p.grad.shape == p.shape and not p.grad.any()
    # Adam took a step on every parameter: its state holds all ten (8 RNN + 2 head).
    assert isinstance(epoch.optimizer, torch.optim.Adam) and len(epoch.optimizer.state) == 10


def test_forecast_electricity_runs(tmp_path):
    """The larger forecasting benchmark end to end on two batches: JSON, figure, equal accuracy."""
    cmd = [sys.executable, str(REPO / "benchmarks" / "forecast_electricity.py"), "--epochs", "1",
           "--max-batches", "2", "--hidden", "8", "--cells", "lstm,gru", "--out", str(tmp_path),
           "--threads", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads((tmp_path / f"electricity_{TAG}.json").read_text())
    assert (tmp_path / f"electricity_{TAG}.png").stat().st_size > 0
    assert out["config"]["lookback_h"] == 168 and out["config"]["horizon_h"] == 24
    assert [(r["cell"], r["hidden"]) for r in out["results"]] == [("lstm", 8), ("gru", 8)]
    for r in out["results"]:
        for side in ("torch.nn", "fastcells"):
            assert r[side]["val_mae_kw"] > 0 and r[side]["val_rmse_kw"] >= r[side]["val_mae_kw"]
        # Same initial weights and batches, two Adam steps: the same forecasts to float32 noise (kW;
        # the load is in the thousands of kW).
        assert r["max_abs_val_pred_diff_kw"] < 1.0
        assert abs(r["torch.nn"]["val_mae_kw"] - r["fastcells"]["val_mae_kw"]) < 0.1
    _finite_numbers(out["results"])


def test_tf32_flag_defaults_off_and_sets_both_switches():
    """CUDA comparisons run torch.nn in full float32 unless --tf32 is given."""
    import argparse

    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import _common as C
    finally:
        sys.path.pop(0)
    ap = argparse.ArgumentParser()
    C.add_tf32_flag(ap)
    assert ap.parse_args([]).tf32 is False
    assert ap.parse_args(["--tf32"]).tf32 is True
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    try:
        C.set_tf32(True)
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
        C.set_tf32(False)
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_cuda_targets_table_and_no_gpu_exit():
    """benchmarks/cuda_targets.py: the markdown row shows both fastcells loops,
    and without a GPU the script says so and exits 2 instead of timing anything."""
    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import cuda_targets
    finally:
        sys.path.pop(0)
    meta = {"gpu": "GPU X", "torch": "t", "cuda": "c", "cudnn": 1, "cudnn_allow_tf32": False}
    row = {"cell": "LSTM", "dtype": "float32", "T": 112, "B": 1, "I": 3, "H": 6, "torch_nn_ms": 2.0,
           "fastcells_ms": 1.0, "fastcells_stepwise_ms": 4.0, "speedup": 2.0, "speedup_min": 1.5,
           "speedup_max": 2.5, "speedup_stepwise": 0.5}
    md = cuda_targets.markdown(meta, [row])
    assert "GPU X" in md and "TF32 off" in md
    assert "| LSTM | float32 | 112 | 1 | 3 | 6 | 2.000 | 1.000 | 2.00x (1.50-2.50) | 4.000 | 0.50x |" in md
    if not torch.cuda.is_available():
        proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "cuda_targets.py")],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert "needs a CUDA device" in proc.stderr


def test_sweep_stops_at_max_minutes_and_says_so(tmp_path):
    """benchmarks/sweep.py --max-minutes: the shapes measured before the limit are
    written (JSON, markdown), the grid is marked incomplete and no PASS is claimed."""
    cmd = [sys.executable, str(REPO / "benchmarks" / "sweep.py"), "--quick", "--cells", "rnn",
           "--max-minutes", "0.0001", "--threads", "1", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads((tmp_path / f"sweep_{TAG}_quick.json").read_text())
    assert out["config"]["shapes_total"] == 4
    assert out["config"]["shapes_not_measured"] == 3
    assert [(r["cell"], r["mode"]) for r in out["rows"]] == [("rnn", "fwd"), ("rnn", "fwd+bwd")]
    assert out["forecast_regime_pass"] in (None, False)
    assert "Incomplete grid" in (tmp_path / f"sweep_{TAG}_quick.md").read_text()
    assert "PASS" not in proc.stdout
    _finite_numbers(out["rows"])


def test_cpu_peak_runs(tmp_path):
    """The calibration benchmark measures every path the host runs and reports
    each product's fraction of the measured peak."""
    cmd = [sys.executable, str(REPO / "benchmarks" / "cpu_peak.py"), "--quick", "--out", str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads((tmp_path / f"cpu_peak_{fastcells.cpu_isa()}.json").read_text())
    _finite_numbers(out["rows"])
    assert set(out["peaks"]) == set(fastcells.cpu_isas()) - {"avx512_layout"}
    assert out["machine"]["cpu_isa"] == fastcells.cpu_isa()
    for row in out["rows"]:
        for isa, r in row["paths"].items():
            assert r["gflops"] > 0 and 0 < r["fraction_of_path_peak"], (isa, row["shape"], r)
        assert row["brgemm"]["gflops"] > 0 and row["torch_mm"]["gflops"] > 0


def test_shared_cores_runs(tmp_path):
    cmd = [sys.executable, str(REPO / "benchmarks" / "shared_cores.py"), "--quick", "--out", str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads((tmp_path / f"shared_cores_{fastcells.cpu_isa()}.json").read_text())
    _finite_numbers(out["rows"])
    assert {r["setting"] for r in out["rows"]} == {"quiet", "busy", "1 thread"}


def test_decode_runs(tmp_path):
    import importlib.util

    cmd = [sys.executable, str(REPO / "benchmarks" / "decode.py"), "--quick", "--steps", "3",
           "--threads", "1", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads((tmp_path / f"decode_{TAG}_quick.json").read_text())
    assert out["machine"]["cpu_isa"] == fastcells.cpu_isa()
    has_ort = importlib.util.find_spec("onnxruntime") is not None
    assert [(r["cell"], r["B"], r["H"]) for r in out["loop"]] == [
        ("LSTM", 1, 40), ("LSTM", 100, 40), ("GRU", 1, 40), ("GRU", 100, 40)]
    for r in out["loop"]:
        assert r["steps"] == 3
        # Same weights and inputs: the three decoders agree to float32 rounding.
        assert r["max_abs_diff_fastcells"] < 1e-5
        assert r["speedup_vs_torch.nn"]["median"] > 0
        if has_ort:
            assert r["max_abs_diff_onnxruntime"] < 1e-5
            assert r["onnxruntime_ms"]["median"] > 0
    assert [r["cell"] for r in out["per_call"]] == ["LSTM", "GRU", "RNN"]
    for r in out["per_call"]:
        assert r["module_us"] > r["arithmetic_us"] > 0
    assert "| cell | batch | hidden |" in (tmp_path / f"decode_{TAG}_quick.md").read_text()
    _finite_numbers(out["loop"])


def test_ecosystem_runs_when_the_libraries_are_installed(tmp_path):
    import pytest

    for name in ("gluonts", "pytorch_forecasting", "lightning"):
        pytest.importorskip(name, reason=f"optional: {name} not installed")
    cmd = [sys.executable, str(REPO / "benchmarks" / "ecosystem.py"), "--epochs", "1", "--batches", "2",
           "--rounds", "1", "--threads", "1", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads((tmp_path / f"ecosystem_{TAG}.json").read_text())
    assert len(out["rows"]) == 3
    for r in out["rows"]:
        # The library's own model class, running the fused op only while patched.
        assert r["patched"]["fused"] and not r["stock"]["fused"]
        assert r["patched"]["rnn_class"] == r["stock"]["rnn_class"]
        # Same seed and data; the models' inter-layer dropout masks differ (fastcells
        # draws its own), so after two batches the forecasts are close, not equal.
        assert abs(r["patched"]["mae_kw"] - r["stock"]["mae_kw"]) < 0.25 * r["stock"]["mae_kw"] + 50
    _finite_numbers(out["rows"])


def test_variants_runs(tmp_path):
    """benchmarks/variants.py: the fused variants against their reference loop
    (the script checks their outputs agree before timing)."""
    cmd = [sys.executable, str(REPO / "benchmarks" / "variants.py"), "--quick", "--threads", "1",
           "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads((tmp_path / f"variants_{TAG}_quick.json").read_text())
    assert out["machine"]["cpu_isa"] == fastcells.cpu_isa()
    assert [(r["variant"], r["mode"]) for r in out["rows"]] == [
        (v, m) for v in ("GRU reset_after=False", "LSTM return_cell_states=True",
                         "LSTM zoneout=0.1 (eval)", "GRU zoneout=0.1 (eval)",
                         "LSTM recurrent_dropout=0.25 (fixed masks)", "LayerNormLSTM",
                         "LayerNormGRU")
        for m in ("fwd", "fwd+bwd")]
    for r in out["rows"]:
        assert r["speedup"]["median"] > 0
    assert "| variant | mode |" in (tmp_path / f"variants_{TAG}_quick.md").read_text()


def _run_py(*args, timeout=300):
    cmd = [sys.executable, str(REPO / "benchmarks" / "run.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def test_registry_lists_every_benchmark_script():
    """Every script that measures is in benchmarks/registry.py, and run.py lists it."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from registry import BENCHMARKS
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    helpers = {"_common.py", "registry.py", "run.py", "make_readme_tables.py"}
    scripts = {p.name for p in (REPO / "benchmarks").glob("*.py")} - helpers
    assert {b.script for b in BENCHMARKS} == scripts
    proc = _run_py("list")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [line.split()[0] for line in proc.stdout.splitlines()] == [b.name for b in BENCHMARKS]


def test_ab_against_a_built_checkout(tmp_path):
    """run.py ab times two builds in alternating processes (here the same
    checkout on both sides) and writes the per-case times and ratios."""
    cases = ["LSTM:1,4,3,6:2:step:float32", "GRU:5,2,3,6:fb:float32"]
    proc = _run_py("ab", "--base-root", str(REPO), "--cases", *cases, "--rounds", "2",
                   "--min-run-time", "0.01", "--threads", "1", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    [path] = tmp_path.glob("ab_*.json")
    out = json.loads(path.read_text())
    assert out["base"]["commit"] == out["head"]["commit"]
    assert [r["case"] for r in out["rows"]] == cases
    for r in out["rows"]:
        assert r["base_ms"] > 0 and r["head_ms"] > 0 and r["speedup"]["n"] == 2
    assert "| case | base ms | head ms | speed-up |" in path.with_suffix(".md").read_text()


def test_ab_refuses_a_malformed_case():
    proc = _run_py("ab", "--base-root", str(REPO), "--cases", "LSTM:1,4,3:fb:float32")
    assert proc.returncode != 0
    assert "CELL:T,B,I,H[:LAYERS]:MODE:DTYPE" in proc.stderr
