"""prune: structured pruning that removes whole channels, features and attention heads."""
from __future__ import annotations

import dataclasses

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import fx, nn

from ..analysis.dependency import DependencyGraph, Label, TupleLabel, build_dependency_graph
from ..analysis.flops import count_flops, count_params, node_flops
from ..analysis.importance import CRITERIA, class_importance
from ..analysis.shapes import node_shape, propagate_shapes
from ..errors import PipelineError
from ..pipeline import Context, Pass, PassResult, register_pass
from ._prune_rebuild import copy_for_rebuild, rebuild
from ._prune_select import Plan, Selector

__all__ = ["Prune", "PruneOutcome"]

# rebuilds tried, each keeping the channels around the last one's failure (torchvision's maxvit_t takes 5: one
# per stage whose attention reshapes to its residual stream's width)
_MAX_ATTEMPTS = 10
_LAYER_KINDS = ("conv", "conv_t", "linear", "mha", "embedding")


@dataclass
class PruneOutcome:
    gm: fx.GraphModule
    kept: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # path -> slot -> kept positions
    details: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    dep: DependencyGraph | None = None
    plan: Plan | None = None
    flops_before: int = 0
    flops_after: int = 0

    @property
    def changed(self) -> bool:
        return bool(self.kept)


@register_pass("prune")
@dataclass
class Prune(Pass):
    """Remove whole channels / features / attention heads and rebuild the layers with smaller weights.

    Changes: finds the groups of coupled channels (analysis/dependency.py: conv→BN→act chains, residual
    adds, concat, split/chunk, depthwise and grouped convs, flatten→Linear, LayerNorm/GroupNorm, SE gating,
    multi-head attention), ranks each group's channels by `criterion` (analysis/importance.py), removes the
    least important ones and rebuilds every affected module from the kept slices of its weights, biases and
    BatchNorm statistics (passes/_prune_rebuild.py). nn.MultiheadAttention whose heads or features are cut
    becomes separate q/k/v/out Linear layers around scaled_dot_product_attention.

    Keeps exactly: the graph's inputs and output shapes; every kept weight is the original value (no
    fine-tuning, no re-scaling). Channels that reach a graph output (the classifier's outputs), modules
    matched by `exclude` (fnmatch patterns on module paths, e.g. "layer4.*"), and anything the analysis
    cannot follow safely are left whole; the report's notes say which and why.

    Approximates: the outputs change; nothing here bounds by how much (the pass manager measures it). What
    is exact: the pruned graph computes what the original computes with the removed channels' weights set
    to zero (tested on random residual/concat/depthwise/grouped/SE/GroupNorm networks); where a norm
    normalizes over pruned features (LayerNorm, GroupNorm with one group) its statistics see fewer of them.
    With ratio=0 and no flops_reduction nothing is removed and the graph is returned unchanged (exact).

    Safety: the rebuilt graph is run on the example inputs and every node's shape is compared with the
    plan's; at the first node that differs (e.g. a reshape whose size is computed from another tensor), the
    channels around it are kept and the plan is rebuilt (the note names the node).

    Options:
      ratio            fraction of each group's channels to remove (scope=layer) or of all prunable channels
                       (scope=global), before rounding
      flops_reduction  fraction of the model's FLOPs to remove (0.5 halves them); replaces `ratio`
      criterion        l1 | l2 | bn_scale | taylor (taylor needs calibration data; see importance.py)
      scope            layer (same ratio everywhere) | global (rank channels across layers)
      multiple         kept channel counts are multiples of this (vector-friendly shapes); heads round whole;
                       default: the float32 vector width of the pipeline's target (16 on AVX-512, 8 AVX2,
                       4 NEON; 8 for cuda/torch), so pruned layers keep whole vectors in compiled kernels
      min_channels     never keep fewer channels than this in a layer (a smaller layer is left as it is)
      exclude          module path patterns never to change
      prune_heads      allow removing attention heads (false: heads and reshaped head groups stay)
      taylor_batches   calibration batches used by criterion=taylor
    """

    ratio: float = 0.3
    flops_reduction: float | None = None
    criterion: Literal["l1", "l2", "bn_scale", "taylor"] = "l1"
    scope: Literal["layer", "global"] = "layer"
    multiple: int | None = None
    min_channels: int = 8
    exclude: list[str] = field(default_factory=list)
    prune_heads: bool = True
    taylor_batches: int = 4

    exact = False

    def __post_init__(self):
        if not 0.0 <= self.ratio < 1.0:
            raise PipelineError(f"prune: ratio must be in [0, 1), got {self.ratio}")
        if self.flops_reduction is not None:
            if not 0.0 <= self.flops_reduction < 1.0:
                raise PipelineError(f"prune: flops_reduction must be in [0, 1), got {self.flops_reduction}")
        if self.criterion not in CRITERIA:
            raise PipelineError(f"prune: criterion must be one of {', '.join(CRITERIA)}, got {self.criterion!r}")
        if self.scope not in ("layer", "global"):
            raise PipelineError(f"prune: scope must be 'layer' or 'global', got {self.scope!r}")
        if (self.multiple is not None and self.multiple < 1) or self.min_channels < 1 or self.taylor_batches < 1:
            raise PipelineError("prune: multiple, min_channels and taylor_batches must be >= 1")
        if isinstance(self.exclude, str):
            self.exclude = [self.exclude]
        self.exclude = list(self.exclude)

    def is_exact(self) -> bool:
        return not self._removes_anything()

    def _removes_anything(self) -> bool:
        if self.flops_reduction is not None:
            return self.flops_reduction > 0
        return self.ratio > 0

    # ------------------------------------------------------------------------------------------- run
    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        batches = None
        if self.criterion == "taylor" and self._removes_anything():
            batches = ctx.calibration_batches(self.taylor_batches, needed_by="prune(criterion=taylor)")
        out = self.apply(gm, ctx.example_inputs, batches=batches, target=ctx.target)
        return PassResult(out.gm, changed=out.changed, notes=out.notes, details=out.details)

    def apply(self, gm: fx.GraphModule, example_inputs: tuple, *, batches=None, target="torch") -> PruneOutcome:
        """Prune `gm` (not modified; a pruned copy is returned in the outcome). `target` sets the default
        `multiple`."""
        if self.multiple is None:
            from ..backends.targets import vector_channels

            return dataclasses.replace(self, multiple=vector_channels(target)).apply(
                gm, example_inputs, batches=batches, target=target)
        if not isinstance(example_inputs, tuple):
            example_inputs = (example_inputs,)
        if not _has_shapes(gm, example_inputs):
            propagate_shapes(gm, example_inputs)
        flops_before = count_flops(gm)
        if not self._removes_anything():
            return PruneOutcome(gm, notes=["nothing to remove (ratio=0): graph unchanged"],
                                flops_before=flops_before, flops_after=flops_before)
        dep = build_dependency_graph(gm, exclude=self.exclude, prune_heads=self.prune_heads)
        if self.criterion == "taylor" and not batches:
            raise PipelineError("prune(criterion=taylor) needs calibration batches")
        if not any(g.prunable for g in dep.groups):
            return PruneOutcome(gm, notes=[_nothing_prunable(gm, dep)] + _left_alone(dep), dep=dep,
                                flops_before=flops_before, flops_after=flops_before)
        imp, notes = class_importance(dep, self.criterion, batches=batches)
        before = _layer_stats(gm, dep)
        shapes = {n.name: node_shape(n) for n in gm.graph.nodes}
        for attempt in range(_MAX_ATTEMPTS):
            sel = Selector(dep, imp, scope=self.scope, multiple=self.multiple, min_channels=self.min_channels)
            if self.flops_reduction is not None:
                plan, warn = sel.for_flops(self.flops_reduction)
            else:
                plan, warn = sel.plan(self.ratio), ""
            work, kept, origin = rebuild(copy_for_rebuild(gm, dep, plan.keep), dep, plan.keep)
            failed = _first_failure(work, example_inputs, dep, plan.keep, shapes)
            if failed is None:
                break
            node_name, err = failed
            roots = _classes_near(dep, gm, origin.get(node_name, node_name))
            roots = roots[~dep.blocked[roots]] if len(roots) else roots
            if not len(roots):
                return PruneOutcome(gm, notes=notes + [
                    f"left the graph unpruned: the pruned graph fails at '{node_name}' ({err}) and the "
                    f"channels involved cannot be told apart"], dep=dep, flops_before=flops_before,
                    flops_after=flops_before)
            reason = f"the pruned graph failed at '{node_name}' ({err})"
            dep.block_classes(roots, reason)
            notes.append(f"kept {len(roots)} channel classes around '{node_name}': {reason}")
        else:
            return PruneOutcome(gm, notes=notes + ["left the graph unpruned: no valid pruned graph after "
                                                   f"{_MAX_ATTEMPTS} attempts"], dep=dep,
                                flops_before=flops_before, flops_after=flops_before)
        if warn:
            notes.append(warn)
        propagate_shapes(work, example_inputs)
        flops_after = count_flops(work)
        details = _details(before, _layer_stats(work, dep), dep)
        notes = _summary(dep, plan, flops_before, flops_after, self) + notes + _left_alone(dep)
        return PruneOutcome(work, kept, details, notes, dep, plan, flops_before, flops_after)


