"""Quantized layers as nn.Modules: what the quantized FX graph is made of.

Static int8 (input already quantized by a ``graphopt.quantize`` node in the graph):
  QuantLinear, QuantConv2d     int8 weight (per output channel), int32 accumulate, float32 epilogue
  QuantMatmul                  two quantized activations (uint8/int8 x symmetric int8), e.g. attention
Dynamic / weight-only (float input):
  DynamicQuantLinear           activation qparams chosen per call (uint8), int8 weights
  WeightOnlyLinear             int8 weights, float32 compute
QAT (float, trainable; fake-quantized forward with straight-through gradients):
  FakeQuantize                 per-tensor activation fake-quant with a moving-average range
  QATLinear, QATConv2d         per-channel symmetric weight fake-quant

Integer weights are registered as parameters with requires_grad=False, so parameter counts stay
meaningful and model sizes count them at one byte each.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .observers import MovingAverageObserver, Observer
from .qparams import WEIGHT_QMAX, QParams, f32, quantize_weight, weight_qparams

__all__ = ["QuantLinear", "QuantConv2d", "QuantMatmul", "FloatMatmul", "DynamicQuantLinear", "WeightOnlyLinear", "FakeQuantize",
           "QATLinear", "QATConv2d", "QUANT_MODULES", "conv_padding", "is_pointwise_conv", "linear_of_pointwise",
           "PointwiseConvAsLinear"]


def _out_numel(node) -> int:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return int(math.prod(shape)) if shape is not None else 0


def _int_param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


def _bias_buffer(module: nn.Module, bias: torch.Tensor | None) -> None:
    module.register_buffer("bias", None if bias is None else bias.detach().float().clone())


def _out_scale(x_scale: float, w_scale: torch.Tensor) -> torch.Tensor:
    return (w_scale.double() * x_scale).float()


def conv_padding(conv: nn.Conv2d) -> tuple[int, int] | None:
    """Explicit (pad_h, pad_w) of a Conv2d with zero padding, or None when it has none expressible."""
    if conv.padding_mode != "zeros":
        return None
    p = conv.padding
    if p == "valid":
        return (0, 0)
    if p == "same":
        if any(s != 1 for s in conv.stride):
            return None
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        if any(t % 2 for t in total):
            return None            # asymmetric 'same' padding
        return (total[0] // 2, total[1] // 2)
    return (int(p[0]), int(p[1]))


class QuantLinear(nn.Module):
    """y = float32(Σ_k (xq - x_zp)·Wq[n,k]) · (x_scale·w_scale[n]) + b[n]; input xq is uint8/int8."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, x_qparams: QParams,
                 w_scale: torch.Tensor | None = None, weight_qmax: int = WEIGHT_QMAX):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        w_scale = weight_qparams(weight, weight_qmax) if w_scale is None else w_scale.detach().float()
        self.weight_q = _int_param(quantize_weight(weight, w_scale, weight_qmax))
        self.register_buffer("w_scale", w_scale.clone())
        self.register_buffer("out_scale", _out_scale(x_qparams.scale, w_scale))
        _bias_buffer(self, bias)
        self.x_scale, self.x_zp, self.x_dtype = x_qparams.scale, x_qparams.zero_point, x_qparams.dtype

    @property
    def x_qparams(self) -> QParams:
        return QParams(self.x_scale, self.x_zp, self.x_dtype)

    def forward(self, xq: torch.Tensor) -> torch.Tensor:
        return ops.qlinear(xq, self.weight_q, self.out_scale, self.bias, self.x_zp)

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_q.float() * self.w_scale.reshape(-1, 1)

    def flops(self, node) -> int:
        return 2 * _out_numel(node) * self.in_features

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"input={self.x_dtype}(scale={self.x_scale:.4g}, zp={self.x_zp}), weight=int8 per-channel")


