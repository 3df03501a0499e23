"""Compare (possibly nested) model outputs: max absolute and relative difference."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import tree_flatten


def flatten_outputs(out: Any) -> list[torch.Tensor]:
    """The tensors of an output (tensor, tuple, list, dict, HF ModelOutput), in a stable order."""
    if hasattr(out, "to_tuple") and callable(out.to_tuple):   # transformers ModelOutput
        out = out.to_tuple()
    leaves, _ = tree_flatten(out)
    return [x for x in leaves if isinstance(x, torch.Tensor)]


@dataclass
class Diff:
    max_abs: float = 0.0
    max_rel: float = 0.0               # max |Δ| / max |reference| over all outputs
    structure_error: str = ""          # non-empty when counts/shapes differ
    max_ref: float = 0.0               # max |reference| over all outputs

    def __str__(self) -> str:
        return self.structure_error or f"max|Δ|={self.max_abs:.3g} (rel {self.max_rel:.3g})"


def compare_outputs(got: Any, reference: Any) -> Diff:
    a, b = flatten_outputs(got), flatten_outputs(reference)
    if len(a) != len(b):
        return Diff(float("inf"), float("inf"), f"{len(a)} output tensors, expected {len(b)}")
    max_abs, max_ref = 0.0, 0.0
    for i, (x, y) in enumerate(zip(a, b)):
        if tuple(x.shape) != tuple(y.shape):
            return Diff(float("inf"), float("inf"),
                        f"output {i} has shape {tuple(x.shape)}, expected {tuple(y.shape)}")
        if x.numel() == 0:
            continue
        xf, yf = x.detach().double(), y.detach().double()
        max_abs = max(max_abs, (xf - yf).abs().max().item())
        max_ref = max(max_ref, yf.abs().max().item())
    return Diff(max_abs, max_abs / max(max_ref, 1e-12), max_ref=max_ref)
