"""Run random networks (graphopt.testing.random_models) through optimize() and classify what happens.

Each (model, pipeline) pair ends in one of four classes:

  matched  the compiled module agrees with the optimized graph run eagerly in PyTorch on inputs it never saw
           (and, for the exact default pipeline, the optimized graph agrees with the original model)
  typed    optimize() or the call raised a GraphoptError; `kind` is its class name, with the wrapped Python
           exception's type when a pass crashed inside (PassError(IndexError): a bug, but reported by name)
  wrong    no error, but outputs differ beyond the tolerance: silently wrong, must never happen
  crash    an exception that is not a GraphoptError escaped: an untyped crash

Tolerances (max |Δ| relative to max |reference|): float pipelines 1e-3 against the eager graph (float32
rounding through deep random nets, different summation orders); quantize 2e-2, since a float32 rounding
difference in an int8 epilogue can move a value across a rounding boundary, which the next layer sees as one
quantization step; the exact default pipeline 1e-4 against the original model, as the pass manager demands.

dynamic=True compiles ONE module for a range of sizes (`dynamic_dims`: batch 1-4, and for sequence models
the sequence length from 2 to twice the example's) and checks it at sizes other than the example's (the
pipeline is named e.g. "prune+dyn"); a model whose dims cannot be dynamic is a typed DynamicShapeError.
"""
from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field

import torch

from ..analysis.compare import compare_outputs
from ..errors import GraphoptError, PassError
from .random_models import RandomModel, random_model

__all__ = ["PIPELINES", "Outcome", "check", "run_fuzz", "summarize"]

PIPELINES = {
    "default": "fold_bn,cleanup",
    "prune": "fold_bn,prune(ratio=0.4),cleanup",
    "lowrank": "fold_bn,lowrank(energy=0.8,min_saving=0.0),cleanup",
    "quantize": "fold_bn,quantize(progress=false)",
}
TOLERANCE = {"default": 1e-3, "prune": 1e-3, "lowrank": 1e-3, "quantize": 2e-2}
EXACT_TOLERANCE = 1e-4


@dataclass
class Outcome:
    seed: int
    pipeline: str
    status: str                     # matched | typed | wrong | crash
    kind: str = ""                  # error class (typed/crash) or what disagreed (wrong)
    max_rel: float = 0.0            # compiled vs eager graph, relative to max |reference|
    message: str = ""
    seconds: float = 0.0
    describe: str = ""
    phases: dict = field(default_factory=dict)   # seconds: capture, each pass, lower, schedule, build (report)
    trace: str = field(default="", repr=False)


def _kind(e: BaseException) -> str:
    name = type(e).__name__
    cause = e.__cause__
    if isinstance(e, PassError) and cause is not None and not isinstance(cause, GraphoptError):
        return f"{name}({type(cause).__name__})"
    return name


def _first_line(e: BaseException, limit: int = 300) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    msg = lines[0] if lines else ""
    return msg if len(msg) <= limit else msg[:limit] + "..."


def dynamic_dims(rm: RandomModel) -> tuple[dict, list[tuple]]:
    """(the `dynamic=` argument, the input shapes to check) for a random model: batch 1-4 on axis 0, and on a
    sequence model ([batch, length, width]) the length from 2 to twice the example's on axis 1."""
    shape = tuple(rm.inputs[0].shape)
    if len(shape) == 3:
        n = shape[1]
        return ({"batch": (1, 4), "seq": (2, 2 * n)},
                [(1, n + 3) + shape[2:], (3, max(2, n - 1)) + shape[2:], (4, 2 * n) + shape[2:]])
    return {"batch": (1, 4)}, [(1,) + shape[1:], (3,) + shape[1:], (4,) + shape[1:]]