class QuantConv2d(nn.Module):
    """Integer Conv2d (NCHW): uint8/int8 input with zero point, int8 per-output-channel weight, float out."""

    def __init__(self, conv: nn.Conv2d, x_qparams: QParams, w_scale: torch.Tensor | None = None,
                 weight: torch.Tensor | None = None, weight_qmax: int = WEIGHT_QMAX):
        super().__init__()
        padding = conv_padding(conv)
        if padding is None:
            raise ValueError(f"conv padding {conv.padding!r} ({conv.padding_mode}) cannot be quantized")
        weight = conv.weight if weight is None else weight
        w_scale = weight_qparams(weight, weight_qmax) if w_scale is None else w_scale.detach().float()
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size = tuple(conv.kernel_size)
        self.stride, self.padding = list(conv.stride), list(padding)
        self.dilation, self.groups = list(conv.dilation), conv.groups
        self.weight_q = _int_param(quantize_weight(weight, w_scale, weight_qmax))
        self.register_buffer("w_scale", w_scale.clone())
        self.register_buffer("out_scale", _out_scale(x_qparams.scale, w_scale))
        _bias_buffer(self, conv.bias)
        self.x_scale, self.x_zp, self.x_dtype = x_qparams.scale, x_qparams.zero_point, x_qparams.dtype

    @property
    def x_qparams(self) -> QParams:
        return QParams(self.x_scale, self.x_zp, self.x_dtype)

    def forward(self, xq: torch.Tensor) -> torch.Tensor:
        return ops.qconv2d(xq, self.weight_q, self.out_scale, self.bias, self.x_zp, self.stride,
                           self.padding, self.dilation, self.groups)

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_q.float() * self.w_scale.reshape(-1, 1, 1, 1)

    def flops(self, node) -> int:
        return 2 * _out_numel(node) * (self.in_channels // self.groups) * math.prod(self.kernel_size)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={tuple(self.stride)}, padding={tuple(self.padding)}, groups={self.groups}, "
                f"input={self.x_dtype}(scale={self.x_scale:.4g}, zp={self.x_zp}), weight=int8 per-channel")


