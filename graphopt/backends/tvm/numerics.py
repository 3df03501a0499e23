"""PyTorch's floating-point semantics where TVM's lowering differs from them.

PyTorch is the specification: a compiled model must return what eager PyTorch returns, including NaN and
+-Inf. TVM 0.27 departs from it in a few places; each is corrected here, in one place per layer:

  nan_propagating_minmax()   TIR pass, run on every scheduled CPU kernel before codegen (build.build_module;
                             not on CUDA yet: a rewritten reduction max is no reducer that TVM's
                             cross-thread reduction lowering recognizes, so GPU max/min still drop NaN).
                             TIR `max(a, b)` / `min(a, b)` on floats become LLVM's `select(a > b, a, b)`
                             (`<` for min): a NaN in `a` is dropped (relu(NaN) = 0, clamp(NaN) = lo,
                             max-pool and max() skip NaN). PyTorch's maximum/minimum/clamp/relu/max-reductions return NaN
                             when an operand is NaN. A float Max/Min against a non-NaN constant (relu,
                             relu6, clamp, hardtanh, the fast_* input clamps) becomes PyTorch's own
                             `C > x ? C : x` (`<` for min): exact, NaN and signed zero included
                             (relu(-0.0) = -0.0, where llvm.maximum gives +0.0), and no slower than the
                             form below (MobileNetV2, x86:haswell, interleaved: equal). Every other float Max/Min
                             becomes LLVM's llvm.maximum / llvm.minimum (IEEE 754-2019: NaN in, NaN out;
                             x86: max + unordered compare + blend per vector; AArch64: one FMAX/FMIN); they
                             order -0.0 below +0.0, where PyTorch returns either zero: equal values.
                             Integer Max/Min (index arithmetic, int8 kernels) are left alone.
  convert_map(ep)            importer converters (lower.lower_graph) for ATen ops whose TVM converter has
                             other semantics than PyTorch:
                               div.Tensor_mode floor   PyTorch's div_floor_floating (fmod-based; Inf/NaN
                                                       edges, sign of zero) instead of floor(a / b)
                               avg_pool2d              divisor_override honoured (TVM's converter dropped it)
                               max_pool2d_with_indices ceil_mode windows as PyTorch's; the indices output: a
                                                       LoweringError when the graph uses it (TVM's converter
                                                       returned zeros)
                               layer_norm              NaN rows where PyTorch's float32 moments overflow
                               amax / amin             (no TVM converter) relax max / min
                               batch norm (training)   batch statistics that cannot overflow where PyTorch's
                                                       do not, and PyTorch's five outputs
                             plus aten_semantics.converters(ep): the ops the full OpInfo sweep found wrong
                             (ne, remainder, elu, moments, transposed convolution, ...; see that module)
  _bool_not                  in the same TIR pass: `not x` as `int8(x) == 0` (TVM's vectorized `not` was wrong)
"""
from __future__ import annotations

from typing import Any, Callable

from ...errors import LoweringError

__all__ = ["nan_propagating_minmax", "convert_map"]


# ------------------------------------------------------------------------------------------- TIR pass
_FLOATS = ("float16", "bfloat16", "float32", "float64")


def _nan_minmax(e):
    """The NaN-propagating form of a float tirx.Max / tirx.Min node (others are returned unchanged):
    LLVM's llvm.maximum / llvm.minimum (IEEE 754-2019 maximum/minimum: NaN if either operand is NaN), one
    opaque pure call with each operand once, so nested min/max do not grow and the vectorizer keeps it whole."""
    from tvm import tirx

    dtype = str(e.ty.dtype)
    if dtype not in _FLOATS:
        return e
    is_max = isinstance(e, tirx.Max)
    for const, x in ((e.a, e.b), (e.b, e.a)):
        if isinstance(const, tirx.FloatImm) and const.value == const.value:        # a non-NaN constant bound
            # clamp / relu / relu6 against a constant C: PyTorch's `C > x ? C : x` (`<` for min) exactly,
            # NaN and signed zero included (relu(-0.0) = -0.0); x86 selects it into one vmaxps / vminps
            # (their "return the second operand if unordered" rule is this select). x is bound once (Let):
            # nested clamps do not repeat it.
            v = tirx.Var("clamped", dtype)
            cond = tirx.GT(const, v) if is_max else tirx.LT(const, v)
            return tirx.Let(v, x, tirx.Select(cond, const, v))
    name = "llvm.maximum" if is_max else "llvm.minimum"
    return tirx.call_llvm_pure_intrin(dtype, name, e.a, e.b)


