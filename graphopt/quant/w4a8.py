"""int4 weights x int8 activations (W4A8): int4 weight storage with integer dot products.

Weight-only int4 (graphopt.quant.weight_only) dequantizes every weight to float32 and pays one float
multiply-add per weight; on a CPU with much memory bandwidth per core that, not reading the weights, bounds
its speed. W4A8 keeps the same int4 weights (asymmetric, groups of `group_size` inputs: q in [0, 15], scale
s, zero point z; quantize_groups) and quantizes the activations per call, per row and per group of the same
inputs, to int8, so each group's dot product is an integer one (vpdpbusd / vpmaddubsw / sdot), as
llama.cpp's Q4 x Q8 blocks do.

Activations (dynamic, symmetric, per row m and group g, in float32 op by op):
    amax = max |x[m, k]| over k in g;  inv = 127 / amax (0 when amax is 0);  s_a = amax / 127
    a[m, k] = clamp(round_half_even(x[m, k] · inv), -127, 127)                        (int8)
    A group holding a NaN or ±Inf gets s_a = NaN (those inputs count as 0 elsewhere), so that row's outputs
    are NaN: never a finite number computed from a non-finite input.
Output (integer sums exact; K padded to whole groups with zeros on both sides):
    isum[m, n, g] = Σ_{k in g} a[m, k] · (q[n, k] - z[n, g])
    y[m, n] = bias[n] + Σ_g float32(isum[m, n, g]) · float32(s_a[m, g] · s[n, g])     (summed over g in order)
Exact in integers for groups up to 8,192 inputs (|isum| <= 127 · 15 · 8,192 < 2^24, so its float32 is
exact). Against the float32 model this adds the activation rounding (at most half a step of s_a per input)
to weight-only int4's weight rounding: stated by the quantize pass's report (cosine, per-layer error).

``torch.ops.graphopt.w4a8_linear(x, wq, scales, zeros, bias, group_size, in_features)`` is the reference
(float64 integer sums, then the float32 formula above); graphopt.backends.tvm.w4a8 lowers it to kernels.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .weight_only import PackedWeightOnlyLinear, unpack_int4

__all__ = ["W4A8Linear", "w4a8_linear", "quantize_rows", "group_of", "group_problem", "MAX_GROUP"]

MAX_GROUP = 8192                 # |isum| < 2^24: float32(isum) exact
ACT_QMAX = 127


def group_of(group_size: int, in_features: int) -> int:
    """The group length the kernels use: group_size (0 or >= K: one group per row, K rounded up to 8)."""
    if not group_size or group_size >= in_features:
        return (in_features + 7) // 8 * 8
    return int(group_size)


def group_problem(group_size: Optional[int], in_features: int) -> Optional[str]:
    """Why W4A8 cannot take a Linear of `in_features` inputs at `group_size` (None: it can)."""
    if group_size is None or group_size >= in_features:
        if in_features > MAX_GROUP:
            return (f"in_features={in_features}: one W4A8 group per channel holds at most {MAX_GROUP} inputs; "
                    f"give group_size")
        return None
    if group_size % 8 or group_size > MAX_GROUP:
        return f"group_size={group_size}: W4A8 groups must be a multiple of 8, at most {MAX_GROUP}"
    return None


def quantize_rows(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(a int32 [M, NG, G], s_a float32 [M, NG]) of a float32 x [M, K], K zero-padded to NG·G (module doc)."""
    m, k = x.shape
    ng = max(1, math.ceil(k / group))
    xp = F.pad(x.float(), (0, ng * group - k)).reshape(m, ng, group)
    nonfinite = xp - xp                                 # 0 for a finite x, NaN for NaN / ±Inf
    xc = torch.where(nonfinite == 0, xp, torch.zeros_like(xp))
    amax = xc.abs().amax(dim=2)
    inv = torch.where(amax > 0, torch.tensor(float(ACT_QMAX)) / amax, torch.zeros_like(amax))
    s_a = amax / torch.tensor(float(ACT_QMAX)) + nonfinite.sum(dim=2)
    a = torch.clamp(torch.round(xc * inv.unsqueeze(2)), -ACT_QMAX, ACT_QMAX)
    return a.to(torch.int32), s_a


@torch.library.custom_op("graphopt::w4a8_linear", mutates_args=())
def w4a8_linear(x: torch.Tensor, wq: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                bias: Optional[torch.Tensor], group_size: int, in_features: int) -> torch.Tensor:
    """y = W4A8 Linear of x [..., K] (module docstring); wq uint8 [N, ceil(K/2)] (pack_int4), scales float32
    [N, NG], zeros uint8 [N, NG]; group_size 0: one group per row."""
    n, k = wq.shape[0], in_features
    g = group_of(group_size, k)
    lead = x.shape[:-1]
    a, s_a = quantize_rows(x.reshape(-1, k), g)                    # [M, NG, G], [M, NG]
    ng = a.shape[1]
    q = F.pad(unpack_int4(wq, k).to(torch.int32), (0, ng * g - k))
    qz = (q.reshape(n, ng, g) - zeros.to(torch.int32).unsqueeze(2)).double()
    isum = torch.einsum("mgk,ngk->mng", a.double(), qz).float()  # exact integers
    y = torch.zeros(a.shape[0], n) if bias is None else bias.float().expand(a.shape[0], n).clone()
    for j in range(ng):
        y = y + isum[:, :, j] * (s_a[:, j:j + 1] * scales.float()[:, j])
    return y.reshape(*lead, n)


@w4a8_linear.register_fake
def _(x, wq, scales, zeros, bias, group_size, in_features):
    return x.new_empty((*x.shape[:-1], wq.shape[0]), dtype=torch.float32)


class W4A8Linear(PackedWeightOnlyLinear):
    """Linear with int4 weights (PackedWeightOnlyLinear's: asymmetric, group-wise) and int8 activations
    quantized per call, per row and group (graphopt.quant.w4a8); integer dot products, float32 output."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group_size: Optional[int] = 128,
                 rounded: Optional[tuple] = None):
        problem = group_problem(group_size, weight.shape[1])
        if problem:
            raise ValueError(problem)
        super().__init__(weight, bias, bits=4, group_size=group_size, rounded=rounded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return w4a8_linear(x, self.weight_q, self.scales, self.zeros, self.bias, self.group_size or 0,
                           self.in_features)

    def extra_repr(self) -> str:
        group = "per-channel" if self.group_size is None else f"group {self.group_size}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, weight=int4 ({group}), "
                f"activations=int8 per call (per row and group), compute=int32 dot products")
