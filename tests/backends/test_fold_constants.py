"""fold_constant_calls: the kernels evaluated on constants at build time (weight repacking, folded weight
arithmetic) are compiled as one module per round instead of one module each, with the same results."""
from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

import graphopt

pytest.importorskip("tvm")

from graphopt.backends.tvm import fold_constants  # noqa: E402
from tests.helpers import randomize_bn  # noqa: E402


class _Net(nn.Module):
    """Convs with BN (folded weight arithmetic), a residual add, a depthwise conv and a Linear: every kind of
    weight the CPU schedules repack."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16))
        self.c = nn.Conv2d(16, 24, 1)
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        y = self.a(x)
        y = torch.relu(self.b(y) + y)
        return self.fc(self.c(y).mean((2, 3)))


def _codegen_counter(monkeypatch) -> list:
    tb = importlib.import_module("tvm.tirx.build")
    calls, orig = [], tb.codegen_build

    def counted(*a, **k):
        calls.append(1)
        return orig(*a, **k)

    monkeypatch.setattr(tb, "codegen_build", counted)
    return calls


@pytest.mark.parametrize("pipeline", ["", "fold_bn,cleanup"])
def test_folded_constants_equal_foldconstants_and_compile_few_modules(monkeypatch, pipeline):
    torch.manual_seed(0)
    model, x = randomize_bn(_Net()).eval(), torch.randn(2, 3, 12, 12)
    calls = _codegen_counter(monkeypatch)
    ours = graphopt.optimize(model, target="x86:haswell", pipeline=pipeline, example_inputs=(x,))
    ours_modules = len(calls)
    monkeypatch.setattr(fold_constants, "_MAX_ROUNDS", 0)          # FoldConstant alone, one module per kernel
    calls.clear()
    theirs = graphopt.optimize(model, target="x86:haswell", pipeline=pipeline, example_inputs=(x,))
    assert len(calls) > ours_modules + 4, (len(calls), ours_modules)
    assert ours_modules <= 4                       # fold rounds (legalize, finalize) + the model's own library
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))
        torch.testing.assert_close(ours(x), model(x), rtol=1e-4, atol=1e-4)


def test_folding_keeps_nothing_alive_after_the_build():
    """fold_constant_calls leaves no folded constant behind once its module is gone: a chain of two kernels on
    a 32 MB constant (two rounds), folded 4 times, grows the process by far less than one copy. Its visitor and
    mutator classes, made per call and closing over each call's module, bindings and results, kept all of them
    alive for the life of the process (~90 MB per ResNet-18 build; a sweep over torchvision's models in one
    process was OOM-killed at 12 GB)."""
    import gc

    import numpy as np
    import psutil
    import tvm
    from tvm import relax, topi

    n = 8 << 20                                        # 8M float32: 32 MB per constant

    def module():
        bb = relax.BlockBuilder()
        x = relax.Var("x", relax.TensorType((16,), "float32"))
        with bb.function("main", [x]):
            with bb.dataflow():
                c = relax.const(np.full(n, 0.5, "float32"))
                a = bb.emit_te(lambda t: topi.multiply(t, 2.0), c)      # round 1: on the constant
                b = bb.emit_te(lambda t: topi.add(t, 1.0), a)          # round 2: on round 1's result
                head = bb.emit(relax.op.strided_slice(b, [0], [0], [16]))
                out = bb.emit_output(relax.op.add(x, head))
            bb.emit_func_output(out)
        return bb.get()

    def fold_once_more() -> None:
        folded = fold_constants.fold_constant_calls()(module())
        consts = [b.value for f in folded.functions.values() if isinstance(f, relax.Function)
                  for blk in f.body.blocks for b in blk.bindings if isinstance(b.value, tvm.ir.expr.Constant)]
        # both rounds ran: 0.5 * 2 + 1
        assert any(tuple(c.value.shape) == (n,) and float(c.value.numpy()[0]) == 2.0 for c in consts)
        del folded, consts
        gc.collect()

    proc = psutil.Process()
    fold_once_more()                                   # first use: compiler and class set-up
    before = proc.memory_info().rss
    for _ in range(4):
        fold_once_more()
    grown = proc.memory_info().rss - before
    assert grown < 24 << 20, f"the process grew by {grown >> 20} MB over 4 folds of a 32 MB constant"
