"""Relax pass + kernel: an inverted residual block (1x1 expand -> depthwise -> 1x1 project) as one CPU kernel.

MobileNetV2-style blocks widen a thin tensor six-fold (1x1 convolution, bias, ReLU6), filter it depthwise
(k x k, stride 1 or 2, bias, ReLU6) and project it back (1x1 convolution, bias, optional residual add). Unfused,
the wide tensor is written to memory and read back twice: at batch 8 the first such block of MobileNetV2 writes
38.5 MB (8 x 112 x 112 x 96 floats) for the depthwise kernel to read, and on a CPU with a 16 MiB last-level cache
those three kernels were 1.2-1.7x slower per image than at batch 1 and than ONNX Runtime's
(`benchmarks/run.py`, per-layer profile). This pass rewrites, in NHWC (after the layout conversion),

    e = act1(conv1x1(x, w1) + b1);  d = act2(dwconv_kxk_s(e, wd) + bd);  [o = conv1x1(d, w2) + b2 [+ x]]

into one call of `inverted_residual_kernel` (act1 / act2: any elementwise tree over the conv + bias: ReLU6,
ReLU, SiLU, hardswish); likewise a depthwise-separable pair without the expand (MobileNetV2's first block:
the ring holds the input's rows), when a projection follows it. Per task (an image, or a strip of its output rows when the batch is smaller than the core
count), per step of output rows (one row, or several for narrow images: `rows_per_step`, so that a step's
GEMMs cover MIN_PIXELS pixels):

  1. the expanded input rows the step needs that the previous step did not (all of them for a strip's first
     step, then stride x rows) into a ring buffer (`e` never exists whole: (rows - 1) x s + k rows of
     (w + 2p) x c_e floats, in L2), as a 1 x 1 convolution over those rows' pixels (register tiles of pixels x
     channel vectors), bias, act1; rows above and below the image are zeros (the depthwise convolution's
     padding), as are the ring's p border columns;
  2. the depthwise rows from the ring (register tiles of pixels x channel vectors, the k x k taps), bias, act2;
  3. with a projection: the 1 x 1 convolution of those rows (in L1 / L2), bias, the residual's rows, written
     to the output; without one (the depthwise output has other users: a squeeze-excitation gate), the
     depthwise rows are the output.

Values: each output is the unfused kernels' float32 arithmetic (each convolution's products summed in the same
order over its reduction axis, then the bias, then the residual: the same bits as graphopt's unfused build);
activations are the expressions TVM writes for their Relax ops (`apply_activation`), min / max made PyTorch's
by graphopt's NaN rule (`numerics.nan_propagating_minmax`). A strip recomputes the k - s expanded rows above
its first output row (the only duplicated work). Fused when the tasks keep every core busy (`strips_for`: a
batch of at least the core count, or strips of at least MIN_STRIP_ROWS rows) and every channel count is a whole
number of vectors (the target's, or halves of them down to 8 lanes); static shapes, LLVM CPU targets only
(relax_layout_passes).
Measured (a scratch script timing graphopt's builds of one block with and without this pass, NCHW in and out,
interleaved, 2-core AVX2 EPYC, median ms): 112 x 112 x 16 -> 96 -> stride 2 -> 24 0.730 -> 0.434 at batch 1,
8.45 -> 3.12 at batch 8; 56 x 56 x 24 -> 144 -> 24 + residual 0.522 -> 0.426 and 5.13 -> 2.70; batch 8,
14 x 14 x 64 -> 384 -> 64 1.32 -> 1.17, 7 x 7 x 160 -> 960 -> 160 1.80 -> 1.57 (with one row per step it took
2.17, slower than unfused: hence rows_per_step).
"""
from __future__ import annotations

import numpy as np

from .relax_match import op_name as _op
from .relax_match import FUSED_KERNEL_ATTR, rewrite_adding_functions, scalar_constant
from .relax_match import tensor_shape as _shape
from .tir_script import prim_func

__all__ = ["inverted_residual_kernel", "fuse_inverted_residuals", "rows_per_step", "strips_for"]

MIN_PIXELS = 24            # pixels per step of the row GEMMs (rows_per_step)
MIN_STRIP_ROWS = 12        # output rows per strip at least (a strip recomputes k - s expanded rows above it)