def _bool_not(e):
    """`not x` as `int8(x) == 0`: TVM 0.27's LLVM codegen miscompiles a vectorized logical not of a bool
    loaded from a buffer (every lane came out false: _safe_softmax's fully masked rows, whose mask is
    `not any(...)`, returned NaN instead of 0 once dlight's Reduction rule vectorized the mask)."""
    from tvm import tirx

    return tirx.EQ(tirx.Cast("int8", e.a), tirx.const(0, "int8"))


def nan_propagating_minmax():
    """Module pass: every float min/max of every PrimFunc propagates NaN, as PyTorch's does (see above);
    every logical not is spelled so that it survives vectorization (_bool_not).

    The rewrite does not grow a kernel (the select-based form it replaces repeated each operand, grew
    geometrically on nested min/max and had to leave kernels with more than 64 of them unrewritten)."""
    import tvm_ffi
    from tvm import tirx

    from .prim_func_pass import prim_func_pass

    return prim_func_pass("GraphoptNaNPropagatingMinMax", lambda func: tvm_ffi.structural_map(
        func, [((tirx.Max, tirx.Min), _nan_minmax), (tirx.Not, _bool_not)]))


# --------------------------------------------------------------------------------------- converters
def convert_map(ep) -> dict[str, Callable]:
    """Converters (node, importer) -> relax.Var overriding TVM's for the ops listed in the module docstring
    that occur in `ep` (an ExportedProgram)."""
    from .aten_semantics import converters         # the --all sweep's findings

    more = converters(ep)

    present = {getattr(n.target, "__name__", "") for n in ep.graph.nodes if n.op == "call_function"}
    return {name: fn for name, fn in {**_CONVERTERS, **more}.items() if name in present}


def _broadcast_apply(f, a, b):
    """te.compute of f(a[i], b[i]) with NumPy broadcasting of a and b."""
    from tvm import te

    na, nb = len(a.shape), len(b.shape)
    n = max(na, nb)
    sa = [1] * (n - na) + list(a.shape)
    sb = [1] * (n - nb) + list(b.shape)
    out = [sb[i] if _is_one(sa[i]) else sa[i] for i in range(n)]

    def index(t, shape, idx):
        k = len(t.shape)
        sub = idx[n - k:]
        return [0 if _is_one(shape[n - k + j]) else sub[j] for j in range(k)]

    return te.compute(out, lambda *idx: f(a(*index(a, sa, idx)), b(*index(b, sb, idx))), name="floor_divide")


def _is_one(dim) -> bool:
    try:
        return int(dim) == 1
    except Exception:
        return False


def _div(node, importer):
    from tvm import relax

    args = importer.retrieve_args(node)
    mode = args[2] if len(node.args) > 2 else node.kwargs.get("rounding_mode", None)
    a, b = args[0], args[1]
    dtype = _dtype_of(a) or _dtype_of(b)
    if mode != "floor" or not (dtype or "").startswith("float"):
        return importer._div(node)
    if not isinstance(a, relax.Expr):
        a = relax.const(a, dtype)
    if not isinstance(b, relax.Expr):
        b = relax.const(b, dtype)
    return importer.block_builder.emit_te(_floor_divide_te, a, b)


def _floor_divide_te(a, b):
    return _broadcast_apply(_floor_body, a, b)


