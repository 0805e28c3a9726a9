"""The registered ops: torch.library.opcheck on fastcells::rnn_forward and
fastcells::rnn_backward, torch.autograd.gradcheck (float64) on
fastcells.functional.rnn, the functional API against fastcells.reference
with explicit dropout masks, and the Python functions that take the ops'
arguments against the registered schemas."""

from __future__ import annotations

import inspect

import pytest
import torch

from conftest import CELLS, MODE_NAMES, MODES, OP_DEVICES, gates, needs_ops, skip_without_kernel
from conftest import op_call_args as _args
from conftest import op_case as _case
from fastcells.reference import rnn_reference

pytestmark = needs_ops


CASES = {}
for _m in MODE_NAMES:
    CASES[f"{_m}-dense-1layer"] = dict(mode=_m, packed=False, num_layers=1, bidirectional=False)
    CASES[f"{_m}-packed-bidir-2layer"] = dict(mode=_m, packed=True, num_layers=2, bidirectional=True)
CASES["LSTM-proj-bidir-2layer-packed"] = dict(mode="LSTM", packed=True, num_layers=2,
                                              bidirectional=True, proj_size=2)
CASES["LSTM-proj-dense-nobias"] = dict(mode="LSTM", packed=False, num_layers=1,
                                       bidirectional=False, proj_size=2, bias=False)
CASES["GRU-nobias-bidir-dense"] = dict(mode="GRU", packed=False, num_layers=1, bidirectional=True,
                                       bias=False)
CASES["LSTM-masks-2layer-bidir"] = dict(mode="LSTM", packed=False, num_layers=2,
                                        bidirectional=True, masks=True)
CASES["GRU-masks-packed"] = dict(mode="GRU", packed=True, num_layers=2, bidirectional=False,
                                 masks=True)
CASES["RNN_TANH-T1-B1"] = dict(mode="RNN_TANH", packed=False, num_layers=2, bidirectional=True,
                               T=1, B=1)


