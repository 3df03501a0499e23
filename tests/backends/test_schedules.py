"""graphopt's default CPU schedules (graphopt/backends/tvm/schedules.py), as tune.schedule_cpu drives them for
x86, checked on this machine's CPU.

  - numerics vs PyTorch for every op family the rules handle (conv variants, Linear, batch matmul, pooling,
    means, softmax, LayerNorm, GELU), each kernel taken by the rule the module docstring names for it;
    hypothesis over random small conv nets and MLPs;
  - the schedules' contract "same arithmetic, same reduction order": scheduled kernels equal the
    unscheduled ones bit for bit (LLVM contracts a*b+c into an FMA the same way in both on one target);
  - coverage: every kernel of ResNet-18, MobileNetV2 (64x64) and the bundled bert_tiny is scheduled;
  - the fast-math error bounds stated in relax_layout_passes' docstring, against float64 on dense grids;
  - regressions: int8 hand-written kernels next to packed float kernels (SplitLayoutRewritePreproc "root
    block" failure), nn.TransformerEncoder without convolutions (ConvertLayout std::bad_alloc);
  - weights are repacked at build time: no layout-rewrite block is left, packed constants are the weights.

Float32 tolerance vs PyTorch (another summation order): |Δ| <= 1e-5·max|ref| + 1e-4·|ref| per output.
"""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

import graphopt
from graphopt.analysis.compare import flatten_outputs
from graphopt.backends.targets import resolve_target
from tests.helpers import X86_TARGETS, randomize_bn, runs_here

tvm = pytest.importorskip("tvm")

from tvm import relax, s_tir, tirx  # noqa: E402
from tvm.relax.backend.cpu_generic import pipeline as cpu_pipeline  # noqa: E402

from graphopt.backends.tvm import CompiledModule, lower_graph, schedules  # noqa: E402
from graphopt.backends.tvm.build import _finalize  # noqa: E402
from graphopt.backends.tvm.tune import schedule_cpu  # noqa: E402

HOST = resolve_target("x86")
RTOL, ATOL = 1e-4, 1e-5          # atol relative to max |reference| of each output


# ------------------------------------------------------------------------------------------------ helpers
def assert_close(got, ref, what: str = "") -> None:
    got, ref = flatten_outputs(got), flatten_outputs(ref)
    assert len(got) == len(ref), what
    for i, (g, r) in enumerate(zip(got, ref)):
        assert g.shape == r.shape, f"{what} output {i}: shape {tuple(g.shape)} vs {tuple(r.shape)}"
        scale = max(r.abs().max().item(), 1e-30)
        torch.testing.assert_close(g, r, rtol=RTOL, atol=ATOL * scale, msg=lambda m: f"{what} output {i}: {m}")


def kernel_counts(summary: str) -> dict[str, int]:
    """ScheduleStats.summary() -> {rule: kernels}; fails when a kernel was left unscheduled."""
    assert "unscheduled" not in summary, f"kernels left unscheduled: {summary}"
    counts = {rule: int(n) for n, rule in re.findall(r"(\d+) (\w+)", summary)}
    assert counts, f"no scheduled kernel in {summary!r}"
    return counts


def x86(model: nn.Module, *inputs, **kw):
    """optimize() for the host x86 target; checks every kernel got a default schedule."""
    return checked_x86(graphopt.optimize(model.eval(), "x86", example_inputs=inputs, **kw))


def checked_x86(opt):
    """`opt` (an x86 build), after checking every kernel got a default schedule."""
    assert opt.report.backend["schedule"] == "graphopt-default"
    kernel_counts(opt.report.backend["kernels"])
    return opt


def lowered(model: nn.Module, *inputs):
    """The Relax module graphopt builds for `model` (default pipeline), and its Lowered record."""
    return lowered_gm(graphopt.optimize(model.eval(), "torch", example_inputs=inputs).graph_module, *inputs)


def lowered_gm(gm, *inputs):
    low = lower_graph(gm, inputs, HOST)
    return low.mod, low


def legalized(mod):
    """schedule_cpu's steps before scheduling: layout and fast-math rewrites, legalize, fold, fuse."""
    target = HOST.tvm_target()
    with target:
        passes = (cpu_pipeline.library_dispatch_passes(target) + schedules.relax_layout_passes(target)
                  + schedules.legalize_passes(target))
        return tvm.transform.Sequential(passes)(mod)


def finalized(mod):
    target = HOST.tvm_target()
    with target:
        return tvm.transform.Sequential(schedules.finalize_passes(target))(mod)


def build_with(mod, rules=None):
    """Relax module -> (finalized module, ScheduleStats) with `rules` (None: the default rules)."""
    scheduled, stats = schedules.apply_default_schedules(legalized(mod), HOST.tvm_target(), rules)
    return finalized(scheduled), stats


def compiled(mod, low) -> CompiledModule:
    return CompiledModule(_finalize(mod, HOST), HOST, low.inputs, low.outputs, low.out_spec, low.const_outputs)


def prim_funcs(mod) -> dict:
    return {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}


def call_tir_args(mod) -> list[tuple[str, list]]:
    """(callee name, argument expressions) of every call_tir in main, in order."""
    calls = []

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == "relax.call_tir":
            args = e.args[1]
            calls.append((e.args[0].name_hint, list(args.fields) if isinstance(args, relax.Tuple) else [args]))

    relax.analysis.post_order_visit(mod["main"], visit)
    return calls


def relax_ops(mod) -> list[str]:
    names = []

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op):
            names.append(e.op.name)

    relax.analysis.post_order_visit(mod["main"], visit)
    return names


# ------------------------------------------------------------------------------------------ op families
class Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *xs):
        return self.fn(*xs)


