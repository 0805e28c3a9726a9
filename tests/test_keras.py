"""Keras 3 interchange (optional: skipped without keras): fastcells.from_keras
and to_keras against Keras itself on the torch backend, float32 (1e-5).

Keras runs on the torch backend (KERAS_BACKEND=torch, set here before keras is
imported). Install it with torch pinned: ``pip install -c constraints.txt keras``.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from conftest import HAVE_FASTCELLS

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras", reason="keras is not installed (pip install -c "
                            "constraints.txt keras)")
pytestmark = [
    pytest.mark.skipif(not HAVE_FASTCELLS, reason="fastcells extension not built"),
    # Keras' own numpy-2 copy-keyword deprecation, on every weight access.
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    pytest.mark.skipif(keras.backend.backend() != "torch",
                       reason="Keras must run on the torch backend (KERAS_BACKEND=torch)"),
]

import fastcells  # noqa: E402

B, T, I, U = 3, 6, 4, 5
TOL = dict(atol=1e-5, rtol=1e-5)

LAYERS = {
    "LSTM": lambda **kw: keras.layers.LSTM(U, **kw),
    "GRU": lambda **kw: keras.layers.GRU(U, **kw),
    "GRU-reset_before": lambda **kw: keras.layers.GRU(U, reset_after=False, **kw),
    "SimpleRNN-tanh": lambda **kw: keras.layers.SimpleRNN(U, **kw),
    "SimpleRNN-relu": lambda **kw: keras.layers.SimpleRNN(U, activation="relu", **kw),
}


def _x(seed=0):
    return np.random.default_rng(seed).standard_normal((B, T, I)).astype("float32")


def _keras_layer(kind, bidirectional=False, use_bias=True, seed=0):
    keras.utils.set_random_seed(seed)
    layer = LAYERS[kind](return_sequences=True, return_state=True, use_bias=use_bias,
                         bias_initializer="random_normal")
    if bidirectional:
        layer = keras.layers.Bidirectional(layer)
    layer(_x())  # builds it
    return layer


def _as_numpy(t):
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def _compare(module, layer, bidirectional):
    """Sequence and final states of the fastcells module and the Keras layer."""
    x = _x(1)
    got_out, got_state = module(torch.from_numpy(x))
    res = layer(x)
    exp_out, exp_states = _as_numpy(res[0]), [_as_numpy(t) for t in res[1:]]
    np.testing.assert_allclose(got_out.detach().numpy(), exp_out, **TOL)
    # Keras states: [h, (c)] per direction, forward first; torch: (L*D, B, H) tensors.
    states = got_state if isinstance(got_state, tuple) else (got_state,)
    per_dir = len(states)
    for d in range(2 if bidirectional else 1):
        for k, s in enumerate(states):
            np.testing.assert_allclose(s[d].detach().numpy(), exp_states[d * per_dir + k], **TOL)


@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_from_keras_matches_keras(kind, bidirectional, use_bias):
    layer = _keras_layer(kind, bidirectional, use_bias)
    module = fastcells.from_keras(layer)
    assert module.batch_first and module.bidirectional == bidirectional
    if kind.startswith("GRU"):
        assert module.reset_after == (kind == "GRU")
    _compare(module, layer, bidirectional)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_to_keras_matches_the_module(kind, bidirectional):
    """to_keras(module) computes what the module computes, and from_keras
    brings back the same weights."""
    module = fastcells.from_keras(_keras_layer(kind, bidirectional, seed=3))
    layer = fastcells.to_keras(module)
    _compare(module, layer, bidirectional)
    back = fastcells.from_keras(layer)
    weights, expected = back._flat_weights, list(module._flat_weights)
    if kind != "GRU":  # one Keras bias: bias_ih + bias_hh come back in bias_ih, bias_hh zero
        for k in range(0, len(expected), 4):
            expected[k + 2] = expected[k + 2] + expected[k + 3]
            expected[k + 3] = torch.zeros_like(expected[k + 3])
    for a, b in zip(weights, expected):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_to_keras_of_a_stack_is_a_sequential():
    torch.manual_seed(0)
    module = fastcells.LSTM(I, U, num_layers=2, batch_first=True)
    model = fastcells.to_keras(module)
    assert isinstance(model, keras.Sequential)
    x = _x(2)
    np.testing.assert_allclose(_as_numpy(model(x)), module(torch.from_numpy(x))[0].detach().numpy(),
                               **TOL)


def test_unsupported_options_raise():
    layer = keras.layers.LSTM(U, recurrent_dropout=0.2)
    layer(_x())
    with pytest.raises(ValueError, match="recurrent_dropout=0.2"):
        fastcells.from_keras(layer)
    layer = keras.layers.SimpleRNN(U, activation="sigmoid")
    layer(_x())
    with pytest.raises(ValueError, match="activation='sigmoid'"):
        fastcells.from_keras(layer)
    with pytest.raises(ValueError, match="not built"):
        fastcells.from_keras(keras.layers.GRU(U))
    with pytest.raises(ValueError, match="proj_size=2"):
        fastcells.to_keras(fastcells.LSTM(I, U, proj_size=2))
    with pytest.raises(ValueError, match="Dense"):
        fastcells.from_keras(keras.layers.Dense(3))
