"""fastcells on CUDA against torch.nn on CUDA (cuDNN). Skipped without a GPU.

Covers: forward and every gradient (input, initial state, all weights) for
LSTM/GRU/RNN, dense and packed, uni/bidirectional, 1-2 layers, LSTM
projection; both loop implementations of csrc/cuda (the persistent kernel with
weights in shared memory or streamed from global memory, and the stepwise
cuBLAS + pointwise path, forced through FASTCELLS_CUDA_RECURRENT); float64 to
~1e-10, float32 to the usual tolerance, float16/bfloat16 no worse than 2x
torch.nn's own error against float64; gradcheck in float64; bit-identical
gradients over two runs; a training step captured in a CUDA graph; a
non-default stream. Outputs and scratch are NaN-poisoned (FASTCELLS_POISON=1)
so unwritten elements fail loudly.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from conftest import HAVE_FASTCELLS, MODES, make_fastcells_like, make_nn, packed_lengths

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    pytest.mark.skipif(not HAVE_FASTCELLS, reason="fastcells extension not built"),
]

DEV = "cuda"
PATHS = ["auto", "persistent", "persistent_global", "stepwise"]
# float32: the CPU suite's tolerance for gradients summed over many steps
# (cuDNN and fastcells add the terms in different orders).
TIGHT = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=1e-4, rtol=1e-4)}


@pytest.fixture(autouse=True)
def _cuda_build_and_poison(monkeypatch):
    if torch.cuda.is_available() and HAVE_FASTCELLS:
        import fastcells

        info = fastcells._ops.build_info()
        if "cuda=1" not in info:
            pytest.skip(f"fastcells was built without CUDA ({info})")
    monkeypatch.setenv("FASTCELLS_POISON", "1")


def set_path(monkeypatch, path: str) -> None:
    monkeypatch.setenv("FASTCELLS_CUDA_RECURRENT", path)


# ---------------------------------------------------------------- helpers

def build_pair(mode: str, I: int, H: int, dtype: torch.dtype, **kw) -> tuple[nn.Module, nn.Module]:
    """(torch.nn module, fastcells module) with identical weights, on CUDA."""
    ref = make_nn(mode, I, H, dtype=torch.float64, seed=0, **kw)
    fc = make_fastcells_like(ref)
    return ref.to(DEV, dtype), fc.to(DEV, dtype)


def make_data(module: nn.Module, kind: str, T: int, B: int, I: int, dtype: torch.dtype,
              with_hx: bool, seed: int = 1):
    """Leaves (x, h0[, c0]) in float64 on CUDA; callers cast per run."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, I, generator=g, dtype=torch.float64)
    D = 2 if module.bidirectional else 1
    P = getattr(module, "proj_size", 0) or module.hidden_size
    hx = None
    if with_hx:
        h = torch.randn(module.num_layers * D, B, P, generator=g, dtype=torch.float64)
        if isinstance(module, nn.LSTM) or type(module).__name__ == "LSTM":
            c = torch.randn(module.num_layers * D, B, module.hidden_size, generator=g,
                            dtype=torch.float64)
            hx = (h, c)
        else:
            hx = (h,)
    return x.to(DEV), (tuple(t.to(DEV) for t in hx) if hx is not None else None)


def run(module: nn.Module, kind: str, x64: Tensor, hx64, dtype: torch.dtype, seed: int = 3):
    """Forward + backward of a weighted sum of every output.

    Returns (outputs, grads) as lists of tensors: outputs = [out, h_n(, c_n)],
    grads = [dx, dh0(, dc0), *dweights].
    """
    x = x64.to(dtype).requires_grad_()
    leaves = [x]
    hx = None
    if hx64 is not None:
        hx = [t.to(dtype).requires_grad_() for t in hx64]
        leaves += hx
        hx = tuple(hx) if len(hx) == 2 else hx[0]
    inp = x
    if kind == "packed":
        lengths = torch.tensor(packed_lengths(x.shape[0], x.shape[1]))
        inp = pack_padded_sequence(x, lengths, enforce_sorted=False)
    out, state = module(inp, hx)
    data = out.data if isinstance(out, PackedSequence) else out
    outs = [data] + (list(state) if isinstance(state, tuple) else [state])
    g = torch.Generator().manual_seed(seed)
    loss = sum((o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64).to(DEV)).sum()
               for o in outs)
    params = list(module.parameters())
    grads = torch.autograd.grad(loss, leaves + params)
    return [o.detach() for o in outs], list(grads)


