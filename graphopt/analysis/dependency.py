"""Channel-dependency analysis: which channels of which layers must be removed together.

Every channel of every prunable layer gets an integer *id* (a conv's output channels, its input channels, a
BatchNorm's channels, a Linear's input features, an attention module's heads, a parameter's positions). We
then walk the fx graph once and follow, for every tensor, which of its positions carries which channel id
(a `Label`: the one dimension whose positions are channels, and the id at each position). Where the graph
forces two positions to be removed together (the two inputs of a residual add, a conv's input and the
channels of the tensor it reads, the q/k/v features of one attention head) their ids are *coupled*; the
connected components of the coupling are the *classes*: a class is removed whole or kept whole.

Op rules (the interesting ones):
  - conv / linear: input channels are coupled to the labels of the input; output channels are new ids.
    Grouped and depthwise convs couple all in/out channels of one group into one class, so groups shrink
    with channels (depthwise: the output channel follows its input channel).
  - BatchNorm / InstanceNorm / PReLU / LayerNorm(last dim) / GroupNorm: per-channel parameters coupled to
    the channels they normalize (GroupNorm with 1 < groups < C: whole groups).
  - elementwise ops with broadcasting (residual add, SE-style gating `x * sigmoid(fc(mean(x)))`): positions
    that meet are coupled; a broadcast operand (size 1) couples nothing.
  - cat along the channel dim concatenates the id lists (indices shift per input); split / chunk slice them.
  - view / reshape / flatten: the ids are carried through the reshape exactly, so flatten → Linear maps each
    channel to its H×W features. When a reshape splits a channel dim in two (a Linear's features into
    heads × head_dim), the outer dim keeps the label and each row is merged into one class: attention
    heads are pruned whole. matmul / scaled_dot_product_attention couple the contracted dims and the batch
    (head) dims of their operands.
  - nn.MultiheadAttention: heads are classes of their own; the embedding in/out features are coupled to the
    tensors around it (the rebuild replaces the module by separate q/k/v/out Linear layers).
  - parameters read with get_attr (ViT's class token and position embedding) are sliced along the dim where
    they meet a labelled tensor.

What is never pruned: channels that reach a graph output, channels of modules matched by an `exclude`
pattern, and anything the analysis does not understand: an op it has no rule for *blocks* the channels of
its tensor inputs (they are kept), with the reason recorded, so the result is conservative, never wrong.

Classes that appear in exactly the same set of layer slots form a `Group` (e.g. all layers on one residual
stream of a ResNet stage, or one DenseNet layer's new features and every layer that reads them). Groups are
the units that importance ranking and channel rounding work on. `DependencyGraph.graph` is a networkx graph
linking layers to the groups that couple them.
"""
from __future__ import annotations

import fnmatch
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Iterable

import networkx as nx
import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from .flops import node_flops
from .shapes import node_shape, propagate_shapes

__all__ = ["Label", "ModuleEntry", "ParamEntry", "Group", "DependencyGraph", "build_dependency_graph",
           "connected_classes"]

_MAX_RESHAPE_ELEMENTS = 20_000_000


# ---------------------------------------------------------------------------------------------- labels
class Label:
    """Which positions of a tensor are channels: `dim` (non-negative) and the channel id at each position.

    `dim is None`: the tensor has no prunable channel positions. `param` marks a tensor that is (an
    expanded view of) a get_attr parameter: (target, {tensor dim: parameter dim}).
    """

    __slots__ = ("dim", "ids", "param")

    def __init__(self, dim: int | None = None, ids: np.ndarray | None = None, param: tuple | None = None):
        self.dim, self.ids, self.param = dim, ids, param

    def __repr__(self) -> str:
        if self.param is not None:
            return f"Label(param={self.param[0]})"
        return "Label(none)" if self.dim is None else f"Label(dim={self.dim}, n={len(self.ids)})"


NONE = Label()


class TupleLabel:
    __slots__ = ("items",)

    def __init__(self, items: Iterable[Label]):
        self.items = tuple(items)


@dataclass
class ModuleEntry:
    """A module whose weights carry channel ids. `slots` maps a role to one id per position:

    conv/linear: "out", "in"; bn/ln/gn/prelu/instancenorm: "ch"; embedding: "out";
    multihead attention: "in_q", "in_k", "in_v", "heads", "out".
    """

    path: str
    module: nn.Module
    kind: str
    slots: dict[str, np.ndarray]
    nodes: list[str] = field(default_factory=list)


@dataclass
class ParamEntry:
    """A get_attr parameter sliced along `dim` with one id per position (`ids` None: never sliced)."""

    target: str
    dim: int | None = None
    ids: np.ndarray | None = None
    fixed: str = ""                 # why its shape must not change (used in a way we do not track)


@dataclass
class Group:
    """Classes that appear in the same set of layer slots (removing one removes it from all of them).

    slots: (owner, role) -> number of positions of this group's classes in that slot.
    width: gcd of positions per class over the producing slots (1 for plain channels, head_dim for heads).
    """

    index: int
    classes: np.ndarray            # class ids (roots)
    blocked: np.ndarray            # bool per class: must be kept
    slots: dict[tuple[str, str], int]
    width: int
    reasons: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.classes)

    @property
    def prunable(self) -> bool:
        return not bool(self.blocked.all())

    def layers(self) -> list[str]:
        seen: list[str] = []
        for owner, _ in self.slots:
            if owner not in seen:
                seen.append(owner)
        return seen


@dataclass
class FlopTerm:
    """FLOPs of one node after pruning: base × Π mean(kept positions of each id array)."""

    node: str
    owner: str
    base: int
    factors: list[np.ndarray]


@dataclass
class Rewrite:
    """A graph node whose literal arguments follow a channel count: shape args of view/reshape/expand
    (kind "shape": output dim `dim` has positions `ids`) or split/chunk sections along `dim` ("split")."""

    node: str
    kind: str
    dim: int
    ids: list[np.ndarray]


@dataclass
class HeadSplit:
    """A reshape that splits a channel dim into (rows × inner): rows are merged into classes (heads)."""

    node: str
    dim: int
    rows: np.ndarray               # one id per row (head)
    inner: int                     # positions per row (head_dim)
    sources: list[str] = field(default_factory=list)   # modules whose output features feed the split


class _Unsupported(Exception):
    pass


