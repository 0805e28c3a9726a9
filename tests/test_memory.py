"""Memory: no leaks, saved tensors released by backward, nothing saved under no_grad.

* 10,000 forward+backward calls of a small LSTM -> GRU -> Linear model keep the
  resident set size flat (``/proc/self/statm``, with a tolerance far below what
  a per-call leak of even the smallest saved buffer would add up to);
* after ``backward()`` every tensor the graph saved is gone, even while the
  caller still holds the output (a common pattern: keeping ``loss`` for
  logging), and no autograd node keeps tensors as plain attributes;
* under ``torch.no_grad()`` nothing is saved for backward, and the peak memory
  of a forward pass (VmHWM, reset through ``/proc/self/clear_refs``) is lower
  than with gradients enabled by about the size of the saved activations;
* large buffers are advised to use transparent huge pages (far fewer page
  faults per call than with FASTCELLS_HUGE_PAGES=0), where the kernel offers
  them.

Linux only (procfs).
"""
from __future__ import annotations

import functools
import gc
import os
import sys
import weakref

import pytest
import torch
from torch import nn

fastcells = pytest.importorskip("fastcells")
if not hasattr(fastcells, "LSTM"):
    pytest.skip("fastcells extension not built", allow_module_level=True)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs procfs")

PAGE = os.sysconf("SC_PAGE_SIZE")
MB = 1 << 20


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Stack(nn.Module):
    """LSTM -> GRU -> Linear, so one call exercises both fused ops."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = fastcells.LSTM(3, 8, 2)
        self.gru = fastcells.GRU(8, 8)
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        return self.head(self.gru(self.lstm(x)[0])[0])


@pytest.fixture
def one_thread():
    """The leak checks need no intra-op parallelism; one thread keeps them fast
    and unaffected by other load on a small CI machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _train_calls(model, x, y, n):
    for _ in range(n):
        model.zero_grad(set_to_none=True)
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()


def test_rss_flat_over_10000_forward_backward_calls(one_thread):
    torch.manual_seed(0)
    model = Stack()
    x, y = torch.randn(16, 4, 3), torch.randn(16, 4, 1)
    _train_calls(model, x, y, 500)  # warm-up: allocator pools, thread pools, caches
    gc.collect()
    before = rss_bytes()
    _train_calls(model, x, y, 10_000)
    gc.collect()
    growth = rss_bytes() - before
    # The saved activations of one call are ~10 KB; a leak of them per call
    # would add ~100 MB. Allow 8 MB of allocator noise.
    assert growth < 8 * MB, f"RSS grew by {growth / MB:.1f} MB over 10,000 calls"


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["packed-proj-bi", "cells", "rnn-relu-dropout"])
def test_rss_flat_variants_slow(variant, one_thread):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if variant == "packed-proj-bi":
        mod = fastcells.LSTM(3, 8, 2, proj_size=4, bidirectional=True)
        x = torch.randn(12, 4, 3, generator=g)
        lengths = torch.tensor([12, 5, 9, 3])

        def step():
            seq = nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
            out, (h, c) = mod(seq)
            (out.data.sum() + h.sum() + c.sum()).backward()
    elif variant == "cells":
        cells = [fastcells.LSTMCell(3, 8), fastcells.GRUCell(3, 8), fastcells.RNNCell(3, 8)]
        x = torch.randn(4, 3, generator=g)

        def step():
            a = cells[0](x)[0].sum() + cells[1](x).sum() + cells[2](x).sum()
            a.backward()
    else:
        mod = fastcells.RNN(3, 8, 3, nonlinearity="relu", dropout=0.3).train()
        x = torch.randn(12, 4, 3, generator=g)

        def step():
            out, h = mod(x)
            (out.sum() + h.sum()).backward()
    for _ in range(500):
        step()
    gc.collect()
    before = rss_bytes()
    for _ in range(10_000):
        step()
    gc.collect()
    growth = rss_bytes() - before
    assert growth < 8 * MB, f"RSS grew by {growth / MB:.1f} MB over 10,000 calls"