# ------------------------------------------------------------------------------------------- helpers
def _has_shapes(gm: fx.GraphModule, example_inputs: tuple) -> bool:
    """Whether shapes were propagated with inputs of these shapes (the pass manager does so before each
    pass; a graph traced by hand has none)."""
    ph = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(ph) != len(example_inputs):
        return False
    for n, x in zip(ph, example_inputs):
        meta = n.meta.get("tensor_meta")
        if not isinstance(x, torch.Tensor) or getattr(meta, "shape", None) != x.shape:
            return False
    return all("tensor_meta" in n.meta for n in gm.graph.nodes if n.op == "call_module")


class _Checking(fx.Interpreter):
    """Runs the pruned graph and stops at the first node whose shape differs from what the plan predicts
    (the original shape with each channel dim cut to its kept positions)."""

    def __init__(self, gm: fx.GraphModule, dep: DependencyGraph, keep: np.ndarray, shapes: dict):
        super().__init__(gm)
        self.dep, self.keep, self.shapes = dep, keep, shapes
        self.current = ""

    def run_node(self, n):
        self.current = n.name
        result = super().run_node(n)
        old = self.shapes.get(n.name)
        lab = self.dep.labels.get(n.name)
        if isinstance(result, torch.Tensor) and old is not None and isinstance(lab, Label) \
                and n.op != "get_attr":
            want = list(old)
            if lab.dim is not None:
                want[lab.dim] = len(self.dep.kept_positions(lab.ids, self.keep))
            elif lab.param is not None:                 # a parameter sliced where it meets channels
                target, dmap = lab.param
                entry = self.dep.params.get(target)
                if entry is not None and entry.ids is not None:
                    for d, pd in dmap.items():
                        if pd == entry.dim and old[d] == len(entry.ids):
                            want[d] = len(self.dep.kept_positions(entry.ids, self.keep))
            if list(result.shape) != want:
                raise _ShapeMismatch(f"it produces shape {tuple(result.shape)}, the plan expects {tuple(want)}")
        return result


