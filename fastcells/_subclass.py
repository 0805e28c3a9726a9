"""Fused versions of user subclasses of torch.nn.LSTM / GRU / RNN, for convert().

Libraries subclass the torch.nn classes (pytorch-forecasting:
``class LSTM(RNN, nn.LSTM)``, whose ``forward`` packs the input and calls
``super().forward``). ``convert()`` gives such a module a generated class
whose method order is

    generated class, the user's class and its mixins, _FusedLSTMForward, nn.LSTM, ...

so the user's methods and attributes stay, ``isinstance`` with the user's
class and with ``nn.LSTM`` stays true, and the user's ``super().forward``
reaches fastcells' fused forward instead of torch.nn's. The module object and
its Parameters are kept: only ``__class__`` changes.

A generated class is named after the user's class (its module and qualified
name, encoded) and lives in this module, which builds it on first attribute
access, so pickle, ``torch.save(model)`` and ``copy.deepcopy`` find it in a
fresh process as long as the user's class is importable.
"""
from __future__ import annotations

import importlib
import threading

from torch import nn

from .modules import _FusedRNNBase

_SEQUENCE = (nn.LSTM, nn.GRU, nn.RNN)
_PREFIX = "Fused_"
_lock = threading.Lock()


def _forward_class(base: type) -> type:
    """nn.LSTM (GRU, RNN) with fastcells' forward: sits right above torch.nn's class."""
    name = f"_Fused{base.__name__}Forward"
    return type(name, (base,), {"forward": _FusedRNNBase.forward,
                                "__module__": __name__, "__qualname__": name})


_FORWARD = {base: _forward_class(base) for base in _SEQUENCE}
globals().update({cls.__name__: cls for cls in _FORWARD.values()})


def _encode(module: str, qualname: str) -> str:
    """A reversible identifier for module:qualname ('_' -> '__', '.' -> '_D', ':' -> '_C')."""
    text = f"{module}:{qualname}"
    return _PREFIX + text.replace("_", "__").replace(".", "_D").replace(":", "_C")


def _decode(name: str) -> tuple[str, str]:
    out, i, s = [], 0, name[len(_PREFIX):]
    while i < len(s):
        if s[i] == "_" and i + 1 < len(s):
            out.append({"_": "_", "D": ".", "C": ":"}[s[i + 1]])
            i += 2
        else:
            out.append(s[i])
            i += 1
    module, qualname = "".join(out).split(":", 1)
    return module, qualname


def is_generated(cls: type) -> bool:
    return "_fastcells_original" in cls.__dict__


def original_class(cls: type) -> type:
    """The user's class a generated class was made from."""
    return cls.__dict__["_fastcells_original"]


def convertible(cls: type) -> bool:
    """A user subclass of nn.LSTM / GRU / RNN that convert() can give the fused forward."""
    from .modules import _FusedRNNBase as fused_base

    return (issubclass(cls, _SEQUENCE) and cls not in _SEQUENCE and not is_generated(cls)
            and not issubclass(cls, fused_base) and not issubclass(cls, tuple(_FORWARD.values())))


def fused_subclass(cls: type) -> type:
    """The generated fused class for the user's class ``cls`` (built once)."""
    name = _encode(cls.__module__, cls.__qualname__)
    with _lock:
        made = globals().get(name)
        if made is not None and original_class(made) is cls:
            return made
        base = next(b for b in _SEQUENCE if issubclass(cls, b))
        made = type(name, (cls, _FORWARD[base]),
                    {"__module__": __name__, "__qualname__": name, "_fastcells_original": cls})
        if "<locals>" not in cls.__qualname__:
            globals()[name] = made  # importable; classes made inside functions are not
        return made


def __getattr__(name: str):
    """Builds a generated class on first access (unpickling in a fresh process)."""
    if not name.startswith(_PREFIX):
        raise AttributeError(name)
    module, qualname = _decode(name)
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return fused_subclass(obj)
