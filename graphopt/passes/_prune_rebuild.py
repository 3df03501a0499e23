"""Rebuild a graph with the channels a pruning plan keeps: smaller modules holding the kept slices.

`rebuild(gm, dep, keep)` works on `gm`, a copy of the analysed graph (same node names and module paths):
  - Conv / ConvTranspose / Linear / BatchNorm / InstanceNorm / LayerNorm / GroupNorm / PReLU / Embedding are
    replaced by new modules whose weights, biases and running statistics are the kept slices of the
    originals (grouped convs and GroupNorm keep whole groups, so their group count shrinks);
  - nn.MultiheadAttention with any slot pruned becomes `PrunedMultiheadAttention` (separate q/k/v/out Linear
    layers); its calls are inlined as Linear → unflatten → scaled_dot_product_attention → flatten → Linear;
  - get_attr parameters (class tokens, position embeddings) are sliced along their channel dim;
  - literal sizes in view / reshape / expand / unflatten that count channels are rewritten, split / chunk
    along channels become torch.split with the new section sizes;
  - num_heads-style attributes of modules owning split heads are updated.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from ..analysis.dependency import DependencyGraph, _get_attr

__all__ = ["PrunedMultiheadAttention", "copy_for_rebuild", "rebuild"]

_HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "n_head")
_HEAD_SIZE_ATTRS = ("all_head_size", "inner_dim")


class PrunedMultiheadAttention(nn.Module):
    """nn.MultiheadAttention with separate q/k/v/out projections, so heads and embedding features can be
    removed independently (its calls in a pruned graph are inlined; forward() is for standalone use).

    forward(query, key, value, need_weights=False) -> (output, None). No masks, no dropout (inference).
    """

    def __init__(self, q_proj: nn.Linear, k_proj: nn.Linear, v_proj: nn.Linear, out_proj: nn.Linear,
                 num_heads: int, head_dim: int, batch_first: bool):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = q_proj, k_proj, v_proj, out_proj
        self.num_heads, self.head_dim, self.batch_first = num_heads, head_dim, batch_first

    def forward(self, query, key, value, need_weights: bool = False, **unused):
        def heads(x):
            x = x.unflatten(-1, (self.num_heads, self.head_dim))
            return x.transpose(1, 2) if self.batch_first else x.permute(1, 2, 0, 3)

        o = F.scaled_dot_product_attention(heads(self.q_proj(query)), heads(self.k_proj(key)),
                                           heads(self.v_proj(value)))
        o = (o.transpose(1, 2) if self.batch_first else o.permute(2, 0, 1, 3)).flatten(-2)
        return self.out_proj(o), None


def _idx(a: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(a, dtype=torch.long)


def _take(t: torch.Tensor | None, dim: int, idx: np.ndarray) -> torch.Tensor | None:
    if t is None:
        return None
    return t.detach().index_select(dim, _idx(idx)).clone()


def _param(like: torch.Tensor, value: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(value, requires_grad=like.requires_grad)


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _shallow(mod: nn.Module) -> nn.Module:
    """A copy of `mod` with its own parameter/buffer dicts (tensors shared until replaced)."""
    new = copy.copy(mod)
    new.__dict__ = dict(new.__dict__)
    new._parameters = dict(mod._parameters)
    new._buffers = dict(mod._buffers)
    new._modules = dict(mod._modules)
    return new


def _changed(dep: DependencyGraph, keep: np.ndarray) -> set[str]:
    out = set()
    for path, e in dep.modules.items():
        if any(not keep[dep.cls[ids]].all() for ids in e.slots.values()):
            out.add(path)
    return out


def copy_for_rebuild(gm: fx.GraphModule, dep: DependencyGraph, keep: np.ndarray) -> fx.GraphModule:
    """deepcopy(gm), except the tensors of modules `rebuild` replaces anyway (they are only read)."""
    memo: dict[int, object] = {}
    for path in _changed(dep, keep):
        for t in list(gm.get_submodule(path).parameters()) + list(gm.get_submodule(path).buffers()):
            memo[id(t)] = t
    return copy.deepcopy(gm, memo)


def _new_module(kind: str, mod: nn.Module, idx: dict[str, np.ndarray]) -> nn.Module:
    new = _shallow(mod)
    if kind == "conv":
        out, inn, g = idx["out"], idx["in"], mod.groups
        if g == 1:
            w = _take(_take(mod.weight, 0, out), 1, inn)
            groups = 1
        else:
            groups = len(out) // (mod.out_channels // g)
            if len(inn) != groups * (mod.in_channels // g):
                raise ValueError(f"grouped conv keeps {len(out)} outputs but {len(inn)} inputs")
            w = _take(mod.weight, 0, out)
        new.weight = _param(mod.weight, w)
        if mod.bias is not None:
            new.bias = _param(mod.bias, _take(mod.bias, 0, out))
        new.in_channels, new.out_channels, new.groups = len(inn), len(out), groups
    elif kind == "conv_t":
        out, inn, g = idx["out"], idx["in"], mod.groups
        if g == 1:
            w = _take(_take(mod.weight, 0, inn), 1, out)
            groups = 1
        else:
            groups = len(inn) // (mod.in_channels // g)
            w = _take(mod.weight, 0, inn)
        new.weight = _param(mod.weight, w)
        if mod.bias is not None:
            new.bias = _param(mod.bias, _take(mod.bias, 0, out))
        new.in_channels, new.out_channels, new.groups = len(inn), len(out), groups
    elif kind == "linear":
        out, inn = idx["out"], idx["in"]
        new.weight = _param(mod.weight, _take(_take(mod.weight, 0, out), 1, inn))
        if mod.bias is not None:
            new.bias = _param(mod.bias, _take(mod.bias, 0, out))
        new.in_features, new.out_features = len(inn), len(out)
    elif kind in ("norm", "prelu", "layernorm", "groupnorm"):
        ch = idx["ch"]
        for name in ("weight", "bias"):
            p = getattr(mod, name, None)
            if isinstance(p, nn.Parameter):
                setattr(new, name, _param(p, _take(p, 0, ch)))
        for name in ("running_mean", "running_var"):
            b = getattr(mod, name, None)
            if isinstance(b, torch.Tensor):
                setattr(new, name, _take(b, 0, ch))
        if kind == "norm":
            new.num_features = len(ch)
        elif kind == "prelu":
            new.num_parameters = len(ch)
        elif kind == "layernorm":
            new.normalized_shape = (len(ch),)
        else:
            g, c = mod.num_groups, mod.num_channels
            new.num_channels = len(ch)
            new.num_groups = 1 if g == 1 else len(ch) // (c // g)
    elif kind == "embedding":
        new.weight = _param(mod.weight, _take(mod.weight, 1, idx["out"]))
        new.embedding_dim = len(idx["out"])
    else:
        raise ValueError(f"no rebuild rule for {kind}")
    return new


def _new_attention(mod: nn.MultiheadAttention, idx: dict[str, np.ndarray]) -> PrunedMultiheadAttention:
    em, hd = mod.embed_dim, mod.head_dim
    heads = idx["heads"]
    rows = (heads[:, None] * hd + np.arange(hd)[None, :]).reshape(-1)
    projs = []
    for i, (name, role) in enumerate((("q_proj_weight", "in_q"), ("k_proj_weight", "in_k"),
                                      ("v_proj_weight", "in_v"))):
        w = mod.in_proj_weight[i * em:(i + 1) * em] if mod._qkv_same_embed_dim else getattr(mod, name)
        b = mod.in_proj_bias[i * em:(i + 1) * em] if mod.in_proj_bias is not None else None
        lin = nn.Linear(len(idx[role]), len(rows), bias=b is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(_take(_take(w, 0, rows), 1, idx[role]))
            if b is not None:
                lin.bias.copy_(_take(b, 0, rows))
        projs.append(lin)
    o = mod.out_proj
    out = nn.Linear(len(rows), len(idx["out"]), bias=o.bias is not None, device=o.weight.device,
                    dtype=o.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(_take(_take(o.weight, 0, idx["out"]), 1, rows))
        if o.bias is not None:
            out.bias.copy_(_take(o.bias, 0, idx["out"]))
    return PrunedMultiheadAttention(*projs, out, len(heads), hd, mod.batch_first)


def _inline_attention(gm: fx.GraphModule, node: fx.Node, path: str, new: PrunedMultiheadAttention,
                      origin: dict[str, str]) -> None:
    g = gm.graph
    args = list(node.args) + [None] * 3
    q = args[0] if args[0] is not None else node.kwargs["query"]
    k = args[1] if args[1] is not None else node.kwargs["key"]
    v = args[2] if args[2] is not None else node.kwargs["value"]
    bf = new.batch_first
    made: list[fx.Node] = []

    def add(n: fx.Node) -> fx.Node:
        made.append(n)
        return n

    with g.inserting_before(node):
        def heads(x, proj):
            y = add(g.call_module(f"{path}.{proj}", (x,)))
            y = add(g.call_method("unflatten", (y, -1, (new.num_heads, new.head_dim))))
            return add(g.call_method("transpose", (y, 1, 2)) if bf else
                       g.call_method("permute", (y, 1, 2, 0, 3)))

        qh, kh, vh = heads(q, "q_proj"), heads(k, "k_proj"), heads(v, "v_proj")
        o = add(g.call_function(F.scaled_dot_product_attention, (qh, kh, vh)))
        o = add(g.call_method("transpose", (o, 1, 2)) if bf else g.call_method("permute", (o, 2, 0, 1, 3)))
        o = add(g.call_method("flatten", (o, -2)))
        out = add(g.call_module(f"{path}.out_proj", (o,)))
    for n in made:
        n.meta["graphopt_owner"] = path
        origin[n.name] = node.name
    for user in list(node.users):
        if user.args[1] == 0:
            user.replace_all_uses_with(out)
        g.erase_node(user)
    g.erase_node(node)


def _rewrite_shape(gm: fx.GraphModule, node: fx.Node, dim: int, old: int, new: int) -> None:
    def fix(seq, pos):
        seq = list(seq)
        if 0 <= pos < len(seq) and isinstance(seq[pos], int) and not isinstance(seq[pos], bool) \
                and seq[pos] == old:
            seq[pos] = new
        return seq

    t = node.target
    if node.op == "call_method" and t in ("view", "reshape", "expand"):
        if len(node.args) == 2 and isinstance(node.args[1], (tuple, list, torch.Size)):
            node.args = (node.args[0], tuple(fix(node.args[1], dim)))
        else:
            node.args = (node.args[0], *fix(node.args[1:], dim))
    elif node.op == "call_function" and t is torch.reshape:
        node.args = (node.args[0], tuple(fix(node.args[1], dim)))
    elif node.op == "call_method" and t == "unflatten":
        x, d, sizes = node.args[0], node.args[1], node.args[2]
        rank = len(node.meta["tensor_meta"].shape) - len(sizes) + 1
        d = d + rank if d < 0 else d
        node.args = (x, node.args[1], tuple(fix(sizes, dim - d)))
    elif node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        if isinstance(mod, nn.Unflatten):
            rank = len(node.meta["tensor_meta"].shape) - len(mod.unflattened_size) + 1
            d = mod.dim + rank if mod.dim < 0 else mod.dim
            mod.unflattened_size = tuple(fix(mod.unflattened_size, dim - d))


def rebuild(gm: fx.GraphModule, dep: DependencyGraph, keep: np.ndarray
            ) -> tuple[fx.GraphModule, dict[str, dict[str, np.ndarray]], dict[str, str]]:
    """Apply `keep` (bool per class root) to `gm` in place. Returns (gm, kept positions per module slot,
    {new node name: the original node it replaces})."""
    nodes = {n.name: n for n in gm.graph.nodes}
    kept: dict[str, dict[str, np.ndarray]] = {}
    origin: dict[str, str] = {}
    for path, e in dep.modules.items():
        idx = {role: dep.kept_positions(ids, keep) for role, ids in e.slots.items()}
        if all(len(idx[r]) == len(e.slots[r]) for r in idx):
            continue
        kept[path] = idx
        mod = gm.get_submodule(path)
        if e.kind == "mha":
            new = _new_attention(mod, idx)
            _set_submodule(gm, path, new)
            for name in dep.mha_calls.get(path, []):
                _inline_attention(gm, nodes[name], path, new, origin)
        else:
            _set_submodule(gm, path, _new_module(e.kind, mod, idx))
    for target, p in dep.params.items():
        if p.ids is None:
            continue
        idx = dep.kept_positions(p.ids, keep)
        if len(idx) == len(p.ids):
            continue
        kept[target] = {f"param[{p.dim}]": idx}
        owner_path, _, name = target.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        old = _get_attr(gm, target)
        value = _take(old, p.dim, idx)
        if isinstance(old, nn.Parameter):
            setattr(owner, name, _param(old, value))
        else:
            setattr(owner, name, value)
    for rw in dep.rewrites:
        node = nodes.get(rw.node)
        if node is None:
            continue
        if rw.kind == "shape":
            old, new = len(rw.ids[0]), len(dep.kept_positions(rw.ids[0], keep))
            if old != new:
                _rewrite_shape(gm, node, rw.dim, old, new)
        elif rw.kind == "split":
            sizes = [len(dep.kept_positions(ids, keep)) for ids in rw.ids]
            if sizes == [len(ids) for ids in rw.ids]:
                continue
            with gm.graph.inserting_before(node):
                new_node = gm.graph.call_function(torch.split, (node.args[0], sizes), {"dim": rw.dim})
            new_node.meta = dict(node.meta)
            origin[new_node.name] = node.name
            node.replace_all_uses_with(new_node)
            gm.graph.erase_node(node)
    for hs in dep.head_splits:
        old_h = len(hs.rows)
        new_h = len(dep.kept_positions(hs.rows, keep))
        if new_h == old_h:
            continue
        for src in hs.sources:
            parent = src.rpartition(".")[0]
            owner = gm.get_submodule(parent) if parent else gm
            for attr in _HEAD_ATTRS:
                if getattr(owner, attr, None) == old_h:
                    setattr(owner, attr, new_h)
            for attr in _HEAD_SIZE_ATTRS:
                if getattr(owner, attr, None) == old_h * hs.inner:
                    setattr(owner, attr, new_h * hs.inner)
    gm.graph.lint()
    gm.recompile()
    return gm, kept, origin