class _ShapeMismatch(Exception):
    pass


def _first_failure(gm: fx.GraphModule, example_inputs: tuple, dep: DependencyGraph, keep: np.ndarray,
                   shapes: dict) -> tuple[str, str] | None:
    interp = _Checking(gm, dep, keep, shapes)
    try:
        with torch.no_grad():
            interp.run(*example_inputs)
    except _ShapeMismatch as e:
        return interp.current, str(e).strip().splitlines()[0]
    except Exception as e:                       # noqa: BLE001 - any failure names a node to keep whole
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return interp.current, f"{type(e).__name__}: {msg[:200]}"
    return None


def _classes_near(dep: DependencyGraph, gm: fx.GraphModule, name: str) -> np.ndarray:
    """The channel classes to keep whole where the pruned graph failed at node `name` (blocked ones included): those
    of the node's own output and inputs; failing that, those of the tensors whose sizes it reads (a reshape
    to `x.shape[-1]` channels after an op the analysis could not follow, e.g. MaxViT's attention: the
    einsum's output has the attention's width, the reshape takes the residual stream's) and of its nearest
    ancestors that carry channels."""
    node = next((n for n in gm.graph.nodes if n.name == name), None)
    if node is None:
        return np.zeros(0, dtype=np.int64)
    labs = [dep.labels.get(name)]
    fx.node.map_arg((node.args, node.kwargs), lambda a: labs.append(dep.labels.get(a.name)))
    if node.op == "call_module" and str(node.target) in dep.modules:
        labs.extend(Label(0, ids) for ids in dep.modules[str(node.target)].slots.values())
    ids = _channel_ids(labs)
    if not ids:
        ids = _channel_ids([dep.labels.get(n.name) for n in _size_sources(node) + _labelled_ancestors(dep, node)])
    if not ids:
        return np.zeros(0, dtype=np.int64)
    return np.unique(dep.cls[np.concatenate(ids)])


