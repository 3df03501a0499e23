"""Relax pass: kernels read a view's source tensor directly (no `R.memory.view` between two kernels).

With dynamic dims every reshape is a view (symbolic.reshape_views), and at run time each view is three or four
VM instructions (the shape tuple, a new tensor object, its null dtype and offset): 92 views per forward pass of
a 4-layer encoder, as many as its kernels (small encoder, 1 x 16, interleaved: 0.896 -> 0.858 ms with them
folded; static build 0.69). A view only renames the dims of contiguous bytes, so a kernel can take the view's source
instead: its parameter becomes a buffer of the source's shape and the kernel's body reads the old buffer as a
TIR view of it (`DeclBuffer` over the same data, the kernel's own code unchanged). A dim variable that only
the old buffer defined becomes a scalar argument of the call, or, where the Relax side has no variable for it
(a hand-written kernel's own `bt` for `batch * heads`), is bound to the view's dim in the kernel's variables.
Chains of views are followed to their source.

Contract: values unchanged (the same bytes are read through the same indices); kernels whose rewrite cannot be
proven well-formed, views with a dtype or byte offset, and views feeding anything but a `call_tir` are left
as they were. Call sites with the same rewrite share one kernel (BlockBuilder dedupes identical functions).
"""
from __future__ import annotations

from typing import Any

__all__ = ["fold_view_args"]


def _plain_view(call, null_vars: set) -> bool:
    """A view that only changes the shape (no dtype, no byte offset)."""
    from tvm import relax

    if len(call.args) != 4 or not isinstance(call.args[1], relax.ShapeExpr):
        return False
    dtype, offset = call.args[2], call.args[3]
    no_dtype = (isinstance(dtype, relax.Var) and dtype in null_vars) or (
        isinstance(dtype, relax.Tuple) and len(dtype.fields) == 0)
    no_offset = isinstance(offset, relax.Tuple) and len(offset.fields) == 0
    return no_dtype and no_offset


def _tensor_shape(expr) -> list | None:
    """The static-or-symbolic shape of a Relax tensor expression, or None when unknown."""
    from tvm import relax

    sinfo = getattr(expr, "ty", None)
    if not isinstance(sinfo, relax.TensorType) or sinfo.shape is None:
        return None
    shape = sinfo.shape
    if not isinstance(shape, relax.ShapeExpr):
        return None
    return list(shape.values)


def _vars_of(expr) -> list:
    from tvm import tirx

    return list(tirx.analysis.undefined_vars(expr)) if not isinstance(expr, int) else []


def _is_var(expr) -> bool:
    from tvm import tirx

    return isinstance(expr, tirx.Var)


