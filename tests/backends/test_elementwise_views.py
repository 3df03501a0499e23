"""elementwise_views.elementwise_before_views: elementwise ops move above reshapes, so GEMM epilogues fuse them."""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import graphopt
from graphopt.testing.opinfo import compare


class _Ffn(nn.Module):
    """A transformer FFN with its residual: Linear -> GELU -> Linear -> + x on (batch, seq, features), which
    torch.export lowers to views around 2-D matmuls."""

    def __init__(self, d=32, f=64):
        super().__init__()
        self.up, self.down = nn.Linear(d, f), nn.Linear(f, d)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


class _HeadBias(nn.Module):
    """A view that splits the last axis, then a bias along the new last axis: moving the add above the view
    would broadcast the bias along the wrong axis, so it must stay."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)
        self.bias = nn.Parameter(torch.randn(4))

    def forward(self, x):
        return torch.relu(self.lin(x).view(x.shape[0], x.shape[1], 4, 4) + self.bias)


def _lowered(model, inputs, dynamic=None):
    from graphopt.backends.targets import resolve_target
    from graphopt.backends.tvm.lower import lower_graph
    from graphopt.capture import capture
    from graphopt.dynamic import parse_dynamic

    spec = parse_dynamic(dynamic, inputs, model) if dynamic else None
    return lower_graph(capture(model, inputs, dynamic=spec).gm, inputs, resolve_target("x86"), spec).mod


def _elementwise_ranks(script: str) -> list[int]:
    """The rank of every elementwise op's result in a Relax script."""
    import re

    ops = ("R.add(", "R.multiply(", "R.erf(", "R.subtract(", "R.nn.relu(")
    return [len(re.search(r"R\.Tensor\(\(([^)]*)\)", line).group(1).split(","))
            for line in script.splitlines() if any(op in line for op in ops)]


DYNAMIC = {"x": {0: "batch", 1: "seq"}, "batch": (1, 4), "seq": (2, 32)}


@pytest.mark.parametrize("dynamic", [None, DYNAMIC])
def test_the_ffn_elementwise_ops_leave_the_views(dynamic):
    from graphopt.backends.tvm.elementwise_views import elementwise_before_views
    from graphopt.backends.tvm.schedules import nhwc_layout_passes

    import tvm

    x = torch.randn(2, 8, 32)
    mod = tvm.transform.Sequential(nhwc_layout_passes())(_lowered(_Ffn().eval(), (x,), dynamic))
    before = mod["main"].script()
    assert 3 in _elementwise_ranks(before), before             # GELU and the residual add on 3-D views
    after = elementwise_before_views()(mod)["main"].script()
    assert set(_elementwise_ranks(after)) == {2}, after         # all on the matmuls' 2-D results
    assert after.count("R.erf(") == 1


@pytest.mark.parametrize("dynamic", [None, DYNAMIC])
def test_gelu_and_residual_fuse_into_the_matmuls(dynamic, monkeypatch):
    """Built: the GELU is in the up-projection's kernel and the residual add in the down-projection's (no
    elementwise kernel of their own), and the values are those of the build without the pass, bit for bit, and
    PyTorch's."""
    import tvm

    from graphopt.backends.tvm import elementwise_views
    from graphopt.backends.tvm.kernel_profile import profile_kernels

    torch.manual_seed(0)
    model = _Ffn().eval()
    x = torch.randn(2, 8, 32)
    kw = {"example_inputs": (x,), "dynamic": dynamic}
    fused = graphopt.optimize(model, "x86", "cleanup", **kw)
    kernels = [r["name"] for r in profile_kernels(fused, x) if not r["name"].startswith("vm.")]
    assert any("matmul" in k and "erf" in k for k in kernels), kernels
    assert any("matmul" in k and k.count("add") >= 2 for k in kernels), kernels
    assert not any("matmul" not in k and ("erf" in k or "add" in k) for k in kernels), kernels
    monkeypatch.setattr(elementwise_views, "elementwise_before_views",
                        lambda: tvm.transform.module_pass(lambda m, c: m, opt_level=0, name="Identity"))
    plain = graphopt.optimize(model, "x86", "cleanup", **kw)
    for shape in ((2, 8), (1, 5), (3, 17)) if dynamic else ((2, 8),):
        xi = torch.randn(*shape, 32)
        with torch.no_grad():
            ref = model(xi)
        assert torch.equal(fused(xi), plain(xi))
        torch.testing.assert_close(fused(xi), ref, rtol=1e-4, atol=1e-5)


def test_a_bias_along_a_split_axis_stays_below_the_view():
    from graphopt.backends.tvm.elementwise_views import elementwise_before_views

    torch.manual_seed(0)
    model = _HeadBias().eval()
    x = torch.randn(2, 3, 16)
    mod = _lowered(model, (x,))
    after = elementwise_before_views()(mod)["main"].script()
    adds = [line for line in after.splitlines() if "R.add(" in line and "R.Tensor((2, 3, 4, 4)" in line]
    assert len(adds) == 1, after                              # the head bias's add, on the 4-D view
    built = graphopt.optimize(model, "x86", "cleanup", example_inputs=(x,))
    with torch.no_grad():
        torch.testing.assert_close(built(x), model(x), rtol=1e-5, atol=1e-6)


_OPS = {
    "gelu": lambda t, o: torch.nn.functional.gelu(t),
    "relu": lambda t, o: torch.relu(t),
    "tanh": lambda t, o: torch.tanh(t),
    "add_same": lambda t, o: t + o,                           # an operand of the output's shape
    "mul_row": lambda t, o: t * o[0, 0],                      # a vector along the last axis
    "sub_scalar": lambda t, o: t - 0.5,
    "mask": lambda t, o: t + o[:, :, :1],                     # (b, s, 1): not a last-axis vector: stays
    "clamp": lambda t, o: torch.clamp(t, -0.5, 0.5),
}


class _Chain(nn.Module):
    def __init__(self, ops, split: bool):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.ops, self.split = ops, split

    def forward(self, x, other):
        y = self.lin(x)
        if self.split:                                        # a view that is not the Linear's own
            y = y.reshape(x.shape[0], x.shape[1] * 2, 4).reshape(x.shape[0], x.shape[1], 8)
        for name in self.ops:
            y = _OPS[name](y, other)
        return y


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(st.sampled_from(sorted(_OPS)), min_size=1, max_size=4), split=st.booleans(),
       special=st.booleans())
def test_random_elementwise_chains_after_views_match_pytorch(ops, split, special):
    """Random chains of elementwise ops (each operand kind the pass moves or leaves) after a Linear's views:
    the compiled model equals PyTorch, with NaN / ±Inf inputs too."""
    torch.manual_seed(0)
    model = _Chain(ops, split).eval()
    x, other = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    if special:
        x[0, 1, 2], x[1, 0, 0], other[0, 0, 3] = float("nan"), float("inf"), float("-inf")
    built = graphopt.optimize(model, "x86", "cleanup", example_inputs=(x, other))
    with torch.no_grad():
        ref = model(x, other)
        # PyTorch's float32 GELU disagrees with itself at +Inf (vectorized NaN, scalar Inf): its float64
        # answer is accepted too, as in test_numerics and opinfo.compare
        alt = copy.deepcopy(model).double()(x.double(), other.double()).float() if "gelu" in ops else None
    assert compare(built(x, other), ref, rtol=1e-5, atol=1e-6, alt=alt) is None
