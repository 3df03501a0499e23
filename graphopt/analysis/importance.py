"""Channel importance for structured pruning, summed over each class of coupled channels.

A class (see dependency.py) is a set of channel positions in several layers that are removed together; its
importance is the sum over all those positions of a per-position score:

  l1        Σ |w| of the weights the position owns: a producer's output rows (and bias), a consumer's input
            columns, a per-channel norm's γ and β, a sliced parameter's entries.
  l2        the same with w².
  bn_scale  Σ |γ| of the per-channel norm layers (BatchNorm / GroupNorm / LayerNorm / InstanceNorm) in the
            class (network slimming). A group with no norm layer falls back to l1 (reported in the notes).
  taylor    first-order Taylor estimate of the loss change when the class is removed: |Σ w·∂L/∂w| over all
            the weights of the class, averaged over calibration batches. The loss is the cross-entropy of the
            model's logits against its own arg-max predictions when the model returns one 2-D float tensor
            (a classifier judged by its own labels), else the mean of squares of its float outputs. Gradients
            are taken on a deep copy of the graph; the graph passed in is never touched.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .compare import flatten_outputs
from .dependency import DependencyGraph, _get_attr

__all__ = ["CRITERIA", "weight_slices", "class_importance"]

CRITERIA = ("l1", "l2", "bn_scale", "taylor")


def weight_slices(dep: DependencyGraph, root: nn.Module) -> Iterator[tuple[str, torch.Tensor, Callable, int,
                                                                            np.ndarray]]:
    """(kind, parameter, view, dim, ids): `view(t)` selects the part of a parameter (or of its gradient)
    whose positions along `dim` carry the channel ids `ids`. `root` is dep.gm or a copy with the same paths.
    """
    full = lambda t: t  # noqa: E731
    for path, e in dep.modules.items():
        mod = root.get_submodule(path)
        s = e.slots
        if e.kind in ("conv", "linear"):
            yield "weight", mod.weight, full, 0, s["out"]
            if mod.bias is not None:
                yield "weight", mod.bias, full, 0, s["out"]
            if e.kind == "linear" or mod.groups == 1:
                yield "weight", mod.weight, full, 1, s["in"]
        elif e.kind == "conv_t":
            yield "weight", mod.weight, full, 0, s["in"]
            if mod.groups == 1:
                yield "weight", mod.weight, full, 1, s["out"]
            if mod.bias is not None:
                yield "weight", mod.bias, full, 0, s["out"]
        elif e.kind in ("norm", "prelu", "layernorm", "groupnorm"):
            for name in ("weight", "bias"):
                p = getattr(mod, name, None)
                if isinstance(p, torch.Tensor):
                    yield ("norm" if name == "weight" and e.kind != "prelu" else "weight"), p, full, 0, s["ch"]
        elif e.kind == "embedding":
            yield "weight", mod.weight, full, 1, s["out"]
        elif e.kind == "mha":
            em, hd = mod.embed_dim, mod.head_dim
            rows = np.repeat(s["heads"], hd)
            for i, (name, role) in enumerate((("q_proj_weight", "in_q"), ("k_proj_weight", "in_k"),
                                              ("v_proj_weight", "in_v"))):
                if mod._qkv_same_embed_dim:
                    w = mod.in_proj_weight
                    view = (lambda a, b: lambda t: t[a:b])(i * em, (i + 1) * em)
                else:
                    w, view = getattr(mod, name), full
                yield "weight", w, view, 0, rows
                yield "weight", w, view, 1, s[role]
                if mod.in_proj_bias is not None:
                    yield "weight", mod.in_proj_bias, (lambda a, b: lambda t: t[a:b])(i * em, (i + 1) * em), 0, rows
            yield "weight", mod.out_proj.weight, full, 0, s["out"]
            yield "weight", mod.out_proj.weight, full, 1, rows
            if mod.out_proj.bias is not None:
                yield "weight", mod.out_proj.bias, full, 0, s["out"]
    for target, p in dep.params.items():
        if p.ids is not None:
            value = _get_attr(root, target)
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                yield "weight", value, full, p.dim, p.ids


def _per_position(t: torch.Tensor, dim: int, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """fn(t) summed over every dim but `dim`, in float64 (numpy: small reductions stay cheap even when
    torch's thread pool is contended)."""
    a = t.detach().cpu().numpy().astype(np.float64)
    if a.ndim == 1:
        return fn(a)
    return fn(np.moveaxis(a, dim, 0).reshape(a.shape[dim], -1)).sum(axis=1)


def class_importance(dep: DependencyGraph, criterion: str, *, batches: Sequence[tuple] | None = None
                     ) -> tuple[np.ndarray, list[str]]:
    """Importance of every class (array indexed by class root; other entries are 0) and notes."""
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; use one of {', '.join(CRITERIA)}")
    n = dep.num_ids
    notes: list[str] = []
    if criterion in ("l1", "l2"):
        fn = np.abs if criterion == "l1" else np.square
        out = np.zeros(n)
        for _, p, view, dim, ids in weight_slices(dep, dep.gm):
            out += np.bincount(dep.cls[ids], _per_position(view(p), dim, fn), minlength=n)
        return out, notes
    if criterion == "bn_scale":
        bn = np.zeros(n)
        has_bn = np.zeros(n, dtype=bool)
        for kind, p, view, dim, ids in weight_slices(dep, dep.gm):
            if kind == "norm":
                roots = dep.cls[ids]
                bn += np.bincount(roots, _per_position(view(p), dim, np.abs), minlength=n)
                has_bn[roots] = True
        out = bn.copy()
        lacking = [g for g in dep.groups if not has_bn[g.classes].all()]
        if lacking:
            l1, _ = class_importance(dep, "l1")
            for g in lacking:
                out[g.classes] = l1[g.classes]
            n_pr = sum(1 for g in lacking if g.prunable)
            if n_pr:
                notes.append(f"bn_scale: {n_pr} prunable group(s) have no normalization layer; ranked by l1")
        return out, notes
    # taylor
    if not batches:
        raise ValueError("criterion 'taylor' needs calibration batches")
    work = copy.deepcopy(dep.gm).eval()
    for p in work.parameters():
        p.requires_grad_(True)
    slices = list(weight_slices(dep, work))
    total = np.zeros(n)
    for batch in batches:
        work.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = taylor_loss(work(*batch))
            if not loss.requires_grad:
                raise ValueError("the model's outputs do not depend on its parameters")
            loss.backward()
        per = np.zeros(n)
        for _, p, view, dim, ids in slices:
            if p.grad is None:
                continue
            prod = view(p).detach() * view(p.grad)
            per += np.bincount(dep.cls[ids], _per_position(prod, dim, lambda a: a), minlength=n)
        total += np.abs(per)
    return total / len(batches), notes


def taylor_loss(out: Any) -> torch.Tensor:
    """Cross-entropy against the model's own arg-max for a single 2-D float output, else mean of squares."""
    tensors = [t for t in flatten_outputs(out) if t.is_floating_point()]
    if not tensors:
        raise ValueError("the model returns no floating-point tensor to take gradients of")
    if len(tensors) == 1 and tensors[0].dim() == 2 and tensors[0].shape[1] > 1:
        logits = tensors[0]
        return F.cross_entropy(logits, logits.detach().argmax(dim=1))
    return sum(t.square().mean() for t in tensors)