class ResidualBlock(nn.Module):
    """conv + bias + residual + ReLU, and ReLU6 (clip: rewritten to min/max so the NHWC layout flows)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(16, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.c3 = nn.Conv2d(16, 24, 1)

    def forward(self, x):
        y = self.c2(torch.relu(self.c1(x))) + x
        return torch.relu(y), nn.functional.relu6(self.c3(y))


class Attention(nn.Module):
    """Multi-head self-attention: batch matmuls of two activations around a softmax."""

    def __init__(self, dim=24, heads=3):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // self.heads), dim=-1)
        return self.out((att @ v).transpose(1, 2).reshape(b, s, d))


PG, RED, ROWS, INJ = "PackedGemm", "Reduction", "RowGroups", "Injective"

# id: (model factory, input shapes, rules that must have taken a kernel)
OP_CASES = {
    "conv3x3": (lambda: nn.Conv2d(3, 16, 3), [(1, 3, 12, 13)], {PG}),
    "conv1x1_odd_in": (lambda: nn.Conv2d(17, 32, 1), [(1, 17, 7, 9)], {PG}),
    "conv_strided": (lambda: nn.Conv2d(7, 24, 3, stride=2, padding=1), [(1, 7, 15, 14)], {PG}),
    "conv_dilated": (lambda: nn.Conv2d(8, 16, 3, dilation=2, padding=2), [(1, 8, 11, 11)], {PG}),
    "conv_grouped": (lambda: nn.Conv2d(12, 24, 3, groups=3, padding=1), [(1, 12, 9, 9)], {PG}),
    "conv_depthwise": (lambda: nn.Conv2d(32, 32, 3, groups=32, padding=1), [(1, 32, 10, 10)], {PG}),
    "conv_depthwise_odd_strided": (lambda: nn.Conv2d(17, 17, 3, groups=17, stride=2, padding=1),
                                   [(2, 17, 11, 11)], {PG}),
    "conv_asym_kernel_padding": (lambda: nn.Conv2d(3, 7, (5, 3), padding=(2, 1)), [(1, 3, 9, 8)], {PG}),
    "conv_7_to_17_no_bias": (lambda: nn.Conv2d(7, 17, 3, padding=1, bias=False), [(3, 7, 9, 10)], {PG}),
    "conv_wide_packed": (lambda: nn.Conv2d(16, 128, 3, padding=1), [(1, 16, 8, 8)], {PG}),
    "conv_residual_relu_relu6": (ResidualBlock, [(1, 16, 8, 8)], {PG}),
    "linear_batch1": (lambda: nn.Linear(37, 50), [(1, 37)], {PG}),
    "linear_batch7": (lambda: nn.Linear(64, 33), [(7, 64)], {PG}),
    "linear_3d_odd": (lambda: nn.Linear(64, 48), [(3, 5, 64)], {PG}),
    "linear_wide_packed": (lambda: nn.Linear(256, 200), [(5, 256)], {PG}),
    "attention": (Attention, [(2, 5, 24)], {PG, RED}),
    "matmul_broadcast": (lambda: Fn(torch.matmul), [(2, 3, 5, 8), (1, 3, 8, 6)], {PG}),
    "conv_depthwise_channel_blocks": (lambda: nn.Conv2d(96, 96, 3, groups=96, padding=1), [(1, 96, 10, 10)],
                                      {PG}),           # 2 channel blocks, taken innermost (channel-wise)
    "maxpool": (lambda: nn.MaxPool2d(3, 2, 1), [(1, 17, 11, 11)], {PG}),
    "conv_maxpool_channel_blocks": (lambda: nn.Sequential(nn.Conv2d(3, 80, 1), nn.MaxPool2d(3, 2, 1)),
                                    [(1, 3, 9, 9)], {PG}),     # NHWC pool: 5 channel blocks, innermost
    "avgpool": (lambda: nn.AvgPool2d(2), [(1, 16, 10, 10)], {PG}),
    "avgpool_exclude_pad": (lambda: nn.AvgPool2d(3, 2, 1, count_include_pad=False), [(1, 16, 9, 9)], {PG}),
    "conv_maxpool_nhwc": (lambda: nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.MaxPool2d(3, 2, 1)),
                          [(1, 3, 13, 13)], {PG}),
    "conv_adaptive_avgpool_linear": (lambda: nn.Sequential(nn.Conv2d(3, 24, 3), nn.AdaptiveAvgPool2d(1),
                                                           nn.Flatten(), nn.Linear(24, 10)), [(2, 3, 9, 9)], {PG}),
    "adaptive_avgpool_3": (lambda: nn.AdaptiveAvgPool2d(3), [(1, 24, 9, 9)], {PG}),
    "adaptive_avgpool_uneven": (lambda: nn.AdaptiveAvgPool2d((3, 2)), [(1, 16, 7, 7)], set()),
    "mean_last": (lambda: Fn(lambda x: x.mean(-1)), [(3, 5, 33)], {PG}),
    "conv_spatial_mean": (lambda: nn.Sequential(nn.Conv2d(5, 20, 3), Fn(lambda x: x.mean((2, 3)))),
                          [(1, 5, 9, 9)], {PG}),
    "softmax": (lambda: nn.Softmax(-1), [(3, 5, 33)], {RED}),
    "softmax_dim1": (lambda: nn.Softmax(1), [(2, 7, 5)], {RED}),
    "layernorm": (lambda: nn.LayerNorm(33), [(3, 5, 33)], {RED}),
    # rows in groups of 8 / 4 / 2 (RowGroups), ragged row lengths, softmax with a quantize-like epilogue
    "layernorm_row_groups": (lambda: nn.LayerNorm(40), [(2, 12, 40)], {ROWS}),
    "softmax_row_groups": (lambda: nn.Softmax(-1), [(2, 3, 4, 37)], {ROWS}),
    "softmax_rows_of_two": (lambda: Fn(lambda x: (torch.softmax(x, -1) * 255).round().clamp(0, 255)),
                            [(6, 64)], {ROWS}),
    "gelu": (lambda: nn.GELU(), [(3, 5, 33)], {INJ}),
    "gelu_tanh": (lambda: nn.GELU("tanh"), [(3, 5, 33)], {INJ}),
    "nhwc_to_nchw_tiled": (lambda: Fn(lambda x: x.permute(0, 3, 1, 2).contiguous() + 1), [(2, 9, 24, 32)], {INJ}),
    "transpose_odd_untiled": (lambda: Fn(lambda x: x.transpose(1, 2).contiguous()), [(3, 13, 7)], {INJ}),
}


@pytest.mark.parametrize("case", list(OP_CASES))
def test_op_family_matches_torch(case):
    factory, shapes, rules = OP_CASES[case]
    model = factory().eval()
    inputs = tuple(torch.randn(*s) for s in shapes)
    opt = x86(model, *inputs)
    used = kernel_counts(opt.report.backend["kernels"])
    assert rules <= set(used), f"{case}: expected {sorted(rules)} among {used}"
    with torch.no_grad():
        ref = model(*inputs)
    assert_close(opt(*inputs), ref, case)
    other = tuple(torch.randn(*s) * 3 for s in shapes)        # not only the example the build saw
    with torch.no_grad():
        assert_close(opt(*other), model(*other), case)


def test_gelu_propagates_nan_like_torch():
    """fast_erf maps NaN to 1 (see relax_layout_passes), but GELU multiplies by x: NaN stays NaN."""
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU()).eval()
    x = torch.randn(3, 8)
    opt = x86(model, x)
    x[1, 2] = float("nan")
    with torch.no_grad():
        ref = model(x)
    got = opt(x)
    assert torch.equal(torch.isnan(got), torch.isnan(ref)) and torch.isnan(ref).any()
    assert_close(got[~torch.isnan(ref).any(1)], ref[~torch.isnan(ref).any(1)])


# ------------------------------------------------------------------------------------- random networks
@st.composite
def conv_net_specs(draw):
    """(layers, input shape, seed): 1-3 convs (dense / grouped / depthwise, any kernel, stride, dilation,
    padding), activations, an optional pooling head; channel counts mostly not multiples of the SIMD width."""
    cin = draw(st.integers(1, 24))
    h, w = draw(st.integers(5, 14)), draw(st.integers(5, 14))
    batch = draw(st.integers(1, 3))
    c, H, W, layers = cin, h, w, []
    for _ in range(draw(st.integers(1, 3))):
        k = draw(st.sampled_from([1, 2, 3, 5]))
        stride = draw(st.sampled_from([1, 1, 2, 3]))
        dil = draw(st.sampled_from([1, 1, 2]))
        kind = draw(st.sampled_from(["dense", "dense", "grouped", "depthwise"]))
        divisors = [g for g in (2, 3, 4) if c % g == 0]
        if kind == "depthwise":
            groups, cout = c, c * draw(st.sampled_from([1, 2]))
        elif kind == "grouped" and divisors:
            groups = draw(st.sampled_from(divisors))
            cout = groups * draw(st.integers(1, 12))
        else:
            groups, cout = 1, draw(st.integers(1, 40))
        pad = draw(st.integers(0, (k // 2) * dil))
        if min(H, W) + 2 * pad < (k - 1) * dil + 1:
            k, dil, pad = 1, 1, 0
        eff = (k - 1) * dil + 1
        H, W = (H + 2 * pad - eff) // stride + 1, (W + 2 * pad - eff) // stride + 1
        act = draw(st.sampled_from(["relu", "relu6", "gelu", "none"]))
        layers.append(("conv", c, cout, k, stride, pad, dil, groups, draw(st.booleans()), act))
        c = cout
    head = draw(st.sampled_from(["none", "avgpool_linear", "maxpool"]))
    if head == "maxpool" and min(H, W) < 2:
        head = "none"
    if head != "none":
        layers.append((head, c, draw(st.integers(1, 20))))
    return layers, (batch, cin, h, w), draw(st.integers(0, 2**16))


ACTS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "gelu": nn.GELU, "tanh": nn.Tanh, "none": nn.Identity}


def build_conv_net(layers) -> nn.Module:
    mods = []
    for spec in layers:
        if spec[0] == "conv":
            _, c, cout, k, stride, pad, dil, groups, bias, act = spec
            mods += [nn.Conv2d(c, cout, k, stride, pad, dil, groups, bias=bias), ACTS[act]()]
        elif spec[0] == "avgpool_linear":
            mods += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(spec[1], spec[2])]
        else:
            mods += [nn.MaxPool2d(2, ceil_mode=True)]
    return nn.Sequential(*mods).eval()


@st.composite
def mlp_specs(draw):
    sizes = draw(st.lists(st.integers(1, 70), min_size=2, max_size=4))
    acts = draw(st.lists(st.sampled_from(list(ACTS)), min_size=len(sizes) - 1, max_size=len(sizes) - 1))
    lead = draw(st.sampled_from([(1,), (draw(st.integers(2, 9)),), (draw(st.integers(1, 4)), draw(st.integers(1, 5)))]))
    return sizes, acts, lead, draw(st.integers(0, 2**16))


def build_mlp(sizes, acts) -> nn.Module:
    mods = []
    for a, b, act in zip(sizes, sizes[1:], acts):
        mods += [nn.Linear(a, b), ACTS[act]()]
    return nn.Sequential(*mods).eval()


def check_conv_net(spec):
    layers, shape, seed = spec
    torch.manual_seed(seed)
    model = build_conv_net(layers)
    x = torch.randn(*shape)
    opt = x86(model, x)
    with torch.no_grad():
        assert_close(opt(x), model(x), str(model))


def check_mlp(spec):
    sizes, acts, lead, seed = spec
    torch.manual_seed(seed)
    model = build_mlp(sizes, acts)
    x = torch.randn(*lead, sizes[0])
    opt = x86(model, x)
    with torch.no_grad():
        assert_close(opt(x), model(x), str(model))


FEW = settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MANY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FEW
@given(conv_net_specs())
def test_random_conv_nets_match_torch(spec):
    check_conv_net(spec)


@FEW
@given(mlp_specs())
def test_random_mlps_match_torch(spec):
    check_mlp(spec)


@pytest.mark.slow
@MANY
@given(conv_net_specs())
def test_random_conv_nets_match_torch_many(spec):
    check_conv_net(spec)


@pytest.mark.slow
@MANY
@given(mlp_specs())
def test_random_mlps_match_torch_many(spec):
    check_mlp(spec)


def check_scheduled_equals_unscheduled(model, x, *more):
    """Builds `model` (for example input `x`) with and without the default rules; both give the same outputs bit
    for bit on `x` and on each input of `more` (same shapes: the two builds are shared)."""
    mod, low = lowered(model, x)
    fast, stats = build_with(mod)
    slow, none = build_with(mod, rules=[])
    assert not stats.unscheduled and none.unscheduled and not none.by_rule
    fast, slow = compiled(fast, low), compiled(slow, low)
    for inp in (x, *more):
        for g, r in zip(flatten_outputs(fast(inp)), flatten_outputs(slow(inp))):
            same = torch.equal(g, r) or torch.equal(g.isnan(), r.isnan()) and torch.equal(g[~g.isnan()], r[~r.isnan()])
            assert same, f"scheduled != unscheduled: max |Δ| {(g - r).abs().max().item():.3g} ({model})"


def check_bit_for_bit(conv_spec, mlp_spec):
    """The module contract: rules only reorder/tile/vectorize and repack, no reassociation."""
    layers, shape, seed = conv_spec
    torch.manual_seed(seed)
    net, x = build_conv_net(layers), torch.randn(*shape)
    with torch.no_grad():
        if net(x).shape[1] > 1:         # softmax / layer norm over one element: no rule takes it (stays unscheduled)
            net = nn.Sequential(net, nn.Softmax(1)).eval()
    check_scheduled_equals_unscheduled(net, x)
    sizes, acts, lead, seed = mlp_spec
    torch.manual_seed(seed)
    mlp = build_mlp(sizes, acts)
    if sizes[-1] > 1:
        mlp = nn.Sequential(mlp, nn.LayerNorm(sizes[-1])).eval()
    check_scheduled_equals_unscheduled(mlp, torch.randn(*lead, sizes[0]))


@pytest.mark.parametrize("make, shape", [
    (lambda: nn.Sequential(nn.Conv2d(3, 64, 3), nn.MaxPool2d(3, 2, 1)), (1, 3, 17, 17)),    # ResNet's stem pool
    (lambda: nn.Sequential(nn.Conv2d(3, 80, 1), nn.MaxPool2d(2, 2)), (1, 3, 9, 9)),          # 80 channels: groups
    (lambda: nn.Sequential(nn.Conv2d(3, 144, 1), nn.MaxPool2d(3, 2, ceil_mode=True)), (2, 3, 10, 10)),
], ids=["3x3_s2_pad1_64ch", "2x2_80ch", "3x3_ceil_144ch_batch2"])
@pytest.mark.parametrize("target", X86_TARGETS)
def test_window_max_takes_channels_last_max_pools_bit_for_bit(make, shape, target):
    """WindowMax (pool_schedule.py) takes a max pool whose channels are innermost (NHWC after a conv), on the
    AVX2 and the host's vector width; its outputs equal the unscheduled kernel's bit for bit, with +-inf
    and NaN in the pooled tensor, and PyTorch's."""
    torch.manual_seed(0)
    model, x = make().eval(), torch.randn(*shape)
    opt = graphopt.optimize(model, target, example_inputs=(x,))
    assert kernel_counts(opt.report.backend["kernels"]).get("WindowMax") == 1, opt.report.backend["kernels"]
    odd = x.clone()
    odd.view(-1)[::5] = float("inf")
    odd.view(-1)[1::7] = float("-inf")
    odd.view(-1)[3] = float("nan")
    with torch.no_grad():
        assert_close(opt(x), model(x), "max pool")
        ref, got = model(odd), opt(odd)
    assert torch.equal(ref.isnan(), got.isnan()) and torch.equal(ref[~ref.isnan()], got[~got.isnan()])
    if target == "x86":
        check_scheduled_equals_unscheduled(model, x, odd)


@pytest.mark.parametrize("make, copied", [
    (lambda: nn.Conv2d(96, 64, 1), False),                  # 1x1: the input is read in place
    (lambda: nn.Conv2d(96, 64, 1, 2), False),               # strided 1x1: a copy read 4x what the conv reads
    (lambda: nn.Conv2d(96, 64, 3, padding=1), True),        # padded: one parallel padded copy
], ids=["1x1", "1x1_stride2", "3x3_pad1"])
def test_weighted_convs_copy_their_input_only_to_pad_it(make, copied):
    """PackedGemm makes one padded copy of a weighted conv's input; a conv without padding (TOPI's pad block
    is then a plain copy) reads its input in place. Bit for bit the unscheduled kernel either way."""
    torch.manual_seed(0)
    model, x = make().eval(), torch.randn(1, 96, 14, 14)
    mod, _ = lowered(model, x)
    scheduled, _ = schedules.apply_default_schedules(legalized(mod), HOST.tvm_target())
    convs = [f for name, f in prim_funcs(scheduled).items() if "conv" in name]
    assert len(convs) == 1
    assert ('T.sblock("pad_temp")' in convs[0].script()) == copied
    check_scheduled_equals_unscheduled(model, x)


def test_window_max_leaves_channels_first_pools_to_packed_gemm():
    """A max pool over NCHW (no conv before it: the layout stays) reduces along the innermost axis; WindowMax
    does not take it."""
    opt = x86(nn.MaxPool2d(3, 2, 1).eval(), torch.randn(1, 64, 11, 11))
    counts = kernel_counts(opt.report.backend["kernels"])
    assert "WindowMax" not in counts and counts.get(PG) == 1, counts


@pytest.mark.parametrize("model, shape", [
    (nn.LayerNorm(96), (1, 64, 96)),                                    # groups of 8 rows
    (nn.Sequential(nn.LayerNorm(33), nn.Softmax(-1)), (3, 4, 33)),      # 12 rows: groups of 4; two kernels
    (Fn(lambda x: torch.log_softmax(x, 1).mean(-1)), (2, 10, 6)),       # reduction over a middle axis
], ids=["layernorm_64_rows", "layernorm_softmax_12_rows", "log_softmax_dim1"])
def test_row_groups_keep_each_rows_summation_order(model, shape):
    """RowGroups interleaves the accumulation chains of several rows: each row's sum still runs in the
    reference order, so the results equal the unscheduled kernels' bit for bit (special values too)."""
    torch.manual_seed(0)
    x = torch.randn(*shape) * 4
    odd = x.clone()
    odd.view(-1)[::7] = float("inf")
    odd.view(-1)[3] = float("nan")
    check_scheduled_equals_unscheduled(model.eval(), x, odd)


@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_net_specs(), mlp_specs())
def test_schedules_keep_the_arithmetic_bit_for_bit(conv_spec, mlp_spec):
    check_bit_for_bit(conv_spec, mlp_spec)


@pytest.mark.slow
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_net_specs(), mlp_specs())
def test_schedules_keep_the_arithmetic_bit_for_bit_many(conv_spec, mlp_spec):
    check_bit_for_bit(conv_spec, mlp_spec)


# ------------------------------------------------------------------------------------ real architectures
def _torchvision(name: str):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return randomize_bn(getattr(torchvision.models, name)()).eval(), torch.randn(1, 3, 64, 64)


