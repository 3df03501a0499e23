"""The ops the full OpInfo sweep (benchmarks/opinfo_sweep.py --all) found silently wrong, compiled for x86 and
compared with eager PyTorch on inputs holding NaN, +-Inf, -0.0, denormals and values near float32's limits
(graphopt/backends/tvm/aten_semantics.py). Ops are batched into one compiled module: builds dominate the time.
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


class _Ops(nn.Module):
    """One output per fixed op; x, y: (16, 24) with special values, w: a run-time transposed-conv weight."""

    names = ("ne", "ne_scalar", "isnan_via_ne", "count_nonzero", "mul_zero", "softshrink", "selu", "elu_scaled",
             "celu", "remainder", "remainder_scalar", "rmod", "select_neg", "index_neg", "take_neg", "var",
             "std", "var_mean", "std_mean_keepdim", "std_all", "nanmean", "norm0", "safe_softmax",
             "conv_transpose2d", "conv_transpose1d", "multi_margin", "multilabel_margin", "grid_sample",
             "sdpa", "count_nonzero_0d")

    def forward(self, x, y, w, idx, tgt, lbl, grid, scalar):
        img = x.reshape(2, 3, 8, 8)
        # the transposed convolutions get NaN/Inf but no +-3e38: where a float32 partial sum overflows, whether
        # it meets an Inf of the other sign (NaN) depends on the summation order, in PyTorch as here
        xc = torch.where(torch.isfinite(x) & (x.abs() > 1e30), torch.full_like(x, 1.0), x)
        masked = x.masked_fill(x > 2, -INF)
        q = x.reshape(2, 2, 4, 24)[:, :, :, :8]
        # scalar % tensor: PyTorch's vectorized (Sleef) fmod returns NaN for a denormal divisor, its scalar
        # fmod the exact remainder (which graphopt returns): no denormal divisors there
        yd = torch.where((y.abs() < 1.2e-38) & (y != 0), torch.full_like(y, 2.0), y)
        return (x != y, x != 1.5, x != x, torch.count_nonzero(x, dim=1), x * 0, F.softshrink(x, 0.5), F.selu(x),
                F.elu(x, alpha=0.7) * 1.0, F.celu(x, alpha=1.3), torch.remainder(x, y),
                torch.remainder(x, -2.5), 3.7 % yd, x.select(1, -2), x[idx], torch.take(x, idx),
                torch.var(x, dim=1), torch.std(x, dim=0, unbiased=False), torch.var_mean(x, dim=1),
                torch.std_mean(x, dim=0, keepdim=True), torch.std(x), torch.nanmean(x, dim=1),
                torch.linalg.vector_norm(x, ord=0, dim=1), torch.ops.aten._safe_softmax.default(masked, 1),
                F.conv_transpose2d(xc.reshape(2, 3, 8, 8), w, stride=2, padding=1, output_padding=1),
                F.conv_transpose1d(xc.reshape(2, 3, 64), w[:, :, 0], stride=3, padding=2),
                F.multi_margin_loss(x[:, :10], tgt), F.multilabel_margin_loss(x[:4, :6], lbl),
                F.grid_sample(img, grid, align_corners=False), F.scaled_dot_product_attention(q, q, q),
                torch.count_nonzero(scalar, dim=0))


@pytest.fixture(scope="module")
def compiled():
    model = _Ops().eval()
    x, y = specials((16, 24), seed=1), specials((16, 24), seed=2)
    w = torch.randn(3, 4, 3, 3, generator=torch.Generator().manual_seed(4))
    w[0, 1, 1, 1], w[1, 2, 0, 2], w[2, 0, 2, 0] = INF, -INF, NAN
    idx = torch.tensor([0, -1, 5, -16, 3])
    tgt = torch.tensor([0, 3, 9, 1, 2, 2, 7, 5, 0, 1, 4, 6, 8, 3, 9, 1])
    lbl = torch.tensor([[0, 2, -1, 1, 0, 0], [5, -1, 0, 0, 0, 0], [1, 3, 4, -1, 0, 0], [2, 0, 1, 3, 4, 5]])
    grid = torch.rand(2, 5, 6, 2) * 2.4 - 1.2
    grid[0, 1, 2, 0], grid[1, 3, 3, 1] = NAN, INF
    scalar = torch.tensor(NAN)
    inputs = (x, y, w, idx, tgt, lbl, grid, scalar)
    opt = graphopt.optimize(model, target="x86", pipeline="", example_inputs=inputs)
    with torch.no_grad():
        ref = model(*inputs)
        # attention: PyTorch's flash and math kernels disagree on non-finite rows; both are PyTorch's answer
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):
            math_sdpa = model(*inputs)[_Ops.names.index("sdpa")]
        alts = {"sdpa": math_sdpa}
    return opt(*inputs), ref, alts


@pytest.mark.parametrize("name", _Ops.names)
def test_fixed_ops_match_pytorch_on_special_values(compiled, name):
    got, ref, alts = compiled
    i = _Ops.names.index(name)
    alt = alts.get(name)
    assert compare(got[i], ref[i], alt=alt) is None, f"{name}: {compare(got[i], ref[i], alt=alt)}"


def test_std_and_var_mean_near_float32_limits_match_pytorch():
    """ATen accumulates the moments in float64: (x - mean)^2 of values near 3e38 does not overflow there
    (std 1.1e38, finite), and var_mean's mean is NaN after an infinity that is not last (Welford)."""
    class M(nn.Module):
        def forward(self, x):
            return torch.std(x, dim=1), torch.var_mean(x, dim=1), torch.var(x, dim=0, correction=0)

    x = torch.randn(4, 6)
    x[0, :3], x[0, 3:] = 3e38, 1e38         # float32 (x - mean)^2 overflows; float64 does not
    x[1, 0] = INF            # mean NaN (an element follows the infinity)
    x[2, 5] = -INF           # last: mean -Inf
    x[3, 2] = NAN
    opt = graphopt.optimize(M().eval(), target="x86", pipeline="", example_inputs=(x,))
    assert compare(opt(x), M()(x)) is None
    assert torch.isfinite(opt(x)[0][0]) and float(opt(x)[0][0]) > 1e38