def _floor_body(x, y):
    """PyTorch's div_floor_floating (c10/util/generic_math.h) on two float scalars:
        b == 0: a / b;  mod = fmod(a, b); div = (a - mod) / b; if mod != 0 and (b < 0) != (mod < 0): div -= 1
        div != 0: floor(div), +1 if div - floor(div) > 0.5;  div == 0: copysign(0, a / b)"""
    from tvm import tirx

    dt = str(x.ty.dtype)
    zero, one, half = tirx.const(0, dt), tirx.const(1, dt), tirx.const(0.5, dt)
    mod = tirx.Mod(x, y)              # float Mod is LLVM frem: C fmod (tirx.fmod has no LLVM lowering)
    div = (x - mod) / y
    signs_differ = tirx.Or(tirx.And(y < zero, mod > zero), tirx.And(y > zero, mod < zero))   # mod != 0 too
    div = tirx.Select(signs_differ, div - one, div)
    fl = tirx.floor(div)
    fl = tirx.Select(div - fl > half, fl + one, fl)
    q = x / y
    out = tirx.Select(div == zero, tirx.copysign(zero, q), fl)     # TIR's float != is ordered: false for NaN
    return tirx.Select(y == zero, q, out)


def _dtype_of(x: Any) -> str | None:
    info = getattr(x, "struct_info", None) or getattr(x, "ty", None)
    dtype = getattr(info, "dtype", None)
    return str(dtype) if dtype else None


# ------------------------------------------------------------------------------------------- pooling
def _pair(v, default=None) -> tuple[int, int]:
    if v is None or (isinstance(v, (list, tuple)) and len(v) == 0):
        v = default
    if isinstance(v, (list, tuple)):
        return (int(v[0]), int(v[-1])) if len(v) in (1, 2) else _bad_pair(v)
    return int(v), int(v)


def _bad_pair(v):
    raise LoweringError(f"2-D pooling argument {v!r} has {len(v)} entries")


