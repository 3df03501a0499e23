"""Sparse layers and mask selection for the sparsify pass.

SparseLinear / SparseConv2d are nn.Linear / nn.Conv2d subclasses holding a boolean `mask` buffer (same shape as
the weight); they compute with `weight * mask`, so masked weights stay exactly zero through any fine-tuning
(their gradient is zero) and the graph keeps the pattern for the backend. SparseLinear calls the custom op
``torch.ops.graphopt_sparse.sparse_linear`` (one node through torch.export; the TVM backend maps it to a
block-sparse kernel or a dense one, graphopt.backends.tvm.sparse_lower); SparseConv2d uses plain conv ops.

Patterns (`parse_pattern`): "unstructured"; "N:M" (N kept in every M consecutive input weights of an output
row); "block(RxC)" or "RxC" (R consecutive output features x C consecutive input features). Conv weights are
viewed as [out, in/groups * kh * kw] for every pattern.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import PipelineError

__all__ = ["SparseLinear", "SparseConv2d", "Pattern", "parse_pattern", "select_mask", "group_scores",
           "masks_from_scores", "count_groups"]


# ------------------------------------------------------------------------------------------ custom op
@torch.library.custom_op("graphopt_sparse::sparse_linear", mutates_args=())
def sparse_linear(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, bias: Optional[torch.Tensor],
                  block_r: int, block_c: int, kernel: str) -> torch.Tensor:
    """y = x @ (weight * mask).T + bias. block_r/block_c: the mask's block shape; kernel: auto|sparse|dense
    (what the TVM backend may use)."""
    return F.linear(x, weight * mask, bias)


@sparse_linear.register_fake
def _(x, weight, mask, bias, block_r, block_c, kernel):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup(ctx, inputs, output):
    x, weight, mask, bias = inputs[:4]
    ctx.save_for_backward(x, weight, mask)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    x, weight, mask = ctx.saved_tensors
    w = weight * mask
    gx = grad @ w
    gw = (grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1])) * mask
    gb = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
    return gx, gw, None, gb, None, None, None


sparse_linear.register_autograd(_backward, setup_context=_setup)


@torch.library.custom_op("graphopt_sparse::sparse_conv2d", mutates_args=())
def sparse_conv2d(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, bias: Optional[torch.Tensor],
                  stride: list[int], padding: list[int], dilation: list[int], groups: int, block_r: int,
                  block_c: int, kernel: str) -> torch.Tensor:
    """conv2d(x, weight * mask, bias, ...) (NCHW, OIHW). SparseConv2d calls it only without autograd (inference
    and export); training runs the plain conv on weight * mask."""
    return F.conv2d(x, weight * mask, bias, stride, padding, dilation, groups)


@sparse_conv2d.register_fake
def _(x, weight, mask, bias, stride, padding, dilation, groups, block_r, block_c, kernel):
    n, _, h, w = x.shape
    kh, kw = weight.shape[2], weight.shape[3]
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return x.new_empty((n, weight.shape[0], oh, ow))


def _attach_mask(new: nn.Module, mask: torch.Tensor, block, kernel: str) -> nn.Module:
    """Give a Sparse* layer its bool mask buffer, block shape and kernel choice, and zero its masked weights."""
    new.register_buffer("mask", mask.to(torch.bool).clone())
    new.block = tuple(int(b) for b in block)
    new.kernel = kernel
    with torch.no_grad():
        new.weight.mul_(new.mask)
    return new


class SparseLinear(nn.Linear):
    """nn.Linear computing with weight * mask (mask: bool buffer). `block` and `kernel` go to the backend."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, block=(1, 1),
                 kernel: str = "auto"):
        super().__init__(in_features, out_features, bias=bias)
        self.register_buffer("mask", torch.ones_like(self.weight, dtype=torch.bool))
        self.block = tuple(int(b) for b in block)
        self.kernel = kernel

    @classmethod
    def from_linear(cls, lin: nn.Linear, mask: torch.Tensor, block, kernel: str) -> "SparseLinear":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = lin.in_features, lin.out_features
        new.weight = nn.Parameter(lin.weight.detach().clone(), requires_grad=lin.weight.requires_grad)
        new.bias = None if lin.bias is None else nn.Parameter(lin.bias.detach().clone(),
                                                              requires_grad=lin.bias.requires_grad)
        return _attach_mask(new, mask, block, kernel)

    def forward(self, x):
        return torch.ops.graphopt_sparse.sparse_linear(x, self.weight, self.mask, self.bias, self.block[0],
                                                       self.block[1], self.kernel)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, block={self.block}, sparsity={1 - self.mask.float().mean().item():.3f}"