@pytest.mark.parametrize("device", OP_DEVICES)
@pytest.mark.parametrize("name", list(CASES))
def test_functional_matches_reference(name, device):
    """On every device, against the reference on the CPU."""
    import fastcells

    skip_without_kernel(CASES[name]["mode"], device)
    kw = {**dict(T=5, B=4, I=3, H=4), **CASES[name]}
    out, hy, cy = (t if t is None else t.cpu()
                   for t in fastcells.functional.rnn(*_args(_case(**kw, device=device))))
    c = _case(**kw)
    r_out, r_hy, r_cy = rnn_reference(*_args(c))
    torch.testing.assert_close(out, r_out, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(hy, r_hy, atol=1e-10, rtol=1e-10)
    if CELLS[c["mode"]].has_cell_state:
        torch.testing.assert_close(cy, r_cy, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("name", list(CASES))
def test_gradcheck(name, cpu_isa):  # once per CPU ISA path the host supports
    import fastcells

    c = _case(**CASES[name])
    lstm = CELLS[c["mode"]].has_cell_state
    n_w = len(c["weights"])
    leaves = [c["input"], c["hx"]] + ([c["cx"]] if lstm else []) + c["weights"]
    leaves = [t.clone().requires_grad_() for t in leaves]

    def fn(*ts):
        x, h = ts[0], ts[1]
        cx = ts[2] if lstm else None
        ws = list(ts[-n_w:])
        out, hy, cy = fastcells.functional.rnn(x, ws, h, cx, c["batch_sizes"], c["mode"],
                                               c["num_layers"], c["bidirectional"],
                                               c["has_biases"], c["proj_size"],
                                               c["dropout_masks"])
        return (out, hy, cy) if lstm else (out, hy)

    assert torch.autograd.gradcheck(fn, tuple(leaves), atol=1e-7, rtol=1e-5)


OPCHECK_CASES = ["LSTM-dense-1layer", "GRU-packed-bidir-2layer", "RNN_RELU-dense-1layer",
                 "LSTM-proj-bidir-2layer-packed", "LSTM-masks-2layer-bidir"]


@pytest.mark.parametrize("name,grads", [(n, "all") for n in OPCHECK_CASES]
                         + [("GRU-packed-bidir-2layer", "output_only"),
                            ("LSTM-proj-bidir-2layer-packed", "states_only")])
@pytest.mark.parametrize("device", OP_DEVICES)
def test_opcheck_rnn_backward_gradient_subsets(name, grads, device):
    """opcheck (every check) of rnn_backward given all, only the output's or
    only the states' gradients."""
    import fastcells  # noqa: F401

    c = _case(**CASES[name], device=device)
    args = _args(c)
    output, hy, cy, reserve = torch.ops.fastcells.rnn_forward.default(*args)
    g = torch.Generator().manual_seed(9)

    def draw(like):
        return torch.randn(like.shape, generator=g, dtype=like.dtype).to(device)

    grad_output, grad_hy = draw(output), draw(hy)
    grad_cy = draw(cy) if CELLS[c["mode"]].has_cell_state else None
    if grads == "output_only":
        grad_hy = grad_cy = None
    elif grads == "states_only":
        grad_output = None
    torch.library.opcheck(torch.ops.fastcells.rnn_backward.default,
                          args + (reserve, grad_output, grad_hy, grad_cy))


@pytest.mark.parametrize("name", ["LSTM-proj-bidir-2layer-packed", "GRU-masks-packed",
                                  "RNN_RELU-dense-1layer"])
def test_rnn_backward_without_input_gradient(name):
    """need_grad_input=False returns a 0-element grad_input and the very same
    (bitwise) state and weight gradients; the fake kernel agrees (opcheck)."""
    import fastcells  # noqa: F401

    c = _case(**CASES[name], T=5, B=3, I=3, H=4)
    args = _args(c)
    output, hy, cy, reserve = torch.ops.fastcells.rnn_forward.default(*args)
    g = torch.Generator().manual_seed(5)
    go, gh = (torch.randn(t.shape, generator=g, dtype=t.dtype) for t in (output, hy))
    gc = (torch.randn(cy.shape, generator=g, dtype=cy.dtype) if CELLS[c["mode"]].has_cell_state
          else None)
    bwd = torch.ops.fastcells.rnn_backward.default
    full = bwd(*args, reserve, go, gh, gc)
    part = bwd(*args, reserve, go, gh, gc, False)
    assert full[0].shape == c["input"].shape and part[0].numel() == 0
    assert torch.equal(full[1], part[1]) and torch.equal(full[2], part[2])
    assert len(full[3]) == len(part[3])
    for a, b in zip(full[3], part[3]):
        assert torch.equal(a, b)
    torch.library.opcheck(bwd, args + (reserve, go, gh, gc, False), test_utils=(
        "test_schema", "test_faketensor"))


@pytest.mark.parametrize("name", ["LSTM-proj-bidir-2layer-packed", "GRU-packed-bidir-2layer",
                                  "RNN_TANH-dense-1layer"])
def test_ops_with_none_initial_states(name):
    """hx (and cx) None means zero initial states: the same outputs and
    gradients as explicit zeros; the fake kernels agree (opcheck)."""
    import fastcells

    c = _case(**CASES[name], T=4, B=3, I=3, H=4)
    args = list(_args(c))
    zeros = list(args)
    zeros[2] = torch.zeros_like(c["hx"])
    if c["cx"] is not None:
        zeros[3] = torch.zeros_like(c["cx"])
    args[2] = args[3] = None
    fwd, bwd = torch.ops.fastcells.rnn_forward.default, torch.ops.fastcells.rnn_backward.default
    got, exp = fwd(*args), fwd(*zeros)
    for a, b in zip(got, exp):
        assert torch.equal(a, b)
    output, hy, cy, reserve = exp
    g = torch.Generator().manual_seed(3)
    go, gh = (torch.randn(t.shape, generator=g, dtype=t.dtype) for t in (output, hy))
    gc = (torch.randn(cy.shape, generator=g, dtype=cy.dtype) if CELLS[c["mode"]].has_cell_state
          else None)
    tail = (reserve, go, gh, gc)
    gb, eb = bwd(*args, *tail), bwd(*zeros, *tail)
    for a, b in zip(gb[:3], eb[:3]):
        assert torch.equal(a, b)
    for a, b in zip(gb[3], eb[3]):
        assert torch.equal(a, b)
    torch.library.opcheck(fwd, tuple(args), test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(bwd, tuple(args) + tail, test_utils=("test_schema", "test_faketensor"))
    # Through autograd: weight gradients as with explicit zero states.
    grads = []
    for states in ((None, None), (zeros[2], zeros[3])):
        ws = [w.detach().clone().requires_grad_() for w in c["weights"]]
        out, hn, cn = fastcells.functional.rnn(c["input"], ws, *states, *args[4:])
        grads.append(torch.autograd.grad(out.pow(2).sum() + hn.sum(), ws))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def _schema_arguments(op) -> list:
    """(name, default) of each argument of the registered schema, in order;
    inspect.Parameter.empty where the schema gives no default."""
    return [(a.name, a.default_value if a.has_default_value() else inspect.Parameter.empty)
            for a in op.default._schema.arguments]


def test_fake_kernels_take_the_schema_arguments():
    """The Python functions the dispatcher calls with an op's arguments (fake
    kernels, the reference backward) take them under the schema's names, in
    its order, with its defaults. The C++ side writes each argument list once
    (csrc/op_schema.h); a change there that Python does not follow fails here."""
    from fastcells import _ops, _transforms

    ops = torch.ops.fastcells
    for fn, op in ((_ops._forward_fake, ops.rnn_forward),
                   (_ops._backward_fake, ops.rnn_backward),
                   (_transforms.rnn_backward_reference, ops.rnn_backward_reference)):
        params = inspect.signature(fn).parameters.values()
        assert [(p.name, p.default) for p in params] == _schema_arguments(op), fn.__name__


def test_onnx_translations_take_the_schema_arguments():
    """The ONNX translations of rnn_forward (TorchScript symbolic after its
    graph argument, ONNX Script function) name its arguments as the schema
    does, in its order; their defaults are the exporters' own."""
    from fastcells import onnx

    names = [name for name, _ in _schema_arguments(torch.ops.fastcells.rnn_forward)]
    assert list(inspect.signature(onnx._symbolic).parameters)[1:] == names
    pytest.importorskip("onnxscript")
    assert list(inspect.signature(onnx._make_translation()).parameters) == names


def test_lstm_op_needs_both_states_or_neither():
    import fastcells  # noqa: F401

    c = _case(**CASES["LSTM-dense-1layer"])
    args = list(_args(c))
    for h, cs in ((None, c["cx"]), (c["hx"], None)):
        args[2], args[3] = h, cs
        with pytest.raises(RuntimeError, match="cx"):
            torch.ops.fastcells.rnn_forward.default(*args)


@pytest.mark.parametrize("input_requires_grad", [False, True])
def test_module_input_gradient_only_when_required(input_requires_grad):
    """Training with an input that does not require grad (the usual case) skips
    the first layer's input gradient: the parameter gradients are bitwise those
    of the run that computes it, and the input gets no .grad."""
    import fastcells

    torch.manual_seed(0)
    m = fastcells.LSTM(5, 7, num_layers=2, bidirectional=True).double()
    x = torch.randn(6, 3, 5, dtype=torch.float64)
    ref_x = x.clone().requires_grad_()
    m(ref_x)[0].pow(2).sum().backward()
    expect = [p.grad.clone() for p in m.parameters()]
    m.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_(input_requires_grad)
    m(xi)[0].pow(2).sum().backward()
    for p, e in zip(m.parameters(), expect):
        assert torch.equal(p.grad, e)
    if input_requires_grad:
        assert torch.equal(xi.grad, ref_x.grad)
    else:
        assert xi.grad is None
        # Only the input asked for: the gradient is still computed.
        (gx,) = torch.autograd.grad(m(ref_x)[0].pow(2).sum(), [ref_x])
        torch.testing.assert_close(gx, ref_x.grad, rtol=0, atol=0)


def test_rnn_backward_matches_autograd_of_reference():
    """The backward op called directly gives the reference's gradients."""
    import fastcells  # noqa: F401

    c = _case(**CASES["LSTM-proj-bidir-2layer-packed"], T=5, B=4, I=3, H=4)
    args = _args(c)
    output, hy, cy, reserve = torch.ops.fastcells.rnn_forward.default(*args)
    g = torch.Generator().manual_seed(4)
    go, gh, gc = (torch.randn(t.shape, generator=g, dtype=t.dtype) for t in (output, hy, cy))
    gi, ghx, gcx, gws = torch.ops.fastcells.rnn_backward.default(
        *args, reserve, go, gh, gc)
    leaves = [c["input"], c["hx"], c["cx"]] + c["weights"]
    leaves = [t.clone().requires_grad_() for t in leaves]
    ro, rh, rc = rnn_reference(leaves[0], leaves[3:], leaves[1], leaves[2], *args[4:])
    expect = torch.autograd.grad((ro * go).sum() + (rh * gh).sum() + (rc * gc).sum(), leaves)
    for got, exp in zip([gi, ghx, gcx] + list(gws), expect):
        torch.testing.assert_close(got, exp, atol=1e-10, rtol=1e-10)


def test_gradients_through_non_contiguous_and_expanded_weights():
    """Transposed, strided and expanded weight views: autograd returns gradients
    of the right shape and value for the underlying leaves."""
    import fastcells

    g = torch.Generator().manual_seed(0)
    G, H, I, T, B = gates("LSTM"), 5, 3, 4, 2

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    leaves = [rnd(I, G * H), rnd(H, G * H), rnd(2 * G * H), rnd(1)]
    leaves = [t.requires_grad_() for t in leaves]
    x, h, c = rnd(T, B, I), rnd(1, B, H), rnd(1, B, H)
    grads = []
    for fn in (fastcells.functional.rnn, rnn_reference):
        ws = [leaves[0].t(), leaves[1].t(), leaves[2][::2], leaves[3].expand(G * H)]
        out, hy, cy = fn(x, ws, h, c, None, MODES["LSTM"][1], 1, False, True, 0, None)
        (out.sum() + hy.pow(2).sum() + cy.sum()).backward()
        grads.append([t.grad.clone() for t in leaves])
        for t in leaves:
            t.grad = None
    for got, exp in zip(*grads):
        torch.testing.assert_close(got, exp, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_autocast_projected_lstm_dtypes_match_torch_nn(input_dtype):
    """torch.nn's projected LSTM is composite under CPU autocast: output and h_n
    in bfloat16, c_n in the input's dtype."""
    import fastcells

    torch.manual_seed(0)
    ref = torch.nn.LSTM(3, 5, proj_size=2)
    fc = fastcells.LSTM(3, 5, proj_size=2)
    fc.load_state_dict(ref.state_dict())
    x = torch.randn(6, 2, 3).to(input_dtype)
    results = []
    for m in (ref, fc):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, (h, c) = m(x)
        results.append((out, h, c))
    for a, e in zip(results[1], results[0]):
        assert a.dtype == e.dtype
        torch.testing.assert_close(a.float(), e.float(), atol=6e-2, rtol=6e-2)


@pytest.mark.parametrize("region", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell"])
def test_cpu_autocast_dtypes_match_torch_nn(name, input_dtype, region):
    """Under torch.autocast("cpu") each module returns torch.nn's dtype (LSTM,
    RNN and RNNCell the region's; GRU, GRUCell and LSTMCell their input's, and
    the region's for an input in the region's dtype), with values within that
    dtype's rounding of torch.nn's, and gradients reach the float32 parameters."""
    import fastcells

    torch.manual_seed(0)
    ref = getattr(torch.nn, name)(3, 5)
    fc = getattr(fastcells, name)(3, 5)
    fc.load_state_dict(ref.state_dict())
    shape = (2, 3) if name.endswith("Cell") else (6, 2, 3)
    x = torch.randn(shape).to(input_dtype)
    results = []
    for m in (ref, fc):
        try:
            with torch.autocast("cpu", dtype=region):
                out = m(x)
        except RuntimeError as e:  # torch.nn's oneDNN LSTM has no float16 primitive here
            assert m is ref and name == "LSTM" and region == torch.float16, e
            pytest.skip(f"torch.nn's {name} fails under a {region} region: {e}")
        y = out[0] if isinstance(out, tuple) else out
        y.float().sum().backward()
        results.append((y, [p.grad for p in m.parameters()]))
    (y_ref, g_ref), (y_fc, g_fc) = results
    assert y_fc.dtype == y_ref.dtype, f"{name}: {y_fc.dtype} where torch.nn gives {y_ref.dtype}"
    if y_fc.dtype == torch.float32:
        # computed in float32 (torch.nn rounds some products to the region's
        # dtype on the way): equal to torch.nn's float32 result outside autocast
        y_f32 = ref(x.float())
        y_f32 = y_f32[0] if isinstance(y_f32, tuple) else y_f32
        torch.testing.assert_close(y_fc, y_f32, atol=1e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(y_fc.float(), y_ref.float(), atol=6e-2, rtol=6e-2)
    for a, b in zip(g_fc, g_ref):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=0.25, rtol=0.1)