# --------------------------------------------------------------------------------------- union-find
def connected_classes(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Root (smallest member) of each of `n` ids after joining every pair (a[i], b[i])."""
    parent = np.arange(n, dtype=np.int64)
    if len(a) == 0:
        return parent
    while True:
        pa, pb = parent[a], parent[b]
        diff = pa != pb
        if not diff.any():
            return parent
        lo, hi = np.minimum(pa[diff], pb[diff]), np.maximum(pa[diff], pb[diff])
        np.minimum.at(parent, hi, lo)
        while True:                                   # pointer jumping: every id points at its root
            nxt = parent[parent]
            if np.array_equal(nxt, parent):
                break
            parent = nxt


# ------------------------------------------------------------------------------------------ op tables
_PASS_MODULES = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
                 nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Hardtanh, nn.Tanhshrink,
                 nn.Softsign, nn.LogSigmoid, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
                 nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_POOL_MODULES = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3, nn.AvgPool1d: 1, nn.AvgPool2d: 2,
                 nn.AvgPool3d: 3, nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3,
                 nn.AdaptiveMaxPool1d: 1, nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3, nn.LPPool1d: 1,
                 nn.LPPool2d: 2}
_CONV = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_CONV_T = {nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 2, nn.ConvTranspose3d: 3}
_NORM_CH = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d,
            nn.InstanceNorm3d)

_UNARY_FUNCS = {F.relu, torch.relu, F.relu6, F.gelu, F.silu, F.sigmoid, torch.sigmoid, torch.tanh, F.tanh,
                F.hardswish, F.hardsigmoid, F.leaky_relu, F.elu, F.selu, F.mish, F.softplus, F.hardtanh,
                torch.exp, torch.sqrt, torch.rsqrt, torch.abs, torch.erf, torch.neg, operator.neg,
                torch.clamp, torch.clip, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                F.feature_alpha_dropout, torch.dropout, torch.square, torch.log, F.logsigmoid}
_BINARY_FUNCS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub,
                 operator.imul, operator.itruediv, operator.pow, torch.add, torch.sub, torch.mul, torch.div,
                 torch.maximum, torch.minimum, torch.pow, torch.where, torch.true_divide}
_UNARY_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "sqrt", "rsqrt", "abs",
                  "neg", "clamp", "clamp_", "clip", "contiguous", "clone", "detach", "float", "half",
                  "double", "bfloat16", "to", "type", "square", "erf", "log", "requires_grad_", "cpu",
                  "cuda", "pow", "__neg__"}
_BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "masked_fill",
                   "masked_fill_", "type_as", "maximum", "minimum", "where"}
_RESHAPE_METHODS = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as",
                    "reshape_as"}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin", "var", "std", "prod", "logsumexp", "norm"}
_REDUCE_FUNCS = {torch.mean, torch.sum, torch.amax, torch.amin, torch.var, torch.std, torch.prod,
                 torch.logsumexp}
_POOL_FUNCS = {F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2, F.adaptive_avg_pool3d: 3,
               F.adaptive_max_pool1d: 1, F.adaptive_max_pool2d: 2, F.adaptive_max_pool3d: 3,
               F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3, F.max_pool1d: 1, F.max_pool2d: 2,
               F.max_pool3d: 3}


def _fn_name(t: Any) -> str:
    return getattr(t, "__name__", str(t))


def _meta_shapes(node: fx.Node) -> list[tuple[int, ...] | None] | None:
    """Shapes of a tuple-valued node's elements (None when the node is not a tuple of tensors)."""
    meta = node.meta.get("tensor_meta")
    if isinstance(meta, (tuple, list)):
        return [tuple(m.shape) if hasattr(m, "shape") else None for m in meta]
    return None


def _norm_dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


# ------------------------------------------------------------------------------------------- analyzer
class DependencyGraph:
    """The result of the analysis. Build with `build_dependency_graph(gm, example_inputs)`.

    Attributes:
      num_ids:   number of channel ids
      cls:       class (root id) of every id
      blocked:   bool per id (indexed by class root): the class must be kept
      modules:   module path -> ModuleEntry;  params: get_attr target -> ParamEntry
      groups:    the Groups (classes with the same set of slots), prunable or not
      graph:     networkx.Graph: ("layer", path) and ("group", i) nodes; edges carry role and count
      labels:    node name -> Label after the walk
      rewrites, head_splits, flop_terms: what the rebuild and the FLOPs model need
    """

    def __init__(self, gm: fx.GraphModule, *, exclude: Iterable[str] = (), prune_heads: bool = True):
        self.gm = gm
        self.exclude = list(exclude)
        self.prune_heads = prune_heads
        self.num_ids = 0
        self._pa: list[np.ndarray] = []
        self._pb: list[np.ndarray] = []
        self._blocks: list[tuple[np.ndarray, str]] = []
        self.modules: dict[str, ModuleEntry] = {}
        self.params: dict[str, ParamEntry] = {}
        self.labels: dict[str, Any] = {}
        self.rewrites: list[Rewrite] = []
        self.head_splits: list[HeadSplit] = []
        self.flop_terms: list[FlopTerm] = []
        self.mha_calls: dict[str, list[str]] = {}
        self.notes: list[str] = []
        self._canon: dict[int, str] = {}
        self._param_owners: dict[int, set[str]] = {}
        for path, mod in gm.named_modules(remove_duplicate=False):
            for p in mod.parameters(recurse=False):
                self._param_owners.setdefault(id(p), set()).add(path)
        self.cls = np.zeros(0, dtype=np.int64)
        self.blocked = np.zeros(0, dtype=bool)
        self.block_reason: dict[int, str] = {}
        self.groups: list[Group] = []
        self.graph = nx.Graph()

    # ---- id bookkeeping
    def fresh(self, n: int) -> np.ndarray:
        ids = np.arange(self.num_ids, self.num_ids + n, dtype=np.int64)
        self.num_ids += n
        return ids

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        a, b = np.asarray(a, dtype=np.int64).ravel(), np.asarray(b, dtype=np.int64).ravel()
        if a.shape != b.shape:
            raise AssertionError(f"coupling {a.shape} with {b.shape}")
        if len(a):
            self._pa.append(a)
            self._pb.append(b)

    def union_rows(self, rows: np.ndarray) -> np.ndarray:
        """Join every id of each row of a 2-D array; returns one representative per row."""
        rep = rows[:, 0]
        self.union(np.repeat(rep, rows.shape[1]), rows.reshape(-1))
        return rep

    def block(self, ids: np.ndarray | None, reason: str) -> None:
        if ids is not None and len(ids):
            self._blocks.append((np.asarray(ids, dtype=np.int64).ravel(), reason))

    def block_label(self, lab: Any, reason: str) -> None:
        if isinstance(lab, TupleLabel):
            for item in lab.items:
                self.block_label(item, reason)
        elif isinstance(lab, Label):
            if lab.dim is not None:
                self.block(lab.ids, reason)
            if lab.param is not None:
                self.fix_param(lab.param[0], reason)

    def fix_param(self, target: str, reason: str) -> None:
        entry = self.params.setdefault(target, ParamEntry(target))
        if not entry.fixed:
            entry.fixed = reason

    def slice_param(self, lab: Label, dim: int, ids: np.ndarray, where: str) -> None:
        """The parameter behind `lab` meets channel ids `ids` along its tensor dim `dim`."""
        target, dmap = lab.param
        pdim = dmap.get(dim)
        if pdim is None:               # that dim was created by expand: no parameter positions to slice
            return
        value = _get_attr(self.gm, target)
        size = value.shape[pdim]
        if size == 1 and len(ids) > 1:
            return
        if size != len(ids):
            self.block(ids, f"parameter '{target}' does not match the channels it meets at {where}")
            self.fix_param(target, "size mismatch")
            return
        entry = self.params.setdefault(target, ParamEntry(target))
        if entry.ids is None:
            entry.dim, entry.ids = pdim, ids
        elif entry.dim == pdim:
            self.union(entry.ids, ids)
        else:
            self.block(ids, f"parameter '{target}' meets channels along two dims")
            self.block(entry.ids, f"parameter '{target}' meets channels along two dims")

    # ---- labels
    def lab(self, x: Any) -> Any:
        if isinstance(x, fx.Node):
            return self.labels.get(x.name, NONE)
        return NONE

    def entry(self, node: fx.Node) -> ModuleEntry | None:
        mod = self.gm.get_submodule(str(node.target))
        path = self._canon.setdefault(id(mod), str(node.target))
        if path in self.modules:
            self.modules[path].nodes.append(node.name)
            return self.modules[path]
        e = self._make_entry(path, mod)
        if e is None:
            return None
        e.nodes.append(node.name)
        self.modules[path] = e
        owners = set()
        for p in mod.parameters():
            owners |= self._param_owners.get(id(p), set())
        shared = sorted(o for o in owners if o != path and not o.startswith(path + "."))
        if shared:
            for ids in e.slots.values():
                self.block(ids, f"'{path}' shares parameters with '{shared[0]}'")
        for pat in self.exclude:
            if fnmatch.fnmatchcase(path, pat):
                for ids in e.slots.values():
                    self.block(ids, f"'{path}' is excluded by pattern '{pat}'")
                break
        return e

    def _make_entry(self, path: str, mod: nn.Module) -> ModuleEntry | None:
        if isinstance(mod, tuple(_CONV)) or isinstance(mod, tuple(_CONV_T)):
            cin, cout, g = mod.in_channels, mod.out_channels, mod.groups
            e = ModuleEntry(path, mod, "conv_t" if isinstance(mod, tuple(_CONV_T)) else "conv",
                            {"out": self.fresh(cout), "in": self.fresh(cin)})
            if g > 1:      # one class per group: in and out channels of a group go together
                rows = np.concatenate([e.slots["in"].reshape(g, cin // g), e.slots["out"].reshape(g, cout // g)],
                                      axis=1)
                self.union_rows(rows)
            return e
        if isinstance(mod, nn.Linear):
            return ModuleEntry(path, mod, "linear", {"out": self.fresh(mod.out_features),
                                                     "in": self.fresh(mod.in_features)})
        if isinstance(mod, _NORM_CH):
            return ModuleEntry(path, mod, "norm", {"ch": self.fresh(mod.num_features)})
        if isinstance(mod, nn.PReLU) and mod.num_parameters > 1:
            return ModuleEntry(path, mod, "prelu", {"ch": self.fresh(mod.num_parameters)})
        if isinstance(mod, nn.LayerNorm) and len(mod.normalized_shape) == 1:
            return ModuleEntry(path, mod, "layernorm", {"ch": self.fresh(mod.normalized_shape[0])})
        if isinstance(mod, nn.GroupNorm):
            c, g = mod.num_channels, mod.num_groups
            e = ModuleEntry(path, mod, "groupnorm", {"ch": self.fresh(c)})
            if 1 < g < c:
                self.union_rows(e.slots["ch"].reshape(g, c // g))
            return e
        if isinstance(mod, nn.Embedding):
            return ModuleEntry(path, mod, "embedding", {"out": self.fresh(mod.embedding_dim)})
        if isinstance(mod, nn.MultiheadAttention):
            return ModuleEntry(path, mod, "mha", {"in_q": self.fresh(mod.embed_dim), "in_k": self.fresh(mod.kdim),
                                                  "in_v": self.fresh(mod.vdim), "heads": self.fresh(mod.num_heads),
                                                  "out": self.fresh(mod.embed_dim)})
        return None

    # ---- the walk
    def analyse(self) -> "DependencyGraph":
        for node in self.gm.graph.nodes:
            try:
                lab = self.visit(node)
            except _Unsupported as e:
                lab = NONE
                for arg in _node_args(node):
                    self.block_label(self.lab(arg), str(e))
            self.labels[node.name] = lab
        self._flop_terms()
        self._finalize()
        return self

    def visit(self, node: fx.Node) -> Any:
        op = node.op
        if op == "placeholder":
            return NONE
        if op == "get_attr":
            value = _get_attr(self.gm, str(node.target))
            if isinstance(value, torch.Tensor):
                return Label(param=(str(node.target), {d: d for d in range(value.dim())}))
            return NONE
        if op == "output":
            for arg in _node_args(node):
                self.block_label(self.lab(arg), "reaches the graph output")
            return NONE
        if op == "call_module":
            return self.visit_module(node)
        shape = node_shape(node)
        tuple_shapes = _meta_shapes(node)
        if shape is None and tuple_shapes is None:
            for arg in _node_args(node):      # x.shape / x.size(): fine; a parameter used that way is fixed
                lab = self.lab(arg)
                if isinstance(lab, Label) and lab.param is not None:
                    self.fix_param(lab.param[0], f"its size is read by '{node.name}'")
            return NONE
        if op == "call_function":
            return self.visit_function(node, node.target, shape, tuple_shapes)
        if op == "call_method":
            return self.visit_method(node, str(node.target), shape, tuple_shapes)
        raise _Unsupported(f"unknown node kind {op} at '{node.name}'")

    # ---- modules
    def visit_module(self, node: fx.Node) -> Any:
        mod = self.gm.get_submodule(str(node.target))
        x = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
        if isinstance(mod, _PASS_MODULES) or type(mod).__name__ in ("StochasticDepth",):
            return self.passthrough(x)
        if isinstance(mod, nn.MultiheadAttention):
            return self.visit_mha(node, mod)
        e = self.entry(node)
        xs = node_shape(x) if isinstance(x, fx.Node) else None
        if e is not None:
            if xs is None:
                raise _Unsupported(f"'{node.target}' input has no shape")
            rank = len(xs)
            if e.kind in ("conv", "conv_t"):
                k = (_CONV.get(type(mod)) or _CONV_T.get(type(mod)) or 2)
                cdim = rank - k - 1
                self.couple_input(e, "in", x, cdim, node)
                return Label(cdim, e.slots["out"])
            if e.kind == "linear":
                self.couple_input(e, "in", x, rank - 1, node)
                return Label(rank - 1, e.slots["out"])
            if e.kind == "embedding":
                if self.lab(x).param is not None:
                    self.fix_param(self.lab(x).param[0], f"used as indices by '{e.path}'")
                return Label(len(node_shape(node)) - 1, e.slots["out"])
            if e.kind in ("norm", "prelu", "groupnorm"):
                cdim = 1 if rank > 1 else 0
                if isinstance(mod, (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)):
                    cdim = rank - int(type(mod).__name__[-2]) - 1
                return self.per_channel(e, x, cdim, node)
            if e.kind == "layernorm":
                return self.per_channel(e, x, rank - 1, node)
        if isinstance(mod, nn.LayerNorm):        # normalized over several dims
            lab = self.lab(x)
            k = len(mod.normalized_shape)
            if lab.dim is not None and lab.dim >= len(xs) - k:
                self.block(lab.ids, f"LayerNorm '{node.target}' normalizes over several dims")
            return self.passthrough(x)
        for cls, k in _POOL_MODULES.items():
            if isinstance(mod, cls):
                if getattr(mod, "return_indices", False):
                    raise _Unsupported(f"'{node.target}' returns indices")
                return self.spatial(x, k, node)
        if isinstance(mod, nn.Upsample):
            return self.spatial(x, len(xs) - 2, node)
        if isinstance(mod, (nn.Softmax, nn.LogSoftmax, nn.Softmin)):
            return self.softmax(x, mod.dim if mod.dim is not None else -1, node)
        if isinstance(mod, nn.Flatten):
            return self.reshape(node, x)
        if isinstance(mod, nn.Unflatten):
            return self.reshape(node, x)
        if isinstance(mod, nn.PReLU):
            return self.passthrough(x)
        raise _Unsupported(f"module '{node.target}' ({type(mod).__name__}) is not analysed")

    def couple_input(self, e: ModuleEntry, role: str, x: Any, cdim: int, node: fx.Node) -> None:
        lab = self.lab(x)
        ids = e.slots[role]
        if lab.dim == cdim and len(lab.ids) == len(ids):
            self.union(ids, lab.ids)
            return
        where = x.name if isinstance(x, fx.Node) else str(x)
        if lab.param is not None:
            self.fix_param(lab.param[0], f"read directly by '{e.path}'")
        if lab.dim is None:
            self.block(ids, f"input channels of '{e.path}' come from '{where}', which has none to prune")
        else:
            self.block(ids, f"input of '{e.path}' has channels along dim {lab.dim}, not {cdim}")
            self.block(lab.ids, f"'{e.path}' reads them along dim {cdim}")

    def per_channel(self, e: ModuleEntry, x: Any, cdim: int, node: fx.Node) -> Label:
        lab = self.lab(x)
        ids = e.slots["ch"]
        if lab.dim == cdim and len(lab.ids) == len(ids):
            self.union(ids, lab.ids)
            return lab
        self.block(ids, f"'{e.path}' normalizes a dim without prunable channels")
        if lab.param is not None:
            self.fix_param(lab.param[0], f"read directly by '{e.path}'")
            return NONE
        return lab

    def visit_mha(self, node: fx.Node, mod: nn.MultiheadAttention) -> Any:
        e = self.entry(node)
        args = list(node.args) + [None] * 3
        q = args[0] if args[0] is not None else node.kwargs.get("query")
        k = args[1] if args[1] is not None else node.kwargs.get("key")
        v = args[2] if args[2] is not None else node.kwargs.get("value")
        reasons = []
        for name in ("key_padding_mask", "attn_mask"):
            if node.kwargs.get(name) is not None:
                reasons.append(f"{name} is given")
        if len(node.args) > 3:
            reasons.append("masks passed positionally")
        if mod.bias_k is not None or mod.add_zero_attn:
            reasons.append("add_bias_kv/add_zero_attn")
        if node.kwargs.get("is_causal"):
            reasons.append("is_causal")
        users = [u for u in node.users]
        for u in users:
            if not (u.op == "call_function" and u.target is operator.getitem and u.args[1] in (0, 1)):
                reasons.append(f"its output tuple is used by '{u.name}'")
            elif u.args[1] == 1 and u.users:
                reasons.append("its attention weights are used")
        qs = node_shape(q) if isinstance(q, fx.Node) else None
        if qs is None or len(qs) != 3:
            reasons.append("query is not 3-D")
        self.mha_calls.setdefault(e.path, []).append(node.name)
        for role, x in (("in_q", q), ("in_k", k), ("in_v", v)):
            xs = node_shape(x) if isinstance(x, fx.Node) else None
            if xs is None:
                self.block(e.slots[role], "no shape")
                continue
            self.couple_input(e, role, x, len(xs) - 1, node)
        if reasons:
            for ids in e.slots.values():
                self.block(ids, f"attention '{e.path}' cannot be rebuilt: {'; '.join(reasons)}")
        elif not self.prune_heads:
            self.block(e.slots["heads"], "prune_heads=false")
        return TupleLabel([Label(len(qs) - 1 if qs else 2, e.slots["out"]), NONE])

    # ---- generic rules
    def passthrough(self, x: Any) -> Any:
        return self.lab(x)

    def spatial(self, x: Any, k: int, node: fx.Node) -> Label:
        lab = self.lab(x)
        xs = node_shape(x)
        if lab.param is not None:
            self.fix_param(lab.param[0], f"pooled by '{node.name}'")
            return NONE
        if lab.dim is not None and lab.dim >= len(xs) - k:
            self.block(lab.ids, f"'{node.name}' pools over the channel dim")
            return NONE
        return lab

    def softmax(self, x: Any, dim: int, node: fx.Node) -> Label:
        lab = self.lab(x)
        xs = node_shape(x)
        if lab.param is not None:
            self.fix_param(lab.param[0], f"softmax '{node.name}'")
            return NONE
        if lab.dim is not None and lab.dim == _norm_dim(dim, len(xs)):
            self.block(lab.ids, f"'{node.name}' normalizes over the channel dim")
        return lab

    def elementwise(self, node: fx.Node, args: list[Any]) -> Label:
        out = node_shape(node)
        r = len(out)
        tensors = [a for a in args if isinstance(a, fx.Node) and node_shape(a) is not None]
        full, others = [], []
        for a in tensors:
            s, lab = node_shape(a), self.lab(a)
            off = r - len(s)
            if lab.dim is not None and s[lab.dim] == out[lab.dim + off]:
                full.append((a, lab, lab.dim + off))
            else:
                others.append(a)
        dims = {d for _, _, d in full}
        if len(dims) > 1:
            for a in tensors:
                self.block_label(self.lab(a), f"'{node.name}' combines channels along different dims")
            return NONE
        if not dims:
            for a in tensors:
                lab = self.lab(a)
                if lab.param is not None:
                    self.fix_param(lab.param[0], f"used by '{node.name}' with untracked tensors")
            return NONE
        D = dims.pop()
        ref = full[0][1].ids
        for _, lab, _ in full[1:]:
            self.union(ref, lab.ids)
        for a in others:
            s, lab = node_shape(a), self.lab(a)
            d = D - (r - len(s))
            if d < 0 or s[d] == 1:
                continue
            if lab.param is not None:
                self.slice_param(lab, d, ref, node.name)
            else:
                self.block(ref, f"'{node.name}' combines them with '{a.name}', whose channels cannot be pruned")
        return Label(D, ref)

    def reshape(self, node: fx.Node, x: Any) -> Label:
        lab = self.lab(x)
        if lab.param is not None:
            self.fix_param(lab.param[0], f"reshaped by '{node.name}'")
            return NONE
        if lab.dim is None:
            return NONE
        xs, out = node_shape(x), node_shape(node)
        if math.prod(xs) > _MAX_RESHAPE_ELEMENTS:
            self.block(lab.ids, f"'{node.name}' reshapes a tensor too large to trace channel by channel")
            return NONE
        view = [1] * len(xs)
        view[lab.dim] = len(lab.ids)
        full = np.broadcast_to(lab.ids.reshape(view), xs).reshape(out)
        varying = [d for d in range(len(out)) if out[d] > 1 and
                   not np.array_equal(full, np.broadcast_to(np.take(full, [0], axis=d), full.shape))]
        if not varying:
            self.block(lab.ids, f"'{node.name}' reshapes the channels away")
            return NONE
        D = varying[0]
        moved = np.moveaxis(full, D, 0).reshape(out[D], -1)
        if len(varying) == 1:
            ids = moved[:, 0].copy()
        else:
            inner = math.prod(out[d] for d in varying[1:])
            # rows of the split (e.g. heads): merge each row's ids (dedupe the broadcast copies first)
            rows = np.moveaxis(full, D, 0)
            idx = tuple([slice(None)] + [slice(None) if d in varying[1:] else slice(0, 1)
                                         for d in range(len(out)) if d != D])
            rows = rows[idx].reshape(out[D], -1)
            ids = self.union_rows(rows)
            split = HeadSplit(node.name, D, ids.copy(), inner)
            self.head_splits.append(split)
            if not self.prune_heads:
                self.block(ids, f"'{node.name}' splits channels into heads and prune_heads=false")
        self.rewrites.append(Rewrite(node.name, "shape", D, [ids]))
        return Label(D, ids)

    def permute(self, node: fx.Node, x: Any, perm: list[int]) -> Label:
        lab = self.lab(x)
        r = len(perm)
        perm = [_norm_dim(p, r) for p in perm]
        if lab.param is not None:
            target, dmap = lab.param
            return Label(param=(target, {i: dmap.get(p) for i, p in enumerate(perm) if dmap.get(p) is not None}))
        if lab.dim is None:
            return NONE
        return Label(perm.index(lab.dim), lab.ids)

    def getitem(self, node: fx.Node) -> Any:
        src, idx = node.args[0], node.args[1]
        lab = self.lab(src)
        if isinstance(lab, TupleLabel):
            if isinstance(idx, int):
                return lab.items[idx]
            raise _Unsupported(f"'{node.name}' slices a tuple")
        s = node_shape(src)
        if s is None:
            return NONE
        items = idx if isinstance(idx, tuple) else (idx,)
        consumed = sum(1 for it in items if it is not None and it is not Ellipsis)
        mapping: dict[int, int | None] = {}
        partial: set[int] = set()
        ind, outd = 0, 0
        for it in items:
            if it is None:
                outd += 1
            elif it is Ellipsis:
                for _ in range(len(s) - consumed):
                    mapping[ind] = outd
                    ind, outd = ind + 1, outd + 1
            elif isinstance(it, int):
                mapping[ind] = None
                partial.add(ind)
                ind += 1
            elif isinstance(it, slice):
                if any(isinstance(v, fx.Node) for v in (it.start, it.stop, it.step)):
                    raise _Unsupported(f"'{node.name}' slices with computed bounds")
                start, stop, step = it.indices(s[ind])
                if not (start == 0 and stop == s[ind] and step == 1):
                    partial.add(ind)
                mapping[ind] = outd
                ind, outd = ind + 1, outd + 1
            else:
                raise _Unsupported(f"'{node.name}' indexes with a tensor or list")
        while ind < len(s):
            mapping[ind] = outd
            ind, outd = ind + 1, outd + 1
        if lab.param is not None:
            target, dmap = lab.param
            if any(dmap.get(d) is not None for d in partial):
                self.fix_param(target, f"indexed by '{node.name}'")
                return NONE
            return Label(param=(target, {mapping[d]: p for d, p in dmap.items() if mapping.get(d) is not None}))
        if lab.dim is None:
            return NONE
        if lab.dim in partial:
            self.block(lab.ids, f"'{node.name}' indexes into the channel dim")
            return NONE
        return Label(mapping[lab.dim], lab.ids)

    def split(self, node: fx.Node, x: Any, dim: int, shapes: list) -> TupleLabel:
        lab = self.lab(x)
        xs = node_shape(x)
        dim = _norm_dim(dim, len(xs))
        if lab.param is not None:
            self.fix_param(lab.param[0], f"split by '{node.name}'")
            return TupleLabel([NONE] * len(shapes))
        if lab.dim is None:
            return TupleLabel([NONE] * len(shapes))
        if lab.dim != dim:
            return TupleLabel([Label(lab.dim, lab.ids)] * len(shapes))
        sizes = [sh[dim] for sh in shapes]
        cuts = np.cumsum([0] + sizes)
        parts = [lab.ids[cuts[i]:cuts[i + 1]] for i in range(len(sizes))]
        self.rewrites.append(Rewrite(node.name, "split", dim, parts))
        return TupleLabel([Label(dim, p) for p in parts])

    def cat(self, node: fx.Node, tensors: list, dim: int) -> Label:
        out = node_shape(node)
        dim = _norm_dim(dim, len(out))
        labs = [self.lab(t) for t in tensors]
        if any(lab.dim == dim for lab in labs):
            parts = []
            for t, lab in zip(tensors, labs):
                if lab.dim == dim:
                    parts.append(lab.ids)
                    continue
                ids = self.fresh(node_shape(t)[dim])
                self.block(ids, f"'{node.name}' concatenates '{t.name}', which has no prunable channels")
                self.block_label(lab, f"'{node.name}' concatenates it along another dim")
                parts.append(ids)
            return Label(dim, np.concatenate(parts))
        # along another dim: positions along the channel dim meet, like an elementwise op
        return self.elementwise(node, list(tensors))

    def matmul(self, node: fx.Node, a: Any, b: Any) -> Label:
        sa, sb, so = node_shape(a), node_shape(b), node_shape(node)
        if sa is None or sb is None or len(sa) < 2 or len(sb) < 2:
            raise _Unsupported(f"'{node.name}' is a matmul with a 1-D operand")
        la, lb = self.lab(a), self.lab(b)
        r = len(so)
        ka, kb = la.dim == len(sa) - 1, lb.dim == len(sb) - 2
        if ka and kb:
            self.union(la.ids, lb.ids)
        elif ka or kb:
            lab, other, odim = (la, lb, len(sb) - 2) if ka else (lb, la, len(sa) - 1)
            if other.param is not None:
                self.slice_param(other, odim, lab.ids, node.name)
            else:
                self.block(lab.ids, f"'{node.name}' contracts them with untracked positions")
                self.block_label(other, f"'{node.name}' contracts them with untracked positions")
        parts: list[tuple[int, np.ndarray]] = []
        batch_src: list[tuple[Any, tuple, Label]] = []
        for lab, s, is_a in ((la, sa, True), (lb, sb, False)):
            if lab.param is not None and not ((is_a and ka) or (not is_a and kb)):
                if lab.param[0] not in self.params or self.params[lab.param[0]].ids is None:
                    self.fix_param(lab.param[0], f"used by matmul '{node.name}'")
            if lab.dim is None or (is_a and ka) or (not is_a and kb):
                continue
            if is_a and lab.dim == len(s) - 2:
                parts.append((r - 2, lab.ids))
            elif not is_a and lab.dim == len(s) - 1:
                parts.append((r - 1, lab.ids))
            else:
                od = lab.dim + r - len(s)
                if s[lab.dim] == 1 and so[od] > 1:
                    continue
                parts.append((od, lab.ids))
                batch_src.append((a if is_a else b, s, lab))
        dims = {d for d, _ in parts}
        if len(dims) > 1:
            for _, ids in parts:
                self.block(ids, f"'{node.name}' produces channels along several dims")
            return NONE
        if not dims:
            return NONE
        D = dims.pop()
        ref = parts[0][1]
        for _, ids in parts[1:]:
            self.union(ref, ids)
        if D < r - 2:
            for opnd, s, lab in ((a, sa, la), (b, sb, lb)):
                if lab.dim is not None and lab.dim + r - len(s) == D:
                    continue
                d = D - (r - len(s))
                if d >= 0 and s[d] == so[D] and so[D] > 1:
                    self.block(ref, f"'{node.name}' meets untracked positions of '{opnd.name}'")
        return Label(D, ref)

    def attention(self, node: fx.Node, q: Any, k: Any, v: Any, mask: Any) -> Label:
        sq, sk, sv, so = (node_shape(t) for t in (q, k, v, node))
        lq, lk, lv = self.lab(q), self.lab(k), self.lab(v)
        for lab in (lq, lk, lv):
            if lab.param is not None:
                raise _Unsupported(f"'{node.name}' reads a parameter")
        if mask is not None:
            self.block_label(self.lab(mask), f"'{node.name}' attention mask")
        r = len(so)
        pairs = [((lq, len(sq) - 1), (lk, len(sk) - 1)), ((lk, len(sk) - 2), (lv, len(sv) - 2))]
        for (l1, d1), (l2, d2) in pairs:
            m1, m2 = l1.dim == d1, l2.dim == d2
            if m1 and m2:
                self.union(l1.ids, l2.ids)
            elif m1 or m2:
                self.block((l1 if m1 else l2).ids, f"'{node.name}' contracts them with untracked positions")
        parts = []
        if lq.dim == len(sq) - 2:
            parts.append((r - 2, lq.ids))
        if lv.dim == len(sv) - 1:
            parts.append((r - 1, lv.ids))
        for lab, s in ((lq, sq), (lk, sk), (lv, sv)):
            if lab.dim is not None and lab.dim < len(s) - 2:
                parts.append((lab.dim + r - len(s), lab.ids))
        dims = {d for d, _ in parts}
        if len(dims) > 1:
            for _, ids in parts:
                self.block(ids, f"'{node.name}' produces channels along several dims")
            return NONE
        if not dims:
            return NONE
        D = dims.pop()
        ref = parts[0][1]
        for _, ids in parts[1:]:
            if len(ids) == len(ref):
                self.union(ref, ids)
            else:
                self.block(ids, f"'{node.name}' broadcasts heads")
                self.block(ref, f"'{node.name}' broadcasts heads")
        if D < r - 2:
            for t, s, lab in ((q, sq, lq), (k, sk, lk), (v, sv, lv)):
                if lab.dim is None or lab.dim + r - len(s) != D:
                    d = D - (r - len(s))
                    if d >= 0 and s[d] == so[D]:
                        self.block(ref, f"'{node.name}' meets untracked positions of '{t.name}'")
        return Label(D, ref)

    def reduce(self, node: fx.Node, x: Any, dims: Any, keepdim: bool) -> Label:
        lab = self.lab(x)
        xs = node_shape(x)
        if lab.param is not None:
            self.fix_param(lab.param[0], f"reduced by '{node.name}'")
            return NONE
        if lab.dim is None:
            return NONE
        if dims is None:
            return NONE
        dims = [dims] if isinstance(dims, int) else list(dims)
        if not dims:
            return NONE
        if any(not isinstance(d, int) for d in dims):
            raise _Unsupported(f"'{node.name}' reduces over computed dims")
        dims = {_norm_dim(d, len(xs)) for d in dims}
        if lab.dim in dims:
            return NONE             # the channels are summed over: pruning changes values, not shapes
        if keepdim:
            return lab
        return Label(lab.dim - sum(1 for d in dims if d < lab.dim), lab.ids)

    def expand(self, node: fx.Node, x: Any) -> Label:
        lab = self.lab(x)
        xs, out = node_shape(x), node_shape(node)
        off = len(out) - len(xs)
        if lab.param is not None:
            target, dmap = lab.param
            return Label(param=(target, {d + off: p for d, p in dmap.items()}))
        if lab.dim is None:
            return NONE
        if xs[lab.dim] != out[lab.dim + off]:
            self.block(lab.ids, f"'{node.name}' broadcasts the channel dim")
            return NONE
        self.rewrites.append(Rewrite(node.name, "shape", lab.dim + off, [lab.ids]))
        return Label(lab.dim + off, lab.ids)

    # ---- call_function / call_method dispatch
    def visit_function(self, node, t, shape, tuple_shapes) -> Any:
        args = node.args
        name = _fn_name(t)
        if t in _UNARY_FUNCS or name == "stochastic_depth":
            return self.passthrough(args[0])
        if t in _BINARY_FUNCS:
            return self.elementwise(node, list(args) + list(node.kwargs.values()))
        if t is operator.getitem:
            return self.getitem(node)
        if t in (torch.cat, torch.concat, getattr(torch, "concatenate", torch.cat)):
            tensors = args[0] if args else node.kwargs["tensors"]
            dim = args[1] if len(args) > 1 else node.kwargs.get("dim", 0)
            return self.cat(node, list(tensors), dim)
        if t in (torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze):
            return self.reshape(node, args[0])
        if t in (torch.transpose, torch.swapaxes, torch.swapdims):
            d0, d1 = args[1], args[2]
            r = len(node_shape(args[0]))
            perm = list(range(r))
            perm[_norm_dim(d0, r)], perm[_norm_dim(d1, r)] = perm[_norm_dim(d1, r)], perm[_norm_dim(d0, r)]
            return self.permute(node, args[0], perm)
        if t is torch.permute:
            return self.permute(node, args[0], list(args[1]))
        if t in (torch.matmul, operator.matmul, torch.bmm):
            return self.matmul(node, args[0], args[1])
        if t is F.scaled_dot_product_attention:
            q, k, v = args[:3]
            mask = args[3] if len(args) > 3 else node.kwargs.get("attn_mask")
            return self.attention(node, q, k, v, mask)
        if t in (torch.split, torch.chunk, torch.tensor_split):
            dim = args[2] if len(args) > 2 else node.kwargs.get("dim", 0)
            if t is torch.tensor_split:
                raise _Unsupported("tensor_split")
            return self.split(node, args[0], dim, tuple_shapes)
        if t in _REDUCE_FUNCS:
            dims = args[1] if len(args) > 1 else node.kwargs.get("dim")
            keep = args[2] if len(args) > 2 else node.kwargs.get("keepdim", False)
            return self.reduce(node, args[0], dims, keep)
        if t in _POOL_FUNCS:
            return self.spatial(args[0], _POOL_FUNCS[t], node)
        if t is F.interpolate:
            return self.spatial(args[0], len(shape) - 2, node)
        if t in (F.softmax, torch.softmax, F.log_softmax, torch.log_softmax):
            dim = args[1] if len(args) > 1 else node.kwargs.get("dim", -1)
            return self.softmax(args[0], dim, node)
        raise _Unsupported(f"'{node.name}' calls {name}, which the analysis has no rule for")

    def visit_method(self, node, m, shape, tuple_shapes) -> Any:
        args = node.args
        x = args[0]
        if m in _UNARY_METHODS:
            return self.passthrough(x)
        if m in _BINARY_METHODS:
            return self.elementwise(node, list(args) + list(node.kwargs.values()))
        if m in ("expand",):
            return self.expand(node, x)
        if m == "expand_as":
            return self.elementwise(node, [x, args[1]])
        if m in _RESHAPE_METHODS:
            return self.reshape(node, x)
        if m in ("transpose", "swapaxes", "swapdims"):
            r = len(node_shape(x))
            d0, d1 = _norm_dim(args[1], r), _norm_dim(args[2], r)
            perm = list(range(r))
            perm[d0], perm[d1] = perm[d1], perm[d0]
            return self.permute(node, x, perm)
        if m == "permute":
            perm = list(args[1]) if len(args) == 2 and isinstance(args[1], (tuple, list)) else list(args[1:])
            return self.permute(node, x, perm)
        if m == "matmul":
            return self.matmul(node, x, args[1])
        if m in ("split", "chunk"):
            dim = args[2] if len(args) > 2 else node.kwargs.get("dim", 0)
            return self.split(node, x, dim, tuple_shapes)
        if m in _REDUCE_METHODS:
            dims = args[1] if len(args) > 1 else node.kwargs.get("dim")
            keep = args[2] if len(args) > 2 else node.kwargs.get("keepdim", False)
            return self.reduce(node, x, dims, keep)
        if m in ("softmax", "log_softmax"):
            dim = args[1] if len(args) > 1 else node.kwargs.get("dim", -1)
            return self.softmax(x, dim, node)
        if m == "repeat":
            lab = self.lab(x)
            reps = args[1:] if not isinstance(args[1], (tuple, list)) else args[1]
            if lab.param is not None:
                self.fix_param(lab.param[0], f"repeated by '{node.name}'")
                return NONE
            if lab.dim is not None:
                off = len(shape) - len(node_shape(x))
                if reps[lab.dim + off] != 1:
                    self.block(lab.ids, f"'{node.name}' repeats the channel dim")
                    return NONE
                return Label(lab.dim + off, lab.ids)
            return NONE
        raise _Unsupported(f"'{node.name}' calls .{m}(), which the analysis has no rule for")

    # ---- FLOPs model
    def _flop_terms(self) -> None:
        for node in self.gm.graph.nodes:
            if node.op not in ("call_module", "call_function", "call_method"):
                continue
            base = node_flops(self.gm, node)
            if not base:
                continue
            owner = str(node.target) if node.op == "call_module" else node.name
            factors: list[np.ndarray] = []
            if node.op == "call_module":
                mod = self.gm.get_submodule(str(node.target))
                path = self._canon.get(id(mod), owner)
                e = self.modules.get(path)
                if e is not None and e.kind in ("conv", "conv_t"):
                    factors = [e.slots["out"]] + ([e.slots["in"]] if mod.groups == 1 else [])
                    if e.kind == "conv_t" and mod.groups > 1:
                        factors = [e.slots["in"]]
                elif e is not None and e.kind == "linear":
                    factors = [e.slots["out"], e.slots["in"]]
                elif e is not None and e.kind == "mha":
                    self._mha_terms(node, mod, e, base)
                    continue
                self.flop_terms.append(FlopTerm(node.name, path, base, factors))
                continue
            lab = self.labels.get(node.name, NONE)
            if isinstance(lab, Label) and lab.dim is not None:
                factors.append(lab.ids)
            if node.target is F.scaled_dot_product_attention:
                lk = self.lab(node.args[1])
                sk = node_shape(node.args[1])
                lq = self.lab(node.args[0])
                if lk.dim is not None and sk is not None and lk.dim == len(sk) - 2:
                    factors.append(lk.ids)
                if lq.dim is not None and lab.dim is None:
                    factors.append(lq.ids)
            else:
                a = node.args[0]
                la, sa = self.lab(a), node_shape(a) if isinstance(a, fx.Node) else None
                if la.dim is not None and sa is not None and la.dim == len(sa) - 1:
                    factors.append(la.ids)
            self.flop_terms.append(FlopTerm(node.name, owner, base, factors))

    def _mha_terms(self, node: fx.Node, mod: nn.MultiheadAttention, e: ModuleEntry, base: int) -> None:
        q = node_shape(node.args[0])
        k = node_shape(node.args[1]) if len(node.args) > 1 else q
        em = mod.embed_dim
        lq, lk = math.prod(q) // em, math.prod(k) // mod.kdim
        s = k[-2] if mod.batch_first else k[0]
        heads = e.slots["heads"]
        terms = [(2 * lq * em * em, [e.slots["in_q"], heads]),
                 (2 * lk * mod.kdim * em, [e.slots["in_k"], heads]),
                 (2 * lk * mod.vdim * em, [e.slots["in_v"], heads]),
                 (2 * lq * em * em, [heads, e.slots["out"]]),
                 (4 * lq * s * em, [heads])]
        total = sum(t for t, _ in terms)
        if total != base:      # flops.py counts kdim == vdim == embed_dim; keep its total when unpruned
            terms.append((base - total, []))
        for t, f in terms:
            self.flop_terms.append(FlopTerm(node.name, e.path, t, f))

    # ---- classes and groups
    def _finalize(self) -> None:
        n = self.num_ids
        a = np.concatenate(self._pa) if self._pa else np.zeros(0, dtype=np.int64)
        b = np.concatenate(self._pb) if self._pb else np.zeros(0, dtype=np.int64)
        self.cls = connected_classes(n, a, b)
        # a parameter used in a way we do not track keeps its shape; so does a module read via get_attr
        for target, entry in self.params.items():
            if entry.fixed and entry.ids is not None:
                self.block(entry.ids, f"parameter '{target}' is also used where its shape must stay "
                                      f"({entry.fixed})")
            owner = target.rpartition(".")[0]
            if owner in self.modules:
                for ids in self.modules[owner].slots.values():
                    self.block(ids, f"'{target}' is read directly by the graph")
        self.blocked = np.zeros(n, dtype=bool)
        self.block_reason = {}
        for ids, reason in self._blocks:
            roots = self.cls[ids]
            self.blocked[roots] = True
            for r in np.unique(roots).tolist():
                self.block_reason.setdefault(r, reason)
        self._groups()

    def slots(self) -> list[tuple[str, str, np.ndarray]]:
        """Every (owner, role, ids) whose positions are tied to weights."""
        out = []
        for path, e in self.modules.items():
            for role, ids in e.slots.items():
                out.append((path, role, ids))
        for target, p in self.params.items():
            if p.ids is not None:
                out.append((target, f"param[{p.dim}]", p.ids))
        return out

    def _groups(self) -> None:
        slots = self.slots()
        member: dict[int, list[int]] = {}
        counts: list[dict[int, int]] = []
        for si, (_, _, ids) in enumerate(slots):
            roots, cnt = np.unique(self.cls[ids], return_counts=True)
            counts.append(dict(zip(roots.tolist(), cnt.tolist())))
            for r in roots.tolist():
                member.setdefault(r, []).append(si)
        by_sig: dict[tuple, list[int]] = {}
        for r, sis in member.items():
            by_sig.setdefault(tuple(sis), []).append(r)
        self.groups = []
        g = nx.Graph()
        for gi, (sig, roots) in enumerate(sorted(by_sig.items(), key=lambda kv: min(kv[1]))):
            roots_a = np.array(sorted(roots), dtype=np.int64)
            slot_counts = {}
            widths = []
            for si in sig:
                owner, role, _ = slots[si]
                c = sum(counts[si][r] for r in roots)
                slot_counts[(owner, role)] = slot_counts.get((owner, role), 0) + c
                scale = self.modules[owner].module.head_dim if role == "heads" else 1
                per = {counts[si][r] * scale for r in roots}
                if role in ("out", "heads"):
                    widths.extend(per)
            if not widths:
                widths = [min({counts[si][r] for r in roots}) for si in sig]
            width = 0
            for w in widths:
                width = math.gcd(width, w)
            grp = Group(gi, roots_a, self.blocked[roots_a], slot_counts, max(width, 1))
            reasons = sorted({self.block_reason[r] for r in roots if r in self.block_reason})
            grp.reasons = reasons
            self.groups.append(grp)
            g.add_node(("group", gi), size=len(roots), blocked=int(grp.blocked.sum()))
            for (owner, role), c in slot_counts.items():
                kind = self.modules[owner].kind if owner in self.modules else "param"
                g.add_node(("layer", owner), kind=kind)
                g.add_edge(("layer", owner), ("group", gi), role=role, count=c)
        self.graph = g
        # heads: note which modules feed each split (for num_heads attribute updates)
        out_owner: dict[int, str] = {}
        for path, e in self.modules.items():
            if "out" in e.slots:
                for r in np.unique(self.cls[e.slots["out"]]).tolist():
                    out_owner.setdefault(r, path)
        for hs in self.head_splits:
            hs.sources = sorted({out_owner[r] for r in self.cls[hs.rows].tolist() if r in out_owner})

    # ---- queries
    def block_classes(self, roots: Iterable[int], reason: str) -> None:
        roots = np.asarray(list(roots), dtype=np.int64)
        if not len(roots):
            return
        self.blocked[roots] = True
        for r in roots.tolist():
            self.block_reason.setdefault(r, reason)
        for grp in self.groups:
            grp.blocked = self.blocked[grp.classes]
            if np.isin(grp.classes, roots).any() and reason not in grp.reasons:
                grp.reasons.append(reason)

    def classes_of(self, ids: np.ndarray) -> np.ndarray:
        return np.unique(self.cls[ids])

    def kept_positions(self, ids: np.ndarray, keep: np.ndarray) -> np.ndarray:
        """Indices of the positions of `ids` whose class is kept (`keep`: bool per class root)."""
        return np.nonzero(keep[self.cls[ids]])[0]

    def coupled(self, path: str, role: str = "out") -> set[tuple[str, str]]:
        """(owner, role) of every slot sharing a class with `path`'s `role` slot."""
        roots = set(self.classes_of(self.modules[path].slots[role]).tolist())
        out = set()
        for owner, r, ids in self.slots():
            if roots & set(self.cls[ids].tolist()):
                out.add((owner, r))
        return out

    def estimate_flops(self, keep: np.ndarray) -> float:
        total = 0.0
        for t in self.flop_terms:
            f = float(t.base)
            for ids in t.factors:
                f *= float(keep[self.cls[ids]].mean()) if len(ids) else 1.0
            total += f
        return total

    def summary(self) -> str:
        pr = [g for g in self.groups if g.prunable]
        return (f"{len(self.modules)} layers, {self.num_ids} channel ids, {len(self.groups)} groups "
                f"({len(pr)} prunable)")


def _node_args(node: fx.Node) -> list:
    out: list = []
    fx.node.map_arg((node.args, node.kwargs), out.append)
    return out


def _get_attr(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def build_dependency_graph(gm: fx.GraphModule, example_inputs: tuple | None = None, *,
                           exclude: Iterable[str] = (), prune_heads: bool = True) -> DependencyGraph:
    """Analyse `gm` (shapes are propagated with `example_inputs` when given, else must already be there)."""
    if example_inputs is not None:
        propagate_shapes(gm, example_inputs if isinstance(example_inputs, tuple) else (example_inputs,))
    return DependencyGraph(gm, exclude=exclude, prune_heads=prune_heads).analyse()