def names_of(module: nn.Module, hx) -> list[str]:
    return (["x"] + ([f"hx{k}" for k in range(len(hx))] if hx is not None else [])
            + [n for n, _ in module.named_parameters()])


def assert_lists_close(actual, expected, labels, **tol) -> None:
    assert len(actual) == len(expected)
    for a, e, label in zip(actual, expected, labels):
        assert not torch.isnan(a).any() or torch.isnan(e).any(), f"{label}: NaN in fastcells result"
        torch.testing.assert_close(a, e, **tol, msg=lambda m, label=label: f"{label}: {m}")


CONFIGS = [
    # mode, kind, bidirectional, num_layers, proj_size, with_hx, (T, B, I, H)
    ("LSTM", "dense", False, 1, 0, True, (7, 3, 4, 5)),
    ("LSTM", "packed", True, 2, 0, True, (6, 5, 3, 4)),
    ("LSTM", "packed", True, 2, 3, True, (6, 5, 3, 5)),
    ("LSTM", "dense", False, 2, 2, False, (5, 2, 3, 4)),
    ("GRU", "dense", True, 1, 0, True, (7, 3, 4, 5)),
    ("GRU", "packed", False, 2, 0, True, (6, 5, 3, 4)),
    ("GRU", "packed", True, 2, 0, False, (6, 6, 3, 6)),
    ("RNN_TANH", "dense", True, 2, 0, True, (5, 3, 4, 5)),
    ("RNN_RELU", "packed", True, 1, 0, True, (6, 5, 3, 4)),
    ("RNN_TANH", "packed", False, 1, 0, False, (1, 1, 2, 3)),
]


def cfg_id(c) -> str:
    mode, kind, bi, L, proj, hx, shape = c
    return f"{mode}-{kind}-{'bi' if bi else 'uni'}-L{L}-P{proj}-{'hx' if hx else 'nohx'}-" + "x".join(map(str, shape))


def _parity(monkeypatch, path, cfg, dtype, tol):
    set_path(monkeypatch, path)
    mode, kind, bi, L, proj, with_hx, (T, B, I, H) = cfg
    kw = dict(num_layers=L, bidirectional=bi)
    if proj:
        kw["proj_size"] = proj
    ref, fc = build_pair(mode, I, H, dtype, **kw)
    x, hx = make_data(ref, kind, T, B, I, dtype, with_hx)
    o_ref, g_ref = run(ref, kind, x, hx, dtype)
    o_fc, g_fc = run(fc, kind, x, hx, dtype)
    assert_lists_close(o_fc, o_ref, ["output", "h_n", "c_n"], **tol)
    assert_lists_close(g_fc, g_ref, names_of(ref, hx), **tol)


# ------------------------------------------------------------------ parity

@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("cfg", CONFIGS, ids=cfg_id)
def test_parity_float64(monkeypatch, path, cfg):
    _parity(monkeypatch, path, cfg, torch.float64, TIGHT[torch.float64])


@pytest.mark.parametrize("path", ["auto", "stepwise"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=cfg_id)
def test_parity_float32(monkeypatch, path, cfg):
    # cuDNN (the torch.nn reference) runs float32 RNNs in TF32 on Ampere and
    # newer unless told not to, and cuBLAS (fastcells' whole-sequence GEMMs) may
    # too: compare full float32 arithmetic on both sides.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    _parity(monkeypatch, path, cfg, torch.float32, TIGHT[torch.float32])


# Shapes that make the automatic choice pick each implementation: small H
# (weights in shared memory, several rows per block when B exceeds the SM
# count), H = 128 (LSTM: weights streamed from L2), H = 256 (RNN: streamed
# from L2; LSTM and GRU: stepwise), H = 320 (stepwise).
@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_TANH"])
@pytest.mark.parametrize("shape", [(9, 300, 5, 16), (6, 8, 7, 128), (6, 8, 7, 256), (5, 70, 6, 320)],
                         ids=lambda s: "x".join(map(str, s)))
def test_parity_auto_shapes(monkeypatch, mode, shape):
    cfg = (mode, "packed", True, 1, 0, True, shape)
    _parity(monkeypatch, "auto", cfg, torch.float64, TIGHT[torch.float64])


def test_parity_projection_large(monkeypatch):
    for path in ("auto", "stepwise"):
        _parity(monkeypatch, path, ("LSTM", "packed", True, 1, 100, True, (5, 67, 4, 130)),
                torch.float64, TIGHT[torch.float64])


# ---------------------------------------------------------- low precision

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("path", ["auto", "stepwise"])
@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[2], CONFIGS[4], CONFIGS[5], CONFIGS[7]],
                         ids=cfg_id)
