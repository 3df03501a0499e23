"""one_task_loops: parallel loops of at most one iteration run on the calling thread (no thread-pool launch)."""
from __future__ import annotations

import numpy as np
import tvm
import tvm_ffi
from tvm import te, tirx, topi

from graphopt.backends.tvm import schedules
from graphopt.backends.tvm.one_task_loops import TIR_PIPELINE, register, serialize_one_task_loops

TARGET = {"kind": "llvm", "mcpu": "haswell", "num-cores": 2}


def _loops(extent_of):
    """A PrimFunc writing y[i] = 1 for i < extent_of(n), under one parallel loop."""
    n = tirx.Var("n", "int64")
    y = tirx.decl_buffer((n,), "float32", name="y")
    i = tirx.Var("i", "int64")
    body = tirx.For(i, tirx.const(0, "int64"), extent_of(n), tirx.ForKind.PARALLEL,
                    tirx.BufferStore(y, tirx.const(1.0, "float32"), [i]))
    return tirx.PrimFunc([y], body)


def _kinds(func):
    kinds = []

    def seen(loop):
        kinds.append(loop.kind)
        return loop

    tvm_ffi.structural_map(func.body, [(tirx.For, seen)])
    return kinds


def test_a_loop_of_at_most_one_iteration_runs_serial():
    eight = tirx.const(8, "int64")
    tail = _loops(lambda n: tirx.floordiv(tirx.floormod(n, eight) + tirx.const(7, "int64"), eight))
    assert _kinds(serialize_one_task_loops(tail)) == [tirx.ForKind.SERIAL]   # LoopPartition's tail: 0 or 1
    one = _loops(lambda n: tirx.const(1, "int64"))
    assert _kinds(serialize_one_task_loops(one)) == [tirx.ForKind.SERIAL]


def test_loops_that_may_have_two_iterations_stay_parallel():
    eight = tirx.const(8, "int64")
    nine = tirx.const(9, "int64")
    for extent in (lambda n: tirx.floordiv(n, eight), lambda n: tirx.floordiv(tirx.floormod(n, eight) + nine, eight),
                   lambda n: n):
        assert serialize_one_task_loops(_loops(extent)) is None


def test_an_extent_named_by_a_let_is_read_through_it():
    """After TVM's common subexpression elimination an extent is a variable bound by a let."""
    n = tirx.Var("n", "int64")
    y = tirx.decl_buffer((n,), "float32", name="y")
    i, cse = tirx.Var("i", "int64"), tirx.Var("cse_v1", "int64")
    eight = tirx.const(8, "int64")
    value = tirx.floordiv(tirx.floormod(n, eight) + tirx.const(7, "int64"), eight)
    loop = tirx.For(i, tirx.const(0, "int64"), cse, tirx.ForKind.PARALLEL,
                    tirx.BufferStore(y, tirx.const(1.0, "float32"), [i]))
    func = tirx.PrimFunc([y], tirx.SeqStmt([tirx.Bind(cse, value), loop]))     # (TVM 0.27: a Bind statement)
    assert _kinds(serialize_one_task_loops(func)) == [tirx.ForKind.SERIAL]


def _layer_norm_rows():
    """A layer norm over (1, n, 40), n symbolic, scheduled by RowGroups: row groups in parallel, the last,
    guarded group split off by LoopPartition (a second parallel loop of 0 or 1 groups)."""
    n = tirx.Var("n", "int64")
    x = te.placeholder((1, n, 40), name="x")
    g, b = te.placeholder((40,), name="g"), te.placeholder((40,), name="b")
    func = te.create_prim_func([x, g, b, topi.nn.layer_norm(x, g, b, axis=[-1], epsilon=1e-5)])
    sch = schedules.RowGroups()._apply(func, tvm.target.Target(TARGET))
    assert sch is not None
    return tvm.IRModule({"main": sch.mod["main"].with_attr("global_symbol", "main")})


def _launch_sites(lib) -> int:
    return sum(1 for line in lib.inspect_source("ll").splitlines()
               if "@__TVMBackendParallelLaunch" in line and "load" in line)


def test_the_partitioned_tail_of_a_parallel_row_loop_needs_no_launch():
    mod = _layer_norm_rows()
    target = tvm.target.Target(TARGET)
    plain = tvm.tirx.build(mod, target=target)
    ours = tvm.tirx.build(mod, target=target, pipeline=register())
    assert register() == TIR_PIPELINE                       # registered once, the same name each time
    assert (_launch_sites(plain), _launch_sites(ours)) == (2, 1)
    rng = np.random.default_rng(0)
    g, b = (rng.standard_normal(40).astype("float32") for _ in range(2))
    for n in (1, 5, 8, 13, 16, 27):                         # tails of 1, 5, 0, 5, 0 and 3 rows
        x = rng.standard_normal((1, n, 40)).astype("float32") * 4
        x[0, n - 1, 3] = np.inf
        x[0, n // 2, 0] = np.nan
        outs = []
        for lib in (plain, ours):
            out = tvm.runtime.tensor(np.zeros((1, n, 40), "float32"))
            lib["main"](*(tvm.runtime.tensor(a) for a in (x, g, b)), out)
            outs.append(out.numpy())
        np.testing.assert_array_equal(outs[0], outs[1])


def test_the_model_build_uses_the_pipeline(monkeypatch):
    """A dynamic layer norm through graphopt.optimize: one launch site fewer than TVM's own pipeline gives
    (the row groups' tail at batch 1), the same values as PyTorch at batch 1 and 2."""
    import torch

    import graphopt
    from graphopt.backends.tvm import one_task_loops

    model = torch.nn.LayerNorm(40).eval()
    x = torch.randn(2, 16, 40)

    def build():
        opt = graphopt.optimize(model, "x86:haswell", "cleanup", example_inputs=(x,),
                                dynamic={"batch": (1, 8), "seq": (1, 64)})
        for shape in ((1, 13), (2, 16), (3, 5)):
            y = torch.randn(*shape, 40)
            y[0, 0, 0] = float("nan")
            torch.testing.assert_close(opt(y), model(y), rtol=1e-5, atol=1e-5, equal_nan=True)
        return _launch_sites(opt.compiled.executable.mod.imports[0])

    ours = build()
    monkeypatch.setattr(one_task_loops, "register", lambda: "default")      # TVM's pipeline alone
    assert build() == ours + 1
