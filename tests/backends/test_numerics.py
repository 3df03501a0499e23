"""PyTorch's floating-point semantics through the TVM backend (graphopt/backends/tvm/numerics.py, issue 21).

Every check compares the compiled module with eager PyTorch on inputs holding NaN, +-Inf, -0.0 and values near
float32's limits: same NaN positions, same infinities, finite values within float32 rounding
(graphopt.testing.opinfo.compare). Ops are batched into few compiled modules: builds dominate the time.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphopt
from graphopt.errors import LoweringError
from graphopt.testing.opinfo import compare
from tests.helpers import specials

tvm = pytest.importorskip("tvm")

NAN, INF = float("nan"), float("inf")


class _ElementwiseOps(nn.Module):
    """One output per op whose NaN/Inf handling issue 21 found wrong (relu/clamp/maximum/minimum/erf/floor
    division), plus the NaN-propagating reductions and pooling built on the same max/min."""

    names = ("relu", "clamp", "clamp_min", "clamp_tensor", "relu6", "hardtanh", "maximum", "minimum", "erf",
             "gelu", "floor_divide", "floor_divide_scalar", "max_all", "min_all", "amax", "amin", "max_pool2d", "softmax")

    def forward(self, x, y):
        img = x.reshape(4, 4, 8, 16)
        return (torch.relu(x), torch.clamp(x, -1.0, 1.0), torch.clamp(x, min=0.0), torch.clamp(x, min=y),
                F.relu6(x), F.hardtanh(x), torch.maximum(x, y), torch.minimum(x, y), torch.erf(x), F.gelu(x),
                torch.div(x, y, rounding_mode="floor"), torch.div(x, -2.5, rounding_mode="floor"), x.max(),
                y.min(), x.amax(1), y.amin(0, keepdim=True), F.max_pool2d(img, 3, 2, 1),
                torch.softmax(x, dim=1))


@pytest.fixture(scope="module")
def elementwise():
    model = _ElementwiseOps().eval()
    x, y = specials((32, 64), seed=1), specials((32, 64), seed=2)
    opt = graphopt.optimize(model, target="x86", pipeline="", example_inputs=(x, y))
    with torch.no_grad():
        ref = model(x, y)
        # PyTorch's GELU disagrees with itself at the limits (vectorized: gelu(inf) = NaN, gelu(3e38) = inf;
        # scalar: inf, 3e38): the float64 answer, rounded, is accepted too for it (as in opinfo.compare)
        alt = [None] * len(ref)
        alt[_ElementwiseOps.names.index("gelu")] = F.gelu(x.double()).float()
    return dict(zip(_ElementwiseOps.names, zip(opt(x, y), ref, alt)))


@pytest.mark.parametrize("name", _ElementwiseOps.names)
def test_nan_and_inf_propagate_as_in_pytorch(elementwise, name):
    got, ref, alt = elementwise[name]
    assert compare(got, ref, alt=alt) is None, f"{name}: {compare(got, ref, alt=alt)}"


def test_clamps_against_constants_keep_pytorchs_signed_zero_and_nan():
    """relu/relu6/clamp/hardtanh against constant bounds are PyTorch's `C > x ? C : x`: relu(-0.0) is -0.0,
    a NaN stays NaN, and variable-vs-variable max/min still propagate NaN from either side."""
    class Clamps(nn.Module):
        def forward(self, x, y):
            return torch.relu(x), F.relu6(x), torch.clamp(x, -0.0, 0.0), F.hardtanh(x), torch.maximum(x, y)

    x = torch.tensor([-0.0, 0.0, NAN, -1.0, 7.0, INF, -INF, 0.5] * 8)
    y = torch.tensor([0.0, -0.0, 1.0, NAN, -0.0, NAN, 2.0, -INF] * 8)
    model = Clamps().eval()
    opt = graphopt.optimize(model, target="x86", pipeline="", example_inputs=(x, y))
    outs, refs = opt(x, y), model(x, y)
    for got, ref in zip(outs, refs):
        assert compare(got, ref) is None
    for got, ref in zip(outs[:4], refs[:4]):        # maximum(0.0, -0.0): PyTorch returns either zero
        finite = ~ref.isnan()
        assert torch.equal(torch.signbit(got[finite]), torch.signbit(ref[finite]))


def test_relu_of_nan_is_nan_in_a_linear_relu_linear_net():
    """The issue's first report: a NaN input came out as ordinary numbers."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    x = torch.randn(3, 16)
    opt = graphopt.optimize(model, target="x86", example_inputs=(x,))
    x[1, 5] = NAN
    out = opt(x)
    with torch.no_grad():
        ref = model(x)
    assert torch.isnan(ref[1]).all() and torch.isnan(out[1]).all()
    assert compare(out, ref) is None


