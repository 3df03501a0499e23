"""TVM backend: lower (fx -> Relax), build (schedule/tune -> VM executable), runtime (CompiledModule).

    compiled = compile_graph(gm, example_inputs, spec, tune=None, report=report)
    y = compiled(x)

Importing this package imports TVM (a few seconds); graphopt imports it only when a TVM target is used.
"""
from __future__ import annotations

import time
from typing import Any

from torch import fx

from ..targets import TargetSpec
from .build import build_module, export_library
from .lower import Lowered, TensorSpec, lower_graph
from .runtime import CompiledModule

__all__ = ["compile_graph", "lower_graph", "build_module", "export_library", "CompiledModule", "Lowered",
           "TensorSpec"]


def compile_graph(gm: fx.GraphModule, example_inputs: tuple, spec: TargetSpec, *, tune: Any = None,
                  report=None, precision: str = "float32", dynamic: Any = None) -> CompiledModule:
    """Lower `gm`, build it for `spec` and wrap it: a CompiledModule with the example inputs' signature.

    precision: "float32", "float16" (float32 accumulation, float32 signature), "winograd" (CPU: float32 with
               Winograd 3x3 convolutions) or "high" (int4 weight-only GEMVs with bfloat16 input parts on
               AVX512-BF16 CPUs); see precision.py.
    Records lower_s (and, via build_module, schedule_s / build_s / target) in report.backend.
    Raises LoweringError, BuildError (TuningError for a tuning request that cannot be honoured).
    """
    import tvm

    from .precision import apply_precision, check_precision

    lowered = lower_graph(gm, example_inputs, spec, dynamic, check_precision(precision))
    if report is not None:
        report.backend["lower_s"] = round(lowered.seconds, 3)
        if lowered.quant:
            report.backend["int8"] = lowered.quant
        if lowered.sparse:
            report.backend["sparse"] = lowered.sparse
            report.backend["sparse_layers"] = lowered.sparse_layers
        report.backend["tvm_version"] = tvm.__version__

    executable = build_module(apply_precision(lowered.mod, precision, report, spec), spec, tune=tune,
                              report=report)
    start = time.perf_counter()
    try:
        compiled = CompiledModule(executable, spec, lowered.inputs, lowered.outputs, lowered.out_spec,
                                  lowered.const_outputs, dynamic=dynamic)
    except Exception as e:
        if "Invalid DLTensor file format" not in str(e):
            raise
        from ...errors import BuildError     # TVM folded an empty tensor into a constant it cannot load back

        raise BuildError("the executable holds a zero-size constant, which TVM's executable format cannot load "
                         "(an empty tensor built without reading an input's values, e.g. full/fill/ones_like of a "
                         "shape with a 0)") from e
    if report is not None and dynamic:
        report.backend["dynamic"] = dynamic.describe()
    if report is not None:
        report.backend["vm_init_s"] = round(time.perf_counter() - start, 3)
    return compiled
