"""CPU ISA paths (csrc/cpu/isa.h): selection, the forcing switch, its errors,
and agreement between paths.

The parity, gradcheck and determinism suites run once per path through the
``cpu_isa`` fixture of conftest.py; this file tests the dispatch itself.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import CPU_ISAS, MODE_NAMES, MODES, needs_ops, op_call_args, op_case

pytestmark = needs_ops

import fastcells  # noqa: E402

AUTO_ORDER = ["avx512_bf16", "avx512", "avx2", "generic"]  # what automatic selection prefers


def _run(code: str, isa: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("FASTCELLS_CPU_ISA", None)
    if isa is not None:
        env["FASTCELLS_CPU_ISA"] = isa
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)


def _info(build_info: str) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in build_info.split(";"))


def test_build_info_reports_the_path_and_host():
    info = _info(fastcells.build_info())
    assert info["cpu_isa"] == fastcells.cpu_isa()
    assert info["cpu_isas"].split(",") == fastcells.cpu_isas()
    assert info["host"] == fastcells.cpu_host_features()
    assert fastcells.cpu_isa() in fastcells.cpu_isas()
    assert set(fastcells.cpu_isas()) <= set(fastcells.cpu_isas(built=True))
    assert "generic" in fastcells.cpu_isas()


def test_automatic_selection_takes_the_widest_path_the_host_runs():
    r = _run("import fastcells; print(fastcells.cpu_isa())", None)
    assert r.returncode == 0, r.stderr
    expected = next(name for name in AUTO_ORDER if name in fastcells.cpu_isas())
    assert r.stdout.strip() == expected
    r = _run("import fastcells; print(fastcells.cpu_isa())", "auto")
    assert r.stdout.strip() == expected, r.stderr


def test_host_features_match_the_paths():
    host = fastcells.cpu_host_features().split()
    supported = fastcells.cpu_isas()
    if "avx2" in supported:
        assert {"avx2", "fma"} <= set(host)
    if "avx512" in supported:
        assert {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= set(host)
    elif "avx512" in fastcells.cpu_isas(built=True):
        assert not {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= set(host)
    if "avx512_bf16" in supported:
        assert {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512bf16"} <= set(host)
    elif "avx512_bf16" in fastcells.cpu_isas(built=True):
        assert not {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512bf16"} <= set(host)


_FORWARD = """
import torch, fastcells
torch.manual_seed(0)
m = fastcells.GRU(5, 19, num_layers=2, bidirectional=True)
x = torch.randn(11, 13, 5)
y = m(x)[0]
torch.save(y, {path!r})
print(fastcells.cpu_isa())
"""


@pytest.mark.parametrize("isa", CPU_ISAS)
def test_switch_forces_the_path_in_a_fresh_process(isa, tmp_path):
    if isa not in fastcells.cpu_isas():
        pytest.skip(f"CPU ISA path {isa!r} needs features this host lacks "
                    f"(host: {fastcells.cpu_host_features()})")
    path = str(tmp_path / "y.pt")
    r = _run(_FORWARD.format(path=path), isa)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == isa
    torch.manual_seed(0)
    m = fastcells.GRU(5, 19, num_layers=2, bidirectional=True)
    x = torch.randn(11, 13, 5)
    with fastcells.use_cpu_isa(isa):
        y = m(x)[0]
    assert torch.equal(torch.load(path), y)


def test_switch_with_an_unknown_path_fails_the_import_with_its_name():
    r = _run("import fastcells", "sse9")
    assert r.returncode == 1, (r.returncode, r.stderr)  # an exception, not a signal
    assert "FASTCELLS_CPU_ISA" in r.stderr and "'sse9'" in r.stderr
    for name in fastcells.cpu_isas(built=True):
        assert name in r.stderr


def test_switch_with_a_path_the_host_lacks_fails_the_import_naming_the_host():
    lacking = [n for n in fastcells.cpu_isas(built=True) if n not in fastcells.cpu_isas()]
    if not lacking:
        pytest.skip("this host runs every CPU ISA path of the build")
    r = _run("import fastcells", lacking[-1])
    assert r.returncode == 1, (r.returncode, r.stderr)  # no illegal-instruction crash
    assert "FASTCELLS_CPU_ISA" in r.stderr and lacking[-1] in r.stderr
    assert fastcells.cpu_host_features() in r.stderr


def test_set_cpu_isa_errors_leave_the_path_unchanged():
    before = fastcells.cpu_isa()
    with pytest.raises(RuntimeError, match="set_cpu_isa.*one of the CPU ISA paths.*'nope'"):
        fastcells.set_cpu_isa("nope")
    assert fastcells.cpu_isa() == before
    lacking = [n for n in fastcells.cpu_isas(built=True) if n not in fastcells.cpu_isas()]
    for name in lacking:
        with pytest.raises(RuntimeError, match="cannot run.*host features"):
            fastcells.set_cpu_isa(name)
        assert fastcells.cpu_isa() == before


def test_use_cpu_isa_restores_the_previous_path():
    before = fastcells.cpu_isa()
    with fastcells.use_cpu_isa("generic"):
        assert fastcells.cpu_isa() == "generic"
    assert fastcells.cpu_isa() == before
    assert fastcells.set_cpu_isa("auto") == before
    assert fastcells.cpu_isa() == next(n for n in AUTO_ORDER if n in fastcells.cpu_isas())
    fastcells.set_cpu_isa(before)


def _forward_backward(mode: str, dtype, T, B, I, H, proj, packed, seed=0, source=None):
    """Outputs (training and no_grad) and gradients of a 2-layer bidirectional
    module; with `source`, weights, input and loss weights are rounded to that
    dtype first, so that a float64 run sees exactly a bfloat16 run's values."""
    cls, _, kw = MODES[mode]
    if proj:
        kw = dict(kw, proj_size=proj)
    src = source or dtype
    torch.manual_seed(seed)
    ref = cls(I, H, num_layers=2, bidirectional=True, **kw).to(src).to(dtype)
    m = fastcells.convert(torch.nn.Sequential(ref))[0]
    x = torch.randn(T, B, I).to(src).to(dtype).requires_grad_()
    inp = x
    if packed:
        lengths = torch.randint(1, T + 1, (B,))
        lengths[0] = T
        inp = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
    out = m(inp)
    y = out[0].data if packed else out[0]
    loss = (y * torch.randn(y.shape).to(src).to(dtype)).sum()
    grads = torch.autograd.grad(loss, [x] + list(m.parameters()))
    with torch.no_grad():
        y_inf = m(inp)[0]
    return [y.detach(), y_inf.data if packed else y_inf] + list(grads)


