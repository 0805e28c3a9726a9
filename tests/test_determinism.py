"""Determinism and threads on CPU.

* the same inputs give bit-identical outputs and gradients run after run;
* the results do not depend on the intra-op thread count (1 vs 2), set either
  with ``torch.set_num_threads`` in-process or with ``OMP_NUM_THREADS`` in a
  fresh interpreter;
* forward/backward calls from several Python threads at once give exactly the
  serial results.

Configurations cover the tiny-hidden path (forecasting sizes) and sizes large
enough for the GEMM path and OpenMP work splitting.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
from torch import nn

fastcells = pytest.importorskip("fastcells")
if not hasattr(fastcells, "LSTM"):
    pytest.skip("fastcells extension not built", allow_module_level=True)

# Every test runs once per CPU ISA path the host supports (conftest.cpu_isa);
# the fresh-process tests inherit the path through FASTCELLS_CPU_ISA.
pytestmark = pytest.mark.usefixtures("cpu_isa")

# (module, T, B, I, H, layers, bidirectional, packed, dtype)
CASES = [
    ("LSTM", 112, 1, 3, 6, 2, False, False, torch.float32),   # the airline model
    ("GRU", 112, 1, 3, 6, 2, False, False, torch.float32),
    ("LSTM", 24, 16, 16, 64, 2, True, True, torch.float32),    # threads split hidden units
    ("LSTM", 24, 48, 16, 64, 2, True, True, torch.float32),    # threads split batch rows
    ("GRU", 24, 32, 16, 128, 1, False, False, torch.float32),
    ("RNN", 20, 8, 4, 32, 2, True, True, torch.float64),
    ("LSTM", 16, 8, 8, 48, 1, False, False, torch.bfloat16),
    # Batch sizes 5-11 make MKL split small GEMMs differently by thread count.
    ("GRU", 16, 6, 8, 32, 1, False, False, torch.float32),
    ("LSTM", 16, 5, 8, 32, 1, False, False, torch.float32),
    # One row, a hidden size that is no multiple of the vector width: the two threads
    # split the units (64 + 36 / 64 + 26) and each ends in a padded 8-lane tail.
    ("LSTM", 40, 1, 3, 100, 1, False, False, torch.float32),
    ("GRU", 40, 1, 3, 90, 2, True, False, torch.float32),
]


def _ident(case):
    name, T, B, I, H, L, bi, packed, dtype = case
    return (f"{name}-T{T}B{B}I{I}H{H}L{L}{'-bi' if bi else ''}{'-packed' if packed else ''}"
            f"-{str(dtype).split('.')[-1]}")


def _build(case):
    name, T, B, I, H, L, bi, packed, dtype = case
    torch.manual_seed(0)
    return getattr(fastcells, name)(I, H, L, bidirectional=bi).to(dtype)


def _inputs(case, seed=1):
    name, T, B, I, H, L, bi, packed, dtype = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, I, generator=g).to(dtype)
    lengths = None
    if packed:
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        lengths[0] = T
    return x, lengths


def _fwd_bwd(mod, x, lengths, params=None):
    """Forward + backward; returns outputs and gradients (input + parameters)."""
    x = x.detach().requires_grad_(True)
    inp = x
    if lengths is not None:
        inp = nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
    out, state = mod(inp)
    outs = [out.data if lengths is not None else out]
    outs += list(state) if isinstance(state, tuple) else [state]
    g = torch.Generator().manual_seed(7)
    cot = [torch.randn(o.shape, generator=g).to(o.dtype) for o in outs]
    params = list(mod.parameters()) if params is None else params
    grads = torch.autograd.grad(outs, [x] + params, cot)
    return [o.detach() for o in outs] + list(grads)


def _assert_bitwise(a, b, what):
    assert len(a) == len(b)
    for k, (u, v) in enumerate(zip(a, b)):
        assert u.dtype == v.dtype and u.shape == v.shape, f"{what}[{k}]"
        assert torch.equal(u, v), f"{what}[{k}]: not bit-identical (max diff {(u - v).abs().max()})"


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("case", CASES, ids=_ident)
def test_repeat_runs_bit_identical(case):
    mod = _build(case)
    x, lengths = _inputs(case)
    first = _fwd_bwd(mod, x, lengths)
    for _ in range(2):
        _assert_bitwise(_fwd_bwd(mod, x, lengths), first, "rerun")
    # A freshly built module with the same seed gives the same bits too.
    _assert_bitwise(_fwd_bwd(_build(case), x, lengths), first, "rebuilt")


@pytest.mark.parametrize("case", CASES, ids=_ident)
def test_thread_count_does_not_change_bits(case, restore_threads):
    mod = _build(case)
    x, lengths = _inputs(case)
    results = {}
    for n in (1, 2):
        torch.set_num_threads(n)
        results[n] = _fwd_bwd(mod, x, lengths)
    _assert_bitwise(results[2], results[1], "threads 2 vs 1")


_DIGEST_SCRIPT = textwrap.dedent("""
    import hashlib, torch, fastcells
    h = hashlib.sha256()
    for name in ("LSTM", "GRU"):
        torch.manual_seed(0)
        mod = getattr(fastcells, name)(16, 64, 2, bidirectional=True)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(24, 6, 16, generator=g, requires_grad=True)
        out, state = mod(x)
        out, state = mod(x)  # a second call: the team back-off may run it on one thread
        outs = [out] + (list(state) if isinstance(state, tuple) else [state])
        cot = [torch.randn(o.shape, generator=g) for o in outs]
        grads = torch.autograd.grad(outs, [x] + list(mod.parameters()), cot)
        for t in outs + list(grads):
            h.update(t.detach().contiguous().numpy().tobytes())
    print(torch.get_num_threads(), h.hexdigest())
