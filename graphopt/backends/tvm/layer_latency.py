"""Per-layer latency of each quantization choice, from our own compiled kernels (the latency cost of
quantize(bits=mixed)).

For every (layer, choice) a one-layer graph is built (the layer's input(s) as placeholders; for int8 static the
quantize node(s) of its input(s) too, since the mixed graph pays them for that layer) and compiled for the
target with the same lowering as a whole model (compile_graph: the int8, weight-only and float schedules).
It runs on an input captured from the first calibration batch and graphopt.backends.tvm.kernel_profile times
its kernels; the layer's cost is the median (over `repeat` instrumented calls) of the sum of its TIR kernels'
times. VM builtins (allocation, shape checks) are left out: a whole model plans its memory once.

Approximations: the model's time is taken as the sum of its layers' kernel times (the ops between layers do not
change with the choices, and are not counted); fusion across a layer boundary (an epilogue fused into the next
op) and cache effects between layers are not seen. Layers of the same kind, shapes and choice share one
compile and one measurement, within a call and across calls in the same process (a cache keyed by target and
signature: a benchmark that costs the same layers twice measures them once).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from ...analysis.call_sites import run_with_site_hooks

__all__ = ["layer_latencies", "layer_inputs", "single_layer_graph", "clear_cache"]

_CACHE: dict[tuple, float] = {}


def clear_cache() -> None:
    """Forget the per-process measurements (measure again on the next call)."""
    _CACHE.clear()


def layer_inputs(builder, batch: tuple) -> dict[str, tuple]:
    """{layer path: the float input tensor(s) it sees} on one batch through the float graph."""
    seen: dict[str, tuple] = {}

    def keep(path):
        def hook(_mod, args):
            seen.setdefault(path, tuple(a.detach().clone() for a in args))
        return hook

    # per call site: a layer called twice has a path per call (quant.graph._unshare), one float module
    with torch.no_grad():
        run_with_site_hooks(builder.float_gm, tuple(batch), pre={p: keep(p) for p in builder.layers})
    return seen


def single_layer_graph(builder, path: str, choice: str, n_inputs: int) -> fx.GraphModule:
    """A GraphModule running only layer `path` under `choice` on float input(s)."""
    g = fx.Graph()
    xs = [g.placeholder(f"x{i}") for i in range(n_inputs)]
    args = xs
    if choice == "int8_static":
        args = []
        for x, qp in zip(xs, builder.input_qparams(path)):
            args.append(g.call_function(torch.ops.graphopt.quantize.default,
                                        (x, qp.scale, qp.zero_point, qp.qmin, qp.qmax)))
    out = g.call_module("layer", tuple(args))
    g.output(out)
    return fx.GraphModule({"layer": builder.module(path, choice)}, g)


def _signature(builder, path: str, choice: str, inputs: tuple) -> tuple:
    mod = builder.prepared.get_submodule(path)
    shapes = tuple(tuple(x.shape) for x in inputs)
    if isinstance(mod, nn.Conv2d):
        conf: Any = (mod.in_channels, mod.out_channels, tuple(mod.kernel_size), tuple(mod.stride),
                     str(mod.padding), tuple(mod.dilation), mod.groups, mod.bias is not None)
    elif isinstance(mod, nn.Linear):
        conf = (mod.in_features, mod.out_features, mod.bias is not None, builder.group_size)
    else:
        conf = type(mod).__name__
    return builder.kinds[path], choice, shapes, conf


def kernel_ms(compiled, inputs: tuple, repeat: int = 5) -> float:
    """Summed time (ms) of the TIR kernels of one call of `compiled` (VM builtins left out)."""
    from .kernel_profile import profile_kernels

    rows = profile_kernels(compiled, *inputs, repeat=repeat)
    return sum(r["ms"] for r in rows if not r["name"].startswith("vm.builtin"))


def layer_latencies(builder, target: str, *, repeat: int = 5, progress: bool = False,
                    batch: tuple | None = None, precision: str = "float32") -> dict[tuple[str, str], float]:
    """{(layer, choice): ms} for every layer and offered choice of a MixedBuilder, compiled for `target` in
    `precision` (the whole model's compile precision: e.g. "high" times the bfloat16 int4 GEMVs it will run)."""
    from tqdm.auto import tqdm

    from ..targets import resolve_target
    from . import compile_graph

    spec = resolve_target(target)
    if batch is None:
        batch = builder.calibration_batch
    inputs = layer_inputs(builder, batch)
    cache = _CACHE
    out: dict[tuple[str, str], float] = {}
    todo = [(p, c) for p in builder.layers for c in builder.choices[p]]
    for path, choice in tqdm(todo, desc="quantize(mixed): per-layer kernel timings", disable=not progress,
                             leave=False):
        xs = inputs[path]
        key = (spec.alias, repeat, precision) + _signature(builder, path, choice, xs)
        if key not in cache:
            gm = single_layer_graph(builder, path, choice, len(xs))
            compiled = compile_graph(gm, xs, spec, precision=precision)
            cache[key] = kernel_ms(compiled, xs, repeat)
        out[(path, choice)] = cache[key]
    return out