def test_finite_constant_transposed_conv_weights_keep_tvms_kernel():
    """A ConvTranspose2d module's weight is a finite constant: TVM's (schedulable) kernel gives PyTorch's sums;
    a non-finite weight takes the exact kernel, and both match eager."""
    from graphopt.backends.tvm import aten_semantics

    used = []
    original = aten_semantics._conv_transpose_te

    def spy(*args):
        used.append(1)
        return original(*args)

    model = nn.Sequential(nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1), nn.ReLU()).eval()
    x = specials((2, 4, 8, 8), seed=3)
    aten_semantics._conv_transpose_te = spy
    try:
        opt = graphopt.optimize(model, target="x86", pipeline="", example_inputs=(x,))
        assert not used and compare(opt(x), model(x)) is None
        with torch.no_grad():
            model[0].weight[1, 2, 0, 0] = INF
        opt = graphopt.optimize(model, target="x86", pipeline="", example_inputs=(x,))
        assert used and compare(opt(x), model(x)) is None
    finally:
        aten_semantics._conv_transpose_te = original


@pytest.mark.parametrize("n, stride, pad, k", [(5, 2, 1, 3), (7, 1, 0, 3), (5, 3, 0, 4)])
def test_the_exact_transposed_conv_reads_nothing_out_of_bounds(n, stride, pad, k):
    """Taps that are no input element read a zero border (a padded copy of x; their products are not taken):
    it read x itself at a clamped index inside the Select dropping those products, and TIR's simplifier
    dropped the clamp there (a Select evaluates both sides): reads of x at -1 or past its end (TVM's
    OOBChecker). Checked scheduled (8 input channels: the border stays a copy, as for ResNet-sized convs) and
    not."""
    import tvm
    from tvm import te

    from graphopt.backends.tvm import aten_semantics
    from graphopt.backends.tvm.schedules import apply_default_schedules
    from tests.helpers import out_of_bounds_reads

    x = te.placeholder((1, 8, n, n), "float32", name="x")
    w = te.placeholder((8, 3, k, k), "float32", name="w")
    y = aten_semantics._conv_transpose_te(x, w, [stride] * 2, [pad] * 2, [1, 1], [0, 0], 1)
    mod = tvm.IRModule({"main": te.create_prim_func([x, w, y]).with_attr("global_symbol", "main")})
    target = {"kind": "llvm", "mcpu": "haswell", "num-cores": 2}
    with tvm.target.Target(target):
        scheduled = apply_default_schedules(mod, tvm.target.Target(target))[0]
    assert out_of_bounds_reads(mod, target) is None
    assert out_of_bounds_reads(scheduled, target) is None


class _Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *xs):
        return self.fn(*xs)


