"""Small helpers the Relax rewrites share (batch_matmul_views, elementwise_views, fused_attention,
fused_inverted_residual): what op a call is, a tensor's static-rank shape, a scalar constant's value, the value a
variable is bound to inside a PyExprMutator, and the drivers that run such a mutator over a module."""
from __future__ import annotations

__all__ = ["FUSED_KERNEL_ATTR", "op_name", "tensor_shape", "scalar_constant", "bound_value", "rewrite_functions",
           "rewrite_adding_functions"]


# set on the hand-written fused kernels a pass adds (value: the kind, e.g. "attention"); the report counts their calls
FUSED_KERNEL_ATTR = "graphopt.fused_kernel"


def op_name(expr) -> str:
    """The Relax op a call applies ('relax.matmul'), '' for anything else."""
    import tvm
    from tvm import relax

    if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
        return expr.op.name
    return ""


def tensor_shape(expr) -> list | None:
    """The dims (PrimExprs) of a tensor-typed expression with a known shape, else None."""
    from tvm import relax

    ty = getattr(expr, "ty", None)
    if not isinstance(ty, relax.TensorType) or not isinstance(ty.shape, relax.ShapeExpr):
        return None
    return list(ty.shape.values)


def scalar_constant(expr) -> float | None:
    """The value of a one-element Relax constant, else None."""
    import tvm

    if isinstance(expr, tvm.ir.expr.Constant) and expr.value.numpy().size == 1:
        return float(expr.value.numpy().reshape(()))
    return None


def bound_value(mutator, expr):
    """The value `expr` is bound to in `mutator`'s block builder when it is a bound variable, else `expr`."""
    from tvm import relax

    if isinstance(expr, relax.Var):
        value = mutator.lookup_binding(expr)
        return value if value is not None else expr
    return expr


def rewrite_functions(mod, mutator_cls):
    """`mod` with a fresh `mutator_cls(mod)` (a PyExprMutator counting its rewrites in `changed`) applied to each
    Relax function, then DeadCodeElimination (what the rewrites left unused); `mod` itself when nothing changed."""
    from tvm import relax

    out, changed = mod, 0
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            m = mutator_cls(out)
            new = m.visit_expr(func)
            if m.changed:
                out = out.clone() if hasattr(out, "clone") else out
                out[gv] = new
                changed += m.changed
    return relax.transform.DeadCodeElimination()(out) if changed else out


def rewrite_adding_functions(mod, mutator):
    """`mod` with `mutator` (a PyExprMutator built on `mod`, counting its rewrites in `changed`, which may add
    functions through its block builder: hand-written kernels) applied to each Relax function, then
    DeadCodeElimination; `mod` itself when nothing changed."""
    from tvm import relax

    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    return relax.transform.DeadCodeElimination()(mutator.builder_.get()) if mutator.changed else mod
