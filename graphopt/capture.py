"""Capture: nn.Module -> torch.fx.GraphModule with shape/dtype metadata on every node.

The user's model is never mutated: we trace a deep copy in eval mode. `torch.fx.symbolic_trace` is tried
first (it keeps `call_module` nodes, which the module-level passes rewrite); where it fails (data-dependent
control flow, unsupported Python) `torch.export` is tried and the result says which was used. When both
fail, CaptureError names the module path where tracing stopped and the reason.
"""
from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from .analysis.compare import compare_outputs
from .analysis.mutation import functionalize_inplace
from .analysis.shapes import propagate_shapes
from .errors import CaptureError, DynamicShapeError

__all__ = ["capture", "Captured"]


@dataclass
class Captured:
    gm: fx.GraphModule
    method: str                       # "symbolic_trace" | "torch.export" | "graphmodule"
    notes: list[str] = field(default_factory=list)


class _PathTracer(fx.Tracer):
    """symbolic_trace that remembers which submodule it was inside when tracing failed."""

    def __init__(self):
        super().__init__()
        self.stack: list[str] = []

    def call_module(self, m: nn.Module, forward, args, kwargs):
        path = self.path_of_module(m)
        self.stack.append(path)
        out = super().call_module(m, forward, args, kwargs)   # on error the failing path stays on top
        self.stack.pop()
        return out


def _symbolic_trace(model: nn.Module) -> fx.GraphModule:
    tracer = _PathTracer()
    try:
        graph = tracer.trace(model)
    except Exception as e:
        where = tracer.stack[-1] if tracer.stack else "(top-level forward)"
        raise _TraceFailure(where or "(top-level forward)", f"{type(e).__name__}: {e}") from e
    name = model.__class__.__name__
    return fx.GraphModule(tracer.root, graph, name)


class _TraceFailure(Exception):
    def __init__(self, where: str, reason: str):
        super().__init__(f"in module '{where}': {reason}")
        self.where, self.reason = where, reason


def _export(model: nn.Module, example_inputs: tuple, dynamic=None) -> fx.GraphModule:
    if dynamic:
        from .dynamic import export_dynamic

        ep = export_dynamic(model, dynamic, example_inputs, type(model).__name__)
    else:
        ep = torch.export.export(model, example_inputs, strict=False)
    gm = ep.module()
    if not isinstance(gm, fx.GraphModule):  # pragma: no cover - depends on torch version
        raise TypeError(f"torch.export returned {type(gm).__name__}, not a GraphModule")
    return gm


def _first_line(reason: str, limit: int = 300) -> str:
    line = reason.strip().splitlines()[0] if reason.strip() else reason
    return line if len(line) <= limit else line[:limit] + "..."


def capture(model: nn.Module, example_inputs: tuple, *, method: str = "auto", dynamic=None) -> Captured:
    """Trace a copy of `model` (eval mode) and propagate shapes with `example_inputs`.

    method: "auto" (symbolic_trace, then torch.export), "symbolic_trace" or "export".
    dynamic: a graphopt.dynamic.DynamicSpec (or None). The model must then torch.export with those dims
    symbolic (DynamicShapeError naming the dim and the line/op that fixes it otherwise), and the captured
    graph must match the model at other sizes inside the bounds too (DynamicShapeError if tracing baked a
    size in).
    The captured graph is checked against the model on the example inputs.
    """
    if not isinstance(model, nn.Module):
        raise CaptureError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if method not in ("auto", "symbolic_trace", "export"):
        raise CaptureError(f"unknown capture method {method!r}: use 'auto', 'symbolic_trace' or 'export'")
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    if not example_inputs:
        raise CaptureError("example_inputs is empty: give one example input per forward() argument")
    work = copy.deepcopy(model).eval()
    try:
        with torch.no_grad():
            reference = work(*cloned(example_inputs))
    except Exception as e:
        raise CaptureError(f"the model itself fails on the example inputs "
                           f"({', '.join(_describe(x) for x in example_inputs)}): "
                           f"{type(e).__name__}: {_first_line(str(e))}") from e

    notes: list[str] = []
    gm = None
    used = ""
    failures: list[str] = []
    if isinstance(work, fx.GraphModule):
        gm, used = work, "graphmodule"
    if gm is None and method in ("auto", "symbolic_trace"):
        try:
            gm = _symbolic_trace(work)
            used = "symbolic_trace"
        except _TraceFailure as f:
            failures.append(f"symbolic_trace failed in module '{f.where}': {_first_line(f.reason)}")
    if gm is None and method in ("auto", "export"):
        try:
            gm = _export(copy.deepcopy(model).eval(), example_inputs, dynamic)
            used = "torch.export"
            if failures:
                notes.append(failures[-1] + "; used torch.export instead (aten-level graph: "
                             "module-level passes such as fold_bn see fewer modules)")
        except DynamicShapeError:
            raise
        except Exception as e:
            failures.append(f"torch.export failed: {type(e).__name__}: {_first_line(str(e))}")
    if gm is None:
        raise CaptureError(f"cannot capture {type(model).__name__}: " + "; ".join(failures))
    _positional_calls(gm)
    if used != "torch.export":                        # export's graphs are functional already
        try:
            rewritten, kept = functionalize_inplace(gm, cloned(example_inputs))
        except Exception as e:
            raise CaptureError(f"captured graph of {type(model).__name__} ({used}) does not run on the example "
                               f"inputs: {type(e).__name__}: {_first_line(str(e))}") from e
        if rewritten:
            notes.append(f"{rewritten} in-place op(s) rewritten out of place (their later readers read the result)")
        notes.extend(kept)

    try:
        with torch.no_grad():
            out = propagate_shapes(gm, cloned(example_inputs))
    except Exception as e:
        raise CaptureError(f"captured graph of {type(model).__name__} ({used}) does not run on the example "
                           f"inputs: {type(e).__name__}: {_first_line(str(e))}") from e
    diff = compare_outputs(out, reference)
    if diff.structure_error or diff.max_rel > 1e-5:
        raise CaptureError(f"captured graph of {type(model).__name__} ({used}) disagrees with the model "
                           f"({diff}); the model probably has input-dependent behaviour tracing cannot keep")
    if dynamic:
        if used != "torch.export":
            # the model itself must export with these dims symbolic (DynamicShapeError naming the line if not)
            from .dynamic import export_dynamic

            export_dynamic(copy.deepcopy(model).eval(), dynamic, example_inputs, type(model).__name__)
        _check_variants(work, gm, used, dynamic, example_inputs)
        notes.append(f"dynamic dims: {dynamic.describe()}")
    return Captured(gm, used, notes)