# Shapes with tails on both layouts: hidden sizes off the 16- and 32-column
# panels, batches off the 6- and 12-row blocks, a projection, packed input.
LAYOUT_CASES = [
    ("LSTM", 9, 13, 3, 6, 0, False),
    ("LSTM", 6, 25, 7, 37, 5, True),
    ("GRU", 8, 29, 4, 45, 0, True),
    ("RNN_TANH", 7, 64, 16, 64, 0, False),
    ("LSTM", 5, 2, 8, 130, 0, False),
    ("GRU", 4, 40, 12, 100, 0, False),
]


def _assert_paths_identical(isa_a: str, isa_b: str, case, dtype):
    mode, T, B, I, H, proj, packed = case
    with fastcells.use_cpu_isa(isa_a):
        a = _forward_backward(mode, dtype, T, B, I, H, proj, packed)
    with fastcells.use_cpu_isa(isa_b):
        b = _forward_backward(mode, dtype, T, B, I, H, proj, packed)
    for k, (u, v) in enumerate(zip(a, b)):
        assert torch.equal(u, v), f"result {k} differs by {(u - v).abs().max().item()}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", LAYOUT_CASES, ids=lambda c: "-".join(map(str, c)))
def test_avx512_layout_is_bit_identical_to_avx2(case, dtype):
    """Both paths run the same instructions with different vector widths, panel
    widths and register blocks; each product element sums over k in the same
    order and each gate element runs the same operations, so any difference is
    a layout bug (a tail, a panel boundary, a block of rows)."""
    if not {"avx2", "avx512_layout"} <= set(fastcells.cpu_isas()):
        pytest.skip(f"needs the avx2 path (host: {fastcells.cpu_host_features()})")
    _assert_paths_identical("avx2", "avx512_layout", case, dtype)


def _needs_bf16_path():
    if not {"avx512", "avx512_bf16"} <= set(fastcells.cpu_isas()):
        pytest.skip("needs the avx512_bf16 path (AVX-512 with AVX-512-BF16; "
                    f"host: {fastcells.cpu_host_features()})")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", LAYOUT_CASES, ids=lambda c: "-".join(map(str, c)))
def test_avx512_bf16_path_is_avx512_outside_bfloat16(case, dtype):
    """The avx512_bf16 path runs avx512's kernels for float32 and float64: bit
    for bit the same results, forward and backward."""
    _needs_bf16_path()
    _assert_paths_identical("avx512", "avx512_bf16", case, dtype)


def _assert_as_accurate_as_widening(case):
    """Outputs and gradients of a bfloat16 run on avx512_bf16 (native) and
    on avx512 (widening) against the float64 run on the same values: native's
    error no worse than twice widening's, plus half a bfloat16 ulp of the
    result's scale. Returns (widening, native)."""
    mode, T, B, I, H, proj, packed = case
    exact = _forward_backward(mode, torch.float64, T, B, I, H, proj, packed, source=torch.bfloat16)
    with fastcells.use_cpu_isa("avx512"):
        wide = _forward_backward(mode, torch.bfloat16, T, B, I, H, proj, packed)
    with fastcells.use_cpu_isa("avx512_bf16"):
        native = _forward_backward(mode, torch.bfloat16, T, B, I, H, proj, packed)
    for k, (e, w, n) in enumerate(zip(exact, wide, native)):
        err_w = (w.double() - e).abs().max().item()
        err_n = (n.double() - e).abs().max().item()
        floor = 4e-3 * max(1.0, e.abs().max().item())
        assert err_n <= 2 * err_w + floor, f"result {k}: {err_n:.3g} against widening {err_w:.3g}"
    return wide, native


