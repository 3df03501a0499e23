"""Parallel loops of at most one iteration run inline, without a thread-pool launch.

Every parallel loop of a CPU kernel becomes one TVMBackendParallelLaunch (wake the pool, split, join: a few
microseconds on 2 cores), whatever its extent, 0 included. TIR's LoopPartition splits a loop marked with
`pragma_loop_partition_hint` into its whole part and a tail; where the partitioned loop is the parallel one
(RowGroups' dynamic row groups at batch 1, schedules.py), the tail becomes a second parallel loop of
`(n % 8 + 7) // 8` iterations, 0 or 1, and each call paid a second launch for at most one group of rows
(the small encoder's dynamic build at batch 1 x sequence 16: 73 launches per forward pass against the static
build's 59, 18 of them the layer norms' where the static kernels have 9; 64 with this pass, and the forward
pass 0.6-2.1% faster in three interleaved runs of the saved builds on a 2-core AVX2 EPYC).

`serial_one_task_loops()` (a TIR pass run after TVM's lowering pipeline, before code generation) makes every
parallel loop whose extent TVM's arithmetic analysis proves <= 1 serial: the same iteration, on the calling
thread. Results are bit for bit those of the parallel loop (one iteration has no other to overlap with).
`TIR_PIPELINE` names TVM's default pipeline with this pass appended, registered by `register()`.
"""
from __future__ import annotations

TIR_PIPELINE = "graphopt_cpu"


def serial_one_task_loops():
    """TIR module pass (see the module docstring)."""
    from .prim_func_pass import prim_func_pass

    return prim_func_pass("GraphoptSerialOneTaskLoops", serialize_one_task_loops)


def serialize_one_task_loops(func):
    """`func` with its parallel loops of at most one iteration serial; None where it has none."""
    import tvm_ffi
    from tvm import tirx
    from tvm.sym.analyzer import Analyzer

    from .parallel_guard import serial_loop

    values: dict = {}                                # let / bind variables (CSE's common subexpressions)

    def define(n):
        if str(n.var.ty).startswith("int"):         # (extents are integers; handles and floats stay out)
            values.setdefault(n.var, []).append(n.value)
        return n

    tvm_ffi.structural_map(func.body, [((tirx.LetStmt, tirx.Let, tirx.Bind), define)])
    analyzer = Analyzer()
    for var, seen in values.items():
        if all(tvm_ffi.structural_equal(v, seen[0]) for v in seen):   # (one value: bound once, or the same)
            analyzer.bind(var, seen[0])

    def loop(n):
        if n.kind != tirx.ForKind.PARALLEL or not analyzer.can_prove(n.extent <= tirx.const(1, str(n.extent.ty))):
            return n
        return serial_loop(n)

    body = tvm_ffi.structural_map(func.body, [(tirx.For, loop)])
    return None if body.same_as(func.body) else func.with_body(body)


def register() -> str:
    """Register TIR_PIPELINE (TVM's default TIR pipeline, then serial_one_task_loops) once; its name."""
    import tvm
    from tvm.tirx import compilation_pipeline

    if TIR_PIPELINE not in compilation_pipeline.PIPELINE_MAP:
        def factory(**kwargs):
            lower, finalize_host, finalize_device = tvm.tirx.get_tir_pipeline("default", **kwargs)
            return tvm.transform.Sequential([lower, serial_one_task_loops()]), finalize_host, finalize_device

        compilation_pipeline.register_tir_pipeline(TIR_PIPELINE, factory)
    return TIR_PIPELINE
