"""Symbolic (dynamic) shapes through TVM's ExportedProgram importer.

TVM's importer turns each torch SymInt of an input shape into a TIR int64 variable and the export's range
constraints into `tir_var_lower_bound` / `tir_var_upper_bound` (memory planning plans for the upper bound).
Its own shape inference is weaker than torch's: `narrow(1, 0, seq)` of a 512-row table becomes
`min(seq, 512)` (torch knows seq <= 512 from the bounds), and an elementwise op between `seq` and
`min(seq, 512)` then has an unknown shape, which later passes (FastMathTransform's emit_te, LegalizeOps)
refuse. `symbolic_importer()` returns an importer whose every converted node is checked against torch's
symbolic shape for that node (node.meta["val"]): where TVM's shape is unknown or not provably the same, a
`R.match_cast` to torch's shape is emitted (a run-time check TVM keeps; torch has already proved it).
"""
from __future__ import annotations

from typing import Any

__all__ = ["symbolic_importer", "sympy_to_tir", "shape_names"]


def sympy_to_tir(expr: Any, variables: dict[str, Any]):
    """A TIR int64 expression for a torch/sympy size expression over `variables` ({symbol name: tir.Var});
    None when it uses something without a TIR equivalent here."""
    import sympy
    from tvm import tirx

    if isinstance(expr, (int,)) or isinstance(expr, sympy.Integer):
        return tirx.IntImm("int64", int(expr))
    if isinstance(expr, sympy.Symbol):
        return variables.get(str(expr))
    args = [sympy_to_tir(a, variables) for a in expr.args]
    if any(a is None for a in args):
        return None
    name = type(expr).__name__
    if isinstance(expr, sympy.Add):
        out = args[0]
        for a in args[1:]:
            out = out + a
        return out
    if isinstance(expr, sympy.Mul):
        out = args[0]
        for a in args[1:]:
            out = out * a
        return out
    if name in ("FloorDiv", "floordiv") and len(args) == 2:
        return tirx.floordiv(args[0], args[1])
    if name in ("CeilDiv", "CleanDiv", "IntTrueDiv") and len(args) == 2:
        return tirx.floordiv(args[0] + args[1] - 1, args[1]) if name == "CeilDiv" else tirx.floordiv(*args)
    if name in ("Mod", "PythonMod") and len(args) == 2:
        return tirx.floormod(args[0], args[1])
    if name in ("Min",):
        out = args[0]
        for a in args[1:]:
            out = tirx.min(out, a)
        return out
    if name in ("Max",):
        out = args[0]
        for a in args[1:]:
            out = tirx.max(out, a)
        return out
    return None


def shape_names(ep, dynamic) -> dict[str, str]:
    """{torch symbol name: dim name} for the user inputs' dynamic dims of an ExportedProgram."""
    import torch

    names: dict[str, str] = {}
    user = list(ep.graph_signature.user_inputs)
    for node in ep.graph.nodes:
        if node.op != "placeholder" or node.name not in user:
            continue
        i = user.index(node.name)
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        for a, s in enumerate(val.shape):
            if isinstance(s, torch.SymInt):
                dim = dynamic.dim_of(i, a) if dynamic is not None else None
                names.setdefault(str(s.node.expr), dim or str(s.node.expr))
    return names


