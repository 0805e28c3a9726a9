"""Bad and unusual input: each case gives either the same result as torch.nn or
a RuntimeError/ValueError whose message names the offending argument, never a
crash and never a silent wrong answer.

Module-level cases are run through torch.nn first: where torch.nn accepts the
input, fastcells must return the same thing; where torch.nn rejects it,
fastcells must reject it too, with a message that names the argument (torch.nn's
own message is not always that clear, e.g. for an hx of the wrong dtype).
Direct op calls are checked against the argument names of the op schema.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from conftest import (CELLS, op_case, MODE_NAMES, MODES, assert_close_list, flatten_result, gates, grads_of,
                      make_fastcells_like, make_nn, needs_fastcells, weighted_loss)

pytestmark = needs_fastcells

ERRORS = (RuntimeError, ValueError)
I, H, T, B = 4, 5, 3, 2


def _pair(mode: str, dtype: torch.dtype = torch.float32, **kw):
    ref = make_nn(mode, I, H, dtype=dtype, num_layers=2, **kw)
    return ref, make_fastcells_like(ref)


def _hx(mode: str, shape_h, shape_c=None, dtype=torch.float32):
    h = torch.zeros(shape_h, dtype=dtype)
    return (h, torch.zeros(shape_c or shape_h, dtype=dtype)) if mode == "LSTM" else h


def same_or_clear_error(ref: nn.Module, mod: nn.Module, match: str, *args) -> str:
    """torch.nn accepts -> fastcells returns the same; torch.nn rejects ->
    fastcells raises the same exception class (RuntimeError or ValueError),
    with a message matching ``match``: code that catches torch.nn's errors
    must catch fastcells' too.
    Returns "same" or "error" for the caller's assertions."""
    try:
        expect = ref(*args)
    except ERRORS as e:
        with pytest.raises(ERRORS, match=match) as info:
            mod(*args)
        assert type(info.value) is type(e), (
            f"torch.nn raises {type(e).__name__} ({e}), fastcells {type(info.value).__name__} "
            f"({info.value})")
        return "error"
    got = mod(*args)
    dtype = flatten_result(expect)[0].dtype
    assert_close_list(flatten_result(got), flatten_result(expect), dtype)
    return "same"


# ----------------------------------------------------------------------------- shapes, ranks


@pytest.mark.parametrize("mode", MODE_NAMES)
@pytest.mark.parametrize("shape", [(2, 3, 4, 4), (4,), ()], ids=["4d", "1d", "0d"])
def test_wrong_rank(mode, shape):
    ref, mod = _pair(mode)
    assert same_or_clear_error(ref, mod, r"(?i)input", torch.randn(shape)) == "error"


@pytest.mark.parametrize("mode", MODE_NAMES)
@pytest.mark.parametrize("unbatched", [False, True])
def test_wrong_feature_size(mode, unbatched):
    ref, mod = _pair(mode)
    x = torch.randn(T, I + 1) if unbatched else torch.randn(T, B, I + 1)
    assert same_or_clear_error(ref, mod, r"(?i)input", x) == "error"


@pytest.mark.parametrize("mode", MODE_NAMES)
@pytest.mark.parametrize("which", ["batch", "layers", "hidden", "cell", "rank_unbatched"])
def test_hx_wrong_shape(mode, which):
    if which == "cell" and mode != "LSTM":
        pytest.skip("only LSTM has a cell state")
    ref, mod = _pair(mode)
    x = torch.randn(T, B, I)
    good = (2, B, H)
    hx = {
        "batch": lambda: _hx(mode, (2, B + 1, H)),
        "layers": lambda: _hx(mode, (1, B, H)),
        "hidden": lambda: _hx(mode, (2, B, H + 1)),
        "cell": lambda: _hx(mode, good, (2, B, H + 2)),
        "rank_unbatched": lambda: _hx(mode, good),
    }[which]()
    if which == "rank_unbatched":
        x = torch.randn(T, I)
    assert same_or_clear_error(ref, mod, r"(?i)hx|cx|hidden|cell|h_?0|c_?0", x, hx) == "error"


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_hx_wrong_dtype(mode):
    ref, mod = _pair(mode)
    hx = _hx(mode, (2, B, H), dtype=torch.float64)
    assert same_or_clear_error(ref, mod, r"(?i)hx|hidden|h0", torch.randn(T, B, I), hx) == "error"


