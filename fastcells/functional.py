"""Functional API: the fused op with autograd (see fastcells._ops.rnn)."""
from ._ops import MODES, rnn

__all__ = ["MODES", "rnn"]
