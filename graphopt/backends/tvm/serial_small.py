"""Dynamic kernels run on one thread when a call is small.

A kernel over dynamic dims is scheduled once for the whole declared range, so its outer loops run in parallel
whatever the size of a call; a static build leaves a small kernel on one thread (schedules.py: under
PARALLEL_MIN iterations). Waking the thread pool costs about a microsecond per kernel, which at batch 1 x
sequence 8 of the small encoder was ~13% of the dynamic build's time (its transposes, adds, layer norms and
softmaxes: each a few microseconds of work). `serial_when_small` gives each dynamic kernel with parallel
loops a second, serial copy of its body, taken at run time when the call's iterations (the parallel loops'
extents times the loops they hold, a PrimExpr over the dynamic dims) are under PARALLEL_MIN.

Contract: exact. The copy runs the same statements in the same order per iteration; only which thread runs
an iteration changes, and no kernel's result depends on that. Static kernels are left as they are.
"""
from __future__ import annotations

__all__ = ["serial_when_small", "with_serial_branch", "PARALLEL_MIN"]

# Iterations (scalar or vector lanes, as the loops count them) under which one thread is faster; the static
# schedules' threshold for injective kernels (schedules._vectorize_inner). Small encoder, dynamic build, 1 x 8,
# 2 threads: every non-GEMM kernel serial 0.640 -> 0.558 ms (static build 0.565).
PARALLEL_MIN = 1 << 14


def serial_when_small():
    """Module pass: with_serial_branch on every PrimFunc over dynamic dims."""
    import tvm
    from tvm import tirx

    @tvm.transform.module_pass(opt_level=0, name="GraphoptSerialWhenSmall")
    def _pass(mod, ctx):
        updates = {}
        for gv, func in mod.functions_items():
            if isinstance(func, tirx.PrimFunc):
                new = with_serial_branch(func)
                if new is not None:
                    updates[gv] = new
        if not updates:
            return mod
        mod = mod.clone()
        for gv, func in updates.items():
            mod[gv] = func
        return mod

    return _pass


def with_serial_branch(func, threshold: int | None = None):
    """`func` with `if iterations < threshold: <its body, every parallel loop serial> else: <its body>`, or
    None where it has no parallel loop or its iteration count is a constant (a static kernel); threshold
    None: PARALLEL_MIN (0: None, no serial copy)."""
    import tvm_ffi
    from tvm import tirx

    from .schedules import branch_kernels

    import tvm

    threshold = PARALLEL_MIN if threshold is None else threshold
    work = _parallel_work(func.body) if threshold > 0 else None
    if work is None:
        return None
    work = tvm.sym.analyzer.Analyzer().simplify(work)
    if isinstance(work, tirx.IntImm):
        return None
    if _free_vars(work, func):            # an inner extent that depends on an outer loop: not counted here
        return None

    def serial(loop):
        if loop.kind != tirx.ForKind.PARALLEL:
            return loop
        return tirx.For(loop.loop_var, loop.min, loop.extent, tirx.ForKind.SERIAL, loop.body, loop.thread_binding,
                        loop.annotations)

    one_thread = func.with_body(tvm_ffi.structural_map(func.body, [(tirx.For, serial)]))
    return branch_kernels(func, one_thread, work < tirx.IntImm("int64", threshold))


def _parallel_work(stmt):
    """The iterations of the parallel loops in `stmt` that no other parallel loop holds (a PrimExpr), or
    None where there is none."""
    from tvm import tirx

    total, stack = None, [stmt]
    while stack:
        node = stack.pop()
        if node is None:
            continue
        if isinstance(node, tirx.For) and node.kind == tirx.ForKind.PARALLEL:
            n = _iterations(node)
            total = n if total is None else total + n
            continue
        stack.extend(_children(node))
    return total


def _iterations(node):
    """Statements executed under `node` (loops' extents multiplied, sequences and branches added)."""
    from tvm import tirx

    if isinstance(node, tirx.For):
        return _as_int64(node.extent) * _iterations(node.body)
    kids = _children(node)
    if not kids:
        return tirx.IntImm("int64", 1)
    total = _iterations(kids[0])
    for k in kids[1:]:
        total = total + _iterations(k)
    return total


def _children(node) -> list:
    """The statements directly under `node` (SeqStmt items, bodies, branches, a block's init and body)."""
    kids = list(getattr(node, "seq", None) or ())
    for attr in ("block", "init", "body", "then_case", "else_case"):
        child = getattr(node, attr, None)
        if child is not None and not isinstance(child, (int, float, str)) and hasattr(child, "span"):
            kids.append(child)
    return kids


def _as_int64(e):
    from tvm import tirx

    return e if str(e.ty) == "int64" else tirx.Cast("int64", e)


def _free_vars(expr, func) -> bool:
    """Whether `expr` reads a variable the function does not define at its top (a loop or let variable)."""
    from tvm import tirx

    return bool(tirx.analysis.undefined_vars(expr, list(func.params) + _shape_vars(func)))


def _shape_vars(func) -> list:
    from tvm import tirx

    out = []
    for p in func.params:
        for e in getattr(p, "shape", None) or ():
            if isinstance(e, tirx.Var):
                out.append(e)
    return out
