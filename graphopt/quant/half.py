"""float16 Linear: a mixed-precision choice for targets with fast float16 arithmetic (ARMv8.2-A FP16, e.g.
cortex-a76 / neoverse-n1; never x86, whose float16 is a storage format converted to float32 per use).

HalfLinear stores its weight in float16 (2 B / weight; the bias stays float32) and multiplies in float16: the
input is rounded to float16, y = x16 @ W16ᵀ, returned as float32, plus the bias in float32. Approximates each
weight and input by float16 (relative error <= 2^-11 each). PyTorch's reference rounds the product to float16
before the cast; TVM's importer gives the float16 matmul a float32 result (float32 accumulation), so the
compiled layer is the more accurate of the two and they agree to float16 rounding of the output.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["HalfLinear", "has_fast_float16"]


class HalfLinear(nn.Module):
    """Linear with float16 weights and input, float32 output and bias."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.detach().to(torch.float16).clone())
        if bias is not None:
            self.register_buffer("bias", bias.detach().float().clone())
        else:
            self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x.to(torch.float16), self.weight).to(torch.float32)
        return y if self.bias is None else y + self.bias

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight.float()

    def flops(self, node) -> int:
        meta = node.meta.get("tensor_meta")
        return 2 * (math.prod(meta.shape) if meta is not None else 0) * self.in_features

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, compute=float16"


@functools.lru_cache(maxsize=64)
def has_fast_float16(target: str) -> bool:
    """True for aarch64 targets whose CPU has FP16 arithmetic (LLVM feature fullfp16); False otherwise (x86,
    torch, cuda: CUDA's float16 Linear lowering is not verified on a GPU yet, so it is not offered)."""
    if target.split(":", 1)[0] not in ("arm", "aarch64", "arm64"):
        return False
    try:
        import tvm
        from tvm.target import codegen

        from ..backends.targets import resolve_target

        spec = resolve_target(target)
        return bool(codegen.target_has_features("fullfp16", tvm.target.Target(spec.tvm)))
    except Exception:
        return False
