"""Mixed precision: one quantization choice per layer, and the graph that runs a given assignment.

Choices (CHOICES), and what each stores and runs:
  float32           the float layer, unchanged                                   4 B / weight
  int8_static       QuantLinear / QuantConv2d / QuantMatmul: input quantized per tensor with calibrated qparams
                    (uint8 or int8 for the target), int8 per-channel weights, int32 accumulation   1 B / weight
  int8_dynamic      DynamicQuantLinear: input quantized per call from its own range          1 B / weight
  int8_weight_only  WeightOnlyLinear: int8 per-channel weights, float32 input and compute    1 B / weight
  int4_weight_only  PackedWeightOnlyLinear: int4 weights (two per byte), group-wise scale + zero point, float32
                    input and compute                                                       1/2 B / weight
  int4_dynamic      W4A8Linear (graphopt.quant.w4a8): int4_weight_only's weights, input quantized per call to
                    int8 per row and group, integer dot products                            1/2 B / weight
                    (offered when group_size is a multiple of 8, or per channel)
  float16           HalfLinear (graphopt.quant.half): float16 weights, input and arithmetic  2 B / weight
                    (Linear, only on targets with fast float16 arithmetic: aarch64 CPUs with FP16)
(plus each choice's scales, zero points and bias, counted in its bytes).

What a target can run (supported_choices): Conv2d and activation x activation matmuls have float32 and
int8_static kernels. Linear has all six on LLVM CPU targets (x86, arm: the weight-only kernels of
graphopt.backends.tvm.weight_only dequantize inside the GEMM loop) and on "torch" (the reference); on CUDA the
weight-only Linear is lowered by plain TVM ops that rebuild a float32 weight (no packed kernel: neither smaller
in memory nor faster), so it is not offered there.

MixedBuilder calibrates once (static observers over the calibration batches) and then builds the graph of any
assignment {layer path: choice} cheaply: the static layers through graphopt.quant.graph.Converter, the
dynamic / weight-only ones swapped in afterwards (their modules are made once per layer and cached).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import fx, nn

from ..analysis.call_sites import paths_by_module
from ..analysis.flops import model_size_bytes
from . import graph as qgraph
from .modules import DynamicQuantLinear, FloatMatmul, WeightOnlyLinear

__all__ = ["CHOICES", "ALL_CHOICES", "FLOAT16", "SHORT", "supported_choices", "MixedBuilder", "dequantized_weight"]

CHOICES = ("float32", "int8_static", "int8_dynamic", "int8_weight_only", "int4_weight_only", "int4_dynamic")
FLOAT16 = "float16"                    # offered only where the target has fast float16 (supported_choices)
ALL_CHOICES = CHOICES + (FLOAT16,)
SHORT = {"float32": "fp32", "int8_static": "int8-static", "int8_dynamic": "int8-dyn",
         "int8_weight_only": "int8-woq", "int4_weight_only": "int4-woq", "int4_dynamic": "int4-dyn",
         "float16": "fp16"}
_ALIASES = {**{v: k for k, v in SHORT.items()}, "static": "int8_static", "dynamic": "int8_dynamic",
            "weight_only": "int8_weight_only", "woq8": "int8_weight_only", "woq4": "int4_weight_only",
            "w4a8": "int4_dynamic",
            "fp32": "float32", "float": "float32", "half": "float16"}


def canonical_choice(name: str) -> str:
    """The CHOICES name of `name` (also accepts the short names and static/dynamic/weight_only/woq8/woq4)."""
    if name in ALL_CHOICES:
        return name
    if name in _ALIASES:
        return _ALIASES[name]
    raise ValueError(f"unknown precision choice {name!r}: choose from {', '.join(ALL_CHOICES)}")


def supported_choices(target: str, kind: str) -> list[str]:
    """The choices a layer of `kind` (linear, conv2d, matmul) has kernels for on `target` (module docstring)."""
    if kind in ("conv2d", "matmul"):
        return ["float32", "int8_static"]
    from .half import has_fast_float16

    base = target.split(":", 1)[0]
    if base in ("cuda", "gpu", "nvidia"):
        return ["float32", "int8_static", "int8_dynamic"]
    return list(CHOICES) + ([FLOAT16] if has_fast_float16(target) else [])


def dequantized_weight(mod: nn.Module) -> Optional[torch.Tensor]:
    """The float32 weight a quantized (or float) layer module computes with; None for weightless layers."""
    if isinstance(mod, (nn.Linear, nn.Conv2d)):
        return mod.weight.detach().float()
    if hasattr(mod, "dequantized_weight"):
        return mod.dequantized_weight().float()
    if isinstance(mod, (DynamicQuantLinear, WeightOnlyLinear)):
        return mod.weight_q.float() * mod.w_scale.reshape(-1, 1)
    return None


class MixedBuilder:
    """Calibrated once; builds the fx graph of any per-layer assignment of CHOICES.

    `layers` are the quantizable layer paths (in graph order), `kinds[path]` their kind, `choices[path]` the
    choices offered for each (supported on the target, within `allowed`).
    """

    def __init__(self, gm: fx.GraphModule, batches: Sequence[tuple], *, target: str, dtype: str,
                 observer: str = "minmax", percentile: float = 99.99, kinds=("linear", "conv2d", "matmul"),
                 skip: Sequence[str] = (), weight_qmax: int = 127, group_size: Optional[int] = 128,
                 allowed: Sequence[str] = ALL_CHOICES, progress: bool = False, weight_rounding: str = "nearest",
                 bias_correction: bool = True):
        from .w4a8 import group_problem
        from .weight_only import check_options

        if group_size is not None:
            check_options(4, group_size)
        self.group_size = group_size
        self.calibration_batch = tuple(batches[0])
        self.prepared, self.survey = qgraph.prepare(gm, dtype=dtype, observer=observer, percentile=percentile,
                                                    kinds=kinds, skip=skip)
        if self.survey.sites:
            qgraph.calibrate(self.prepared, batches, progress=progress, desc="quantize(mixed): calibrating")
        self.conv = qgraph.Converter(self.prepared, weight_qmax=weight_qmax)
        self.weight_qmax = weight_qmax
        self.dtype = dtype
        self.layers: list[str] = list(self.conv.layer_paths)
        self.kinds: dict[str, str] = {}
        self.choices: dict[str, list[str]] = {}
        allowed = [canonical_choice(c) for c in allowed]
        for path in self.layers:
            mod = self.prepared.get_submodule(path)
            kind = ("linear" if isinstance(mod, nn.Linear) else "conv2d" if isinstance(mod, nn.Conv2d)
                    else "matmul" if isinstance(mod, FloatMatmul) else type(mod).__name__)
            self.kinds[path] = kind
            self.choices[path] = [c for c in supported_choices(target, kind) if (c in allowed or c == "float32")
                                  and (c != "int4_dynamic" or not group_problem(group_size, mod.in_features))]
        # a layer called at several places is one module with a path per call (graph._unshare): its calls take
        # one choice together (one layer, one precision; a float32 call keeps the float weights for all), and
        # its float32 bytes count once
        self.units: list[list[str]] = paths_by_module(self.prepared, self.layers)
        self._cache: dict[tuple[str, str], nn.Module] = {}
        self.float_gm = self.conv.build([])
        # GPTQ rounding (graphopt.quant.gptq's policy, as in the uniform quantize pass; calibration is always
        # given here): one set of input statistics per layer serves the int8 static and the int4 choices
        from .gptq import input_hessians, round_static_layers, uses_gptq
        from .qparams import REDUCED_WEIGHT_QMAX

        self._hessians: dict = {}
        rounded_static = uses_gptq(weight_rounding, seven_bit=weight_qmax == REDUCED_WEIGHT_QMAX)
        self.rounded_int4 = uses_gptq(weight_rounding, int4=True)
        if self.layers and (rounded_static or (self.rounded_int4 and any(
                c in ("int4_weight_only", "int4_dynamic") for cs in self.choices.values() for c in cs))):
            mods = {p: self.float_gm.get_submodule(p) for p in self.layers}
            acc = input_hessians(self.float_gm, mods, batches)
            self._hessians = {p: acc[m] for p, m in mods.items() if m in acc}
            if rounded_static:
                round_static_layers(self.conv, self.layers, batches, weight_qmax, self._hessians)
        if bias_correction:
            # the int8 static choices' biases take the calibration mean of their error (graphopt.quant.
            # bias_correction), before any sensitivity or size is measured from them
            from .bias_correction import correct_biases

            correct_biases(self.conv, [p for p in self.layers if "int8_static" in self.choices[p]], batches)

    # ------------------------------------------------------------------------------------------ modules
    def _int4_rounded(self, path: str, weight: torch.Tensor):
        """(q, scales, zeros) of an int4 choice rounded by GPTQ, or None (nearest)."""
        a = self._hessians.get(path) if self.rounded_int4 else None
        if a is None or not a.enough():
            return None
        from .gptq import gptq_round_groups

        k = weight.shape[1]
        group = None if self.group_size is None or self.group_size >= k else self.group_size
        return gptq_round_groups(weight.detach(), a.hessian(), 4, group)

    def input_qparams(self, path: str) -> list:
        """The calibrated qparams of layer `path`'s inputs (one per argument; prepare gave each call its own path)."""
        return self.conv.input_qparams(path)

    def module(self, path: str, choice: str) -> nn.Module:
        """The module layer `path` runs under `choice` (cached)."""
        key = (path, choice)
        if key in self._cache:
            return self._cache[key]
        float_mod = self.prepared.get_submodule(path)
        if choice == "float32":
            mod = float_mod
        elif choice == "int8_static":
            mod = self.conv.quant_module(path, self.input_qparams(path))
        elif choice == "int8_dynamic":
            mod = DynamicQuantLinear(float_mod.weight, float_mod.bias, weight_qmax=self.weight_qmax)
        elif choice == "int8_weight_only":
            mod = WeightOnlyLinear(float_mod.weight, float_mod.bias)
        elif choice == "int4_weight_only":
            from .weight_only import PackedWeightOnlyLinear

            mod = PackedWeightOnlyLinear(float_mod.weight, float_mod.bias, 4, self.group_size,
                                         rounded=self._int4_rounded(path, float_mod.weight))
        elif choice == "int4_dynamic":
            from .w4a8 import W4A8Linear

            mod = W4A8Linear(float_mod.weight, float_mod.bias, self.group_size,
                             rounded=self._int4_rounded(path, float_mod.weight))
        elif choice == "float16":
            from .half import HalfLinear

            mod = HalfLinear(float_mod.weight, float_mod.bias)
        else:
            raise ValueError(f"unknown choice {choice!r} for layer '{path}'")
        self._cache[key] = mod
        return mod

    def layer_bytes(self, path: str, choice: str) -> int:
        """Stored bytes of layer `path` under `choice` (weights, scales, zero points, bias)."""
        return model_size_bytes(self.module(path, choice))

    def fixed_bytes(self) -> int:
        """Bytes of everything that is not a quantizable layer (embeddings, norms, the layers left float)."""
        return model_size_bytes(self.float_gm) - sum(self.layer_bytes(u[0], "float32") for u in self.units)

    def unit_bytes(self, unit: list[str], choice: str) -> int:
        """Stored bytes of a layer called at the paths `unit` (one of self.units) under `choice`: its float32
        weights once, or a quantized module per call."""
        if choice == "float32":
            return self.layer_bytes(unit[0], choice)
        return sum(self.layer_bytes(p, choice) for p in unit)

    # ------------------------------------------------------------------------------------------- graphs
    def build(self, assignment: dict[str, str]) -> fx.GraphModule:
        """The graph with each layer of `assignment` at its choice (layers not named stay float32)."""
        unknown = set(assignment) - set(self.layers)
        if unknown:
            raise KeyError(f"not a quantizable layer: {', '.join(sorted(unknown))}")
        for path, choice in assignment.items():
            if choice not in self.choices[path]:
                raise ValueError(f"layer '{path}' ({self.kinds[path]}) cannot take {choice!r}; its choices: "
                                 f"{', '.join(self.choices[path])}")
        gm = self.conv.build([p for p, c in assignment.items() if c == "int8_static"])
        swapped = False
        for path, choice in assignment.items():
            if choice in ("int8_dynamic", "int8_weight_only", "int4_weight_only", "int4_dynamic", "float16"):
                qgraph._set_module(gm, path, self.module(path, choice))
                swapped = True
        if swapped:
            gm.recompile()
        return gm

    # --------------------------------------------------------------------------- activation perturbation
    def quantize_input(self, path: str, choice: str, i: int, x: torch.Tensor) -> Optional[torch.Tensor]:
        """What input `i` of layer `path` becomes under `choice` (fake-quantized, float), or None when the
        choice keeps that input float32 (float32, weight-only)."""
        x = x.detach().float()
        if choice == "int8_static":
            from .ops import fake_quantize

            return fake_quantize(x, self.input_qparams(path)[i])
        if choice == "int8_dynamic":
            from .ops import dynamic_act_qparams

            scale, inv, zp = dynamic_act_qparams(x)
            q = torch.clamp(torch.round(x * inv) + zp, 0.0, 255.0)
            return (q - zp) * scale
        if choice == "int4_dynamic":
            from .w4a8 import group_of, quantize_rows

            k = x.shape[-1]
            g = group_of(self.group_size or 0, k)
            a, s_a = quantize_rows(x.reshape(-1, k), g)
            xa = (a.float() * s_a.unsqueeze(2)).reshape(a.shape[0], -1)[:, :k]
            return xa.reshape(x.shape)
        if choice == "float16":
            return x.to(torch.float16).float()
        return None


def rel_error_sq(got, ref) -> float:
    """||got - ref||² / ||ref||² over all output tensors (float64)."""
    from ..analysis.compare import flatten_outputs

    num = den = 0.0
    for a, b in zip(flatten_outputs(got), flatten_outputs(ref)):
        a, b = a.detach().double(), b.detach().double()
        num += float(((a - b) ** 2).sum())
        den += float((b ** 2).sum())
    return num / max(den, 1e-300)


def mean_error(gm: nn.Module, batches: Sequence[tuple], refs: Sequence) -> float:
    """Root mean (over batches) squared relative L2 error of `gm`'s outputs vs `refs` (the tolerance metric)."""
    with torch.no_grad():
        return math.sqrt(sum(rel_error_sq(gm(*b), r) for b, r in zip(batches, refs)) / max(len(batches), 1))
