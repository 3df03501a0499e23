"""Weight-only int8 / int4 quantization: packing, group-wise quantization, the TVM kernels (direct GEMV and
panel GEMM) against the dequantized reference on ragged shapes, the quantize pass options, artifacts, ARM.

Kernels are compared with torch.ops.graphopt.woq_linear_packed / woq_linear (float32 x dequantized weight):
equal up to float32 rounding of the sums (order, FMA, the per-group zero-point term), so the tolerance is
a few ulps of Σ|x|·|w| per output, not a quantization step.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import graphopt
from graphopt.errors import PipelineError
from graphopt.quant.modules import WeightOnlyLinear
from graphopt.quant.weight_only import (PackedWeightOnlyLinear, dequantize_groups, pack_int4, quantize_groups,
                                        unpack_int4)


# ------------------------------------------------------------------------------------- pure PyTorch
@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5), st.integers(1, 41), st.integers(0, 2 ** 31 - 1))
def test_int4_packing_round_trips(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int16)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (n, (k + 1) // 2)
    assert torch.equal(unpack_int4(packed, k), q)
    assert torch.equal(pack_int4(unpack_int4(packed, k)), packed)


def test_int4_packing_refuses_out_of_range_values():
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_int4(torch.tensor([[3, 16]]))


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([8, 4]), st.sampled_from([None, 2, 8, 32]), st.integers(1, 6), st.integers(1, 70),
       st.integers(0, 2 ** 31 - 1))
def test_group_quantization_error_is_at_most_half_a_step_and_zero_is_exact(bits, group, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * 3
    w[:, ::3] = 0.0                                              # pruned weights must stay exactly zero
    q, s, z = quantize_groups(w, bits, group)
    gs = k if group is None else group
    assert s.shape == z.shape == (n, -(-k // gs))
    lo, hi = (-127, 127) if bits == 8 else (0, 15)
    assert int(q.min()) >= lo and int(q.max()) <= hi
    deq = dequantize_groups(q, s, z, group)
    step = s[:, torch.arange(k) // gs]
    assert torch.all((deq - w).abs() <= step * 0.5 + 1e-6 * w.abs() + 1e-30)
    assert torch.all(deq[:, ::3] == 0)


@pytest.mark.parametrize("opts,match", [
    ("bits=3", "bits=3"), ("bits=4", "mode=weight_only"), ("mode=static,group_size=32", "group_size"),
    ("mode=weight_only,group_size=7", "group_size=7"), ("mode=weight_only,bits=4,group_size=0", "group_size=0"),
    ("mode=static,bits=4", "mode=weight_only")])    # (mode=dynamic,bits=4 is W4A8: tests/quant/test_w4a8.py)
def test_bad_weight_only_options_are_typed_errors(opts, match):
    model = nn.Sequential(nn.Linear(8, 4))
    with pytest.raises(PipelineError, match=match):
        graphopt.optimize(model, "torch", f"quantize({opts})", example_inputs=(torch.randn(1, 8),))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(70, 64), nn.Linear(64, 33), nn.Linear(33, 5)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@pytest.mark.parametrize("bits,group,expect", [(4, 32, 32), (4, -1, None), (8, 16, 16), (4, None, 128)])
def test_pass_swaps_linears_and_reports_each_layer(bits, group, expect):
    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randn(3, 70)
    gopt = "" if group is None else f",group_size={group}"
    opt = graphopt.optimize(model, "torch", f"quantize(mode=weight_only,bits={bits}{gopt})", example_inputs=(x,))
    mods = [m for m in opt.graph_module.modules() if isinstance(m, PackedWeightOnlyLinear)]
    assert len(mods) == 3 and all(m.bits == bits for m in mods)
    # a group at least as long as the row is per-channel (fc3: 33 inputs, fc1 with 128: 70)
    assert mods[0].group_size == (expect if expect is not None and expect < 70 else None)
    rec = opt.report.records[-1]
    assert [d["bits"] for d in rec.details] == [bits] * 3
    assert all(0 < d["w_err"] < (0.2 if bits == 4 else 0.01) for d in rec.details)
    with torch.no_grad():
        ref, got = model(x), opt(x)
    assert torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0) > (0.98 if bits == 4 else 0.9999)
    if bits == 4:
        float_bytes = sum(p.numel() * 4 for p in model.parameters())
        assert rec.size_bytes < float_bytes / 4


def test_default_int8_weight_only_keeps_the_per_channel_module():
    torch.manual_seed(0)
    opt = graphopt.optimize(MLP().eval(), "torch", "quantize(mode=weight_only)", example_inputs=(torch.randn(2, 70),))
    assert sum(isinstance(m, WeightOnlyLinear) for m in opt.graph_module.modules()) == 3


# ---------------------------------------------------------------------------------------- TVM kernels
tvm = pytest.importorskip("tvm")

from graphopt.backends.targets import resolve_target  # noqa: E402
from graphopt.backends.tvm.weight_only import DIRECT_MAX_ROWS  # noqa: E402
from tests.helpers import X86_TARGETS, is_avx512_target  # noqa: E402
from tests.quant.test_int8_paths import asm_of, built_layers  # noqa: E402

# (rows M, in K, out N, bits, group): ragged groups (K % group != 0), odd K, odd N, per-channel, one GEMV
# (direct kernel: int4 groups of 8k inputs take the word kernel, others the pair kernel) and one GEMM
# (panel kernel, M > DIRECT_MAX_ROWS) of each kind. Panel row tiles (8 rows AVX-512, 6 AVX2 and NEON, a first
# tile of 5 on AVX2 when grouped): M below one tile, one tile plus a tail, whole tiles plus a tail; the last two
# have K past one 64 KiB panel chunk on every target (partial sums through the output, a ragged last chunk,
# odd K in the last chunk)
SHAPES = [(1, 37, 21, 4, 8), (3, 70, 17, 4, None), (2, 45, 13, 4, 10), (1, 64, 33, 8, 16), (1, 53, 19, 8, None),
          (7, 37, 21, 4, 8), (9, 129, 40, 4, 32), (6, 300, 35, 8, None), (5, 75, 9, 8, 10),
          (20, 1101, 40, 4, 64), (13, 1031, 24, 8, None)]


class Layers(nn.Module):
    """One weight-only Linear per SHAPES entry, each fed its own input."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        mods = []
        for m, k, n, bits, group in SHAPES:
            w, b = torch.randn(n, k), torch.randn(n)
            mods.append(WeightOnlyLinear(w, b) if bits == 8 and group is None
                        else PackedWeightOnlyLinear(w, b, bits, group))
        self.layers = nn.ModuleList(mods)

    def forward(self, x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10):
        xs = (x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10)
        return tuple(self.layers[i](xs[i]) for i in range(len(SHAPES)))