@pytest.mark.parametrize("case", LAYOUT_CASES, ids=lambda c: "-".join(map(str, c)))
def test_avx512_bf16_products_are_bfloat16_and_accurate(case):
    """bfloat16 inputs on the avx512_bf16 path multiply bfloat16 operands
    (h_{t-1} rounded to bfloat16 as the product reads it) where the avx512 path
    widens them to float32: the forward results differ, and both stay as close
    to the float64 result as bfloat16 allows (error no worse than twice the
    widening path's, plus half a bfloat16 ulp of the output's scale)."""
    _needs_bf16_path()
    wide, native = _assert_as_accurate_as_widening(case)
    assert not torch.equal(wide[0], native[0]), "the bfloat16 products did not run"


# Per-step products of 256 Ki multiply-adds and more (kPairsBackwardWork): the
# bfloat16 backward runs them on bfloat16 operands; a projection's W_hr too.
BF16_BACKWARD_CASES = [
    ("LSTM", 4, 32, 8, 128, 0, False),
    ("GRU", 3, 47, 8, 192, 0, True),
    ("LSTM", 3, 48, 8, 128, 96, False),
]


def _backward_from(reserve_isa: str, backward_isa: str, case):
    """The op's gradients of one bfloat16 call: forward on `reserve_isa`, then
    rnn_backward on `backward_isa` with that same reserve, so that two backward
    paths see identical saved values."""
    mode, T, B, I, H, proj, packed = case
    c = op_case(mode, packed, 1, False, proj_size=proj, T=T, B=B, I=I, H=H, dtype=torch.bfloat16)
    args = op_call_args(c)
    with fastcells.use_cpu_isa(reserve_isa):
        out, hy, cy, reserve = torch.ops.fastcells.rnn_forward(*args)
    g = torch.Generator().manual_seed(1)
    grad_out = torch.randn(out.shape, generator=g).to(torch.bfloat16)
    with fastcells.use_cpu_isa(backward_isa):
        dx, dhx, dcx, dw = torch.ops.fastcells.rnn_backward(*args, reserve, grad_out, None, None)
    return [dx, dhx] + list(dw)


@pytest.mark.parametrize("case", BF16_BACKWARD_CASES, ids=lambda c: "-".join(map(str, c)))
def test_avx512_bf16_backward_products_are_bfloat16_and_accurate(case):
    """From kPairsBackwardWork multiply-adds per step the bfloat16 backward's
    per-step products run on bfloat16 operands: from the same saved forward the
    gradients differ from the widening path's, and forward and backward
    together stay as accurate as widening."""
    _needs_bf16_path()
    wide = _backward_from("avx512_bf16", "avx512", case)
    native = _backward_from("avx512_bf16", "avx512_bf16", case)
    assert not torch.equal(wide[1], native[1]), "the bfloat16 backward products did not run"
    _assert_as_accurate_as_widening(case)


def test_avx512_bf16_backward_chooses_products_by_size():
    """Below kPairsBackwardWork (here 128 Ki multiply-adds per step) the
    bfloat16 backward's time loop widens, as the avx512 path does, and so do
    weight gradients with fewer than kPairsGemmRows rows (dW_ih: 8 input
    features): those gradients keep the same bits. dW_hh (128 rows, the hidden
    size, over 512 gate units) runs on bfloat16 operands, and stays as accurate
    as widening."""
    _needs_bf16_path()
    case = ("LSTM", 4, 2, 8, 128, 0, False)
    wide = _backward_from("avx512_bf16", "avx512", case)
    native = _backward_from("avx512_bf16", "avx512_bf16", case)
    names = ["input", "hx", "weight_ih", "weight_hh", "bias_ih", "bias_hh"]
    for name, w, n in zip(names, wide, native):
        if name == "weight_hh":
            assert not torch.equal(w, n), "the bfloat16 weight-gradient products did not run"
        else:
            assert torch.equal(w, n), f"gradient of {name} differs"
    _assert_as_accurate_as_widening(case)


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_long_inference_in_time_chunks_on_every_path(mode, cpu_isa):
    """Inference runs long sequences in time chunks that reuse the packed
    weights; the pack must be the path's own layout."""
    cls, _, kw = MODES[mode]
    torch.manual_seed(0)
    ref = cls(16, 64, **kw).double()
    m = fastcells.convert(torch.nn.Sequential(cls(16, 64, **kw)))[0].double()
    m.load_state_dict(ref.state_dict())
    x = torch.randn(300, 64, 16, dtype=torch.double)  # several chunks of 2^20 gate values
    with torch.no_grad():
        expected = ref(x)
        actual = m(x)
    for e, a in zip(torch.utils._pytree.tree_leaves(expected), torch.utils._pytree.tree_leaves(actual)):
        torch.testing.assert_close(a, e, atol=1e-10, rtol=1e-10)
