"""The quantized operators, as PyTorch custom ops (``torch.ops.graphopt.*``).

Each op runs in plain PyTorch with exactly the integer semantics of graphopt.quant.qparams, and stays one
node through ``torch.export`` (custom ops are not decomposed), so the TVM backend maps each one to integer
Relax code (graphopt.backends.tvm.quant_lower). Integer products are accumulated in float64, which is exact
for every |sum| < 2**53 (int8 x int8 sums stay far below 2**31 for any realistic reduction length; the ops
check it), so the PyTorch result equals an int32 accumulation bit for bit.

  quantize(x, scale, zero_point, qmin, qmax)              float32 -> uint8 (qmin >= 0) or int8
  qlinear(xq, wq, out_scale, bias, x_zp)                  int8/uint8 x int8 -> int32 -> float32
  qconv2d(xq, wq, out_scale, bias, x_zp, stride, padding, dilation, groups)
  qmatmul(aq, bq, a_zp, out_scale)                        two activations: uint8/int8 x int8 -> float32
  dynamic_qlinear(x, wq, w_scale, bias)                   uint8 activation qparams chosen per call
  woq_linear(x, wq, w_scale, bias)                        int8 weights, float32 compute

Epilogue of the integer ops: ``y = float32(acc) * out_scale[c] + bias[c]`` in float32, where
``out_scale[c] = float32(x_scale * w_scale[c])``; ``acc = sum (xq - x_zp) * wq`` is the exact integer sum.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["inv_scale_of", "quantize", "qlinear", "qconv2d", "qmatmul", "dynamic_qlinear", "woq_linear",
           "dynamic_act_qparams", "OP_NAMES"]

_EXACT = float(2 ** 31)


def _check_acc(acc: torch.Tensor, where: str) -> None:
    if acc.numel() and acc.abs().max().item() >= _EXACT:
        raise OverflowError(f"{where}: integer accumulator exceeds int32 (reduction too long for int8)")


def inv_scale_of(scale: float) -> float:
    """The float32 multiplier every backend uses to quantize with `scale`: float32(1 / scale)."""
    return float(np.float32(1.0 / scale))


@torch.library.custom_op("graphopt::quantize", mutates_args=())
def quantize(x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int) -> torch.Tensor:
    """q = clamp(round(x * float32(1/scale)) + zero_point, qmin, qmax); uint8 if qmin >= 0 else int8."""
    dtype = torch.uint8 if qmin >= 0 else torch.int8
    q = torch.round(x.float() * torch.tensor(inv_scale_of(scale), dtype=torch.float32)) + zero_point
    return torch.clamp(q, qmin, qmax).to(dtype)


@quantize.register_fake
def _(x, scale, zero_point, qmin, qmax):
    return torch.empty_like(x, dtype=torch.uint8 if qmin >= 0 else torch.int8)


def fake_quantize(x: torch.Tensor, qp) -> torch.Tensor:
    """x rounded to the grid of activation qparams `qp` (quantize, then (q - zero_point) * scale), float32:
    what an integer kernel reading quantize(x) multiplies."""
    q = quantize(x, qp.scale, qp.zero_point, qp.qmin, qp.qmax)
    return (q.float() - qp.zero_point) * qp.scale


def _epilogue(acc: torch.Tensor, out_scale: torch.Tensor, bias: Optional[torch.Tensor], channel_dim: int):
    shape = [1] * acc.dim()
    shape[channel_dim] = -1
    y = acc.float() * out_scale.float().reshape(shape)
    if bias is not None:
        y = y + bias.float().reshape(shape)
    return y


@torch.library.custom_op("graphopt::qlinear", mutates_args=())
def qlinear(xq: torch.Tensor, wq: torch.Tensor, out_scale: torch.Tensor, bias: Optional[torch.Tensor],
            x_zp: int) -> torch.Tensor:
    """y[..., n] = float32(sum_k (xq[..., k] - x_zp) * wq[n, k]) * out_scale[n] + bias[n]."""
    acc = torch.matmul(xq.double() - x_zp, wq.double().t())
    _check_acc(acc, "graphopt.qlinear")
    return _epilogue(acc, out_scale, bias, acc.dim() - 1)


@qlinear.register_fake
def _(xq, wq, out_scale, bias, x_zp):
    return xq.new_empty((*xq.shape[:-1], wq.shape[0]), dtype=torch.float32)


@torch.library.custom_op("graphopt::qconv2d", mutates_args=())
def qconv2d(xq: torch.Tensor, wq: torch.Tensor, out_scale: torch.Tensor, bias: Optional[torch.Tensor],
            x_zp: int, stride: list[int], padding: list[int], dilation: list[int], groups: int) -> torch.Tensor:
    """Integer conv2d (NCHW, OIHW); padding is padding with the zero point (i.e. with real zeros)."""
    acc = F.conv2d(xq.double() - x_zp, wq.double(), None, stride, padding, dilation, groups)
    _check_acc(acc, "graphopt.qconv2d")
    return _epilogue(acc, out_scale, bias, 1)


@qconv2d.register_fake
def _(xq, wq, out_scale, bias, x_zp, stride, padding, dilation, groups):
    n, _, h, w = xq.shape
    kh, kw = wq.shape[2], wq.shape[3]
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return xq.new_empty((n, wq.shape[0], oh, ow), dtype=torch.float32)


def dynamic_act_qparams(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-call uint8 qparams of `x` in float32 arithmetic: (scale, inv_scale, zero_point) as 0-d tensors.

    lo = min(min x, 0), hi = max(max x, 0); scale = (hi - lo) / 255 (1 when hi == lo);
    inv_scale = 1 / scale; zero_point = clamp(round(-lo * inv_scale), 0, 255).
    """
    x = x.float()
    lo = torch.clamp(x.min(), max=0.0)
    hi = torch.clamp(x.max(), min=0.0)
    scale = (hi - lo) / torch.tensor(255.0)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    inv = torch.tensor(1.0) / scale
    zp = torch.clamp(torch.round(-lo * inv), 0.0, 255.0)
    return scale, inv, zp