def _inputs():
    g = torch.Generator().manual_seed(1)
    return tuple(torch.randn(m, k, generator=g) for m, k, *_ in SHAPES)


def _tolerance(layer, x):
    """A few float32 ulps of Σ_k |x|·|w| per output (the rounding of any summation order)."""
    w = (layer.dequantized_weight() if isinstance(layer, PackedWeightOnlyLinear)
         else layer.weight_q.float() * layer.w_scale.reshape(-1, 1))
    return (x.abs() @ w.abs().t() + layer.bias.abs()) * 8 * torch.finfo(torch.float32).eps


@pytest.fixture(scope="module", params=X86_TARGETS)
def built(request):
    return built_layers(request.param, Layers().eval(), _inputs())


def test_kernels_match_the_dequantized_reference(built):
    target, module, args, compiled, _, lowered = built
    with torch.no_grad():
        refs = module(*args)
    for (m, k, n, bits, group), layer, x, got, ref in zip(SHAPES, module.layers, args, compiled(*args), refs):
        assert got.shape == ref.shape == (m, n)
        bad = (got - ref).abs() > _tolerance(layer, x)
        assert not bad.any(), f"{target} {(m, k, n, bits, group)}: max |diff| {(got - ref).abs().max():.3g}"


def test_each_layer_takes_the_kernel_for_its_row_count(built):
    _, _, _, _, _, lowered = built
    direct = sum(1 for s in SHAPES if s[0] <= DIRECT_MAX_ROWS)
    counts = dict(part.rsplit("×", 1) for part in lowered.quant.split(":", 1)[1].split(";")[0].strip().split(", "))
    assert sum(int(v) for k, v in counts.items() if "direct" in k) == direct
    assert sum(int(v) for k, v in counts.items() if "panel" in k) == len(SHAPES) - direct


