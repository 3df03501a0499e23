"""Relax pass + kernel: scaled dot-product attention as one CPU kernel (scores never leave the cache).

Unfused, a transformer's attention is five kernels per layer: a transposed copy of K, the scores
`(q @ kᵀ) * scale` (written to memory: heads x n x m floats, 4 MiB per layer of the small encoder at 1 x 512),
the softmax (reads and writes them), `p @ v` (reads them again) and a transpose of the result back to
(batch, seq, heads, dim). This pass rewrites

    o = matmul(softmax(matmul(q, kᵀ) [* c | / c] [+ mask], axis=-1), v)

(float32, 4-D: q (b, h, n, d), kᵀ = permute_dims of k (b, h, m, d) or of its (b, m, h, d) view, v (b, h, m, dv),
c a scalar constant, h / d / dv static; torch.export's scaled_dot_product_attention form too: q and kᵀ each
scaled by a constant, the softmax wrapped in _safe_softmax's `where(all(s == -inf), 0, softmax(s))`; `mask` a
float32 tensor of rank 2-4 broadcast to (b, h, n, m): padding, causal, T5's position bias) into one call of
`attention_kernel`, which reads q, k and v where the projections wrote them (through the permute_dims
(0, 2, 1, 3) of a (b, seq, h, d) view, or part i of one qkv projection split by permute_dims (2, 0, 3, 1, 4) and
take) and writes o as (b, n, h, dv), the layout the output projection reads (the permutations back to it
fold away). Per (batch, head) task:

  1. kᵀ into a zero-padded (d, m rounded up to the panel width, plus one panel) buffer (one transposed copy,
     in cache; the extra panel keeps its row stride off multiples of 1 KiB, which put a panel's rows in two L1
     sets);
  2. per block of `ROWS` query rows: scores for the block (a ROWS x panel register tile per panel of columns,
     as graphopt's GEMM schedule does), times c, into a ROWS x m buffer (L1 / L2), then per row the mask added,
     the softmax's max (maxnum), exp(x - max) (softmax_lower's fast_exp polynomial, the same function the
     unfused kernel computes) and the sum;
  3. o for the block: (Σ_j e_j v_j) * (1 / sum), a ROWS x panel register tile per panel of dv.

Values: the unfused path computes p_j = e_j * (1 / sum) and then Σ_j p_j v_j; here the reciprocal multiplies
the sum of products instead, the exp sum runs in a different lane order, and c is applied to the product once
rather than to q and k (scaled_dot_product_attention): the two differ by float32 rounding (tests compare with
PyTorch at its tolerance). Special values as the unfused softmax (softmax_lower): a score row holding NaN or
+inf, or all -inf, gives a NaN output row, except under _safe_softmax, where a row of -inf only gives 0; NaN /
inf in v propagate through the products as in the matmul. Rows past n in the last block read the last row and
are not written. Parallel over batch x heads (each task transposes its own head's k once); the panel width is
two of the target's vectors, or of halves of them down to 8 lanes where dv needs it (else the graph is left
as it is). LLVM CPU targets only (relax_layout_passes).
Small encoder (4 layers, hidden 256), dynamic build, saved builds interleaved on a 2-core AVX2 EPYC: 1 x 512
30.29 -> 28.24 ms, 8 x 128 43.79 -> 41.74, 32 x 128 170.8 -> 160.7, 8 x 512 223.4 -> 208.6, 1 x 16 1.002 ->
0.938.
"""
from __future__ import annotations

import math

import numpy as np

from .relax_match import bound_value
from .relax_match import op_name as _op
from .relax_match import FUSED_KERNEL_ATTR, rewrite_adding_functions, scalar_constant
from .relax_match import tensor_shape as _shape
from .softmax_lower import _exp_nonpositive
from .tir_script import prim_func

__all__ = ["attention_kernel", "fuse_attention", "ROWS"]

ROWS = 6                # query rows per register tile (x 2 vectors of columns: 12 accumulators)
VECTORS = 2


def _axes(call) -> list[int] | None:
    axes = call.attrs.axes
    return None if axes is None else [int(a) for a in axes]


