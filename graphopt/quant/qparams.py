"""Quantization parameters and the reference integer semantics every backend must reproduce.

Conventions (the same in PyTorch, in the numpy reference of the tests, and in the TVM lowering):

* A quantized tensor is an integer tensor ``q`` with a float32 ``scale`` and an integer ``zero_point``:
  ``x ≈ (q - zero_point) * scale``.
* Quantize:  ``q = clamp(round_half_even(x * inv_scale) + zero_point, qmin, qmax)`` computed in float32,
  where ``inv_scale = float32(1 / scale)`` is computed once from ``scale`` (multiplying by a float32
  constant is reproducible bit-for-bit on every backend; dividing at run time need not be).
* Activations are per-tensor: ``uint8`` asymmetric (qmin 0, qmax 255, zero point in [0, 255]) or ``int8``
  symmetric (qmin -127, qmax 127, zero point 0). Zero is always exactly representable (the range is
  widened to include 0), so zero padding of a quantized tensor is padding with the zero point.
* Weights are per output channel, symmetric ``int8`` in [-qmax, qmax] (zero point 0): ``scale[c] =
  max|W[c]| / qmax``; qmax is 127, or 64 for the layers an x86 AVX2 / AVX-512BW int8 kernel runs
  (vpmaddubsw sums two u8·s8 products in int16: 2·255·64 = 32,640 fits, 2·255·127 does not).

All scales are rounded to float32 once, when they are chosen, so every later computation sees the same
numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["QParams", "ACT_DTYPES", "WEIGHT_QMAX", "REDUCED_WEIGHT_QMAX", "act_qparams", "weight_qparams",
           "quantize_ref", "f32"]

# name -> (qmin, qmax, symmetric)
ACT_DTYPES = {"uint8": (0, 255, False), "int8": (-127, 127, True)}
WEIGHT_QMAX = 127
REDUCED_WEIGHT_QMAX = 64        # x86 AVX2 / AVX-512BW kernels: vpmaddubsw's int16 pair sums never saturate
_TINY = float(np.finfo(np.float32).tiny) * 2 ** 10     # smallest scale we accept (keeps 1/scale finite)


def f32(x: float) -> float:
    """`x` rounded to the nearest float32, as a Python float."""
    return float(np.float32(x))


@dataclass(frozen=True)
class QParams:
    """Per-tensor quantization parameters of an activation."""

    scale: float
    zero_point: int
    dtype: str                          # "uint8" | "int8"

    @property
    def qmin(self) -> int:
        return ACT_DTYPES[self.dtype][0]

    @property
    def qmax(self) -> int:
        return ACT_DTYPES[self.dtype][1]

    @property
    def inv_scale(self) -> float:
        return f32(1.0 / self.scale)

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.uint8 if self.dtype == "uint8" else torch.int8

    def range(self) -> tuple[float, float]:
        """The float interval that quantizes without clipping."""
        return ((self.qmin - self.zero_point) * self.scale, (self.qmax - self.zero_point) * self.scale)


def act_qparams(lo: float, hi: float, dtype: str = "uint8") -> QParams:
    """Per-tensor qparams covering [lo, hi] (widened to include 0) for `dtype` ("uint8" or "int8")."""
    if dtype not in ACT_DTYPES:
        raise ValueError(f"activation dtype must be one of {sorted(ACT_DTYPES)}, got {dtype!r}")
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"cannot quantize a tensor with range [{lo}, {hi}] (not finite)")
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    qmin, qmax, symmetric = ACT_DTYPES[dtype]
    if symmetric:
        scale = max(abs(lo), abs(hi)) / qmax
        zp = 0
    else:
        scale = (hi - lo) / (qmax - qmin)
    scale = f32(max(scale, _TINY))
    if not symmetric:
        zp = int(min(max(qmin - round(lo / scale), qmin), qmax))
    return QParams(scale, zp, dtype)


def weight_qparams(w: torch.Tensor, qmax: int = WEIGHT_QMAX) -> torch.Tensor:
    """Per-output-channel (dim 0) symmetric int8 scales of a weight for [-qmax, qmax], float32, shape
    (out_channels,)."""
    absmax = w.detach().double().abs().reshape(w.shape[0], -1).amax(dim=1)
    return (absmax / qmax).clamp_min(_TINY).float()


def quantize_weight(w: torch.Tensor, scale: torch.Tensor, qmax: int = WEIGHT_QMAX) -> torch.Tensor:
    """int8 weight = clamp(round(W / scale[c]), -qmax, qmax), per output channel (computed in float64)."""
    s = scale.double().reshape(-1, *([1] * (w.dim() - 1)))
    return torch.clamp(torch.round(w.detach().double() / s), -qmax, qmax).to(torch.int8)


def quantize_ref(x: np.ndarray, qp: QParams) -> np.ndarray:
    """numpy reference of the quantize op (float32 arithmetic, round half to even)."""
    x = np.asarray(x, dtype=np.float32)
    q = np.round(x * np.float32(qp.inv_scale)) + np.float32(qp.zero_point)
    return np.clip(q, qp.qmin, qp.qmax).astype(np.uint8 if qp.dtype == "uint8" else np.int8)