def test_kernels_dequantize_in_registers_with_the_targets_vectors(built):
    target, _, _, _, exe, _ = built
    asm = asm_of(exe)
    assert "vcvtdq2ps" in asm and "vfmadd" in asm
    if not is_avx512_target(target):
        assert "zmm" not in asm                     # AVX2 code: 256-bit vectors only


def test_int4_artifact_round_trips(tmp_path):
    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randn(1, 70)
    opt = graphopt.optimize(model, "x86", "quantize(mode=weight_only,bits=4,group_size=16)", example_inputs=(x,))
    assert "woq_linear_packed:int4 direct×3" in opt.report.backend["int8"]
    again = graphopt.load(opt.save(str(tmp_path / "mlp4.gopt")))
    assert torch.equal(again(x), opt(x))
    with torch.no_grad():
        ref = opt.graph_module(x)                   # the torch reference graph of the same quantized model
    assert torch.allclose(opt(x), ref, rtol=1e-5, atol=1e-5)


def test_portable_relax_lowering_without_an_llvm_cpu_target():
    """spec None (the 'relax' path CUDA takes): weights dequantized once at compile time, a float matmul."""
    from graphopt.backends.tvm import build_module, lower_graph
    from graphopt.backends.tvm.runtime import CompiledModule
    from graphopt.quant.cluster import ClusteredLinear

    torch.manual_seed(0)
    module = nn.Sequential(PackedWeightOnlyLinear(torch.randn(12, 21), torch.randn(12), 4, 8),
                           WeightOnlyLinear(torch.randn(9, 12), None),
                           ClusteredLinear(torch.randn(5, 9), torch.randn(5), 16)).eval()
    x = torch.randn(3, 21)
    lowered = lower_graph(torch.fx.symbolic_trace(module), (x,), None)
    assert "relax" in lowered.quant and "direct" not in lowered.quant
    host = resolve_target("x86")
    compiled = CompiledModule(build_module(lowered.mod, host), host, lowered.inputs, lowered.outputs,
                              lowered.out_spec, lowered.const_outputs)
    with torch.no_grad():
        assert torch.allclose(compiled(x), module(x), rtol=1e-5, atol=1e-5)


class PointwiseNet(nn.Module):
    """1x1 convs (one strided, one without bias) around a 3x3 conv and a depthwise one, then a Linear."""

    def __init__(self):
        super().__init__()
        self.pw1 = nn.Conv2d(8, 32, 1)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.pw2 = nn.Conv2d(32, 24, 1, stride=2, bias=False)
        self.c3 = nn.Conv2d(24, 24, 3, padding=1)
        self.pw3 = nn.Conv2d(24, 40, 1)
        self.fc = nn.Linear(40, 10)

    def forward(self, x):
        x = torch.relu(self.dw(torch.relu(self.pw1(x))))
        x = self.pw3(torch.relu(self.c3(self.pw2(x))))
        return self.fc(x.mean(dim=(2, 3)))


@pytest.mark.parametrize("pipeline, inner", [
    ("quantize(mode=weight_only,bits=4,group_size=8,pointwise_convs=true)", PackedWeightOnlyLinear),
    ("quantize(mode=weight_only,pointwise_convs=true)", WeightOnlyLinear),
    ("quantize(mode=dynamic,bits=4,group_size=8,pointwise_convs=true)", None)])
