"""fastcells: fused LSTM, GRU and RNN kernels for PyTorch, drop-in for torch.nn.

    import fastcells
    lstm = fastcells.LSTM(3, 6, num_layers=2)   # same arguments as torch.nn.LSTM
    model = fastcells.convert(model)            # swap torch.nn RNNs in a model
    model = fastcells.revert(model)             # and back (same Parameter objects)

torch.onnx.export of fastcells models gives ONNX's LSTM / GRU / RNN operators
(fastcells.onnx).
"""
from . import functional, onnx
from ._isa import cpu_host_features, cpu_isa, cpu_isas, set_cpu_isa, use_cpu_isa
from ._keras import from_keras, to_keras
from ._ops import MODES, build_info, set_poison_outputs
from .modules import (GRU, LSTM, RNN, GRUCell, LayerNormGRU, LayerNormLSTM, LSTMCell, RNNCell,
                      convert, revert)
from .patch import is_patched, patch_torch_nn, patched, unpatch_torch_nn

__all__ = ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell", "LayerNormLSTM",
           "LayerNormGRU", "convert", "revert",
           "functional", "onnx", "MODES", "build_info", "set_poison_outputs", "cpu_isa", "cpu_isas",
           "set_cpu_isa", "use_cpu_isa", "cpu_host_features", "patch_torch_nn", "unpatch_torch_nn",
           "patched", "is_patched", "from_keras", "to_keras"]
__version__ = "0.1.0"

onnx._install()