def pool_windows(size: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> tuple[int, int]:
    """PyTorch's pooling_output_shape for one axis, and the padding after the input (bottom/right) that
    makes a floor-mode pooling with padding (p, that) produce exactly those windows: (out, pad_after).
    In ceil mode PyTorch adds a last, partial window unless it would start in the right padding."""
    num = size + 2 * p - d * (k - 1) - 1
    out = (num + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    after = (out - 1) * s + d * (k - 1) + 1 - (size + p)
    return out, max(0, after)


def _pool_args(node, importer, names, defaults):
    args = importer.retrieve_args(node)
    vals = list(args) + [None] * (len(names) - len(args))
    out = {}
    for i, name in enumerate(names):
        v = vals[i] if i < len(args) else node.kwargs.get(name, defaults.get(name))
        out[name] = defaults.get(name) if v is None else v
    return out


def _uses_output(node, index: int) -> bool:
    """Whether a getitem of output `index` of a multi-output node is used."""
    import operator

    return any(u.op == "call_function" and u.target is operator.getitem and u.args[1] == index and u.users
               for u in node.users)


def _max_pool2d_with_indices(node, importer):
    """max_pool2d: PyTorch's ceil_mode windows via explicit padding; the indices output is refused (TVM's
    converter returned zeros for it)."""
    from tvm import relax

    if _uses_output(node, 1):
        raise LoweringError("aten.max_pool2d_with_indices: return_indices=True (the indices output) is not "
                            "supported by the TVM backend; use max_pool2d without return_indices")
    a = _pool_args(node, importer, ["x", "kernel_size", "stride", "padding", "dilation", "ceil_mode"],
                   {"padding": 0, "dilation": 1, "ceil_mode": False})
    if not a["ceil_mode"]:
        return importer._max_pool2d_with_indices(node)
    x, squeeze = _as_4d(importer, a["x"])
    k, st, p, d = (_pair(a["kernel_size"]), _pair(a["stride"], a["kernel_size"]), _pair(a["padding"]),
                   _pair(a["dilation"]))
    h, w = _hw(x, node)
    _, ah = pool_windows(h, k[0], st[0], p[0], d[0], True)
    _, aw = pool_windows(w, k[1], st[1], p[1], d[1], True)
    out = importer.block_builder.emit(relax.op.nn.max_pool2d(
        x, pool_size=k, strides=st, padding=(p[0], p[1], ah, aw), dilation=d, ceil_mode=False, layout="NCHW"))
    out = _restore(importer, out, squeeze)
    indices = relax.op.zeros_like(out)          # never read: refused above when the graph uses it
    return importer.block_builder.emit(relax.Tuple([out, indices]))


def _avg_pool2d(node, importer):
    """avg_pool2d with ceil_mode or divisor_override, as PyTorch computes it: the window sum (zero padding,
    every window full after explicit padding) divided by PyTorch's divisor per output position
    (divisor_override; else the window clipped to the padded input with count_include_pad, or the number of
    input elements in it without). Other avg_pool2d calls keep TVM's converter."""
    import numpy as np
    from tvm import relax

    a = _pool_args(node, importer, ["x", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                                    "divisor_override"],
                   {"padding": 0, "ceil_mode": False, "count_include_pad": True})
    if not a["ceil_mode"] and not a["divisor_override"]:
        return importer._avg_pool2d(node)
    x, squeeze = _as_4d(importer, a["x"])
    k, st, p = _pair(a["kernel_size"]), _pair(a["stride"], a["kernel_size"]), _pair(a["padding"])
    size = _hw(x, node)
    dims = [pool_windows(size[i], k[i], st[i], p[i], 1, bool(a["ceil_mode"])) for i in range(2)]
    dtype = str(x.ty.dtype)
    bb = importer.block_builder
    padded = bb.emit(relax.op.nn.pad(x, [0, 0, 0, 0, p[0], dims[0][1], p[1], dims[1][1]], "constant", 0.0))
    mean = bb.emit(relax.op.nn.avg_pool2d(padded, pool_size=k, strides=st, padding=(0, 0), ceil_mode=False,
                                          count_include_pad=True, layout="NCHW"))
    total = bb.emit(relax.op.multiply(mean, relax.const(float(k[0] * k[1]), dtype)))

    def axis(i):
        out = dims[i][0]
        start = np.arange(out) * st[i] - p[i]
        end = np.minimum(start + k[i], size[i] + p[i])
        pool = end - start
        valid = np.minimum(end, size[i]) - np.maximum(start, 0)
        return pool, valid

    (ph, vh), (pw, vw) = axis(0), axis(1)
    if a["divisor_override"]:
        div = np.full((len(ph), len(pw)), float(a["divisor_override"]))
    elif a["count_include_pad"]:
        div = np.outer(ph, pw).astype("float64")
    else:
        div = np.outer(vh, vw).astype("float64")
    out = bb.emit(relax.op.divide(total, relax.const(div.astype(dtype), dtype)))
    return _restore(importer, out, squeeze)


def _as_4d(importer, x):
    from tvm import relax

    if len(x.ty.shape) == 3:
        return importer.block_builder.emit(relax.op.expand_dims(x, axis=0)), True
    return x, False


def _hw(x, node) -> list[int]:
    """Height and width of NCHW `x`; a LoweringError naming the node when either is dynamic (the windows of
    ceil_mode / divisor_override pooling are planned per position at compile time)."""
    from .aten_semantics import _op_name, _shape

    h, w = _shape(x)[2:4]
    if not (isinstance(h, int) and isinstance(w, int)):
        raise LoweringError(f"{_op_name(node)} (exported node '{node.name}'): ceil_mode / divisor_override pooling "
                            f"needs static height and width, but the input's are ({h}, {w}); not supported "
                            f"by the TVM backend")
    return [h, w]


def _restore(importer, out, squeeze: bool):
    from tvm import relax

    return importer.block_builder.emit(relax.op.squeeze(out, axis=[0])) if squeeze else out


# ------------------------------------------------------------------------------------------ layer norm
def _layer_norm(node, importer):
    """layer_norm with PyTorch's overflow behaviour: NaN for every row whose mean squared overflows float32.

    PyTorch's float32 moments give var = E[x^2] - E[x]^2 = inf - inf = NaN there (a conv -> LayerNorm net fed
    values near float32's range returned NaN); TVM's kernel computes the same difference, but LLVM contracts
    it into an FMA whose product cannot overflow, so var = inf, rsqrt(var) = 0 and the row came out finite.
    TVM's fused kernel is kept; the row test (one mean over the normalized axes) is added after it."""
    import numpy as np
    from tvm import relax

    name = getattr(node.target, "__name__", "")
    out = importer._native_layer_norm(node) if name.startswith("native_") else importer._layer_norm(node)
    x = importer.env[node.args[0]]
    dtype = str(x.ty.dtype)
    if not dtype.startswith("float") or not hasattr(out.ty, "ndim"):
        return out
    dims = len(tuple(node.args[1]))
    ndim = int(x.ty.ndim)
    bb = importer.block_builder
    mean = bb.emit(relax.op.mean(x, axis=list(range(ndim - dims, ndim)), keepdims=True))
    overflow = bb.emit(relax.op.isinf(relax.op.multiply(mean, mean)))
    return bb.emit(relax.op.where(overflow, relax.const(np.nan, dtype), out))


# ------------------------------------------------------------------------------------------ reductions
def _amax_amin(node, importer):
    """amax / amin (TVM's importer has no converter): relax max / min over `dim` (all dims when empty); a
    0-d input is its own result. NaN propagates through the TIR pass above."""
    from tvm import relax

    args = importer.retrieve_args(node)
    x = args[0]
    dim = args[1] if len(args) > 1 else node.kwargs.get("dim", [])
    keepdim = bool(args[2] if len(args) > 2 else node.kwargs.get("keepdim", False))
    ndim = int(x.ty.ndim)
    if ndim == 0:
        return x
    dims = [dim] if isinstance(dim, int) else list(dim or range(ndim))
    op = relax.op.max if getattr(node.target, "__name__", "").startswith("amax") else relax.op.min
    return importer.block_builder.emit(op(x, axis=[int(d) % ndim for d in dims], keepdims=keepdim))


# ------------------------------------------------------------------------------------------ batch norm
def _batch_norm_training(node, importer):
    """Training-mode batch norm (_native_batch_norm_legit_functional) with batch statistics that do not
    overflow where PyTorch's do not: mean = sum(x / n) (TVM's sum(x) / n overflowed on values near float32's
    range, giving NaN rows where PyTorch's finite mean gives finite ones), var = sum((x - mean)^2 / n), the
    output as PyTorch forms it (x * alpha + beta, alpha = rstd * weight, beta = bias - mean * alpha), and
    the op's five outputs as PyTorch defines them (TVM's converter returned zeros for the saved rstd and the
    new running variance): out, saved mean, saved rstd, new running mean, new running var (unbiased)."""
    import numpy as np
    from tvm import relax

    args = list(node.args)
    training = args[5] if len(args) > 5 else node.kwargs.get("training", True)
    if not training:
        return importer._batch_norm_legit_functional(node)
    x = importer.env[args[0]]
    dtype = str(x.ty.dtype)
    from .aten_semantics import _static_shape

    shape = _static_shape(node, x, "training-mode batch norm (its batch statistics)")
    channels = shape[1]
    axes = [0] + list(range(2, len(shape)))
    n = int(np.prod([shape[a] for a in axes]))
    momentum = float(args[6] if len(args) > 6 else node.kwargs.get("momentum", 0.1))
    eps = float(args[7] if len(args) > 7 else node.kwargs.get("eps", 1e-5))

    def param(i, fill):
        a = args[i] if len(args) > i else None
        return importer.env[a] if a is not None else relax.const(np.full(channels, fill, dtype), dtype)

    weight, bias, running_mean, running_var = param(1, 1.0), param(2, 0.0), param(3, 0.0), param(4, 1.0)
    bb = importer.block_builder
    c = lambda v: relax.const(v, dtype)      # noqa: E731
    mean = bb.emit(relax.op.sum(relax.op.multiply(x, c(1.0 / n)), axis=axes))
    centered = bb.emit(relax.op.subtract(x, relax.op.reshape(mean, [1, channels] + [1] * (len(shape) - 2))))
    var = bb.emit(relax.op.sum(relax.op.multiply(relax.op.multiply(centered, centered), c(1.0 / n)), axis=axes))
    rstd = bb.emit(relax.op.rsqrt(relax.op.add(var, c(eps))))
    # PyTorch's form: x * alpha + beta per channel, never x - mean (which overflows where x * 0 does not)
    alpha = bb.emit(relax.op.multiply(rstd, weight))
    beta = bb.emit(relax.op.subtract(bias, relax.op.multiply(mean, alpha)))
    per_channel = [1, channels] + [1] * (len(shape) - 2)
    out = bb.emit(relax.op.add(relax.op.multiply(x, relax.op.reshape(alpha, per_channel)),
                               relax.op.reshape(beta, per_channel)))
    new_mean = bb.emit(relax.op.add(relax.op.multiply(running_mean, c(1.0 - momentum)),
                                    relax.op.multiply(mean, c(momentum))))
    unbiased = c(momentum * n / max(n - 1, 1))
    new_var = bb.emit(relax.op.add(relax.op.multiply(running_var, c(1.0 - momentum)),
                                   relax.op.multiply(var, unbiased)))
    return bb.emit(relax.Tuple([out, mean, rstd, new_mean, new_var]))


def _tvm_converter(importer, name: str):
    """TVM's own converter for ATen op `name` (bound to `importer`), whatever graphopt put in front of it."""
    return importer.create_convert_map()[name]


def _refusing_outputs(name: str, outputs: dict[int, str], inner: Callable | None = None) -> Callable:
    """A converter that raises LoweringError when the graph reads any of `outputs` ({index: what}) of ATen op
    `name` (TVM's converter returns wrong values for them), else converts as `inner` (default: TVM's)."""

    def convert(node, importer):
        used = [f"output {i} ({what})" for i, what in outputs.items() if _uses_output(node, i)]
        if used:
            raise LoweringError(f"aten.{name}: {', '.join(used)} is not supported by the TVM backend (its "
                                f"converter computes it wrongly); use the op's main output only")
        return inner(node, importer) if inner is not None else _tvm_converter(importer, name)(node)

    return convert


def _refusing_args(name: str, refuse: Callable[[dict], str | None], names: list[str], defaults: dict) -> Callable:
    """A converter that raises LoweringError naming the argument when refuse(args) says why, else TVM's."""

    def convert(node, importer):
        args = {k: node.args[i] if i < len(node.args) else node.kwargs.get(k, defaults.get(k))
                for i, k in enumerate(names)}
        why = refuse(args)
        if why:
            raise LoweringError(f"aten.{name}: {why} is not supported by the TVM backend (its converter "
                                f"ignores it)")
        return _tvm_converter(importer, name)(node)

    return convert


_CONVERTERS: dict[str, Callable] = {
    "_native_batch_norm_legit_functional.default": _batch_norm_training,
    "amax.default": _amax_amin,
    "amin.default": _amax_amin,
    "layer_norm.default": _layer_norm,
    "native_layer_norm.default": _refusing_outputs("native_layer_norm.default", {1: "mean", 2: "rstd"},
                                                   _layer_norm),
    "native_group_norm.default": _refusing_outputs("native_group_norm.default", {1: "mean", 2: "rstd"}),
    "_native_batch_norm_legit_no_training.default": _refusing_outputs(
        "_native_batch_norm_legit_no_training.default", {1: "save_mean", 2: "save_invstd"}),
    "max_pool3d_with_indices.default": _refusing_outputs("max_pool3d_with_indices.default", {1: "indices"}),
    "avg_pool3d.default": _refusing_args(
        "avg_pool3d.default",
        lambda a: f"divisor_override={a['divisor_override']}" if a["divisor_override"] is not None else None,
        ["x", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"],
        {"divisor_override": None}),
    "_upsample_bilinear2d_aa.default": _refusing_args(
        "_upsample_bilinear2d_aa.default", lambda a: "antialias=True (anti-aliased bilinear resampling)",
        [], {}),
    "div.Tensor_mode": _div,
    "avg_pool2d.default": _avg_pool2d,
    "max_pool2d_with_indices.default": _max_pool2d_with_indices,
}
