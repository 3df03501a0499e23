"""Relax pass: elementwise ops move above the reshapes they read, so they fuse into the kernel that made the data.

torch.export lowers a Linear over (batch, seq, features) to a view to (batch * seq, features), a 2-D matmul
and a view back. Whatever elementwise follows (the FFN's GELU, the residual add after the output projections)
then reads the 3-D view, and TVM's FuseOps fuses an out-elementwise-fusable op (the matmul) with elementwise
consumers only, not through an injective reshape: the GELU and the residual add stayed kernels of their own,
each one more pass over the activations (the small encoder at 8 x 128: 1.4 ms of GELU and 0.5 ms of adds in
45 ms). An elementwise op commutes with a reshape, so this pass rewrites

    y = op(reshape(a, S), b, ...)      ->      y' = op(a, b', ...);  y = reshape(y', S)

when `a` has shape A (A != S), y has shape S, and every other tensor operand is either a reshape to S of a
tensor of shape A (that tensor is used), a tensor of shape S (read through a reshape to A: a view), a scalar,
or a vector along the last axis where A and S share that axis (it broadcasts the same way in both shapes).
The rewritten reshape is then the next op's operand, so chains (GELU's multiply / erf / add / multiply) move
whole; a reshape of a reshape reads the first one's source (and is that source where the shapes are equal).
Values are unchanged: each element goes through the same operations on the same operands. Dynamic dims are
compared symbolically. The old bindings are left to DeadCodeElimination.
"""
from __future__ import annotations

from .relax_match import op_name as _op_name
from .relax_match import rewrite_functions
from .relax_match import tensor_shape as _shape

__all__ = ["elementwise_before_views", "ELEMENTWISE_OPS"]

ELEMENTWISE_OPS = frozenset({
    "relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.power", "relax.maximum",
    "relax.minimum", "relax.where", "relax.erf", "relax.tanh", "relax.exp", "relax.sigmoid", "relax.sqrt",
    "relax.rsqrt", "relax.negative", "relax.abs", "relax.log", "relax.square", "relax.clip", "relax.astype",
    "relax.nn.relu", "relax.nn.gelu", "relax.nn.gelu_tanh", "relax.nn.silu",
})


def elementwise_before_views():
    """The module pass (see the module docstring)."""
    import tvm
    import tvm_ffi
    from tvm import relax
    from tvm.relax import PyExprMutator, expr_functor
    from tvm.sym.analyzer import Analyzer

    analyzer = Analyzer()

    def same(a: list | None, b: list | None) -> bool:
        return a is not None and b is not None and len(a) == len(b) and all(
            analyzer.can_prove_equal(x, y) for x, y in zip(a, b))

    @expr_functor.mutator
    class _Move(PyExprMutator):
        def __init__(self, mod):
            super().__init__(mod)
            self.changed = 0

        def _view_source(self, var):
            """(source, its shape) where `var` is bound to a reshape of a tensor of known shape, else None."""
            if not isinstance(var, relax.Var):
                return None
            value = self.lookup_binding(var)
            if _op_name(value) != "relax.reshape" or not isinstance(value.args[0].ty, relax.TensorType):
                return None
            src_shape = _shape(value.args[0])
            return None if src_shape is None else (value.args[0], src_shape)

        def _moved_args(self, args, out: list):
            """The operands of the op on the reshapes' source shape, or None (see the module docstring)."""
            sources = [self._view_source(a) for a in args]
            shape = next((s for s, a in zip(sources, args) if s is not None and same(_shape(a), out)
                          and not same(s[1], out)), None)
            if shape is None:
                return None
            shape = shape[1]
            moved = []
            for arg, source in zip(args, sources):
                if not isinstance(getattr(arg, "ty", None), relax.TensorType):
                    moved.append(arg)                       # a PrimValue / shape operand (clip's bounds)
                    continue
                arg_shape = _shape(arg)
                if arg_shape is None:
                    return None
                if source is not None and same(source[1], shape) and same(arg_shape, out):
                    moved.append(source[0])
                elif same(arg_shape, out):
                    moved.append(self.builder_.emit(relax.op.reshape(arg, relax.ShapeExpr(shape))))
                elif len(arg_shape) == 0 or (len(arg_shape) == 1 and (
                        analyzer.can_prove_equal(arg_shape[0], 1)
                        or (analyzer.can_prove_equal(arg_shape[0], out[-1])
                            and analyzer.can_prove_equal(shape[-1], out[-1])))):
                    moved.append(arg)                       # broadcasts the same way in both shapes
                else:
                    return None
            return moved, shape

        def visit_var_binding_(self, binding):
            value = self.visit_expr(binding.value)
            name = _op_name(value)
            out = _shape(binding.var)
            if name == "relax.reshape" and out is not None:
                source = self._view_source(value.args[0])
                if source is not None:
                    if (isinstance(binding.var, relax.DataflowVar) and same(source[1], out)
                            and tvm_ffi.structural_equal(source[0].ty, binding.var.ty)):
                        self.set_var_remap(binding.var, source[0])      # reshape back: the source itself
                    else:
                        self.builder_.emit_normalized(relax.VarBinding(
                            binding.var, self.builder_.normalize(relax.op.reshape(source[0], relax.ShapeExpr(out)))))
                    self.changed += 1
                    return
            if name in ELEMENTWISE_OPS and out is not None:
                found = self._moved_args(list(value.args), out)
                if found is not None:
                    args, shape = found
                    inner = self.builder_.emit(relax.Call(value.op, args, value.attrs, value.ty_args))
                    if same(_shape(inner), shape):
                        self.builder_.emit_normalized(relax.VarBinding(
                            binding.var, self.builder_.normalize(relax.op.reshape(inner, relax.ShapeExpr(out)))))
                        self.changed += 1
                        return
            self.builder_.emit_normalized(relax.VarBinding(binding.var, value))

    @tvm.transform.module_pass(opt_level=0, name="GraphoptElementwiseBeforeViews")
    def _pass(mod, ctx):
        return rewrite_functions(mod, _Move)

    return _pass
