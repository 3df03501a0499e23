"""Weight sharing (Deep Compression): each Linear's weights take one of k shared float32 values (a codebook
found by k-means over that layer's weights); the layer stores a small index per weight.

  k <= 16   4-bit indices, two per byte (the int4 layout of graphopt.quant.weight_only: low nibble = even input)
  k <= 256  8-bit indices

k-means is 1-D Lloyd iteration from a linear initialisation over [min, max] (Han et al. found linear
initialisation best: it keeps the rare large weights), deterministic. Exact zeros (a pruned layer) keep an
exact 0.0 entry of the codebook and only the other weights are clustered, so pruning survives clustering.

``torch.ops.graphopt.clustered_linear(x, idx, codebook, bias, bits, in_features)`` is the reference:
W = codebook[idx], then F.linear in float32. The TVM backend (graphopt.backends.tvm.weight_only) reads the
indices and looks the codebook up inside the GEMM loop, like int4 weight-only.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .weight_only import pack_int4, unpack_int4

__all__ = ["kmeans_1d", "ClusteredLinear", "clustered_linear", "index_bits"]


def index_bits(k: int) -> int:
    """Bits per stored index for a codebook of k entries (4 or 8)."""
    if isinstance(k, bool) or not isinstance(k, int) or not 2 <= k <= 256:
        raise ValueError(f"k={k!r}: the codebook size must be an integer in [2, 256]")
    return 4 if k <= 16 else 8


def kmeans_1d(values: torch.Tensor, k: int, iters: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """(codebook float32 [k'], index int64 per value) of 1-D k-means over `values`; k' <= k entries (fewer
    when the values have fewer distinct ones). Exact zeros keep a 0.0 entry of their own."""
    v = values.detach().double().flatten()
    zero = v == 0
    has_zero = bool(zero.any())
    nz = v[~zero]
    kk = k - 1 if has_zero else k
    if nz.numel() == 0 or kk < 1:
        centers = torch.zeros(0, dtype=torch.float64)
    else:
        distinct = torch.unique(nz)
        if distinct.numel() <= kk:
            centers = distinct
        else:
            centers = torch.linspace(float(nz.min()), float(nz.max()), kk, dtype=torch.float64)
            for _ in range(iters):
                mids = (centers[1:] + centers[:-1]) / 2
                assign = torch.bucketize(nz, mids)
                sums = torch.zeros(kk, dtype=torch.float64).index_add_(0, assign, nz)
                counts = torch.bincount(assign, minlength=kk).double()
                new = torch.where(counts > 0, sums / counts.clamp_min(1), centers)
                new, _ = torch.sort(new)
                if torch.allclose(new, centers, rtol=0, atol=1e-12):
                    centers = new
                    break
                centers = new
    codebook = torch.cat([torch.zeros(1, dtype=torch.float64), centers]) if has_zero else centers
    codebook = codebook.float()
    # final assignment against the float32 codebook (what is stored); zeros -> entry 0
    cb = codebook.double()
    order = torch.argsort(cb)
    sorted_cb = cb[order]
    mids = (sorted_cb[1:] + sorted_cb[:-1]) / 2
    idx = order[torch.bucketize(v, mids)]
    if has_zero:
        idx[zero] = 0
    return codebook, idx


@torch.library.custom_op("graphopt::clustered_linear", mutates_args=())
def clustered_linear(x: torch.Tensor, idx: torch.Tensor, codebook: torch.Tensor, bias: Optional[torch.Tensor],
                     bits: int, in_features: int) -> torch.Tensor:
    """y = x @ codebook[idx].T + bias (float32); idx packed two per byte when bits == 4."""
    i = unpack_int4(idx, in_features) if bits == 4 else idx
    w = codebook.float()[i.long()]
    return F.linear(x.float(), w, None if bias is None else bias.float())


@clustered_linear.register_fake
def _(x, idx, codebook, bias, bits, in_features):
    return x.new_empty((*x.shape[:-1], idx.shape[0]), dtype=torch.float32)


def _setup(ctx, inputs, output):
    x, idx, codebook, bias, bits, in_features = inputs
    ctx.save_for_backward(x, idx, codebook)
    ctx.bits, ctx.in_features, ctx.has_bias = bits, in_features, bias is not None


def _backward(ctx, grad):
    """Deep Compression's centroid gradient: dL/dc_k = sum of dL/dW_ij over the weights with index k (the
    indices are constants: they get no gradient)."""
    x, idx, codebook = ctx.saved_tensors
    i = (unpack_int4(idx, ctx.in_features) if ctx.bits == 4 else idx).long()
    g2 = grad.reshape(-1, grad.shape[-1]).float()
    gx = gc = gb = None
    if ctx.needs_input_grad[0]:
        gx = (g2 @ codebook.float()[i]).reshape(x.shape).to(x.dtype)
    if ctx.needs_input_grad[2]:
        gw = g2.t() @ x.reshape(-1, x.shape[-1]).float()                 # dL/dW [N, K]
        gc = torch.zeros_like(codebook, dtype=torch.float32).index_add_(0, i.flatten(), gw.flatten())
        gc = gc.to(codebook.dtype)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        gb = g2.sum(0)
    return gx, None, gc, gb, None, None


clustered_linear.register_autograd(_backward, setup_context=_setup)


class ClusteredLinear(nn.Module):
    """Linear whose weights are codebook[index]: float32 codebook [k] (padded to 16 or 256 entries), uint8
    indices (two per byte for k <= 16), float32 bias."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, k: int = 16, iters: int = 30):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.bits = index_bits(k)
        codebook, idx = kmeans_1d(weight, k, iters)
        self.k = int(codebook.numel())
        idx = idx.reshape(weight.shape)
        size = 16 if self.bits == 4 else 256
        self.register_buffer("codebook", F.pad(codebook, (0, size - codebook.numel())))
        self.register_buffer("index", pack_int4(idx.to(torch.int16)) if self.bits == 4 else idx.to(torch.uint8))
        if bias is not None:
            self.register_buffer("bias", bias.detach().float().clone())
        else:
            self.bias = None

    def indices(self) -> torch.Tensor:
        """One index per weight, uint8 [N, K]."""
        if self.bits == 4:
            return unpack_int4(self.index, self.in_features).to(torch.uint8)
        return self.index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return clustered_linear(x, self.index, self.codebook, self.bias, self.bits, self.in_features)

    def dequantized_weight(self) -> torch.Tensor:
        return self.codebook[self.indices().long()]

    def flops(self, node) -> int:
        meta = node.meta.get("tensor_meta")
        return 2 * (math.prod(meta.shape) if meta is not None else 0) * self.in_features

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, k={self.k} "
                f"({self.bits}-bit indices), compute=float32")
