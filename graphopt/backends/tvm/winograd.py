"""Winograd convolutions on CPU targets (x86, aarch64): 3x3 stride-1 convolutions as F(m x m, 3 x 3) (Lavin & Gray, 2016).

A 3x3 convolution computes each m x m tile of outputs from an (m+2) x (m+2) tile of inputs with (m+2)^2
multiplications per input/output channel pair instead of 9 m^2: 2.25x fewer for m = 2, 4x fewer for m = 4.
Three kernels replace the direct convolution:

  input transform    V[e, p, c] = (Bᵀ d B)[e] for each tile p and input channel c   (hand-written TIR)
  batched GEMM       M[e, p, k] = Σ_c V[e, p, c] · U[e, c, k], U = G w Gᵀ (folded at build time)
                     (a Relax matmul: graphopt's PackedGemm schedule, U prepacked like any weight)
  output transform   y = Aᵀ M A per tile, then the convolution's epilogue: + bias, + a residual, ReLU
                                                                                   (hand-written TIR)

Contract: approximate. The transforms reassociate the sums: on random data the output differs from the
direct convolution by up to ~1.5e-5 of the output's largest magnitude for m = 4 and ~3e-6 for m = 2 (the
direct float32 convolution: ~3e-7); tests/backends/test_winograd.py holds each kernel to 1e-4 against float64.
Non-finite inputs keep PyTorch's semantics exactly: the transforms would spread an inf or NaN over a whole tile
(inf - inf = NaN where the direct sum is inf, or a finite value next to it), so the input transform marks every
tile whose window holds a non-finite value, or values large enough that the transforms could overflow
(overflow_limit, from the transformed weights: 8e31-2e32 for random-init ResNet-18 layers with m = 4, 1e35
with m = 2), and the output transform computes those tiles directly. Weights must be finite (a convolution
with an inf weight stays direct).

Where: x86 (AVX2, AVX-512) and aarch64 (NEON) targets, convolutions NHWC/HWIO with constant weights, 3x3,
stride 1, dilation 1, groups 1, padding 1, static shapes, channels a multiple of the SIMD width; m = 4 or 2
by tile_size (the fewer multiplications per output, counting the outputs a partial last tile wastes when m
does not divide the size), only with at least MIN_TILES tiles (below that the GEMM has too few rows to pay
for reading the transformed weights: an 8x8 map stays direct at batch 1 with m = 4, ResNet's 7x7 maps take
F(2x2) at batch 1 and F(4x4) from batch 4). U takes (m+2)^2/9 the original weight's bytes (4x for m = 4), and
the original weight is kept for the fallback tiles.
"""
from __future__ import annotations

import functools
from fractions import Fraction as Fr

import numpy as np

__all__ = ["winograd_convolutions", "tile_size", "MATRICES", "weight_transform", "overflow_limit",
           "input_transform_kernel", "output_transform_kernel", "MIN_TILES"]

