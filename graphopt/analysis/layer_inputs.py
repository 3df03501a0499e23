"""What a Linear / Conv2d layer multiplies by its weight, collected over calibration batches.

Data-aware passes (lowrank's whitened SVD, quantize's GPTQ rounding) need each layer's input rows X, the
operand of y = X Wᵀ with W the weight flattened to (out, fan_in): a Linear's inputs over its last dimension,
a Conv2d's im2col patches (padding and padding mode applied, in the order of its weight's (Cin, kh, kw)).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Hashable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["weight_rows", "collecting_inputs", "run_collecting_inputs"]


def weight_rows(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Rows (N·L, fan_in) that `mod` (Linear or Conv2d) multiplies by its flattened weight for input `x`."""
    x = x.detach()
    if not isinstance(mod, nn.Conv2d):
        return x.reshape(-1, x.shape[-1])
    if x.dim() == 3:
        x = x.unsqueeze(0)
    pad = mod._reversed_padding_repeated_twice
    if any(pad):
        x = F.pad(x, pad, mode="constant" if mod.padding_mode == "zeros" else mod.padding_mode)
    cols = F.unfold(x, mod.kernel_size, dilation=mod.dilation, stride=mod.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


@contextmanager
def collecting_inputs(layers: Mapping[Hashable, nn.Module], add: Callable[[Hashable, torch.Tensor], None]
                      ) -> Iterator[None]:
    """Within the block, every call of a layer of `layers` ({key: module}; a module called twice adds both
    inputs) calls add(key, weight_rows(layer, x)). Hooks are removed on exit."""
    handles = []
    for key, mod in layers.items():
        def hook(m, args, kwargs, key=key):
            add(key, weight_rows(m, args[0] if args else kwargs["input"]))

        handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def run_collecting_inputs(gm: nn.Module, layers: Mapping[Hashable, nn.Module], batches: Sequence[tuple],
                          add: Callable[[Hashable, torch.Tensor], None]) -> None:
    """Run `gm` on `batches` (no grad), collecting_inputs(layers, add)."""
    with collecting_inputs(layers, add), torch.no_grad():
        for batch in batches:
            gm(*batch)