def test_low_precision_error_vs_torch(monkeypatch, dtype, path, cfg):
    """Error against the float64 result no worse than 2x torch.nn's own error
    in the same dtype (plus one ulp of the value's scale)."""
    set_path(monkeypatch, path)
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("GPU without bfloat16")
    mode, kind, bi, L, proj, with_hx, (T, B, I, H) = cfg
    kw = dict(num_layers=L, bidirectional=bi)
    if proj:
        kw["proj_size"] = proj
    ref64, fc = build_pair(mode, I, H, torch.float64, **kw)
    ref_lp = copy.deepcopy(ref64).to(dtype)
    fc = fc.to(dtype)
    x, hx = make_data(ref64, kind, T, B, I, dtype, with_hx)
    o64, g64 = run(ref64, kind, x, hx, torch.float64)
    o_nn, g_nn = run(ref_lp, kind, x, hx, dtype)
    o_fc, g_fc = run(fc, kind, x, hx, dtype)
    eps = torch.finfo(dtype).eps
    labels = ["output", "h_n", "c_n"][:len(o64)] + names_of(ref64, hx)
    for label, e64, enn, efc in zip(labels, o64 + g64, o_nn + g_nn, o_fc + g_fc):
        err_nn = (enn.double() - e64).abs().max().item()
        err_fc = (efc.double() - e64).abs().max().item()
        floor = eps * max(1.0, e64.abs().max().item())
        assert err_fc <= 2 * err_nn + floor, (
            f"{label}: fastcells error {err_fc:.3g} > 2x torch.nn error {err_nn:.3g} + {floor:.3g}")


# --------------------------------------------------------------- gradcheck

@pytest.mark.parametrize("path", ["auto", "stepwise"])
@pytest.mark.parametrize("mode", list(MODES))
def test_gradcheck_float64(monkeypatch, path, mode):
    from fastcells import functional as F

    set_path(monkeypatch, path)
    mode_id = MODES[mode][1]
    bi = mode in ("LSTM", "GRU")
    proj = 2 if mode == "LSTM" else 0
    ref, _ = build_pair(mode, 3, 3, torch.float64, num_layers=2, bidirectional=bi,
                        **({"proj_size": proj} if proj else {}))
    weights = [w.detach().clone().requires_grad_() for w in ref._flat_weights]
    D = 2 if bi else 1
    P = proj or 3
    g = torch.Generator().manual_seed(5)
    batch_sizes = [3, 3, 2, 1]
    N = sum(batch_sizes)
    x = torch.randn(N, 3, generator=g, dtype=torch.float64).to(DEV).requires_grad_()
    h0 = torch.randn(2 * D, 3, P, generator=g, dtype=torch.float64).to(DEV).requires_grad_()
    c0 = (torch.randn(2 * D, 3, 3, generator=g, dtype=torch.float64).to(DEV).requires_grad_()
          if mode == "LSTM" else None)

    def fn(x, h0, *rest):
        c = rest[0] if mode == "LSTM" else None
        ws = list(rest[1:] if mode == "LSTM" else rest)
        out, hy, cy = F.rnn(x, ws, h0, c, batch_sizes, mode_id, 2, bi, True, proj, None)
        return (out, hy) + ((cy,) if cy is not None else ())

    inputs = (x, h0) + ((c0,) if c0 is not None else ()) + tuple(weights)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


# ------------------------------------------------------------- determinism

@pytest.mark.parametrize("path", ["auto", "persistent_global", "stepwise"])
@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_TANH"])
def test_backward_bit_identical(monkeypatch, path, mode):
    set_path(monkeypatch, path)
    ref, fc = build_pair(mode, 16, 64, torch.float32, num_layers=2, bidirectional=True)
    x, hx = make_data(ref, "packed", 40, 33, 16, torch.float32, True)
    o1, g1 = run(fc, "packed", x, hx, torch.float32)
    o2, g2 = run(fc, "packed", x, hx, torch.float32)
    for label, a, b in zip(["output", "h_n", "c_n"][:len(o1)] + names_of(ref, hx),
                           o1 + g1, o2 + g2):
        assert torch.equal(a, b), f"{label} differs between two identical runs"


# ------------------------------------------------------------- CUDA graphs

