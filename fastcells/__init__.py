"""fastcells: fused LSTM, GRU and RNN kernels for PyTorch, drop-in for torch.nn."""
from ._ops import MODES, build_info
from . import functional

__all__ = ["MODES", "build_info", "functional"]
__version__ = "0.1.0"