@pytest.mark.parametrize("cell", ["LSTMCell", "GRUCell", "RNNCell"])
@pytest.mark.parametrize("case", ["input_3d", "hx_3d", "input_size", "hx_batch", "hx_size",
                                  "input_float64", "input_int", "hx_float64"])
def test_cell_errors_have_torch_nn_classes(cell, case):
    import fastcells

    torch.manual_seed(0)
    ref = getattr(nn, cell)(I, H)
    mod = getattr(fastcells, cell)(I, H)
    mod.load_state_dict(ref.state_dict())
    x, h = torch.randn(B, I), torch.randn(B, H)
    if case == "input_3d":
        x = x.unsqueeze(0)
    elif case == "hx_3d":
        h = h.unsqueeze(0)
    elif case == "input_size":
        x = torch.randn(B, I + 1)
    elif case == "hx_batch":
        h = torch.randn(B + 1, H)
    elif case == "hx_size":
        h = torch.randn(B, H + 1)
    elif case == "input_float64":
        x = x.double()
    elif case == "input_int":
        x = x.long()
    else:
        h = h.double()
    hx = (h, torch.randn(B, H)) if cell == "LSTMCell" else h
    assert same_or_clear_error(ref, mod, r"(?i)input|hx|hidden|dtype|size|shape", x, hx) == "error"


@pytest.mark.parametrize("mode", MODE_NAMES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.int64, torch.int32,
                                   torch.bool], ids=str)
def test_input_dtype_mismatch_with_weights(mode, dtype):
    ref, mod = _pair(mode)  # float32 weights
    x = torch.ones(T, B, I).to(dtype)
    assert same_or_clear_error(ref, mod, r"(?i)input|dtype", x) == "error"


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_integer_module_dtype_rejected(mode):
    import fastcells

    cls, _, extra = MODES[mode]
    with pytest.raises(ERRORS):
        cls(I, H, dtype=torch.int64, **extra)
    with pytest.raises(ERRORS):
        getattr(fastcells, cls.__name__)(I, H, dtype=torch.int64, **extra)


@pytest.mark.parametrize("kwargs,match", [
    (dict(proj_size=-1), "proj_size"),
    (dict(proj_size=H), "proj_size"),
    (dict(dropout=1.5), "dropout"),
    (dict(dropout=-0.1), "dropout"),
    (dict(num_layers=0), "num_layers"),
    (dict(hidden_size=0), "hidden_size"),
])
def test_bad_constructor_arguments_like_torch_nn(kwargs, match):
    import fastcells

    kw = dict(input_size=I, hidden_size=H, **kwargs) if "hidden_size" not in kwargs else \
        dict(input_size=I, **kwargs)
    with pytest.raises(ValueError, match=match):
        nn.LSTM(**kw)
    with pytest.raises(ValueError, match=match):
        fastcells.LSTM(**kw)


def test_bad_constructor_mode_specific():
    import fastcells

    with pytest.raises(ValueError, match="proj_size"):
        fastcells.GRU(I, H, proj_size=2)
    with pytest.raises(ValueError, match="nonlinearity"):
        fastcells.RNN(I, H, nonlinearity="sigmoid")


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("mode", MODE_NAMES)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("hidden,batch", [(H, 3), (48, 20)], ids=["loop", "blas"])
def test_nonfinite_values_propagate_like_torch_nn(mode, value, hidden, batch):
    ref = make_nn(mode, I, hidden, dtype=torch.float64, num_layers=2, bidirectional=True)
    mod = make_fastcells_like(ref)
    results = []
    for m in (ref, mod):
        x = torch.randn(4, batch, I, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(0))
        x[1, 0, 2] = value  # one element of sequence 0 at step 1
        x.requires_grad_()
        flat = flatten_result(m(x))
        weighted_loss(flat).backward()
        results.append((flat, grads_of([x] + list(m.parameters()))))
    (ref_flat, ref_grads), (flat, grads) = results
    if value != value:  # NaN: sequence 1 and 2 stay finite in the forward pass
        assert torch.isfinite(flat[0][:, 1:]).all()
    assert_close_list(flat, ref_flat, torch.float64, ["output", "h_n", "c_n"])
    assert_close_list(grads, ref_grads, torch.float64)


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_nonfinite_initial_state_like_torch_nn(mode):
    ref, mod = _pair(mode, dtype=torch.float64)
    hx = _hx(mode, (2, B, H), dtype=torch.float64)
    (hx[0] if mode == "LSTM" else hx)[1, 0, 0] = math.nan
    x = torch.randn(T, B, I, dtype=torch.float64)
    assert same_or_clear_error(ref, mod, "hx", x, hx) == "same"


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_large_values_saturate_like_torch_nn(mode):
    """Pre-activations of +-1e4 must saturate (no inf/inf = NaN in a hand-written tanh/sigmoid)."""
    if mode == "RNN_RELU":
        pytest.skip("relu does not saturate")
    ref, mod = _pair(mode, dtype=torch.float32)
    x = torch.randn(T, B, I, generator=torch.Generator().manual_seed(0)) * 1e4
    assert same_or_clear_error(ref, mod, "input", x) == "same"
    ref64, mod64 = _pair(mode, dtype=torch.float64)
    assert same_or_clear_error(ref64, mod64, "input", x.double() * 1e3) == "same"


