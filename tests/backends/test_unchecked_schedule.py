"""unchecked_schedule.schedule: TVM's Schedule minus the Python-side argument type check, same schedules."""
import pytest
import torch
from torch import nn

tvm = pytest.importorskip("tvm")
import tvm_ffi  # noqa: E402
from tvm import s_tir, te  # noqa: E402

from graphopt.backends.tvm import unchecked_schedule  # noqa: E402


def _func():
    a = te.placeholder((64, 64), name="A")
    return te.create_prim_func([a, te.compute((64, 64), lambda i, j: a[i, j] * 2, name="B")])


def test_every_type_checked_method_is_the_function_it_wraps():
    sch = unchecked_schedule.schedule(_func())
    assert isinstance(sch, s_tir.Schedule)
    wrapped = {name: attr for name, attr in vars(s_tir.Schedule).items() if hasattr(attr, "__wrapped__")}
    assert {"__init__", "get_sblock", "get_loops", "split", "reorder", "vectorize", "parallel"} <= set(wrapped)
    for name, attr in wrapped.items():
        assert getattr(type(sch), name) is attr.__wrapped__, name


def test_wrong_argument_types_still_raise_type_errors_from_the_ffi():
    sch = unchecked_schedule.schedule(_func())
    loop = sch.get_loops(sch.get_sblock("B"))[0]
    with pytest.raises(TypeError, match="ScheduleSplit"):
        sch.split(loop, ["x", 8])
    with pytest.raises(TypeError, match="ScheduleVectorize"):
        sch.vectorize(3.5)


def test_default_schedules_are_the_same_with_and_without_the_check(monkeypatch):
    """graphopt's default rules over a small net's kernels (conv, pool, linear, layer norm, softmax) give
    structurally equal scheduled modules whichever class they schedule with."""
    import graphopt
    from graphopt.backends.targets import resolve_target
    from tvm.relax.backend.cpu_generic import pipeline as cpu_pipeline

    from graphopt.backends.tvm import schedules
    from graphopt.backends.tvm.lower import lower_graph

    host = resolve_target("x86")
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 8, 1),
                        nn.Flatten(), nn.Linear(8 * 16 * 16, 10), nn.LayerNorm(10), nn.Softmax(-1)).eval()
    x = torch.randn(2, 3, 32, 32)
    gm = graphopt.optimize(net, "torch", example_inputs=(x,)).graph_module
    mod = lower_graph(gm, (x,), host).mod
    target = host.tvm_target()
    with target:
        passes = (cpu_pipeline.library_dispatch_passes(target) + schedules.relax_layout_passes(target)
                  + schedules.legalize_passes(target))
        legal = tvm.transform.Sequential(passes)(mod)
    unchecked, _ = schedules.apply_default_schedules(legal, target)
    monkeypatch.setattr(unchecked_schedule, "_CLASS", [s_tir.Schedule])
    checked, stats = schedules.apply_default_schedules(legal, target)
    assert "unscheduled" not in stats.summary()
    assert tvm_ffi.structural_equal(unchecked, checked)