def _channel_ids(labs: list) -> list[np.ndarray]:
    ids = []
    for lab in labs:
        items = lab.items if isinstance(lab, TupleLabel) else [lab]
        for it in items:
            if isinstance(it, Label) and it.dim is not None:
                ids.append(it.ids)
    return ids


def _size_sources(node: fx.Node) -> list[fx.Node]:
    """The tensors whose sizes flow into `node`'s arguments (x.shape, x.size(), and arithmetic on them)."""
    found, seen, todo = [], set(), list(node.all_input_nodes)
    while todo:
        a = todo.pop()
        if a.name in seen:
            continue
        seen.add(a.name)
        if node_shape(a) is not None:                    # a tensor: only its size is read through a size node
            continue
        reads_size = (a.op == "call_method" and a.target == "size") or \
                     (a.op == "call_function" and a.target is getattr and a.args[1:] == ("shape",))
        if reads_size and isinstance(a.args[0], fx.Node):
            found.append(a.args[0])
        else:
            todo.extend(a.all_input_nodes)
    return found


def _labelled_ancestors(dep: DependencyGraph, node: fx.Node, limit: int = 64) -> list[fx.Node]:
    """The nearest tensor ancestors of `node` whose labels carry channels (searching through at most `limit`
    tensors without channel labels)."""
    found, seen, todo = [], {node.name}, list(node.all_input_nodes)
    while todo and len(seen) < limit:
        a = todo.pop(0)
        if a.name in seen:
            continue
        seen.add(a.name)
        if _channel_ids([dep.labels.get(a.name)]):
            found.append(a)
        else:
            todo.extend(a.all_input_nodes)
    return found


def _channels(mod: nn.Module) -> tuple[int, int, str]:
    if isinstance(mod, nn.MultiheadAttention):
        return mod.embed_dim, mod.embed_dim, f"heads={mod.num_heads}"
    if hasattr(mod, "q_proj") and hasattr(mod, "num_heads"):              # PrunedMultiheadAttention
        return mod.q_proj.in_features, mod.out_proj.out_features, f"heads={mod.num_heads}"
    if isinstance(mod, nn.Linear):
        return mod.in_features, mod.out_features, ""
    if isinstance(mod, nn.Embedding):
        return mod.num_embeddings, mod.embedding_dim, ""
    groups = getattr(mod, "groups", 1)
    return mod.in_channels, mod.out_channels, f"groups={groups}" if groups > 1 else ""


