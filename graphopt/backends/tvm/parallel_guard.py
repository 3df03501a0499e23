"""Serial below a work threshold: a dynamic kernel's parallel loops run serial when the call's work is small.

A schedule for a static shape decides at build time whether a kernel is worth the thread pool (waking it,
splitting the loop, joining: several microseconds on 2 cores); a schedule for a symbolic extent cannot, so
the default rules parallelize any block with a dynamic dimension (schedules._vectorize_symbolic counts each
as a few dozen), and at batch 1 x sequence 16 the small encoder's dynamic build paid the fork/join on some
20 kernels of a few thousand elements each: 1.10-1.12x its static build's time with 2 threads, 1.05x with 1.

`serial_when_small()` (a module pass over scheduled CPU kernels) gives each PrimFunc marked SERIAL_BELOW_ATTR
(by apply_default_schedules from its rule's `serial_below`: Injective; by hand-written kernels that opt in:
the int8 attention's operand packing) that has a parallel loop and a symbolic work count a second,
all-serial copy of its body and picks at run time: the serial copy where the call's work (the number of
innermost statement executions, vector lanes counted, summed over the kernel's loop nests) is below the
marked threshold, the scheduled one otherwise. Injective's is PARALLEL_MIN, the threshold its static
schedules use (schedules._vectorize_inner). A kernel is left alone when its work cannot fall below the
threshold (evaluated with every symbolic size at 1) or cannot be counted (a loop extent that depends on another
loop's variable). Results are bit for bit those of the scheduled kernel: the serial copy runs the same
loops, in order, on one thread (each parallel iteration writes its own outputs; reductions across parallel
iterations are not scheduled by graphopt's rules).
"""
from __future__ import annotations

PARALLEL_MIN = 1 << 14
SERIAL_BELOW_ATTR = "graphopt.serial_below"     # set by apply_default_schedules from the rule's serial_below


def serial_when_small():
    """Module pass (see the module docstring): every PrimFunc marked SERIAL_BELOW_ATTR."""
    import tvm
    from tvm import tirx

    @tvm.transform.module_pass(opt_level=0, name="GraphoptSerialWhenSmall")
    def _pass(mod, ctx):
        updates = {}
        for gv, func in mod.functions_items():
            below = func.attrs.get(SERIAL_BELOW_ATTR) if isinstance(func, tirx.PrimFunc) and func.attrs else None
            if below is not None:
                new = guard_function(func, int(below))
                if new is not None:
                    updates[gv] = new
        if not updates:
            return mod
        mod = mod.clone() if hasattr(mod, "clone") else mod
        for gv, func in updates.items():
            mod[gv] = func
        return mod

    return _pass


def guard_function(func, parallel_min: int = PARALLEL_MIN):
    """`func` with its serial copy behind a run-time work test, or None where it needs none."""
    import tvm_ffi
    from tvm import tirx

    from .schedules import _branch_kernels

    if not _has_parallel(func.body):
        return None
    sizes = _signature_vars(func)
    work = _work(func.body, sizes)
    if work is None:
        return None
    work = tvm_simplify(work)
    if isinstance(work, tirx.IntImm):
        return None                                # a static count: the rules already decided
    ones = {v: tirx.const(1, str(v.ty)) for v in sizes}
    at_one = tvm_simplify(tvm_ffi.structural_map(work, [(tirx.Var, lambda v: ones.get(v, v))]))
    if not isinstance(at_one, tirx.IntImm) or at_one.value >= parallel_min:
        return None                                # never small: always worth the threads
    serial = func.with_body(_serialize(func.body))
    cond = work < tirx.const(parallel_min, str(work.ty))
    if hasattr(func.body, "block"):                 # scheduled from blocks: weight packing stays shared
        return _branch_kernels(func, serial, cond)
    return func.with_body(tirx.IfThenElse(cond, _renewed_body(serial, func), func.body))   # TVMScript kernels


def _renewed_body(func, like):
    """`func`'s body with its own loop variables (none defined twice beside `like`'s), reading `like`'s
    parameters and size variables."""
    import tvm_ffi
    from tvm import s_tir, tirx

    fresh = s_tir.renew_defs(func)
    vmap = {}
    for a, b in zip(fresh.params, like.params):
        vmap[a] = b
        try:
            shapes = zip(a.shape, b.shape)
        except AttributeError:
            continue
        for ea, eb in shapes:
            if isinstance(ea, tirx.Var):
                vmap[ea] = eb
    return tvm_ffi.structural_map(fresh.body, [(tirx.Var, lambda v: vmap.get(v, v))])


def tvm_simplify(expr):
    from tvm.sym.analyzer import Analyzer

    return Analyzer().simplify(expr)


def _signature_vars(func) -> set:
    """The size variables a caller binds: those of the parameters' buffer shapes and scalar parameters."""
    from tvm import tirx

    found = set()
    for p in func.params:               # TVM 0.27: buffers (with shapes) and scalar variables
        try:
            shape = p.shape
        except AttributeError:
            shape = None
        if shape is not None:
            for e in list(shape) + list(getattr(p, "strides", None) or ()):
                found.update(_vars(e))
        elif isinstance(p, tirx.Var) and "int" in str(p.ty):
            found.add(p)
    return {v for v in found if isinstance(v, tirx.Var)}


def _vars(expr) -> list:
    import tvm_ffi
    from tvm import tirx

    out = []

    def seen(v):
        out.append(v)
        return v

    tvm_ffi.structural_map(expr, [(tirx.Var, seen)])
    return out


def _work(stmt, sizes: set):
    """Innermost statements executed by `stmt` (an int64 expression over `sizes`), or None where an extent
    depends on anything else."""
    from tvm import s_tir, tirx

    def count(node):
        if node is None:
            return _const(0)
        if isinstance(node, tirx.For):
            if any(v not in sizes for v in _vars(node.extent)):
                return None
            inner = count(node.body)
            if inner is None:
                return None
            return tirx.Cast("int64", node.extent) * inner
        if isinstance(node, tirx.SeqStmt):
            total = _const(0)
            for s in node.seq:
                c = count(s)
                if c is None:
                    return None
                total = total + c
            return total
        if isinstance(node, tirx.IfThenElse):
            a, b = count(node.then_case), count(node.else_case)
            return None if a is None or b is None else a + b
        if isinstance(node, s_tir.SBlockRealize):
            return count(node.block)
        if isinstance(node, s_tir.SBlock):
            return count(node.body)
        if isinstance(node, tirx.While):
            return None
        if hasattr(node, "body"):                  # LetStmt, AttrStmt, ...
            return count(node.body)
        return _const(1)

    return count(stmt)


def _const(v: int):
    from tvm import tirx

    return tirx.const(v, "int64")


def _has_parallel(stmt) -> bool:
    from tvm import tirx

    import tvm_ffi

    found = []

    def seen(n):
        if n.kind == tirx.ForKind.PARALLEL:
            found.append(n)
        return n

    tvm_ffi.structural_map(stmt, [(tirx.For, seen)])
    return bool(found)


def _serialize(stmt):
    """`stmt` with every parallel loop serial."""
    import tvm_ffi
    from tvm import tirx

    def serial(n):
        if n.kind != tirx.ForKind.PARALLEL:
            return n
        return tirx.For(n.loop_var, n.min, n.extent, tirx.ForKind.SERIAL, n.body, n.thread_binding,
                        n.annotations, n.step)

    return tvm_ffi.structural_map(stmt, [(tirx.For, serial)])
