"""Relax pass: a batched matmul over 4-D tensors stays one 4-D matmul (no 3-D views around it).

torch.export decomposes `q @ k.transpose(-2, -1)` on (batch, heads, ...) tensors into expand (an identity
broadcast_to) + view to (batch * heads, m, k) + bmm + view back to (batch, heads, m, n). In Relax the matmul
kernel's output then goes through a reshape before anything that follows, and TVM's FuseOps fuses an
out-elementwise-fusable op (the matmul) with elementwise consumers only, not through an injective reshape:
the attention's `* (1 / sqrt(head_dim))` stayed a kernel of its own, one more pass over the (b, h, n, n)
scores (small encoder at 1 x 512: 0.55 ms of 26). This pass rewrites

    reshape(matmul(reshape(A'), reshape(B')), (b, h, m, n))   with A' = A or broadcast_to(A, shape of A)

into `matmul(A, B)` when A is (b, h, m, k), B is (b, h, k, n) and the reshapes only merge / split the two
batch dims (checked symbolically: dynamic dims too). Relax's matmul broadcasts batch dims, so the result is
the same values, element for element (the same products summed in the same order per output). The old
bindings are left to DeadCodeElimination. Float matmuls only (graphopt's int8 ones are lowered at import).
"""
from __future__ import annotations

from .relax_match import bound_value, rewrite_functions
from .relax_match import op_name as _op_name
from .relax_match import tensor_shape as _shape

__all__ = ["collapse_batched_matmul_views"]


def collapse_batched_matmul_views():
    """The module pass (see the module docstring)."""
    import tvm
    from tvm import relax
    from tvm.relax import PyExprMutator, expr_functor
    from tvm.sym.analyzer import Analyzer

    @expr_functor.mutator
    class _Collapse(PyExprMutator):
        def __init__(self, mod):
            super().__init__(mod)
            self.analyzer = Analyzer()
            self.changed = 0

        def _bound(self, expr):
            return bound_value(self, expr)

        def _four_d_source(self, three_d):
            """A (b, h, m, k) tensor whose merge of the two batch dims is `three_d` (a reshape), or None."""
            view = self._bound(three_d)
            if _op_name(view) != "relax.reshape":
                return None
            src = view.args[0]
            inner = self._bound(src)
            if _op_name(inner) == "relax.broadcast_to":
                a, b = _shape(inner.args[0]), _shape(inner)
                if a is not None and b is not None and len(a) == len(b) and all(
                        self.analyzer.can_prove_equal(x, y) for x, y in zip(a, b)):
                    src = inner.args[0]                 # an identity broadcast (torch's expand)
            s4, s3 = _shape(src), _shape(three_d)
            if s4 is None or s3 is None or len(s4) != 4 or len(s3) != 3:
                return None
            if not (self.analyzer.can_prove_equal(s4[0] * s4[1], s3[0])
                    and self.analyzer.can_prove_equal(s4[2], s3[1]) and self.analyzer.can_prove_equal(s4[3], s3[2])):
                return None
            return src

        def visit_var_binding_(self, binding):
            value = binding.value
            if _op_name(value) == "relax.reshape":
                mm = self._bound(value.args[0])
                out = _shape(binding.var)
                if _op_name(mm) == "relax.matmul" and out is not None and len(out) == 4 \
                        and str(binding.var.ty.dtype).startswith("float"):
                    a, b = (self._four_d_source(x) for x in mm.args[:2])
                    if a is not None and b is not None:
                        sa, sb = _shape(a), _shape(b)
                        same = all(self.analyzer.can_prove_equal(x, y) for x, y in (
                            (sa[0], out[0]), (sa[1], out[1]), (sb[0], out[0]), (sb[1], out[1]),
                            (sa[2], out[2]), (sb[3], out[3]), (sa[3], sb[2])))
                        if same:
                            new = relax.op.matmul(self.visit_expr(a), self.visit_expr(b), out_dtype=mm.attrs.out_dtype)
                            self.builder_.emit_normalized(relax.VarBinding(binding.var, self.builder_.normalize(new)))
                            self.changed += 1
                            return
            super().visit_var_binding_(binding)

    @tvm.transform.module_pass(opt_level=0, name="GraphoptCollapseBatchedMatmulViews")
    def _pass(mod, ctx):
        return rewrite_functions(mod, _Collapse)

    return _pass