def _tile(n_vectors: int) -> tuple[int, int]:
    """(rows, vectors) of a register tile over `n_vectors` channel vectors: 12 accumulators where the channel
    vectors split into twos or threes, else 8 x 1."""
    if n_vectors % 2 == 0:
        return 6, 2
    if n_vectors % 3 == 0:
        return 4, 3
    return 8, 1


RELU6 = ("minimum", ("maximum", ("x",), 0.0), 6.0)
ACTIVATION_OPS = ("add", "subtract", "multiply", "divide", "maximum", "minimum")
UNARY_OPS = ("negative", "exp")


def _topi_expression(name: str, v):
    """TOPI's elementwise expression `name` ("negative", "fast_exp") of the PrimExpr `v`: the body
    of its te.compute with the input's load replaced by `v` (legalization and FastMathTransform build the unfused
    kernels from the same bodies)."""
    import tvm_ffi
    from tvm import te, topi

    x = te.placeholder((1,), "float32", name="x")
    body = getattr(topi, name)(x).op.body[0]
    load = type(x(0))
    return tvm_ffi.structural_map(body, [(load, lambda e: v if getattr(e.op, "name", "") == "te.tensor_load"
                                          else e)])


def apply_activation(v, tree):
    """The TIR expression of activation `tree` applied to `v`: ("x",) is v; (op, a, b) with op in ACTIVATION_OPS
    and a / b trees or float constants; (op, a) with op in UNARY_OPS ("exp" is fast_exp: relax_layout_passes
    makes every float32 exp one). The expressions TVM writes for the Relax ops they come from, so values equal
    the unfused kernels'."""
    from tvm.script import tirx as T

    if tree[0] == "x":
        return v
    if tree[0] in UNARY_OPS:
        return _topi_expression("fast_exp" if tree[0] == "exp" else tree[0], apply_activation(v, tree[1]))
    a, b = (apply_activation(v, t) if isinstance(t, tuple) else T.float32(t) for t in tree[1:])
    if tree[0] == "add":
        return a + b
    if tree[0] == "subtract":
        return a - b
    if tree[0] == "multiply":
        return a * b
    if tree[0] == "divide":
        return a / b
    return T.max(a, b) if tree[0] == "maximum" else T.min(a, b)