def _layer_stats(gm: fx.GraphModule, dep: DependencyGraph) -> dict[str, dict]:
    flops: dict[str, int] = defaultdict(int)
    for n in gm.graph.nodes:
        if n.op == "call_module":
            owner = n.meta.get("graphopt_owner") or str(n.target)
        else:
            owner = n.meta.get("graphopt_owner")
        if owner is None:
            continue
        f = node_flops(gm, n)
        flops[owner] += f
    stats = {}
    for path, e in dep.modules.items():
        if e.kind not in _LAYER_KINDS:
            continue
        mod = gm.get_submodule(path)
        cin, cout, extra = _channels(mod)
        stats[path] = {"kind": e.kind, "in": cin, "out": cout, "extra": extra, "params": count_params(mod),
                       "flops": flops.get(path, 0)}
    return stats


def _details(before: dict, after: dict, dep: DependencyGraph) -> list[dict]:
    rows = []
    for path, b in before.items():
        a = after[path]
        extra = b["extra"] if b["extra"] == a["extra"] else f"{b['extra']} -> {a['extra']}"
        rows.append({"layer": path, "kind": b["kind"], "in_before": b["in"], "in_after": a["in"],
                     "out_before": b["out"], "out_after": a["out"], "params_before": b["params"],
                     "params_after": a["params"], "flops_before": b["flops"], "flops_after": a["flops"],
                     "note": extra})
    return rows


def _summary(dep: DependencyGraph, plan: Plan, flops_before: int, flops_after: int, opts: Prune) -> list[str]:
    prunable = [g for g in dep.groups if g.prunable]
    total = sum(g.size for g in prunable)
    removed = sum(int((~plan.keep[g.classes]).sum()) for g in prunable)
    touched = sum(1 for g in prunable if (~plan.keep[g.classes]).any())
    real = 1.0 - flops_after / flops_before if flops_before else 0.0
    target = (f"target {opts.flops_reduction:.1%}" if opts.flops_reduction is not None
              else f"ratio={opts.ratio:g}, scope={opts.scope}")
    return [f"removed {removed} of {total} prunable channel classes in {touched} of {len(prunable)} groups; "
            f"FLOPs -{real:.1%} ({target}; criterion={opts.criterion}, multiple={opts.multiple}, "
            f"min_channels={opts.min_channels})"]


def _nothing_prunable(gm: fx.GraphModule, dep: DependencyGraph) -> str:
    if not dep.modules:
        fn = [n for n in gm.graph.nodes if n.op == "call_function" and any(
            k in getattr(n.target, "__name__", str(n.target)) for k in ("conv", "linear", "addmm"))]
        extra = (f" (it has {len(fn)} functional conv/linear ops: an aten-level graph, e.g. captured by "
                 f"torch.export)" if fn else "")
        return ("nothing pruned: the graph calls no Conv/Linear/norm/attention modules; prune rebuilds "
                "modules of graphs captured with torch.fx.symbolic_trace" + extra)
    return "nothing pruned: every channel group must be kept (see the reasons below)"


def _left_alone(dep: DependencyGraph, limit: int = 8) -> list[str]:
    by_reason: dict[str, list] = defaultdict(lambda: [0, 0, []])
    for g in dep.groups:
        nb = int(g.blocked.sum())
        if not nb:
            continue
        reasons = sorted({dep.block_reason.get(int(r), "kept") for r in g.classes[g.blocked]})
        key = reasons[0]
        rec = by_reason[key]
        rec[0] += 1
        rec[1] += nb
        for layer in g.layers():
            if layer not in rec[2] and len(rec[2]) < 3:
                rec[2].append(layer)
    items = sorted(by_reason.items(), key=lambda kv: -kv[1][1])
    notes = [f"left {ch} channels in {n} group(s) unpruned ({', '.join(layers)}"
             f"{', ...' if n > 1 else ''}): {reason}" for reason, (n, ch, layers) in items[:limit]]
    if len(items) > limit:
        notes.append(f"... and {len(items) - limit} more reasons for keeping channels")
    return notes
