"""Build-time evaluation of the kernels whose inputs are all constants (weight repacking), compiled together.

After scheduling, every layout-rewritten weight is a `call_tir(repack, [constant])` that Relax's FoldConstant
evaluates at build time. FoldConstant compiles each such kernel as a module of its own: 82 LLVM modules for
ResNet-18, about a quarter of its build. `fold_constant_calls` compiles all of them in one module (for the
host, as FoldConstant does; unoptimized, since each runs once), runs each on its constants and puts the results in place of the calls, repeating
while a folded result (a variable now bound to a constant) makes another call's inputs all constant. What it leaves (calls with several outputs or
symbolic arguments) FoldConstant still folds. The results are those of the same kernels on the same inputs.
"""
from __future__ import annotations

import contextlib
import threading

from tvm import relax

__all__ = ["fold_constant_calls"]

_MAX_ROUNDS = 4


def _out_type(call):
    """The one output type of a call_tir (TVM 0.27 names the annotation ty_args; earlier, sinfo_args)."""
    args = getattr(call, "ty_args", None)
    if args is None:
        args = getattr(call, "sinfo_args", None)
    return args[0] if args is not None and len(args) == 1 else None


def _static_shape(out) -> list[int] | None:
    shape = getattr(out, "shape", None)
    values = getattr(shape, "values", None)
    if getattr(out, "dtype", None) is None or values is None:
        return None
    try:
        return [int(d) for d in values]
    except (TypeError, ValueError):           # a symbolic dim
        return None


def _constant(expr, bound: dict):
    """The Constant `expr` is, directly or through a variable bound to one, else None."""
    import tvm

    if isinstance(expr, tvm.ir.expr.Constant):
        return expr
    value = bound.get(expr)
    return value if isinstance(value, tvm.ir.expr.Constant) else None


def _foldable(call, call_tir_op, mod, bound: dict):
    """The PrimFunc of `call` when it is a call_tir of one static-shaped output on constant arguments (or
    variables bound to constants), else None."""
    from tvm import tirx

    if not isinstance(call, relax.Call) or not call.op.same_as(call_tir_op) or len(call.args) != 2:
        return None
    gv, args = call.args
    if not isinstance(gv, relax.GlobalVar) or not isinstance(args, relax.Tuple):
        return None
    if not args.fields or any(_constant(a, bound) is None for a in args.fields):
        return None
    out = _out_type(call)
    if out is None or _static_shape(out) is None:
        return None
    func = mod[gv]
    return func if isinstance(func, tirx.PrimFunc) else None


def _fold_once(mod):
    """One round: every foldable call evaluated from one compiled module. Returns (module, calls folded)."""
    import tvm

    calls, bound = [], {}
    with _round_data(mod=mod, calls=calls, bound=bound, op=tvm.ir.Op.get("relax.call_tir")):
        for _, func in mod.functions_items():
            if isinstance(func, relax.Function):
                _Collect().visit_expr(func)
    if not calls:
        return mod, 0
    names, funcs = {}, {}
    for call in calls:
        gv = call.args[0]
        if gv.name_hint not in names:
            name = f"graphopt_fold_{len(names)}"
            names[gv.name_hint] = name
            funcs[name] = mod[gv].with_attr("global_symbol", name)
    # LLVM without optimization: these kernels run once, on the weights (layout transforms, elementwise
    # arithmetic; memory-bound), and compile 8x faster (ResNet-18: 0.43 -> 0.05 s; the run stays 0.05 s)
    # and without TVM's argument checks: the calls below pass the constants and outputs the calls' types give
    from .build import _pass_config

    with _pass_config({"tirx.disable_assert": True}):
        lib = tvm.compile(tvm.IRModule(funcs), target=tvm.target.Target({"kind": "llvm", "opt-level": 0})).jit()
    fns = {name: lib.get_function(name) for name in funcs}
    dev = tvm.cpu(0)
    results = {}
    for call in calls:
        out = _out_type(call)
        y = tvm.runtime.empty(_static_shape(out), out.dtype, dev)
        fns[names[call.args[0].name_hint]](*[_constant(a, bound).value for a in call.args[1].fields], y)
        results[call] = relax.const(y)

    # a new module (the pass's input stays as it was: IRModule item assignment changes a module in place)
    out_mod = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs, global_infos=mod.global_infos)
    with _round_data(folded=results):
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                out_mod[gv] = _Replace(out_mod).visit_expr(func)
    return out_mod, len(calls)


# The visitor that finds the foldable calls and the mutator that puts each folded constant in its place are
# defined once, and reach the round's module, bindings and results through a per-thread dict (_state()), emptied
# after each use. Classes made per call (closing over that call's data) were never freed, with what they closed
# over (the TVM object behind a derived visitor refers back to its Python methods): the module's weights and each
# round's folded constants, ~45 MB per round for ResNet-18, so a process building many models grew by ~90 MB per
# ResNet-18 build (the slow torchvision sweep's worker reached 12 GB, OOM-killed).
_LOCAL = threading.local()


def _state() -> dict:
    """This thread's fold data (threads building at once each have their own)."""
    return _LOCAL.__dict__


@contextlib.contextmanager
def _round_data(**data):
    """`data` in this thread's _state() for the visitor / mutator, emptied afterwards whatever happens."""
    _state().update(data)
    try:
        yield
    finally:
        _state().clear()


@relax.expr_functor.visitor
class _Collect(relax.PyExprVisitor):
    def visit_var_binding_(self, binding):
        _state()["bound"][binding.var] = binding.value
        super().visit_var_binding_(binding)

    def visit_call_(self, call):
        state = _state()
        if _foldable(call, state["op"], state["mod"], state["bound"]) is not None:
            state["calls"].append(call)
        super().visit_call_(call)


@relax.expr_functor.mutator
class _Replace(relax.PyExprMutator):
    def visit_call_(self, call):
        folded = _state()["folded"]
        if call in folded:
            return folded[call]
        return super().visit_call_(call)


def fold_constant_calls():
    """Module pass: fold_constant_calls over the Relax functions of a module (see the module docstring)."""
    import tvm

    @tvm.transform.module_pass(opt_level=0, name="GraphoptFoldConstantCalls")
    def _pass(mod, ctx):
        for _ in range(_MAX_ROUNDS):
            mod, n = _fold_once(mod)
            if not n:
                break
        return mod

    return _pass
