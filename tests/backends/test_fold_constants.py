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