@pytest.mark.parametrize("fn, shapes, match", [
    (lambda x, g: F.grid_sample(x, g, padding_mode="border", align_corners=False), [(1, 2, 5, 5), (1, 3, 3, 2)],
     r"grid_sampler_2d.*padding_mode='border'"),
    (lambda x, g: F.grid_sample(x, g, padding_mode="reflection", align_corners=True), [(1, 2, 5, 5), (1, 3, 3, 2)],
     r"grid_sampler_2d.*padding_mode='reflection'"),
    (lambda q, k: torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, k)[1], [(1, 2, 3, 8), (1, 2, 5, 8)],
     r"_scaled_dot_product_flash_attention_for_cpu.*output 1 \(logsumexp\)"),
    (lambda x: (x.new_zeros((2, 0)), x + 1), [(3, 4)], r"output 0 .*empty constant of shape \(2, 0\)"),
], ids=["grid_sample-border", "grid_sample-reflection", "flash-logsumexp", "empty-constant-output"])
def test_what_the_backend_cannot_honour_is_a_typed_error(fn, shapes, match):
    """The sweep found these silently wrong (grid_sample border/reflection on NaN/Inf grids, the flash op's
    logsumexp from torch's decomposition) or crashing on load (a zero-size constant in the executable)."""
    inputs = tuple(torch.randn(*s) for s in shapes)
    with pytest.raises(LoweringError, match=match):
        graphopt.optimize(_Fn(fn), target="x86", pipeline="", example_inputs=inputs)


# ------------------------------------------------------------------------------------------ dynamic dims
_DYN = {"batch": (1, 6), "seq": (2, 12)}        # x: (batch, seq, 4)


class _DynOps(nn.Module):
    """Converters that read the input's shape (_shape keeps a dynamic dim symbolic): moments over dynamic
    dims (n read at run time, divisor max(0, n - correction)), negative indices into dynamic dims, and the
    exact transposed convolution over a dynamic length."""

    names = ("var_last", "std_seq", "var_mean_keepdim", "std_mean_seq", "var_correction3", "var_all",
             "index_seq", "index_batch", "select_neg", "conv_transpose1d")

    def forward(self, x, idx, w):
        return (x.var(dim=-1), x.std(dim=1), torch.var_mean(x, dim=(0, 1), keepdim=True),
                torch.std_mean(x, dim=1), torch.var(x, dim=1, correction=3), torch.var(x), x[:, idx],
                x[idx[:2]], x.select(1, -2), F.conv_transpose1d(x.transpose(1, 2), w, stride=2, padding=1))


@pytest.fixture(scope="module")
def dynamic_ops():
    idx = torch.tensor([0, -1, 1, -2])
    w = torch.randn(4, 2, 3, generator=torch.Generator().manual_seed(5))
    w[1, 0, 2] = INF                       # a run-time weight: the exact transposed-convolution kernel
    model = _DynOps().eval()
    opt = graphopt.optimize(model, target="x86", pipeline="", example_inputs=(torch.randn(3, 5, 4), idx, w),
                            dynamic={"x": {0: "batch", 1: "seq"}, **_DYN})
    return model, opt, idx, w


@pytest.mark.parametrize("shape", [(3, 5, 4), (1, 2, 4), (6, 12, 4)], ids=str)
def test_shape_reading_converters_keep_dynamic_dims_symbolic(dynamic_ops, shape):
    """_shape used to call int() on every dim: var/std/var_mean and index.Tensor failed to lower on a dynamic
    dim. Each size runs with NaN/Inf/near-limit values, one infinity early and one last in a reduction (the
    Welford mean's NaN rule) and a seq of 2 (var with correction=3: divisor 0)."""
    model, opt, idx, w = dynamic_ops
    x = specials(shape, seed=shape[1])
    x[0, 0, 1], x[-1, -1, 2] = INF, -INF
    with torch.no_grad():
        ref = model(x, idx, w)
    got = opt(x, idx, w)
    for name, g, r in zip(_DynOps.names, got, ref):
        assert compare(g, r) is None, f"{name} at {shape}: {compare(g, r)}"


@pytest.mark.parametrize("fn, dynamic, match", [
    (lambda x: F.avg_pool2d(x, 2, divisor_override=3), {"x": {2: ("h", 4, 16)}},
     r"avg_pool2d.*static height and width.*fx node 'avg_pool2d'"),
    (lambda x: F.max_pool2d(x, 3, stride=1, ceil_mode=True), {"x": {3: ("w", 4, 16)}},
     r"max_pool2d_with_indices.*static height and width.*fx node 'max_pool2d'"),
], ids=["avg_pool2d-divisor_override-dynamic-h", "max_pool2d-ceil-dynamic-w"])
def test_what_needs_static_dims_is_a_typed_error_on_a_dynamic_dim(fn, dynamic, match):
    class M(nn.Module):
        def forward(self, x):
            return fn(x)

    with pytest.raises(LoweringError, match=match):
        graphopt.optimize(M(), target="x86", pipeline="", example_inputs=(torch.randn(1, 2, 7, 9),),
                          dynamic=dynamic)