class SparseConv2d(nn.Conv2d):
    """nn.Conv2d computing with weight * mask (mask: bool buffer). Without autograd (inference, export) it calls
    ``graphopt_sparse.sparse_conv2d`` so the backend can run it sparse; padding modes other than zeros and
    string paddings keep the plain conv."""

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, mask: torch.Tensor, block=(1, 1), kernel: str = "auto") -> "SparseConv2d":
        new = cls.__new__(cls)
        new.__dict__.update({k: v for k, v in conv.__dict__.items()
                             if k not in ("_parameters", "_buffers", "_modules")})
        new._parameters = {k: None if v is None else nn.Parameter(v.detach().clone(), requires_grad=v.requires_grad)
                           for k, v in conv._parameters.items()}
        new._buffers = dict(conv._buffers)
        new._modules = dict(conv._modules)
        return _attach_mask(new, mask, block, kernel)

    def forward(self, x):
        if torch.is_grad_enabled() or self.padding_mode != "zeros" or isinstance(self.padding, str):
            return self._conv_forward(x, self.weight * self.mask, self.bias)
        return torch.ops.graphopt_sparse.sparse_conv2d(
            x, self.weight, self.mask, self.bias, list(self.stride), list(self.padding), list(self.dilation),
            self.groups, self.block[0], self.block[1], self.kernel)


# ------------------------------------------------------------------------------------------- patterns
@dataclass(frozen=True)
class Pattern:
    kind: str                    # unstructured | nm | block
    n: int = 1                   # nm: kept per group; block: rows (R)
    m: int = 1                   # nm: group size;     block: cols (C)

    @property
    def block(self) -> tuple[int, int]:
        return (self.n, self.m) if self.kind == "block" else (1, 1)

    def fixed_sparsity(self) -> float | None:
        return 1.0 - self.n / self.m if self.kind == "nm" else None

    def __str__(self) -> str:
        if self.kind == "nm":
            return f"{self.n}:{self.m}"
        if self.kind == "block":
            return f"block({self.n}x{self.m})"
        return "unstructured"


def parse_pattern(text: str) -> Pattern:
    """'unstructured' | 'N:M' | 'block(RxC)' | 'blockRxC' | 'RxC' -> Pattern (in pipeline text write
    pattern=16x1 or pattern="block(16x1)": parentheses need quotes); PipelineError on anything else."""
    s = str(text).strip().lower().replace(" ", "")
    if s in ("unstructured", "element", "1x1"):
        return Pattern("unstructured")
    m = re.fullmatch(r"(\d+):(\d+)", s)
    if m:
        n, mm = int(m.group(1)), int(m.group(2))
        if not 0 < n < mm:
            raise PipelineError(f"sparsify: pattern {text!r}: N:M needs 0 < N < M")
        return Pattern("nm", n, mm)
    m = re.fullmatch(r"block\((\d+)x(\d+)\)|(?:block)?(\d+)x(\d+)", s)
    if m:
        m = [g for g in m.groups() if g is not None]
        r, c = int(m[0]), int(m[1])
        if r < 1 or c < 1:
            raise PipelineError(f"sparsify: pattern {text!r}: block sides must be >= 1")
        return Pattern("block", r, c) if (r, c) != (1, 1) else Pattern("unstructured")
    raise PipelineError(f"sparsify: unknown pattern {text!r}; use unstructured, N:M (e.g. 2:4) or block(RxC) "
                        f"(e.g. block(16x1))")


