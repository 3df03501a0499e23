"""FLOPs and parameter counts from propagated shapes.

FLOPs are 2 x multiply-accumulates of the linear-algebra ops (conv, linear, matmul, attention); like
fvcore/thop we leave out elementwise ops, norms and pooling, which are a few percent at most on the models
we target. Requires `propagate_shapes` to have run.
"""
from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from .shapes import node_shape

_MATMUL_FUNCS = {torch.matmul, operator.matmul, torch.bmm, torch.mm}


def _numel(shape) -> int:
    return int(math.prod(shape)) if shape is not None else 0


def _conv_flops(out_shape, weight_shape, transposed: bool, in_shape=None) -> int:
    if out_shape is None:
        return 0
    # weight: (Cout, Cin/g, *k) for conv; (Cin, Cout/g, *k) for transposed conv
    k = _numel(weight_shape[2:])
    if not transposed:
        return 2 * _numel(out_shape) * weight_shape[1] * k
    # transposed: every input element is multiplied by Cout/g * k weights
    return 2 * _numel(in_shape) * weight_shape[1] * k if in_shape is not None else 0


def node_flops(gm: fx.GraphModule, node: fx.Node) -> int:
    """FLOPs of one node (0 for ops we do not count)."""
    out = node_shape(node)
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return _conv_flops(out, tuple(mod.weight.shape), False)
        if isinstance(mod, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            return _conv_flops(out, tuple(mod.weight.shape), True, node_shape(node.args[0]))
        if isinstance(mod, nn.Linear):
            return 2 * _numel(out) * mod.in_features
        if isinstance(mod, nn.MultiheadAttention):
            q = node_shape(node.args[0])
            k = node_shape(node.args[1]) if len(node.args) > 1 else q
            if q is None or k is None:
                return 0
            e = mod.embed_dim
            lq, lk = _numel(q) // e, _numel(k) // e
            proj = 2 * (lq * e * e + 2 * lk * e * e + lq * e * e)
            return proj + 2 * 2 * lq * (k[-2] if mod.batch_first else k[0]) * e
        if hasattr(mod, "flops") and callable(mod.flops):   # modules that know their own cost
            return int(mod.flops(node))
        return 0
    if node.op == "call_function":
        t = node.target
        name = getattr(t, "__name__", str(t))
        if t is F.linear or name in ("linear", "linear.default", "addmm.default", "mm.default"):
            w = node.args[1]
            ws = node_shape(w) if isinstance(w, fx.Node) else None
            if ws is None or out is None:
                return 0
            inner = ws[0] if name in ("addmm.default", "mm.default") else ws[-1]
            return 2 * _numel(out) * inner
        if t in _MATMUL_FUNCS or name in ("matmul", "bmm.default", "matmul.default"):
            a = node_shape(node.args[0]) if isinstance(node.args[0], fx.Node) else None
            if a is None or out is None:
                return 0
            return 2 * _numel(out) * a[-1]
        if t in (F.conv1d, F.conv2d, F.conv3d) or name in ("convolution.default", "conv2d.default",
                                                             "conv1d.default"):
            w = node.args[1]
            ws = node_shape(w) if isinstance(w, fx.Node) else None
            transposed = bool(node.args[6]) if name == "convolution.default" and len(node.args) > 6 else False
            if ws is None:
                return 0
            return _conv_flops(out, ws, transposed, node_shape(node.args[0]))
        if t is F.scaled_dot_product_attention or name == "scaled_dot_product_attention.default":
            q, k = (node_shape(a) if isinstance(a, fx.Node) else None for a in node.args[:2])
            if q is None or k is None:
                return 0
            return 2 * 2 * _numel(q) * k[-2]
    if node.op == "call_method" and node.target == "matmul":
        a = node_shape(node.args[0])
        return 2 * _numel(out) * a[-1] if a is not None and out is not None else 0
    return 0


def count_flops(gm: fx.GraphModule) -> int:
    return sum(node_flops(gm, n) for n in gm.graph.nodes)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def model_size_bytes(module: nn.Module) -> int:
    """Bytes of parameters and buffers (int8 weights kept as buffers count at 1 byte each)."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total
