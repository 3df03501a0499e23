"""Serial below a work threshold: a dynamic kernel's parallel loops run serial when the call's work is small.

A schedule for a static shape decides at build time whether a kernel is worth the thread pool (waking it,
splitting the loop, joining: several microseconds on 2 cores); a schedule for a symbolic extent cannot, so
the default rules parallelize any block with a dynamic dimension (schedules._vectorize_symbolic counts each
as a few dozen), and at batch 1 x sequence 16 the small encoder's dynamic build paid the fork/join on some
20 kernels of a few thousand elements each: 1.10-1.12x its static build's time with 2 threads, 1.05x with 1.

`serial_when_small()` (a module pass over scheduled CPU kernels) gives each PrimFunc marked SERIAL_BELOW_ATTR
(by apply_default_schedules from its rule's `serial_below`: Injective and PackedGemm; by hand-written kernels
that opt in: the int8 attention's operand packing) a second, serial copy of each parallel loop nest whose work count is
symbolic, and picks at run time: the serial copy where the call's work in that nest (the number of innermost
statement executions, vector lanes counted) is below the marked threshold, the scheduled nest otherwise (the
copy defines its own loop and block variables). Injective's threshold is PARALLEL_MIN, the one its static
schedules use (schedules._vectorize_inner). A nest is left alone when its work cannot fall below the
threshold (evaluated with every symbolic size at 1) or cannot be counted (a loop extent that depends on
another loop's variable). Results are bit for bit those of the scheduled kernel: the serial copy runs the
same loops, in order, on one thread (each parallel iteration writes its own outputs; reductions across
parallel iterations are not scheduled by graphopt's rules). Not for RowGroups: its static schedules run
row groups in parallel at any size, and serial layer norms at 1 x 16 were slower.
"""
from __future__ import annotations

PARALLEL_MIN = 1 << 14
SERIAL_BELOW_ATTR = "graphopt.serial_below"     # set by apply_default_schedules from the rule's serial_below


def serial_when_small():
    """Module pass (see the module docstring): every PrimFunc marked SERIAL_BELOW_ATTR."""
    from .prim_func_pass import prim_func_pass

    def rewrite(func):
        below = func.attrs.get(SERIAL_BELOW_ATTR) if func.attrs else None
        return None if below is None else guard_function(func, int(below))

    return prim_func_pass("GraphoptSerialWhenSmall", rewrite)


def guard_function(func, parallel_min: int = PARALLEL_MIN):
    """`func` with a serial copy beside each parallel loop nest whose work may fall below `parallel_min`,
    picked at run time; None where no nest needs one."""
    import tvm_ffi
    from tvm import tirx

    sizes = _signature_vars(func)
    ones = {v: tirx.const(1, str(v.ty)) for v in sizes}

    def nest(loop):
        if loop.kind != tirx.ForKind.PARALLEL:
            return loop
        work = _work(loop, sizes)
        if work is None:
            return loop
        work = tvm_simplify(work)
        if isinstance(work, tirx.IntImm):
            return loop                            # a static count: the rules already decided
        at_one = tvm_simplify(tvm_ffi.structural_map(work, [(tirx.Var, lambda v: ones.get(v, v))]))
        if not isinstance(at_one, tirx.IntImm) or at_one.value >= parallel_min:
            return loop                            # never small: always worth the threads
        serial = _fresh_definitions(_serialize(loop))
        return tirx.IfThenElse(work < tirx.const(parallel_min, str(work.ty)), serial, loop)

    body = tvm_ffi.structural_map(func.body, [(tirx.For, nest)])
    return None if body.same_as(func.body) else func.with_body(body)


def _fresh_definitions(stmt):
    """`stmt` with a new variable for each one it defines (loop variables, block iteration variables and
    buffers, let and bind variables, in statements and expressions), so that it can stand beside the original
    in one function; everything defined outside it (parameters, sizes, the root block's buffers) it reads as
    before."""
    import tvm_ffi
    from tvm import s_tir, tirx

    defined = []

    def loop(n):
        defined.append(n.loop_var)
        return n

    def block(n):
        defined.extend(iv.var for iv in n.iter_vars)
        defined.extend(n.alloc_buffers)
        return n

    def let(n):
        defined.append(n.var)
        return n

    tvm_ffi.structural_map(stmt, [(tirx.For, loop), (s_tir.SBlock, block),
                                  ((tirx.LetStmt, tirx.Let, tirx.Bind), let)])     # (Let: numerics' clamps)
    fresh = {v: tirx.Var(v.name, v.ty) for v in defined}
    return tvm_ffi.structural_map(stmt, [(tirx.Var, lambda v: fresh.get(v, v))])


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
    from tvm import tirx

    return list(tirx.analysis.undefined_vars(expr))     # (an expression defines none of its own)


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


def _serialize(stmt):
    """`stmt` with every parallel loop serial."""
    import tvm_ffi
    from tvm import tirx

    return tvm_ffi.structural_map(stmt, [(tirx.For, lambda n: serial_loop(n) if n.kind == tirx.ForKind.PARALLEL
                                          else n)])


def serial_loop(loop):
    """`loop` (a For) as a serial loop: the same variable, range, body and annotations."""
    from tvm import tirx

    return tirx.For(loop.loop_var, loop.min, loop.extent, tirx.ForKind.SERIAL, loop.body, loop.thread_binding,
                    loop.annotations, loop.step)