def rows_per_step(w: int) -> int:
    """Output rows a step computes: enough that a step's expand and projection GEMMs cover MIN_PIXELS pixels
    (their register tiles run over the step's rows flattened: a 7-pixel row alone filled 7 of 12 tile rows)."""
    return max(1, -(-MIN_PIXELS // w))


def inverted_residual_kernel(N: int, H: int, W: int, CIN: int, CE: int, K: int, S: int, act1: tuple, act2: tuple,
                             lanes: int, strips: int, project: tuple | None = None, expand: bool = True):
    """TIR of the fused block (module docstring), NHWC activations, HWIO weights. `act1` / `act2`: activation
    trees (`apply_activation`; ReLU6 is RELU6). `expand=False`: no expand convolution (a depthwise-separable
    pair, MobileNetV2's first block): the ring holds the input's rows (CIN == CE; W1, B1 and act1 unused, W1 and
    B1 passed as (1, 1, 1, 1)). `project`: None (output: the depthwise result, (N, HO, WO, CE))
    or (COUT, residual): output (N, HO, WO, COUT), plus the (N, HO, WO, COUT) residual operand when `residual`.
    `strips`: output-row strips per image (parallel tasks N x strips)."""
    from tvm.script import tirx as T

    P = K // 2
    HO, WO = (H + 2 * P - K) // S + 1, (W + 2 * P - K) // S + 1
    f32 = lambda v: T.float32(v)           # noqa: E731
    RE, VE = _tile(CE // lanes)            # expand tile: pixels x channel vectors
    RD, VD = 4, (2 if CE % (2 * lanes) == 0 else 1)     # depthwise tile (as graphopt's schedule: 4 x 2 on AVX2)
    CPE, CPD = VE * lanes, VD * lanes
    COUT, residual = project if project is not None else (CE, False)
    RP, VP = _tile(COUT // lanes)
    CPP = VP * lanes
    WP = W + 2 * P
    G = rows_per_step(W)                   # output rows per step
    RING = (G - 1) * S + K                 # expanded rows a step reads (row iy in slot iy mod RING)

    act = apply_activation

    def slot(iy):
        return (iy + RING) % RING          # iy >= -P > -RING

    @T.macro(hygienic=False)
    def zero_tile(acc, rows, vecs):
        """A register tile's accumulators (rows x vecs vectors of `lanes`) to 0."""
        for r in T.unroll(rows):
            for v in T.unroll(vecs):
                for l in T.vectorized(lanes):
                    acc[r, v, l] = f32(0.0)

    @T.macro(hygienic=False)
    def pixel_tile(acc, rows, vecs, depth, src, wgt):
        """A register tile of a 1 x 1 convolution: acc[r, v, l] (rows x vecs vectors, zeroed first) = Σ_k
        src(r, k) · wgt(k, v, l) over k < depth (closures: input k of the tile's pixel r, the weight of input k
        for its lane l of vector v). The expand and the projection differ only in these."""
        zero_tile(acc, rows, vecs)
        for k in range(depth):
            for r in T.unroll(rows):
                for v in T.unroll(vecs):
                    for l in T.vectorized(lanes):
                        acc[r, v, l] = acc[r, v, l] + src(r, k) * wgt(k, v, l)

    @T.macro(hygienic=False)
    def expand_pixels(iy0, count, cp, a1):
        """Expand convolution of `count` input pixels from row iy0 on, flattened (pixel q: row iy0 + q // W,
        column q % W; one row when count == W, where the divisions fold away), channels [cp·CPE, (cp+1)·CPE),
        RE pixels per register tile, into the ring with bias and activation a1 (act1: passed in, as a name the
        prim_func's body references, for TVMScript to resolve)."""
        for qt in range((count + RE - 1) // RE):
            pixel_tile(eacc, RE, VE, CIN, lambda r, k: X[
                n, iy0 + T.min(qt * RE + r, count - 1) // W, T.min(qt * RE + r, count - 1) % W, k],
                lambda k, v, l: W1[0, 0, k, cp * CPE + v * lanes + l])
            for r in T.unroll(RE):
                if qt * RE + r < count:
                    for v in T.unroll(VE):
                        for l in T.vectorized(lanes):
                            ring[slot(iy0 + (qt * RE + r) // W), P + (qt * RE + r) % W, cp * CPE + v * lanes + l] = \
                                act(eacc[r, v, l] + B1[0, 0, 0, cp * CPE + v * lanes + l], a1)

    o_shape = (N, HO, WO, COUT)
    r_shape = o_shape if residual else (1, 1, 1, 1)
    w2_shape, b2_shape = ((1, 1, CE, COUT), (1, 1, 1, COUT)) if project is not None else ((1, 1, 1, 1), (1, 1, 1, 1))
    w1_shape, b1_shape = ((1, 1, CIN, CE), (1, 1, 1, CE)) if expand else ((1, 1, 1, 1), (1, 1, 1, 1))

    @prim_func
    def block(X: T.Buffer((N, H, W, CIN), "float32"), W1: T.Buffer(w1_shape, "float32"),
              B1: T.Buffer(b1_shape, "float32"), WD: T.Buffer((K, K, 1, CE), "float32"),
              BD: T.Buffer((1, 1, 1, CE), "float32"), W2: T.Buffer(w2_shape, "float32"),
              B2: T.Buffer(b2_shape, "float32"), R: T.Buffer(r_shape, "float32"),
              O: T.Buffer(o_shape, "float32")):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        for task in T.parallel(N * strips):
            ring = T.decl_buffer((RING, WP, CE), "float32")
            drow = T.decl_buffer((G * WO, CE), "float32")
            # one accumulator tile per step, each indexed by its own step only (LLVM keeps them in registers)
            eacc = T.decl_buffer((RE, VE, lanes), "float32")
            dacc = T.decl_buffer((RD, VD, lanes), "float32")
            pacc = T.decl_buffer((RP, VP, lanes), "float32")
            n = task // strips
            y0 = task % strips * HO // strips
            y1 = (task % strips + 1) * HO // strips
            for sl in range(RING):
                for x in range(P):
                    for cv in range(CE // lanes):
                        for l in T.vectorized(lanes):
                            ring[sl, x, cv * lanes + l] = f32(0.0)
                            ring[sl, P + W + x, cv * lanes + l] = f32(0.0)
            for g in range((y1 - y0 + G - 1) // G):
                # output rows [ya, yb) read expanded rows [ya s - p, (yb - 1) s - p + k); the rows before
                # `lo` are in the ring from the previous step
                ya = y0 + g * G
                yb = T.min(ya + G, y1)
                lo = T.Select(g == 0, ya * S - P, ya * S - P + K - S)
                hi = (yb - 1) * S - P + K
                ra = T.max(lo, 0)
                rb = T.min(hi, H)
                # 1. the new expanded rows, inside the image: row by row, or (narrow rows) one GEMM over their
                # pixels flattened; without an expand convolution, the input's rows
                if not expand:
                    for iy in range(ra, rb):
                        for x in range(W):
                            for cv in range(CE // lanes):
                                for l in T.vectorized(lanes):
                                    ring[slot(iy), P + x, cv * lanes + l] = X[n, iy, x, cv * lanes + l]
                elif G == 1:
                    for iy in range(ra, rb):
                        for cp in range(CE // CPE):
                            expand_pixels(iy, W, cp, act1)
                else:
                    for cp in range(CE // CPE):
                        expand_pixels(ra, (rb - ra) * W, cp, act1)
                # ... and outside it: zeros (the depthwise convolution's padding)
                for j in range(hi - lo):
                    if lo + j < 0 or lo + j >= H:
                        for x in range(WP):
                            for cv in range(CE // lanes):
                                for l in T.vectorized(lanes):
                                    ring[slot(lo + j), x, cv * lanes + l] = f32(0.0)
                # 2. the depthwise rows
                for y in range(ya, yb):
                    for cp in range(CE // CPD):
                        for xt in range((WO + RD - 1) // RD):
                            zero_tile(dacc, RD, VD)
                            for ky in range(K):
                                for kx in range(K):
                                    for r in T.unroll(RD):
                                        for v in T.unroll(VD):
                                            for l in T.vectorized(lanes):
                                                dacc[r, v, l] = dacc[r, v, l] + ring[
                                                    slot(y * S - P + ky), T.min(xt * RD + r, WO - 1) * S + kx,
                                                    cp * CPD + v * lanes + l] * WD[ky, kx, 0, cp * CPD + v * lanes + l]
                            for r in T.unroll(RD):
                                if xt * RD + r < WO:
                                    for v in T.unroll(VD):
                                        for l in T.vectorized(lanes):
                                            if project is None:
                                                O[n, y, xt * RD + r, cp * CPD + v * lanes + l] = act(
                                                    dacc[r, v, l] + BD[0, 0, 0, cp * CPD + v * lanes + l], act2)
                                            else:
                                                drow[(y - ya) * WO + xt * RD + r, cp * CPD + v * lanes + l] = act(
                                                    dacc[r, v, l] + BD[0, 0, 0, cp * CPD + v * lanes + l], act2)
                # 3. the projection of those rows (pixels flattened)
                if project is not None:
                    for cp in range(COUT // CPP):
                        for qt in range(((yb - ya) * WO + RP - 1) // RP):
                            pixel_tile(pacc, RP, VP, CE, lambda r, k: drow[T.min(qt * RP + r, (yb - ya) * WO - 1), k],
                                       lambda k, v, l: W2[0, 0, k, cp * CPP + v * lanes + l])
                            for r in T.unroll(RP):
                                if qt * RP + r < (yb - ya) * WO:
                                    for v in T.unroll(VP):
                                        for l in T.vectorized(lanes):
                                            if residual:
                                                O[n, ya + (qt * RP + r) // WO, (qt * RP + r) % WO,
                                                  cp * CPP + v * lanes + l] = pacc[r, v, l] + B2[
                                                    0, 0, 0, cp * CPP + v * lanes + l] + R[
                                                    n, ya + (qt * RP + r) // WO, (qt * RP + r) % WO,
                                                    cp * CPP + v * lanes + l]
                                            else:
                                                O[n, ya + (qt * RP + r) // WO, (qt * RP + r) % WO,
                                                  cp * CPP + v * lanes + l] = pacc[r, v, l] + B2[
                                                    0, 0, 0, cp * CPP + v * lanes + l]
    return block


def strips_for(n: int, ho: int, cores: int) -> int | None:
    """Row strips per image so that the n x strips tasks keep `cores` cores busy: the fewest that divide the
    tasks evenly over the cores with at least MIN_STRIP_ROWS output rows each, else the most with that many
    rows; None when even those leave cores idle (a small batch of small images: the unfused kernels, parallel
    over pixels and channels, use every core)."""
    fits = [s for s in range(1, cores + 1) if ho // s >= MIN_STRIP_ROWS or s == 1]
    for s in fits:
        if (n * s) % cores == 0:
            return s
    return fits[-1] if n * fits[-1] >= cores else None


def _bindings(mod) -> tuple[dict, dict]:
    """({var: bound value}, {var: [(user var, user value) of each binding using it; (None, None) for a use in
    a function's result]}) over every Relax function of `mod`."""
    from tvm import relax

    defs: dict = {}
    users: dict = {}

    def uses(expr, user):
        def visit(e):
            if isinstance(e, relax.Var):
                users.setdefault(e, []).append(user)
        relax.analysis.post_order_visit(expr, visit)

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            for block in func.body.blocks:
                for binding in block.bindings:
                    defs[binding.var] = binding.value
                    uses(binding.value, (binding.var, binding.value))
            uses(func.body.body, (None, None))
    return defs, users


def fuse_inverted_residuals(lanes: int, cores: int):
    """Module pass (module docstring); `lanes`: float32 lanes of the target's vectors, `cores`: its core count
    (images smaller in number than the cores are split into row strips)."""
    import tvm
    from tvm import relax, tirx
    from tvm.relax import PyExprMutator, expr_functor

    def ints(a) -> list[int]:
        return [int(v) for v in a]

    def static(shape) -> list[int] | None:
        if shape is None or not all(isinstance(d, tirx.IntImm) for d in shape):
            return None
        return [int(d) for d in shape]

    @expr_functor.mutator
    class _Fuse(PyExprMutator):
        def __init__(self, mod):
            super().__init__(mod)
            self.changed = 0
            self.defs, self.users = _bindings(mod)

        def _bound(self, expr):
            """The value `expr` is bound to in the module as it was (this pass only replaces block ends), else
            `expr`: lets a match look at the bindings after the one being visited too."""
            return self.defs.get(expr, expr) if isinstance(expr, relax.Var) else expr

        def _single(self, var) -> bool:
            return isinstance(var, relax.Var) and len(self.users.get(var, ())) == 1

        def _user(self, var):
            """(var, value) of the one binding using `var`, else (None, None)."""
            found = self.users.get(var, ())
            return found[0] if len(found) == 1 else (None, None)

        def _act(self, var, depthwise: bool):
            """(leaf, tree): `var` as an activation tree (apply_activation) of `leaf`, a conv2d + bias of the kind
            `depthwise` asks for (_conv_bias); every value inside the tree, the leaf included, used only inside
            it (nothing else needs them written); else None."""
            inside: dict = {}             # var -> its uses inside the tree
            leaves: list = []
            budget = [24]                 # nodes left: a runaway graph is not an activation

            def tree(v):
                budget[0] -= 1
                if budget[0] < 0:
                    return None
                if not isinstance(v, relax.Var):
                    return scalar_constant(v)
                inside[v] = inside.get(v, 0) + 1
                if self._conv_bias(v, depthwise) is not None:
                    leaves.append(v)
                    return ("x",)
                val = self._bound(v)
                op = _op(val).removeprefix("relax.")
                if op == "nn.relu":
                    sub = tree(val.args[0])
                    return None if sub is None else ("maximum", sub, 0.0)
                if op in UNARY_OPS:
                    sub = tree(val.args[0])
                    return None if sub is None or not isinstance(sub, tuple) else (op, sub)
                if op not in ACTIVATION_OPS:
                    return None
                a, b = tree(val.args[0]), tree(val.args[1])
                if a is None or b is None or not (isinstance(a, tuple) or isinstance(b, tuple)):
                    return None
                return (op, a, b)

            found = tree(var)
            if not isinstance(found, tuple) or len(set(leaves)) != 1:
                return None
            inside[var] -= 1              # the root's own use (its binding) is not a use inside
            if any(n != len(self.users.get(v, ())) for v, n in inside.items() if v is not var):
                return None
            return leaves[0], found

        def _conv_bias(self, var, depthwise: bool):
            """(conv call, bias) of `var` = conv2d(...) + bias (NHWC / HWIO float32, 1 x 1 groups 1, or depthwise
            k x k (odd), padding k // 2, stride 1 or 2), the conv's result used once; else None."""
            val = self._bound(var)
            if _op(val) != "relax.add":
                return None
            for conv_var, bias in (val.args, val.args[::-1]):
                conv = self._bound(conv_var)
                if _op(conv) == "relax.nn.conv2d" and self._single(conv_var):
                    break
            else:
                return None
            a = conv.attrs
            if (a.data_layout != "NHWC" or a.kernel_layout != "HWIO" or a.out_layout != "NHWC"
                    or ints(a.dilation) != [1, 1]
                    or any(str(t.ty.dtype) != "float32" for t in (conv, conv.args[0], conv.args[1]))):
                return None
            w = static(_shape(conv.args[1]))
            out = static(_shape(conv))
            bshape = static(_shape(bias))
            if w is None or out is None or bshape is None or str(bias.ty.dtype) != "float32":
                return None
            if bshape not in ([out[3]], [1, out[3]], [1, 1, out[3]], [1, 1, 1, out[3]]):
                return None
            if depthwise:
                k, s = w[0], ints(a.strides)
                if not (w[0] == w[1] and k % 2 == 1 and w[2] == 1 and int(a.groups) == w[3] == out[3]
                        and s[0] == s[1] and s[0] in (1, 2) and ints(a.padding) == [k // 2] * 4):
                    return None
            elif not (w[:2] == [1, 1] and int(a.groups) == 1 and ints(a.strides) == [1, 1]
                      and ints(a.padding) == [0, 0, 0, 0]):
                return None
            return conv, bias

        def _bias4(self, bias):
            shape = static(_shape(bias))
            if len(shape) == 4:
                return bias
            return self.builder_.emit(relax.op.reshape(bias, [1, 1, 1, shape[-1]]))

        def _expand_dw(self, d):
            """The parts of d = act2(dwconv(act1(conv1x1(x) + b1)) + bd), or of d = act2(dwconv(x) + bd) (no
            expand: `expand` False), else None."""
            found = self._act(d, depthwise=True)
            if found is None:
                return None
            e, act2 = found
            dw, bd = self._conv_bias(e, depthwise=True)
            e_in = dw.args[0]
            found = self._act(e_in, depthwise=False) if self._single(e_in) else None
            if found is not None:
                x_var, act1 = found
                expand, b1 = self._conv_bias(x_var, depthwise=False)
                x, w1 = expand.args[0], expand.args[1]
            else:                           # the depthwise conv reads x itself
                x, w1, b1, act1, expand = e_in, None, None, ("x",), None
            xs = static(_shape(x))
            if xs is None or len(xs) != 4 or str(x.ty.dtype) != "float32" \
                    or strips_for(xs[0], static(_shape(dw))[1], cores) is None:
                return None
            ce = static(_shape(dw))[3]
            width = lanes
            while width > min(lanes, 8) and ce % width:
                width //= 2
            if ce % width:
                return None
            return dict(x=x, w1=w1, b1=b1, act1=act1, wd=dw.args[1], bd=bd, act2=act2, expand=expand is not None,
                        k=static(_shape(dw.args[1]))[0], s=int(dw.attrs.strides[0]), ce=ce, lanes=width)

        def _project(self, var):
            """(parts, w2, b2, residual) of var = [x +] (conv1x1(d) + b2) with d an expand-depthwise chain."""
            val = self._bound(var)
            residual = None
            if _op(val) == "relax.add":
                for other, p in (val.args, val.args[::-1]):
                    if self._single(p) and self._conv_bias(p, depthwise=False) is not None:
                        found = self._conv_bias(p, depthwise=False)
                        parts = self._expand_dw(found[0].args[0]) if self._single(found[0].args[0]) else None
                        if parts is not None and other.same_as(parts["x"]):
                            residual = other
                            return parts, found[0].args[1], found[1], residual
            found = self._conv_bias(var, depthwise=False)
            if found is None or not self._single(found[0].args[0]):
                return None
            parts = self._expand_dw(found[0].args[0])
            return None if parts is None else (parts, found[0].args[1], found[1], None)

        def _emit(self, binding, parts, project=None):
            x = parts["x"]
            n, h, w, cin = static(_shape(x))
            cout = static(_shape(binding.var))[3]
            width = self._width(parts, cout if project is not None else None)
            if width is None:
                return False
            strips = strips_for(n, static(_shape(binding.var))[1], cores)
            kernel = inverted_residual_kernel(n, h, w, cin, parts["ce"], parts["k"], parts["s"], parts["act1"],
                                              parts["act2"], width, strips,
                                              None if project is None else (cout, project[2] is not None),
                                              parts["expand"])
            zero = relax.const(np.zeros((1, 1, 1, 1), np.float32))
            w1, b1 = (parts["w1"], self._bias4(parts["b1"])) if parts["expand"] else (zero, zero)
            w2, b2, r = (zero, zero, zero) if project is None else (
                project[0], self._bias4(project[1]), project[2] if project[2] is not None else zero)
            args = [x, w1, b1, parts["wd"], self._bias4(parts["bd"]), w2, b2, r]
            gv = self.builder_.add_func(kernel.without_attr("global_symbol").with_attr(
                FUSED_KERNEL_ATTR, "inverted residual block"), "inverted_residual")
            self.builder_.emit_normalized(relax.VarBinding(binding.var, self.builder_.normalize(
                relax.call_tir(gv, args, relax.TensorType(_shape(binding.var), "float32")))))
            self.changed += 1
            return True

        @staticmethod
        def _width(parts, cout) -> int | None:
            """The vector lanes of the kernel: the expand's, halved (down to 8) until they divide `cout` too."""
            width = parts["lanes"]
            while cout is not None and width > min(lanes, 8) and cout % width:
                width //= 2
            return None if cout is not None and cout % width else width

        def _residual_follows(self, var, parts) -> bool:
            """Whether `var` (a projection's result) is used once, by an add of the block's input."""
            _, user = self._user(var)
            return (_op(user) == "relax.add" and any(a.same_as(parts["x"]) for a in user.args)
                    and any(a.same_as(var) for a in user.args))

        def _projection_follows(self, var, parts) -> bool:
            """Whether `var` (a depthwise chain's result) is used once, by a projection this pass fuses."""
            conv_var, conv = self._user(var)
            if _op(conv) != "relax.nn.conv2d":
                return False
            add_var, add = self._user(conv_var)
            if add is None or self._project(add) is None:
                return False
            return self._width(parts, static(_shape(add_var))[3]) is not None

        def visit_var_binding_(self, binding):
            value = self.visit_expr(binding.value)
            shape = static(_shape(binding.var))
            if shape is not None and len(shape) == 4 and str(binding.var.ty.dtype) == "float32":
                # a projection (with the residual add that follows it, if any) ends a block; so does a
                # depthwise chain whose result goes elsewhere than one projection (a squeeze-excitation gate)
                proj = self._project(binding.var)       # (matched on the module as it was: self.defs)
                if proj is not None and not self._residual_follows(binding.var, proj[0]):
                    parts, w2, b2, residual = proj
                    if self._emit(binding, parts, (w2, b2, residual)):
                        return
                parts = self._expand_dw(binding.var)     # alone, worth it only with an expand to keep in L2
                if parts is not None and parts["expand"] and not self._projection_follows(binding.var, parts):
                    if self._emit(binding, parts):
                        return
            self.builder_.emit_normalized(relax.VarBinding(binding.var, value))

    @tvm.transform.module_pass(opt_level=0, name="GraphoptFuseInvertedResiduals")
    def _pass(mod, ctx):
        return rewrite_adding_functions(mod, _Fuse(mod))

    return _pass