# ----------------------------------------------------------------------------- empty


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_empty_batch(mode):
    ref, mod = _pair(mode, bidirectional=True)
    x = torch.randn(T, 0, I, requires_grad=True)
    assert same_or_clear_error(ref, mod, "input", x) == "same"
    out, _ = mod(x)
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


@pytest.mark.parametrize("mode", MODE_NAMES)
@pytest.mark.parametrize("unbatched", [False, True])
def test_zero_steps(mode, unbatched):
    """torch.nn rejects T = 0; fastcells either rejects it naming the input or
    returns an empty output with h_n = h_0."""
    ref, mod = _pair(mode)
    x = torch.randn(0, I) if unbatched else torch.randn(0, B, I)
    with pytest.raises(ERRORS):
        ref(x)
    hx = _hx(mode, (2, H) if unbatched else (2, B, H))
    try:
        out, state = mod(x, hx)
    except ERRORS as e:
        assert any(w in str(e).lower() for w in ("input", "sequence", "length")), str(e)
        return
    assert out.shape == ((0, H) if unbatched else (0, B, H))
    assert_close_list(list(state) if mode == "LSTM" else [state],
                      list(hx) if mode == "LSTM" else [hx], torch.float32)


def test_packed_zero_length_is_rejected_by_packing():
    """A zero length never reaches the module: pack_padded_sequence rejects it
    (the same for torch.nn and fastcells, which take the same PackedSequence)."""
    with pytest.raises(RuntimeError, match="greater than 0"):
        pack_padded_sequence(torch.randn(T, B, I), torch.tensor([T, 0]), enforce_sorted=False)


@pytest.mark.parametrize("mode", MODE_NAMES)
@pytest.mark.parametrize("batch_sizes", [[2, 1, 0], [2, 0], [2, 2, 1, 0, 0]],
                         ids=["trailing0", "only0", "two_trailing0"])
def test_hand_made_packed_with_empty_steps(mode, batch_sizes):
    """Trailing steps with batch size 0 hold no rows: torch.nn runs them as
    no-ops, fastcells drops them. Outputs, final states and every gradient
    (input, initial state, weights) must equal torch.nn's."""
    ref, mod = _pair(mode, dtype=torch.float64)
    n = sum(batch_sizes)
    data = torch.randn(n, I, dtype=torch.float64)
    hx = _hx(mode, (2, batch_sizes[0], H), dtype=torch.float64)
    hx = tuple(h.normal_().requires_grad_() for h in hx) if mode == "LSTM" else hx.normal_().requires_grad_()
    results, grads = [], []
    for m in (ref, mod):
        x = data.clone().requires_grad_()
        got = m(PackedSequence(x, torch.tensor(batch_sizes)), hx)
        flat = flatten_result(got)
        weighted_loss(flat).backward()
        states = list(hx) if mode == "LSTM" else [hx]
        results.append(flat)
        grads.append(grads_of([x] + states + list(m.parameters())))
    assert_close_list(results[1], results[0], torch.float64)
    assert_close_list(grads[1], grads[0], torch.float64)


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_hand_made_packed_with_empty_first_step_is_rejected(mode):
    """A first batch size of 0 (no rows at all, batch size 0) is an error that
    names batch_sizes."""
    _, mod = _pair(mode, dtype=torch.float64)
    x = PackedSequence(torch.randn(0, I, dtype=torch.float64), torch.tensor([0, 0]))
    with pytest.raises(ERRORS, match="batch_sizes"):
        mod(x)