def _graph_nodes(t: torch.Tensor):
    seen, stack = set(), [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(n for n, _ in node.next_functions)
    return seen


@pytest.mark.parametrize("name,kwargs,packed", [
    ("LSTM", dict(num_layers=2, bidirectional=True, proj_size=3), True),
    ("GRU", dict(num_layers=2), False),
    ("RNN", dict(nonlinearity="relu"), False),
])
def test_saved_tensors_freed_after_backward(name, kwargs, packed):
    torch.manual_seed(0)
    mod = getattr(fastcells, name)(4, 6, **kwargs)
    x = torch.randn(7, 3, 4, requires_grad=True)
    held = [x] + list(mod.parameters())
    saved: list[weakref.ref] = []

    def pack(t):
        saved.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        inp = x
        if packed:
            inp = nn.utils.rnn.pack_padded_sequence(x, torch.tensor([7, 4, 2]))
        out, _ = mod(inp)
        out = out.data if packed else out
    if packed:
        held += [inp.data, inp.batch_sizes]
    assert saved, "forward saved nothing for backward"
    out.sum().backward()
    gc.collect()
    # The caller still holds `out` (and so the graph). Whatever the graph saved
    # must be gone now, except tensors the caller holds itself.
    alive = [r() for r in saved if r() is not None]
    held_storage = {h.untyped_storage().data_ptr() for h in held + [out]}
    leaked = [t for t in alive if t.untyped_storage().data_ptr() not in held_storage]
    assert not leaked, [tuple(t.shape) for t in leaked]
    # No node keeps tensors outside save_for_backward (they would survive backward).
    for node in _graph_nodes(out):
        attrs = getattr(node, "__dict__", {})
        tensors = {k: tuple(v.shape) for k, v in attrs.items() if isinstance(v, torch.Tensor)}
        assert not tensors, f"{type(node).__name__} keeps tensors as attributes: {tensors}"
    # A second backward must fail: the saved tensors were released.
    with pytest.raises(RuntimeError):
        out.sum().backward()


def test_graph_released_with_output():
    """Dropping the outputs frees the graph and everything it saved by
    reference counting alone (no reference cycle through the autograd node)."""
    torch.manual_seed(0)
    mod = fastcells.LSTM(4, 6, 2)
    x = torch.randn(7, 3, 4, requires_grad=True)
    saved: list[weakref.ref] = []

    def pack(t):
        # Keep a detached alias: returning `t` itself would tie a saved output
        # to its own grad_fn (a cycle made by the hook, not by fastcells).
        alias = t.detach()
        saved.append(weakref.ref(alias))
        return alias

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, (h, c) = mod(x)
    names = [n.name() for n in _graph_nodes(out)]
    assert any("fastcells" in n for n in names), names
    assert saved, "forward saved nothing for backward"
    del out, h, c
    # No gc.collect(): reference counting alone must release the graph.
    alive = [tuple(r().shape) for r in saved if r() is not None]
    assert not alive, f"saved tensors still alive after the outputs were dropped: {alive}"


@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN"])
def test_no_grad_forward_saves_nothing(name):
    mod = getattr(fastcells, name)(4, 6, 2)
    x = torch.randn(7, 3, 4, requires_grad=True)
    packed_count = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed_count.append(1) or t,
                                                  lambda t: t):
        with torch.no_grad():
            out, state = mod(x)
        with torch.inference_mode():
            out_inf, _ = mod(x)
    assert not packed_count
    assert out.grad_fn is None and not out.requires_grad
    assert out_inf.grad_fn is None
    states = state if isinstance(state, tuple) else (state,)
    assert all(s.grad_fn is None for s in states)