# functional layers whose arguments the passes read by position (flops, quant.graph.modularize, lowering)
_CONV_PARAMS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_FUNCTION_PARAMS = {F.linear: ("input", "weight", "bias"), F.conv1d: _CONV_PARAMS, F.conv2d: _CONV_PARAMS,
                    F.conv3d: _CONV_PARAMS}


def _positional_calls(gm: fx.GraphModule) -> None:
    """Pass keyword arguments positionally where the callee takes them so: each call_module node's, bound to
    its module's forward() (`self.fc(input=x)` -> `self.fc(x)`: the same call), and those of F.linear /
    F.conv*d (`F.linear(x, weight=w)`), so passes that read a layer's input as node.args[0] and its weight as
    node.args[1] (quantize, sparsify, prune, lowrank, FLOP counts) see every call of it."""
    changed = False
    for node in gm.graph.nodes:
        if not node.kwargs:
            continue
        if node.op == "call_module":
            try:
                bound = inspect.signature(gm.get_submodule(str(node.target)).forward).bind(*node.args,
                                                                                            **node.kwargs)
            except (TypeError, ValueError):      # no signature, or one the call does not match: leave it
                continue
            args, kwargs = list(bound.args), dict(bound.kwargs)
        elif node.op == "call_function" and node.target in _FUNCTION_PARAMS:
            args, kwargs = list(node.args), dict(node.kwargs)
            for name in _FUNCTION_PARAMS[node.target][len(args):]:
                if name not in kwargs:
                    break
                args.append(kwargs.pop(name))
        else:
            continue
        if len(args) > len(node.args):
            node.args, node.kwargs = tuple(args), kwargs
            changed = True
    if changed:
        gm.recompile()


def cloned(inputs: tuple) -> tuple:
    """Copies of the tensors among `inputs`: a model that changes its inputs in place (`x.mul_(2)` in its
    forward) must see the same values at every run, and the caller's tensors must stay as they were."""
    return tuple(x.clone() if isinstance(x, torch.Tensor) else x for x in inputs)


def _check_variants(model: nn.Module, gm: fx.GraphModule, used: str, dynamic, example_inputs: tuple) -> None:
    """The captured graph must equal the model at other sizes inside the bounds (a trace can bake in a size)."""
    for variant in dynamic.variants(example_inputs):
        shapes = ", ".join(_describe(x) for x in variant)
        try:
            with torch.no_grad():
                ref = model(*cloned(variant))
        except Exception as e:
            raise DynamicShapeError(f"{type(model).__name__} itself fails at other sizes inside the dynamic bounds "
                                    f"({shapes}): {type(e).__name__}: {_first_line(str(e))}") from e
        try:
            with torch.no_grad():
                got = gm(*cloned(variant))
        except Exception as e:
            raise DynamicShapeError(f"the captured graph of {type(model).__name__} ({used}) fails at {shapes} "
                                    f"(inside the dynamic bounds {dynamic.describe()}): a size of the example was "
                                    f"fixed during tracing: {type(e).__name__}: {_first_line(str(e))}") from e
        diff = compare_outputs(got, ref)
        if diff.structure_error or diff.max_rel > 1e-5:
            raise DynamicShapeError(f"the captured graph of {type(model).__name__} ({used}) disagrees with the "
                                    f"model at {shapes} ({diff}): a size of the example was fixed during tracing")


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor{tuple(x.shape)}:{str(x.dtype).replace('torch.', '')}"
    return type(x).__name__