def test_floor_division_edges_follow_pytorch():
    """PyTorch's div_floor_floating: fmod-based, so -inf // 2 is NaN, 3e38 // -inf is -1, 0 // -3 is -0."""

    class FloorDiv(nn.Module):
        def forward(self, a, b):
            return torch.div(a, b, rounding_mode="floor")

    a = torch.tensor([-INF, INF, 3e38, -3e38, 0.0, -0.0, 7.0, -7.0, 7.0, 5.0, NAN, 1.0, 0.0, 1e-40, 9.0, -1.0])
    b = torch.tensor([2.0, -2.0, -INF, INF, -3.0, 3.0, 2.0, 2.0, -2.0, 0.0, 1.0, NAN, 0.0, 3.0, 3.0, -0.0])
    opt = graphopt.optimize(FloorDiv(), target="x86", pipeline="", example_inputs=(a, b))
    out, ref = opt(a, b), FloorDiv()(a, b)
    assert compare(out, ref) is None, compare(out, ref)
    assert torch.equal(torch.signbit(out[4:6]), torch.signbit(ref[4:6]))      # signed zeros too


class _AvgPools(nn.Module):
    configs = (
        dict(kernel_size=2, stride=2, divisor_override=3),
        dict(kernel_size=3, stride=1, padding=1, ceil_mode=True, count_include_pad=False, divisor_override=2),
        dict(kernel_size=(4, 4), stride=(2, 3), padding=1, ceil_mode=True, divisor_override=5),
        dict(kernel_size=3, stride=2, padding=1, ceil_mode=True, count_include_pad=True),
        dict(kernel_size=3, stride=2, padding=1, ceil_mode=True, count_include_pad=False),
        dict(kernel_size=(6, 6), stride=(3, 3), padding=(2, 3), ceil_mode=True),
        dict(kernel_size=3, stride=2, padding=1),
    )

    def forward(self, x):
        return tuple(F.avg_pool2d(x, **c) for c in self.configs) + (
            F.max_pool2d(x, 3, 2, 1, ceil_mode=True), F.max_pool2d(x, 2, 2, ceil_mode=True),
            F.max_pool2d(x, 4, 3, ceil_mode=True), F.max_pool2d(x[0], (3, 2), (2, 3), (1, 1), ceil_mode=True))


