"""cleanup: remove inference no-ops (Dropout, Identity, ...) and dead code."""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..analysis.mutation import eliminate_dead_code
from ..pipeline import Context, Pass, PassResult, register_pass

_NOOP_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                 nn.FeatureAlphaDropout)
_DROPOUT_FUNCS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                  F.feature_alpha_dropout, torch.dropout}
_NOOP_METHODS = {"contiguous", "detach"}


def _training_flag(node: fx.Node) -> object:
    """The `training` argument of a functional dropout call (False when it is not given)."""
    if "training" in node.kwargs:
        return node.kwargs["training"]
    if node.target is torch.dropout:
        return node.args[2] if len(node.args) > 2 else False
    return node.args[2] if len(node.args) > 2 else True   # F.dropout's default is training=True


@register_pass("cleanup")
@dataclass
class Cleanup(Pass):
    """Remove what does nothing at inference and code whose result is never used.

    Changes: drops Identity and Dropout-family modules, functional dropout with training=False (or
    training=True, since an optimized model is for inference: that call is then replaced by its input,
    and the report says so), `.detach()` calls, `.contiguous()` calls unless a user depends on the memory
    layout (`.view()`, which fails on a transposed tensor: kept, and the report says so), `x * 1`, `x + 0`;
    then dead nodes (not those that change a tensor in place: graphopt.analysis.mutation) and unused submodules.
    Exact at inference: the outputs of the eval-mode model are unchanged bit for bit.
    """

    exact = True

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        removed: dict[str, int] = {}
        notes: list[str] = []
        kept_contiguous = 0
        for node in list(gm.graph.nodes):
            kind = None
            if node.op == "call_module":
                mod = gm.get_submodule(str(node.target))
                if isinstance(mod, _NOOP_MODULES):
                    kind = type(mod).__name__
            elif node.op == "call_function" and node.target in _DROPOUT_FUNCS:
                training = _training_flag(node)
                if training is not False:
                    notes.append(f"removed '{node.name}' ({node.target.__name__} with training={training}): "
                                 f"the optimized model is for inference")
                kind = node.target.__name__
            elif node.op == "call_method" and node.target in _NOOP_METHODS and len(node.args) == 1:
                if node.target == "contiguous" and any(_needs_contiguous(u) for u in node.users):
                    kept_contiguous += 1
                    continue
                kind = f".{node.target}()"
            elif node.op == "call_function" and node.target in (operator.mul, operator.add, torch.mul,
                                                                 torch.add) and len(node.args) == 2 \
                    and not node.kwargs:
                a, b = node.args
                neutral = 1 if node.target in (operator.mul, torch.mul) else 0
                if isinstance(a, fx.Node) and type(b) in (int, float) and b == neutral and \
                        _keeps_dtype(a, b):
                    kind = "x*1" if neutral == 1 else "x+0"
            if kind is None:
                continue
            src = node.args[0] if node.args else None
            if not isinstance(src, fx.Node):
                continue
            node.replace_all_uses_with(src)
            gm.graph.erase_node(node)
            removed[kind] = removed.get(kind, 0) + 1
        dead = eliminate_dead_code(gm)             # keeps what changes a tensor in place
        if dead:
            removed["dead nodes"] = dead
        gm.delete_all_unused_submodules()
        gm.recompile()
        details = [{"removed": k, "count": v} for k, v in removed.items()]
        if removed:
            notes.append("removed " + ", ".join(f"{v} {k}" for k, v in removed.items()))
        if kept_contiguous:
            notes.append(f"kept {kept_contiguous} .contiguous() whose result is .view()-ed (a view needs "
                         f"contiguous memory; without it the graph fails, e.g. ShuffleNet's channel shuffle)")
        return PassResult(gm, changed=bool(removed), notes=notes, details=details)


_NEEDS_CONTIGUOUS_METHODS = {"view", "is_contiguous", "stride", "data_ptr"}


def _needs_contiguous(user: fx.Node) -> bool:
    """Whether `user` depends on its input's memory layout (x.view fails on a transposed tensor)."""
    if user.op == "call_method":
        return user.target in _NEEDS_CONTIGUOUS_METHODS
    return user.op == "call_function" and user.target in (torch.Tensor.view, torch.Tensor.is_contiguous)


def _keeps_dtype(node: fx.Node, scalar: object) -> bool:
    """x*1 / x+0 is a no-op only when it does not promote x's dtype (int tensor * 1.0 becomes float)."""
    meta = node.meta.get("tensor_meta")
    dtype = getattr(meta, "dtype", None)
    if dtype is None:
        return False
    return dtype.is_floating_point or isinstance(scalar, int)