# (Bᵀ, G, Aᵀ) for F(m x m, 3 x 3), interpolation points 0, ±1, ±2, ∞ (m = 4) and 0, ±1, ∞ (m = 2)
MATRICES = {
    4: ([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0],
         [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
        [[Fr(1, 4), 0, 0], [Fr(-1, 6), Fr(-1, 6), Fr(-1, 6)], [Fr(-1, 6), Fr(1, 6), Fr(-1, 6)],
         [Fr(1, 24), Fr(1, 12), Fr(1, 6)], [Fr(1, 24), Fr(-1, 12), Fr(1, 6)], [0, 0, 1]],
        [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]),
    2: ([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        [[1, 0, 0], [Fr(1, 2), Fr(1, 2), Fr(1, 2)], [Fr(1, 2), Fr(-1, 2), Fr(1, 2)], [0, 0, 1]],
        [[1, 1, 1, 0], [0, 1, -1, -1]]),
}
# below this the GEMM's rows are too few to hide the transformed weights' traffic. 16 takes ResNet-18's 7x7 and
# 14x14 maps at batch 1 (F(2x2) and F(4x4) with 16 tiles): interleaved A/B against 32, batch 1, 2 threads,
# x86:haswell 13.12 -> 12.00 ms and x86 11.61 -> 10.79 (1 thread AVX2: 24.95 -> 24.21)
MIN_TILES = 16


def tile_size(oh: int, ow: int, batch: int = 1) -> int | None:
    """m for an oh x ow output (4 or 2), or None: among the tile sizes giving at least MIN_TILES tiles, the one
    with the fewest multiplications per output, counting the partial last tiles' wasted outputs ((m+2)^2 / m^2
    times the padded area over the real one); None when that is not clearly below the direct 9."""
    best = None
    for m in (4, 2):
        th, tw = -(-oh // m), -(-ow // m)
        if batch * th * tw < MIN_TILES:
            continue
        cost = (m + 2) ** 2 / m ** 2 * (th * tw * m * m) / (oh * ow)
        if cost < 6 and (best is None or cost < best[0]):
            best = (cost, m)
    return None if best is None else best[1]


def weight_transform(w_hwio: np.ndarray, m: int) -> np.ndarray:
    """U[(m+2)^2, C, K] = G w Gᵀ for every (c, k), in float64 then rounded once to float32."""
    g = np.array([[float(v) for v in row] for row in MATRICES[m][1]])
    u = np.einsum("ai,ijck,bj->abck", g, w_hwio.astype(np.float64), g)
    a = m + 2
    return np.ascontiguousarray(u.reshape(a * a, *w_hwio.shape[2:]).astype(np.float32))


def overflow_limit(u: np.ndarray, m: int) -> float:
    """The input magnitude below which no value of the Winograd path can overflow: with S = Σ|d| over a tile's
    window (per channel), |V| <= b·S (b = (max row sum of |Bᵀ|)^2), |M| <= C·max|U|·b·S and |y| <= a·C·max|U|·b·S
    (a = (max row sum of |Aᵀ|)^2); the limit keeps that under FLT_MAX / 4 (room for bias and residual). A tile
    above it is computed directly, as are tiles with inf or NaN."""
    bt, _, at = MATRICES[m]
    b = max(sum(abs(float(v)) for v in row) for row in bt) ** 2
    a = max(sum(abs(float(v)) for v in row) for row in at) ** 2
    amp = a * b * u.shape[1] * max(float(np.abs(u).max()), 1e-30)
    return float(np.float32(np.finfo(np.float32).max / 4 / amp))


def _lin(terms: list[tuple[object, str]], lanes: int) -> str:
    """TVMScript for Σ coef·name over float32 vectors of `lanes` (±1 as plain adds/subtracts; zeros dropped)."""
    out = ""
    for coef, name in terms:
        if coef == 0:
            continue
        c = Fr(coef)
        mag = abs(c)
        term = name if mag == 1 else f"T.broadcast(T.float32({float(mag)!r}), {lanes}) * {name}"
        if not out:
            out = term if c > 0 else f"T.broadcast(T.float32(0.0), {lanes}) - {term}"
        else:
            out += (" + " if c > 0 else " - ") + term
    return out or f"T.broadcast(T.float32(0.0), {lanes})"


def _tiles(n: int, h: int, w: int, m: int):
    """(tile rows, tile columns, tiles P, TVMScript of tile p's image / tile row / tile column): P = N·th·tw
    tiles of m x m outputs, row-major, the last row and column partial where m does not divide h / w."""
    th, tw = -(-h // m), -(-w // m)
    return th, tw, n * th * tw, (f"(p // {th * tw})", f"(p // {tw} % {th})", f"(p % {tw})")


def _parse(text: str):
    from tvm.script import tirx as T
    from tvm.script.parser import parse

    func = parse(text, extra_vars={"T": T})
    # no global symbol of its own: a module holds many of these kernels (the GlobalVar names them)
    return func.without_attr("global_symbol") if func.attrs and "global_symbol" in func.attrs else func


@functools.lru_cache(maxsize=64)              # a PrimFunc is immutable: one parse per shape
def input_transform_kernel(n: int, h: int, w: int, c: int, m: int, lanes: int):
    """TIR: V[(m+2)^2, P, C] and the tile flags F[P] (1 where a tile's window holds a non-finite value, else
    0) from X[N, H, W, C] with zero padding 1; P = N·(H/m)·(W/m) tiles, row-major. A tile is flagged where
    the sum of |x| over its window, in any channel, is not <= Lim[0] (overflow_limit: inf, NaN, or values
    large enough to overflow inside the transforms). Lim is a parameter, not a literal: TVM's
    RewriteDataflowReshape inspects every one-input kernel for a reshape pattern, which fails on a kernel
    without blocks.

    Written with explicit vector loads and stores (`lanes` channels at a time) and without let bindings
    (TVM 0.27's vectorizer miscompiles scalar lets inside a vectorized loop, and its FlattenBuffer turns every
    let into a one-element local buffer, i.e. a heap workspace allocated per use). The window d and the
    intermediate t = Bᵀ d are kept a row at a time in stack buffers under 1 KiB each (allocas that LLVM holds
    in registers): written as T.meta_var expressions substituted into each of V's 36 sums, TVM's simplifier
    walked every copy (ResNet-18 with winograd, x86:haswell and x86: the backend build 3.2-3.3 -> 1.5-1.6 s;
    run time unchanged; the same error against float64, 2.5e-6 of the largest output at most with m = 4)."""
    a = m + 2
    bt = MATRICES[m][0]
    th, tw, p_total, (nn, ty, tx) = _tiles(n, h, w, m)
    vt = f"float32x{lanes}"
    ind = " " * 12
    lines = []
    # d[i][j]: the input at row ty·m - 1 + i, column tx·m - 1 + j (zero outside the image): a select of a
    # load at a clamped, in-bounds position. Only the first tile reaches above / left of the image, and only
    # the last one below / right of it (past the padding row where the size does not divide by m).
    for i in range(a):
        for j in range(a):
            conds = []
            if i == 0:
                conds.append(f"{ty} > 0")
            if (th - 1) * m + i - 1 >= h:
                conds.append(f"{ty} < {th - 1}")
            if j == 0:
                conds.append(f"{tx} > 0")
            if (tw - 1) * m + j - 1 >= w:
                conds.append(f"{tx} < {tw - 1}")
            row, col = f"{ty} * {m} + {i - 1}", f"{tx} * {m} + {j - 1}"
            row = f"T.max({row}, 0)" if i == 0 else f"T.min({row}, {h - 1})" if (th - 1) * m + i - 1 >= h else row
            col = f"T.max({col}, 0)" if j == 0 else f"T.min({col}, {w - 1})" if (tw - 1) * m + j - 1 >= w else col
            load = f"X.vload([{nn}, {row}, {col}, cv * {lanes}], \"{vt}\")"
            if conds:
                load = (f"T.Select(T.broadcast({' and '.join(conds)}, {lanes}), {load}, "
                        f"T.broadcast(T.float32(0.0), {lanes}))")
            lines.append(f"{ind}d_{i}[T.ramp({j * lanes}, 1, {lanes})] = {load}")
    for r in range(a):                       # t = Bᵀ d, row r in a stack buffer of its own (under 1 KiB)
        for j in range(a):
            lines.append(f"{ind}t_{r}[T.ramp({j * lanes}, 1, {lanes})] = "
                         f"{_lin([(bt[r][i], f'd_{i}[T.ramp({j * lanes}, 1, {lanes})]') for i in range(a)], lanes)}")
    for r in range(a):                       # V = t B
        for q in range(a):
            lines.append(f"{ind}V[{r * a + q}, p, T.ramp(cv * {lanes}, 1, {lanes})] = "
                         f"{_lin([(bt[q][j], f't_{r}[T.ramp({j * lanes}, 1, {lanes})]') for j in range(a)], lanes)}")
    # the tile's flag: 1 where a value of its window is inf or NaN or so large that the transforms could
    # overflow (Σ|d| <= Lim[0] fails for those; see overflow_limit; x * 0 would be folded to 0 by TVM)
    total = " + ".join(f"T.fabs(d_{i}[T.ramp({j * lanes}, 1, {lanes})])" for i in range(a) for j in range(a))
    lines.append(f"{ind}acc[T.ramp(0, 1, {lanes})] = T.max(acc[T.ramp(0, 1, {lanes})], T.Select(("
                 f"{total}) <= T.broadcast(Lim[0], {lanes}), "
                 f"T.broadcast(T.float32(0.0), {lanes}), T.broadcast(T.float32(1.0), {lanes})))")
    body = "\n".join(lines)
    rows = "\n".join(f'        {v}_{r} = T.decl_buffer(({a * lanes},), "float32")' for v in "dt" for r in range(a))
    text = f"""
@T.prim_func
def winograd_input(X: T.Buffer(({n}, {h}, {w}, {c}), "float32"), Lim: T.Buffer((1,), "float32"),
                   V: T.Buffer(({a * a}, {p_total}, {c}), "float32"), F: T.Buffer(({p_total},), "float32")):
    T.func_attr({{"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8}})
    for p in T.parallel({p_total}):
        acc = T.decl_buffer(({lanes},), "float32")
{rows}
        acc[T.ramp(0, 1, {lanes})] = T.broadcast(T.float32(0.0), {lanes})
        for cv in range({c // lanes}):
{body}
        F[p] = T.float32(0.0)
        for l in range({lanes}):
            F[p] = T.max(F[p], acc[l])
"""
    return _parse(text)


@functools.lru_cache(maxsize=64)
def output_transform_kernel(n: int, h: int, w: int, c: int, k: int, m: int, lanes: int, residual: bool,
                            relu: bool):
    """TIR: Y[N, H, W, K] = epilogue(Aᵀ M A) from M[(m+2)^2, P, K], + bias B[K] (+ R[N, H, W, K]) (ReLU);
    a tile whose flag F[p] is not 0 is computed directly from X[N, H, W, C] and the HWIO weight Wt. The
    intermediate s = Aᵀ M is kept a row at a time in stack buffers, as in input_transform_kernel."""
    a = m + 2
    at = MATRICES[m][2]
    th, tw, p_total, (nn, ty, tx) = _tiles(n, h, w, m)
    vt = f"float32x{lanes}"
    ind = " " * 16
    vec = f"T.ramp(kv * {lanes}, 1, {lanes})"
    zero = f"T.broadcast(T.float32(0.0), {lanes})"

    def epilogue(value: str, y: str, x: str, n_index: str) -> str:
        v = f"{value} + B.vload([kv * {lanes}], \"{vt}\")"
        if residual:
            v = f"{v} + R.vload([{n_index}, {y}, {x}, kv * {lanes}], \"{vt}\")"
        # ReLU as PyTorch computes it, `0 > v ? 0 : v`: NaN stays NaN (a vector max would return 0)
        return f"T.Select({zero} > {v}, {zero}, {v})" if relu else v

    lines = []
    for r in range(a):
        for q in range(a):
            lines.append(f"{ind}m_{r}_{q} = T.meta_var(M.vload([{r * a + q}, p, kv * {lanes}], \"{vt}\"))")
    for i in range(m):                       # s = Aᵀ M, row i in a stack buffer of its own (under 1 KiB)
        for q in range(a):
            lines.append(f"{ind}s_{i}[T.ramp({q * lanes}, 1, {lanes})] = "
                         f"{_lin([(at[i][r], f'm_{r}_{q}') for r in range(a)], lanes)}")
    for i in range(m):                       # y = s A, stored with the epilogue
        for j in range(m):
            y, x = f"{ty} * {m} + {i}", f"{tx} * {m} + {j}"
            lines.append(f"{ind}o_{i}_{j} = T.meta_var("
                         f"{_lin([(at[j][q], f's_{i}[T.ramp({q * lanes}, 1, {lanes})]') for q in range(a)], lanes)}"
                         f" + B.vload([kv * {lanes}], \"{vt}\")"
                         + (f" + R.vload([{nn}, {y}, {x}, kv * {lanes}], \"{vt}\")" if residual else "") + ")")
            store = f"Y[{nn}, {y}, {x}, {vec}] = " + (f"T.Select({zero} > o_{i}_{j}, {zero}, o_{i}_{j})"
                                                      if relu else f"o_{i}_{j}")
            guards = ([f"{ty} < {th - 1}"] if (th - 1) * m + i >= h else []) + \
                     ([f"{tx} < {tw - 1}"] if (tw - 1) * m + j >= w else [])
            if guards:                       # an output past the image in the partial last tile: not stored
                lines.append(f"{ind}if {' and '.join(guards)}:")
                lines.append(f"{ind}    {store}")
            else:
                lines.append(f"{ind}{store}")
    body = "\n".join(lines)
    rows = "\n".join(f'        s_{i} = T.decl_buffer(({a * lanes},), "float32")' for i in range(m))
    res_param = f"R: T.Buffer(({n}, {h}, {w}, {k}), \"float32\"), " if residual else ""
    direct = epilogue(f"acc[T.ramp(0, 1, {lanes})]", "y", "x", "nn")
    text = f"""
@T.prim_func
def winograd_output(M: T.Buffer(({a * a}, {p_total}, {k}), "float32"), F: T.Buffer(({p_total},), "float32"),
                    X: T.Buffer(({n}, {h}, {w}, {c}), "float32"), Wt: T.Buffer((3, 3, {c}, {k}), "float32"),
                    B: T.Buffer(({k},), "float32"), {res_param}Y: T.Buffer(({n}, {h}, {w}, {k}), "float32")):
    T.func_attr({{"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8}})
    for p in T.parallel({p_total}):
{rows}
        if F[p] == T.float32(0.0):
            for kv in range({k // lanes}):
{body}
        else:
            # a window with inf or NaN: the tile directly, as the convolution's own sum would propagate them
            for i, j in T.grid({m}, {m}):
                nn = T.meta_var({nn})
                y = T.meta_var({ty} * {m} + i)
                x = T.meta_var({tx} * {m} + j)
                if y < {h} and x < {w}:
                    for kv in range({k // lanes}):
                        acc = T.decl_buffer(({lanes},), "float32")
                        acc[T.ramp(0, 1, {lanes})] = T.broadcast(T.float32(0.0), {lanes})
                        for ky, kx, ci in T.grid(3, 3, {c}):
                            if 0 <= y + ky - 1 and y + ky - 1 < {h} and 0 <= x + kx - 1 and x + kx - 1 < {w}:
                                acc[T.ramp(0, 1, {lanes})] = acc[T.ramp(0, 1, {lanes})] + T.broadcast(
                                    X[nn, y + ky - 1, x + kx - 1, ci], {lanes}) * Wt.vload([ky, kx, ci, kv * {lanes}], "{vt}")
                        Y[nn, y, x, {vec}] = {direct}
"""
    return _parse(text)


# ------------------------------------------------------------------------------------------ Relax pass
def _info(expr):
    return getattr(expr, "ty", None) or getattr(expr, "struct_info", None)


def _static_shape(expr) -> tuple[int, ...] | None:
    info = _info(expr)
    shape = getattr(info, "shape", None)
    if shape is None or str(getattr(info, "dtype", "")) != "float32":
        return None
    try:
        return tuple(int(d) for d in shape.values)
    except Exception:                                   # noqa: BLE001 - a symbolic dim
        return None


def _op_name(value) -> str:
    import tvm
    from tvm import relax

    if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op):
        return value.op.name
    return ""


def _const_value(expr, values: dict) -> np.ndarray | None:
    """The numpy value of `expr` when it is a constant, possibly reshaped / permuted (a layout-converted
    weight or bias), following variable bindings; else None."""
    import tvm
    from tvm import relax

    for _ in range(16):
        if isinstance(expr, tvm.ir.expr.Constant):         # relax.const (TVM 0.27: ir.GenericConst)
            return expr.value.numpy()
        if isinstance(expr, relax.Var) and expr in values:
            expr = values[expr]
            continue
        name = _op_name(expr)
        if name == "relax.permute_dims":
            inner = _const_value(expr.args[0], values)
            axes = expr.attrs.axes
            return None if inner is None else np.transpose(inner, None if axes is None else [int(a) for a in axes])
        if name == "relax.reshape":
            inner = _const_value(expr.args[0], values)
            shape = _static_shape(expr)
            return None if inner is None or shape is None else inner.reshape(shape)
        return None
    return None


def _added_to(binding, var):
    """The other operand when `binding` is `var + other` (either order), else None."""
    if binding is None or _op_name(binding.value) != "relax.add":
        return None
    a0, a1 = binding.value.args
    return a1 if a0.same_as(var) else a0


def _plan(func, lanes: int) -> dict:
    """{final var of a chain: plan} for every convolution of `func` that Winograd takes, with the epilogue it
    absorbs: conv -> [+ constant bias] -> [+ residual] -> [ReLU], each intermediate used once."""
    from tvm import relax

    values, uses, user = {}, {}, {}
    bindings = [b for blk in func.body.blocks for b in blk.bindings]
    for b in bindings:
        values[b.var] = b.value
        for v in relax.analysis.free_vars(b.value):
            uses[v] = uses.get(v, 0) + 1
            user[v] = b
    outputs = set()
    body = func.body.body
    for v in relax.analysis.free_vars(body):
        uses[v] = uses.get(v, 0) + 1          # a var returned by the function has a use there
        outputs.add(v)
    plans = {}
    for b in bindings:
        call = b.value
        if _op_name(call) != "relax.nn.conv2d":
            continue
        at = call.attrs
        if (str(at.data_layout), str(at.kernel_layout), str(at.out_layout or at.data_layout)) != ("NHWC", "HWIO", "NHWC") \
                or [int(s) for s in at.strides] != [1, 1] or [int(d) for d in at.dilation] != [1, 1] \
                or int(at.groups) != 1 or [int(p) for p in at.padding] != [1, 1, 1, 1] \
                or str(at.out_dtype) not in ("", "float32", "void"):
            continue
        shape = _static_shape(call.args[0])
        weight = _const_value(call.args[1], values)
        if shape is None or weight is None or weight.shape[:2] != (3, 3) or _static_shape(b.var) != shape[:3] + (weight.shape[3],):
            continue
        n, h, w, c = shape
        k = weight.shape[3]
        m = tile_size(h, w, n)
        if m is None or c % lanes or k % lanes or weight.shape[2] != c or not np.isfinite(weight).all():
            continue                        # (an inf weight would mix into NaN through G w Gᵀ)
        chain, bias, residual, relu = [b.var], np.zeros(k, np.float32), None, False
        cur = b.var

        def next_user(v):
            return user[v] if uses.get(v, 0) == 1 and v not in outputs and v in user else None

        nxt = next_user(cur)
        other = _added_to(nxt, cur)
        if other is not None:
            bval = _const_value(other, values)
            if bval is not None and bval.size == k and _static_shape(nxt.var) == _static_shape(cur):
                bias = bval.reshape(k).astype(np.float32)
                cur = nxt.var
                chain.append(cur)
                nxt = next_user(cur)
                other = _added_to(nxt, cur)
        if other is not None:
            if _const_value(other, values) is None and _static_shape(other) == _static_shape(cur) \
                    and _static_shape(nxt.var) == _static_shape(cur):
                residual = other
                cur = nxt.var
                chain.append(cur)
                nxt = next_user(cur)
        if nxt is not None and _op_name(nxt.value) == "relax.nn.relu":
            relu = True
            cur = nxt.var
            chain.append(cur)
        plans[cur] = {"chain": chain, "data": call.args[0], "weight": weight.astype(np.float32), "bias": bias,
                      "residual": residual, "relu": relu, "shape": shape, "k": k, "m": m}
    return plans


def winograd_convolutions():
    """Relax module pass (after the NHWC layout conversion, before legalization): every convolution the
    module docstring lists, with its epilogue, becomes the input transform, a batched matmul against the
    transformed weight, and the output transform with the epilogue. The report of the rewrite is kept in the
    module attribute "graphopt.winograd"."""
    import tvm
    from tvm import relax
    from tvm.relax import PyExprMutator, expr_functor

    from .schedules import cpu_vector

    @expr_functor.mutator
    class _Rewriter(PyExprMutator):
        def __init__(self, mod, plans, lanes):
            super().__init__(mod)
            self.plans, self.lanes = plans, lanes
            self.skip = {v for p in plans.values() for v in p["chain"][:-1]}
            self.done = []

        def visit_var_binding_(self, binding):
            if binding.var in self.skip:
                return
            plan = self.plans.get(binding.var)
            if plan is None:
                return super().visit_var_binding_(binding)
            n, h, w, c = plan["shape"]
            k, m, lanes = plan["k"], plan["m"], self.lanes
            a2, p = (m + 2) ** 2, _tiles(n, h, w, m)[2]
            bb = self.builder_
            x = self.visit_expr(plan["data"])
            gin = bb.add_func(input_transform_kernel(n, h, w, c, m, lanes), "winograd_input")
            u_value = weight_transform(plan["weight"], m)
            lim = relax.const(np.array([overflow_limit(u_value, m)], np.float32))
            vf = bb.emit(relax.call_tir(gin, [x, lim], [relax.TensorType([a2, p, c], "float32"),
                                                   relax.TensorType([p], "float32")]))
            v = bb.emit(relax.TupleGetItem(vf, 0))
            f = bb.emit(relax.TupleGetItem(vf, 1))
            u = relax.const(u_value)
            mm = bb.emit(relax.op.matmul(v, u))
            residual = plan["residual"] is not None
            gout = bb.add_func(output_transform_kernel(n, h, w, c, k, m, lanes, residual, plan["relu"]),
                               "winograd_output")
            args = [mm, f, x, relax.const(plan["weight"]), relax.const(plan["bias"])]
            if residual:
                args.append(self.visit_expr(plan["residual"]))
            y = relax.call_tir(gout, args, relax.TensorType([n, h, w, k], "float32"))
            bb.emit_normalized(relax.VarBinding(binding.var, bb.normalize(y)))
            self.done.append(f"{h}x{w}x{c}->{k} F({m}x{m},3x3)")

    @tvm.transform.module_pass(opt_level=0, name="GraphoptWinograd")
    def _pass(mod, ctx):
        target = tvm.target.Target.current(allow_none=True)
        if target is None or target.kind.name != "llvm":
            return mod
        lanes = cpu_vector(target).lanes("float32")
        if lanes < 4:
            return mod                      # SIMD targets: x86 AVX2 / AVX-512, aarch64 NEON
        plans = {}
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function) and isinstance(func.body, relax.SeqExpr):
                plans.update(_plan(func, lanes))
        if not plans:
            return mod
        rewriter = _Rewriter(mod, plans, lanes)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
        out = rewriter.builder_.get()
        return out.with_attr("graphopt.winograd", ", ".join(rewriter.done))

    return _pass
