"""profile_kernels: per-kernel timings of a compiled module from an instrumented VM run."""
import pytest
import torch
from torch import nn

import graphopt
from graphopt.backends.tvm.kernel_profile import format_profile, profile_kernels
from graphopt.errors import InputError


@pytest.fixture(scope="module")
def compiled():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5)).eval()
    x = torch.randn(1, 3, 6, 6)
    return graphopt.optimize(model, target="x86", example_inputs=(x,)), x


def test_every_kernel_is_timed_and_shares_sum_to_one(compiled):
    opt, x = compiled
    rows = profile_kernels(opt, x, repeat=2)
    names = [r["name"] for r in rows]
    assert any("conv2d" in n for n in names) and any("matmul" in n or "dense" in n for n in names), names
    assert all(r["ms"] >= 0 and r["calls"] >= 1 for r in rows)
    assert sum(r["share"] for r in rows) == pytest.approx(1.0)
    assert [r["ms"] for r in rows] == sorted((r["ms"] for r in rows), reverse=True)
    assert "conv2d" in format_profile(rows, top=len(rows)) and len(format_profile(rows, top=2).splitlines()) == 3
    torch.testing.assert_close(opt(x), opt.graph_module(x), rtol=1e-4, atol=1e-5)   # the module still works


def test_wrong_inputs_are_input_errors(compiled):
    opt, _ = compiled
    with pytest.raises(InputError, match="shape"):
        profile_kernels(opt, torch.randn(1, 3, 7, 7))