def _as_2d(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def group_scores(score: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Element scores -> one score per prunable group: [out, in] (unstructured), [out, in/M, M] (N:M, scores
    per element inside groups), [out/R, in/C] block sums (edge blocks are partial)."""
    s = _as_2d(score).double()
    if pattern.kind == "block":
        r, c = pattern.block
        n, k = s.shape
        sp = torch.zeros(-(-n // r) * r, -(-k // c) * c, dtype=s.dtype)
        sp[:n, :k] = s
        return sp.reshape(sp.shape[0] // r, r, sp.shape[1] // c, c).sum(dim=(1, 3))
    if pattern.kind == "nm":
        return s.reshape(s.shape[0], -1, pattern.m)
    return s


def count_groups(weight_shape, pattern: Pattern) -> int:
    n = weight_shape[0]
    k = int(np.prod(weight_shape[1:]))
    if pattern.kind == "block":
        r, c = pattern.block
        return -(-n // r) * -(-k // c)
    return n * k


def expand_mask(keep: torch.Tensor, weight_shape, pattern: Pattern) -> torch.Tensor:
    """Group keep-mask -> element mask of `weight_shape`."""
    n = weight_shape[0]
    k = int(np.prod(weight_shape[1:]))
    if pattern.kind == "block":
        r, c = pattern.block
        full = keep.repeat_interleave(r, 0).repeat_interleave(c, 1)[:n, :k]
        return full.reshape(weight_shape)
    return keep.reshape(weight_shape)


def nm_mask(score: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Keep the N highest-scoring of every M consecutive input weights (ties: lower index kept)."""
    g = group_scores(score, pattern)                                   # [out, in/M, M]
    order = torch.argsort(-g, dim=-1, stable=True)[..., :pattern.n]
    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, order, True)
    return keep.reshape(score.shape)


def masks_from_scores(scores: dict[str, torch.Tensor], shapes: dict[str, tuple], pattern: Pattern,
                      sparsity: float, scope: str) -> dict[str, torch.Tensor]:
    """Element masks (bool, weight-shaped) removing exactly round(sparsity * groups) lowest-scoring groups
    per layer (scope=layer) or over all layers together (scope=global); ties go to the lower flat index."""
    if pattern.kind == "nm":
        return {name: nm_mask(s, pattern) for name, s in scores.items()}
    groups = {name: group_scores(s, pattern).flatten() for name, s in scores.items()}
    keeps: dict[str, torch.Tensor] = {}
    if scope == "layer":
        for name, g in groups.items():
            k = int(round(sparsity * g.numel()))
            keep = torch.ones(g.numel(), dtype=torch.bool)
            keep[torch.argsort(g, stable=True)[:k]] = False
            keeps[name] = keep
    else:
        names = list(groups)
        allg = torch.cat([groups[n] for n in names])
        k = int(round(sparsity * allg.numel()))
        keep = torch.ones(allg.numel(), dtype=torch.bool)
        keep[torch.argsort(allg, stable=True)[:k]] = False
        offset = 0
        for n in names:
            keeps[n] = keep[offset:offset + groups[n].numel()]
            offset += groups[n].numel()
    out = {}
    for name, keep in keeps.items():
        shape = shapes[name]
        gshape = group_scores(torch.zeros(shape), pattern).shape
        out[name] = expand_mask(keep.reshape(gshape), shape, pattern)
    return out


def select_mask(score: torch.Tensor, pattern: Pattern, sparsity: float) -> torch.Tensor:
    """One layer's mask (scope=layer)."""
    return masks_from_scores({"w": score}, {"w": tuple(score.shape)}, pattern, sparsity, "layer")["w"]
