"""More ATen converters with PyTorch's semantics where TVM 0.27's importer differs (found by the full OpInfo
sweep, benchmarks/opinfo_sweep.py --all). numerics.convert_map merges CONVERTERS into its table.

Each converter computes what eager PyTorch computes on CPU, NaN/+-Inf included:

  ne                      IEEE "unordered or not equal": NaN != x is True (TVM emitted LLVM's ordered `one`,
                          False for NaN; count_nonzero, nanmean's x != x, norm(ord=0), hinge loss read it)
  eq                      x == x of a float tensor is not isnan(x) (TVM folded it to True: isfinite(NaN))
  mul by the literal 0     x * 0 is NaN for NaN/+-Inf x (TVM's simplifier folded it to 0: softshrink's
                          decomposition, where(|x| > l, x - sign(x) * l, x * 0), returned 0 for NaN)
  grid_sampler_2d         the grid transposed to TVM's (N, 2, H, W) layout (TVM's converter passed
                          PyTorch's (N, H, W, 2) through: wrong shape)
  elu (selu, celu)        x <= 0 ? expm1(x * input_scale) * alpha * scale : x * scale (TVM ignored `scale`:
                          selu's negative side was off by its factor 1.0507); expm1 without cancellation
  remainder (float)       fmod(a, b), plus b where the signs differ, as ATen (TVM's a - floor(a / b) * b gave
                          NaN for b = +-Inf and lost denormals)
  select                  a negative index counts from the end (TVM read out of bounds)
  index.Tensor            negative indices count from the end (torch.take, x[idx]); TVM read out of bounds
  var / var_mean / std    float64 two-pass moments like ATen's double Welford accumulation (no float32
                          overflow of (x - mean)^2 near float32's limits), divisor max(0, n - correction)
                          (0 gives Inf/NaN as in PyTorch, not a build failure); sqrt of a variance is taken
                          in float64 too, as ATen's std does
  flash attention (CPU)   its logsumexp output is refused (TVM's converter returned the attention output's
                          shape for it)
  transposed convolution  with a weight that is not a finite constant: a kernel that multiplies real input
                          elements only (TVM's zero-dilated input gave 0 * Inf = NaN where PyTorch's GEMM +
                          col2im gives +-Inf); 3-D too (TVM's importer had none)
  margin losses           decompositions() replaces torch's for multi_margin_loss / multilabel_margin_loss:
                          a term is added only where positive (ATen's `if (z > 0)` skips NaN terms; torch's
                          decomposition's clamp_min kept them)
  softmax backward        decomposed as ATen's kernel computes it, o * (g - sum(g * o))
  sum over dim 0 of a 0-d tensor: the tensor itself (PyTorch allows dim 0 / -1 there; TVM's sum refused it)
  cat                     legacy empty 1-D inputs (shape (0,)) next to tensors of another rank are skipped,
                          as ATen skips them (TVM's concat refused mixed ranks: transformers' DynamicCache
                          starts every layer's keys/values as torch.tensor([]) and cats onto it, GPT-2)

Dynamic (symbolic) dims: _shape gives a static dim as an int and a dynamic one as its TIR expression; the
moments, index and select converters and the exact transposed convolution compute with it (a size a Relax op
needs as a value is read from the shape at run time, _dim_tensor). What must be static (the weight and input
channels of a transposed convolution here; pooling windows and training batch norm in numerics.py) raises a
LoweringError naming the op, the exported node and the dynamic dims (_static_shape), never a bare TypeError.
"""
from __future__ import annotations

import contextlib
import operator
from typing import Callable

from ...errors import LoweringError

__all__ = ["CONVERTERS", "converters", "check_graph", "decompositions", "run_decompositions"]


def _relax():
    from tvm import relax

    return relax


def _dtype(x) -> str:
    return str(x.ty.dtype)


def _ndim(x) -> int:
    return int(x.ty.ndim)


def _shape(x) -> list:
    """x's shape: an int per static dim, the TIR expression (an int64 tir var, or an expression of them) per
    dynamic one, for the converter to keep symbolic (_dim_tensor) or refuse (_static_shape)."""
    from tvm import tirx

    return [int(d) if isinstance(d, tirx.IntImm) else d for d in x.ty.shape]


def _is_static(dim) -> bool:
    return isinstance(dim, int)


def _static_shape(node, x, what: str) -> list[int]:
    """_shape(x) when every dim is static, else a LoweringError naming the op, the node and the dynamic dims
    (`what`: what of the op needs static sizes)."""
    shape = _shape(x)
    dynamic = [f"dim {i} ({d})" for i, d in enumerate(shape) if not _is_static(d)]
    if dynamic:
        raise LoweringError(f"{_op_name(node)} (exported node '{node.name}'): {what} needs static sizes, but "
                            f"{', '.join(dynamic)} of its input is dynamic; not supported by the TVM backend")
    return shape


def _op_name(node) -> str:
    target = node.target
    namespace = getattr(target, "namespace", "aten")
    return f"{namespace}.{getattr(target, '__name__', str(target))}"


