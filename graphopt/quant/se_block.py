"""Squeeze-and-excitation layers: found by structure, so static quantization can keep them in float32.

An SE block (MobileNetV3, EfficientNet, RegNetY, SE-ResNet; timm's SqueezeExcite / SEModule, torchvision's
SqueezeExcitation) pools a feature map to one value per channel, runs two small layers (Conv2d 1x1 on a 1x1
map, or Linear) and multiplies the feature map by the gate (sigmoid / hard-sigmoid) they produce.

Why float: those layers are matrix-vector products on the pooled vector (C·C/r multiply-adds per image, next
to H·W·C·C for the block's pointwise convs), so integer kernels save nothing there; and their input, a
vector of per-channel means whose magnitudes differ by orders of magnitude from channel to channel, is what
per-tensor activation quantization handles worst (the small channels round to zero), while the gate scales
every channel of the feature map. Measured on timm mobilenetv3_large_100 (README, ecosystem coverage): the
SE layers quantized alone cost 0.012 of output cosine, more than all 15 depthwise convs together. OpenVINO's
NNCF leaves the same pattern unquantized by default (its SE_BLOCK ignored pattern).

Recognised by structure, not by name: a Conv2d / Linear layer whose output reaches, only through tensors no
larger than the layer's own input or output (activations, norms, the other SE layer, reshapes), one operand
of a multiplication whose other operand is larger (the feature map the gate broadcasts over).
"""
from __future__ import annotations

import operator

import torch
from torch import fx

__all__ = ["squeeze_excitation_layers"]

_MUL = {operator.mul, torch.mul, torch.ops.aten.mul.Tensor}
MAX_DEPTH = 8                     # nodes between the layer and the gating multiply (act, bn, conv, gate, view)


def _numel(node, gm: fx.GraphModule) -> int | None:
    """Elements of `node`'s tensor (tensor_meta; an observer/quantize node inserted after the shapes were
    propagated passes its input's through)."""
    for _ in range(4):
        if not isinstance(node, fx.Node):
            return None
        meta = node.meta.get("tensor_meta")
        shape = getattr(meta, "shape", None)
        if shape is not None:
            n = 1
            for d in shape:
                if not isinstance(d, int):
                    return None                   # symbolic (dynamic) dim: no claim
                n *= d
            return n
        if node.op == "call_module" and len(node.args) == 1:
            node = node.args[0]                   # an observer: same tensor
            continue
        return None
    return None


def _is_mul(node: fx.Node) -> bool:
    return ((node.op == "call_function" and node.target in _MUL) or
            (node.op == "call_method" and node.target == "mul")) and len(node.args) == 2


def _gates_a_larger_tensor(gm: fx.GraphModule, site: fx.Node) -> bool:
    sizes = [_numel(a, gm) for a in site.args[:1]] + [_numel(site, gm)]
    if any(s is None for s in sizes):
        return False
    limit = max(sizes)
    frontier, seen = [site], {site}
    for _ in range(MAX_DEPTH):
        nxt = []
        for node in frontier:
            for user in node.users:
                if user in seen or user.op == "output":
                    continue
                seen.add(user)
                if _is_mul(user):
                    other = user.args[1] if user.args[0] is node else user.args[0]
                    n_other = _numel(other, gm)
                    if n_other is not None and n_other > limit:
                        return True
                n = _numel(user, gm)
                if n is not None and n <= limit:
                    nxt.append(user)
        frontier = nxt
        if not frontier:
            break
    return False


def squeeze_excitation_layers(gm: fx.GraphModule, sites) -> list[str]:
    """The module paths of the Conv2d / Linear `sites` (graphopt.quant.graph.Site) of `gm` that belong to a
    squeeze-and-excitation gate. Needs propagated shapes (tensor_meta), as capture() leaves them."""
    return [s.path for s in sites if s.kind in ("conv2d", "linear") and _gates_a_larger_tensor(gm, s.node)]