class _KernelRewrite:
    """One call site's rewrite of one PrimFunc: parameters `index -> source shape` replaced."""

    def __init__(self, func, call_args: list, out_shapes: list):
        self.func = func
        self.call_args = call_args          # the call's Relax arguments (tensors and scalar PrimExprs)
        self.out_shapes = out_shapes        # the outputs' Relax shapes
        self.relax_to_tir: dict = {}        # Relax shape variable -> the kernel's TIR variable
        self.extra: list = []               # (new TIR scalar param, Relax PrimExpr) appended to the call
        self._map_call()

    def _map_call(self):
        """Relax dims <-> kernel dims, from the call's tensors, scalars and outputs."""
        import tvm

        params = list(self.func.params)
        n_in = len(self.call_args)
        for p, arg in zip(params[:n_in], self.call_args):
            if tvm.ir.is_prim_expr(arg):        # a scalar argument (a shape variable)
                if _is_var(arg):
                    self.relax_to_tir.setdefault(arg, p)
                continue
            self._map_shape(p, _tensor_shape(arg))
        for p, shape in zip(params[n_in:], self.out_shapes):
            self._map_shape(p, shape)

    def _map_shape(self, param, shape):
        bt = param.ty
        if shape is None or not hasattr(bt, "shape") or len(bt.shape) != len(shape):
            return
        for tdim, rdim in zip(bt.shape, shape):
            if _is_var(tdim) and _is_var(rdim):
                self.relax_to_tir.setdefault(rdim, tdim)

    def _tir_shape(self, relax_shape: list) -> list | None:
        """The source's Relax shape in the kernel's variables; fresh ones where the kernel has none (bare
        dims: bound by the new buffer; inside an expression: a new scalar parameter)."""
        from tvm import tirx

        for dim in relax_shape:
            for v in _vars_of(dim):
                if v in self.relax_to_tir:
                    continue
                fresh = tirx.Var(v.name, v.ty.dtype)
                self.relax_to_tir[v] = fresh
                if not any(d.same_as(v) for d in relax_shape):
                    self.extra.append((fresh, v))
        shape = [_subst(d, self.relax_to_tir) for d in relax_shape]
        return None if any(d is None for d in shape) else shape

    def apply(self, replacements: dict) -> Any | None:
        """The kernel with parameter i reading replacements[i] (a Relax source shape); None if not provable."""
        from tvm import tirx

        params = list(self.func.params)
        decls, new_params = [], list(params)
        for i, src_shape in sorted(replacements.items()):
            old = params[i]
            bt = old.ty
            if not hasattr(bt, "shape") or (bt.strides is not None and len(bt.strides)):
                return None
            shape = self._tir_shape(src_shape)
            if shape is None:
                return None
            new = tirx.decl_buffer(shape, bt.dtype, name=old.name + "_src")
            new_params[i] = new
            decls.append(tirx.DeclBuffer(old, data=new.data))
        # every dim variable the kernel uses must still be defined by a parameter: bare dims of buffers or
        # scalars; one that only a replaced buffer defined becomes a scalar parameter fed from the call
        defined = set()
        for p in new_params:
            if hasattr(p.ty, "shape"):
                defined.update(d for d in p.ty.shape if _is_var(d))
            else:
                defined.add(p)
        defined.update(v for v, _ in self.extra)
        tir_to_relax = {t: r for r, t in self.relax_to_tir.items()}
        binds = []
        for i in replacements:
            old_shape = list(params[i].ty.shape)
            view_shape = _tensor_shape(self.call_args[i])
            for d, dim in enumerate(old_shape):
                for v in _vars_of(dim):
                    if v in defined:
                        continue
                    if v in tir_to_relax:
                        self.extra.append((v, tir_to_relax[v]))
                        defined.add(v)
                        continue
                    # a dim of its own that only the old buffer defined (a hand-written kernel's `bt` for the
                    # view's `batch * heads`): bound to the view's dim, written in the kernel's variables
                    if not dim.same_as(v) or view_shape is None or len(view_shape) != len(old_shape):
                        return None
                    value = _subst(view_shape[d], self.relax_to_tir)
                    if value is None or any(u not in defined for u in _vars_of(value)):
                        return None
                    if isinstance(value, int) or str(value.ty.dtype) != str(v.ty.dtype):
                        value = tirx.Cast(v.ty.dtype, value)
                    binds.append(tirx.Bind(v, value))
                    defined.add(v)
        n_in = len(self.call_args)
        new_params = new_params[:n_in] + [v for v, _ in self.extra] + new_params[n_in:]
        body = _with_decls(self.func.body, binds + decls)
        func = tirx.PrimFunc(new_params, body, self.func.ret_type, self.func.attrs)
        try:
            if not _well_formed(func):
                return None
        except Exception:                   # noqa: BLE001 - a kernel we cannot prove: keep the view
            return None
        return func


def _with_decls(body, decls: list):
    """`body` with the buffer views `decls` first: inside the root block of a scheduled (block) kernel, whose
    body must stay that block for TVM's lowering."""
    from tvm import tirx

    try:
        from tvm import s_tir
    except ImportError:                     # pragma: no cover - TVM builds without S-TIR
        s_tir = None
    if s_tir is not None and isinstance(body, s_tir.SBlockRealize):
        b = body.block
        block = s_tir.SBlock(b.iter_vars, b.reads, b.writes, b.name_hint, tirx.SeqStmt(decls + [b.body]),
                             b.init, b.alloc_buffers, b.match_buffers, b.annotations)
        return s_tir.SBlockRealize(body.iter_values, body.predicate, block)
    return tirx.SeqStmt(decls + [body])


