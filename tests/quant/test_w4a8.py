"""W4A8 (int4 weights x int8 activations per call): the reference op, the quantize pass, the kernels."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import graphopt
from graphopt.errors import PipelineError
from graphopt.quant.w4a8 import W4A8Linear, group_of, quantize_rows
from graphopt.quant.weight_only import PackedWeightOnlyLinear, unpack_int4
from tests.quant.test_weight_only import MLP


def _by_formula(layer: W4A8Linear, x: torch.Tensor) -> torch.Tensor:
    """The module docstring's formula, written independently: float64 of dequantized weight x activation."""
    k = layer.in_features
    g = group_of(layer.group_size or 0, k)
    a, s_a = quantize_rows(x, g)
    ng = a.shape[1]
    xa = (a.double() * s_a.double().unsqueeze(2)).reshape(x.shape[0], ng * g)[:, :k]
    return xa @ layer.dequantized_weight().double().t() + layer.bias.double()


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 5), k=st.integers(1, 70), g=st.sampled_from([8, 16, 32, None]), seed=st.integers(0, 99),
       scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_activation_rounding_is_within_half_a_step_and_the_op_follows_its_formula(m, k, g, seed, scale):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen) * scale
    x[0, : k // 3] = 0.0                                      # zero stretches (a group of zeros: scale 0)
    size = group_of(g or 0, k)
    a, s_a = quantize_rows(x, size)
    assert a.abs().max() <= 127
    xp = F.pad(x, (0, a.shape[1] * size - k)).reshape(m, -1, size)
    step = s_a.unsqueeze(2)
    assert ((a * step - xp).abs() <= step / 2 * (1 + 1e-6)).all()
    amax = xp.abs().amax(dim=2)
    assert torch.equal(a.abs().amax(dim=2) == 127, amax > 0)    # the largest |x| of a group maps to 127
    layer = W4A8Linear(torch.randn(7, k, generator=gen), torch.randn(7, generator=gen), g)
    with torch.no_grad():
        got = layer(x).double()
    want = _by_formula(layer, x)
    tol = 1e-5 * (want.abs().max() + 1)
    assert (got - want).abs().max() <= tol


def test_non_finite_inputs_give_nan_rows_and_leave_the_other_rows_alone():
    torch.manual_seed(0)
    layer = W4A8Linear(torch.randn(5, 40), torch.randn(5), 8)
    x = torch.randn(4, 40)
    x[1, 3], x[2, 17] = float("nan"), float("inf")
    with torch.no_grad():
        y, clean = layer(x), layer(x[[0, 3]])
    assert torch.isnan(y[1]).all() and torch.isnan(y[2]).all()
    assert torch.equal(y[[0, 3]], clean)


def test_w4a8_keeps_weight_only_int4_weights():
    torch.manual_seed(0)
    w, b = torch.randn(9, 50), torch.randn(9)
    w4a8, woq4 = W4A8Linear(w, b, 16), PackedWeightOnlyLinear(w, b, 4, 16)
    assert torch.equal(w4a8.weight_q, woq4.weight_q) and torch.equal(w4a8.scales, woq4.scales)
    assert torch.equal(unpack_int4(w4a8.weight_q, 50), unpack_int4(woq4.weight_q, 50))


def test_pass_swaps_linears_for_w4a8_and_reports_them():
    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randn(3, 70)
    opt = graphopt.optimize(model, "torch", "quantize(mode=dynamic,bits=4,group_size=16)", example_inputs=(x,))
    mods = [m for m in opt.graph_module.modules() if isinstance(m, W4A8Linear)]
    assert len(mods) == 3 and all(m.group_size == 16 for m in mods)
    res = opt.report.records[-1]
    assert any("W4A8" in n and "groups of 16" in n for n in res.notes)
    assert all(d["input"].startswith("int8 per call") and d["w_err"] < 0.2 for d in res.details)
    with torch.no_grad():
        cos = F.cosine_similarity(opt(x).flatten(), model(x).flatten(), dim=0)
    assert cos > 0.99


@pytest.mark.parametrize("pipeline, match", [
    ("quantize(mode=dynamic,bits=4,group_size=12)", "multiple of 8"),
    ("quantize(mode=static,bits=4)", "mode=dynamic"),
    ("quantize(mode=dynamic,group_size=32)", "bits=4"),
])
def test_bad_w4a8_options_are_typed_errors(pipeline, match):
    with pytest.raises(PipelineError, match=match):
        graphopt.optimize(MLP().eval(), "torch", pipeline, example_inputs=(torch.randn(1, 70),))


# ---------------------------------------------------------------------------------------- TVM kernels
tvm = pytest.importorskip("tvm")

from graphopt.backends.targets import resolve_target  # noqa: E402
from graphopt.backends.tvm.quant_lower import int8_path  # noqa: E402
from tests.helpers import X86_TARGETS, is_avx512_target  # noqa: E402
from tests.quant.test_int8_paths import _skip_unless_runs_here, asm_of, built_layers  # noqa: E402

# (rows M, in K, out N, group): one row (GEMV tile, two accumulator sets), a few rows, rows past one register
# tile with a tail; ragged last groups (K % group), odd K and N, per channel (None), a group past 1,024 inputs
SHAPES = [(1, 37, 21, 8), (3, 70, 17, None), (2, 96, 13, 32), (7, 300, 35, 64), (1, 1024, 100, 128),
          (20, 1101, 40, 64), (9, 129, 40, 32), (1, 2100, 8, None)]


class Layers(nn.Module):
    """One W4A8 Linear per SHAPES entry, each fed its own input, and the worst case for int16 sums: every
    nibble 15 (all-positive weights: zero point 0) against activations of ±127 (`worst`, fed x8)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(W4A8Linear(torch.randn(n, k), torch.randn(n), g) for _, k, n, g in SHAPES)
        self.worst = W4A8Linear(torch.ones(24, 256), torch.zeros(24), 128)

    def forward(self, x0, x1, x2, x3, x4, x5, x6, x7, x8):
        xs = (x0, x1, x2, x3, x4, x5, x6, x7)
        return tuple(self.layers[i](xs[i]) for i in range(len(SHAPES))) + (self.worst(x8),)


def _inputs():
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(m, k, generator=g) for m, k, *_ in SHAPES]
    xs[3][2] = 0.0                                              # an all-zero row: every group's scale is 0
    xs[5][4, ::3] = 1e4                                         # large values: activations saturate at ±127
    xs[5][5, ::2] = -1e4
    worst = torch.ones(3, 256)
    worst[1] = -1.0
    worst[2, ::2] = -1.0
    return (*xs, worst)


def _tolerance(layer: W4A8Linear, x: torch.Tensor) -> torch.Tensor:
    """A few float32 ulps of Σ_g |isum·s_a·s| + |bias| per output (the integer sums are exact)."""
    g = group_of(layer.group_size or 0, layer.in_features)
    a, s_a = quantize_rows(x, g)
    ng = a.shape[1]
    xa = (a.double().abs() * s_a.double().unsqueeze(2)).reshape(x.shape[0], ng * g)[:, :layer.in_features]
    return (xa @ layer.dequantized_weight().double().abs().t() + layer.bias.double().abs()) * 8 * 2 ** -23


# + AVX-512BW without VNNI, and SSE4 only (x86:nehalem: the generic widening kernel, the path of ARM without +dotprod)
@pytest.fixture(scope="module", params=[*X86_TARGETS, "x86:skylake-avx512", "x86:nehalem"])
def built(request):
    return built_layers(request.param, Layers().eval(), _inputs())


def test_kernels_match_the_reference(built):
    target, module, args, compiled, _, lowered = built
    _skip_unless_runs_here(target)
    assert f"w4a8_linear:{int8_path(resolve_target(target))}×" in lowered.quant
    with torch.no_grad():
        refs = module(*args)
    for shape, layer, x, got, ref in zip(SHAPES, module.layers, args, compiled(*args), refs):
        assert got.shape == ref.shape == (shape[0], shape[2])
        bad = (got.double() - ref.double()).abs() > _tolerance(layer, x)
        assert not bad.any(), f"{target} {shape}: max |diff| {(got - ref).abs().max():.3g}"


def test_kernels_use_the_paths_integer_dot_products(built):
    target, _, _, _, exe, lowered = built
    asm = asm_of(exe)
    path = int8_path(resolve_target(target))
    if path == "vnni":
        assert "vpdpbusd" in asm
    elif path == "cpu":
        assert "pmaddwd" in asm and "pmaddubsw" not in asm and "vpdpbusd" not in asm and "ymm" not in asm
    else:
        assert "vpmaddubsw" in asm and "vpmaddwd" in asm
    if not is_avx512_target(target):
        assert "zmm" not in asm


def test_kernels_give_nan_rows_for_non_finite_inputs_like_the_reference(built):
    target, module, args, compiled, _, _ = built
    _skip_unless_runs_here(target)
    args = [x.clone() for x in args]
    args[3][1, 5], args[3][4, 250] = float("nan"), float("-inf")
    with torch.no_grad():
        ref = module(*args)[3]
    got = compiled(*args)[3]
    assert torch.isnan(got[1]).all() and torch.isnan(got[4]).all() and torch.isnan(ref[[1, 4]]).all()
    keep = [0, 2, 3, 5, 6]
    assert not ((got[keep] - ref[keep]).abs().double() > _tolerance(module.layers[3], args[3])[keep]).any()


def test_an_input_feeding_several_w4a8_linears_is_quantized_once():
    class QKV(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = (nn.Linear(64, 64) for _ in range(3))

        def forward(self, x):
            return self.q(x) + self.k(x) * self.v(x)

    from graphopt.backends.tvm import lower_graph

    torch.manual_seed(0)
    model, x = QKV().eval(), torch.randn(2, 5, 64)
    opt = graphopt.optimize(model, "torch", "quantize(mode=dynamic,bits=4,group_size=32)", example_inputs=(x,))
    lowered = lower_graph(opt.graph_module, (x,), resolve_target("x86"))
    assert "w4a8_linear:" in lowered.quant and "×3" in lowered.quant
    main = lowered.mod["main"].script()
    assert main.count("R.call_tir(graphopt_w4a8_qrows") == 1 and main.count("R.call_tir(graphopt_w4a8,") == 3


def test_portable_relax_lowering_and_artifact_round_trip(tmp_path):
    from graphopt.backends.tvm import build_module, lower_graph
    from graphopt.backends.tvm.runtime import CompiledModule

    torch.manual_seed(0)
    module = nn.Sequential(W4A8Linear(torch.randn(12, 21), torch.randn(12), 8),
                           W4A8Linear(torch.randn(9, 12), torch.randn(9), None)).eval()
    x = torch.randn(3, 21)
    x[1, 4] = float("inf")                                      # that row's outputs are NaN, as the reference's
    lowered = lower_graph(torch.fx.symbolic_trace(module), (x,), None)
    assert "w4a8_linear:relax×2" in lowered.quant and "W4A8 has no integer kernel for this target" in lowered.quant
    host = resolve_target("x86")
    compiled = CompiledModule(build_module(lowered.mod, host), host, lowered.inputs, lowered.outputs,
                              lowered.out_spec, lowered.const_outputs)
    with torch.no_grad():
        ref = module(x)
    assert torch.isnan(ref[1]).all()
    assert torch.allclose(compiled(x), ref, rtol=1e-5, atol=1e-5, equal_nan=True)
    opt = graphopt.optimize(MLP().eval(), "x86", "quantize(mode=dynamic,bits=4,group_size=16)",
                            example_inputs=(torch.randn(1, 70),))
    again = graphopt.load(opt.save(str(tmp_path / "w4a8.gopt")))
    x1 = torch.randn(1, 70)
    assert torch.equal(again(x1), opt(x1))


def test_worst_case_products_do_not_saturate(built):
    """Every nibble 15 against activations of ±127 everywhere: the largest int16 sums the pair paths form
    (4 x 2·15·127 = 15,240 per lane) are exact."""
    target, module, args, compiled, _, _ = built
    _skip_unless_runs_here(target)
    layer, x = module.worst, args[-1]
    assert int(unpack_int4(layer.weight_q, 256).min()) == 15 and not layer.zeros.any()
    got = compiled(*args)[-1]
    with torch.no_grad():
        ref = layer(x)
    assert not ((got.double() - ref.double()).abs() > _tolerance(layer, x)).any()
    want = torch.tensor([256.0, -256.0, 0.0]).unsqueeze(1).expand(3, 24)
    assert torch.allclose(got, want, rtol=0, atol=1e-3)


@settings(max_examples=12, deadline=None)
@given(rows=st.integers(1, 9), k=st.integers(1, 90), n=st.integers(1, 40), group=st.sampled_from([None, 8, 16, 32]),
       offset=st.sampled_from([0.0, 2.0]), seed=st.integers(0, 2 ** 31 - 1))
def test_kernels_match_the_reference_on_random_layers(rows, k, n, group, offset, seed):
    """Random W4A8 layers (1-9 rows: the GEMV tile and row tiles with tails; 1-90 inputs, ragged last groups;
    weights centred or all positive) equal the reference within float32 rounding of the exact integer sums."""
    from tests.quant.test_int8_paths import run_one_layer

    g = torch.Generator().manual_seed(seed)
    layer = W4A8Linear(torch.randn(n, k, generator=g) + offset, torch.randn(n, generator=g), group)
    x = torch.randn(rows, k, generator=g)
    got, ref = run_one_layer(layer, x)
    assert not ((got.double() - ref.double()).abs() > _tolerance(layer, x)).any(), (got - ref).abs().max().item()