def symbolic_importer():
    """An ExportedProgramImporter that keeps torch's symbolic shapes (see the module docstring)."""
    import torch
    from tvm import relax
    from tvm.sym.analyzer import Analyzer
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    class SymbolicShapeImporter(ExportedProgramImporter):
        def create_input_vars(self, exported_program):
            params, user_inputs, ranges = super().create_input_vars(exported_program)
            self._symvars = {}
            for var in user_inputs.values():
                shape = getattr(var.ty, "shape", None)
                for s in getattr(shape, "values", []) or []:
                    if hasattr(s, "name") and not hasattr(s, "value"):
                        self._symvars[s.name] = s
            self._analyzer = Analyzer()
            return params, user_inputs, ranges

        def update_convert_map(self, custom_convert_map):
            super().update_convert_map(custom_convert_map)

        def _translate_fx_graph(self, graph_module, nodes, inputs_vars, custom_ops=None):
            original = self.convert_map
            wrapped = {}
            for key, fn in original.items():
                wrapped[key] = self._wrap(fn)
            self.convert_map = wrapped
            try:
                return super()._translate_fx_graph(graph_module, nodes, inputs_vars, custom_ops)
            finally:
                self.convert_map = original

        def _wrap(self, fn):
            def convert(node, *rest):
                out = fn(node, *rest)
                try:
                    return self._match_torch_shape(node, out)
                except Exception:             # never let the shape refinement break an import
                    return out
            return convert

        def _match_torch_shape(self, node, out):
            if not getattr(self, "_symvars", None) or not isinstance(out, relax.Expr):
                return out
            val = node.meta.get("val")
            if not isinstance(val, torch.Tensor) or not any(isinstance(s, torch.SymInt) for s in val.shape):
                return out
            sinfo = out.ty
            if not isinstance(sinfo, relax.TensorType):
                return out
            want = []
            for s in val.shape:
                if isinstance(s, torch.SymInt):
                    e = sympy_to_tir(s.node.expr, self._symvars)
                    if e is None:
                        return out
                    want.append(e)
                else:
                    want.append(int(s))
            have = getattr(sinfo.shape, "values", None) if sinfo.shape is not None else None
            if have is not None and len(have) == len(want) and all(
                    self._analyzer.can_prove_equal(h, w) for h, w in zip(have, want)):
                return out
            if sinfo.ndim not in (-1, len(want)):
                return out
            sliced = self._inbound_slice(out, want)
            if sliced is not None:
                return sliced
            return self.block_builder.match_cast(out, relax.TensorType(want, sinfo.dtype))

        def _inbound_slice(self, out, want):
            """A strided_slice whose end torch proved in bounds (narrow(1, 0, seq) of a 512-row buffer with
            seq <= 512): the same slice with assume_inbound, whose shape is then exactly torch's (a match_cast
            of TVM's clipped `min(seq, 512)` shape crashed FuseTIR in TVM 0.27)."""
            import tvm

            try:
                call = self.block_builder.lookup_binding(out)
            except Exception:
                return None
            if not (isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op)
                    and call.op.name == "relax.strided_slice" and len(call.args) >= 4):
                return None
            if call.attrs is not None and bool(getattr(call.attrs, "assume_inbound", False)):
                return None
            strides = call.args[4] if len(call.args) > 4 else None
            new = self.block_builder.emit(relax.op.strided_slice(call.args[0], call.args[1], call.args[2],
                                                                 call.args[3], strides, assume_inbound=True))
            have = getattr(new.ty.shape, "values", None) if new.ty.shape is not None else None
            if have is not None and len(have) == len(want) and all(
                    self._analyzer.can_prove_equal(h, w) for h, w in zip(have, want)):
                return new
            return None

    return SymbolicShapeImporter()


def reshape_views():
    """Relax pass: in functions with dynamic dims, `R.reshape` of a tensor becomes `R.memory.view` (same
    bytes, new shape: no copy). With static shapes TVM already turns reshape kernels into views
    (RewriteDataflowReshape); its pattern check fails on the symbolic index arithmetic of a dynamic reshape,
    which then stays a copy kernel that also keeps its neighbours from fusing. Values are unchanged."""
    import tvm
    from tvm import relax
    from tvm.relax import PyExprMutator, expr_functor

    @expr_functor.mutator
    class _Views(PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.reshape" and len(call.args) == 2
                    and isinstance(call.args[0].ty, relax.TensorType)):
                shape = call.ty.shape if isinstance(call.ty, relax.TensorType) else None
                if shape is not None:
                    return relax.op.memory.view(call.args[0], shape)
            return call

    @tvm.transform.module_pass(opt_level=0, name="GraphoptDynamicReshapeViews")
    def _pass(mod, ctx):
        return mutate_dynamic_functions(mod, _Views(mod)) or mod

    return _pass


def mutate_dynamic_functions(mod, mutator):
    """The module with `mutator` (a relax PyExprMutator over `mod`) applied to every Relax function with
    dynamic dims (a `tir_var_upper_bound` attribute); None when there is none."""
    from tvm import relax

    changed = False
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function) and func.attrs is not None and "tir_var_upper_bound" in func.attrs:
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
            changed = True
    return mutator.builder_.get() if changed else None
