"""quantize: turn float Linear / Conv2d layers into int8 ones (static, dynamic, weight-only, or from QAT)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

import torch
from torch import fx, nn

from ..analysis.call_sites import run_with_site_hooks
from ..analysis.compare import flatten_outputs
from ..errors import CalibrationError, PassError
from ..pipeline import Context, Pass, PassResult, register_pass
from ..quant import graph as qgraph
from ..quant.modules import FakeQuantize, QuantConv2d, QuantLinear, QuantMatmul, WeightOnlyLinear
from ..quant.qparams import REDUCED_WEIGHT_QMAX, WEIGHT_QMAX

__all__ = ["Quantize", "activation_dtype_for", "int8_path_for", "int8_path_note"]


# int8 kernel paths on which activation x activation matmuls stay float32 under ops="auto" (Quantize docstring)
FLOAT_MATMUL_PATHS = ("avx2",)


def activation_dtype_for(target: str) -> str:
    """Activation dtype that suits a target's int8 dot-product instructions.

    x86 (VNNI vpdpbusd, AVX2/AVX-512BW vpmaddubsw) multiply uint8 by int8: asymmetric uint8 activations.
    ARM (sdot) and CUDA (dp4a) multiply int8 by int8: symmetric int8. The torch reference uses uint8.
    """
    kind = target.split(":", 1)[0]
    return "int8" if kind in ("arm", "cuda") else "uint8"


def int8_path_for(target: str) -> str:
    """The int8 kernel path the TVM backend takes for `target` (graphopt.backends.tvm.quant_lower.PATHS:
    'vnni', 'avx512bw', 'avx2', 'cpu', 'relax'); 'relax' for "torch" and when TVM is not installed."""
    if target.split(":", 1)[0] in ("torch", "cuda", "gpu", "nvidia"):
        return "relax"
    try:
        import json

        from ..backends.targets import resolve_target
        from ..backends.tvm.quant_lower import int8_path

        return int8_path(resolve_target(json.loads(target) if target.startswith("{") else target))
    except Exception:                                     # TVM missing or odd target: the portable path
        return "relax"


def int8_path_note(target: str, path: str) -> str:
    """A sentence naming the int8 kernel path for `target` ('' for the torch reference)."""
    if target == "torch":
        return ""
    from ..backends.tvm.quant_lower import describe_path

    arch = "aarch64" if target.split(":", 1)[0] in ("arm", "aarch64", "arm64") else "x86_64"
    return describe_path(path, target, arch)


def _rel_l2(got, ref) -> float:
    """||got - ref|| / ||ref|| over all output tensors (float64)."""
    num = den = 0.0
    for a, b in zip(flatten_outputs(got), flatten_outputs(ref)):
        a, b = a.detach().double(), b.detach().double()
        num += float(((a - b) ** 2).sum())
        den += float((b ** 2).sum())
    return math.sqrt(num / max(den, 1e-300))


@register_pass("quantize")
@dataclass
class Quantize(Pass):
    """Quantize Linear, Conv2d and activation x activation matmuls to int8 (integer kernels; everything
    else stays float32). Layers written as a matmul against a constant weight count as Linear: torch.addmm
    with an (in, out) weight (transformers' Conv1D: GPT-2), x @ W [+ b], F.linear(x, W.t()); the weight is
    transposed once at compile time so its output channels are per-channel rows (graphopt.quant.const_matmul).

    Modes:
      static       observers + calibration (ctx.calibration, required), then per-tensor activation
                   quantization: a `torch.ops.graphopt.quantize` node per observed tensor feeding
                   QuantLinear / QuantConv2d modules (int8 x uint8/int8 -> int32 accumulate -> float32
                   epilogue with per-channel scale and bias) and QuantMatmul modules (matmul of two
                   activations, e.g. attention scores and context: left uint8/int8, right symmetric int8).
                   `ops` picks the kinds (linear, conv2d, matmul); "auto" (the default) takes all
                   three, except activation matmuls on the int8 path 'avx2' (AVX2 without AVX-512: no int8
                   instruction there multiplies faster than float32 FMAs), which stay float32 and so run as
                   graphopt's fused attention kernel: the small encoder's int8 build on an AVX2 EPYC 9-17%
                   faster (1 x 16 to 32 x 128, saved builds timed interleaved) with a cosine to float32 as high
                   or higher. Other paths (vnni, avx512bw, sdot, the generic 'cpu' one) quantize them: not
                   measured against the fused float kernel. Observers: minmax, moving_average, percentile,
                   mse, entropy.
      dynamic      Linear only: activations quantized (uint8) per call from that call's range. No data.
                   bits=4 (W4A8; Linear, and pointwise Conv2d with pointwise_convs=true): the weights of
                   weight_only bits=4 (asymmetric int4, groups of `group_size`,
                   default 128, -1: per channel; group sizes a multiple of 8) with activations quantized per
                   call to symmetric int8 per row and per group of the same inputs; each group's dot product
                   runs on integer instructions (graphopt.quant.w4a8, graphopt.backends.tvm.w4a8), for CPUs
                   where weight-only int4's float multiply-adds, not memory, bound the speed. Approximates the
                   weights as weight_only bits=4 does and each activation to half a step of its group's
                   amax/127 (the details give w_err; the pass's measured output error covers both).
      weight_only  Linear (and with pointwise_convs=true the 1x1 Conv2d with groups 1 and no padding, run
                   as a Linear over channels: quant.modules.PointwiseConvAsLinear; other convs stay float32):
                   int8 or int4 weights, float32 activations and compute. No data. pointwise_convs is off by
                   default: it makes a CNN's weights 4-6x smaller but, measured, mostly slower than its float32
                   convs (MobileNetV2 224x224, benchmarks/bench_weight_only.py, x86 paths: weight-only int8 / int4
                   0.61-0.95x float32; W4A8 1.02x in the latest runs, 0.55-1.05x in earlier ones), since those
                   GEMMs are built for Linears' shapes, not a conv's many pixels x few channels.
                   bits=8 (default): symmetric int8, per output channel, or per group of `group_size`
                   inputs; bits=4: two weights per byte, asymmetric per group (scale + integer zero point,
                   zero exact), group_size default 128 (-1: per output channel). On LLVM CPU targets the
                   kernels dequantize inside the GEMM loop (graphopt.backends.tvm.weight_only), so a layer
                   reads 1 or 1/2 byte per weight instead of 4. Approximates each weight by its group's
                   grid: |error| <= scale/2 (255 levels int8, 16 levels int4); the details list each layer's
                   weight rel. L2 error (w_err).
      bits=mixed   mixed precision (graphopt/passes/_mixed.py): each layer gets one of float32, int8 static,
                   int8 dynamic, int8 weight-only, int4 weight-only, int4 W4A8 (int4_dynamic: group sizes a
                   multiple of 8), and float16 on aarch64 CPUs with FP16
                   arithmetic (graphopt.quant.half; never x86) (those the target has kernels for:
                   graphopt.quant.mixed.supported_choices; `choices` narrows them; Conv2d and matmul: float32 or
                   static), chosen exactly by an integer program (scipy.optimize.milp) under `budget`:
                   size:0.25 (fraction of the float32 model's bytes) or size:3MB, error:0.02 (output rel. L2
                   error on the calibration batches), latency:0.6 or latency:1.5ms (summed per-layer kernel time,
                   compiled and profiled on the target; graphopt.backends.tvm.layer_latency); several at once as
                   a list. `objective` (auto: size under an error budget, else error) is what it minimises.
                   Sensitivity (`sensitivity`): "output" (default) measures the output error of each layer
                   quantized alone, each way; "hessian" is HAWQ-V2/V3's Hutchinson Hessian-trace estimate times
                   the choice's squared perturbation ||Q(W)-W||² (and ||Q(a)-a||² for quantized activations).
                   "output" is the default because it measures exactly the quantity the error budget bounds
                   and sees everything a choice does (calibrated activation ranges, clipping, int4 groups) at
                   the cost of one forward per layer and choice; "hessian" is a second-order, isotropic estimate
                   that costs a few double-backward passes whatever the number of choices (use it on large
                   models). Errors combine in squares (independent per-layer noise); with an error budget the
                   result is measured, and the predicted-error limit searched (scaled, then bisected) for the
                   smallest model whose measured error holds. Needs calibration
                   data. The details give each layer's choice, bytes, sensitivity, the alternatives and why.
    A graph prepared for QAT (graphopt.quant.prepare_qat, fine-tuned) is converted with its learned ranges
    whatever the mode; no calibration data is needed then.

    Weights are per output channel, symmetric int8 [-127, 127], except on the x86 int8 paths 'avx2' and
    'avx512bw' (CPUs without VNNI; the path comes from ctx.target, see int8_path_for): their kernels sum
    u8·s8 byte pairs in int16 (vpmaddubsw), which saturates above 32,767 (2·255·127 = 64,770), so the
    weights of Linear (static and dynamic) and Conv2d with groups=1 are quantized to [-64, 64]
    (2·255·64 = 32,640, ORT's reduce_range): the QDQ graph run in PyTorch stays the exact reference of the
    compiled kernel. Measured on the AVX2 path (benchmarks/bench_quantize.py --full-range-weights, x86:haswell
    kernels) against full-range weights through the exact pair split: int8/fp32 speed 2.4x vs 1.1x
    (ResNet-18), 2.9x vs 1.7x (MobileNetV2), 2.0x vs 1.1x (encoder), 1.7x vs 1.1x (digits CNN), the same
    for the memory-bound batch-1 MLP; cosine vs float32 0.99968 vs 0.99989 (ResNet-18), 0.99935 vs
    0.99979 (MobileNetV2), 0.99984 vs 0.99991 (MLP); top-1 agreement 100% and digits accuracy unchanged
    either way. 7-bit activations (the other standard
    answer) were not measured: the activation range is per tensor, so halving its levels costs more than
    halving per-channel weight levels. Depthwise and grouped convs (other kernels) keep [-127, 127], as do
    the vnni and ARM sdot paths (no intermediate int16). `reduce_range` overrides the choice: true gives
    those layers [-64, 64] on any target, false keeps [-127, 127] (on avx2/avx512bw the kernels then take
    the exact split for them: correct, slower). Where the weights are 7-bit (static mode), they are rounded
    by GPTQ by default (`weight_rounding="auto"`; graphopt.quant.gptq): each rounding error compensated by
    the channel's remaining weights through the layer's input statistics on the calibration batches (up to
    8,192 input rows per layer; layers seen in fewer than 32 rows, depthwise / grouped convs and sparsify's
    layers round to nearest). Same grid, same kernels, same speed; output error of timm MobileNetV3-L 0.346
    -> 0.131 (8-bit nearest: 0.109), ResNet-50 0.047 -> 0.006, BERT-base 0.031 -> 0.019, for 2-40 s more in
    the pass (figures in graphopt.quant.gptq). "nearest" turns it off, "gptq" uses it for 8-bit weights
    too (there it did not help reliably). int4 weight-only and W4A8 layers (and grouped int8 weight-only
    with "gptq") take it as well when calibration data is given, on quantize_groups' grid (MobileNetV2 with
    pointwise_convs=true, int4 g128: output error 0.223 -> 0.165); bits=mixed builds its int8 static and
    int4 choices the same way. A QAT graph keeps the weight range it was trained with (127).
    activation="auto" picks uint8 (x86, torch) or symmetric int8 (arm, cuda) to suit the target's int8
    dot-product instruction.

    Keeps exactly: every op that is not a quantized layer, graph inputs/outputs (always float32).
    Approximates: each quantized layer's input (rounding to 256 levels of its calibrated range, clipping
    outside it) and weights (rounding to 255 levels per channel, 129 with [-64, 64]); the error is measured
    by the pass manager and per layer in the report details (out_err: relative L2 error of the layer's
    output vs float).
    Static mode (and bits=mixed's int8 static choices) bias-corrects by default (`bias_correction=true`;
    graphopt.quant.bias_correction): each quantized Linear / Conv2d's float bias absorbs the calibration mean
    of its own output error per channel (its input from the float graph, quantized as the layer quantizes
    it), the constant shift that global pooling and later layers do not average away. Integers, scales and
    activation qparams are unchanged, so is the speed; compiled cosine vs float32 on 4 other random inputs
    (32 calibration inputs): MobileNetV2 0.999778 -> 0.999953 (vnni) and 0.999578 -> 0.999940 (avx2, 7-bit
    weights), ResNet-18 0.999890 -> 0.999984 (vnni; its avx2 build, GPTQ-rounded, was 0.999984 already).
    Static mode keeps squeeze-and-excitation layers float (`se_blocks="float"`, the default; "int8" quantizes
    them too): the two small layers of an SE gate (found by structure: graphopt.quant.se_block) run on the pooled
    per-channel vector, so int8 saves no time there, and per-tensor quantization of that vector costs more
    accuracy than any other layer kind (timm MobileNetV3-L: 0.012 of output cosine; NNCF skips them too).
    Layers whose name or module path matches a `skip` pattern (fnmatch) stay float. With `tolerance`, the
    layers whose lone quantization hurts the output most are kept float until the relative L2 error of
    the model outputs on the calibration batches is <= tolerance.
    """

    exact = False
    mode: Literal["static", "dynamic", "weight_only"] = "static"
    bits: Union[int, str] = 8
    group_size: Optional[int] = None
    activation: Literal["auto", "uint8", "int8"] = "auto"
    observer: Literal["minmax", "moving_average", "percentile", "mse", "entropy"] = "minmax"
    percentile: float = 99.99
    skip: list[str] = field(default_factory=list)
    tolerance: Optional[float] = None
    ops: Union[list[str], str] = "auto"
    calib_batches: int = 32
    eval_batches: int = 4
    progress: bool = True
    reduce_range: Optional[bool] = None
    budget: list[str] = field(default_factory=list)
    objective: Literal["auto", "size", "error", "latency"] = "auto"
    sensitivity: Literal["output", "hessian"] = "output"
    hutchinson_samples: int = 8
    choices: list[str] = field(default_factory=list)
    se_blocks: Literal["float", "int8"] = "float"
    pointwise_convs: bool = False
    weight_rounding: Literal["auto", "nearest", "gptq"] = "auto"
    bias_correction: bool = True

    def __post_init__(self):
        if self.bits == "mixed":
            self._check_mixed()
            return
        if self.budget or self.choices:
            raise ValueError(f"budget / choices need bits=mixed, got bits={self.bits!r}")
        if self.bits not in (8, 4):
            raise ValueError(f"bits={self.bits}: choose 8, 4 (mode=weight_only or mode=dynamic), or mixed")
        if self.bits == 4 and self.mode == "static":
            raise ValueError("bits=4 needs mode=weight_only (int4 weights, float activations) or mode=dynamic "
                             "(int4 weights, int8 activations per call), got mode=static")
        if self.group_size is not None:
            if self.mode != "weight_only" and not (self.mode == "dynamic" and self.bits == 4):
                raise ValueError(f"group_size={self.group_size} needs mode=weight_only or mode=dynamic with bits=4 "
                                 f"(static and dynamic int8 weights are per output channel)")
            if self.group_size != -1:
                from ..quant.weight_only import check_options

                check_options(self.bits, self.group_size)
                if self.mode == "dynamic" and self.group_size % 8:
                    raise ValueError(f"group_size={self.group_size}: W4A8 (mode=dynamic, bits=4) groups must be a "
                                     f"multiple of 8")
        if isinstance(self.ops, str) and self.ops != "auto":
            raise ValueError(f"ops={self.ops!r}: 'auto' or a list of linear, conv2d, matmul")
        bad = [] if self.ops == "auto" else [o for o in self.ops if o not in ("linear", "conv2d", "matmul")]
        if bad:
            raise ValueError(f"ops {bad} not supported: choose from linear, conv2d, matmul")
        if self.tolerance is not None and not self.tolerance > 0:
            raise ValueError(f"tolerance must be > 0, got {self.tolerance}")
        if self.calib_batches < 1 or self.eval_batches < 1:
            raise ValueError("calib_batches and eval_batches must be >= 1")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile}")
        if self.pointwise_convs and not (self.mode == "weight_only" or self.bits == 4):
            raise ValueError("pointwise_convs=true needs mode=weight_only or mode=dynamic with bits=4 (static mode "
                             "quantizes every conv already; dynamic int8 covers Linears only)")
        if self.weight_rounding not in ("auto", "nearest", "gptq"):
            raise ValueError(f"weight_rounding={self.weight_rounding!r}: choose 'auto' (GPTQ for 7-bit static "
                             f"weights, and for int4 ones given calibration data), 'nearest' or 'gptq'")
        if self.se_blocks not in ("float", "int8"):
            raise ValueError(f"se_blocks={self.se_blocks!r}: choose 'float' (keep squeeze-and-excitation layers "
                             f"float32) or 'int8'")

    def _check_mixed(self) -> None:
        from ..quant.allocate import parse_budgets
        from ..quant.mixed import canonical_choice
        from ..quant.weight_only import check_options

        parse_budgets(self.budget)                       # BudgetError naming a malformed budget
        for c in self.choices:
            canonical_choice(c)
        if self.mode != "static":
            raise ValueError(f"bits=mixed chooses the mode per layer: leave mode at its default, got {self.mode}")
        if self.group_size not in (None, -1):
            check_options(4, self.group_size)
        if self.hutchinson_samples < 1 or self.calib_batches < 1 or self.eval_batches < 1:
            raise ValueError("hutchinson_samples, calib_batches and eval_batches must be >= 1")

    # ------------------------------------------------------------------------------------------ run
    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        notes: list[str] = []
        path = int8_path_for(ctx.target)
        note = int8_path_note(ctx.target, path)
        if note:
            notes.append(note)
        qmax = self._qmax(path)
        if any(isinstance(m, FakeQuantize) for m in gm.modules()):
            return self._convert_qat(gm, ctx, notes)
        if self.bits == "mixed":
            from ._mixed import run_mixed

            return run_mixed(self, gm, ctx, notes, qmax)
        if self.mode in ("dynamic", "weight_only"):
            return self._swap(gm, ctx, notes, qmax)
        return self._static(gm, ctx, notes, qmax, path)

    def kinds(self, path: Optional[str]) -> list[str]:
        """The layer kinds to quantize on int8 kernel path `path` (`ops`; "auto": see the class docstring;
        path None: every kind "auto" may take)."""
        if self.ops != "auto":
            return list(self.ops)
        return ["linear", "conv2d"] + ([] if path in FLOAT_MATMUL_PATHS else ["matmul"])

    def _qmax(self, path: str) -> int:
        """The int8 weight bound of Linear / Conv2d (groups=1) for int8 kernel path `path`."""
        reduce = self.reduce_range if self.reduce_range is not None else path in ("avx2", "avx512bw")
        return REDUCED_WEIGHT_QMAX if reduce else WEIGHT_QMAX

    def _dtype(self, ctx: Context) -> str:
        return activation_dtype_for(ctx.target) if self.activation == "auto" else self.activation

    def _survey_notes(self, survey, notes: list[str]) -> None:
        for path, why in survey.skipped:
            notes.append(f"kept '{path}' in float32: {why}")
        if not survey.sites:
            notes.append("no quantizable Linear/Conv2d layer found: graph unchanged")

    def _group(self) -> Optional[int]:
        """Weight-only group size: None = per output channel."""
        if self.group_size == -1:
            return None
        return 128 if self.group_size is None and self.bits == 4 else self.group_size

    def _layer_factory(self, group: Optional[int], rounded_for=None):
        """linear -> its weight-only or W4A8 module, or None for dynamic int8 (swap_linear's own module).
        `rounded_for(linear)`: the packed layer's (q, scales, zeros) chosen by GPTQ, or None (nearest)."""
        rounded = rounded_for or (lambda lin: None)
        if self.mode == "dynamic" and self.bits == 4:
            from ..quant.w4a8 import W4A8Linear

            return lambda lin: W4A8Linear(lin.weight, lin.bias, group, rounded=rounded(lin))
        if self.mode != "weight_only":
            return None
        if self.bits == 4 or group is not None:
            from ..quant.weight_only import PackedWeightOnlyLinear

            return lambda lin: PackedWeightOnlyLinear(lin.weight, lin.bias, self.bits, group, rounded=rounded(lin))
        return lambda lin: WeightOnlyLinear(lin.weight, lin.bias)

    def _packed_gptq(self, ctx: Context) -> bool:
        """Whether weight_only / W4A8 layers (the packed, group-wise ones) take GPTQ rounding: always with
        weight_rounding=gptq, and by default (auto) for int4 weights when calibration data is given."""
        from ..quant.gptq import uses_gptq

        if not (self.bits == 4 or (self.mode == "weight_only" and self._group() is not None)):
            return False
        return uses_gptq(self.weight_rounding, int4=self.bits == 4, calibrated=ctx.calibration is not None)

    def _packed_rounding(self, gm: fx.GraphModule, ctx: Context, group: Optional[int], done: list):
        """rounded_for(linear) for _layer_factory: GPTQ on quantize_groups' grid from each Linear's (and, with
        pointwise_convs, each 1x1 conv's) inputs over the calibration batches, found by its weight's values
        (swap_linear's modules hold the same weights, a pointwise conv's as a copy); layers seen in fewer than
        MIN_ROWS rows, or whose calls are functional, round to nearest. Appends to `done` each layer it
        rounds."""
        from ..quant.gptq import gptq_round_groups, input_hessians, supports
        from ..quant.modules import is_pointwise_conv

        batches = ctx.calibration_batches(self.calib_batches, needed_by="quantize (weight_rounding=gptq)")
        layers = {name: m for name, m in gm.named_modules() if supports(m) and (
            type(m) is nn.Linear or (self.pointwise_convs and is_pointwise_conv(m)))}
        acc = {m.weight.data_ptr(): a for m, a in input_hessians(gm, layers, batches).items()}

        def find(w: torch.Tensor):
            for a in acc.values():
                v = a.module.weight.detach()
                if v.shape[0] == w.shape[0] and v[0].numel() == w.shape[1] and torch.equal(v.reshape(w.shape), w):
                    return a
            return None

        def rounded_for(lin):
            k = lin.weight.shape[1]
            a = acc.get(lin.weight.data_ptr()) or find(lin.weight.detach())
            if a is None or not a.enough():
                return None
            done.append(lin)
            return gptq_round_groups(lin.weight.detach().reshape(lin.weight.shape[0], k), a.hessian(), self.bits,
                                     None if group is None or group >= k else group)
        return rounded_for

    def _swap(self, gm: fx.GraphModule, ctx: Context, notes: list[str], qmax: int) -> PassResult:
        from ..quant.mixed import dequantized_weight

        group = self._group()
        gptq_done: list = []
        rounded_for = self._packed_rounding(gm, ctx, group, gptq_done) if self._packed_gptq(ctx) else None
        build = self._layer_factory(group, rounded_for)
        w_err: dict[int, float] = {}

        def make(lin):
            mod = build(lin)
            w = lin.weight.detach().double()
            deq = dequantized_weight(mod).double()
            w_err[id(mod)] = float((deq - w).norm() / w.norm().clamp_min(1e-300))
            return mod

        new, survey = qgraph.swap_linear(gm, self.mode, skip=self.skip, weight_qmax=qmax,
                                         make=make if build is not None else None,
                                         pointwise_convs=self.pointwise_convs)
        self._survey_notes(survey, notes)
        per_call = "int8 per call, per row and group" if self.bits == 4 else "uint8 per call"
        details = [{"layer": s.path, "kind": s.kind, "mode": self.mode,
                    "input": per_call if self.mode == "dynamic" else "float32"} for s in survey.sites]
        if build is not None:
            for row in details:
                mod = new.get_submodule(row["layer"])
                mod = getattr(mod, "linear", mod)                # a pointwise conv's Linear-like module
                row.update(bits=self.bits, group=getattr(mod, "group_size", None) or "channel",
                           w_err=w_err.get(id(mod), float("nan")))
            what = "W4A8: int4 weights, int8 activations per call" if self.mode == "dynamic" else \
                f"weight-only int{self.bits}"
            notes.append(f"{what}, {'per output channel' if group is None else f'groups of {group} inputs'}")
        if self.tolerance is not None:
            notes.append("tolerance is only applied in static mode")
        if rounded_for is not None:
            notes.append(f"weights of {len(gptq_done)} of {len(survey.sites)} layer(s) rounded by GPTQ (input "
                         f"statistics of the calibration batches; the others to nearest)")
        elif self.weight_rounding == "gptq":
            notes.append("weight_rounding=gptq applies to static int8 and to packed weight-only / W4A8 layers "
                         "(int4, or grouped int8): these layers round to nearest")
        return PassResult(new, changed=bool(survey.sites), notes=notes, details=details)

    def _convert_qat(self, gm: fx.GraphModule, ctx: Context, notes: list[str]) -> PassResult:
        conv = qgraph.Converter(gm)
        new = conv.build()
        notes.append(f"converted a QAT graph: {len(conv.layer_paths)} layer(s) with their learned ranges")
        return PassResult(new, notes=notes, details=self._details(new, conv.layer_paths, "qat"))

    def _static(self, gm: fx.GraphModule, ctx: Context, notes: list[str], qmax: int, path: str) -> PassResult:
        batches = ctx.calibration_batches(self.calib_batches, needed_by="quantize (mode=static)")
        dtype = self._dtype(ctx)
        kinds = self.kinds(path)
        if self.ops == "auto" and "matmul" not in kinds:
            notes.append(f"activation x activation matmuls (attention) stay float32 on int8 path '{path}' (no int8 "
                         f"instruction faster than float32 FMAs there; ops=[linear,conv2d,matmul] quantizes them)")
        prepared, survey = qgraph.prepare(gm, dtype=dtype, observer=self.observer, percentile=self.percentile,
                                          kinds=kinds, skip=self.skip)
        self._survey_notes(survey, notes)
        if not survey.sites:
            return PassResult(gm, changed=False, notes=notes)
        from ..quant.gptq import accumulators, collecting, round_static_layers, uses_gptq

        gptq = uses_gptq(self.weight_rounding, seven_bit=qmax == REDUCED_WEIGHT_QMAX)
        # GPTQ's input statistics from the calibration's own forward passes (the layers' inputs there are the
        # float graph's: observers pass their input through)
        hessians = accumulators({s.path: prepared.get_submodule(s.path) for s in survey.sites},
                                len(batches)) if gptq else {}
        try:
            qgraph.calibrate(prepared, batches, progress=self.progress,
                             first_pass=collecting(hessians) if gptq else None)
        except Exception as e:
            raise CalibrationError(f"running the calibration batches failed: {type(e).__name__}: {e}") from e
        conv = qgraph.Converter(prepared, weight_qmax=qmax)
        layers = list(conv.layer_paths)
        if self.se_blocks == "float":
            from ..quant.se_block import squeeze_excitation_layers

            se = set(squeeze_excitation_layers(prepared, survey.sites))
            if se:
                layers = [p for p in layers if p not in se]
                notes.append(f"kept {len(se)} squeeze-and-excitation layer(s) in float32 (se_blocks=float): "
                             f"{', '.join(sorted(se)[:4])}{', ...' if len(se) > 4 else ''}")
        candidates = list(layers)
        if gptq:
            rounded = round_static_layers(conv, candidates, batches, qmax, hessians)
            notes.append(f"weights of {rounded} of {len(candidates)} layer(s) rounded by GPTQ (input statistics of "
                         f"{len(batches)} calibration batch(es); the others to nearest)")
        if self.bias_correction:
            from ..quant.bias_correction import correct_biases

            shifts = correct_biases(conv, candidates, batches)
            done = {p: v for p, v in shifts.items() if v == v}
            if done:
                notes.append(f"bias correction: {len(done)} layer(s) took the calibration mean of their "
                             f"quantization error out of their bias (largest shift {max(done.values()):.3g} of "
                             f"the output's RMS)")
            skipped = sorted(set(shifts) - set(done))
            if skipped:
                notes.append(f"bias correction skipped {len(skipped)} layer(s) whose calibration outputs are not "
                             f"finite: {', '.join(skipped[:4])}{', ...' if len(skipped) > 4 else ''}")
        sensitivity: dict[str, float] = {}
        if self.tolerance is not None:
            layers, sensitivity, err = self._fit_tolerance(gm, conv, batches[:self.eval_batches], candidates)
            kept = [p for p in candidates if p not in layers]
            notes.append(f"tolerance {self.tolerance:g}: kept {len(kept)} of {len(candidates)} layer(s) "
                         f"in float32 ({', '.join(kept) or 'none'}); output rel. L2 error "
                         f"{err:.3g} on {min(len(batches), self.eval_batches)} calibration batch(es)")
        new = conv.build(layers)
        details = self._details(new, layers, f"static/{self.observer}", conv.build([]), batches[0], sensitivity)
        notes.append(f"calibrated on {len(batches)} batch(es); activations {dtype}, weights int8 per-channel "
                     f"in [-{qmax}, {qmax}]")
        return PassResult(new, notes=notes, details=details)

    def _fit_tolerance(self, float_gm: fx.GraphModule, conv: "qgraph.Converter", batches: list[tuple],
                       candidates: list[str]):
        """Quantize as many of `candidates` as keeps the output error <= tolerance, dropping the most sensitive
        first."""
        with torch.no_grad():
            refs = [float_gm(*b) for b in batches]

        def error(layers) -> float:
            g = conv.build(layers)
            with torch.no_grad():
                return math.sqrt(sum(_rel_l2(g(*b), r) ** 2 for b, r in zip(batches, refs)) / len(batches))

        all_layers = list(candidates)
        err_all = error(all_layers)
        sensitivity = {p: error([p]) for p in all_layers}
        if err_all <= self.tolerance:
            return all_layers, sensitivity, err_all
        order = sorted(all_layers, key=lambda p: sensitivity[p], reverse=True)
        # smallest k such that quantizing all but the k most sensitive layers meets the tolerance (bisection;
        # the error is close to monotone in k). k = n (nothing quantized) always meets it: error 0.
        lo, hi = 1, len(order)
        best_layers, best_err = [], 0.0
        while lo <= hi:
            k = (lo + hi) // 2
            layers = order[k:]
            err = error(layers)
            if err <= self.tolerance:
                best_layers, best_err = layers, err
                hi = k - 1
            else:
                lo = k + 1
        keep = set(best_layers)
        return [p for p in all_layers if p in keep], sensitivity, best_err

    def _details(self, qgm: fx.GraphModule, layers, mode: str, float_gm: fx.GraphModule | None = None,
                 batch: tuple | None = None, sensitivity: dict | None = None) -> list[dict]:
        out_err: dict[str, float] = {}
        if float_gm is not None and batch is not None and layers:
            out_err = _layer_errors(float_gm, qgm, layers, batch)
        rows = []
        for path in layers:
            mod = qgm.get_submodule(path)
            if not isinstance(mod, (QuantLinear, QuantConv2d, QuantMatmul)):
                raise PassError(self.name, f"layer '{path}' was not quantized (got {type(mod).__name__})")
            kind = next(v for k, v in ((QuantLinear, "linear"), (QuantConv2d, "conv2d"), (QuantMatmul, "matmul"))
                        if isinstance(mod, k))
            qp = mod.x_qparams
            row = {"layer": path, "kind": kind, "mode": mode, "input": qp.dtype, "scale": qp.scale,
                   "zp": qp.zero_point}
            if out_err:
                row["out_err"] = out_err.get(path, float("nan"))
            if sensitivity:
                row["sensitivity"] = sensitivity.get(path, float("nan"))
            rows.append(row)
        return rows


def _layer_errors(float_gm: fx.GraphModule, qgm: fx.GraphModule, layers, batch: tuple) -> dict[str, float]:
    """Relative L2 error of each quantized layer's output vs the float graph's, on one batch."""
    def capture(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
        seen: dict[str, torch.Tensor] = {}
        # per call site: a layer called twice has a path per call (graph._unshare), one float module
        post = {path: (lambda m, a, o, path=path: seen.__setitem__(path, o.detach())) for path in layers}
        with torch.no_grad():
            run_with_site_hooks(gm, tuple(batch), post=post)
        return seen

    ref, got = capture(float_gm), capture(qgm)
    return {p: _rel_l2(got[p], ref[p]) for p in layers if p in ref and p in got}
