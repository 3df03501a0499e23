"""Weight-only quantization with group-wise scales: int8 and int4 weights, float32 activations and compute.

A weight W [N, K] (N output features, K inputs) is cut along K into groups of `group_size` consecutive
inputs (the last group of a row may be shorter: K need not be a multiple of the group size). Each group of
each row has a float32 scale s and an integer zero point z; the stored integers q give back

    W[n, k] ≈ float32(q[n, k] - z[n, g]) * s[n, g],   g = k // group_size        (one float32 rounding)

  bits=8  symmetric: q in [-127, 127], z = 0, s = max|W_group| / 127 (per output channel when the group is
          the whole row).
  bits=4  asymmetric (min/max): q in [0, 15], s = (hi - lo) / 15 over lo = min(W_group, 0), hi = max(W_group,
          0), z = round(-lo / s) in [0, 15]; zero is exact (q = z), so pruned weights stay zero. Two weights
          per byte: byte [n, j] holds q[n, 2j] in its low nibble and q[n, 2j + 1] in its high nibble (a zero
          nibble pads an odd K).

``torch.ops.graphopt.woq_linear_packed(x, wq, scales, zeros, bias, bits, group_size, in_features)`` is the
reference: it unpacks, dequantizes as above in float32 and runs F.linear. The TVM backend
(graphopt.backends.tvm.weight_only) never materializes the float weight: its kernels read the packed bytes
and dequantize in the GEMM's inner loop.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BITS", "quantize_groups", "dequantize_groups", "pack_int4", "unpack_int4", "woq_linear_packed",
           "PackedWeightOnlyLinear", "check_options"]

BITS = {8: (-127, 127), 4: (0, 15)}          # stored integer range per bit width
_TINY = float(np.finfo(np.float32).tiny) * 2 ** 10


def check_options(bits: int, group_size: Optional[int]) -> None:
    """ValueError naming the option unless (bits, group_size) is a weight-only layout we have kernels for."""
    if bits not in BITS:
        raise ValueError(f"bits={bits!r}: weight-only quantization supports bits=8 or bits=4")
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2 or group_size % 2:
            raise ValueError(f"group_size={group_size!r}: must be an even integer >= 2 (e.g. 32, 64, 128), "
                             f"or None for one group per output channel")


def _groups(k: int, group_size: Optional[int]) -> int:
    g = k if group_size is None else group_size
    return max(1, math.ceil(k / g))


def quantize_groups(w: torch.Tensor, bits: int, group_size: Optional[int]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q int16 [N, K], scales float32 [N, G], zeros uint8 [N, G]) of a float weight [N, K]; see the module
    docstring for the formulas. group_size None: one group per row (per-channel). Computed in float64."""
    check_options(bits, group_size)
    if w.dim() != 2:
        raise ValueError(f"weight-only quantization takes a 2-d weight [out, in], got shape {tuple(w.shape)}")
    n, k = w.shape
    gs = k if group_size is None else group_size
    ng = _groups(k, group_size)
    wd = w.detach().double()
    padded = F.pad(wd, (0, ng * gs - k))                                  # zeros never widen a range that
    grouped = padded.reshape(n, ng, gs)                                   # already includes 0
    qmin, qmax = BITS[bits]
    if bits == 8:
        scale = (grouped.abs().amax(dim=2) / qmax).clamp_min(_TINY).float()
        zero = torch.zeros(n, ng, dtype=torch.uint8)
    else:
        lo = grouped.amin(dim=2).clamp_max(0.0)
        hi = grouped.amax(dim=2).clamp_min(0.0)
        scale = ((hi - lo) / (qmax - qmin)).clamp_min(_TINY).float()
        zero = torch.clamp(torch.round(-lo / scale.double()), qmin, qmax).to(torch.uint8)
    s = scale.double().unsqueeze(2)
    q = torch.round(grouped / s) + zero.double().unsqueeze(2)
    q = torch.clamp(q, qmin, qmax).reshape(n, ng * gs)[:, :k].to(torch.int16)
    return q, scale, zero


def dequantize_groups(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: Optional[int]
                      ) -> torch.Tensor:
    """float32 [N, K]: float32(q - z) * s, group by group (the reference every kernel must match)."""
    n, k = q.shape
    gs = k if group_size is None else group_size
    idx = torch.arange(k) // gs
    return (q.to(torch.int32) - zeros.to(torch.int32)[:, idx]).float() * scales.float()[:, idx]


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, ceil(K/2)]: q[:, 2j] in the low nibble, q[:, 2j+1] in the high one (values 0..15)."""
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > 15):
        raise ValueError(f"int4 values must be in [0, 15], got [{int(q.min())}, {int(q.max())}]")
    q = q.to(torch.int32)
    if q.shape[1] % 2:
        q = F.pad(q, (0, 1))
    return (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """int16 [N, k] from pack_int4's bytes."""
    p = packed.to(torch.int16)
    out = torch.stack([p & 15, p >> 4], dim=2).reshape(p.shape[0], -1)
    return out[:, :k]


def _unpacked(wq: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    return unpack_int4(wq, k) if bits == 4 else wq.to(torch.int16)


@torch.library.custom_op("graphopt::woq_linear_packed", mutates_args=())
def woq_linear_packed(x: torch.Tensor, wq: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                      bias: Optional[torch.Tensor], bits: int, group_size: int, in_features: int) -> torch.Tensor:
    """y = x @ dequantize_groups(unpack(wq), scales, zeros).T + bias, float32. group_size 0: per channel."""
    q = _unpacked(wq, bits, in_features)
    w = dequantize_groups(q, scales, zeros, group_size or None)
    return F.linear(x.float(), w, None if bias is None else bias.float())


@woq_linear_packed.register_fake
def _(x, wq, scales, zeros, bias, bits, group_size, in_features):
    return x.new_empty((*x.shape[:-1], wq.shape[0]), dtype=torch.float32)


class PackedWeightOnlyLinear(nn.Module):
    """Linear with int8 or int4 (two per byte) weights and group-wise float32 scales; float32 compute.

    Buffers: weight_q (int8 [N, K] or uint8 [N, ceil(K/2)]), scales float32 [N, G], zeros uint8 [N, G],
    bias float32 [N] or None. Keeps nothing of the float weight.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, bits: int = 4,
                 group_size: Optional[int] = 128, rounded: Optional[tuple] = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.bits = int(bits)
        # a group at least as long as the row is one group per channel
        self.group_size = None if group_size is None or group_size >= self.in_features else int(group_size)
        # rounded: (q, scales, zeros) chosen elsewhere on quantize_groups' grid (graphopt.quant.gptq)
        q, scales, zeros = rounded if rounded is not None else quantize_groups(weight, self.bits, self.group_size)
        wq = pack_int4(q) if self.bits == 4 else q.to(torch.int8)
        self.register_buffer("weight_q", wq)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)
        if bias is not None:
            self.register_buffer("bias", bias.detach().float().clone())
        else:
            self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return woq_linear_packed(x, self.weight_q, self.scales, self.zeros, self.bias, self.bits,
                                 self.group_size or 0, self.in_features)

    def dequantized_weight(self) -> torch.Tensor:
        q = _unpacked(self.weight_q, self.bits, self.in_features)
        return dequantize_groups(q, self.scales, self.zeros, self.group_size)

    def flops(self, node) -> int:
        meta = node.meta.get("tensor_meta")
        numel = math.prod(meta.shape) if meta is not None else 0
        return 2 * numel * self.in_features

    def extra_repr(self) -> str:
        group = "per-channel" if self.group_size is None else f"group {self.group_size}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, weight=int{self.bits} "
                f"({group}), compute=float32")