@pytest.fixture
def fixed_mmap_threshold():
    """Big blocks straight from mmap, returned to the OS on free: glibc's
    dynamic mmap threshold would otherwise keep freed blocks on the heap and
    blur RSS measurements."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        pytest.skip("needs glibc")
    M_MMAP_THRESHOLD = -3
    if libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024) != 1:
        pytest.skip("mallopt(M_MMAP_THRESHOLD) failed")
    yield


@functools.lru_cache(maxsize=None)
def _trim_heap() -> None:
    """Returns the heap's free pages to the OS (glibc malloc_trim), so that
    memory an earlier test freed but left resident does not absorb this
    measurement's allocations without a change in RSS."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _forward_memory(name: str) -> dict[bool, tuple[int, int]]:
    """{grad_enabled: (bytes kept after forward, peak bytes during forward)}
    for one large forward, from VmRSS/VmHWM (VmHWM reset via clear_refs)."""
    if not _reset_peak():
        pytest.skip("cannot reset VmHWM through /proc/self/clear_refs")
    # Packed weights that the cache keeps are not activations: start empty,
    # and the warm-up calls below fill it for this module.
    torch.ops.fastcells.clear_weight_cache()
    torch.manual_seed(0)
    T, B, I, H = 256, 64, 16, 128
    mod = getattr(fastcells, name)(I, H)
    x = torch.randn(T, B, I)
    x_grad = x.clone().requires_grad_(True)

    def measure(grad: bool) -> tuple[int, int]:
        gc.collect()
        _trim_heap()
        _reset_peak()
        base = _status_kb("VmRSS")
        with torch.set_grad_enabled(grad):
            out, state = mod(x_grad if grad else x)
        kept = _status_kb("VmRSS") - base
        peak = _status_kb("VmHWM") - base
        del out, state
        return kept, peak

    for g in (False, True):  # warm-up both paths
        measure(g)
    runs = {g: [measure(g) for _ in range(2)] for g in (False, True)}
    return {g: (min(k for k, _ in r), min(p for _, p in r)) for g, r in runs.items()}


OUT_BYTES = 256 * 64 * 128 * 4  # the (T, B, H) float32 output of _forward_memory


@pytest.mark.parametrize("name", ["LSTM", "GRU"])
def test_no_grad_forward_keeps_only_outputs(name, one_thread, fixed_mmap_threshold):
    """With gradients, the saved activations stay allocated after forward;
    under no_grad only the output and final states do."""
    mem = _forward_memory(name)
    kept_ng, kept_g = mem[False][0], mem[True][0]
    assert kept_g >= 2 * OUT_BYTES, (kept_g / MB, OUT_BYTES / MB)
    assert kept_ng <= OUT_BYTES * 1.05 + MB, (
        f"no_grad forward keeps {kept_ng / MB:.1f} MB; its output is {OUT_BYTES / MB:.1f} MB")


@pytest.mark.parametrize("name", ["LSTM", "GRU"])
def test_no_grad_forward_peak_lower(name, one_thread, fixed_mmap_threshold):
    """Inference should not pay for the activations that only backward needs:
    the no_grad peak must be below the training-mode peak by at least one
    output's worth (torch.nn's LSTM: ~16 MB vs ~82 MB here)."""
    mem = _forward_memory(name)
    peak_ng, peak_g = mem[False][1], mem[True][1]
    assert peak_ng + OUT_BYTES <= peak_g, (
        f"no_grad peak {peak_ng / MB:.1f} MB vs grad peak {peak_g / MB:.1f} MB")


def _thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[", 1)[1].split("]", 1)[0]
    except (OSError, IndexError):
        return "unavailable"


_FAULTS_SCRIPT = """
import resource, torch, fastcells
torch.manual_seed(0)
m = fastcells.GRU(16, 256)
x = torch.randn(112, 64, 16)
m(x)[0].sum().backward()
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    m(x)[0].sum().backward()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) // 4)
"""


@pytest.mark.skipif(_thp_mode() not in ("always", "madvise"),
                    reason=f"transparent huge pages not offered by the kernel ({_thp_mode()})")
def test_large_buffers_take_few_page_faults():
    """A forward+backward with ~30 MB of saved gates and gate gradients: with 4 KiB pages every
    call faults each page in again (the allocator returns large buffers to the kernel); with
    the huge-page advice (the default) it takes a small fraction of those faults."""
    import subprocess

    def faults(flag: str) -> int:
        env = dict(os.environ, FASTCELLS_HUGE_PAGES=flag, OMP_NUM_THREADS="1")
        out = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT], capture_output=True, text=True,
                             env=env, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return int(out.stdout.split()[-1])

    small_pages, huge_pages = faults("0"), faults("1")
    # The saved gates alone are 112*64*768 floats = 22 MB = 5,376 pages of 4 KiB. With the
    # advice about a fifth remain here: the unaligned ends of each buffer (up to 2 MiB each)
    # and torch's own allocations.
    assert small_pages > 5000, small_pages
    assert huge_pages < small_pages / 2, (huge_pages, small_pages)