@pytest.mark.parametrize("name", ["resnet18", pytest.param("mobilenet_v2", marks=pytest.mark.slow)])   # ~25 s
def test_torchvision_models_are_fully_scheduled(name, request):
    if name == "resnet18":           # the session's build (tests/conftest.py): the same model, input and pipeline
        model, x, opt = request.getfixturevalue("resnet18_x86")
        opt = checked_x86(opt)
    else:
        model, x = _torchvision(name)
        opt = x86(model, x)
    counts = kernel_counts(opt.report.backend["kernels"])
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert counts.get(PG, 0) >= convs // 2, counts           # convs (fused with BN, ReLU, residuals) are GEMMs
    with torch.no_grad():
        assert_close(opt(x), model(x), name)


def test_bert_tiny_is_fully_scheduled(bert_tiny_x86):
    model, (ids,), opt = bert_tiny_x86      # the session's build (tests/conftest.py): default pipeline, x86
    opt = checked_x86(opt)
    with torch.no_grad():
        assert_close(opt(ids), model(ids), "bert_tiny")
    # the precise statistics, from apply_default_schedules on the same Relax module
    mod, _ = lowered(model, ids)
    legal = legalized(mod)
    kernels = prim_funcs(legal)
    _, stats = schedules.apply_default_schedules(legal, HOST.tvm_target())
    assert stats.unscheduled == []
    written = [name for name, f in kernels.items() if schedules.is_scheduled(f)]    # hand-written: attention
    assert written and all(name.startswith("attention") for name in written), written
    assert sum(stats.by_rule.values()) + len(written) == len(kernels)
    assert {PG, ROWS, INJ} <= set(stats.by_rule)
    assert stats.summary() == opt.report.backend["kernels"]


# ---------------------------------------------------------------------------------- apply_default_schedules
class _Declines:
    def apply(self, func, target, tunable=False):
        return None


class _Raises:
    def apply(self, func, target, tunable=False):
        raise RuntimeError("a rule that breaks on every kernel")


def _small_mixed_net():
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU6(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, 10), nn.LayerNorm(10)).eval(), torch.randn(1, 3, 8, 8)


def test_apply_default_schedules_statistics_and_fallbacks():
    model, x = _small_mixed_net()
    mod, low = lowered(model, x)
    legal = legalized(mod)
    names = set(prim_funcs(legal))
    target = HOST.tvm_target()

    # rules that decline or raise are skipped; the default ones take every kernel
    out, stats = schedules.apply_default_schedules(legal, target, [_Declines(), _Raises()] + schedules.default_rules())
    assert stats.unscheduled == [] and sum(stats.by_rule.values()) == len(names)
    assert {PG, RED} <= set(stats.by_rule)
    assert all(schedules.is_scheduled(f) for f in prim_funcs(out).values())
    assert not any(schedules.is_scheduled(f) for f in prim_funcs(legal).values()), "the input module was changed"

    # a second pass finds nothing left: scheduled kernels are left alone
    again, stats2 = schedules.apply_default_schedules(out, target)
    assert stats2.by_rule == {} and stats2.unscheduled == []
    assert stats2.summary() == "none left for the default rules"
    assert all(again[n].same_as(out[n]) for n in names)

    # no rule takes anything: every kernel is listed, unscheduled, and the module still runs correctly
    bare, stats3 = schedules.apply_default_schedules(legal, target, [_Declines(), _Raises()])
    assert sorted(stats3.unscheduled) == sorted(names) and stats3.by_rule == {}
    assert f"{len(names)} unscheduled (" in stats3.summary()
    assert not any(schedules.is_scheduled(f) for f in prim_funcs(bare).values())
    with torch.no_grad():
        assert_close(compiled(finalized(bare), low)(x), model(x))


# -------------------------------------------------------------------------------------- Relax rewrites
def test_rewrite_elementwise_spells_clip_and_gelu_with_plain_ops():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 8), "float32"))
    i = relax.Var("i", relax.TensorType((4, 8), "int32"))
    with bb.function("main", [x, i]):
        with bb.dataflow():
            a = bb.emit(relax.op.clip(x, 0.0, 6.0))
            b = bb.emit(relax.op.nn.gelu(a))
            c = bb.emit(relax.op.nn.gelu_tanh(b))
            d = bb.emit(relax.op.clip(i, 0, 6))     # integer: left alone
            out = bb.emit_output(relax.Tuple([c, d]))
        bb.emit_func_output(out)
    mod = bb.get()
    before = relax_ops(mod)
    assert before.count("relax.clip") == 2 and "relax.nn.gelu" in before and "relax.nn.gelu_tanh" in before
    after = relax_ops(schedules.rewrite_elementwise()(mod))
    assert after.count("relax.clip") == 1                               # the int32 one
    assert "relax.nn.gelu" not in after and "relax.nn.gelu_tanh" not in after
    assert {"relax.minimum", "relax.maximum", "relax.erf", "relax.tanh"} <= set(after)

    # same values as TVM's own clip / gelu / gelu_tanh (through the unchanged legalization)
    xs = np.linspace(-8, 8, 32, dtype=np.float32).reshape(4, 8)
    ints = np.arange(-8, 24, dtype=np.int32).reshape(4, 8)

    def run(m):
        target = HOST.tvm_target()
        with target:
            m = tvm.transform.Sequential([relax.transform.LegalizeOps()])(m)
        vm = relax.VirtualMachine(relax.build(m, target), tvm.cpu())
        return [o.numpy() for o in vm["main"](tvm.runtime.tensor(xs), tvm.runtime.tensor(ints))]

    (c0, d0), (c1, d1) = run(mod), run(schedules.rewrite_elementwise()(mod))
    np.testing.assert_allclose(c1, c0, rtol=1e-6, atol=1e-7)
    assert np.array_equal(d1, d0)


def test_relu6_between_convs_adds_no_layout_transposes():
    """Activations are transposed to NHWC once at the input and back once at the output: the ReLU6 clips
    in between follow the layout (rewrite_elementwise) instead of each wrapping itself in two transposes."""
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU6(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU6(),
                          nn.Conv2d(16, 8, 1)).eval()
    x = torch.randn(1, 8, 6, 6)
    mod, low = lowered(model, x)
    out = schedule_cpu(mod, HOST)
    kernels = [name for name, _ in call_tir_args(out)]
    not_conv = [k for k in kernels if "conv2d" not in k]
    assert len(not_conv) == 2 and "transpose" in kernels[0] and "transpose" in kernels[-1], kernels
    assert not any("clip" in k for k in kernels), kernels
    with torch.no_grad():
        assert_close(compiled(out, low)(x), model(x))


def test_convert_conv_layout_only_touches_modules_with_convolutions():
    conv_mod, _ = lowered(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()), torch.randn(1, 3, 6, 6))
    converted = schedules.convert_conv_layout()(conv_mod)
    convs = []

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == "relax.nn.conv2d":
            convs.append(e)

    relax.analysis.post_order_visit(converted["main"], visit)
    assert convs and all(c.attrs.data_layout == "NHWC" and c.attrs.kernel_layout == "HWIO" for c in convs)

    mlp_mod, _ = lowered(nn.Sequential(nn.Linear(8, 8), nn.Softmax(-1)), torch.randn(2, 8))
    assert schedules.convert_conv_layout()(mlp_mod).same_as(mlp_mod)


def test_relax_layout_passes_use_the_fast_math_functions():
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 16), nn.Tanh(), nn.Softmax(-1)).eval()
    mod, _ = lowered(model, torch.randn(2, 8))
    target = HOST.tvm_target()
    with target:
        rewritten = tvm.transform.Sequential(schedules.relax_layout_passes(target))(mod)
    ops = set(relax_ops(rewritten))
    assert not ops & {"relax.exp", "relax.erf", "relax.tanh", "relax.nn.softmax", "relax.nn.gelu"}, ops
    names = " ".join(prim_funcs(rewritten))
    # the last-axis softmax: graphopt's kernel (softmax_lower.py: fast_exp's polynomial, a plain row max)
    assert all(f in names.split() for f in ("fast_erf", "fast_tanh", "softmax")), names


