"""Run every ``torch.nn.LSTM`` / ``GRU`` / ``RNN`` on fastcells' fused op, without changing their class.

Forecasting libraries (gluonts, pytorch-forecasting, darts, neuralforecast)
build these modules inside their models, sometimes subclass them, and rebuild
them from checkpoints; ``convert()`` cannot reach all of that. The patch
replaces the ``forward`` of the three torch.nn classes themselves with
fastcells' forward, so it reaches modules that already exist, modules a library
creates later, subclasses defined before or after the patch (their
``super().forward`` lands here) and modules loaded from a checkpoint. The
classes, the Parameters, ``isinstance`` checks, state_dicts and pickles stay
exactly torch.nn's; only the computation changes.

What the patch changes, and nothing else:

* ``torch.nn.LSTM.forward``, ``torch.nn.GRU.forward``, ``torch.nn.RNN.forward``;
* ``torch._dynamo.config.allow_rnn`` is set to True: TorchDynamo breaks the
  graph at the three classes because their own forward is untraceable; the
  patched forward is one custom op with a fake kernel, so a model compiles
  with ``fullgraph=True`` as a model of fastcells modules does.

``unpatch_torch_nn()`` restores both exactly. ``is_patched()`` tells whether
the patch is active; ``fastcells.patched()`` applies it for a ``with`` block.

Inputs fastcells cannot run (on a device this build has no backend for, such
as meta) run torch.nn's own forward, with a warning that says so once per
reason: the patch never fails a model that torch.nn runs.
"""
from __future__ import annotations

import contextlib
import functools
import threading
import warnings
from typing import Iterator

import torch
from torch import nn

from . import _ops
from .modules import _FusedRNNBase

__all__ = ["patch_torch_nn", "unpatch_torch_nn", "patched", "is_patched"]

_CLASSES = (nn.LSTM, nn.GRU, nn.RNN)
_lock = threading.Lock()
_saved: dict = {}  # while patched: class -> its own forward; "allow_rnn" -> dynamo's value
_warned: set = set()


@functools.lru_cache(maxsize=None)
def _cuda_built() -> bool:
    """Whether this build has the CUDA backend (fixed at build time; asked once,
    not on every patched forward)."""
    return "cuda=1" in _ops.build_info()


def _unsupported(input) -> str | None:
    """Why fastcells cannot run this call, or None."""
    data = input.data if isinstance(input, nn.utils.rnn.PackedSequence) else input
    if not isinstance(data, torch.Tensor):
        return None  # let the fused forward raise torch.nn's error
    if data.device.type == "cuda" and not _cuda_built():
        return "this fastcells build has no CUDA backend"
    if data.device.type not in ("cpu", "cuda"):
        return f"fastcells has no backend for device type {data.device.type!r}"
    return None


def _patched_forward(self, input, hx=None):
    reason = _unsupported(input)
    if reason is not None:
        if reason not in _warned:
            _warned.add(reason)
            warnings.warn(f"fastcells.patch_torch_nn: {type(self).__name__} runs torch.nn's own "
                          f"forward here: {reason}.", stacklevel=2)
        return _saved[_base_class(self)](self, input, hx)
    return _FusedRNNBase.forward(self, input, hx)


def _base_class(module: nn.Module) -> type:
    for cls in _CLASSES:
        if isinstance(module, cls):
            return cls
    raise TypeError(f"not a torch.nn RNN module: {type(module).__name__}")


def is_patched() -> bool:
    """Whether torch.nn's LSTM, GRU and RNN currently run fastcells' fused op."""
    return nn.LSTM.forward is _patched_forward


def patch_torch_nn() -> None:
    """Make every torch.nn LSTM, GRU and RNN run fastcells' fused op (idempotent).

    See the module docstring for exactly what changes.
    """
    import torch._dynamo

    with _lock:
        if is_patched():
            return
        for cls in _CLASSES:
            _saved[cls] = cls.__dict__["forward"]
        _saved["allow_rnn"] = torch._dynamo.config.allow_rnn
        for cls in _CLASSES:
            cls.forward = _patched_forward
        torch._dynamo.config.allow_rnn = True
        torch._dynamo.reset()  # graphs traced before the patch must not be reused


def unpatch_torch_nn() -> None:
    """Restore torch.nn's own LSTM, GRU and RNN forward exactly (idempotent)."""
    import torch._dynamo

    with _lock:
        if not is_patched():
            return
        for cls in _CLASSES:
            cls.forward = _saved.pop(cls)
        torch._dynamo.config.allow_rnn = _saved.pop("allow_rnn")
        torch._dynamo.reset()


@contextlib.contextmanager
def patched() -> Iterator[None]:
    """``with fastcells.patched(): ...`` runs the block with the patch, then restores
    the previous state (a patch that was already active stays active)."""
    was = is_patched()
    patch_torch_nn()
    try:
        yield
    finally:
        if not was:
            unpatch_torch_nn()
