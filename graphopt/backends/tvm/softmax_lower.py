"""Relax pass: float32 softmax over the last axis as graphopt's own kernel (CPU), cheaper than TOPI's fast_softmax.

TOPI's fast_softmax (what FastMathTransform gives) computes, per row: max, fast_exp(x - max), sum, exp / sum.
On a CPU three of its costs buy nothing here (small encoder, 1 x 512, one attention softmax over 4 x 512 x 512
scores, the scheduled kernel alone: 458 us; without fast_exp's work 228, without the sum 315):

* the row max: numerics.nan_propagating_minmax makes every float max an IEEE `maximum` (several instructions
  per element on x86). A softmax does not need it: a NaN in the row makes its exp NaN and so the row's sum and
  every output NaN, whatever the max; a plain select `a > b ? a : b` (one `vmaxps` on x86) is used instead.
  Not `llvm.maxnum`: as this kernel's reduction, LLVM's AVX-512 code dropped the row's tail past its last whole
  8-float vector from the max (11- and 12-long rows on every AVX-512 target, right on AVX2): rows whose tail
  held values more than exp's range above the rest came out NaN (tests/backends/test_softmax_lower.py). Found
  since: the lowered kernel read its last row's running results past their buffer where it takes the tail (a
  clamp TIR's simplifier dropped inside a Select, see softmax_te), and LLVM may bound a loop's trip count by
  such a read; every read is in bounds now (TVM's OOBChecker, tested). The select is faster too (saved builds
  interleaved, 2-core Zen 4: 4 x 512 x 512 0.465 -> 0.408 ms, x86:haswell 0.566 -> 0.535; 64 x 197 x 197
  4.88 -> 4.35 and 2.70 -> 2.25). Rows shorter than 8 are reduced in one step (two_steps): bit for bit the
  same outputs, and 4096 x 2 / 2048 x 5 / 1024 x 7 rows took 4712 / 1666 / 409 us before, 21.8 / 16.7 / 10.7
  us now (x86; x86:haswell 10758 / 4142 / 843 -> 21.1 / 16.3 / 11.7; saved builds interleaved).
* fast_exp clamps its input to [-88.38, 88.38] and returns max(result, x); the argument x - max is <= 0 (or
  NaN), so the upper clamp and the final max never change a value (NaN stays NaN through the polynomial).
* exp / sum: a division per element; PyTorch's CPU kernel multiplies by 1 / sum, as this one does (<= 1 ulp
  from the division).

The row max and the row sum each run as 8 running results over the row's whole vectors, then those in lane
order and the row's tail (`softmax_te`): the scheduled kernel reads the row in whole vectors instead of
interleaving one scalar chain per row (the attention softmax of the small encoder at 8 x 512 alone, AVX2, 2
threads: 5.49 -> 4.91 ms, with RowGroups taking each row's lanes as one vector). The maximum is the same in any
order; the sum's order is this one in every schedule (RowGroups keeps it bit for bit); against a float64
softmax of those scores its largest error went from 8.9e-8 to 2.2e-8 (one run each).

Values: the exponential is fast_exp's polynomial (same constants, same bounds as relax_layout_passes states),
so the result differs from TOPI's fast_softmax by the sum's order and the reciprocal's rounding (a few ulp);
special values as PyTorch: a row with NaN or +inf is all NaN, a row of -inf is all NaN. Other dtypes and axes
keep TOPI's kernel. The kernel is marked for inplace_rowwise (its result written over a scores tensor nothing
else reads).
"""
from __future__ import annotations

from .inplace_rowwise import ROWWISE_ATTR

__all__ = ["graphopt_softmax", "softmax_te"]

# fast_exp's constants (TOPI's fast_exp_float32)
_LOWER = -88.376258850097656
_LOG2E = 1.4426950216293335
_LN2 = 0.69314718246459961
_LANES = 8                   # running maxima and sums per row: one AVX2 vector of float32
_POLY = (0.00019875691214110702, 0.0013981999363750219, 0.008333452045917511, 0.041665796190500259,
         0.1666666567325592, 0.5)


def _exp_nonpositive(d):
    """fast_exp(d) for d <= 0 or NaN: TOPI's polynomial without its upper clamp and final max(result, d)."""
    from tvm import tirx

    f = lambda v: tirx.const(v, "float32")                     # noqa: E731
    c = tirx.Select(f(_LOWER) > d, f(_LOWER), d)                # a NaN compares false: stays NaN
    n = tirx.floor(c * f(_LOG2E) + f(0.5))
    r = c - n * f(_LN2)
    p = f(_POLY[0])
    for k in _POLY[1:]:
        p = p * r + f(k)
    p = p * r * r + r + f(1.0)
    two_n = tirx.reinterpret("float32", tirx.shift_left(tirx.Cast("int32", n + f(127.0)), tirx.const(23, "int32")))
    return two_n * p


