"""optimize(): capture -> pass manager -> backend, returning an OptimizedModel (optimized.py)."""
from __future__ import annotations

import copy
import time
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from .backends.targets import resolve_target
from .capture import capture
from .errors import GraphoptError
from .optimized import OptimizedModel
from .pipeline import Context, PassManager, Pipeline

__all__ = ["optimize", "OptimizedModel", "DEFAULT_PIPELINE"]

DEFAULT_PIPELINE = "fold_bn,cleanup"


def optimize(model: nn.Module, target: str | dict = "x86", pipeline: Pipeline | str | Sequence | None = None,
             *, example_inputs: tuple | torch.Tensor | None = None, calibration: Iterable | None = None,
             train_data: Iterable | None = None, tune: Any = None, verify: bool = True, capture_method: str = "auto",
             exact_rtol: float = 1e-4, precision: str = "float32", dynamic: Any = None) -> OptimizedModel:
    """Optimize `model` for `target` and return an OptimizedModel.

    model:          an nn.Module (never mutated; a copy is traced in eval mode)
    target:         "torch", "x86", "arm[:cpu]", "cuda[:sm_XX]" or a TVM target dict
    pipeline:       text ("fold_bn,prune(ratio=0.5)"), a Pipeline, or a list; default "fold_bn,cleanup"
    example_inputs: one example per forward() argument; fixes the compiled input signature
    calibration:    iterable of model inputs for passes that need data (quantize, data-aware lowrank)
    train_data:     iterable of inputs or (inputs, labels) batches for passes that train (distill)
    tune:           None (default schedules), True, or tuning options (see graphopt.backends.tvm.tune)
    verify:         check every pass against the original model (exact passes must stay exact)
    precision:      compute precision of a TVM target: "float32", "float16" (float16 operands, float32
                    accumulation and signature; pays on CUDA tensor cores), "winograd" (CPU: float32 with
                    3x3 convolutions as Winograd F(4x4, 3x3) / F(2x2, 3x3), ~1e-5 relative) or "high"
                    (PyTorch's float32 matmul precision "high": int4 weight-only GEMVs take inputs as two
                    bfloat16, 2^-16 relative, on AVX512-BF16 CPUs); see backends/tvm/precision.py
    dynamic:        dims that may vary at run time, with bounds, e.g. {"batch": (1, 64), "seq": (8, 512)} or
                    {"input_ids": {0: Dim("batch", max=64)}} (see graphopt/dynamic.py); one compiled module then
                    serves every size inside the bounds, and each pass is also checked at other sizes
    """
    if example_inputs is None:
        raise GraphoptError("optimize() needs example_inputs=(tensor, ...): one example per forward() "
                            "argument, used for tracing, checking every pass, and the compiled signature")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    spec = resolve_target(target)
    if precision not in ("float32", "fp32"):
        from .backends.tvm.precision import check_precision, check_target

        precision = check_precision(precision)
        if spec.kind == "torch":
            raise GraphoptError(f"precision={precision!r} applies to compiled (TVM) targets, not 'torch'")
        check_target(precision, spec)
    pipe = Pipeline.coerce(DEFAULT_PIPELINE if pipeline is None else pipeline)

    from .dynamic import parse_dynamic

    dyn = parse_dynamic(dynamic, example_inputs, model)

    start = time.perf_counter()
    captured = capture(model, example_inputs, method=capture_method, dynamic=dyn)
    capture_s = time.perf_counter() - start
    ctx = Context(original=copy.deepcopy(model).eval(), example_inputs=example_inputs,
                  calibration=calibration, train_data=train_data, target=spec.alias,
                  exact_rtol=exact_rtol, dynamic=dyn, precision=precision)
    gm, report = PassManager(pipe, verify=verify).run(captured.gm, ctx)
    report.backend["capture"] = captured.method
    report.backend["capture_s"] = round(capture_s, 3)
    for note in captured.notes + ctx.notes:
        report.records[0].notes.append(note)

    if spec.kind == "torch":
        compiled: Any = gm
        report.backend["target"] = "torch"
    else:
        from .backends.tvm import compile_graph

        compiled = compile_graph(gm, example_inputs, spec, tune=tune, report=report, precision=precision,
                                 dynamic=dyn)
    opt = OptimizedModel(gm, compiled, report, pipe, spec, captured.method)
    opt.input_shapes = [tuple(x.shape) for x in example_inputs if isinstance(x, torch.Tensor)]
    opt.dynamic = dyn
    return opt
