"""Static int8 layers that keep the sparsify pass's block pattern (sparsify, then quantize).

SparseQuantLinear is a QuantLinear (same int8 weight, qparams and integer semantics) made from a SparseLinear;
it calls ``torch.ops.graphopt.sparse_qlinear``, which computes exactly what ``graphopt.qlinear`` computes and
also carries the layer's block shape and kernel choice (auto | sparse | dense) to the TVM backend, which runs
it on a block-sparse int8 kernel (graphopt.backends.tvm.sparse_int8) or on the dense int8 kernel
(graphopt.backends.tvm.sparse_qlower decides, per layer). Masked weights quantize to exactly 0, so the int8
weight keeps the mask's pattern.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import ops
from .modules import QuantConv2d, QuantLinear
from .qparams import WEIGHT_QMAX

__all__ = ["SparseQuantLinear", "SparseQuantConv2d", "sparse_qlinear", "sparse_qconv2d"]


@torch.library.custom_op("graphopt::sparse_qlinear", mutates_args=())
def sparse_qlinear(xq: torch.Tensor, wq: torch.Tensor, out_scale: torch.Tensor, bias: Optional[torch.Tensor],
                   x_zp: int, block_r: int, block_c: int, kernel: str) -> torch.Tensor:
    """graphopt.qlinear(xq, wq, out_scale, bias, x_zp); block_r/block_c/kernel only inform the backend."""
    return ops.qlinear(xq, wq, out_scale, bias, x_zp)


@sparse_qlinear.register_fake
def _(xq, wq, out_scale, bias, x_zp, block_r, block_c, kernel):
    return xq.new_empty((*xq.shape[:-1], wq.shape[0]), dtype=torch.float32)


class SparseQuantLinear(QuantLinear):
    """QuantLinear of a SparseLinear: int8 weight with the mask's zeros, its block shape and kernel choice."""

    def __init__(self, sparse_linear, x_qparams, weight_qmax: int = WEIGHT_QMAX):
        super().__init__(sparse_linear.weight * sparse_linear.mask, sparse_linear.bias, x_qparams,
                         weight_qmax=weight_qmax)
        self.block = tuple(int(b) for b in sparse_linear.block)
        self.kernel = str(sparse_linear.kernel)

    def forward(self, xq: torch.Tensor) -> torch.Tensor:
        return torch.ops.graphopt.sparse_qlinear(xq, self.weight_q, self.out_scale, self.bias, self.x_zp,
                                                 self.block[0], self.block[1], self.kernel)

    def extra_repr(self) -> str:
        zeros = float((self.weight_q == 0).float().mean())
        return f"{super().extra_repr()}, block={self.block}, kernel={self.kernel}, zeros={zeros:.3f}"


@torch.library.custom_op("graphopt::sparse_qconv2d", mutates_args=())
def sparse_qconv2d(xq: torch.Tensor, wq: torch.Tensor, out_scale: torch.Tensor, bias: Optional[torch.Tensor],
                   x_zp: int, stride: list[int], padding: list[int], dilation: list[int], groups: int,
                   block_r: int, block_c: int, kernel: str) -> torch.Tensor:
    """graphopt.qconv2d(...); block_r/block_c/kernel only inform the backend (1x1 stride-1 convs can run on the
    block-sparse int8 kernel, as an NHWC [N·H·W, C] GEMM)."""
    return ops.qconv2d(xq, wq, out_scale, bias, x_zp, stride, padding, dilation, groups)


@sparse_qconv2d.register_fake
def _(xq, wq, out_scale, bias, x_zp, stride, padding, dilation, groups, block_r, block_c, kernel):
    return torch.ops.graphopt.qconv2d(xq, wq, out_scale, bias, x_zp, stride, padding, dilation, groups)


class SparseQuantConv2d(QuantConv2d):
    """QuantConv2d of a SparseConv2d: int8 weight with the mask's zeros, its block shape and kernel choice."""

    def __init__(self, sparse_conv, x_qparams, weight_qmax: int = WEIGHT_QMAX):
        super().__init__(sparse_conv, x_qparams, weight=sparse_conv.weight * sparse_conv.mask,
                         weight_qmax=weight_qmax)
        self.block = tuple(int(b) for b in sparse_conv.block)
        self.kernel = str(sparse_conv.kernel)

    def forward(self, xq: torch.Tensor) -> torch.Tensor:
        return torch.ops.graphopt.sparse_qconv2d(xq, self.weight_q, self.out_scale, self.bias, self.x_zp,
                                                 self.stride, self.padding, self.dilation, self.groups,
                                                 self.block[0], self.block[1], self.kernel)
