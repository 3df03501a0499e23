"""int8 quantization for graphopt: observers, calibration, quantized layers, QAT.

    prepared, survey = prepare(gm)              # 1. observers after every tensor a layer will quantize
    calibrate(prepared, batches)                #    (inspect prepared.graph / the observers' ranges)
    qgm = convert(prepared)                     # 2. quantize nodes + QuantLinear / QuantConv2d layers

    qat = prepare_qat(gm, calibration=batches)  # fake-quant graph to fine-tune in PyTorch, then convert(qat)

The integer semantics are defined in graphopt.quant.qparams and graphopt.quant.ops; the "quantize" pass
(graphopt.passes.quantize) runs these steps inside graphopt.optimize().
"""
from . import ops  # noqa: F401  (registers torch.ops.graphopt.*)
from . import cluster, sparse, w4a8, weight_only  # noqa: F401  (register torch.ops.graphopt.woq_linear_packed,
#                                                  clustered_linear, sparse_qlinear, w4a8_linear)
from .graph import Converter, calibrate, convert, find_sites, prepare, prepare_qat, swap_linear
from .modules import (DynamicQuantLinear, FakeQuantize, FloatMatmul, QATConv2d, QATLinear, QuantConv2d,
                      QuantLinear, QuantMatmul, WeightOnlyLinear)
from .observers import OBSERVERS, Observer, make_observer
from .qparams import QParams, act_qparams, weight_qparams

__all__ = [
    "prepare", "calibrate", "convert", "Converter", "prepare_qat", "swap_linear", "find_sites",
    "QuantLinear", "QuantConv2d", "QuantMatmul", "FloatMatmul", "DynamicQuantLinear", "WeightOnlyLinear", "FakeQuantize", "QATLinear",
    "QATConv2d", "Observer", "OBSERVERS", "make_observer", "QParams", "act_qparams", "weight_qparams",
]