def check(rm: RandomModel, pipeline: str = "default", target: str = "x86", dynamic: bool = False) -> Outcome:
    """Optimize `rm` with PIPELINES[pipeline] (or a pipeline text) for `target` and classify the result
    (`dynamic`: one build over a range of sizes, checked at several; see the module docstring)."""
    text = PIPELINES.get(pipeline, pipeline)
    name = (pipeline if pipeline in PIPELINES else text) + ("+dyn" if dynamic else "")
    tol = TOLERANCE.get(pipeline, 1e-3)
    dims, shapes = dynamic_dims(rm) if dynamic else (None, [None])
    checks = [rm.fresh_inputs(shape=s) for s in shapes]
    calib = [rm.fresh_inputs(seed=10 + i) for i in range(4)] if "quantize" in text else None
    start = time.perf_counter()
    out = Outcome(rm.seed, name, "matched", describe=rm.describe)
    try:
        opt = graphopt_optimize(rm, text, target, calib, dims)
        out.phases = _phases(opt)
        got, eager, original = [], [], []
        for fresh in checks:
            got.append(opt(*fresh))
            with torch.no_grad():
                eager.append(opt.graph_module(*fresh))
                original.append(rm.model(*fresh))
        got, eager, original = (tuple(v) if dynamic else v[0] for v in (got, eager, original))
    except GraphoptError as e:
        out.status, out.kind, out.message = "typed", _kind(e), _first_line(e)
        out.trace = traceback.format_exc()
    except Exception as e:                                  # noqa: BLE001 - classifying is the point
        out.status, out.kind, out.message = "crash", type(e).__name__, _first_line(e)
        out.trace = traceback.format_exc()
    else:
        diff = compare_outputs(got, eager)
        out.max_rel = diff.max_rel
        if diff.structure_error:
            out.status, out.kind, out.message = "wrong", "structure", diff.structure_error
        elif not diff.max_rel <= tol:                       # NaN counts as wrong
            out.status, out.kind = "wrong", "compiled vs eager graph"
            out.message = f"max|Δ| {diff.max_abs:.3g} = {diff.max_rel:.3g} of max|ref| (tolerance {tol:g})"
        elif pipeline == "default":
            exact = compare_outputs(eager, original)
            if exact.structure_error or not exact.max_rel <= EXACT_TOLERANCE:
                out.status, out.kind = "wrong", "exact pipeline vs original"
                out.message = str(exact)
    out.seconds = time.perf_counter() - start
    return out


def _phases(opt) -> dict:
    """Where optimize() spent its time, from its report (what a slow seed is profiled by first)."""
    report = getattr(opt, "report", None)
    if report is None:
        return {}
    phases = {f"pass:{r.name}": round(r.seconds, 3) for r in report.records[1:]}
    for k in ("capture_s", "lower_s", "schedule_s", "build_s", "vm_init_s"):
        if k in report.backend:
            phases[k[:-2]] = report.backend[k]
    return phases


def graphopt_optimize(rm: RandomModel, pipeline: str, target: str, calibration, dynamic=None):
    from ..api import optimize

    return optimize(rm.model, target=target, pipeline=pipeline, example_inputs=rm.inputs,
                    calibration=calibration, dynamic=dynamic)


def run_fuzz(seeds, pipelines=tuple(PIPELINES), target: str = "x86", on_outcome=None,
             dynamic: bool = False, idioms: bool = False) -> list[Outcome]:
    """check() every seed's model (random_model(seed, idioms=idioms)) with every pipeline; `on_outcome(outcome)`
    is called as each one ends."""
    results = []
    for seed in seeds:
        rm = random_model(seed, idioms=idioms)
        for p in pipelines:
            o = check(rm, p, target, dynamic)
            results.append(o)
            if on_outcome is not None:
                on_outcome(o)
    return results


def summarize(results: list[Outcome]) -> dict:
    """{"matched": n, "typed": n, "wrong": n, "crash": n, "typed_by_kind": {...}, "crash_by_kind": {...}}."""
    counts = {"matched": 0, "typed": 0, "wrong": 0, "crash": 0}
    by_kind: dict[str, dict[str, int]] = {"typed": {}, "crash": {}, "wrong": {}}
    for o in results:
        counts[o.status] += 1
        if o.status in by_kind:
            by_kind[o.status][o.kind] = by_kind[o.status].get(o.kind, 0) + 1
    return {**counts, **{f"{k}_by_kind": v for k, v in by_kind.items()}}