def test_pooling_divisor_override_and_ceil_mode_match_pytorch():
    """avg_pool2d's divisor_override was ignored (max |d| 14-20); ceil_mode's partial edge windows and their
    divisors follow PyTorch's rules (a last window starting in the right padding is dropped)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 10)
    model = _AvgPools().eval()
    opt = graphopt.optimize(model, target="x86", pipeline="", example_inputs=(x,))
    for i, (got, ref) in enumerate(zip(opt(x), model(x))):
        assert compare(got, ref) is None, f"output {i}: {compare(got, ref)}"


def test_max_pool2d_return_indices_is_a_lowering_error_naming_the_op_and_argument():
    class WithIndices(nn.Module):
        def forward(self, x):
            values, indices = F.max_pool2d(x, 3, 2, 1, ceil_mode=True, return_indices=True)
            return values, indices

    with pytest.raises(LoweringError, match=r"max_pool2d_with_indices.*return_indices.*fx node"):
        graphopt.optimize(WithIndices(), target="x86", pipeline="", example_inputs=(torch.randn(1, 2, 8, 8),))


def test_max_pool2d_without_the_indices_still_compiles():
    """max_pool2d exports as max_pool2d_with_indices + getitem(0): only a used indices output is refused."""
    x = torch.randn(1, 2, 9, 9)
    model = nn.MaxPool2d(3, 2, ceil_mode=True).eval()
    opt = graphopt.optimize(model, target="x86", pipeline="", example_inputs=(x,))
    assert compare(opt(x), model(x)) is None


def test_zero_size_inputs_compute_what_pytorch_computes():
    """An mm with a zero-size inner dimension stopped at the first call with TVM's bare ValueError ('expected
    to be compact array': torch gives a (5, 0) tensor strides (1, 1)); PyTorch returns zeros."""

    class Empty(nn.Module):
        def forward(self, a, b, c):
            return torch.mm(a, b) + 1, F.linear(a, b.t()), torch.relu(c), c.sum(0)

    args = (torch.randn(5, 0), torch.randn(0, 10), torch.randn(0, 4))
    opt = graphopt.optimize(Empty(), target="x86", pipeline="", example_inputs=args)
    for got, ref in zip(opt(*args), Empty()(*args)):
        assert compare(got, ref) is None


class _ConvLayerNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.LayerNorm([8, 8, 8])

    def forward(self, x):
        return self.norm(self.conv(x))


@pytest.mark.parametrize("scale", [1.0, 1e37, 3e38])
def test_conv_layer_norm_near_float32_limits_matches_pytorch(scale):
    """Near float32's range PyTorch's LayerNorm returns NaN (its float32 moments overflow: inf - inf); the
    compiled net returned finite values. Ordinary inputs stay exact."""
    torch.manual_seed(0)
    model = _ConvLayerNorm().eval()
    x = torch.randn(2, 3, 8, 8)
    opt = graphopt.optimize(model, target="x86", pipeline="", example_inputs=(x,))
    big = (torch.randn(2, 3, 8, 8) * scale).clamp(-3.4e38, 3.4e38)
    with torch.no_grad():
        ref = model(big)
    assert compare(opt(big), ref) is None, compare(opt(big), ref)
    if scale >= 1e37:
        assert torch.isnan(ref).all()


def test_integer_min_max_are_left_alone():
    """The NaN rewrite touches float min/max only: int arithmetic (clamp of indices, int tensors) is exact."""

    class IntOps(nn.Module):
        def forward(self, a, b):
            return torch.maximum(a, b), torch.clamp(a, -3, 4), torch.relu(a)

    a, b = torch.randint(-9, 9, (4, 33), dtype=torch.int32), torch.randint(-9, 9, (4, 33), dtype=torch.int32)
    opt = graphopt.optimize(IntOps(), target="x86", pipeline="", example_inputs=(a, b))
    for got, ref in zip(opt(a, b), IntOps()(a, b)):
        assert torch.equal(got, ref)


def test_training_mode_batch_norm_statistics_near_float32_limits_match_pytorch():
    """sum(x) / n overflowed on +-3e38 inputs (whole channels NaN) where PyTorch's batch mean stays finite."""

    class TrainBN(nn.Module):
        def forward(self, x, w, b):
            return F.batch_norm(x, torch.zeros(5), torch.ones(5), w, b, training=True, momentum=0.5, eps=0.6)

    torch.manual_seed(0)
    x, w, b = torch.randn(4, 5, 6), torch.randn(5), torch.randn(5)
    opt = graphopt.optimize(TrainBN(), target="x86", pipeline="", example_inputs=(x, w, b))
    edge = x.clone()
    edge.view(-1)[::5] = 3e38
    edge.view(-1)[2::5] = -3e38
    for inp in (x, edge):
        assert compare(opt(inp, w, b), TrainBN()(inp, w, b)) is None


