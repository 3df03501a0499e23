"""Matmuls against a constant weight, written without nn.Linear, recognised as Linear layers.

The int8 kernels (QuantLinear / DynamicQuantLinear / weight-only) take an nn.Linear: a weight of shape
(out, in), quantized per output channel (its rows). Models also write the same layer as

  * ``torch.addmm(b, x, W)`` with W of shape (in, out): transformers' ``Conv1D`` (GPT-2, GPT-J's and
    others' projections), whose output channel is W's dim 1;
  * ``x @ W``, ``torch.matmul(x, W)``, ``torch.mm(x, W)``, optionally followed by ``+ b`` (hand-written
    layers with a parameter W of shape (in, out));
  * ``F.linear(x, W.t())`` / ``F.linear(x, W.T)`` / ``F.linear(x, W.transpose(0, 1))`` (a parameter stored
    (in, out) and transposed at the call).

`linearize(gm)` turns each of them into an nn.Linear whose weight is the constant transposed once, at
compile time, into (out, in) layout (so per-output-channel scales fall on the right axis and the existing
int8 kernels, their fused epilogues and AVX2/VNNI paths run unchanged). A constant bias of `out` elements
(addmm's `input`, or a following `+ b`) becomes the Linear's bias. Both graphs from torch.fx.symbolic_trace
(torch.addmm, operator.matmul, Tensor.t ...) and from torch.export (aten.addmm, aten.matmul, aten.t ...) are
handled.

Keeps: the same product of the same float values (x @ W == x @ (W.T).T); float32 rounding may differ in the
last bit (PyTorch's GEMM may sum in another order for the transposed layout). Left alone: weights that are
not graph constants (get_attr), not 2-D, or not floating point; addmm with beta/alpha other than 1 or a bias
that is not a constant row of `out` values; matmuls whose left operand is a constant or has fewer than 2
dims (or an unknown shape).
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from .graph import _add_layer, _arg, _call_module_in_place_of, _const, _tidy

__all__ = ["linearize"]

_aten = torch.ops.aten
_ADDMM = {torch.addmm, _aten.addmm.default}
_MM = {torch.mm, _aten.mm.default}
_MATMUL = {torch.matmul, operator.matmul, _aten.matmul.default}
_LINEAR = {F.linear, _aten.linear.default}
_ADD = {operator.add, torch.add, _aten.add.Tensor}
_T = {torch.t, _aten.t.default, "t"} | ({_aten.numpy_T.default} if hasattr(_aten, "numpy_T") else set())
_TRANSPOSE = {torch.transpose, _aten.transpose.int, "transpose", "swapaxes", "swapdims"}
_PERMUTE = {torch.permute, _aten.permute.default, "permute"}


def _is_swap(dims, ndim: int = 2) -> bool:
    """dims (of transpose(a, b)) name the two axes of a 2-D tensor."""
    try:
        return sorted(int(d) % ndim for d in dims) == [0, 1]
    except (TypeError, ValueError):
        return False


def _transposed_attr(node) -> fx.Node | None:
    """The get_attr node that `node` transposes (2-D: .t(), .T, .mT, transpose(0, 1), permute(1, 0)), or None."""
    if not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method") or not node.args:
        return None
    src, rest, t = node.args[0], node.args[1:], node.target
    if not (isinstance(src, fx.Node) and src.op == "get_attr"):
        return None
    if t in _T:
        return src if not rest else None
    if t is getattr and rest and rest[0] in ("T", "mT"):
        return src
    if t in _TRANSPOSE:
        return src if len(rest) == 2 and _is_swap(rest) else None
    if t in _PERMUTE:
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
        return src if len(dims) == 2 and [int(d) % 2 for d in dims] == [1, 0] else None
    return None


def _matrix(gm: fx.GraphModule, node) -> tuple[torch.Tensor, fx.Node, bool] | None:
    """(the 2-D float constant that `node` evaluates to, the get_attr it reads, whether `node` transposes
    it) or None."""
    src = node if isinstance(node, fx.Node) and node.op == "get_attr" else _transposed_attr(node)
    w = _const(gm, src)
    if w is None or w.dim() != 2 or not w.is_floating_point():
        return None
    return (w.t(), src, True) if src is not node else (w, src, False)


def _ndim(node) -> int | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    shape = getattr(meta, "shape", None)
    return len(shape) if shape is not None else None


def _row_bias(gm: fx.GraphModule, node, out: int, dtype: torch.dtype) -> tuple[torch.Tensor, fx.Node] | None:
    """A constant of `out` values of `dtype` broadcast along rows ((out,), (1, out), (1, 1, out) ...), flattened
    (another dtype would change the sum's type promotion)."""
    b = _const(gm, node)
    if b is None or b.dtype != dtype or b.numel() != out or (b.dim() and b.shape[-1] != out):
        return None
    return b.reshape(out), node


def _is_one(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == 1


def _following_bias(gm: fx.GraphModule, node: fx.Node, out: int, dtype: torch.dtype):
    """(add node, bias) when `node`'s only user adds a constant row of `out` values to it, else None."""
    if len(node.users) != 1:
        return None
    add = next(iter(node.users))
    is_add = (add.op == "call_function" and add.target in _ADD) or (add.op == "call_method" and add.target == "add")
    if not is_add or len(add.args) != 2 or not _is_one(add.kwargs.get("alpha", 1)):
        return None
    other = add.args[1] if add.args[0] is node else add.args[0] if add.args[1] is node else None
    if other is None or other is node:
        return None
    found = _row_bias(gm, other, out, dtype)
    if found is None:
        return None
    out_nd, in_nd = _ndim(add), _ndim(node)
    if out_nd is None or in_nd is None:
        if _const(gm, other).dim() > 1:                       # shapes unknown: only a 1-D bias is safe
            return None
    elif out_nd != in_nd:                                     # the bias must not add a dim
        return None
    return add, found


def _match(gm: fx.GraphModule, node: fx.Node):
    """(input node, weight (out, in), (weight get_attr, whether the weight is its transpose), (bias, its
    get_attr) or None, the nodes replaced) or None."""
    fn = node.target
    if node.op == "call_method":
        fn = {"matmul": torch.matmul, "mm": torch.mm, "addmm": torch.addmm}.get(node.target)
    elif node.op != "call_function":
        return None
    if fn in _LINEAR:
        wm = _arg(node, 1, "weight")
        if isinstance(wm, fx.Node) and wm.op == "get_attr":
            return None                                   # a plain F.linear: graph.modularize's case
        found = _matrix(gm, wm)
        b_arg = _arg(node, 2, "bias")
        if found is None:
            return None
        w, src, transposed = found
        bias = _row_bias(gm, b_arg, w.shape[0], w.dtype) if b_arg is not None else None
        if b_arg is not None and bias is None:
            return None
        return node.args[0], w, (src, transposed), bias, [node]
    if fn in _ADDMM:
        if node.op == "call_method":
            return None                                   # bias.addmm(x, W): rare, not handled
        b_arg, x, wm = _arg(node, 0, "input"), _arg(node, 1, "mat1"), _arg(node, 2, "mat2")
        if not (_is_one(_arg(node, 3, "beta", 1)) and _is_one(_arg(node, 4, "alpha", 1))):
            return None
        found = _matrix(gm, wm)
        if found is None or _const(gm, x) is not None:
            return None
        m, src, transposed = found
        bias = _row_bias(gm, b_arg, m.shape[1], m.dtype)
        if bias is None:
            return None
        return x, m.t(), (src, not transposed), bias, [node]
    if fn in _MM or fn in _MATMUL:
        if len(node.args) != 2 or node.kwargs:
            return None
        x, wm = node.args
        found = _matrix(gm, wm)
        if found is None or not isinstance(x, fx.Node) or _const(gm, x) is not None:
            return None
        nd = _ndim(x)
        if fn in _MATMUL and (nd is None or nd < 2):
            return None
        m, src, transposed = found
        follow = _following_bias(gm, node, m.shape[1], m.dtype)
        if follow is None:
            return x, m.t(), (src, not transposed), None, [node]
        add, bias = follow
        return x, m.t(), (src, not transposed), bias, [node, add]
    return None


def linearize(gm: fx.GraphModule) -> int:
    """Replace each matmul against a constant weight (addmm, matmul/mm [+ bias], linear of a transposed
    constant) by a call of an nn.Linear holding the weight in (out, in) layout. Mutates `gm`; returns how many
    calls were replaced. A constant used by several such calls (same orientation, same bias) gets one module,
    called several times."""
    count = 0
    made: dict[tuple, str] = {}
    erased: set[fx.Node] = set()
    for node in list(gm.graph.nodes):
        if node in erased or node.op not in ("call_function", "call_method"):
            continue
        found = _match(gm, node)
        if found is None:
            continue
        x, w, (src, transposed), bias, replaced = found
        b, b_src = bias if bias is not None else (None, None)
        key = (str(src.target), transposed, str(b_src.target) if b_src is not None else None)
        name = made.get(key)
        if name is None:
            out_f, in_f = w.shape
            name = _add_layer(gm, nn.Linear(in_f, out_f, bias=b is not None), w, b, src, node.name)
            made[key] = name
        _call_module_in_place_of(gm, name, x, replaced)
        erased.update(replaced)
        count += 1
    _tidy(gm, count)
    return count
