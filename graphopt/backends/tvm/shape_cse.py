"""Relax pass: a dynamic function builds each run-time shape once (common subexpressions of the VM's shape calls).

With dynamic dims, every tensor the memory plan places gets its shape from `vm.builtin.make_shape(shape_heap,
...)` (VMShapeLower), and every symbolic scalar a kernel takes from `vm.builtin.make_prim_value(shape_heap,
...)`: one packed call each, at run time, per tensor and per scalar argument. The small encoder's dynamic
build made 95 shapes per forward pass (17 distinct) and 59 scalars (2 distinct). Each such call reads only
slots of the shape heap that are written once, where their dim is defined (match_shape at entry, the shape
function after it), and before any call that reads them; so a later call with the same arguments returns
the same value. This pass drops each later one and points its uses at the first one's variable (binding it
as an alias of that variable instead would cost a `vm.builtin.copy` per alias).

Contract: values unchanged; only calls to those two builtins, with the same shape heap and the same constant
arguments, in the function body's top-level bindings (straight-line code: the first call dominates the
later ones); nested blocks (branches) are left as they are. Runs after VMShapeLower, on functions with
dynamic dims only.
"""
from __future__ import annotations

__all__ = ["dedupe_shape_calls", "SHAPE_BUILTINS"]

SHAPE_BUILTINS = ("vm.builtin.make_shape", "vm.builtin.make_prim_value")


def _key(call):
    """(builtin, shape heap, constant arguments) of a shape call, or None for any other expression."""
    from tvm import relax, tirx

    if not isinstance(call, relax.Call) or not isinstance(call.op, relax.ExternFunc):
        return None
    name = str(call.op.global_symbol)
    if name not in SHAPE_BUILTINS or not call.args or not isinstance(call.args[0], relax.Var):
        return None
    consts = []
    for a in call.args[1:]:
        if not isinstance(a, tirx.IntImm):       # TVM 0.27: PrimExprs appear directly as call arguments
            return None
        consts.append(int(a.value))
    return name, call.args[0], tuple(consts)


def dedupe_shape_calls():
    """Module pass (see the module docstring)."""
    import tvm
    from tvm import relax
    from tvm.relax import PyExprMutator, expr_functor

    @expr_functor.mutator
    class _Dedupe(PyExprMutator):
        def __init__(self, mod):
            super().__init__(mod)
            self.first: list = []       # (key, var) of the first call of each kind, top-level bindings only
            self.depth = 0              # nesting of SeqExprs (0 outside the function body, 1 in its bindings)
            self.merged = 0

        def visit_seq_expr_(self, op):
            self.depth += 1
            try:
                return super().visit_seq_expr_(op)
            finally:
                self.depth -= 1

        def visit_var_binding_(self, binding):
            k = _key(binding.value) if self.depth == 1 else None
            if k is not None:
                seen = next((v for (name, heap, consts), v in self.first
                             if name == k[0] and heap.same_as(k[1]) and consts == k[2]), None)
                if seen is not None:
                    self.set_var_remap(binding.var, seen)      # later uses read the first call's value
                    self.merged += 1
                    return
            super().visit_var_binding_(binding)
            if k is not None:
                self.first.append((k, binding.var))      # its value (shape heap, constants) is unchanged

    @tvm.transform.module_pass(opt_level=0, name="GraphoptDedupeShapeCalls")
    def _pass(mod, ctx):
        out = mod
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function) and func.attrs is not None and "tir_var_upper_bound" in func.attrs:
                m = _Dedupe(out)
                new = m.visit_expr(func)
                if m.merged:
                    out = out.clone() if hasattr(out, "clone") else out
                    out[gv] = new
        return out

    return _pass