def test_nested_min_max_keep_nan_and_do_not_grow_the_kernel():
    """A fused conv + mish kernel held 703 float min/max (fast_exp/fast_tanh clamps); a select-based NaN
    rewrite repeated operands, grew geometrically and had to leave such kernels unrewritten (NaN dropped).
    llvm.maximum/minimum keep each operand once: the whole fused kernel is rewritten and NaN/Inf inputs give
    PyTorch's NaN positions."""
    import tvm
    import tvm_ffi
    from tvm import te, tirx

    from graphopt.backends.tvm.numerics import nan_propagating_minmax

    def nested(depth):                                # `depth` nested clamps: 2 * depth min/max
        a = te.placeholder((16,), name="a")
        deep = a[0]
        for k in range(depth):
            deep = tirx.min(tirx.max(deep * 1.5, tirx.const(-k, "float32")), tirx.const(k + 6.0, "float32"))
        b = te.compute((16,), lambda i: deep + a[i], name="b")
        return tvm.IRModule({"deep": te.create_prim_func([a, b])})

    sizes = {}
    for depth in (20, 40):
        out = nan_propagating_minmax()(nested(depth))["deep"]
        n = [0]
        count_float = lambda e: (n.__setitem__(0, n[0] + (str(e.ty.dtype) == "float32")), e)[1]  # noqa: E731
        tvm_ffi.structural_map(out, [((tirx.Max, tirx.Min), count_float)])
        # constant bounds: PyTorch's `C > x ? C : x` with x bound once (a Let)
        assert n[0] == 0 and "clamped" in out.script()
        sizes[depth] = len(out.script())
    assert sizes[40] < 2.2 * sizes[20]              # grows linearly with the nesting, not geometrically

    class ConvMish(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)

        def forward(self, x):
            return F.mish(self.conv(x)).clamp(-1, 5)

    torch.manual_seed(0)
    model = ConvMish().eval()
    x = torch.randn(1, 3, 12, 12)
    opt = graphopt.optimize(model, target="x86", pipeline="", example_inputs=(x,))
    x[0, 0, 3, 3], x[0, 1, 5, 5], x[0, 2, 7, 7] = float("nan"), float("inf"), -float("inf")
    with torch.no_grad():
        ref = model(x)
    assert torch.isnan(ref).any() and compare(opt(x), ref) is None, compare(opt(x), ref)


class _Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


@pytest.mark.parametrize("fn, shape, match", [
    (lambda x: torch.native_layer_norm(x, [4], None, None, 1e-5)[1], (2, 3, 4), r"native_layer_norm.*output 1 \(mean\)"),
    (lambda x: F.avg_pool3d(x, 2, divisor_override=3), (1, 2, 4, 4, 4), r"avg_pool3d.*divisor_override=3"),
    (lambda x: F.interpolate(x, size=(3, 3), mode="bilinear", antialias=True), (1, 2, 8, 8),
     r"upsample_bilinear2d_aa.*antialias=True"),
    (lambda x: F.max_pool3d(x, 2, return_indices=True)[1].float(), (1, 2, 4, 4, 4), r"max_pool3d.*output 1 \(indices\)"),
    (lambda x: torch.masked_select(x, x > 0), (3, 4), r"masked_select.*data-dependent shape"),
    (lambda x: torch.max(x, dim=1), (3, 4), r"output structure.*return_types\.max"),
], ids=["native_layer_norm-mean", "avg_pool3d-divisor_override", "bilinear-antialias", "max_pool3d-indices",
        "masked_select", "max-structseq"])
def test_what_the_backend_cannot_honour_is_a_typed_error(fn, shape, match):
    """Found by the full OpInfo sweep (benchmarks/opinfo_sweep.py --all): TVM's converters returned wrong
    auxiliary outputs or ignored an argument (silently wrong), or lowering crashed untyped."""
    with pytest.raises(LoweringError, match=match):
        graphopt.optimize(_Fn(fn), target="x86", pipeline="", example_inputs=(torch.randn(*shape),))
