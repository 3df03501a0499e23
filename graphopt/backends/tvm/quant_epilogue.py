"""What graphopt's int8 kernels do with their int32 accumulators: the epilogue, as one TIR expression per lane.

Every int8 GEMM/conv kernel of quant_lower.py ends the same way for each output element:

    y = float32(acc - C[c]) * S[c] + B[c]                 (dequantize: zero-point term, scale, bias)

An Epilogue says what happens next, in the same kernel, before anything is written to memory:

  dtype float32   y is stored (the last layer, or a layer whose consumer is a float op)
  dtype uint8/int8
                  the float ops the graph applies between this layer and the next quantize (ReLU, ReLU6,
                  clamp: `acts`, each max(y, lo) and/or min(y, hi)), then that quantize,
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
the float32 tensor through memory (and a kernel launch) is gone.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Epilogue", "FLOAT"]


@dataclass(frozen=True)
class Epilogue:
    dtype: str = "float32"                                  # float32 | uint8 | int8
    acts: tuple = ()                                        # ((lo | None, hi | None), ...) applied in order
    inv_scale: float = 1.0                                  # float32(1 / scale) of the quantize
    zp: int = 0
    qmin: int = 0
    qmax: int = 255
    shift: int = 0                                          # added to the clamped code (dtype conversion)

    @property
    def requantizes(self) -> bool:
        return self.dtype != "float32"

    def float_value(self, acc, c, s, b, r=None):
        """TIR: the float32 value before the quantize: dequantized accumulator, + residual `r` (a float32 load,
        or None), then the activations."""
        from tvm import tirx
        from tvm.script import tirx as T

        y = T.Cast("float32", acc - c) * s + b
        if r is not None:
            y = y + r
        f32 = lambda v: tirx.const(float(v), "float32")       # noqa: E731
        for lo, hi in self.acts:
            if lo is not None:
                y = T.max(y, f32(lo))
            if hi is not None:
                y = T.min(y, f32(hi))
        return y

    def value(self, acc, c, s, b, r=None):
        """TIR: the stored value for int32 accumulator `acc`, per-channel C/S/B loads `c`, `s`, `b` and the
        residual load `r` (None: no residual add)."""
        y = self.float_value(acc, c, s, b, r)
        if not self.requantizes:
            return y
        return self.codes(y)

    def codes(self, y):
        """TIR: the quantize of float32 value `y` (activations already applied), as stored."""
        from tvm import tirx
        from tvm.script import tirx as T

        f32 = lambda v: tirx.const(float(v), "float32")       # noqa: E731
        q = T.round(y * f32(self.inv_scale)) + f32(self.zp)
        q = T.min(T.max(q, f32(self.qmin)), f32(self.qmax))
        q = T.Cast("int32", q)
        if self.shift:
            q = q + T.int32(self.shift)
        return T.Cast(self.dtype, q)


FLOAT = Epilogue()