def softmax_te(x):
    """TE softmax over the last axis of a float32 tensor (see the module docstring)."""
    from tvm import te, tirx

    shape = list(x.shape)
    n = shape[-1]
    maxnum = te.comm_reducer(lambda a, b: tirx.Select(a > b, a, b), lambda t: tirx.min_value(t), name="maxnum")
    # Row max and row sum in two steps each: `lanes` running results over the row's whole vectors (lane j
    # takes elements j, j + lanes, ...), then those in lane order followed by the elements past the last
    # whole vector in row order (the row max is exact in any order; the sum's order is this one in every
    # schedule). A row shorter than one vector has no running results (their loop is empty, nothing is
    # written): the second step takes the reducer's identity instead; reads past the lanes are clamped into
    # the row (their values never selected there).
    lanes = _LANES
    whole = n // lanes * lanes

    def two_steps(src, reducer, identity, name):
        if isinstance(n, (int, tirx.IntImm)) and int(n) < lanes:
            # in order in one step: the select below would read src[r - lanes] for r < lanes once TIR's
            # simplifier drops its clamp (a negative index)
            r = te.reduce_axis((0, n), name="r")
            return te.compute(shape[:-1], lambda *i: reducer(src[tuple(i) + (r,)], axis=r), name=name)
        ko = te.reduce_axis((0, n // lanes), name="ko")
        part = te.compute(shape[:-1] + [lanes], lambda *i: reducer(src[tuple(i[:-1]) + (ko * lanes + i[-1],)],
                                                                   axis=ko), name=name + "_lanes")
        r = te.reduce_axis((0, lanes + n - whole), name="r")

        def rest(*i):               # selects, not branches: both reads stay in bounds (LLVM's SLP vectorizer
            # made invalid IR of a branchy form: "Instruction does not dominate all uses", 16-long rows)
            lane = tirx.Select(n >= lanes, part[tuple(i) + (tirx.min(r, lanes - 1),)], identity)
            tail = src[tuple(i) + (tirx.max(whole + r - lanes, 0),)]
            # `likely` keeps r < lanes from TIR's simplifier, which otherwise drops each clamp above as
            # redundant inside its own branch, although a Select evaluates both: part[r] past the lanes (out
            # of its buffer for the last row of a group) and src[r - lanes] before the row (OOBChecker found
            # both). LLVM bounds a loop's trip count by such reads of a fixed-size buffer: the likely cause of
            # the dropped tail of b073de5 (tests/backends/test_softmax_lower.py)
            return reducer(tirx.Select(tirx.likely(r < lanes), lane, tail), axis=r)

        return te.compute(shape[:-1], rest, name=name)

    m = two_steps(x, maxnum, tirx.min_value("float32"), "T_softmax_maxelem")
    e = te.compute(shape, lambda *i: _exp_nonpositive(x[i] - m[i[:-1]]), name="T_fast_exp")
    s = two_steps(e, te.sum, tirx.const(0.0, "float32"), "T_softmax_expsum")
    return te.compute(shape, lambda *i: e[i] * (tirx.const(1.0, "float32") / s[i[:-1]]), name="T_softmax_norm")


def graphopt_softmax():
    """Module pass: every float32 R.nn.softmax over the last axis becomes a call of softmax_te's kernel."""
    import tvm
    from tvm import relax
    from tvm.relax import PyExprMutator, expr_functor

    @expr_functor.mutator
    class _Softmax(PyExprMutator):
        def __init__(self, mod):
            super().__init__(mod)
            self.changed = 0

        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.nn.softmax"):
                return call
            ty = call.args[0].ty
            if not isinstance(ty, relax.TensorType) or str(ty.dtype) != "float32" or ty.ndim < 1:
                return call
            axis = int(call.attrs.axis)
            if axis not in (-1, ty.ndim - 1):
                return call
            self.changed += 1
            return self.builder_.call_te(softmax_te, call.args[0], primfunc_name_hint="softmax",
                                         primfunc_attrs={ROWWISE_ATTR: True})   # see inplace_rowwise

    @tvm.transform.module_pass(opt_level=0, name="GraphoptSoftmax")
    def _pass(mod, ctx):
        m = _Softmax(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                new = m.visit_expr(func)
                m.builder_.update_func(gv, new)
        return m.builder_.get() if m.changed else mod

    return _pass
