"""Cell variants that torch.nn lacks, against their pure-PyTorch reference loop.

torch.nn has no reset-before GRU, no layer-normalised LSTM or GRU and no LSTM
that returns every step's cell state, so the baseline is what a user would write without fastcells: the
reference's per-step loop (fastcells.reference, plain differentiable PyTorch
ops, the same equations). The cell-state variant backpropagates through the
output and the cell states together (their sum). The zoneout variant runs in
eval mode (every unit mixes its previous and new state by the rate), so that
both sides compute the same values without drawing masks; the recurrent
dropout variant uses one fixed set of masks (as one training forward draws)
on both sides. haste, the other fused LayerNorm LSTM/GRU, runs on CUDA only,
so it has no CPU row here. Timed in one run, interleaved,
at the forecasting shape (T, B, I, H) = (168, 64, 16, 64), one layer: no_grad
forward and forward+backward, float32. The target of the cell-variants work
is 5x on forward+backward.

    python benchmarks/variants.py            # results/variants_cpu_<isa>.json and .md
    python benchmarks/variants.py --quick    # one round, short timings
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

SHAPE = (168, 64, 16, 64)
TARGET = 5.0


class ReferenceLoop(nn.Module):
    """The reference's per-step loop over a fastcells module's own parameters."""

    def __init__(self, m: nn.Module, mode: int):
        super().__init__()
        self.m, self.mode = m, mode

    def forward(self, x):
        from fastcells._cells import cell
        from fastcells.reference import rnn_reference

        m = self.m
        h0 = x.new_zeros(m.num_layers, x.shape[1], m.hidden_size)
        cells = getattr(m, "return_cell_states", False)
        lstm = cell(self.mode).has_cell_state
        c0 = h0 if lstm else None
        p = getattr(m, "zoneout", 0.0)
        zone = None
        if p:
            width = m.hidden_size * (2 if lstm else 1)
            zone = x.new_full((m.num_layers, x.shape[0], x.shape[1], width), p)
        res = rnn_reference(x, m._flat_weights, h0, c0, None, self.mode, m.num_layers, False,
                            m.bias, 0, return_cell_states=cells, zoneout=zone,
                            recurrent_masks=getattr(m, "recurrent_masks", None))
        return (res[0] + res[3], res[1]) if cells else (res[0], res[1])


class CellStatesSum(nn.Module):
    """An LSTM with return_cell_states=True whose first output is output + cell states."""

    def __init__(self, m: nn.Module):
        super().__init__()
        self.m, self.return_cell_states = m, True
        self.num_layers, self.hidden_size, self.bias = m.num_layers, m.hidden_size, m.bias

    @property
    def _flat_weights(self):
        return self.m._flat_weights

    def forward(self, x):
        out, (h, _), cs = self.m(x)
        return out + cs, h


class FixedRecurrentMasks(nn.Module):
    """A fused LSTM whose recurrent dropout masks are fixed (drawn once, as one
    training forward would), so that the reference can use the same ones."""

    def __init__(self, m: nn.Module, B: int, p: float):
        super().__init__()
        self.m = m
        self.num_layers, self.hidden_size, self.bias = m.num_layers, m.hidden_size, m.bias
        g = torch.Generator().manual_seed(2)
        keep = torch.rand((m.num_layers, B, m.hidden_size), generator=g) >= p
        self.recurrent_masks = keep.float() / (1 - p)

    @property
    def _flat_weights(self):
        return self.m._flat_weights

    def forward(self, x):
        from fastcells import MODES
        from fastcells.functional import rnn

        m = self.m
        out, hy, _ = rnn(x, m._flat_weights, None, None, None, MODES["LSTM"], m.num_layers,
                         False, m.bias, 0, recurrent_masks=self.recurrent_masks)
        return out, hy


def variants(fastcells):
    """(name, fused module, its mode code)."""
    I, H = SHAPE[2], SHAPE[3]
    torch.manual_seed(0)
    return [("GRU reset_after=False", fastcells.GRU(I, H, reset_after=False),
             fastcells.MODES["GRU_RESET_BEFORE"]),
            ("LSTM return_cell_states=True",
             CellStatesSum(fastcells.LSTM(I, H, return_cell_states=True)),
             fastcells.MODES["LSTM"]),
            ("LSTM zoneout=0.1 (eval)", fastcells.LSTM(I, H, zoneout=0.1).eval(),
             fastcells.MODES["LSTM"]),
            ("GRU zoneout=0.1 (eval)", fastcells.GRU(I, H, zoneout=0.1).eval(),
             fastcells.MODES["GRU"]),
            ("LSTM recurrent_dropout=0.25 (fixed masks)",
             FixedRecurrentMasks(fastcells.LSTM(I, H), SHAPE[1], 0.25), fastcells.MODES["LSTM"]),
            ("LayerNormLSTM", fastcells.LayerNormLSTM(I, H), fastcells.MODES["LSTM_LN"]),
            ("LayerNormGRU", fastcells.LayerNormGRU(I, H), fastcells.MODES["GRU_LN"])]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    fastcells = C.import_fastcells()
    threads = C.set_threads(args.threads)
    repeats, min_run = (1, 0.05) if args.quick else (3, 0.3)
    T, B, I, H = SHAPE
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, B, I, generator=g)
    grad = torch.randn(T, B, H, generator=g)
    rows = []
    for name, fused, mode in variants(fastcells):
        ref = ReferenceLoop(fused, mode)
        with torch.no_grad():  # (the first steps: at their initialisation the LayerNorm
            # LSTM's float32 runs, fused and reference alike, drift from float64 over
            # long sequences, as rounding differences grow through its recurrence)
            torch.testing.assert_close(fused(x[:16])[0], ref(x[:16])[0], atol=2e-5, rtol=1e-4)
        stmts = {}
        for side, m in (("reference", ref), ("fastcells", fused)):
            fwd, fb = C.module_stmts(m, x, grad)
            stmts[f"{side} fwd"], stmts[f"{side} fwd+bwd"] = fwd, fb
        times = C.interleaved(stmts, repeats, min_run, threads, "cpu")
        for mode_name in ("fwd", "fwd+bwd"):
            r, f = times[f"reference {mode_name}"], times[f"fastcells {mode_name}"]
            rows.append({"variant": name, "mode": mode_name, "T,B,I,H": ",".join(map(str, SHAPE)),
                         "reference_ms": C.summary([t * 1e3 for t in r]),
                         "fastcells_ms": C.summary([t * 1e3 for t in f]),
                         "speedup": C.ratio_summary(r, f),
                         "target": TARGET if mode_name == "fwd+bwd" else None})
    machine = C.machine_info("cpu")
    stem = f"variants_{C.device_tag('cpu')}" + ("_quick" if args.quick else "")
    table = C.md_table(
        ["variant", "mode", "T,B,I,H", "reference ms", "fastcells ms", "speed-up", "target"],
        [[r["variant"], r["mode"], r["T,B,I,H"], C.fmt_ms(r["reference_ms"]["median"] / 1e3),
          C.fmt_ms(r["fastcells_ms"]["median"] / 1e3), f"{r['speedup']['median']:.1f}x",
          "" if r["target"] is None else
          f">= {r['target']:g}x " + ("PASS" if r["speedup"]["median"] >= r["target"] else "FAIL")]
         for r in rows])
    md = (f"# Cell variants vs their reference loop (cpu, float32)\n\n{C.machine_line(machine)}. "
          f"Medians of {repeats} interleaved rounds; speed-up = reference / fastcells.\n\n"
          f"{table}\n")
    C.write_results(args.out, stem, {"benchmark": "variants", "machine": machine, "rows": rows},
                    md)


if __name__ == "__main__":
    main()