@pytest.mark.parametrize("mode", MODE_NAMES)
@pytest.mark.parametrize("case", ["increasing", "rows_mismatch"])
def test_hand_made_packed_inconsistent(mode, case):
    """Inconsistent PackedSequence: torch.nn errors or silently drops rows;
    fastcells must name batch_sizes/input (or agree with torch.nn where it accepts)."""
    ref, mod = _pair(mode, dtype=torch.float64)
    if case == "increasing":
        x = PackedSequence(torch.randn(3, I, dtype=torch.float64), torch.tensor([1, 2]))
    else:
        x = PackedSequence(torch.randn(5, I, dtype=torch.float64), torch.tensor([2, 1]))
    with pytest.raises(ERRORS, match=r"(?i)batch_sizes|input"):
        mod(x)


# ----------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_non_contiguous_input_and_state(mode):
    ref, mod = _pair(mode, dtype=torch.float64, bidirectional=True)
    x = torch.randn(I, B, T, dtype=torch.float64).transpose(0, 2)  # (T, B, I), not contiguous
    assert not x.is_contiguous()
    h = torch.randn(4, H, B, dtype=torch.float64).transpose(1, 2)
    hx = (h, torch.randn(B, 4, H, dtype=torch.float64).transpose(0, 1)) if mode == "LSTM" else h
    assert same_or_clear_error(ref, mod, "input", x, hx) == "same"
    xs = torch.randn(T, B, 2 * I, dtype=torch.float64)[:, :, ::2]  # strided last dim
    assert same_or_clear_error(ref, mod, "input", xs) == "same"
    h = torch.randn(1, 1, H, dtype=torch.float64).expand(4, B, H)  # stride-0 state
    hx = (h, h) if mode == "LSTM" else h
    assert same_or_clear_error(ref, mod, "input", x, hx) == "same"


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_expanded_input(mode):
    ref, mod = _pair(mode, dtype=torch.float64, batch_first=True)
    x = torch.randn(1, T, I, dtype=torch.float64).expand(B, T, I)  # stride 0 over the batch
    assert x.stride(0) == 0
    assert same_or_clear_error(ref, mod, "input", x) == "same"
    leaf = torch.randn(1, 1, I, dtype=torch.float64, requires_grad=True)
    grads = []
    for m in (ref, mod):
        out, _ = m(leaf.expand(B, T, I))
        weighted_loss([out]).backward()
        grads.append(grads_of([leaf])[0])
    torch.testing.assert_close(grads[1], grads[0], atol=1e-10, rtol=1e-10)


# ----------------------------------------------------------------------------- direct op calls


def _op_args(mode: str, proj_size: int = 0, packed: bool = False) -> dict:
    # Packed: 5 rows in steps of [2, 2, 1] (the cases below change these).
    return op_case(mode, packed, 2, True, proj_size, T=T, B=B, I=I, H=H,
                   batch_sizes=[2, 2, 1] if packed else None)


def _call(a: dict):
    return torch.ops.fastcells.rnn_forward.default(
        a["input"], a["weights"], a["hx"], a["cx"], a["batch_sizes"], a["mode"], a["num_layers"],
        a["bidirectional"], a["has_biases"], a["proj_size"], a["dropout_masks"])


def _functional(a: dict):
    import fastcells

    return fastcells.functional.rnn(
        a["input"], a["weights"], a["hx"], a["cx"], a["batch_sizes"], a["mode"], a["num_layers"],
        a["bidirectional"], a["has_biases"], a["proj_size"], a["dropout_masks"])


def _w(a: dict, k: int, t: torch.Tensor) -> list:
    ws = list(a["weights"])
    ws[k] = t
    return ws