class FloatMatmul(nn.Module):
    """torch.matmul(a, b) of two activations as a module, so it can be observed, skipped and swapped."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(a, b)

    def flops(self, node) -> int:
        a = node.args[0].meta.get("tensor_meta") if node.args else None
        k = int(a.shape[-1]) if a is not None else 0
        return 2 * _out_numel(node) * k


class QuantMatmul(nn.Module):
    """Matmul of two quantized activations: a uint8/int8 (zero point a_zp), b symmetric int8; float out."""

    def __init__(self, a_qparams: QParams, b_qparams: QParams):
        super().__init__()
        if b_qparams.zero_point != 0 or b_qparams.dtype != "int8":
            raise ValueError(f"the right operand of a quantized matmul must be symmetric int8, got {b_qparams}")
        self.a_scale, self.a_zp, self.a_dtype = a_qparams.scale, a_qparams.zero_point, a_qparams.dtype
        self.b_scale = b_qparams.scale
        self.out_scale = f32(a_qparams.scale * b_qparams.scale)

    @property
    def x_qparams(self) -> QParams:
        return QParams(self.a_scale, self.a_zp, self.a_dtype)

    def forward(self, aq: torch.Tensor, bq: torch.Tensor) -> torch.Tensor:
        return ops.qmatmul(aq, bq, self.a_zp, self.out_scale)

    flops = FloatMatmul.flops

    def extra_repr(self) -> str:
        return (f"a={self.a_dtype}(scale={self.a_scale:.4g}, zp={self.a_zp}), "
                f"b=int8(scale={self.b_scale:.4g}), int32 accumulate")


class DynamicQuantLinear(nn.Module):
    """Linear whose input is quantized to uint8 on every call (range of that call), int8 weights."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, weight_qmax: int = WEIGHT_QMAX):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        w_scale = weight_qparams(weight, weight_qmax)
        self.weight_q = _int_param(quantize_weight(weight, w_scale, weight_qmax))
        self.register_buffer("w_scale", w_scale)
        _bias_buffer(self, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.dynamic_qlinear(x, self.weight_q, self.w_scale, self.bias)

    def flops(self, node) -> int:
        return 2 * _out_numel(node) * self.in_features

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, input=uint8 per call"


class WeightOnlyLinear(nn.Module):
    """Linear with int8 per-channel weights, dequantized to float32 for the product."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        w_scale = weight_qparams(weight)
        self.weight_q = _int_param(quantize_weight(weight, w_scale))
        self.register_buffer("w_scale", w_scale)
        _bias_buffer(self, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.woq_linear(x, self.weight_q, self.w_scale, self.bias)

    def flops(self, node) -> int:
        return 2 * _out_numel(node) * self.in_features

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight=int8, compute=float32"


def is_pointwise_conv(conv: nn.Module) -> bool:
    """Whether `conv` is a 1x1 Conv2d with groups 1 and no padding: a Linear over channels at every pixel."""
    return (isinstance(conv, nn.Conv2d) and tuple(conv.kernel_size) == (1, 1) and conv.groups == 1
            and conv_padding(conv) == (0, 0))


def linear_of_pointwise(conv: nn.Conv2d) -> nn.Linear:
    """The nn.Linear (out_channels x in_channels) that a pointwise conv applies at each pixel."""
    lin = nn.Linear(conv.in_channels, conv.out_channels, bias=conv.bias is not None)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.detach()[:, :, 0, 0])
        if conv.bias is not None:
            lin.bias.copy_(conv.bias.detach())
    return lin


class PointwiseConvAsLinear(nn.Module):
    """A 1x1 Conv2d (groups 1, no padding; is_pointwise_conv) run through a Linear-like module over channels:
    x [N, C, H, W] (subsampled by the stride) -> [N, H', W', C] -> `linear` -> [N, H', W', O] -> [N, O, H', W'].
    The same products and sums as the conv: `linear`'s own quantization is the only approximation."""

    def __init__(self, linear: nn.Module, stride):
        super().__init__()
        self.linear = linear
        self.stride = tuple(int(s) for s in stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != (1, 1):
            x = x[:, :, ::self.stride[0], ::self.stride[1]]
        return self.linear(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def flops(self, node) -> int:
        return 2 * _out_numel(node) * self.linear.in_features

    def dequantized_weight(self) -> torch.Tensor:
        from .mixed import dequantized_weight

        return dequantized_weight(self.linear)


# ------------------------------------------------------------------------------------------------ QAT
class FakeQuantize(nn.Module):
    """Per-tensor activation fake-quant for QAT: (clamp(round(x/s)+zp) - zp)·s, straight-through gradient.

    While the module is in training mode its observer tracks a moving average of the range; in eval mode
    the range is frozen. convert() turns it into a quantize node with the same qparams.
    """

    def __init__(self, observer: Observer | None = None, dtype: str = "uint8"):
        super().__init__()
        self.observer = observer if observer is not None else MovingAverageObserver(dtype)
        self.dtype = self.observer.dtype

    def qparams(self) -> QParams:
        return self.observer.qparams()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or not self.observer.calibrated():
            self.observer(x)
        qp = self.observer.qparams()
        return torch.fake_quantize_per_tensor_affine(x, qp.scale, qp.zero_point, qp.qmin, qp.qmax)

    def extra_repr(self) -> str:
        return f"dtype={self.dtype}"


def _fake_quant_weight(w: torch.Tensor) -> torch.Tensor:
    scale = weight_qparams(w).to(w.device)
    zp = torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)
    return torch.fake_quantize_per_channel_affine(w, scale, zp, 0, -WEIGHT_QMAX, WEIGHT_QMAX)


class QATLinear(nn.Linear):
    """nn.Linear whose weight is fake-quantized per output channel (symmetric int8) in forward."""

    @classmethod
    def from_float(cls, m: nn.Linear) -> "QATLinear":
        new = cls(m.in_features, m.out_features, bias=m.bias is not None,
                  device=m.weight.device, dtype=m.weight.dtype)
        new.load_state_dict(m.state_dict())
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, _fake_quant_weight(self.weight), self.bias)


class QATConv2d(nn.Conv2d):
    """nn.Conv2d whose weight is fake-quantized per output channel (symmetric int8) in forward."""

    @classmethod
    def from_float(cls, m: nn.Conv2d) -> "QATConv2d":
        new = cls(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                  bias=m.bias is not None, padding_mode=m.padding_mode, device=m.weight.device,
                  dtype=m.weight.dtype)
        new.load_state_dict(m.state_dict())
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, _fake_quant_weight(self.weight), self.bias)


QUANT_MODULES = (QuantLinear, QuantConv2d, QuantMatmul, DynamicQuantLinear, WeightOnlyLinear)