@torch.library.custom_op("graphopt::qmatmul", mutates_args=())
def qmatmul(aq: torch.Tensor, bq: torch.Tensor, a_zp: int, out_scale: float) -> torch.Tensor:
    """Matmul of two quantized activations: y = float32(Σ_k (aq[..., m, k] - a_zp) · bq[..., k, n]) · out_scale.

    `bq` is symmetric int8 (zero point 0); `out_scale = float32(a_scale · b_scale)`. Batch dims broadcast.
    """
    acc = torch.matmul(aq.double() - a_zp, bq.double())
    _check_acc(acc, "graphopt.qmatmul")
    return acc.float() * torch.tensor(out_scale, dtype=torch.float32)


@qmatmul.register_fake
def _(aq, bq, a_zp, out_scale):
    batch = torch.broadcast_shapes(aq.shape[:-2], bq.shape[:-2])
    return aq.new_empty((*batch, aq.shape[-2], bq.shape[-1]), dtype=torch.float32)


@torch.library.custom_op("graphopt::dynamic_qlinear", mutates_args=())
def dynamic_qlinear(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                    bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Linear with uint8 activations quantized per call (dynamic_act_qparams) and int8 per-channel weights.

    y = float32(sum (xq - zp) * wq) * float32(scale * w_scale[n]) + bias[n].
    """
    scale, inv, zp = dynamic_act_qparams(x)
    xq = torch.clamp(torch.round(x.float() * inv) + zp, 0.0, 255.0)
    acc = torch.matmul(xq.double() - zp.double(), wq.double().t())
    _check_acc(acc, "graphopt.dynamic_qlinear")
    return _epilogue(acc, scale * w_scale.float(), bias, acc.dim() - 1)


@dynamic_qlinear.register_fake
def _(x, wq, w_scale, bias):
    return x.new_empty((*x.shape[:-1], wq.shape[0]), dtype=torch.float32)


@torch.library.custom_op("graphopt::woq_linear", mutates_args=())
def woq_linear(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
               bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Weight-only int8: y = x @ (float32(wq) * w_scale[:, None]).T + bias, float32 compute."""
    w = wq.float() * w_scale.float().reshape(-1, 1)
    return F.linear(x.float(), w, None if bias is None else bias.float())


@woq_linear.register_fake
def _(x, wq, w_scale, bias):
    return x.new_empty((*x.shape[:-1], wq.shape[0]), dtype=torch.float32)


# the names these ops have in a torch.export graph (OpOverload.__name__), for the TVM converter map
OP_NAMES = {"quantize": "quantize.default", "qlinear": "qlinear.default", "qconv2d": "qconv2d.default", "qmatmul": "qmatmul.default",
            "dynamic_qlinear": "dynamic_qlinear.default", "woq_linear": "woq_linear.default"}
