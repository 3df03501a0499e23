"""What graphopt's int8 kernels do with their int32 accumulators: the epilogue, as one TIR expression per lane.

Every int8 GEMM/conv kernel of quant_lower.py ends the same way for each output element:

    y = float32(acc - C[c]) * S[c] + B[c]                 (dequantize: zero-point term, scale, bias)

An Epilogue says what happens next, in the same kernel, before anything is written to memory:

  dtype float32   y is stored (the last layer, or a layer whose consumer is a float op)
  dtype uint8/int8
                  the float ops the graph applies between this layer and the next quantize (ReLU, ReLU6,
                  clamp: `acts`, each max(y, lo) and/or min(y, hi); GELU, exact or tanh: `gelu` below, the
                  fast_erf / fast_tanh polynomial the unfused kernel runs), then that quantize,
                  q = clamp(round(y * inv_scale) + zp, qmin, qmax), stored as the next int8 kernel reads it
                  (`shift` added: +128 turns int8 codes into the uint8 ones of the x86 kernels, -128 uint8
                  codes into the int8 ones of sdot).

A residual block adds a float32 tensor first (quant_fuse: ResNet's add(conv, identity), MobileNetV2's
inverted-residual sum): `r`, read by the kernel from the NHWC residual buffer, is added to y before the
activations, y = (y + r), as the graph's add evaluates it; float_value is that y after the activations
(stored as float32 too where other ops read the sum).

The expression is exactly the one the unfused graph evaluates (graphopt.quant.ops: relu / clamp, then
quantize's round(x * float32(1/scale)) + zero_point and clamp) in float32, op by op in the same order, so a
fused kernel's codes equal the unfused kernel-then-elementwise pair's bit for bit; only the round trip of
the float32 tensor through memory (and a kernel launch) is gone. One rewrite keeps the values, not the op
order: without a residual, ReLU / ReLU6 / clamp fold into the codes' clamp (merged_bounds: quantize is
monotone), two vector operations fewer per output vector.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Epilogue", "FLOAT", "gelu"]


@dataclass(frozen=True)
class Epilogue:
    dtype: str = "float32"                                  # float32 | uint8 | int8
    acts: tuple = ()                                        # ((lo | None, hi | None) | ("gelu", approximate), ...)
    inv_scale: float = 1.0                                  # float32(1 / scale) of the quantize
    zp: int = 0
    qmin: int = 0
    qmax: int = 255
    shift: int = 0                                          # added to the clamped code (dtype conversion)

    @property
    def requantizes(self) -> bool:
        return self.dtype != "float32"

    def float_value(self, acc, c, s, b, r=None, float_acc: bool = False):
        """TIR: the float32 value before the quantize: dequantized accumulator (`float_acc`: a float32 one, see
        dequantized), + residual `r` (a float32 load, or None), then the activations."""
        from tvm import tirx
        from tvm.script import tirx as T

        y = dequantized(acc, c, float_acc) * s + b
        if r is not None:
            y = y + r
        f32 = lambda v: tirx.const(float(v), "float32")       # noqa: E731
        for act in self.acts:
            if act[0] == "gelu":
                y = gelu(y, act[1])
                continue
            lo, hi = act
            if lo is not None:
                y = T.max(y, f32(lo))
            if hi is not None:
                y = T.min(y, f32(hi))
        return y

    def value(self, acc, c, s, b, r=None, float_acc: bool = False):
        """TIR: the stored value for int32 accumulator `acc` (`float_acc`: float32, see dequantized), per-channel
        C/S/B loads `c`, `s`, `b` and the residual load `r` (None: no residual add)."""
        bounds = self.merged_bounds() if self.requantizes and r is None else None
        if bounds is not None:
            return self.codes(dequantized(acc, c, float_acc) * s + b, bounds)
        y = self.float_value(acc, c, s, b, r, float_acc)
        if not self.requantizes:
            return y
        return self.codes(y)

    def merged_bounds(self) -> tuple[float, float] | None:
        """(lo, hi) of one clamp of the codes that does the activation clamps' work too, or None.

        The quantize q(y) = round(y * inv_scale) + zp is monotone non-decreasing in y (inv_scale > 0; float32
        multiplication and round-half-even are monotone), and for a monotone q, q(clamp(y, a, b)) = clamp(q(y),
        q(a), q(b)): ReLU / ReLU6 / clamp before a quantize fold into the codes' own clamp to [qmin, qmax],
        two vector operations fewer per vector (the int8 epilogue runs once per output vector, and with a
        small reduction, MobileNetV2's 1x1 convs of 16-32 input channels, it is much of the kernel).
        Bit for bit the same codes: q(a), q(b) are computed here in float32 as the kernel would (numpy's
        float32 multiply and rint). Only for clamps (not GELU), and without a residual: the dequantized
        accumulator is then always finite, while a residual may carry a NaN, which max / min treat apart
        from a clamp of the codes. None also where the clamps' ranges do not overlap."""
        import numpy as np

        if not self.acts or any(a[0] == "gelu" for a in self.acts):
            return None
        lo, hi = -np.inf, np.inf
        for a, b in self.acts:
            lo = lo if a is None else max(lo, float(np.float32(a)))
            hi = hi if b is None else min(hi, float(np.float32(b)))
        if lo > hi:
            return None
        inv, zp = np.float32(self.inv_scale), np.float32(self.zp)
        if not inv > 0:
            return None

        def q(v):
            return float(np.rint(np.float32(v) * inv) + zp)

        qlo = max(float(self.qmin), q(lo)) if lo > -np.inf else float(self.qmin)
        qhi = min(float(self.qmax), q(hi)) if hi < np.inf else float(self.qmax)
        return (qlo, qhi) if qlo <= qhi else None

    def codes(self, y, bounds: tuple[float, float] | None = None):
        """TIR: the quantize of float32 value `y` (activations already applied, or folded into `bounds`: see
        merged_bounds), as stored."""
        from tvm import tirx
        from tvm.script import tirx as T

        f32 = lambda v: tirx.const(float(v), "float32")       # noqa: E731
        qmin, qmax = bounds if bounds is not None else (self.qmin, self.qmax)
        q = T.round(y * f32(self.inv_scale)) + f32(self.zp)
        q = T.min(T.max(q, f32(qmin)), f32(qmax))
        q = T.Cast("int32", q)
        if self.shift:
            q = q + T.int32(self.shift)
        return T.Cast(self.dtype, q)


FLOAT = Epilogue()


def dequantized(acc, c, float_acc: bool = False):
    """TIR: float32(acc - c) for an int32 accumulator; with `float_acc`, a float32 one holding an exact integer (a
    kernel that sums its integer products in float32: exact below 2^24), acc - float32(c): the same value while
    |acc - c| < 2^24 (the caller's bound), so the epilogue's bits do not depend on the accumulator's type."""
    from tvm.script import tirx as T

    if float_acc:
        return acc - T.Cast("float32", c)
    return T.Cast("float32", acc - c)


def _fast_math(name: str, x):
    """TIR: TVM's fast_erf / fast_tanh polynomial (topi, what FastMathTransform puts in the unfused kernel) of the
    float32 expression `x`, bound once. A stage's value (fast_tanh: the clamp of its input, then the polynomial)
    is bound once too: inlined, the clamp was repeated at each of its 18 uses and a fused int8 GEMM with a tanh
    GELU epilogue took seconds to compile (same operations either way, so the same bits)."""
    import tvm_ffi
    from tvm import s_tir, te, tirx, topi
    from tvm.ir.expr import TensorLoad

    p = te.placeholder((1,), "float32", name="x")
    sch = s_tir.Schedule(te.create_prim_func([p, getattr(topi, name)(p)]))
    stores = []
    tvm_ffi.structural_map(sch.mod["main"].body, [(tirx.BufferStore, lambda n: (stores.append(n), n)[1])])
    names = [getattr(st.buffer, "name", None) for st in stores]
    if not stores or None in names or len(set(names)) != len(names) or "x" in names:
        raise RuntimeError(f"topi.{name}: stores {names}, expected one named expression per stage")
    v = tirx.Var(name + "_in", "float32")
    load = type(tirx.BufferLoad(tirx.decl_buffer((1,), "float32"), [0]))
    stage_var = {}                                  # buffer written by a stage -> the Var bound to its value

    def read(n):                                    # a load of a stage's buffer, or of the input
        buf = getattr(n, "buffer", None) or getattr(n, "source", None)
        return stage_var.get(getattr(buf, "name", None), v)

    lets = []
    for i, st in enumerate(stores):
        value = tvm_ffi.structural_map(st.value, [(TensorLoad, read), (load, read)])
        var = tirx.Var(f"{name}_{i}", "float32")
        stage_var[st.buffer.name] = var
        lets.append((var, value))
    expr = lets[-1][1]
    for var, value in reversed(lets[:-1]):
        expr = tirx.Let(var, value, expr)
    return tirx.Let(v, x, expr)


def gelu(y, approximate: str = "none"):
    """TIR: GELU of float32 `y` as the unfused graph computes it (schedules.rewrite_elementwise's spelling,
    then FastMathTransform's polynomial): y * (0.5 + 0.5 * fast_erf(y * float32(1/sqrt(2)))), or with
    approximate="tanh" y * (0.5 + 0.5 * fast_tanh(sqrt(2/pi) * (y + 0.044715 * y*y*y))), op by op in float32."""
    import math

    from tvm import tirx

    f32 = lambda v: tirx.const(float(v), "float32")       # noqa: E731
    x = tirx.Var("gelu_in", "float32")
    if approximate == "tanh":
        cube = x * x * x
        t = _fast_math("fast_tanh", f32(math.sqrt(2.0 / math.pi)) * (x + f32(0.044715) * cube))
    else:
        t = _fast_math("fast_erf", x * f32(1.0 / math.sqrt(2.0)))
    return tirx.Let(x, y, x * (f32(0.5) + f32(0.5) * t))