@pytest.mark.parametrize("path", ["auto", "stepwise"])
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_cuda_graph_training_step(monkeypatch, mode, path):
    """A whole training step (forward, loss, backward, SGD) captured once and
    replayed matches the same steps run eagerly (stepwise: the per-step cuBLAS
    products are captured too)."""
    import fastcells

    monkeypatch.delenv("FASTCELLS_POISON", raising=False)
    set_path(monkeypatch, path)
    torch.manual_seed(0)
    T, B, I, H = 24, 8, 4, 16
    rnn = getattr(fastcells, mode)(I, H, num_layers=2).to(DEV)
    head = nn.Linear(H, 1).to(DEV)
    model = nn.ModuleDict({"rnn": rnn, "head": head})
    eager = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    opt_eager = torch.optim.SGD(eager.parameters(), lr=0.05)

    def step(m, o, x, y):
        out, _ = m["rnn"](x)
        loss = ((m["head"](out) - y) ** 2).mean()
        loss.backward()
        o.step()
        return loss

    g = torch.Generator(device=DEV).manual_seed(1)
    data = [(torch.randn(T, B, I, device=DEV, generator=g),
             torch.randn(T, B, 1, device=DEV, generator=g)) for _ in range(6)]
    static_x = data[0][0].clone()
    static_y = data[0][1].clone()

    # Warm up on a side stream (as torch.cuda.graphs recommends), on both copies.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x, y in data[:2]:
            for m, o in ((model, opt), (eager, opt_eager)):
                o.zero_grad(set_to_none=False)
                static_x.copy_(x)
                static_y.copy_(y)
                step(m, o, static_x, static_y)
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=False)
    # Capturing does not run the step: keep the weights to compare from here.
    with torch.cuda.graph(graph):
        static_loss = step(model, opt, static_x, static_y)

    for x, y in data[2:]:
        opt.zero_grad(set_to_none=False)
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        opt_eager.zero_grad(set_to_none=False)
        loss_eager = step(eager, opt_eager, x, y)
        torch.testing.assert_close(static_loss, loss_eager, atol=1e-6, rtol=1e-5)
    torch.cuda.synchronize()
    for (name, a), b in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


# ------------------------------------------------------------------ autocast

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_autocast_runs_in_the_region_dtype(mode, dtype):
    """Under torch.autocast("cuda") fastcells returns the region's dtype,
    gives exactly what the same module cast to that dtype gives, agrees with
    torch.nn within that dtype's tolerance, and its gradients reach the
    float32 parameters. (torch.nn's cuDNN RNN returns float16 in a bfloat16
    region on torch 2.11: its autocast rule for _cudnn_rnn casts to half, so
    only values are compared with it.)"""
    import fastcells

    torch.manual_seed(0)
    ref = getattr(nn, mode)(4, 16, num_layers=2).to(DEV)
    fc = getattr(fastcells, mode)(4, 16, num_layers=2).to(DEV)
    fc.load_state_dict(ref.state_dict())
    x = torch.randn(12, 3, 4, device=DEV)
    with torch.autocast("cuda", dtype=dtype):
        out_ref = ref(x)[0]
        out = fc(x)[0]
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), out_ref.float(), atol=5e-2, rtol=5e-2)
    low = copy.deepcopy(fc).to(dtype)
    assert torch.equal(out, low(x.to(dtype))[0])
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in fc.parameters())


# ------------------------------------------------------------------ streams

@pytest.mark.parametrize("path", ["auto", "stepwise"])
def test_non_default_stream(monkeypatch, path):
    """Work queued on a side stream behind a long kernel: results are right
    only if every kernel of the op runs on the current (side) stream."""
    set_path(monkeypatch, path)
    ref, fc = build_pair("LSTM", 8, 32, torch.float32, num_layers=2, bidirectional=True)
    x, hx = make_data(ref, "dense", 30, 4, 8, torch.float32, True)
    o_ref, g_ref = run(fc, "dense", x, hx, torch.float32)

    side = torch.cuda.Stream()
    x_side = torch.zeros_like(x)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # keeps the side stream busy for a while
        x_side.copy_(x)
        o_s, g_s = run(fc, "dense", x_side, hx, torch.float32)
    side.synchronize()
    assert_lists_close(o_s, o_ref, ["output", "h_n", "c_n"], atol=0, rtol=0)
    assert_lists_close(g_s, g_ref, names_of(ref, hx), atol=0, rtol=0)