def test_pointwise_convs_take_the_linear_kernels_and_other_convs_stay_float(pipeline, inner):
    from graphopt.quant.modules import PointwiseConvAsLinear
    from graphopt.quant.w4a8 import W4A8Linear

    inner = inner or W4A8Linear
    torch.manual_seed(0)
    model = PointwiseNet().eval()
    x = torch.randn(2, 8, 10, 10)
    opt = graphopt.optimize(model, "x86", pipeline, example_inputs=(x,))
    gm = opt.graph_module
    pw = [m for m in gm.modules() if isinstance(m, PointwiseConvAsLinear)]
    assert len(pw) == 3 and all(type(m.linear) is inner for m in pw)
    assert sum(isinstance(m, nn.Conv2d) for m in gm.modules()) == 2          # the 3x3 and the depthwise conv
    rec = opt.report.records[-1]
    assert sum("conv2d has no" in n for n in rec.notes) == 2
    assert {d["layer"] for d in rec.details} == {"pw1", "pw2", "pw3", "fc"}
    with torch.no_grad():
        ref, graph = model(x), gm(x)
    assert torch.nn.functional.cosine_similarity(graph.flatten(), ref.flatten(), dim=0) > 0.99
    assert torch.allclose(opt(x), graph, rtol=1e-4, atol=1e-4)           # the kernels = the quantized graph
    import re

    counts = re.findall(r"×(\d+)", opt.report.backend["int8"].split(";")[0])
    assert sum(int(c) for c in counts) == 4 and "relax" not in opt.report.backend["int8"]  # 3 pointwise + fc


def test_pointwise_convs_stay_float_unless_asked_and_the_option_is_checked():
    torch.manual_seed(0)
    model, x = PointwiseNet().eval(), torch.randn(1, 8, 10, 10)
    opt = graphopt.optimize(model, "torch", "quantize(mode=weight_only,bits=4)", example_inputs=(x,))
    assert sum(isinstance(m, nn.Conv2d) for m in opt.graph_module.modules()) == 5
    assert {d["layer"] for d in opt.report.records[-1].details} == {"fc"}
    with pytest.raises(PipelineError, match="pointwise_convs"):
        graphopt.optimize(model, "torch", "quantize(mode=dynamic,pointwise_convs=true)", example_inputs=(x,))


def test_a_pointwise_conv_as_linear_is_the_conv_exactly():
    from graphopt.quant.modules import PointwiseConvAsLinear, linear_of_pointwise

    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, 1, stride=(2, 3))
    x = torch.randn(2, 6, 9, 10)
    with torch.no_grad():
        assert torch.allclose(PointwiseConvAsLinear(linear_of_pointwise(conv), conv.stride)(x), conv(x), atol=1e-6)


@settings(max_examples=12, deadline=None)
@given(rows=st.integers(1, 7), k=st.integers(1, 80), n=st.integers(1, 40),
       kind=st.sampled_from([(8, None), (8, 16), (4, None), (4, 8), (4, 16), (4, 10)]),
       offset=st.sampled_from([0.0, 2.0]), seed=st.integers(0, 2 ** 31 - 1))
def test_weight_only_kernels_match_the_module_on_random_layers(rows, k, n, kind, offset, seed):
    """Random weight-only layers (int8 per channel or grouped, int4 per channel or in groups of 8k inputs (the
    word kernel) or not; direct up to 4 rows, panel above; odd and even input counts; weights centred or all
    positive, so zero points far from 8) equal the module's dequantized matmul within float32 rounding."""
    from tests.quant.test_int8_paths import run_one_layer

    bits, group = kind
    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn(n, k, generator=g) + offset, torch.randn(n, generator=g)
    layer = WeightOnlyLinear(w, b) if bits == 8 and group is None else PackedWeightOnlyLinear(w, b, bits, group)
    x = torch.randn(rows, k, generator=g)
    got, ref = run_one_layer(layer, x)
    assert not ((got - ref).abs() > _tolerance(layer, x)).any(), (got - ref).abs().max().item()


class _Three(nn.Module):
    """Three layers, each on its own input (named arguments: torch.fx traces no *args)."""

    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, a, b, c):
        return tuple(layer(x) for layer, x in zip(self.layers, (a, b, c)))