# -------------------------------------------------------------------------------------- fast-math bounds
def _fast_math_module(n: int):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((n,), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            outs = [bb.emit(f(x)) for f in (relax.op.exp, relax.op.erf, relax.op.tanh, relax.op.sigmoid)]
            out = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(out)
    return bb.get()


def _fast_math_eval(alias: str, xs: np.ndarray) -> list[np.ndarray]:
    """exp, erf, tanh, sigmoid of xs as graphopt compiles them for `alias` (fast_* polynomials, default
    schedules)."""
    spec = resolve_target(alias)
    target = spec.tvm_target()
    with target:
        mod = tvm.transform.Sequential(schedules.relax_layout_passes(target)
                                       + schedules.legalize_passes(target))(_fast_math_module(xs.size))
    names = " ".join(prim_funcs(mod))
    assert all(f in names for f in ("fast_exp", "fast_erf", "fast_tanh")), names
    mod, stats = schedules.apply_default_schedules(mod, target)
    assert not stats.unscheduled
    with target:
        mod = tvm.transform.Sequential(schedules.finalize_passes(target))(mod)
    vm = relax.VirtualMachine(_finalize(mod, spec), tvm.cpu())
    return [o.numpy().astype(np.float64) for o in vm["main"](tvm.runtime.tensor(xs))]


def _grid(lo: float, hi: float, n: int) -> np.ndarray:
    """A dense uniform grid plus tiny magnitudes (relative accuracy near 0), float32."""
    tiny = np.logspace(-30, 0, 4096)
    return np.concatenate([np.linspace(lo, hi, n), tiny, -tiny]).astype(np.float32)


# target alias: (exp relative, erf/tanh absolute and relative), as relax_layout_passes states them
FAST_MATH_BOUNDS = {"x86": (1.1e-6, 4e-7), "x86:haswell": (1.1e-6, 4e-7), "x86:x86-64": (5e-6, 5e-7)}


@pytest.mark.parametrize("alias", list(FAST_MATH_BOUNDS))
def test_fast_math_error_bounds(alias):
    from scipy.special import erf

    exp_bound, bound = FAST_MATH_BOUNDS[alias]
    n = 1 << 20
    # exp over the inputs whose result is a normal float32 up to fast_exp's clamp (see the docstring)
    xe = _grid(-87.3, 88.3, n)
    xs = _grid(-12.0, 12.0, n)
    exp_x = _fast_math_eval(alias, xe)[0]
    _, erf_x, tanh_x, sigmoid_x = _fast_math_eval(alias, xs)
    ref_exp = np.exp(xe.astype(np.float64))
    rel_exp = np.abs(exp_x - ref_exp) / ref_exp
    assert rel_exp.max() <= exp_bound, f"fast_exp: {rel_exp.max():.3g} relative at x={xe[rel_exp.argmax()]}"
    x64 = xs.astype(np.float64)
    for name, got, ref in (("fast_erf", erf_x, erf(x64)), ("fast_tanh", tanh_x, np.tanh(x64))):
        err = np.abs(got - ref)
        rel = err / np.abs(ref)
        assert err.max() <= bound, f"{name}: {err.max():.3g} absolute at x={xs[err.argmax()]}"
        assert rel.max() <= bound, f"{name}: {rel.max():.3g} relative at x={xs[rel.argmax()]}"
    # sigmoid = 1 / (1 + fast_exp(-x)) (rewrite_elementwise): relative to float64's, and within [0, 1]
    ref_sigmoid = 1.0 / (1.0 + np.exp(-x64))
    rel = np.abs(sigmoid_x - ref_sigmoid) / ref_sigmoid
    assert rel.max() <= exp_bound, f"sigmoid: {rel.max():.3g} relative at x={xs[rel.argmax()]}"
    assert sigmoid_x.min() >= 0.0 and sigmoid_x.max() <= 1.0
    # odd functions keep the sign of x (|value| may pass 1 by a few ulps near the clamps: see the docstring)
    assert np.array_equal(np.sign(erf_x), np.sign(xs)) and np.array_equal(np.sign(tanh_x), np.sign(xs))


# ---------------------------------------------------------------------------------------- regressions
class QuantMixed(nn.Module):
    """int8 convs/linear (hand-written kernels) around float layers wide enough to get packed weights."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.c2, self.bn2 = nn.Conv2d(32, 128, 3, padding=1), nn.BatchNorm2d(128)      # kept float (skip)
        self.dw = nn.Conv2d(128, 128, 3, padding=1, groups=128)
        self.c3 = nn.Conv2d(128, 96, 1)
        self.fc = nn.Linear(96, 10)
        self.head = nn.Linear(96, 160)                                                  # kept float (skip)

    def forward(self, x):
        x = torch.relu(self.bn1(self.c1(x)))
        x = torch.relu(self.bn2(self.c2(x)))
        x = self.c3(torch.relu(self.dw(x))).mean((2, 3))
        return self.fc(x), self.head(x)


def test_quantized_model_with_int8_kernels_and_packed_float_layers():
    torch.manual_seed(0)
    model = randomize_bn(QuantMixed()).eval()
    x = torch.randn(1, 3, 8, 8)
    calib = [torch.randn(1, 3, 8, 8) for _ in range(4)]
    opt = x86(model, x, pipeline="fold_bn,quantize(skip=[c2,head],progress=false)", calibration=calib)
    assert "qconv2d" in opt.report.backend["int8"] and "qlinear" in opt.report.backend["int8"]
    with torch.no_grad():
        assert_close(opt(x), opt.graph_module(x), "int8 + float vs the QDQ graph")

    # the module mixes what SplitLayoutRewritePreproc used to choke on: plain-loop kernels next to packed ones
    mod, low = lowered_gm(opt.graph_module, x)
    out = schedule_cpu(mod, HOST)
    funcs = prim_funcs(out)
    hand_written = [n for n, f in funcs.items() if not isinstance(f.body, s_tir.SBlockRealize)]
    packed = [n for n in funcs if n.endswith("_prepacked")]
    assert hand_written and all(schedules.is_scheduled(funcs[n]) for n in hand_written)
    assert len(packed) >= 2, sorted(funcs)                # c2 (conv) and head (matmul) at least
    assert "layout_rewrite_preproc" not in out.script()
    with torch.no_grad():
        assert_close(compiled(out, low)(x), opt.graph_module(x))


def test_transformer_encoder_without_convolutions_builds(transformer_encoder_x86):
    model, x, opt, caught = transformer_encoder_x86      # the session's build (tests/conftest.py): default pipeline
    opt = checked_x86(opt)
    assert opt.report.backend["capture"] == "torch.export"
    assert not [w for w in caught if "layout conversion failed" in w]
    with torch.no_grad():
        assert_close(opt(x), model(x), "TransformerEncoder")


# ------------------------------------------------------------------------------------- weight repacking
class Packable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 128, 3, padding=1)
        self.fc = nn.Linear(128, 160)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def _panels(w_last_is_out: np.ndarray, tile: int) -> np.ndarray:
    """The documented packed layout: [..., N] -> [N/tile, ..., tile]."""
    *lead, n = w_last_is_out.shape
    blocked = w_last_is_out.reshape(*lead, n // tile, tile)
    return np.moveaxis(blocked, -2, 0)


def test_weights_are_repacked_at_build_time():
    model = Packable().eval()
    x = torch.randn(1, 16, 8, 8)
    opt = x86(model, x)
    with torch.no_grad():
        assert_close(opt(x), model(x))

    mod, low = lowered(model, x)
    out = schedule_cpu(mod, HOST)
    funcs = prim_funcs(out)
    assert "layout_rewrite_preproc" not in out.script()          # no repacking block left inside a kernel
    calls = call_tir_args(out)
    assert all(schedules.is_scheduled(funcs[name]) for name, _ in calls), "a run-time kernel is unscheduled"
    assert not any("layout_rewrite" in name or "preproc" in name for name in funcs), sorted(funcs)

    conv_hwio = model.conv.weight.detach().permute(2, 3, 1, 0).numpy()       # NHWC conv: HWIO weights
    fc_kn = model.fc.weight.detach().t().numpy()                             # matmul(x, W^T)
    found = set()
    for name, args in calls:
        if not name.endswith("_prepacked"):
            continue
        for arg in args:
            if not isinstance(arg, tvm.ir.GenericConst):          # a relax constant (tensor payload)
                continue
            packed = arg.value.numpy()
            for key, w in (("conv", conv_hwio), ("fc", fc_kn)):
                if packed.ndim == w.ndim + 1 and packed.size == w.size and packed.shape[1:-1] == w.shape[:-1]:
                    tile = packed.shape[-1]
                    assert packed.shape[0] * tile == w.shape[-1] and tile < w.shape[-1]
                    assert np.array_equal(packed, _panels(w, tile)), f"{name}: {key} weight not packed as documented"
                    found.add(key)
    assert found == {"conv", "fc"}, f"packed constants found for {found} in {[n for n, _ in calls]}"
    with torch.no_grad():
        assert_close(compiled(out, low)(x), model(x))


# ------------------------------------------------------------------------------------------- transposes
def _transpose_kernel(perm, shape):
    """The legalized PrimFunc of x.permute(perm) + 1 (one fused injective kernel)."""
    mod, _ = lowered(Fn(lambda x: x.permute(*perm).contiguous() + 1), torch.randn(*shape))
    funcs = [f for f in prim_funcs(legalized(mod)).values()]
    assert len(funcs) == 1, list(prim_funcs(legalized(mod)))
    return funcs[0]


def _output_block(sch):
    return sch.get_output_blocks(sch.get_sblock("root"))[0]


@pytest.mark.parametrize("perm, shape, tiled", [
    ((0, 3, 1, 2), (1, 20, 20, 64), True),         # NHWC -> NCHW: the input's channels cross the output rows
    ((0, 2, 3, 1), (1, 64, 20, 20), True),         # NCHW -> NHWC
    ((1, 0), (48, 96), True),                      # a matrix transpose
    ((0, 2, 1, 3), (2, 8, 12, 32), False),         # innermost axis kept: rows copy contiguously, no tiling
    ((0, 2, 1), (3, 13, 7), False),                # no tile of >= 4 divides both axes: plain vectorized loop
])
def test_transposes_are_tiled_and_bit_exact(perm, shape, tiled):
    """_tile_transpose takes exactly the kernels that read their input across its innermost axis, tiles both
    axes with the vectorized tile row innermost, and the kernel's values are the permuted input's."""
    func = _transpose_kernel(perm, shape)
    lanes = schedules.cpu_vector(HOST.tvm_target()).lanes("float32")
    sch = s_tir.Schedule(func)
    for b in schedules._root_blocks(sch):
        if not schedules._same(sch.get(b), sch.get(_output_block(sch))):
            sch.compute_inline(b)
    assert schedules._tile_transpose(sch, _output_block(sch), lanes) is tiled
    if tiled:
        loops = sch.get_loops(_output_block(sch))
        inner = [schedules._extent(sch, lp) for lp in loops[-2:]]
        assert all(4 <= e <= lanes for e in inner), inner
        assert sch.get(loops[-1]).kind == tirx.ForKind.VECTORIZED
    x = torch.randn(*shape)
    check_scheduled_equals_unscheduled(Fn(lambda t: t.permute(*perm).contiguous() + 1), x)
    opt = x86(Fn(lambda t: t.permute(*perm).contiguous() + 1), x)
    assert torch.equal(opt(x), x.permute(*perm) + 1)


@pytest.mark.parametrize("shape", [(2, 30, 40), (3, 5, 144), (4, 6, 24)])
def test_inner_axis_that_lanes_do_not_divide_is_still_vectorized(shape):
    """An elementwise kernel whose innermost extent is not a multiple of the vector width (40 or 24 floats on
    AVX-512; 144 uint8 channels with 64 lanes in an int8 MobileNet) is split by its largest power-of-two
    divisor and that loop vectorized (left scalar it ran 6x slower); values unchanged. (No multiply feeding
    an add here: LLVM contracts a vectorized x*a+b into one FMA, 1 ulp off the scalar loop, on any width.)"""
    fn = Fn(lambda t: torch.clamp(t + 1.0, 0.0, 6.0) * 3.0)
    x = torch.randn(*shape)
    mod, _ = lowered(fn, x)
    funcs = list(prim_funcs(legalized(mod)).values())
    assert len(funcs) == 1
    lanes = schedules.cpu_vector(HOST.tvm_target()).lanes("float32")
    sch = s_tir.Schedule(funcs[0])
    for b in schedules._root_blocks(sch):
        if not schedules._same(sch.get(b), sch.get(_output_block(sch))):
            sch.compute_inline(b)
    schedules._vectorize_inner(sch, _output_block(sch), lanes)
    inner = sch.get_loops(_output_block(sch))[-1]
    assert sch.get(inner).kind == tirx.ForKind.VECTORIZED
    assert 4 <= schedules._extent(sch, inner) <= lanes and shape[-1] % schedules._extent(sch, inner) == 0
    check_scheduled_equals_unscheduled(fn, x)


def reduction_kernels(model, x):
    """(name, func, schedule, main block) of each kernel of `model` with exactly one reduction block (what
    PackedGemm schedules), from the legalized module, before scheduling."""
    mod, _ = lowered(model.eval(), x)
    for name, func in prim_funcs(legalized(mod)).items():
        sch = s_tir.Schedule(func)
        mains = [b for b in schedules._root_blocks(sch) if schedules._is_reduction_block(sch, b)]
        if len(mains) == 1:
            yield name, func, sch, mains[0]


@pytest.mark.parametrize("make, shape, channel_wise", [
    (lambda: nn.Conv2d(96, 96, 3, groups=96, padding=1), (1, 96, 10, 10), [True]),     # depthwise
    (lambda: nn.Sequential(nn.Conv2d(3, 80, 1), nn.MaxPool2d(3, 2, 1)), (1, 3, 9, 9),   # NHWC pool after a
     [False, True]),                                                                    # conv
    (lambda: nn.MaxPool2d(3, 2, 1), (1, 80, 9, 9), [False]),    # NCHW: the window runs along the last axis
    (lambda: nn.Conv2d(32, 96, 3, padding=1), (1, 32, 10, 10), [False]),               # reduces over channels
    (lambda: nn.Conv2d(32, 96, 1), (1, 32, 10, 10), [False]),
    (lambda: nn.Conv2d(12, 24, 3, groups=3, padding=1), (1, 12, 9, 9), [False]),       # grouped: reduces too
    (lambda: nn.Linear(64, 96), (5, 64), [False]),
])
def test_channel_wise_kernels_take_channel_blocks_innermost(make, shape, channel_wise):
    """PackedGemm orders the parallel tiles channel blocks innermost exactly for the kernels that read their
    input at the output's channel (depthwise conv, pooling), weight-panel order (channel blocks outermost)
    for those that reduce over input channels."""
    found = []
    for name, _, sch, main in reduction_kernels(make(), torch.randn(*shape)):
        blk = sch.get(main)
        axes = schedules.PackedGemm._output_axes(blk)
        assert axes is not None, name
        found.append(schedules.PackedGemm._channel_wise(blk, *axes))
    assert sorted(found) == channel_wise


@pytest.mark.parametrize("mcpu", ["haswell", "skylake-avx512"])
def test_depthwise_tiles_keep_a_register_spare_on_16_register_isas(mcpu):
    """A depthwise conv's register tile on AVX2 (16 registers) leaves one register beside its accumulators and
    weight vectors: MobileNetV2's 56x56x144 depthwise conv took 4 x 3 (12 + 3 registers) and LLVM spilled
    between the unrolled taps; now 4 x 2 (`_choose_tile(spare=1)`). AVX-512's 32 registers keep the tile
    chosen without a spare. The AVX2 kernel computes what the unscheduled one does."""
    import tvm

    model = nn.Conv2d(144, 144, 3, groups=144, padding=1).eval()
    x = torch.randn(1, 144, 56, 56)
    target = tvm.target.Target({"kind": "llvm", "mcpu": mcpu, "num-cores": 2})
    (name, func, sch, main), = list(reduction_kernels(model, x))
    vec = schedules.cpu_vector(target)
    blk = sch.get(main)
    assert schedules.PackedGemm._channel_wise(blk, *schedules.PackedGemm._output_axes(blk))
    without_spare = schedules.PackedGemm()._choose_tile(144 // vec.lanes("float32"), 56, vec,
                                                        row_choices=range(1, 9))
    expect = (4, 2) if mcpu == "haswell" else without_spare
    if mcpu == "haswell":
        assert without_spare == (4, 3)                      # the tile it took before
    scheduled = schedules.PackedGemm()._apply(func, target)
    assert scheduled is not None
    text = scheduled.mod.script()
    unrolls = [int(v) for v in re.findall(r"in T\.unroll\(T\.int64\((\d+)\)\)", text)]
    assert unrolls[:2] == list(expect), text                # the tile's rows and vectors (init block first)
    if mcpu == "haswell":
        check_scheduled_equals_unscheduled(model, x)


@pytest.mark.parametrize("make, shape, small", [
    (lambda: nn.Sequential(nn.Conv2d(16, 96, 1), nn.ReLU6()), (1, 16, 12, 12), True),      # 6 KiB of weights
    (lambda: nn.Sequential(nn.Conv2d(96, 24, 1), nn.ReLU()), (1, 96, 12, 12), True),
    (lambda: nn.Sequential(nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.ReLU()), (1, 64, 8, 8), True),  # 288 K
    (lambda: nn.Sequential(nn.Conv2d(128, 256, 3, padding=1), nn.ReLU()), (1, 128, 6, 6), False),   # 1.1 MiB
])
def test_kernels_with_small_weights_take_pixel_tiles_outermost(make, shape, small):
    """Weights that stay in L2 (`PackedGemm.small_weight_bytes`): every channel block of a pixel tile in turn
    (whole output lines written once) instead of one pass over the output per channel block; both orders
    compute what the unscheduled kernel computes, bit for bit."""
    model = make().eval()
    x = torch.randn(*shape)
    decided = []
    for _, _, sch, main in reduction_kernels(model, x):
        blk = sch.get(main)
        ivs = list(blk.iter_vars)
        ext = [schedules._int(iv.dom.extent) for iv in ivs]
        vi, _ = schedules.PackedGemm._output_axes(blk)
        reduce_ = [i for i, iv in enumerate(ivs) if int(iv.iter_type) == tirx.IterVar.CommReduce]
        decided.append(schedules.PackedGemm()._small_weights(ext, reduce_, ext[vi], "float32"))
    assert decided == [small]
    check_scheduled_equals_unscheduled(model, x)


@pytest.mark.parametrize("vec, n_vectors, Er, padded, parallel, expect", [
    (schedules.CpuVector(32, 16), 8, 56, True, 56, (6, 2)),     # AVX2 3x3 64-ch at 56 wide: 4x2 -> 6x2 + 2 rows
    (schedules.CpuVector(32, 16), 16, 28, True, 28, (6, 2)),    # tail of 4 rows: still half a tile
    (schedules.CpuVector(32, 16), 64, 14, True, 14, None),      # tail of 2 of 14 rows on a padded conv: keep 2x4
    (schedules.CpuVector(32, 16), 120, 7, False, 7, (4, 3)),    # 1x1 960-ch at 7 wide: 1x8 -> 4x3 + 3 rows
    (schedules.CpuVector(32, 16), 8, 48, True, 48, None),       # 6 divides 48: no tail needed
    (schedules.CpuVector(32, 16), 2, 61, False, 1, None),       # one column block: the rows are the parallelism
    (schedules.CpuVector(64, 32), 16, 56, True, 56, (3, 4)),    # AVX-512 256-ch, tile < 1 KiB (15 zmm): 7x2 -> 3x4 + 2 rows
    (schedules.CpuVector(32, 16), 4, 28, False, 28, None),      # 1x1 conv to 32 channels: 2 column blocks
])
def test_register_tiles_may_leave_a_row_tail(vec, n_vectors, Er, padded, parallel, expect):
    """PackedGemm takes a register tile whose rows do not divide the row count (a serial loop of full tiles
    and one guarded tail) only where the divisors allow a clearly worse tile, the tail is cheap, and the
    parallel loop keeps enough iterations without the row tiles."""
    rule = schedules.PackedGemm()
    ext = [1, parallel, Er, n_vectors * vec.lanes("float32")]
    tile = rule._choose_tile(n_vectors, Er, vec)
    got = rule._row_tail_tile(n_vectors, Er, vec, tile, ext, [0, 1, 2, 3], 3, 2, padded)
    assert got == expect


@pytest.mark.parametrize("make, shape", [
    (lambda: nn.Sequential(nn.Conv2d(32, 256, 1), nn.ReLU()), (1, 32, 8, 7)),    # 7 wide: 6 rows + 1
    (lambda: nn.Sequential(nn.Conv2d(64, 128, 3, padding=1), nn.ReLU()), (1, 64, 7, 7)),  # AVX2: 49 pixels
    (lambda: nn.Sequential(nn.Conv2d(32, 128, 3, 2, padding=1), nn.Hardtanh()), (1, 32, 28, 28)),  # 14x14
    (lambda: nn.Sequential(nn.Linear(64, 512), nn.GELU()), (61, 64)),             # 61 rows: 10 x 6 + 1
    (lambda: nn.Sequential(nn.Conv2d(16, 256, 3, padding=1), nn.ReLU()), (1, 16, 9, 56)),  # 56 wide, padded
])
def test_row_tail_tiles_compute_what_the_unscheduled_kernel_computes(make, shape):
    """Kernels whose register tile leaves a partial last row tile (on AVX2 and AVX-512 hosts alike) give the
    unscheduled kernel's results bit for bit, the guarded tail rows included."""
    check_scheduled_equals_unscheduled(make().eval(), torch.randn(*shape))


def _flatten_decision(model, x, vec):
    """What PackedGemm._plan_rows decides to merge for the one conv kernel of `model`, for SIMD facts `vec`."""
    rule = schedules.PackedGemm()
    for _, func, sch, main in reduction_kernels(model, x):
        ivs = list(sch.get(main).iter_vars)
        ext = [schedules._int(iv.dom.extent) for iv in ivs]
        vi, ri = schedules.PackedGemm._output_axes(sch.get(main))
        spatial = [i for i, iv in enumerate(ivs) if int(iv.iter_type) == tirx.IterVar.DataPar]
        n_vectors = ext[vi] // vec.lanes("float32")
        tile = rule._choose_tile(n_vectors, ext[ri], vec)
        return rule._plan_rows(sch, main, func, n_vectors, vec, tile, ext, spatial, vi, ri, True)[1]
    raise AssertionError("no reduction kernel")


def test_small_images_merge_rows_and_width_on_16_register_targets():
    """A 7x7 conv output on AVX2 (16 registers: 7 wide allows only 7x1 or 1x8 tiles) is tiled over one
    49-pixel axis with a 6x2 tile; AVX-512 (32 registers, 7x3 fits) keeps rows and width; a 56-wide image
    is not merged (its width takes a 6-row tile with a 2-row tail)."""
    conv = nn.Sequential(nn.Conv2d(64, 128, 3, padding=1), nn.ReLU())
    got = _flatten_decision(conv, torch.randn(1, 64, 7, 7), schedules.CpuVector(32, 16))
    assert got is not None and got[0][1] == 7 and got[1] == (6, 2)
    assert _flatten_decision(conv, torch.randn(1, 64, 7, 7), schedules.CpuVector(64, 32)) is None
    assert _flatten_decision(conv, torch.randn(1, 64, 56, 56), schedules.CpuVector(32, 16)) is None


@pytest.mark.parametrize("make, shape", [
    (lambda: nn.Sequential(nn.Conv2d(64, 128, 3, padding=1), nn.ReLU()), (1, 64, 7, 7)),
    (lambda: nn.Sequential(nn.Conv2d(32, 64, 3, 2, padding=1), nn.ReLU6()), (2, 32, 28, 28)),
])
def test_merged_pixel_axis_builds_for_avx2_bit_for_bit(make, shape, monkeypatch):
    """The merged-pixel schedule (taken on 16-register targets) built for x86:haswell, whose code runs on
    any AVX2 or AVX-512 host, computes what the unscheduled kernel computes, bit for bit."""
    monkeypatch.setitem(globals(), "HOST", resolve_target("x86:haswell"))
    check_scheduled_equals_unscheduled(make().eval(), torch.randn(*shape))


def test_whole_tensor_max_and_min_are_vectorized_and_exact():
    """x.max() / x.amin() (dynamic quantization's activation range): ScalarMinMax splits them into SIMD
    running extrema; the unscheduled loop's value bit for bit (max/min reassociate exactly, +-Inf included),
    and with graphopt's NaN-propagating min/max (applied by the build, not by these helpers) PyTorch's NaN; a
    whole-tensor sum stays with the rules that do not reassociate."""
    class Extrema(nn.Module):
        def forward(self, x):
            return x.max(), x.amin(), x.abs().amax()

    x = torch.randn(2, 64, 96)
    mod, _ = lowered(Extrema().eval(), x)
    _, stats = build_with(mod)
    assert stats.by_rule.get("ScalarMinMax", 0) == 3 and not stats.unscheduled
    opt = graphopt.optimize(Extrema().eval(), target="x86", pipeline="", example_inputs=(x,))
    finite = []
    for special in (None, float("inf"), -float("inf"), float("nan")):
        y = x.clone()
        if special is not None:
            y[1, 17, 5] = special
        if special == special:
            finite.append(y)
        for g, r in zip(opt(y), Extrema()(y)):
            assert torch.equal(g, r) or (g.isnan() and r.isnan()), (special, g, r)
    check_scheduled_equals_unscheduled(Extrema().eval(), *finite)      # one pair of builds, every input

    class Total(nn.Module):
        def forward(self, x):
            return x.sum()

    mod, _ = lowered(Total().eval(), x)
    assert "ScalarMinMax" not in build_with(mod)[1].by_rule


def test_convolutions_before_multihead_attention_still_take_nhwc():
    """nn.MultiheadAttention's export squeezes axis -2; TVM's ConvertLayout died on the negative axis
    (std::bad_alloc) and the whole network kept NCHW convolutions. Axes are made non-negative first."""
    import warnings

    class ConvAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            y = torch.relu(self.conv(x)).flatten(2).transpose(1, 2)
            return self.mha(y, y, y, need_weights=False)[0]

    torch.manual_seed(0)
    model, x = ConvAttention().eval(), torch.randn(1, 3, 8, 7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # the NCHW fall-back is a warning
        mod, _ = lowered(model, x)
        layouts = [str(e.attrs.data_layout) for e in _calls(legalized_relax(mod), "relax.nn.conv2d")]
    assert layouts == ["NHWC"]
    opt = graphopt.optimize(model, target="x86", example_inputs=(x,))
    torch.testing.assert_close(opt(x), model(x), rtol=1e-5, atol=1e-5)


def legalized_relax(mod):
    """The Relax module after graphopt's layout passes (before legalization)."""
    target = HOST.tvm_target()
    with target:
        return tvm.transform.Sequential(schedules.relax_layout_passes(target))(mod)


def _calls(mod, name):
    found = []

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == name:
            found.append(e)

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return found


@pytest.mark.parametrize("mcpu", ["haswell", "skylake-avx512"])
@pytest.mark.parametrize("make, shape, workspaces", [
    (lambda: nn.Sequential(nn.Conv2d(32, 256, 3, padding=1), nn.ReLU()), (1, 32, 14, 14), 2),  # + padded copy
    (lambda: nn.Linear(256, 512), (7, 256), 1),          # the weight panels
])
def test_register_tile_is_a_stack_buffer_not_a_heap_workspace(make, shape, workspaces, mcpu):
    """PackedGemm's accumulator tile must reach LLVM as a stack alloca (TVM 0.27 lowers only constant
    'global' buffers under 1 KiB so; 'local' or larger ones become TVMBackendAllocWorkspace calls, which LLVM
    cannot keep in registers once an input is also a workspace: a store per FMA). Counted in the LLVM IR of
    each compiled kernel, on both register files (AVX2 16 x 32 B, AVX-512 32 x 64 B): the only workspaces
    left are the weight panels (split out and folded at build time in a real build) and a convolution's
    padded input copy."""
    import tvm

    target = tvm.target.Target({"kind": "llvm", "mcpu": mcpu, "mtriple": "x86_64-linux-gnu"})
    kernels = list(reduction_kernels(make(), torch.randn(*shape)))
    assert kernels
    for name, func, _, _ in kernels:
        sch = schedules.PackedGemm()._apply(func, target)
        assert sch is not None, name
        src = tvm.compile(tvm.IRModule({"k": sch.mod["main"].with_attr("global_symbol", "k")}),
                          target=target).mod.inspect_source("ll")
        calls = len(re.findall(r"load ptr, ptr @__TVMBackendAllocWorkspace", src))
        assert calls == workspaces, (name, mcpu, calls)


def _dynamic_func(build):
    """A PrimFunc over a symbolic row count `n` (int64, like Relax's dynamic dims) from a TE builder."""
    from tvm import te

    n = tirx.Var("n", "int64")
    return n, te.create_prim_func(list(build(n, te)))


@pytest.mark.parametrize("heads, width", [(4, 64), (2, 8)])     # large static part: parallel + partitioned tail
def test_dynamic_transpose_is_vectorized_with_a_partitioned_tail(heads, width):
    """Injective on a dynamic transpose (attention keys [n, h, d] -> [h, d, n]): scheduled (not left to the
    unscheduled path), its dynamic vector loop marked for LoopPartition and kept out of the fused parallel
    loop; the compiled kernel equals numpy at sizes that do and do not fill whole vectors."""
    import tvm

    def build(n, te):
        a = te.placeholder((n, heads, width), name="a")
        return a, te.compute((heads, width, n), lambda h, d, i: a[i, h, d], name="t")

    _, func = _dynamic_func(build)
    target = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
    sch = schedules.Injective()._apply(func, target)
    assert sch is not None
    assert "pragma_loop_partition_hint" in sch.mod.script()
    lib = tvm.compile(sch.mod, target=target)
    for n in (5, 16, 37):
        a = np.random.default_rng(n).standard_normal((n, heads, width)).astype("float32")
        out = tvm.runtime.tensor(np.zeros((heads, width, n), "float32"))
        lib["main"](tvm.runtime.tensor(a), out)
        np.testing.assert_array_equal(out.numpy(), a.transpose(1, 2, 0))



def test_dynamic_transpose_keeps_each_rows_vectors_serial_in_the_parallel_loop():
    """Injective on the attention heads' transpose of a dynamic sequence ([n, h, 64] -> [h, n, 64]): the parallel
    loop runs over whole 64-float rows and each row's vectors are a serial loop inside it (fused into the
    parallel loop, every vector paid for the fused index's divisions by the symbolic extent); the compiled
    kernel equals numpy at every size."""
    import tvm

    def build(n, te):
        a = te.placeholder((n, 4, 64), name="a")
        return a, te.compute((4, n, 64), lambda h, i, d: a[i, h, d], name="t")

    _, func = _dynamic_func(build)
    target = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
    sch = schedules.Injective()._apply(func, target)
    assert sch is not None
    lines = [ln.strip() for ln in sch.mod.script().splitlines() if ln.strip().startswith("for ")]
    assert len(lines) == 3 and "T.parallel(" in lines[0] and "8" not in lines[0], lines
    assert "range(8)" in lines[1] and "T.vectorized(8)" in lines[2], lines
    lib = tvm.compile(sch.mod, target=target)
    for n in (1, 5, 37):
        a = np.random.default_rng(n).standard_normal((n, 4, 64)).astype("float32")
        out = tvm.runtime.tensor(np.zeros((4, n, 64), "float32"))
        lib["main"](tvm.runtime.tensor(a), out)
        np.testing.assert_array_equal(out.numpy(), a.transpose(1, 0, 2))


def test_dynamic_row_mean_reads_its_padded_rows_in_place():
    """PackedGemm on a row mean over a dynamic row count ([n, 256] -> [n, 1], the layer norm guard of a dynamic
    sequence): the rows are padded to whole tiles and the padded ones read the last real row in place (no copy,
    no guard in the reduction loop: only the write-back is guarded); the kernel equals the unscheduled one bit
    for bit at row counts that do and do not fill a tile, inf and NaN included."""
    import tvm
    from tvm import topi

    def build(n, te):
        x = te.placeholder((n, 256), name="x")
        return x, topi.divide(topi.sum(x, axis=1, keepdims=True), 256.0)

    _, func = _dynamic_func(build)
    target = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
    sch = schedules.PackedGemm()._apply(func, target)
    assert sch is not None
    text = sch.mod.script()
    assert "T.min(" in text and text.count("T.where(") == 1, text
    fast = tvm.compile(sch.mod, target=target)
    plain = tvm.compile(tvm.IRModule({"main": func}), target=target)
    for n in (1, 5, 8, 13):
        x = np.random.default_rng(n).standard_normal((n, 256)).astype("float32") * 4
        x[n - 1, 3] = np.inf
        x[0, 7] = np.nan if n > 1 else x[0, 7]
        np.testing.assert_array_equal(_run_rows(fast, x, (n, 1)), _run_rows(plain, x, (n, 1)))


def test_dynamic_long_rows_keep_runs_of_vectors_in_the_parallel_loop():
    """A dynamic batch of long rows ([n, 4096] + 1, an MLP activation at batch 1): runs of 16 vectors stay serial,
    the runs join the parallel loop (a batch-1 row still splits across cores); values exact at every size."""
    import tvm

    def build(n, te):
        a = te.placeholder((n, 4096), name="a")
        return a, te.compute((n, 4096), lambda i, j: a[i, j] + 1.0, name="t")

    _, func = _dynamic_func(build)
    target = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
    sch = schedules.Injective()._apply(func, target)
    assert sch is not None
    lines = [ln.strip() for ln in sch.mod.script().splitlines() if ln.strip().startswith("for ")]
    assert len(lines) == 3 and "T.parallel(" in lines[0] and "32" in lines[0], lines      # n x 32 runs
    assert "range(16)" in lines[1] and "T.vectorized(8)" in lines[2], lines
    lib = tvm.compile(sch.mod, target=target)
    for n in (1, 3):
        a = np.random.default_rng(n).standard_normal((n, 4096)).astype("float32")
        out = tvm.runtime.tensor(np.zeros((n, 4096), "float32"))
        lib["main"](tvm.runtime.tensor(a), out)
        np.testing.assert_array_equal(out.numpy(), a + np.float32(1.0))

def test_dynamic_attention_matmul_copies_in_parallel_and_stores_whole_vectors():
    """PackedGemm on an attention-score matmul over a dynamic batch x heads and a dynamic sequence
    (q [b, n, 64] @ kᵀ [b, 64, n]): q's padded rows are read in place, clamped to the last real row (no copy:
    `_clamp_pad_block`); kᵀ's padded columns (its innermost axis, where a clamp would make the vector loads
    gathers) stay a padded copy that runs in parallel (two dynamic dims make even a 64-element static part
    large enough); the write-back's dynamic column loop is marked for LoopPartition (whole vectors without a
    per-lane guard), and the result equals numpy's at lengths that fill whole tiles and not."""
    import tvm
    from tvm import te

    b, n = tirx.Var("b", "int64"), tirx.Var("n", "int64")
    d = tirx.IntImm("int64", 64)
    q = te.placeholder((b, n, d), name="q")
    k = te.placeholder((b, d, n), name="k")
    r = te.reduce_axis((tirx.IntImm("int64", 0), d), name="r")
    s = te.compute((b, n, n), lambda h, i, j: te.sum(q[h, i, r] * k[h, r, j], axis=r), name="s")
    func = te.create_prim_func([q, k, s])
    target = tvm.target.Target({"kind": "llvm", "mcpu": "haswell", "num-cores": 2})
    sch = schedules.PackedGemm()._apply(func, target)
    assert sch is not None
    text = sch.mod.script()
    # kᵀ's padded copy and the GEMM, once per tile: 8 x 1 where n <= 16 (a second tile in the same kernel; the
    # lengths below run it and the large one), and the large tile (6 x 2) twice: rows in chunks where one
    # head's queries outgrow the caches (n x 64 floats > 1 MiB, PackedGemm._large: a panel of kᵀ belongs to one
    # head, so a panel pass reads that head's rows only, however many heads), plain below
    assert text.count("T.parallel(") == 6 and "if n <= T.int64(16)" in text, text
    assert "if not n * T.int64(256) > T.int64(1048576)" in text, text
    assert "q_pad" not in text and "k_pad" in text and "T.min(" in text, text
    assert text.count("pragma_loop_partition_hint") >= 4  # the column copies' tails and the write-backs'
    lib = tvm.compile(sch.mod, target=target)
    for bs, length in ((4, 1), (4, 7), (1, 32), (3, 45)):
        rng = np.random.default_rng(length)
        qa = rng.standard_normal((bs, length, 64)).astype("float32")
        ka = rng.standard_normal((bs, 64, length)).astype("float32")
        out = tvm.runtime.tensor(np.zeros((bs, length, length), "float32"))
        lib["main"](tvm.runtime.tensor(qa), tvm.runtime.tensor(ka), out)
        np.testing.assert_allclose(out.numpy(), qa @ ka, rtol=1e-5, atol=1e-5)


def test_dynamic_attention_scores_keep_their_accumulators_in_registers():
    """Attention's scores over a dynamic batch x heads and sequence (q [b, n, 64] @ kᵀ [b, 64, n]), large tile:
    the row tiles are a serial loop in each (head, column panel) task, not fused into the parallel loop
    (names: no row tile i_0 in a GEMM's parallel loop, only row chunks i_0_0 where rows are chunked); the 6 x 2 register tile is copied to a buffer of its own
    ("local") before the write-back's run-time column split, so the accumulators have constant offsets and
    LLVM keeps them in registers (no stack access in the reduction loop: with the write-back reading them
    at run-time offsets, it stored and reloaded some every step). Values equal numpy's at lengths that fill
    whole tiles and not."""
    import tvm
    from tvm import te

    b, n = tirx.Var("b", "int64"), tirx.Var("n", "int64")
    d = tirx.IntImm("int64", 64)
    q, k = te.placeholder((b, n, d), name="q"), te.placeholder((b, d, n), name="k")
    r = te.reduce_axis((tirx.IntImm("int64", 0), d), name="r")
    s = te.compute((b, n, n), lambda h, i, j: te.sum(q[h, i, r] * k[h, r, j], axis=r), name="s")
    func = te.create_prim_func([q, k, s])
    gemms = [name for name in _parallel_loops(func) if "j_0" in name]
    assert gemms and not any(name.endswith("_i_0_fused") for name in gemms), gemms   # (i_0_0: row chunks)
    target = tvm.target.Target({"kind": "llvm", "mcpu": "haswell", "num-cores": 2})
    sch = schedules.PackedGemm()._apply(func, target)
    assert 'scope="local"' in sch.mod.script()
    lib = tvm.compile(sch.mod, target=target)
    asm = lib.mod.imports[0].inspect_source("asm") if lib.mod.imports else lib.mod.inspect_source("asm")
    loops = [block for block in re.split(r"\n(?=\.LBB\d+_\d+:)", asm) if block.count("vfmadd") >= 12]
    assert loops, "no 6 x 2 reduction loop found"
    for block in loops:
        body = block.split("\n\tj")[0]                      # up to the loop's branch
        assert "(%rsp)" not in body, body
    for bs, length in ((2, 17), (1, 48), (3, 45), (2, 100)):
        rng = np.random.default_rng(length)
        qa = rng.standard_normal((bs, length, 64)).astype("float32")
        ka = rng.standard_normal((bs, 64, length)).astype("float32")
        qa[0, length - 1, 0] = np.inf
        out = tvm.runtime.tensor(np.zeros((bs, length, length), "float32"))
        lib["main"](tvm.runtime.tensor(qa), tvm.runtime.tensor(ka), out)
        with np.errstate(invalid="ignore"):
            np.testing.assert_allclose(out.numpy(), qa @ ka, rtol=1e-5, atol=1e-5)


def _parallel_loops(func, mcpu: str = "haswell") -> list[str]:
    """The names of the parallel loops PackedGemm gives `func` (a fused loop's name lists its axes in order)."""
    import tvm

    target = tvm.target.Target({"kind": "llvm", "mcpu": mcpu, "num-cores": 2})
    sch = schedules.PackedGemm()._apply(func, target)
    assert sch is not None
    return re.findall(r"for (\w+) in T.parallel", sch.mod.script())


def test_per_batch_column_panels_follow_their_batch_axis():
    """Attention's scores (q [b, n, 64] @ kᵀ [b, 64, n]): kᵀ's column panels belong to one batch (head), so the
    column blocks (j_0) go inside the batch axis (h), not outermost, where each panel pass re-read every
    head's queries; a Linear's weight, shared by every row, keeps its panels outermost (j_0 first)."""
    from tvm import te

    b, n = tirx.Var("b", "int64"), tirx.Var("n", "int64")
    d = tirx.IntImm("int64", 64)
    q, k = te.placeholder((b, n, d), name="q"), te.placeholder((b, d, n), name="k")
    r = te.reduce_axis((tirx.IntImm("int64", 0), d), name="r")
    s = te.compute((b, n, n), lambda h, i, j: te.sum(q[h, i, r] * k[h, r, j], axis=r), name="s")
    gemms = [name for name in _parallel_loops(te.create_prim_func([q, k, s])) if "j_0" in name]
    assert gemms and all(name.startswith("h_") for name in gemms), gemms
    x, w = te.placeholder((96, 512), name="x"), te.placeholder((512, 1024), name="w")     # 2 MiB: panels
    r = te.reduce_axis((tirx.IntImm("int64", 0), tirx.IntImm("int64", 512)), name="r")
    mm = te.compute((96, 1024), lambda i, j: te.sum(x[i, r] * w[r, j], axis=r), name="mm")
    assert _parallel_loops(te.create_prim_func([x, w, mm])) == ["j_0_i_0_fused"]


@pytest.mark.parametrize("rows, chunked", [(None, True), (1536, True), (1024, False), (96, False)])
def test_many_rows_under_large_weights_are_taken_in_chunks(rows, chunked):
    """x [rows, 256] @ w [256, 1024] (1 MiB of weights: column panels outermost): where the rows' operand
    outgrows the caches (`resident_bytes`, 1 MiB: 1,024 rows here; a dynamic row count always may), the rows
    go in chunks outermost (i_0_0), then the panels (j_0), each pass running over the chunk's tiles in a serial
    loop; fewer rows keep the plain panel order (j_0, then every row tile i_0). The chunked kernels equal numpy;
    the dynamic one holds both orders and takes the chunks past 1 MiB of rows at run time (PackedGemm._large):
    counts below, and above with a partial last chunk (192 rows each here) and tile."""
    import tvm
    from tvm import te

    i64 = lambda v: tirx.IntImm("int64", v)    # noqa: E731 - every axis int64, as in lowered models (int32 static
    # axes beside an int64 row count overflow TIR's buffer compaction with or without chunks)
    n = tirx.Var("n", "int64") if rows is None else i64(rows)
    x, w = te.placeholder((n, i64(256)), name="x"), te.placeholder((i64(256), i64(1024)), name="w")
    r = te.reduce_axis((i64(0), i64(256)), name="r")
    mm = te.compute((n, i64(1024)), lambda i, j: te.sum(x[i, r] * w[r, j], axis=r), name="mm")
    func = te.create_prim_func([x, w, mm])
    loops = _parallel_loops(func)
    # (a dynamic row count also has the second tile for up to small_rows rows: one chunk, the plain order)
    assert ("i_0_0_j_0_fused" in loops) == chunked and ("j_0_i_0_fused" in loops) == (not chunked or rows is None)
    if chunked:
        target = tvm.target.Target({"kind": "llvm", "mcpu": "haswell", "num-cores": 2})
        lib = tvm.compile(schedules.PackedGemm()._apply(func, target).mod, target=target)
        wa = np.random.default_rng(0).standard_normal((256, 1024)).astype("float32")
        for count in (1, 17, 200, 401, 1025, 4501) if rows is None else (rows,):
            xa = np.random.default_rng(count).standard_normal((count, 256)).astype("float32")
            out = tvm.runtime.tensor(np.full((count, 1024), np.nan, "float32"))
            lib["main"](tvm.runtime.tensor(xa), tvm.runtime.tensor(wa), out)
            np.testing.assert_allclose(out.numpy(), xa @ wa, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("vec, small, large, counts", [
    (schedules.CpuVector(32, 16), (4, 2), (6, 2), [1, 2, 3, 4, 7, 8]),      # 8 accumulators of 10: 80% speed
    (schedules.CpuVector(64, 32), (4, 2), (3, 4), [4, 7, 8, 16]),           # 8 of 8: full speed, fewer rows
])
def test_small_tile_runs_for_the_row_counts_it_computes_sooner(vec, small, large, counts):
    """PackedGemm._faster_for, the run-time choice between the two tiles of a dynamic row count: padded rows
    over FMA throughput (full from vec.fmas_in_flight accumulators up); the same arithmetic on Python ints
    (here) and on the symbolic count (in the kernel)."""
    faster = schedules.PackedGemm._faster_for
    assert schedules.PackedGemm.small_rows == 16          # the second tile exists for up to 16 rows
    assert [n for n in range(1, 17) if faster(n, small, large, vec)] == counts
    assert not isinstance(faster(tirx.Var("n", "int64"), small, large, vec), bool)     # an expression


@pytest.mark.parametrize("rows, k, padded", [(512, 256, True), (512, 32, False), (56, 576, False)])
def test_static_rows_past_l2_are_padded_not_tailed(rows, k, padded):
    """x [rows, k] @ w [k, 256] on AVX2, where 6 x 2 tiles leave a tail: rows whose operand outgrows L2
    (`row_chunk_bytes`: 512 x 256 floats) are padded to whole tiles and read clamped to the last real row, like
    dynamic ones (a serial loop of tiles + tail in each iteration re-read all of them once per panel); a short
    operand, and an image row of a conv (56 pixels x 576), keep the tail. Both equal numpy."""
    import tvm
    from tvm import te

    i64 = lambda v: tirx.IntImm("int64", v)    # noqa: E731
    x, w = te.placeholder((i64(rows), i64(k)), name="x"), te.placeholder((i64(k), i64(256)), name="w")
    r = te.reduce_axis((i64(0), i64(k)), name="r")
    mm = te.compute((i64(rows), i64(256)), lambda i, j: te.sum(x[i, r] * w[r, j], axis=r), name="mm")
    func = te.create_prim_func([x, w, mm]).with_attr("layout_free_buffers", [1])
    target = tvm.target.Target({"kind": "llvm", "mcpu": "haswell", "num-cores": 2})
    sch = schedules.PackedGemm()._apply(func, target)
    text = sch.mod.script()
    assert "T.unroll(T.int64(6))" in text, text
    assert ("T.min(" in text) == padded, text
    lib = tvm.compile(sch.mod, target=target)
    rng = np.random.default_rng(rows + k)
    xa, wa = rng.standard_normal((rows, k)).astype("float32"), rng.standard_normal((k, 256)).astype("float32")
    out = tvm.runtime.tensor(np.full((rows, 256), np.nan, "float32"))
    lib["main"](tvm.runtime.tensor(xa), tvm.runtime.tensor(wa), out)
    np.testing.assert_allclose(out.numpy(), xa @ wa, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("mcpu", ["haswell", "skylake-avx512"])
def test_dynamic_row_linear_reads_its_input_in_place_and_matches_numpy(mcpu):
    """A Linear over a dynamic row count (x [n, 96] @ w [96, 80] + bias, w constant-shaped): the register tile
    pads the rows to whole tiles, the padded rows read the last real row (clamped, no padded copy of x) and
    are never written back, so every row count, whole tiles or not (or none), equals numpy."""
    import tvm
    from tvm import te

    n = tirx.Var("n", "int64")
    x = te.placeholder((n, 96), name="x")
    w = te.placeholder((96, 80), name="w")
    bias = te.placeholder((80,), name="bias")
    r = te.reduce_axis((tirx.IntImm("int64", 0), tirx.IntImm("int64", 96)), name="r")
    mm = te.compute((n, 80), lambda i, j: te.sum(x[i, r] * w[r, j], axis=r), name="mm")
    out = te.compute((n, 80), lambda i, j: mm[i, j] + bias[j], name="out")
    func = te.create_prim_func([x, w, bias, out])
    target = tvm.target.Target({"kind": "llvm", "mcpu": mcpu, "num-cores": 2})
    sch = schedules.PackedGemm()._apply(func, target)
    assert sch is not None
    text = sch.mod.script()
    # one parallel loop per register tile and order: rows outermost for many rows, panels outermost with each
    # tile for up to 16 (the sizes below run all three)
    assert "x_pad" not in text and "T.min(" in text and text.count("T.parallel(") == 3, text
    if not runs_here(mcpu):
        return                          # AVX-512 code on an AVX2 host: the schedule's text is checked above
    lib = tvm.compile(sch.mod, target=target)
    for rows in (0, 1, 2, 3, 5, 7, 8, 13, 17, 22):   # 0: no tile runs, so no clamped read of row -1
        rng = np.random.default_rng(rows)
        xa = rng.standard_normal((rows, 96)).astype("float32")
        wa = rng.standard_normal((96, 80)).astype("float32")
        ba = rng.standard_normal(80).astype("float32")
        o = tvm.runtime.tensor(np.full((rows, 80), np.nan, "float32"))
        lib["main"](tvm.runtime.tensor(xa), tvm.runtime.tensor(wa), tvm.runtime.tensor(ba), o)
        np.testing.assert_allclose(o.numpy(), xa @ wa + ba, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("mcpu, tiles", [("haswell", ("6 x 2", "4 x 2")), ("skylake-avx512", ("3 x 4", "4 x 2"))])
def test_dynamic_row_linear_takes_a_second_tile_for_small_row_counts(mcpu, tiles, monkeypatch):
    """A Linear with a constant weight over a dynamic row count: the register tile for many rows (AVX2 6 x 2
    vectors, AVX-512 3 x 4) would compute 18 rows for 16, so the kernel also holds a 4 x 2 tile for the counts
    up to 16 (a test at run time); the weight is packed once, into panels both tiles read. This weight is
    small (L2-resident), so the large tile's rows go outermost, each (row tile, panel) task reading its panel
    anew; for every count up to 16 the panels run in parallel and the few row tiles in turn, with the small
    tile where it computes the rows sooner (PackedGemm._faster_for), else the large one (a larger weight, its
    panels outermost in both: the small tile only where it computes the rows sooner). Every row count equals
    the kernel without the second tile bit for bit (each output sums its products in the same order whichever
    tile computes it) and numpy."""
    import tvm
    from tvm import te

    def linear(width: int):
        n, c = tirx.Var("n", "int64"), tirx.IntImm("int64", 256)     # int64 shapes, as Relax's
        cols = tirx.IntImm("int64", width)
        x = te.placeholder((n, c), name="x")
        w = te.placeholder((c, cols), name="w")
        bias = te.placeholder((cols,), name="bias")
        r = te.reduce_axis((tirx.IntImm("int64", 0), c), name="r")
        mm = te.compute((n, cols), lambda i, j: te.sum(x[i, r] * w[r, j], axis=r), name="mm")
        out = te.compute((n, cols), lambda i, j: mm[i, j] + bias[j], name="out")
        return te.create_prim_func([x, w, bias, out]).with_attr("layout_free_buffers", [1])

    func = linear(256)
    target = tvm.target.Target({"kind": "llvm", "mcpu": mcpu, "num-cores": 2})
    sch = schedules.PackedGemm()._apply(func, target)
    wide = schedules.PackedGemm()._apply(linear(1024), target).mod.script()       # a 1 MB weight
    monkeypatch.setattr(schedules.PackedGemm, "small_rows", 0)
    one = schedules.PackedGemm()._apply(func, target)
    assert sch is not None and one is not None
    text, one_text = sch.mod.script(), one.mod.script()
    assert "if n <= T.int64(16):" in text, text
    assert "if n <= T.int64(16) and (n + T.int64(3)) // T.int64(4) * T.int64(4) *" in wide, wide
    assert text.count("T.parallel(") == 3, text
    # up to 16 rows: the tile that computes them sooner, both over panels in parallel
    assert "if (n + T.int64(3)) // T.int64(4) * T.int64(4) *" in text, text     # the 4 x 2 tile's padded rows
    lanes = 8 if mcpu == "haswell" else 16
    small_width = int(tiles[1].split(" x ")[1]) * lanes
    assert f"T.parallel(T.int64({256 // small_width})):" in text, text      # the small tile's: over panels
    assert text.count("meta_schedule.layout_rewrite_preproc") == 1, text      # one packed copy of w
    large, small = (tuple(int(v) for v in t.split(" x ")) for t in tiles)
    for (rows, nvec), kernel in ((large, text), (small, text), (large, one_text)):
        assert f"T.unroll(T.int64({rows})):" in kernel and f"T.unroll(T.int64({nvec})):" in kernel
    assert f"w_global = T.sblock_alloc_buffer((T.int64({256 // (small[1] * lanes)})," in text, text
    assert "if n" not in one_text
    if not runs_here(mcpu):
        return                          # AVX-512 code on an AVX2 host: the schedule's text is checked above
    libs = [tvm.compile(s.mod, target=target) for s in (sch, one)]
    for rows in (0, 1, 5, 8, 15, 16, 17, 18, 40):
        rng = np.random.default_rng(rows)
        xa = rng.standard_normal((rows, 256)).astype("float32")
        wa = rng.standard_normal((256, 256)).astype("float32")
        ba = rng.standard_normal(256).astype("float32")
        outs = []
        for lib in libs:
            o = tvm.runtime.tensor(np.full((rows, 256), np.nan, "float32"))
            lib["main"](tvm.runtime.tensor(xa), tvm.runtime.tensor(wa), tvm.runtime.tensor(ba), o)
            outs.append(o.numpy())
        np.testing.assert_array_equal(outs[0], outs[1])
        np.testing.assert_allclose(outs[0], xa @ wa + ba, rtol=1e-5, atol=1e-4)


def test_dynamic_softmax_rows_are_scheduled_per_row_and_bit_exact():
    """DynamicRows takes a softmax over a dynamic row length (the attention scores of a dynamic sequence):
    reductions parallel over rows and sequential along them (the reference order), elementwise passes
    vectorized with partitioned tails, so the result equals the unscheduled kernel's bit for bit at every
    size; a static softmax is left to dlight's rule."""
    import tvm
    from tvm import topi

    def build(n, te):
        x = te.placeholder((3, n, n), name="x")
        return x, topi.nn.softmax(x, axis=-1)

    _, func = _dynamic_func(build)
    target = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
    sch = schedules.DynamicRows()._apply(func, target)
    assert sch is not None
    assert "T.parallel" in sch.mod.script() and "pragma_loop_partition_hint" in sch.mod.script()
    fast = tvm.compile(sch.mod, target=target)
    plain = tvm.compile(tvm.IRModule({"main": func}), target=target)
    for n in (1, 8, 19):
        x = np.random.default_rng(n).standard_normal((3, n, n)).astype("float32") * 4
        x[0, 0, 0] = np.inf if n > 1 else x[0, 0, 0]
        outs = []
        for lib in (fast, plain):
            out = tvm.runtime.tensor(np.zeros((3, n, n), "float32"))
            lib["main"](tvm.runtime.tensor(x), out)
            outs.append(out.numpy())
        np.testing.assert_array_equal(outs[0], outs[1])

    from tvm import te
    xs = te.placeholder((3, 8, 8), name="x")
    static = te.create_prim_func([xs, topi.nn.softmax(xs, axis=-1)])
    assert schedules.DynamicRows()._apply(static, target) is None



@pytest.mark.parametrize("mcpu, lanes", [("haswell", 8), ("skylake-avx512", 16)])
def test_row_groups_take_a_dynamic_row_length(mcpu, lanes):
    """The attention softmax of a dynamic sequence (rows as long as the sequence): RowGroups takes it (groups
    of 8 rows, the group's temporaries at the group, each row's vectors split from its guarded tail) and the
    result equals the unscheduled kernel's bit for bit at lengths that do and do not fill whole vectors and
    groups, inf and NaN included."""
    import tvm
    from tvm import topi

    def build(n, te):
        x = te.placeholder((2, 3, n, n), name="x")
        return x, topi.nn.fast_softmax(x, axis=-1)

    _, func = _dynamic_func(build)
    target = tvm.target.Target({"kind": "llvm", "mcpu": mcpu})
    sch = schedules.RowGroups()._apply(func, target)
    assert sch is not None and "T.unroll(T.int64(8))" in sch.mod.script()
    assert f"T.vectorized(T.int64({lanes}))" in sch.mod.script() and "pragma_loop_partition_hint" in sch.mod.script()
    if not runs_here(mcpu):
        return                          # AVX-512 code on an AVX2 host: the schedule's text is checked above
    fast = tvm.compile(sch.mod, target=target)
    plain = tvm.compile(tvm.IRModule({"main": func}), target=target)
    for n in (1, 5, 8, 16, 19, 37):
        x = np.random.default_rng(n).standard_normal((2, 3, n, n)).astype("float32") * 4
        x[1, 2, n - 1, n // 2] = np.inf
        x[0, 1, n // 3, 0] = np.nan
        np.testing.assert_array_equal(_run_rows(fast, x, x.shape), _run_rows(plain, x, x.shape))

def _run_rows(lib, x, shape):
    out = tvm.runtime.tensor(np.zeros(shape, "float32"))
    lib["main"](tvm.runtime.tensor(x), out)
    return out.numpy()


@pytest.mark.parametrize("batch", [1, 2, "dynamic"])
def test_row_groups_take_a_dynamic_row_count_with_a_guarded_last_group(batch):
    """RowGroups on a layer norm over a dynamic row count (a dynamic sequence) and a static row length: groups
    of 8 rows, the last one guarded and split off by LoopPartition; each row's sums in the reference order, so
    the result equals the unscheduled kernel's bit for bit at row counts that do and do not fill whole groups
    (inf and NaN too). With one batch row the groups run in parallel (a core would be idle); with two or more
    the batch rows do, each one's groups in order (one stretch of memory each: the small encoder's layer norms
    at 32 x 128, groups outermost, took twice the static build's time); a dynamic batch chooses at run time."""
    from tvm import topi

    def build(n, te):
        lead = tvm.tirx.Var("b", "int64") if batch == "dynamic" else batch
        x = te.placeholder((lead, n, 40), name="x")
        g, b = te.placeholder((40,), name="g"), te.placeholder((40,), name="b")
        return x, g, b, topi.nn.layer_norm(x, g, b, axis=[-1], epsilon=1e-5)

    _, func = _dynamic_func(build)
    target = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
    sch = schedules.RowGroups()._apply(func, target)
    assert sch is not None and "T.unroll(T.int64(8))" in sch.mod.script()
    assert "pragma_loop_partition_hint" in sch.mod.script()      # whole groups compile without the guard
    parallel = [line.strip() for line in sch.mod.script().splitlines() if "T.parallel(" in line]
    groups_parallel = [p for p in parallel if "// T.int64(8)" in p]
    if batch == 1:
        assert parallel == groups_parallel and len(parallel) == 1, parallel
    elif batch == 2:
        assert not groups_parallel and len(parallel) == 1 and "T.parallel(2)" in parallel[0], parallel
    else:
        assert len(parallel) == 2 and len(groups_parallel) == 1, parallel        # both, branched on b >= 2
    fast = tvm.compile(sch.mod, target=target)
    plain = tvm.compile(tvm.IRModule({"main": func}), target=target)
    rng = np.random.default_rng(0)
    g, b = (rng.standard_normal(40).astype("float32") for _ in range(2))
    for lead, n in ((batch, 1), (batch, 8), (batch, 13), (batch, 27)) if batch != "dynamic" else (
            (1, 13), (2, 8), (3, 27), (5, 1)):
        x = rng.standard_normal((lead, n, 40)).astype("float32") * 4
        x[lead - 1, n - 1, 3] = np.inf
        x[0, n // 2, 0] = np.nan
        outs = []
        for lib in (fast, plain):
            out = tvm.runtime.tensor(np.zeros((lead, n, 40), "float32"))
            lib["main"](*(tvm.runtime.tensor(a) for a in (x, g, b)), out)
            outs.append(out.numpy())
        np.testing.assert_array_equal(outs[0], outs[1])


def test_dynamic_rows_group_the_rows_of_a_static_length_reduction():
    """DynamicRows, for a softmax over a dynamic row count and a static row length that RowGroups declines
    (its last row axis, 3, divides by neither 8, 4 nor 2): the reductions take the fused rows in groups of 8
    (interleaved chains) with the tail split off, and stay bit for bit at every row count."""
    from tvm import topi

    def build(n, te):
        x = te.placeholder((n, 3, 24), name="x")
        return x, topi.nn.softmax(x, axis=-1)

    _, func = _dynamic_func(build)
    target = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
    sch = schedules.DynamicRows()._apply(func, target)
    assert sch is not None and "T.unroll(T.int64(8))" in sch.mod.script()
    fast = tvm.compile(sch.mod, target=target)
    plain = tvm.compile(tvm.IRModule({"main": func}), target=target)
    for n in (1, 5, 16, 21):
        x = np.random.default_rng(n).standard_normal((n, 3, 24)).astype("float32") * 4
        np.testing.assert_array_equal(_run_rows(fast, x, x.shape), _run_rows(plain, x, x.shape))


@pytest.mark.parametrize("dtype", ["float32", "uint8"])
def test_concat_at_a_symbolic_offset_is_exact(dtype):
    """A concat along a dynamic innermost axis whose second operand starts at a symbolic offset (here: x
    [n, m, k] padded with zeros to a multiple of 4, as the dynamic int8 matmul once did) picks between its
    operands by the index. With LoopPartition's hint on its vector loop, TVM 0.27 read the second operand
    everywhere (garbage at every size but the upper bound); the rule leaves such kernels unpartitioned."""
    from graphopt.backends.tvm.build import build_module

    bb = relax.BlockBuilder()
    n, m, k = (tirx.Var(v, "int64") for v in "nmk")
    x = relax.Var("x", relax.TensorType([n, m, k], dtype))
    with bb.function("main", [x]):
        with bb.dataflow():
            pad = relax.op.zeros(relax.ShapeExpr([n, m, (k + 3) // 4 * 4 - k]), dtype)
            out = bb.emit_output(bb.emit(relax.op.concat([x, pad], axis=2)))
        bb.emit_func_output(out)
    mod = bb.get()
    mod["main"] = mod["main"].with_attr("tir_var_upper_bound", {"n": 4, "m": 64, "k": 64})
    vm = relax.VirtualMachine(build_module(mod, resolve_target("x86")), tvm.cpu())
    rng = np.random.default_rng(0)
    for shape in ((1, 8, 8), (2, 16, 16), (3, 37, 37), (2, 5, 7), (4, 64, 64)):
        a = rng.integers(1, 100, shape).astype(dtype)
        ref = np.zeros(shape[:2] + ((shape[2] + 3) // 4 * 4,), dtype)
        ref[:, :, :shape[2]] = a
        np.testing.assert_array_equal(vm["main"](tvm.runtime.tensor(a)).numpy(), ref)


@pytest.mark.parametrize("target", X86_TARGETS)
def test_boolean_producers_of_a_reduction_are_inlined(target):
    """`(x == -inf).logical_not().any(-1)` (the row check of PyTorch's safe softmax, in every decomposed
    nn.MultiheadAttention): PackedGemm takes the max-reduction and inlines the comparison chain into it, so no
    kernel keeps a boolean buffer (left as loops of their own, LLVM spent seconds on their <N x i1> vectors on
    AVX2). Outputs equal PyTorch's, rows of -inf included."""
    class RowHasFinite(nn.Module):
        def forward(self, x):
            return (x == float("-inf")).logical_not().any(-1, keepdim=True)

    x = torch.randn(1, 8, 7, 7)
    x[0, 3, 2] = float("-inf")                      # a whole row of -inf
    x[0, 5, 4, :3] = float("-inf")
    captured = {}
    original = schedules.apply_default_schedules

    def keep(mod, tgt, rules=None):
        out = original(mod, tgt, rules)
        captured["mod"] = out[0]
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(schedules, "apply_default_schedules", keep)
        opt = graphopt.optimize(RowHasFinite().eval(), target=target, pipeline="", example_inputs=(x,))
    assert "PackedGemm" in opt.report.backend["kernels"], opt.report.backend["kernels"]
    for name, func in prim_funcs(captured["mod"]).items():
        text = func.script()
        assert not [line for line in text.splitlines() if "alloc_buffer" in line and '"bool")' in line], text
    assert torch.equal(opt(x), RowHasFinite()(x))


# ------------------------------------------------------------------------------------- gates (GateBroadcast)
class _Gate(nn.Module):
    """MobileNetV3's squeeze-excitation between its depthwise conv and projection: the second 1x1 conv of the
    pooled features, hard-sigmoid, times the map (FuseOps puts the multiply in that conv's kernel)."""

    def __init__(self, c=32, r=8):
        super().__init__()
        self.dw, self.project = nn.Conv2d(c, c, 3, padding=1, groups=c), nn.Conv2d(c, 16, 1)
        self.fc1, self.fc2 = nn.Conv2d(c, r, 1), nn.Conv2d(r, c, 1)

    def forward(self, x):
        y = F.relu(self.dw(x))
        return self.project(y * F.hardsigmoid(self.fc2(F.relu(self.fc1(y.mean((2, 3), keepdim=True))))))


def test_a_gate_computes_its_reduction_once():
    """The gate's conv (a reduction over 8 inputs per channel) and its activation run once, at the root,
    outside the loops of the broadcast multiply (dlight's Reduction rule nested them in the output's loops: a
    GEMV per output row); values as the unscheduled kernel's bit for bit, and PyTorch's."""
    from graphopt.backends.tvm.unchecked_schedule import schedule as unchecked

    torch.manual_seed(0)
    model, x = _Gate().eval(), torch.randn(2, 32, 14, 14)
    mod, low = lowered(model, x)
    scheduled, stats = schedules.apply_default_schedules(legalized(mod), HOST.tvm_target())
    assert stats.by_rule.get("GateBroadcast") == 1, stats.summary()
    (name, func), = [(n, f) for n, f in prim_funcs(scheduled).items() if "conv2d" in n and "multiply" in n]
    sch = unchecked(func)
    red = next(b for b in schedules._root_blocks(sch) if schedules._is_reduction_block(sch, b))
    out = sch.get_output_blocks(sch.get_sblock("root"))[0]
    red_loops = {sch.get(lp) for lp in sch.get_loops(red)}
    assert not any(sch.get(lp) in red_loops for lp in sch.get_loops(out)), func.script()
    plain, _ = schedules.apply_default_schedules(legalized(mod), HOST.tvm_target(), rules=[])
    outs = [compiled(finalized(m), low)(x) for m in (scheduled, plain)]
    assert torch.equal(outs[0], outs[1])
    with torch.no_grad():
        assert_close(outs[0], model(x), "gate")
