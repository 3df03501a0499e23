"""Compute precision of a compiled module: float32 (default) or float16 with float32 accumulation.

precision="float16" runs TVM's Relax `ToMixedPrecision(out_dtype="float32")` on the lowered module before
scheduling: convolutions and matrix products take float16 operands and accumulate in float32 (on CUDA,
dlight's tensor-core matmul rule applies to them where every non-batch extent exceeds 64), the elementwise
ops between them run in float16, and the module's inputs and outputs keep their float32 signature.

Contract: approximate. Inputs and weights are rounded to float16 (11-bit significand, relative error 2^-11
per value, range ±65504; values under 6e-8 flush to zero), so outputs typically differ from float32 by
1e-3 relative on well-scaled networks (ResNet-18, BERT: measured ~1e-3), and by more where activations
leave float16's range (a random-init network whose activations shrink below 6e-8 loses them entirely).
Integer and int8 (quantized) tensors are untouched. It pays where the hardware has fast float16 (CUDA
tensor cores; ARMv8.2 FP16); on x86 CPUs without AVX-512 FP16 it is correct but not faster.

precision="winograd" (x86 and aarch64 targets) keeps float32 everywhere and computes 3x3 stride-1 convolutions with
Winograd's F(4x4, 3x3) / F(2x2, 3x3) algorithm (winograd.py: 2.25-4x fewer multiplications). Contract:
approximate, outputs within ~1e-5 of the largest output magnitude per convolution (the direct kernel:
~3e-7); inf and NaN inputs give exactly PyTorch's non-finite outputs. The report lists the convolutions taken.

precision="high" (PyTorch's `set_float32_matmul_precision("high")`: float32 matrix products may use bfloat16
parts) keeps float32 everywhere except int4 weight-only GEMVs (1-2 rows, groups of 16k inputs) on x86 CPUs with
AVX512-BF16: those take each input as two bfloat16 (|x - hi - lo| <= 2^-16·|x|) against exact int4 weights,
with vdpbf16ps (woq4_bf16.py; the weights' quantization error is ~10^3 times larger). Elsewhere it is float32.
"""
from __future__ import annotations

from collections import Counter

from ...errors import GraphoptError

__all__ = ["PRECISIONS", "check_precision", "check_target", "apply_precision"]

PRECISIONS = ("float32", "float16", "winograd", "high")


def check_precision(precision: str) -> str:
    """The canonical name of `precision` ("fp16" -> "float16"); GraphoptError for anything else."""
    name = {"fp32": "float32", "fp16": "float16", "half": "float16",
            "float32-winograd": "winograd", "float32-high": "high"}.get(str(precision), str(precision))
    if name not in PRECISIONS:
        raise GraphoptError(f"precision={precision!r} is not supported: use one of {', '.join(PRECISIONS)} "
                            f"(float16 computes with float32 accumulation; winograd: float32 with Winograd 3x3 "
                            f"convolutions on CPUs; high: int4 weight-only GEMVs with bfloat16 input parts on "
                            f"AVX512-BF16 CPUs; int8 is the quantize pass)")
    return name


def apply_precision(mod, precision: str, report=None, spec=None):
    """`mod` (a lowered Relax IRModule) computing in `precision` for `spec` (a TargetSpec; needed for
    "winograd"); records it in report.backend."""
    precision = check_precision(precision)
    if precision == "float32":
        return mod
    if precision == "high":     # taken at lowering (quant_lower's int4 GEMVs); the report counts those kernels
        if report is not None:
            report.backend["precision"] = "high (int4 weight-only GEMVs: bfloat16 input parts where AVX512-BF16)"
        return mod
    if precision == "winograd":
        return _winograd(mod, spec, report)
    from tvm import relax

    mod = relax.transform.ToMixedPrecision(out_dtype="float32")(_clip_bounds_as_tensors(mod))
    if report is not None:
        report.backend["precision"] = "float16 (float32 accumulation; float32 inputs and outputs)"
    return mod


def _clip_bounds_as_tensors(mod):
    """R.clip(x, lo, hi) with scalar (PrimValue) bounds -> R.minimum(R.maximum(x, lo), hi) with tensor constants.

    ToMixedPrecision types every call argument as a tensor and fails on clip's PrimValue bounds (ReLU6 in
    MobileNetV2: "Expected TensorType, but got T.float64"). TVM legalizes clip to the same max/min pair, so
    the values (NaN included) are unchanged."""
    from tvm import relax
    from tvm.relax.dpl import is_op, rewrite_call, wildcard

    pattern = is_op("relax.clip")(wildcard(), wildcard(), wildcard())

    def rewrite(call, _matches):
        x, lo, hi = call.args
        dtype = getattr(getattr(x, "ty", None), "dtype", None)
        bounds = [_scalar(b) for b in (lo, hi)]
        if dtype is None or any(b is None for b in bounds):
            return call
        lo_c, hi_c = (relax.const(b, dtype) for b in bounds)
        return relax.op.minimum(relax.op.maximum(x, lo_c), hi_c)

    import tvm

    funcs = {gvar: rewrite_call(pattern, rewrite, func) if isinstance(func, relax.Function) else func
             for gvar, func in mod.functions.items()}
    return tvm.IRModule(funcs, attrs=mod.attrs)


def _scalar(bound):
    """The Python number of a clip bound (a FloatImm/IntImm, or a PrimValue holding one); None otherwise."""
    value = getattr(bound, "value", None)
    if isinstance(value, (int, float)):
        return value
    value = getattr(value, "value", None)
    return value if isinstance(value, (int, float)) else None


def check_target(precision: str, spec) -> None:
    """GraphoptError unless `precision` applies to `spec` (a TargetSpec, or None): "winograd" needs a CPU target."""
    if precision == "winograd" and (spec is None or spec.kind != "llvm" or spec.arch not in ("x86_64", "aarch64")):
        where = "no target" if spec is None else f"'{spec.alias}'"
        raise GraphoptError(f"precision='winograd' applies to CPU targets (x86, arm), not {where}")


def _winograd(mod, spec, report):
    """The module with its eligible 3x3 convolutions in Winograd form (winograd.py), in NHWC layout."""
    import tvm

    from .schedules import nhwc_layout_passes
    from .winograd import winograd_convolutions

    check_target("winograd", spec)
    target = spec.tvm_target()
    with target:
        # the layout passes first (winograd takes NHWC convolutions); they run again, as no-ops, at scheduling
        mod = tvm.transform.Sequential(nhwc_layout_passes() + [winograd_convolutions()])(mod)
    taken = str(mod.attrs["graphopt.winograd"]) if mod.attrs and "graphopt.winograd" in mod.attrs else ""
    if report is not None:
        counts = Counter(taken.split(", ")) if taken else {}
        listed = ", ".join(f"{n}x {what}" if n > 1 else what for what, n in counts.items())
        report.backend["precision"] = (f"winograd (float32; {sum(counts.values())} 3x3 convolution(s) as Winograd "
                                       f"F(m x m, 3 x 3){': ' + listed if listed else ''})")
    return mod