""")


def test_fresh_processes_with_different_omp_threads_agree():
    """Across processes (the 'same program run twice' case) and OMP_NUM_THREADS,
    LSTM and GRU forward + backward hash to the same digest. The third run
    makes every wait of the team's step barrier sleep on its futex
    (FASTCELLS_BARRIER_SPIN_US=0), which also sends later calls to one thread
    (the team back-off): neither may change a bit or hang."""
    digests = {}
    for key, threads, extra in (("1", "1", {}), ("2", "2", {}),
                                ("2-sleeping", "2", {"FASTCELLS_BARRIER_SPIN_US": "0"})):
        env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, **extra)
        res = subprocess.run([sys.executable, "-c", _DIGEST_SCRIPT],
                             env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        n, digest = res.stdout.split()[-2:]
        assert n == threads
        digests[key] = digest
    assert digests["1"] == digests["2"] == digests["2-sleeping"]


@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[3]], ids=_ident)
def test_concurrent_python_threads_match_serial(case):
    """Several Python threads share one module and call forward/backward at once;
    every call must give exactly the serial result for its inputs."""
    mod = _build(case)
    params = list(mod.parameters())
    n_threads, per_thread = 4, 3
    inputs = [_inputs(case, seed=100 + k) for k in range(n_threads * per_thread)]
    serial = [_fwd_bwd(mod, x, lengths, params) for x, lengths in inputs]

    results: dict[int, list[torch.Tensor]] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(n_threads)

    def worker(tid):
        try:
            barrier.wait()
            for j in range(per_thread):
                k = tid * per_thread + j
                x, lengths = inputs[k]
                results[k] = _fwd_bwd(mod, x, lengths, params)
        except BaseException as exc:  # reported below, in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a worker thread hung"
    assert not errors, errors[0]
    assert sorted(results) == list(range(len(inputs)))
    for k, expected in enumerate(serial):
        _assert_bitwise(results[k], expected, f"call {k}")


def test_concurrent_training_steps_on_separate_models():
    """Independent models trained in parallel threads end where serial training ends."""
    def make(seed):
        # Built in the main thread: the global RNG is shared between threads.
        torch.manual_seed(seed)
        rnn, head = fastcells.LSTM(3, 6, 2), nn.Linear(6, 1)
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(40, 1, 3, generator=g)
        y = torch.randn(40, 1, 1, generator=g)
        return rnn, head, x, y

    def train(rnn, head, x, y):
        params = list(rnn.parameters()) + list(head.parameters())
        opt = torch.optim.Adam(params, lr=0.05)
        for _ in range(20):
            opt.zero_grad()
            loss = ((head(rnn(x)[0]) - y) ** 2).mean()
            loss.backward()
            opt.step()
        return [p.detach().clone() for p in params]

    seeds = [11, 12, 13]
    serial = {s: train(*make(s)) for s in seeds}
    jobs = {s: make(s) for s in seeds}
    parallel: dict[int, list[torch.Tensor]] = {}
    errors: list[BaseException] = []

    def worker(s):
        try:
            parallel[s] = train(*jobs[s])
        except BaseException as exc:  # reported below, in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors[0]
    for s in seeds:
        _assert_bitwise(parallel[s], serial[s], f"seed {s}")