class _Composites(nn.Module):
    """CompositeImplicitAutograd ops whose decompositions call other such ops (matmul, einsum, group / instance
    norm, SDPA, adaptive pooling, pixel shuffle), for the restricted override of run_decompositions."""

    def __init__(self):
        super().__init__()
        self.gn, self.inorm = nn.GroupNorm(2, 4), nn.InstanceNorm2d(4, affine=True)
        self.fc = nn.Linear(4, 8)

    def forward(self, x):                                    # x [2, 4, 8, 8]
        y = self.inorm(self.gn(x))
        y = F.adaptive_avg_pool2d(y, (4, 4)) + F.pixel_shuffle(y, 2)[..., ::4, ::4]
        q = self.fc(y.flatten(2).transpose(1, 2))              # [2, 16, 8]
        a = F.scaled_dot_product_attention(q, q, q)
        return torch.einsum("bij,bkj->bik", a, q).matmul(torch.ones(16, 3)), torch.cdist(q, q)


@pytest.mark.parametrize("model", ["composites", "mobilenet_v2_block", "transformer_layer"])
def test_restricted_composite_overrides_give_torchs_graph(model):
    """run_decompositions overrides only the CompositeImplicitAutograd ops the program calls (~0.1 s less per
    build): the decomposed graph is the one torch's own call with the whole table gives."""
    from graphopt.backends.tvm import aten_semantics

    if model == "composites":
        m, x = _Composites().eval(), torch.randn(2, 4, 8, 8)
    elif model == "mobilenet_v2_block":
        import torchvision

        m, x = torchvision.models.mobilenet_v2().features[:3].eval(), torch.randn(1, 3, 16, 16)
    else:
        m, x = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True).eval(), torch.randn(2, 5, 16)
    ep = torch.export.export(m, (x,), strict=False)
    ours = aten_semantics.run_decompositions(ep)
    assert str(ours.graph) == str(ep.run_decompositions(aten_semantics.decompositions()).graph)


def test_cached_composite_op_list_decomposes_like_torch_and_is_restored():
    """run_decompositions computes torch's list of CompositeImplicitAutograd ops once per set of registered
    operators (a fixed ~0.1 s of every build otherwise): the decomposed graph is torch's own, torch's functions
    are back in place afterwards, and registering an operator makes the next call recompute the list."""
    import torch.export.decomp_utils as decomp_utils
    import torch.export.exported_program as exported_program

    from graphopt.backends.tvm import aten_semantics

    class M(nn.Module):
        def forward(self, x):
            return torch.nn.functional.layer_norm(x.flatten(1), (12,)).softmax(-1) @ torch.ones(12, 3)

    ep = torch.export.export(M(), (torch.randn(2, 3, 4),), strict=False)
    before = (decomp_utils._collect_all_valid_cia_ops, exported_program._collect_all_valid_cia_ops)
    ours = aten_semantics.run_decompositions(ep)
    assert (decomp_utils._collect_all_valid_cia_ops, exported_program._collect_all_valid_cia_ops) == before
    assert str(ours.graph) == str(ep.run_decompositions(aten_semantics.decompositions()).graph)
    key = aten_semantics._CIA_OPS["key"]
    lib = torch.library.Library("graphopt_test_cia", "DEF")
    lib.define("twice(Tensor x) -> Tensor")
    lib.impl("twice", lambda x: x * 2, "CompositeImplicitAutograd")
    aten_semantics.run_decompositions(ep)
    assert aten_semantics._CIA_OPS["key"] != key
    assert torch.ops.graphopt_test_cia.twice.default in aten_semantics._CIA_OPS["ops"]
    assert torch.ops.graphopt_test_cia.twice.default in aten_semantics._TABLE["table"]    # the table as well


def test_cached_decomposition_table_is_torchs_and_a_fresh_copy_each_time():
    """The materialized decomposition table is built once per set of registered operators and decompositions
    (~20 ms of every build otherwise): it has torch's entries, and a caller's edits do not reach the next call."""
    from graphopt.backends.tvm import aten_semantics

    fresh = aten_semantics.decompositions().materialize()
    table = aten_semantics._materialized_decompositions()
    assert set(table) == set(fresh)
    op = torch.ops.aten.multi_margin_loss.default
    assert table[op] is fresh[op] is aten_semantics._multi_margin_loss
    del table[op]
    assert op in aten_semantics._materialized_decompositions()
