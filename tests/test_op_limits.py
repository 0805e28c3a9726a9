"""Direct op calls with sizes whose products overflow, or buffers in layouts
the kernels do not read directly, raise a clear error (naming the argument and
what was expected) or give the contiguous result; never a crash.

Sizes come from op arguments and from tensor shapes, and an empty or expanded
tensor may have any shape, so every product of them is checked.
"""
from __future__ import annotations

import pytest
import torch

from conftest import MODES, make_nn, needs_fastcells

pytestmark = needs_fastcells

FWD = torch.ops.fastcells.rnn_forward.default
BWD = torch.ops.fastcells.rnn_backward.default
I, H, T, B = 3, 4, 5, 2


def _args(mode="LSTM", bidirectional=True, layers=1):
    ref = make_nn(mode, I, H, num_layers=layers, bidirectional=bidirectional)
    return [torch.randn(T, B, I, dtype=torch.float64), [w.detach() for w in ref._flat_weights],
            None, None, None, MODES[mode][1], layers, bidirectional, True, 0, None]


@pytest.mark.parametrize("num_layers", [2**61 + 1, 2**62, 2**40, 2**31, 9])
def test_num_layers_beyond_the_weights(num_layers):
    """(2**61 + 1) * 2 directions * 4 weights wraps to 8, the length of the list."""
    a = _args()
    a[6] = num_layers
    with pytest.raises(RuntimeError, match=r"`num_layers` \(\d+\) is more than the 8 tensors"):
        FWD(*a)


def test_num_layers_within_the_weights_but_wrong():
    a = _args()
    a[6] = 3
    with pytest.raises(RuntimeError, match=r"expected 24 tensors in `weights` \(num_layers=3"):
        FWD(*a)


def test_proj_size_huge():
    a = _args()
    a[9] = 2**62
    with pytest.raises(RuntimeError, match="proj_size"):
        FWD(*a)


def test_empty_input_with_too_many_steps():
    a = _args(bidirectional=False)
    a[0] = torch.empty(2**31, 0, I, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"`input` of shape .*seq_len and batch must be at most"):
        FWD(*a)


@pytest.mark.parametrize("batch_sizes", [[2**63 - 1, 2**63 - 1, 2], [2**62] * 4, [6, 4]],
                         ids=["wraps_to_0", "wraps_to_0_again", "too_many_rows"])
def test_packed_batch_sizes_whose_sum_overflows(batch_sizes):
    a = _args(mode="GRU", bidirectional=False)
    a[0] = torch.empty(0 if batch_sizes[0] > 6 else 7, I, dtype=torch.float64)
    a[4] = batch_sizes
    with pytest.raises(RuntimeError, match=r"`batch_sizes` sum to more than the \d+ rows"):
        FWD(*a)


def test_expanded_weights_whose_sizes_overflow():
    """Huge hidden and input sizes from stride-0 tensors that hold one element."""
    a = _args(mode="RNN_TANH", bidirectional=False)
    big = 2**31  # one weight of 2**62 elements: G*H * input_size past the BLAS's int32
    a[0] = torch.zeros(1, 1, 1, dtype=torch.float64).expand(T, B, big)
    a[1] = [torch.zeros(1, 1, dtype=torch.float64).expand(big, big),
            torch.zeros(1, 1, dtype=torch.float64).expand(big, big),
            torch.zeros(1, dtype=torch.float64).expand(big),
            torch.zeros(1, dtype=torch.float64).expand(big)]
    with pytest.raises(RuntimeError, match=r"weight size .* overflows|sizes too large"):
        FWD(*a)
    a[0] = torch.zeros(1, 1, 1, dtype=torch.float64).expand(T, B, 2**20)
    a[1] = [torch.zeros(1, 1, dtype=torch.float64).expand(2**20, 2**20),
            torch.zeros(1, 1, dtype=torch.float64).expand(2**20, 2**20),
            torch.zeros(1, dtype=torch.float64).expand(2**20),
            torch.zeros(1, dtype=torch.float64).expand(2**20)]
    with pytest.raises(RuntimeError, match=r"sizes too large.*fewer than 2\^31"):
        FWD(*a)


def _backward_tail(mode, a):
    out, hy, cy, reserve = FWD(*a)
    g = torch.Generator().manual_seed(0)
    go = torch.randn(out.shape, generator=g, dtype=out.dtype)
    gh = torch.randn(hy.shape, generator=g, dtype=hy.dtype)
    gc = torch.randn(cy.shape, generator=g, dtype=cy.dtype) if mode == "LSTM" else None
    return [reserve, go, gh, gc]


def _strided(t, how):
    if how == "gapped":
        return torch.stack([t, torch.full_like(t, float("nan"))], -1)[..., 0]
    if how == "expanded":  # stride 0 along a new leading dim, then select: same values
        return t.unsqueeze(0).expand(3, *t.shape)[1]
    return torch._neg_view(-t)  # a negated view: the sign is a flag, not in memory


@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_RELU"])
@pytest.mark.parametrize("which", ["reserve", "grad_output", "grad_hy", "grad_cy", "input",
                                   "weights", "hx"])
@pytest.mark.parametrize("how", ["gapped", "expanded", "neg_view"])
def test_backward_buffers_in_any_layout(mode, which, how):
    if which == "grad_cy" and mode != "LSTM":
        pytest.skip("only LSTM has a cell state")
    a = _args(mode, layers=2)
    a[2] = torch.randn(4, B, H, dtype=torch.float64)
    a[3] = torch.randn(4, B, H, dtype=torch.float64) if mode == "LSTM" else None
    tail = _backward_tail(mode, a)
    expect = BWD(*a, *tail)
    names = ["reserve", "grad_output", "grad_hy", "grad_cy"]
    if which in names:
        tail[names.index(which)] = _strided(tail[names.index(which)], how)
    elif which == "input":
        a[0] = _strided(a[0], how)
    elif which == "weights":
        a[1] = [_strided(w, how) for w in a[1]]
    else:
        a[2] = _strided(a[2], how)
    got = BWD(*a, *tail)
    flat = lambda r: [*r[:3], *r[3]]  # noqa: E731
    for g, e in zip(flat(got), flat(expect)):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
@pytest.mark.parametrize("how", ["gapped", "expanded", "neg_view"])
def test_forward_arguments_in_any_layout(mode, how):
    a = _args(mode, layers=2)
    a[2] = torch.randn(4, B, H, dtype=torch.float64)
    a[3] = torch.randn(4, B, H, dtype=torch.float64) if mode == "LSTM" else None
    a[10] = torch.rand(1, T, B, 2 * H, dtype=torch.float64)
    expect = FWD(*a)
    a = [_strided(t, how) if isinstance(t, torch.Tensor) else t for t in a]
    a[1] = [_strided(w, how) for w in a[1]]
    got = FWD(*a)
    for g, e in zip(got, expect):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_sparse_argument_is_rejected():
    a = _args(mode="GRU", bidirectional=False)
    a[2] = torch.zeros(1, B, H, dtype=torch.float64).to_sparse()
    with pytest.raises((RuntimeError, NotImplementedError), match=r"(?i)sparse|hx"):
        FWD(*a)