def _dim_tensor(bb, dims, dtype: str):
    """A 0-d tensor of `dtype` holding the product of `dims` (ints and TIR expressions: a dynamic size read
    at run time from the shape; Relax binary ops take no PrimExpr operand)."""
    relax = _relax()
    op = relax.op
    static = 1
    symbolic = None
    for d in dims:
        if _is_static(d):
            static *= d
        else:
            symbolic = d if symbolic is None else symbolic * d
    if symbolic is None:
        return relax.const(static, dtype)
    size = op.shape_to_tensor(relax.ShapeExpr([symbolic * static if static != 1 else symbolic]))
    return bb.emit(op.reshape(op.astype(size, dtype), []))


def _arg(node, i: int, name: str, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _val_dtype(node) -> str | None:
    val = node.meta.get("val")
    dtype = getattr(val, "dtype", None)
    return str(dtype).replace("torch.", "") if dtype is not None else None


# ---------------------------------------------------------------------------------------------- compare
def _ne(node, importer):
    """a != b as not(a == b): true where either side is NaN, as in PyTorch."""
    relax = _relax()
    a, b = node.args[0], node.args[1]
    if a is b and isinstance(importer.env.get(a), relax.Expr) and _dtype(importer.env[a]).startswith("float"):
        # x != x is isnan(x); TVM's simplifier folds the comparison of an expression with itself to False
        return importer.block_builder.emit(relax.op.isnan(importer.env[a]))
    eq = importer._binary_op(relax.op.equal, operator.eq)(node)
    if isinstance(eq, relax.Expr):
        return importer.block_builder.emit(relax.op.logical_not(eq))
    return not eq


def _eq(node, importer):
    """a == b; x == x of a float tensor is not isnan(x) (TVM's simplifier folded it to True: isfinite's
    decomposition, (x == x) * (|x| != inf), returned True for NaN)."""
    relax = _relax()
    a, b = node.args[0], node.args[1]
    if a is b and isinstance(importer.env.get(a), relax.Expr) and _dtype(importer.env[a]).startswith("float"):
        return importer.block_builder.emit(relax.op.logical_not(relax.op.isnan(importer.env[a])))
    return importer._binary_op(relax.op.equal, operator.eq)(node)


# ------------------------------------------------------------------------------------------- activations
def _mul(node, importer):
    """a * b; a float tensor times the literal 0 stays x * 0 (NaN for NaN and +-Inf, as in PyTorch; the
    decomposed softshrink is where(|x| > l, x - sign(x) * l, x * 0)): TVM's simplifier folds x * 0 to 0."""
    relax = _relax()
    args = importer.retrieve_args(node)
    if len(args) > 1 and all(isinstance(a, relax.Expr) and _dtype(a) == "bool" for a in args[:2]):
        # bool * bool is logical and (LLVM codegen has no multiply for i1: isfinite's decomposition)
        return importer.block_builder.emit(relax.op.logical_and(args[0], args[1]))
    out = importer._binary_op(relax.op.multiply, operator.mul)(node)
    zero_scalar = [a for a in args[:2] if isinstance(a, (int, float)) and not isinstance(a, bool) and a == 0]
    tensors = [a for a in args[:2] if isinstance(a, relax.Expr)]
    if not zero_scalar or len(tensors) != 1 or not _dtype(out).startswith("float"):
        return out
    x = tensors[0]
    if _dtype(x) != _dtype(out):
        x = importer.block_builder.emit(relax.op.astype(x, _dtype(out)))
    nan = relax.const(float("nan"), _dtype(out))
    return importer.block_builder.emit(relax.op.where(relax.op.isfinite(x), out, nan))


def _grid_sampler_2d(node, importer):
    """grid_sampler_2d: TVM's image.grid_sample takes the grid as (N, 2, H, W), PyTorch gives (N, H, W, 2)
    (TVM's converter passed PyTorch's layout through: wrong output shape and values)."""
    relax = _relax()
    args = importer.retrieve_args(node)
    data, grid = args[0], args[1]
    interp = int(args[2]) if len(args) > 2 else 0
    padding = int(args[3]) if len(args) > 3 else 0
    align = bool(args[4]) if len(args) > 4 else False
    methods, pads = {0: "bilinear", 1: "nearest", 2: "bicubic"}, {0: "zeros", 1: "border", 2: "reflection"}
    if padding != 0:
        # PyTorch clips a NaN grid coordinate to the border (std::min/max) and reflects Inf coordinates in
        # its own way; TVM's kernel returns NaN there: only zero padding agrees on every input
        raise LoweringError(f"aten.grid_sampler_2d: padding_mode={pads.get(padding, padding)!r} is not supported "
                            f"by the TVM backend (only padding_mode='zeros')")
    if interp not in methods:
        raise LoweringError(f"aten.grid_sampler_2d: interpolation mode {interp} / padding mode {padding} is not "
                            f"supported by the TVM backend")
    bb = importer.block_builder
    grid = bb.emit(relax.op.permute_dims(grid, [0, 3, 1, 2]))
    return bb.emit(relax.op.image.grid_sample(data, grid, method=methods[interp], layout="NCHW",
                                              padding_mode=pads[padding], align_corners=align))


def _expm1(bb, x):
    """exp(x) - 1 without cancellation near 0 (Kahan: (u - 1) * x / log(u), u = exp(x)); exact at u == 1,
    -1 where exp(x) underflows, NaN for NaN, +Inf for +Inf."""
    relax = _relax()
    op = relax.op
    dt = _dtype(x)
    one = relax.const(1.0, dt)
    u = bb.emit(op.exp(x))
    um1 = bb.emit(op.subtract(u, one))
    kahan = op.divide(op.multiply(um1, x), op.log(u))
    out = op.where(op.equal(u, one), x, op.where(op.equal(um1, relax.const(-1.0, dt)), um1, kahan))
    return bb.emit(op.where(op.equal(u, relax.const(float("inf"), dt)), u, out))


def _elu(node, importer):
    """aten.elu(x, alpha, scale, input_scale) as ATen: x <= 0 ? expm1(x * input_scale) * alpha * scale
    : x * scale (selu is elu with alpha 1.6733, scale 1.0507; TVM's converter dropped scale)."""
    relax = _relax()
    op = relax.op
    x = importer.env[node.args[0]]
    alpha = float(_arg(node, 1, "alpha", 1.0))
    scale = float(_arg(node, 2, "scale", 1.0))
    input_scale = float(_arg(node, 3, "input_scale", 1.0))
    dt = _dtype(x)
    bb = importer.block_builder
    neg = _expm1(bb, bb.emit(op.multiply(x, relax.const(input_scale, dt))))
    neg = op.multiply(neg, relax.const(alpha * scale, dt))
    return bb.emit(op.where(op.less_equal(x, relax.const(0.0, dt)), neg, op.multiply(x, relax.const(scale, dt))))


# ---------------------------------------------------------------------------------------------- remainder
def _remainder(node, importer):
    """Float remainder as ATen: m = fmod(a, b); m + b where m != 0 and sign(m) != sign(b)."""
    relax = _relax()
    out_dtype = _val_dtype(node)
    if not (out_dtype or "").startswith("float"):
        return importer._binary_op(relax.op.floor_mod, operator.mod)(node)
    args = importer.retrieve_args(node)
    a, b = args[0], args[1]

    bb = importer.block_builder

    def as_expr(v):
        return v if _dtype(v) == out_dtype else bb.emit(relax.op.astype(v, out_dtype))

    from tvm import te, tirx

    from .numerics import _broadcast_apply

    if isinstance(a, relax.Expr) and isinstance(b, relax.Expr):
        return bb.emit_te(lambda x, y: _broadcast_apply(_remainder_body, x, y), as_expr(a), as_expr(b))
    # a Python scalar on one side: a TIR constant in the kernel (emit_te takes no 0-d Relax constant)
    tensor, scalar, scalar_first = (b, a, True) if isinstance(b, relax.Expr) else (a, b, False)

    def kernel(t):
        c = tirx.const(float(scalar), out_dtype)
        return te.compute(t.shape, lambda *i: _remainder_body(c, t(*i)) if scalar_first
                          else _remainder_body(t(*i), c), name="remainder")

    return bb.emit_te(kernel, as_expr(tensor))


def _remainder_body(x, y):
    from tvm import tirx

    dt = str(x.ty.dtype)
    zero = tirx.const(0, dt)
    mod = tirx.Mod(x, y)               # float Mod is LLVM frem: C fmod
    differ = tirx.Or(tirx.And(y < zero, mod > zero), tirx.And(y > zero, mod < zero))
    return tirx.Select(differ, mod + y, mod)


# ------------------------------------------------------------------------------------------------ indexing
def _wrap_index(bb, index, size):
    """index + size where index < 0 (PyTorch's negative indices); `size` an int or, for a dynamic dim, its TIR
    expression (read from the shape at run time)."""
    relax = _relax()
    op = relax.op
    dt = _dtype(index)
    return bb.emit(op.where(op.less(index, relax.const(0, dt)), op.add(index, _dim_tensor(bb, [size], dt)), index))


def _select(node, importer):
    relax = _relax()
    x = importer.env[node.args[0]]
    dim, index = int(node.args[1]), node.args[2]
    if not isinstance(index, int):
        return _tvm(importer, "select.int")(node)
    ndim = _ndim(x)
    dim %= max(ndim, 1)
    size = _shape(x)[dim]
    if not _is_static(size):                            # a dynamic dim (a symbolic extent)
        if index >= 0:
            return _tvm(importer, "select.int")(node)
        bb = importer.block_builder                     # x[..., -k]: strided_slice counts from the end
        end = index + 1 if index < -1 else (1 << 63) - 1
        part = bb.emit(relax.op.strided_slice(x, axes=[dim], begin=[index], end=[end]))
        return bb.emit(relax.op.squeeze(part, [dim]))
    if not -size <= index < size:
        raise LoweringError(f"aten.select.int: index {index} is out of range for dim {dim} of size {size}")
    return importer.block_builder.emit(relax.op.take(x, relax.const(index % size, "int64"), dim))


def _extents(x) -> list:
    """x's shape: ints, and the TIR expressions of dynamic dims as they are."""
    import tvm.tirx

    return [int(d) if isinstance(d, tvm.tirx.IntImm) else d for d in x.ty.shape]


def _index_tensor(node, importer):
    """x[i0, i1, ...] with negative indices wrapped (TVM's converter read out of bounds for them)."""
    relax = _relax()
    x = importer.env[node.args[0]]
    indices = list(node.args[1])
    shape = _extents(x) if hasattr(x.ty, "shape") and x.ty.shape is not None else None
    saved = {}
    try:
        if shape is not None:
            for axis, idx in enumerate(indices):
                if idx is None or idx not in importer.env:
                    continue
                expr = importer.env[idx]
                if not isinstance(expr, relax.Expr) or not _dtype(expr).startswith(("int", "uint")):
                    continue          # bool masks are not positions
                saved[idx] = expr
                importer.env[idx] = _wrap_index(importer.block_builder, expr, shape[axis])
        return _tvm(importer, "index.Tensor")(node)
    finally:
        importer.env.update(saved)


# ------------------------------------------------------------------------------------------------ moments
def _moments(node, importer, want_mean: bool):
    """(var64, mean64) of aten.var.correction / var_mean.correction in float64 (both kept as the importer's
    side table entry for a later sqrt)."""
    relax = _relax()
    op = relax.op
    x = importer.env[node.args[0]]
    ndim = _ndim(x)
    dim = _arg(node, 1, "dim", None)
    correction = node.kwargs.get("correction", None)
    if correction is None:
        correction = 1
    keepdim = bool(node.kwargs.get("keepdim", False))
    shape = _shape(x)
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        axes = list(range(ndim))
    else:
        axes = sorted({int(d) % max(ndim, 1) for d in ([dim] if isinstance(dim, int) else dim)})
    if ndim == 0:
        axes = []
    sizes = [shape[a] for a in axes]
    static_n = 1
    for d in sizes:
        static_n *= d if _is_static(d) else 1
    n = static_n if all(_is_static(d) for d in sizes) else None      # None: a dynamic dim is reduced
    bb = importer.block_builder
    if static_n == 0:           # no elements: NaN moments, as PyTorch (TVM's mean divided by a constant 0)
        import numpy as np

        out_shape = [1 if a in axes else shape[a] for a in range(ndim)] if keepdim else \
            [shape[a] for a in range(ndim) if a not in axes]
        if all(_is_static(d) for d in out_shape):
            nan = relax.const(np.full(out_shape, np.nan, "float64"))
        else:
            nan = bb.emit(op.full(relax.ShapeExpr(out_shape), relax.const(float("nan"), "float64"), "float64"))
        return nan, nan
    xd = bb.emit(op.astype(x, "float64"))
    if axes:
        mean = bb.emit(op.mean(xd, axis=axes, keepdims=True))
        centered = bb.emit(op.subtract(xd, mean))
        m2 = bb.emit(op.sum(op.multiply(centered, centered), axis=axes, keepdims=keepdim))
        if not keepdim:
            mean = bb.emit(op.squeeze(mean, axis=axes))
    else:
        mean = xd
        m2 = bb.emit(op.multiply(op.subtract(xd, xd), op.subtract(xd, xd)))
    if want_mean and axes and (n is None or n > 1):
        # ATen's Welford update makes the mean NaN once any element after an infinite one (in reduction
        # order, row-major over the reduced dims) arrives: mean + (x - inf) / k = inf - inf. Only an infinity
        # in the last position (every reduced index at its extent - 1) survives.
        early_inf = bb.emit_te(_early_inf_te, xd, axes)
        hit = bb.emit(op.max(early_inf, axis=axes, keepdims=keepdim))
        mean = bb.emit(op.where(op.greater(hit, relax.const(0, "int8")), relax.const(float("nan"), "float64"),
                                mean))
    if n is not None:
        divisor = max(0.0, n - float(correction))
        scale = 1.0 / divisor if divisor > 0 else float("inf")     # M2 / 0: +Inf, or NaN where M2 is 0 or NaN
        var = bb.emit(op.multiply(m2, relax.const(scale, "float64")))
    else:                       # M2 / max(0, n - correction) with n read from the shape at run time
        count = _dim_tensor(bb, sizes, "float64")
        divisor = bb.emit(op.maximum(op.subtract(count, relax.const(float(correction), "float64")),
                                     relax.const(0.0, "float64")))
        var = bb.emit(op.divide(m2, divisor))
    return var, mean


def _early_inf_te(x, axes):
    """int8 1 where x is +-Inf and not at the last position of the reduction over `axes`, else 0."""
    from tvm import te, tirx

    def body(*i):
        last = tirx.all(*[i[a] == x.shape[a] - 1 for a in axes])
        return tirx.Cast("int8", tirx.And(tirx.isinf(x(*i)), tirx.Not(last)))

    return te.compute(x.shape, body, name="welford_early_inf")


def _float32(importer, x, like: str):
    return importer.block_builder.emit(_relax().op.astype(x, like))


def _var(node, importer):
    x = importer.env[node.args[0]]
    dt = _dtype(x)
    if not dt.startswith("float"):
        return _tvm(importer, "var.correction")(node)
    var, _ = _moments(node, importer, False)
    _side(importer)[node] = var
    return _float32(importer, var, dt)


def _var_mean(node, importer):
    relax = _relax()
    x = importer.env[node.args[0]]
    dt = _dtype(x)
    if not dt.startswith("float"):
        raise LoweringError(f"aten.var_mean.correction of a {dt} tensor is not supported by the TVM backend")
    var, mean = _moments(node, importer, True)
    _side(importer)[(node, 0)] = var
    return importer.block_builder.emit(relax.Tuple([_float32(importer, var, dt), _float32(importer, mean, dt)]))


def _sqrt(node, importer):
    """sqrt; of a variance computed here: taken in float64, as ATen's std (no float32 overflow between)."""
    import operator as _op

    relax = _relax()
    src = node.args[0]
    side = _side(importer)
    var64 = None
    if src in side:
        var64 = side[src]
    elif getattr(src, "target", None) is _op.getitem and (src.args[0], src.args[1]) in side:
        var64 = side[(src.args[0], src.args[1])]
    if var64 is None:
        return _tvm(importer, "sqrt.default")(node)
    out_dt = _val_dtype(node) or "float32"
    return importer.block_builder.emit(relax.op.astype(relax.op.sqrt(var64), out_dt))


def _side(importer) -> dict:
    table = getattr(importer, "_graphopt_moments", None)
    if table is None:
        table = {}
        importer._graphopt_moments = table
    return table


# ------------------------------------------------------------------------------------------------- sums
def _sum_dim(node, importer):
    """sum over dims; a 0-d tensor summed over dim 0 / -1 is itself (promoted as torch.sum promotes)."""
    relax = _relax()
    x = importer.env[node.args[0]]
    if isinstance(x, relax.Expr) and hasattr(x.ty, "ndim") and _ndim(x) == 0:
        out_dt = _val_dtype(node) or _dtype(x)
        return x if _dtype(x) == out_dt else importer.block_builder.emit(relax.op.astype(x, out_dt))
    return _tvm(importer, "sum.dim_IntList")(node)

# -------------------------------------------------------------------------------------------------- cat
def _cat(node, importer):
    """torch.cat: a 1-D input of shape (0,) beside inputs of another rank is skipped (ATen's legacy rule),
    the rest concatenated along dim; the result has the node's dtype (computed over all inputs, as ATen)."""
    import tvm.tirx

    relax = _relax()
    vals = [importer.env[t] for t in node.args[0]]
    if len({_ndim(v) for v in vals}) == 1:
        return _tvm(importer, "cat.default")(node)

    def legacy_empty(v):
        extent = v.ty.shape[0] if _ndim(v) == 1 else None
        return isinstance(extent, tvm.tirx.IntImm) and int(extent) == 0

    kept = [v for v in vals if not legacy_empty(v)]
    if not kept or len({_ndim(v) for v in kept}) != 1:
        raise LoweringError(f"aten.cat.default (node '{node.name}'): inputs of ranks {[_ndim(v) for v in vals]}: "
                            f"only empty 1-D tensors may differ in rank from the others")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    dim %= _ndim(kept[0])
    bb = importer.block_builder
    out = kept[0] if len(kept) == 1 else bb.emit(relax.op.concat(kept, axis=dim))
    out_dt = _val_dtype(node) or _dtype(out)
    return out if _dtype(out) == out_dt else bb.emit(relax.op.astype(out, out_dt))


# ------------------------------------------------------------------------------- transposed convolution
def _tuple(v, n: int) -> list[int]:
    if isinstance(v, (list, tuple)):
        v = list(v)
        return [int(x) for x in (v * n if len(v) == 1 else v)]
    return [int(v)] * n


def _finite_constant(ep, node) -> bool:
    """Whether fx node `node` of ExportedProgram `ep` is a parameter/buffer/constant with finite values only
    (bound into the module as a constant after conversion)."""
    import torch

    if ep is None or getattr(node, "op", None) != "placeholder":
        return False
    for spec in ep.graph_signature.input_specs:
        if getattr(spec.arg, "name", None) == node.name and spec.target is not None:
            value = ep.state_dict.get(spec.target, ep.constants.get(spec.target))
            return isinstance(value, torch.Tensor) and bool(torch.isfinite(value).all())
    return False


def _conv_transpose_te(x, w, stride, padding, dilation, output_padding, groups: int):
    """Transposed convolution summing only the products of real input elements and weights, as PyTorch's
    GEMM + col2im does: out[b, oc, o] = sum over (ic, k) with o + p - k*d = i*s, 0 <= i < size of
    x[b, ic, i] * w[ic, oc % OCg, k]. TVM's kernel convolves a zero-dilated, zero-padded input instead, where
    0 * Inf = NaN appears at outputs PyTorch computes as +-Inf or finite values."""
    from tvm import te, tirx

    nd = len(x.shape) - 2
    batch, in_c = x.shape[0], int(x.shape[1])
    sizes = list(x.shape[2:])          # dynamic (symbolic) spatial sizes stay TIR expressions
    kernel = [int(d) for d in w.shape[2:]]
    out_cg = int(w.shape[1])
    in_cg = in_c // groups
    out_sizes = [(sizes[d] - 1) * stride[d] - 2 * padding[d] + dilation[d] * (kernel[d] - 1)
                 + output_padding[d] + 1 for d in range(nd)]
    ric = te.reduce_axis((0, in_cg), name="ric")
    rk = [te.reduce_axis((0, kernel[d]), name=f"rk{d}") for d in range(nd)]
    dtype = str(x.dtype)

    # Taps that are no input element read a zero border instead (their products are not taken): floordiv(t, s)
    # runs from floordiv(padding - dilation * (kernel - 1), s) to size - 1 + floordiv(dilation * (kernel - 1) +
    # output_padding - padding, s). Reading x itself there behind a Select (both sides are evaluated) read
    # outside x once TIR's simplifier dropped the index's guard inside it (TVM's OOBChecker).
    lo = [max(0, -((padding[d] - dilation[d] * (kernel[d] - 1)) // stride[d])) for d in range(nd)]
    hi = [max(0, (dilation[d] * (kernel[d] - 1) + output_padding[d] - padding[d]) // stride[d]) for d in range(nd)]
    xp = x
    if any(lo) or any(hi):
        def border(b, c, *i):
            inside = tirx.all(*[tirx.all(i[d] >= lo[d], i[d] < sizes[d] + lo[d]) for d in range(nd)])
            at = [tirx.min(tirx.max(i[d] - lo[d], 0), sizes[d] - 1) for d in range(nd)]
            # if_then_else (lazy, as TOPI's pads): a schedule keeps it a padded copy, or inlines it and its read
            # stays guarded; likely keeps the clamps from the simplifier, so TVM's OOBChecker can see them
            return tirx.if_then_else(tirx.likely(inside), x[(b, c, *at)], tirx.const(0, dtype))
        xp = te.compute([batch, in_c, *[sizes[d] + lo[d] + hi[d] for d in range(nd)]], border,
                        name="conv_transpose_pad")        # a pad block to the schedules (_is_pad_block)

    def body(b, oc, *o):
        g = oc // out_cg
        ic = g * in_cg + ric
        valid = None
        index = []
        for d in range(nd):
            t = o[d] + padding[d] - rk[d] * dilation[d]
            ok = tirx.all(t >= 0, tirx.floormod(t, stride[d]) == 0, tirx.floordiv(t, stride[d]) < sizes[d])
            valid = ok if valid is None else tirx.all(valid, ok)
            index.append(tirx.floordiv(t, stride[d]) + lo[d])
        prod = xp[(b, ic, *index)] * w[(ic, tirx.floormod(oc, out_cg), *rk)]
        return te.sum(tirx.Select(valid, prod, tirx.const(0, dtype)), axis=[ric, *rk])

    return te.compute([batch, out_cg * groups, *out_sizes], body, name="conv_transpose_exact")


def _conv_transpose(node, importer, ep=None):
    """aten.convolution (transposed=True) and conv_transpose{1,2}d: TVM's kernel when the weight is a finite
    constant (then its zero-dilated convolution multiplies zeros by finite weights only: the same sum);
    otherwise the exact kernel above (a weight given at run time may hold Inf/NaN)."""
    relax = _relax()
    name = getattr(node.target, "__name__", "")
    args = importer.retrieve_args(node)
    if name.startswith("convolution"):
        transposed = bool(args[6]) if len(args) > 6 else False
        if not transposed:
            return _tvm(importer, name)(node)
        stride, padding, dilation = (args[3] if len(args) > 3 else 1, args[4] if len(args) > 4 else 0,
                                     args[5] if len(args) > 5 else 1)
        output_padding, groups = (args[7] if len(args) > 7 else 0), int(args[8] if len(args) > 8 else 1)
    else:       # conv_transpose{1,2,3}d.input(x, w, bias, stride, padding, output_padding, groups, dilation)
        stride, padding = (args[3] if len(args) > 3 else 1, args[4] if len(args) > 4 else 0)
        output_padding, groups = (args[5] if len(args) > 5 else 0), int(args[6] if len(args) > 6 else 1)
        dilation = args[7] if len(args) > 7 else 1
    x, w = args[0], args[1]
    bias = args[2] if len(args) > 2 else None
    if _ndim(x) in (3, 4) and _finite_constant(ep, node.args[1]):
        return _tvm(importer, name)(node)
    nd = _ndim(x) - 2
    _static_shape(node, w, "the weight of a transposed convolution")
    if not _is_static(_shape(x)[1]):
        raise LoweringError(f"{_op_name(node)} (exported node '{node.name}'): the input's channel dim (dim 1) is "
                            f"dynamic; a transposed convolution needs it static in the TVM backend")
    if isinstance(padding, str):
        raise LoweringError(f"aten.{name}: padding={padding!r} is not supported by the TVM backend for a "
                            f"transposed convolution")
    bb = importer.block_builder
    out = bb.emit_te(_conv_transpose_te, x, w, _tuple(stride, nd), _tuple(padding, nd), _tuple(dilation, nd),
                     _tuple(output_padding, nd), groups)
    if isinstance(bias, relax.Expr):
        out = bb.emit(relax.op.add(out, relax.op.reshape(bias, [1, -1] + [1] * nd)))
    return out


def _tvm(importer, name: str) -> Callable:
    from .numerics import _tvm_converter

    return _tvm_converter(importer, name)


# fx-level ops whose outputs torch.export's decomposition computes wrongly: {op: {output index: what}}.
# _scaled_dot_product_flash_attention_for_cpu decomposes to the math formula and returns the attention
# probabilities (B, H, L, S) where the op's logsumexp (B, H, L) belongs.
_WRONG_DECOMPOSITION = {"aten._scaled_dot_product_flash_attention_for_cpu.default": {1: "logsumexp"}}


def check_graph(gm) -> None:
    """Raise LoweringError for a use of an output listed in _WRONG_DECOMPOSITION in fx graph `gm` (checked
    before export, which decomposes the op away)."""
    import torch

    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if isinstance(node.target, torch._ops.OpOverload):
            name = f"{node.target.namespace}.{node.target.__name__}"
        elif isinstance(node.target, torch._ops.OpOverloadPacket):     # torch.ops.aten.op: its default
            name = f"{str(node.target)}.default"
        else:
            continue
        for index, what in _WRONG_DECOMPOSITION.get(name, {}).items():
            used = any(not (u.op == "call_function" and u.target is operator.getitem)   # the whole tuple
                       or (u.args[1] == index and u.users) for u in node.users)
            if used:
                raise LoweringError(f"{name}: output {index} ({what}) of fx node '{node.name}' is not supported by "
                                    f"the TVM backend (torch.export's decomposition computes it wrongly); use the "
                                    f"op's main output only")


def _flash_attention_cpu(node, importer):
    from .numerics import _refusing_outputs

    name = "_scaled_dot_product_flash_attention_for_cpu.default"
    return _refusing_outputs(name, {1: "logsumexp"})(node, importer)


CONVERTERS: dict[str, Callable] = {
    "_scaled_dot_product_flash_attention_for_cpu.default": _flash_attention_cpu,
    "ne.Tensor": _ne,
    "eq.Tensor": _eq,
    "ne.Scalar": _ne,
    "mul.Tensor": _mul,
    "mul.Scalar": _mul,
    "grid_sampler_2d.default": _grid_sampler_2d,
    "elu.default": _elu,
    "remainder.Tensor": _remainder,
    "remainder.Scalar": _remainder,
    "remainder.Scalar_Tensor": _remainder,
    "select.int": _select,
    "index.Tensor": _index_tensor,
    "var.correction": _var,
    "var_mean.correction": _var_mean,
    "sqrt.default": _sqrt,
    "sum.dim_IntList": _sum_dim,
    "cat.default": _cat,
}


def converters(ep) -> dict[str, Callable]:
    """CONVERTERS plus those that read `ep` (an ExportedProgram): the transposed convolutions."""
    import functools

    conv = functools.partial(_conv_transpose, ep=ep)
    return {**CONVERTERS, "convolution.default": conv, "conv_transpose1d.default": conv,
            "conv_transpose2d.input": conv, "conv_transpose3d.input": conv}


# ------------------------------------------------------------------------------------ decompositions
def _positive_part(z):
    """z where z > 0, else 0: ATen's margin-loss kernels add a term only `if (z > 0)`, so a NaN term is
    skipped; torch's own decompositions use clamp_min(0), which keeps it (NaN loss where eager's is finite)."""
    import torch

    return torch.where(z > 0, z, torch.zeros_like(z))


def _multi_margin_loss(input, target, p=1, margin=1, weight=None, reduction=1):
    """aten.multi_margin_loss as ATen's CPU kernel computes it: per sample, the sum over classes d != target
    of max-if-positive(margin - x[target] + x[d]) (squared for p = 2, times weight[target]), divided by the
    number of classes; then the reduction (0 none, 1 mean, 2 sum)."""
    import torch

    input = torch.atleast_2d(input)
    target_1d = torch.atleast_1d(target)
    dim = input.shape[1]
    t = target_1d.unsqueeze(1)
    u = torch.gather(input, 1, t)
    z = _positive_part(margin - u + input)
    z = z if p == 1 else z * z
    if weight is not None:
        z = z * torch.atleast_1d(weight)[target_1d].unsqueeze(1)
    idx = torch.arange(dim, device=input.device)
    z = torch.where(idx != t, z, torch.zeros_like(z))
    per_sample = z.sum(dim=1) / dim
    if reduction == 1:
        return per_sample.mean()
    if reduction == 2:
        return per_sample.sum()
    return per_sample


def _multilabel_margin_loss_forward(input, target, reduction):
    """aten.multilabel_margin_loss_forward as ATen's CPU kernel: targets up to the first -1; for each target
    j and each non-target class d, the term 1 - x[j] + x[d] if positive; the sum divided by the number of
    classes (after summing, as ATen: a sum that overflows is Inf there too)."""
    import torch

    orig_target_shape = target.shape
    input = torch.atleast_2d(input)
    target = torch.atleast_2d(target)
    dim = input.shape[1]
    idx = torch.arange(dim, device=target.device)
    is_end = target == -1
    end_idx = torch.amin(torch.where(is_end, idx, dim), dim=-1, keepdim=True)
    target_mask = idx < end_idx
    tidx0 = torch.where(target_mask, target, 0)
    u = torch.gather(input, dim=-1, index=tidx0)
    tidx1 = torch.where(target_mask, target, -1)
    is_target = torch.any(idx == tidx1.unsqueeze(dim=-1), dim=1)
    z = _positive_part(1.0 - u.T.unsqueeze(dim=-1) + input)
    z = torch.where(is_target, torch.zeros_like(z), z)
    z = torch.where(target_mask.T.unsqueeze(dim=-1), z, torch.zeros_like(z))
    per_sample = z.sum(dim=(0, -1)) / dim
    if reduction == 1:
        out = per_sample.mean()
    elif reduction == 2:
        out = per_sample.sum()
    else:
        out = per_sample
    return out, is_target.to(input.dtype).reshape(orig_target_shape)


def _softmax_backward_data(grad_output, output, dim, input_dtype):
    """aten._softmax_backward_data as ATen's CPU kernel: output * (grad_output - sum(grad_output * output))
    (torch's decomposition, g * o - o * sum(g * o), differs from it on Inf: NaN where eager gives +-Inf)."""
    import torch

    s = torch.sum(grad_output * output, dim=dim, keepdim=True)
    return ((grad_output - s) * output).to(input_dtype).contiguous()


def decompositions():
    """torch.export's default decomposition table with the margin losses decomposed as ATen computes them."""
    import torch

    table = torch.export.default_decompositions()
    aten = torch.ops.aten
    table[aten.multi_margin_loss.default] = _multi_margin_loss
    table[aten.multilabel_margin_loss_forward.default] = _multilabel_margin_loss_forward
    table[aten._softmax_backward_data.default] = _softmax_backward_data
    return table


_CIA_OPS: dict = {}
_TABLE: dict = {}


def _registry_key() -> tuple:
    """What torch's default decomposition table is built from: the registered operators and the registered
    decompositions (their counts; a new custom op or decomposition changes them)."""
    import torch
    import torch._decomp

    return (len(torch._C._dispatch_get_all_op_names()),
            tuple(len(t) for t in torch._decomp.global_decomposition_table.values()))


def _materialized_decompositions(key: tuple | None = None) -> dict:
    """decompositions() as a plain dict (a copy: the caller edits it), built once per _registry_key (`key`, when
    the caller has it already).

    Building it lists every CompositeImplicitAutograd op of every operator namespace (torch 2.14: ~20 ms
    after the first time, 65 ms the first), which every build paid; the table only changes when operators or
    decompositions are registered."""
    key = _registry_key() if key is None else key
    if _TABLE.get("key") != key:
        table = decompositions()
        _TABLE.update(key=key, table=dict(table.materialize() if hasattr(table, "materialize") else table))
    return dict(_TABLE["table"])


def _ops_in(ep) -> set:
    """Every op called in the exported program, its nested graphs (higher-order ops' bodies) included."""
    import torch

    out = set()
    for mod in ep.graph_module.modules():
        if isinstance(mod, torch.fx.GraphModule):
            out.update(n.target for n in mod.graph.nodes if n.op == "call_function")
    return out


@contextlib.contextmanager
def _cia_ops_of(ep, table: dict, n_ops: int):
    """While torch decomposes `ep`: its list of CompositeImplicitAutograd (CIA) ops is only the ones `ep` calls,
    and `table` (materialized, edited in place) keeps CIA entries only for those.

    torch 2.14's run_decompositions overrides the kernels of every CIA op in its table (py_impl for ~20
    dispatch keys each, ~500 ops: 11,000 registrations, undone afterwards) on each call, and walks every
    operator namespace twice to list them: a fixed cost of every graphopt build (a two-Linear MLP, median of
    10 calls: 91 ms with the list cached, 66 ms with only its CIA ops overridden). A CIA op the program does not call needs no override: where one appears while retracing (inside
    another op's decomposition) the dispatcher runs its CompositeImplicitAutograd kernel, which is what the
    table's entry for it does (default_decompositions maps every CIA op to that decomposition). Same graphs
    as torch's own call (tests/backends/test_aten_semantics.py). The full list is computed once per set of
    registered operators (keyed by their count, `n_ops`: _registry_key()[0]). Torch versions without these private functions decompose as
    before (the whole table)."""
    try:
        import torch._export.utils as export_utils
        import torch.export.decomp_utils as decomp_utils
        import torch.export.exported_program as exported_program
    except ImportError:
        yield
        return
    name = "_collect_all_valid_cia_ops"
    users = [m for m in (decomp_utils, exported_program) if getattr(m, name, None) is getattr(export_utils, name, 0)]
    if len(users) != 2:
        yield
        return
    original = getattr(export_utils, name)
    if _CIA_OPS.get("key") != n_ops:
        _CIA_OPS.update(key=n_ops, ops=frozenset(original()))
    every = _CIA_OPS["ops"]
    present = _ops_in(ep) & every
    for op in [op for op in table if op in every and op not in present]:
        del table[op]
    for m in users:
        setattr(m, name, lambda: set(present))
    try:
        yield
    finally:
        for m in users:
            setattr(m, name, original)


def run_decompositions(ep):
    """ep.run_decompositions(decompositions()). aten.multi_margin_loss also has a Python kernel for the
    Autograd key (torch's clamp_min decomposition) that runs before any table is consulted: it is swapped for
    _multi_margin_loss while decomposing and restored afterwards."""
    import torch
    from torch._C import DispatchKey

    op = torch.ops.aten.multi_margin_loss.default
    kernels = getattr(op, "py_kernels", None)
    old = kernels.get(DispatchKey.Autograd) if kernels is not None else None
    if old is not None:
        kernels[DispatchKey.Autograd] = _multi_margin_loss
        op._dispatch_cache.clear()
    key = _registry_key()                 # listing the registered operators: ~3 ms, once per build
    table = _materialized_decompositions(key)
    try:
        with _cia_ops_of(ep, table, key[0]):
            return ep.run_decompositions(table)
    finally:
        if old is not None:
            kernels[DispatchKey.Autograd] = old
            op._dispatch_cache.clear()