# name -> (mode, proj_size, packed, mutation, message pattern)
OP_CASES = {
    "weights_too_few": ("LSTM", 0, False, lambda a: a.update(weights=a["weights"][:-1]), "weight"),
    "weights_too_many": ("GRU", 0, False,
                         lambda a: a.update(weights=a["weights"] + a["weights"][:1]), "weight"),
    "w_ih_cols": ("LSTM", 0, False,
                  lambda a: a.update(weights=_w(a, 0, torch.zeros(gates("LSTM") * H, I + 1,
                                                                  dtype=torch.float64))),
                  r"(?i)weight|w_ih"),
    "w_ih_rows": ("GRU", 0, False,  # one gate too many
                  lambda a: a.update(weights=_w(a, 0, torch.zeros((gates("GRU") + 1) * H, I,
                                                                  dtype=torch.float64))),
                  r"(?i)weight|w_ih"),
    "w_hh_shape": ("RNN_TANH", 0, False, lambda a: a.update(weights=_w(a, 1, torch.zeros(H, H + 1,
                                                                                          dtype=torch.float64))),
                   r"(?i)weight|w_hh"),
    "b_ih_len": ("LSTM", 0, False,
                 lambda a: a.update(weights=_w(a, 2, torch.zeros(gates("LSTM") * H - 1,
                                                                 dtype=torch.float64))),
                 r"(?i)weight|bias|b_ih"),
    "layer1_w_ih": ("GRU", 0, False,
                    lambda a: a.update(weights=_w(a, 8, torch.zeros(gates("GRU") * H, H,
                                                                    dtype=torch.float64))),
                    r"(?i)weight|w_ih"),
    "w_hr_shape": ("LSTM", 2, False, lambda a: a.update(weights=_w(a, 4, torch.zeros(2, H + 1,
                                                                                      dtype=torch.float64))),
                   r"(?i)weight|w_hr"),
    "weight_dtype": ("LSTM", 0, False, lambda a: a.update(weights=_w(a, 1, a["weights"][1].float())),
                     r"(?i)weight|dtype"),
    "weight_2d_bias": ("RNN_RELU", 0, False,
                       lambda a: a.update(weights=_w(a, 3, torch.zeros(1, H, dtype=torch.float64))),
                       r"(?i)weight|bias|b_hh"),
    "mode_past_last": ("GRU", 0, False, lambda a: a.update(mode=len(CELLS)), "mode"),
    "mode_neg": ("GRU", 0, False, lambda a: a.update(mode=-1), "mode"),
    "proj_negative": ("LSTM", 0, False, lambda a: a.update(proj_size=-2), "proj_size"),
    "proj_for_gru": ("GRU", 0, False, lambda a: a.update(proj_size=2), r"proj_size|weight"),
    "num_layers_0": ("RNN_TANH", 0, False, lambda a: a.update(num_layers=0), r"num_layers|weight"),
    "hx_batch": ("LSTM", 0, False, lambda a: a.update(hx=torch.zeros(4, B + 1, H, dtype=torch.float64)),
                 "hx"),
    "hx_layers": ("GRU", 0, False, lambda a: a.update(hx=torch.zeros(2, B, H, dtype=torch.float64)),
                  "hx"),
    "hx_rank": ("GRU", 0, False, lambda a: a.update(hx=torch.zeros(4 * B, H, dtype=torch.float64)),
                "hx"),
    "hx_proj_size": ("LSTM", 2, False, lambda a: a.update(hx=torch.zeros(4, B, H, dtype=torch.float64)),
                     "hx"),
    "hx_dtype": ("RNN_TANH", 0, False, lambda a: a.update(hx=a["hx"].float()), r"hx"),
    "cx_missing": ("LSTM", 0, False, lambda a: a.update(cx=None), "cx"),
    "cx_shape": ("LSTM", 2, False, lambda a: a.update(cx=torch.zeros(4, B, 2, dtype=torch.float64)),
                 "cx"),
    "input_rank_dense": ("LSTM", 0, False, lambda a: a.update(input=torch.zeros(T * B, I,
                                                                                 dtype=torch.float64)),
                         "input"),
    "input_rank_packed": ("GRU", 0, True, lambda a: a.update(input=torch.zeros(5, 1, I,
                                                                                dtype=torch.float64)),
                          "input"),
    "input_int": ("LSTM", 0, False, lambda a: a.update(input=torch.zeros(T, B, I, dtype=torch.int64)),
                  r"(?i)input|dtype"),
    "input_features": ("GRU", 0, False, lambda a: a.update(input=torch.zeros(T, B, I + 1,
                                                                              dtype=torch.float64)),
                       r"(?i)input|weight"),
    "batch_sizes_increasing": ("LSTM", 0, True, lambda a: a.update(batch_sizes=[1, 2, 2]),
                               "batch_sizes"),
    "batch_sizes_sum": ("GRU", 0, True, lambda a: a.update(batch_sizes=[2, 1, 1]),
                        r"batch_sizes|input"),
    "batch_sizes_vs_hx": ("RNN_TANH", 0, True, lambda a: a.update(batch_sizes=[3, 2]),
                          r"batch_sizes|hx"),
    "batch_sizes_negative": ("RNN_RELU", 0, True, lambda a: a.update(batch_sizes=[2, 4, -1]),
                             "batch_sizes"),
    "dropout_masks_shape": ("LSTM", 0, False,
                            lambda a: a.update(dropout_masks=torch.ones(1, T, B, H, dtype=torch.float64)),
                            "dropout_masks"),
}