def _well_formed(func) -> bool:
    """TVM's well-formedness check (every variable defined before use), for scheduled (block) kernels too."""
    import tvm_ffi

    verify = tvm_ffi.get_global_func("s_tir.analysis.VerifyWellFormed", allow_missing=True)
    if verify is None:
        from tvm import tirx

        return bool(tirx.analysis.verify_well_formed(func, assert_mode=False))
    return bool(verify(func, False))


def _subst(expr, vmap: dict):
    """`expr` with its variables replaced by vmap's values; None for an expression kind not handled here.
    (TVM 0.27's Python API has no TIR substitute; shape expressions are small integer arithmetic.)"""
    from tvm import tirx

    if isinstance(expr, (int, tirx.IntImm)):
        return expr
    if isinstance(expr, tirx.Var):
        return vmap.get(expr, expr)
    if isinstance(expr, (tirx.Add, tirx.Sub, tirx.Mul, tirx.FloorDiv, tirx.FloorMod, tirx.Max, tirx.Min)):
        a, b = _subst(expr.a, vmap), _subst(expr.b, vmap)
        return None if a is None or b is None else type(expr)(a, b)
    return None


def fold_view_args():
    """The module pass (see the module docstring). Only functions with dynamic dims are touched."""
    import tvm
    from tvm import relax
    from tvm.relax import PyExprMutator, expr_functor

    @expr_functor.mutator
    class _Fold(PyExprMutator):
        def __init__(self, mod):
            super().__init__(mod)
            self.kernels = {gv: f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
            self.views: dict = {}       # view var -> its root source expression
            self.nulls: set = set()

        def visit_var_binding_(self, binding):
            value = binding.value
            if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op):
                if value.op.name == "relax.null_value":
                    self.nulls.add(binding.var)
                elif value.op.name == "relax.memory.view" and _plain_view(value, self.nulls):
                    src = self.visit_expr(value.args[0])
                    src = self.views.get(src, src)
                    if _tensor_shape(src) is not None and _tensor_shape(binding.var) is not None:
                        self.views[binding.var] = src
            super().visit_var_binding_(binding)

        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.call_tir"):
                return call
            gv, args = call.args[0], call.args[1]
            if len(call.args) != 2 or not isinstance(args, relax.Tuple):
                return call
            func = self.kernels.get(gv)
            if func is None:
                return call
            fields = list(args.fields)
            repl = {}
            for i, a in enumerate(fields):
                src = self.views.get(a) if isinstance(a, relax.Var) else None
                if src is not None:
                    repl[i] = src
            if not repl:
                return call
            out = call.ty_args[0]
            outs = out.fields if isinstance(out, relax.TupleType) else [out]
            out_shapes = [list(o.shape.values) if isinstance(o.shape, relax.ShapeExpr) else None for o in outs]
            rw = _KernelRewrite(func, fields, out_shapes)
            new_func = rw.apply({i: _tensor_shape(s) for i, s in repl.items()})
            if new_func is None:
                return call
            for i, s in repl.items():
                fields[i] = s
            fields += [r for _, r in rw.extra]
            new_gv = self.builder_.add_func(new_func, gv.name_hint)
            return relax.Call(call.op, [new_gv, relax.Tuple(fields)], call.attrs, call.ty_args)

    @tvm.transform.module_pass(opt_level=0, name="GraphoptFoldViewArgs")
    def _pass(mod, ctx):
        from .symbolic import mutate_dynamic_functions

        folded = mutate_dynamic_functions(mod, _Fold(mod))
        return mod if folded is None else relax.transform.DeadCodeElimination()(folded)

    return _pass