def _int4_layers_on_avx2(monkeypatch, kernel: str, record, shapes, seed: int, offset: float = 0.0) -> list:
    """Build three int4 layers (rows, in, out, group) for x86:haswell with weight_only.<kernel> wrapped to note
    record(args, kwargs) of each call (returned), and check the outputs within float32 rounding of the module's
    dequantized matmul where the host runs AVX2 code (every x86 graphopt supports)."""
    from graphopt.backends.tvm import weight_only as wo
    from tests.quant.test_int8_paths import _skip_unless_runs_here

    seen, real = [], getattr(wo, kernel)

    def spy(*a, **kw):
        seen.append(record(a, kw))
        return real(*a, **kw)

    monkeypatch.setattr(wo, kernel, spy)
    g = torch.Generator().manual_seed(seed)
    layers = [PackedWeightOnlyLinear(torch.randn(n, k, generator=g) + offset, torch.randn(n, generator=g), 4, group)
              for _, k, n, group in shapes]
    xs = tuple(torch.randn(m, k, generator=g) for m, k, _, _ in shapes)
    target, model, args, compiled, _, _ = built_layers("x86:haswell", _Three(layers).eval(), xs)
    built = list(seen)
    _skip_unless_runs_here(target)
    with torch.no_grad():
        refs = model(*args)
    for layer, x, got, ref in zip(layers, args, compiled(*args), refs):
        assert got.shape == ref.shape
        assert not ((got - ref).abs() > _tolerance(layer, x)).any(), (got - ref).abs().max().item()
    return built


def test_avx2_int4_gemv_takes_its_column_blocks_by_row_count(monkeypatch):
    """int4 in groups of 8k inputs, up to 4 rows, AVX2: direct4_kernel with INT4_GEMV_AVX2's blocks (one row: five
    8-lane column blocks per task, five FMA chains; three rows: three), the columns padded to whole tasks
    (333 -> 45 blocks of 8) and sliced back; fewer blocks per task where the layer is too narrow to give each
    core two tasks. Values within float32 rounding of the module's dequantized matmul."""
    seen = _int4_layers_on_avx2(monkeypatch, "direct4_kernel", lambda a, kw: (a[0], a[3], a[4], a[5], a[6]),
                                [(1, 200, 333, 8), (3, 96, 100, 32), (1, 64, 40, 16)], seed=3)
    cores = resolve_target("x86:haswell").tvm_target().attrs["num-cores"]
    assert seen[0] == (1, 45, 8, 5, 1) and seen[1] == (3, 15, 8, 3, 1), seen   # 13 blocks: 3 per task
    nt = seen[2][3]                                 # 5 blocks of 8 columns: fewer per task, >= 2 tasks per core
    assert seen[2][1:3] == (5 + (-5) % nt, 8) and (nt == 1 or 5 / nt >= 2 * cores), seen


@pytest.mark.parametrize("pipeline,kind", [
    ("quantize(mode=weight_only,bits=4,group_size=16)", "woq_linear_packed:int4"),
    ("quantize(mode=weight_only,bits=8,group_size=16)", "woq_linear_packed:int8"),
    ("cluster(k=16)", "clustered_linear:codebook4")])
def test_dynamic_batch_runs_the_dequantized_weights_in_float32(pipeline, kind):
    """A batch known only at run time (graphopt.dynamic): the weight-only and codebook kernels are built for a
    static row count, so those layers run as the float32 matmul of their dequantized weights (the report says
    "(dynamic)"); outputs equal the quantized model's torch graph within float32 rounding at every batch."""
    torch.manual_seed(0)
    model = MLP().eval()
    opt = graphopt.optimize(model, "x86", pipeline, example_inputs=(torch.randn(2, 70),), dynamic={"batch": (1, 8)})
    line = opt.report.backend["int8"]
    assert f"{kind}" in line and "(dynamic)×3" in line, line
    for batch in (1, 3, 8):
        x = torch.randn(batch, 70)
        with torch.no_grad():
            ref = opt.graph_module(x)
        assert torch.allclose(opt(x), ref, rtol=1e-5, atol=1e-5), batch


def test_int4_panels_dequantize_words_where_groups_are_whole_words(monkeypatch):
    """More than 4 rows, int4: the panel kernel reads direct4_kernel's words (and, convert, FMA per weight vector)
    when each group is a whole number of words (8k inputs, or one group per channel), the byte form otherwise
    (groups of 10). Values within float32 rounding of the module's dequantized matmul."""
    seen = _int4_layers_on_avx2(monkeypatch, "panel_kernel", lambda a, kw: kw.get("words", False),
                                [(7, 45, 19, 8), (6, 45, 19, None), (9, 50, 21, 10)], seed=5, offset=1.0)
    assert seen == [True, True, False], seen