@pytest.mark.parametrize("name", list(OP_CASES))
@pytest.mark.parametrize("entry", ["op", "functional"])
def test_op_rejects_bad_arguments(name, entry):
    mode, proj, packed, mutate, match = OP_CASES[name]
    a = _op_args(mode, proj, packed)
    (_call if entry == "op" else _functional)(a)  # the unmodified arguments are valid
    mutate(a)
    with pytest.raises(ERRORS, match=match):
        (_call if entry == "op" else _functional)(a)


@pytest.mark.parametrize("mode_value", [99, -7, 2**40])
def test_error_message_prints_the_value_given(mode_value):
    # Integers in TORCH_CHECK messages go through the C++ streams of whatever
    # libstdc++ the extension was linked with; a statically linked copy whose
    # locale objects were exported printed nothing there (or crashed).
    a = _op_args("GRU")
    a["mode"] = mode_value
    with pytest.raises(ERRORS, match=rf"`mode` must be .*, got {mode_value}\b"):
        _call(a)


def test_extension_exports_no_libstdcxx_objects():
    import shutil
    import subprocess

    import fastcells

    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm (binutils) is not installed")
    so = fastcells._C.__file__
    symbols = subprocess.run([nm, "-D", "--defined-only", so], check=True, capture_output=True,
                             text=True).stdout
    exported = [line.split()[-1] for line in symbols.splitlines()
                if "_ZNSt6locale" in line or "_ZSt4cout" in line]
    assert exported == [], f"{so} exports libstdc++'s own objects: {exported[:5]}"


def test_op_backward_rejects_bad_arguments():
    a = _op_args("LSTM")
    args = (a["input"], a["weights"], a["hx"], a["cx"], a["batch_sizes"], a["mode"],
            a["num_layers"], a["bidirectional"], a["has_biases"], a["proj_size"],
            a["dropout_masks"])
    output, hy, cy, reserve = torch.ops.fastcells.rnn_forward.default(*args)
    bwd = torch.ops.fastcells.rnn_backward.default
    go, gh, gc = torch.ones_like(output), torch.ones_like(hy), torch.ones_like(cy)
    bwd(*args, reserve, go, gh, gc)  # valid
    with pytest.raises(ERRORS, match="reserve"):
        bwd(*args, reserve[:-1], go, gh, gc)
    with pytest.raises(ERRORS, match="grad_output"):
        bwd(*args, reserve, go[:-1], gh, gc)
    with pytest.raises(ERRORS, match="grad_hy"):
        bwd(*args, reserve, go, gh[:, :1], gc)
    with pytest.raises(ERRORS, match="grad_cy"):
        bwd(*args, reserve, go, gh, gc.float())


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_op_non_contiguous_weights(mode):
    a = _op_args(mode)
    expect = _call(a)
    a["weights"] = [w.t().contiguous().t() if w.dim() == 2 else w.repeat_interleave(2)[::2]
                    for w in a["weights"]]
    assert not a["weights"][0].is_contiguous()
    got = _call(a)
    for g, e in zip(got[:3], expect[:3]):
        torch.testing.assert_close(g, e, atol=1e-12, rtol=1e-12)
    # Expanded (stride-0) weights give the same result as their contiguous copies.
    a["weights"] = [w[:1].expand_as(w) for w in a["weights"]]
    expect = [t.clone() for t in _call({**a, "weights": [w.contiguous() for w in a["weights"]]})]
    got = _call(a)
    for g, e in zip(got[:3], expect[:3]):
        torch.testing.assert_close(g, e, atol=1e-12, rtol=1e-12)
