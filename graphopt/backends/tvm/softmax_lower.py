"""Relax pass: float32 softmax over the last axis as graphopt's own kernel (CPU), cheaper than TOPI's fast_softmax.

TOPI's fast_softmax (what FastMathTransform gives) computes, per row: max, fast_exp(x - max), sum, exp / sum.
On a CPU three of its costs buy nothing here (small encoder, 1 x 512, one attention softmax over 4 x 512 x 512
scores, the scheduled kernel alone: 458 us; without fast_exp's work 228, without the sum 315):

* the row max: numerics.nan_propagating_minmax makes every float max an IEEE `maximum` (several instructions
  per element on x86). A softmax does not need it: a NaN in the row makes its exp NaN and so the row's sum and
  every output NaN, whatever the max; `maxnum` (one instruction) is used instead.
* fast_exp clamps its input to [-88.38, 88.38] and returns max(result, x); the argument x - max is <= 0 (or
  NaN), so the upper clamp and the final max never change a value (NaN stays NaN through the polynomial).
* exp / sum: a division per element; PyTorch's CPU kernel multiplies by 1 / sum, as this one does (<= 1 ulp
  from the division).

Values: the exponential is fast_exp's polynomial (same constants, same bounds as relax_layout_passes states),
the sum runs in the reference order (RowGroups keeps it bit for bit), so the result differs from TOPI's
fast_softmax by the reciprocal's rounding only (<= 1 ulp); special values as PyTorch: a row with NaN or +inf
is all NaN, a row of -inf is all NaN. Other dtypes and axes keep TOPI's kernel.
"""
from __future__ import annotations

__all__ = ["graphopt_softmax", "softmax_te"]

# fast_exp's constants (TOPI's fast_exp_float32)
_LOWER = -88.376258850097656
_LOG2E = 1.4426950216293335
_LN2 = 0.69314718246459961
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
    maxnum = te.comm_reducer(lambda a, b: tirx.call_llvm_pure_intrin("float32", "llvm.maxnum", a, b),
                             lambda t: tirx.min_value(t), name="maxnum")
    k = te.reduce_axis((0, n), name="k")
    m = te.compute(shape[:-1], lambda *i: maxnum(x[tuple(i) + (k,)], axis=k), name="T_softmax_maxelem")
    e = te.compute(shape, lambda *i: _exp_nonpositive(x[i] - m[i[:-1]]), name="T_fast_exp")
    k2 = te.reduce_axis((0, n), name="k")
    s = te.compute(shape[:-1], lambda *i: te.sum(e[tuple(i) + (k2,)], axis=k2), name="T_softmax_expsum")
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
            return self.builder_.call_te(softmax_te, call.args[0], primfunc_name_hint="softmax")

    @tvm.transform.module_pass(opt_level=0, name="GraphoptSoftmax")
    def _pass(mod, ctx):
        m = _Softmax(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                new = m.visit_expr(func)
                m.builder_.update_func(gv, new)
        return m.builder_.get() if m.changed else mod

    return _pass