def attention_kernel(B, N, M, H: int, D: int, DV: int, layouts: tuple[str, str, str], scale: float | None,
                     lanes: int, safe: bool = False, mask: tuple = (1, 1, 1, 1)):
    """TIR of the fused attention (module docstring). `layouts` of q, k, v: "bshd" ((b, seq, h, d): read
    through the head split) or "bhsd"; o is (b, n, h, dv). B, N, M: ints or TIR int64 variables. `safe`:
    PyTorch's _safe_softmax (scaled_dot_product_attention's): a score row of -inf only gives probabilities 0
    (outputs 0 · v), not NaN. `mask`: the shape of the additive mask Mk (a 4-D float32 operand added to the
    scaled scores, broadcast over each dim of extent 1: (b | 1, h | 1, n | 1, m)); without one the caller
    passes a (1, 1, 1, 1) zero (x + 0 is x for every float, NaN and ±inf included)."""
    from tvm.script import tirx as T

    C = VECTORS * lanes                    # panel width: columns of a register tile
    RT = ROWS
    def shape(layout, s, d):
        if layout.startswith("p"):                                  # "p{i}of{P}": (b, s, P, h, d), part i
            return (B, s, int(layout.split("of")[1]), H, d)
        return {"bshd": (B, s, H, d), "bhsd": (B, H, s, d)}[layout]

    q_shape, k_shape, v_shape = (shape(lay, s, d) for lay, s, d in zip(layouts, (N, M, M), (D, D, DV)))
    q_lay, k_lay, v_lay = layouts
    f32 = lambda v: T.float32(v)           # noqa: E731

    def at(buf, layout, b, h, s, x):
        if layout.startswith("p"):
            return buf[b, s, int(layout[1:].split("of")[0]), h, x]
        return buf[b, s, h, x] if layout == "bshd" else buf[b, h, s, x]

    def scaled(v):
        return v if scale is None else v * f32(scale)

    has_mask = not all(isinstance(e, int) and e == 1 for e in mask)
    MP = (M + (C - 1)) // C * C            # the score columns padded to whole panels
    MC = M // C * C                        # ... and the keys of whole panels (kᵀ's copy without a guard)
    MW = M // lanes * lanes                # the columns of whole vectors (softmax loops; the rest: scalar tails)

    def mask_at(Mk, b, h, row, j):
        full = [not (isinstance(e, int) and e == 1) for e in mask]
        return Mk[tuple(i if f else 0 for i, f in zip((b, h, row, j), full))]

    def maxnum(a, b):
        return T.call_llvm_pure_intrin("float32", "llvm.maxnum", a, b)

    @prim_func
    def attention(Q: T.Buffer(q_shape, "float32"), K: T.Buffer(k_shape, "float32"), V: T.Buffer(v_shape, "float32"),
                  Mk: T.Buffer(mask, "float32"), O: T.Buffer((B, N, H, DV), "float32")):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        for bh in T.parallel(B * H):
            # kᵀ rows one panel longer than the columns: a row stride of a multiple of 1 KiB put every row of
            # a panel in the same two L1 sets
            kt = T.decl_buffer((D, MP + C), "float32")
            s = T.decl_buffer((RT, MP), "float32")
            acc = T.decl_buffer((RT, C), "float32")
            run = T.decl_buffer((lanes,), "float32")
            stat = T.decl_buffer((RT,), "float32")
            zero = T.decl_buffer((RT,), "float32")
            # kᵀ in blocks of C keys: each kᵀ line written whole, the block's k lines reused from L1
            for jb in range(M // C):
                for x in range(D):
                    for jj in range(C):
                        kt[x, jb * C + jj] = at(K, k_lay, bh // H, bh % H, jb * C + jj, x)
            for j in range(MP - MC):
                for x in range(D):
                    # `likely` keeps MC + j < M from the simplifier, which would drop the clamp inside the
                    # Select (both sides are evaluated: a read past the keys; softmax_lower.softmax_te)
                    kt[x, MC + j] = T.Select(T.likely(MC + j < M),
                                             at(K, k_lay, bh // H, bh % H, T.min(MC + j, M - 1), x), f32(0.0))
            for rb in range((N + (RT - 1)) // RT):
                # scores of ROWS query rows (the last block's rows past n read row n - 1)
                for jp in range(MP // C):
                    for r in T.unroll(RT):
                        for c in T.vectorized(C):
                            acc[r, c] = f32(0.0)
                    for x in range(D):
                        for r in T.unroll(RT):
                            for c in T.vectorized(C):
                                acc[r, c] = acc[r, c] + at(Q, q_lay, bh // H, bh % H, T.min(rb * RT + r, N - 1),
                                                           x) * kt[x, jp * C + c]
                    for r in T.unroll(RT):
                        for c in T.vectorized(C):
                            s[r, jp * C + c] = scaled(acc[r, c])
                # softmax numerators (in place) and 1 / their sum, per row: whole vectors, then the tail
                for r in range(RT):
                    # the mask added here, over the row's m columns only (never past them)
                    if has_mask:
                        for v in range(M // lanes):
                            for l in T.vectorized(lanes):
                                s[r, v * lanes + l] = s[r, v * lanes + l] + mask_at(
                                    Mk, bh // H, bh % H, T.min(rb * RT + r, N - 1), v * lanes + l)
                        for j in range(M - MW):
                            s[r, MW + j] = s[r, MW + j] + mask_at(
                                Mk, bh // H, bh % H, T.min(rb * RT + r, N - 1), MW + j)
                    for l in T.vectorized(lanes):
                        run[l] = s[r, 0]
                    for v in range(M // lanes):
                        for l in T.vectorized(lanes):
                            run[l] = maxnum(run[l], s[r, v * lanes + l])
                    stat[r] = run[0]
                    for l in range(lanes - 1):
                        stat[r] = maxnum(stat[r], run[l + 1])
                    for j in range(M - MW):
                        stat[r] = maxnum(stat[r], s[r, MW + j])
                    if safe:
                        # maxnum skips NaN: a -inf maximum is a row of -inf only (probabilities 0), or of -inf
                        # and NaN (NaN outputs, as the unsafe softmax)
                        zero[r] = f32(0.0)
                        if stat[r] == f32(-math.inf):
                            zero[r] = f32(1.0)
                            for j in range(M):
                                zero[r] = T.Select(s[r, j] != s[r, j], f32(0.0), zero[r])
                    for l in T.vectorized(lanes):
                        run[l] = f32(0.0)
                    for v in range(M // lanes):
                        for l in T.vectorized(lanes):
                            s[r, v * lanes + l] = _exp_nonpositive(s[r, v * lanes + l] - stat[r])
                            run[l] = run[l] + s[r, v * lanes + l]
                    for j in range(M - MW):
                        s[r, MW + j] = _exp_nonpositive(s[r, MW + j] - stat[r])
                    stat[r] = run[0]
                    for l in range(lanes - 1):
                        stat[r] = stat[r] + run[l + 1]
                    for j in range(M - MW):
                        stat[r] = stat[r] + s[r, MW + j]
                    stat[r] = f32(1.0) / stat[r]
                    if safe:
                        if zero[r] == f32(1.0):
                            stat[r] = f32(0.0)
                            for j in range(M):
                                s[r, j] = f32(0.0)
                # outputs: Σ_j e_j v_j per panel of dv, times 1 / sum
                for cp in range(DV // C):
                    for r in T.unroll(RT):
                        for c in T.vectorized(C):
                            acc[r, c] = f32(0.0)
                    for j in range(M):
                        for r in T.unroll(RT):
                            for c in T.vectorized(C):
                                acc[r, c] = acc[r, c] + s[r, j] * at(V, v_lay, bh // H, bh % H, j, cp * C + c)
                    for r in T.unroll(RT):
                        if rb * RT + r < N:
                            for c in T.vectorized(C):
                                O[bh // H, rb * RT + r, bh % H, cp * C + c] = acc[r, c] * stat[r]
    return attention


def fuse_attention(lanes: int):
    """Module pass (module docstring); `lanes`: float32 lanes of the target's vectors."""
    import tvm
    from tvm import relax, tirx
    from tvm.relax import PyExprMutator, expr_functor
    from tvm.sym.analyzer import Analyzer

    analyzer = Analyzer()

    def lanes_for(dv: int) -> int | None:
        """The widest vectors, the target's or halves of them down to 8 lanes (AVX2's), whose panels divide dv:
        a 16-wide head on AVX-512 takes 8-lane vectors (16-column tiles), as on AVX2, rather than staying
        unfused; narrower vectors are not taken (half-empty registers: the unfused kernels run)."""
        width = lanes
        while width > min(lanes, 8) and dv % (VECTORS * width):
            width //= 2
        return width if dv % (VECTORS * width) == 0 else None

    @expr_functor.mutator
    class _Fuse(PyExprMutator):
        def __init__(self, mod):
            super().__init__(mod)
            self.changed = 0

        def _bound(self, expr):
            return bound_value(self, expr)

        def _source(self, t):
            """(tensor, layout): the (b, seq, h, d) tensor `t` is the head split of ("bshd"), part i of the
            (b, seq, P, h, d) tensor that `permute_dims(x, [2, 0, 3, 1, 4])[i]` split it from (one qkv
            projection, as timm's and many transformers' attention write it: "p{i}of{P}"), or `t` ("bhsd")."""
            inner = self._bound(t)
            if _op(inner) == "relax.permute_dims" and _axes(inner) == [0, 2, 1, 3] and _shape(inner.args[0]):
                return inner.args[0], "bshd"
            if _op(inner) == "relax.take" and inner.attrs.axis is not None and int(inner.attrs.axis) == 0:
                index, packed = scalar_constant(inner.args[1]), self._bound(inner.args[0])
                if (index is not None and _op(packed) == "relax.permute_dims" and _axes(packed) == [2, 0, 3, 1, 4]
                        and _shape(packed.args[0]) is not None and isinstance(_shape(packed.args[0])[2], tirx.IntImm)):
                    return packed.args[0], f"p{int(index)}of{int(_shape(packed.args[0])[2])}"
            return t, "bhsd"

        def _unscaled(self, expr):
            """(tensor, factor): `expr` without a multiplication / division by a scalar constant."""
            val = self._bound(expr)
            if _op(val) in ("relax.multiply", "relax.divide"):
                a, b = val.args
                c = scalar_constant(b)
                if c is not None and c != 0:
                    return a, (c if _op(val) == "relax.multiply" else 1.0 / c)
                c = scalar_constant(a)
                if c is not None and _op(val) == "relax.multiply":
                    return b, c
            return expr, None

        def _safe_softmax(self, p_val):
            """The softmax of `where(all(s == -inf, -1), 0, softmax(s))` (torch's _safe_softmax, as
            scaled_dot_product_attention decomposes), else None."""
            if _op(p_val) != "relax.where":
                return None
            cond, zeros, sm = (self._bound(a) for a in p_val.args)
            if _op(sm) != "relax.nn.softmax" or not (
                    _op(zeros) in ("relax.full_like", "relax.zeros_like", "relax.zeros", "relax.full")
                    or scalar_constant(p_val.args[1]) == 0.0):
                return None
            if _op(zeros) in ("relax.full_like", "relax.full") and scalar_constant(zeros.args[1]) != 0.0:
                return None
            # the condition: logical_not / astype / max over the last axis ... of equal(s, -inf)
            for _ in range(8):
                if _op(cond) == "relax.equal":
                    return sm if (cond.args[0].same_as(sm.args[0])
                                  and scalar_constant(cond.args[1]) == float("-inf")) else None
                if _op(cond) not in ("relax.logical_not", "relax.astype", "relax.max"):
                    return None
                cond = self._bound(cond.args[0])
            return None

        def _match(self, value):
            """(q, k, v, scale, safe) of an attention `matmul(p, v)` (module docstring), else None."""
            if _op(value) != "relax.matmul":
                return None
            p, v = value.args[:2]
            p_val = self._bound(p)
            safe = self._safe_softmax(p_val)
            if safe is not None:
                p_val = safe
            if _op(p_val) != "relax.nn.softmax" or int(p_val.attrs.axis) not in (-1, 3):
                return None
            scale, mask = 1.0, None
            x = p_val.args[0]
            xv = self._bound(x)
            if _op(xv) == "relax.add":          # an additive mask (4-D, broadcast over heads / rows / batch)
                for scores, other in (xv.args, xv.args[::-1]):
                    sv = self._bound(self._unscaled(scores)[0])
                    if _op(sv) == "relax.matmul" and _shape(other) is not None and 2 <= len(_shape(other)) <= 4 \
                            and str(other.ty.dtype) == "float32":
                        x, mask = scores, other
                        break
                else:
                    return None
            s, c = self._unscaled(x)
            scale *= 1.0 if c is None else c
            s = self._bound(s)
            if _op(s) != "relax.matmul":
                return None
            # scaled_dot_product_attention scales q and kᵀ by sqrt(scale) each
            (q, cq), (kt, ck) = self._unscaled(s.args[0]), self._unscaled(s.args[1])
            scale *= (1.0 if cq is None else cq) * (1.0 if ck is None else ck)
            kt_val = self._bound(kt)
            if _op(kt_val) != "relax.permute_dims" or _axes(kt_val) not in ([0, 1, 3, 2], [0, 2, 3, 1]):
                return None
            k = kt_val.args[0]
            if _axes(kt_val) == [0, 2, 3, 1]:       # kᵀ straight from (b, m, h, d) (two permutations folded)
                sk = _shape(k)
                if sk is None or len(sk) != 4:
                    return None
                k = (k, "bshd")
            shapes = [_shape(t) for t in (q, k if not isinstance(k, tuple) else kt, v, value)]
            if any(sh is None or len(sh) != 4 for sh in shapes) or any(
                    str(t.ty.dtype) != "float32" for t in (q, kt, v)):
                return None
            (b, h, n, d), (_, _, _, dv) = shapes[0], shapes[2]
            m = shapes[1][3] if isinstance(k, tuple) else shapes[1][2]
            if not all(isinstance(x, tirx.IntImm) for x in (h, d, dv)) or lanes_for(int(dv)) is None:
                return None
            if mask is not None:                # each dim 1 or the scores' own (b, h, n, m)
                ms = [tirx.IntImm("int64", 1)] * (4 - len(_shape(mask))) + _shape(mask)
                if not all(analyzer.can_prove_equal(e, 1) or analyzer.can_prove_equal(e, full)
                           for e, full in zip(ms, (b, h, n, m))):
                    return None
            return q, k, v, (None if scale == 1.0 else scale), safe is not None, m, mask

        def visit_var_binding_(self, binding):
            value = self.visit_expr(binding.value)
            if _op(value) == "relax.permute_dims" and _axes(value) is not None:
                inner = self._bound(value.args[0])
                if _op(inner) == "relax.permute_dims" and _axes(inner) is not None:
                    # a permutation of a permutation (the fused output's (b, n, h, dv) back from (b, h, n, dv)):
                    # one permutation, or the source itself
                    first, then = _axes(inner), _axes(value)
                    axes = [first[i] for i in then]
                    src = inner.args[0]
                    if axes != list(range(len(axes))):
                        self.builder_.emit_normalized(relax.VarBinding(
                            binding.var, self.builder_.normalize(relax.op.permute_dims(src, axes))))
                    elif isinstance(binding.var, relax.DataflowVar):
                        self.set_var_remap(binding.var, src)
                    else:
                        self.builder_.emit_normalized(relax.VarBinding(binding.var, self.builder_.normalize(
                            relax.op.reshape(src, relax.ShapeExpr(_shape(binding.var))))))
                    self.changed += 1
                    return
            found = self._match(value)
            if found is not None:
                q, k, v, scale, safe, m, mask = found
                (q, lq), (v, lv) = self._source(q), self._source(v)
                k, lk = k if isinstance(k, tuple) else self._source(k)
                b, h, n, d = _shape(found[0])
                dv = _shape(found[2])[3]
                dims = []
                for name, x in (("b", b), ("n", n), ("m", m)):
                    dims.append(int(x) if isinstance(x, tirx.IntImm) else tirx.Var(name, "int64"))
                if mask is None:            # a zero to add (the kernel skips the loop: see attention_kernel)
                    mask, mask_dims = relax.const(np.zeros((1, 1, 1, 1), np.float32)), (1, 1, 1, 1)
                else:                       # the kernel's own (b, h, n, m) where the mask has the dim
                    if len(_shape(mask)) < 4:   # a (n, m) or (h | 1, n, m) mask: as 4-D (a view)
                        mask = self.builder_.emit(relax.op.reshape(
                            mask, [1] * (4 - len(_shape(mask))) + _shape(mask)))
                    full = (dims[0], int(h), dims[1], dims[2])
                    mask_dims = tuple(1 if analyzer.can_prove_equal(e, 1) else f for e, f in zip(_shape(mask), full))
                kernel = attention_kernel(*dims, int(h), int(d), int(dv), (lq, lk, lv), scale, lanes_for(int(dv)),
                                          safe, mask_dims)
                gv = self.builder_.add_func(kernel.without_attr("global_symbol").with_attr(
                    FUSED_KERNEL_ATTR, "attention"), "attention")
                out = self.builder_.emit(relax.call_tir(gv, [q, k, v, mask],
                                                        relax.TensorType([b, n, h, dv], "float32")))
                self.builder_.emit_normalized(relax.VarBinding(
                    binding.var, self.builder_.normalize(relax.op.permute_dims(out, [0, 2, 1, 3]))))
                self.changed += 1
                return
            self.builder_.emit_normalized(relax.VarBinding(binding.var, value))

    @tvm.transform.module_pass(opt_level=0, name="GraphoptFuseAttention")
    def _pass(mod, ctx):
        return rewrite_adding_functions(mod, _Fuse(mod))

    return _pass
