"""TVM lowering of the int8 ops: compiled results equal the QDQ graph run in PyTorch.
(The x86 int8 paths one by one, with assembly checks: test_int8_paths.py.)

Integer accumulation is exact on every path, so results may differ from PyTorch only by float32 rounding
in the epilogue (a fused multiply-add): we check |Δ| <= 1e-6·max|y| (far below one quantization step), and
bit-for-bit equality where the epilogue is exact (scale 1, bias 0).
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import graphopt
from graphopt.backends.targets import resolve_target
from graphopt.quant import ops
from graphopt.quant.modules import DynamicQuantLinear, QuantConv2d, QuantLinear
from graphopt.quant.qparams import QParams

tvm = pytest.importorskip("tvm")

from graphopt.backends.tvm import build_module, lower_graph  # noqa: E402
from graphopt.backends.tvm.quant_lower import has_vnni, int8_path, weight_qmax_for  # noqa: E402
from graphopt.backends.tvm.runtime import CompiledModule  # noqa: E402
from tests.helpers import X86_TARGETS  # noqa: E402
from tests.quant.test_int8_paths import run_one_layer  # noqa: E402

ULP = 1e-6
HOST = resolve_target("x86")
HOST_VNNI = int8_path(HOST) == "vnni"


def close(y, ref, rel=ULP):
    return (y - ref).abs().max().item() <= rel * max(ref.abs().max().item(), 1e-30)


class ConvNet(nn.Module):
    """Odd shapes on purpose: C=3, CO=20/17/24 (not multiples of 16), stride, dilation, depthwise (also
    strided, dilated, 24 channels), a grouped conv that is not depthwise, tails."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 20, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(20, 32, 3, padding=2, dilation=2)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.g = nn.Conv2d(32, 32, 3, padding=1, groups=4)
        self.c3 = nn.Conv2d(32, 24, 1)
        self.dw2 = nn.Conv2d(24, 24, 3, stride=2, padding=2, dilation=2, groups=24)
        self.c4 = nn.Conv2d(24, 17, (3, 1), stride=(1, 2), padding=(1, 0))
        self.fc = nn.Linear(17, 5)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        x = torch.relu(self.c3(self.g(self.dw(x))))
        x = torch.relu(self.dw2(x))
        return self.fc(self.c4(x).mean((2, 3)))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(30, 50)          # K % 4 != 0, N % 16 != 0
        self.b = nn.Linear(50, 64)
        self.c = nn.Linear(64, 3)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


@pytest.fixture(scope="module")
def convnet():
    torch.manual_seed(0)
    return ConvNet().eval(), torch.randn(2, 3, 23, 19), [torch.randn(2, 3, 23, 19) for _ in range(3)]


@pytest.mark.parametrize("target", X86_TARGETS)
def test_static_conv_net_matches_the_qdq_graph(convnet, target):
    model, x, calib = convnet
    opt = graphopt.optimize(model, target, "quantize(progress=false)", example_inputs=(x,), calibration=calib)
    line = opt.report.backend["int8"]
    if int8_path(resolve_target(target)) == "avx2":
        assert line.startswith("path=avx2") and "qconv2d:avx2×4" in line and "vpmaddubsw" in line
        assert any("int8 path avx2" in n for n in opt.report.records[-1].notes)
    elif HOST_VNNI:
        assert line.startswith("path=vnni") and "qconv2d:vnni×4" in line
    assert "qconv2d:depthwise×2" in line                  # depthwise: its own uint8 kernel on every CPU path
    assert "qconv2d:relax (grouped)×1" in line            # other grouped convs: portable integer Relax ops
    with torch.no_grad():
        ref = opt.graph_module(x)
    assert close(opt(x), ref)


@pytest.mark.parametrize("pipeline", ["quantize(progress=false)", "quantize(activation=int8,progress=false)",
                                      "quantize(mode=dynamic)", "quantize(mode=weight_only)"])
def test_linear_modes_match_the_qdq_graph(pipeline):
    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randn(11, 30)                     # 11 rows: not a multiple of the register tile
    opt = graphopt.optimize(model, "x86", pipeline, example_inputs=(x,), calibration=[torch.randn(16, 30)])
    with torch.no_grad():
        ref = opt.graph_module(x)
    # weight-only accumulates in float32 in another order than PyTorch: float rounding, not one ulp
    assert close(opt(x), ref, 1e-5 if "weight_only" in pipeline else ULP)


class Single(nn.Module):
    def __init__(self, layer, qp):
        super().__init__()
        self.layer, self.qp = layer, qp

    def forward(self, x):
        return self.layer(ops.quantize(x, self.qp.scale, self.qp.zero_point, self.qp.qmin, self.qp.qmax))


def compile_module(module, x, spec=HOST):
    gm = torch.fx.symbolic_trace(module)
    lowered = lower_graph(gm, (x,), spec)
    exe = build_module(lowered.mod, HOST)
    return CompiledModule(exe, HOST, lowered.inputs, lowered.outputs, lowered.out_spec, lowered.const_outputs)


@pytest.mark.parametrize("spec", [HOST, resolve_target("x86:haswell"), None])
def test_integer_accumulators_and_round_half_even_are_bit_exact(spec):
    """scale 1 / bias 0 makes the epilogue exact; inputs on exact .5 ties test the rounding of quantize."""
    torch.manual_seed(0)
    qp = QParams(0.0625, 128, "uint8")                    # 1/scale = 16 exactly: x = (k + .5)/16 are ties
    lin = nn.Linear(37, 21, bias=False)
    q = QuantLinear(lin.weight, None, qp)
    q.out_scale.fill_(1.0)
    x = (torch.randint(-60, 60, (5, 37)) + 0.5) / 16
    compiled = compile_module(Single(q, qp), x, spec)
    with torch.no_grad():
        ref = Single(q, qp)(x)
    assert torch.equal(compiled(x), ref)

    conv = nn.Conv2d(6, 18, 3, padding=1, stride=2, bias=False)
    qc = QuantConv2d(conv, qp)
    qc.out_scale.fill_(1.0)
    x = (torch.randint(-60, 60, (1, 6, 9, 7)) + 0.5) / 16
    compiled = compile_module(Single(qc, qp), x, spec)
    with torch.no_grad():
        assert torch.equal(compiled(x), Single(qc, qp)(x))


def test_has_vnni_reads_the_cpu_features():
    assert has_vnni("cascadelake") and has_vnni("sapphirerapids")
    assert not has_vnni("haswell") and not has_vnni("znver1") and not has_vnni("skylake-avx512")
    assert int8_path(resolve_target("x86:haswell")) == "avx2"
    assert int8_path(resolve_target("x86:cascadelake")) == "vnni"
    assert int8_path(None) == "relax"


@pytest.mark.parametrize("cpu,path", [("cortex-a72", "cpu"), ("cortex-a76", "sdot")])
def test_int8_build_for_arm_uses_sdot_where_the_cpu_has_dotprod(cpu, path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, 10)).eval()
    x = torch.randn(1, 3, 8, 8)
    opt = graphopt.optimize(model, "torch", "quantize(activation=int8,progress=false)", example_inputs=(x,),
                            calibration=[x])
    spec = resolve_target(f"arm:{cpu}")
    lowered = lower_graph(opt.graph_module, (x,), spec)
    assert lowered.quant.startswith(f"path={path}:") and f"qlinear:{path}×1" in lowered.quant
    assert ("dotprod" in lowered.quant) == (path == "cpu")
    build_module(lowered.mod, spec)                  # no x86 intrinsic reaches the aarch64 code generator
    # (running them under qemu, bit for bit: tests/backends/test_arm.py)


def test_int8_artifact_round_trip(tmp_path):
    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randn(2, 30)
    opt = graphopt.optimize(model, "x86", "quantize(progress=false)", example_inputs=(x,),
                            calibration=[torch.randn(8, 30)])
    again = graphopt.load(opt.save(str(tmp_path / "mlp.gopt")))
    assert torch.equal(again(x), opt(x))


class Attention(nn.Module):
    """Scores and context matmuls of two activations; the second one broadcasts its right operand."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(24, 24)
        self.k = nn.Linear(24, 24)

    def forward(self, x):
        q = self.q(x).view(2, 5, 3, 8).transpose(1, 2)
        k = self.k(x).view(2, 5, 3, 8).transpose(1, 2)
        probs = torch.softmax(q @ k.transpose(-2, -1), dim=-1)          # (2, 3, 5, 5)
        return torch.matmul(probs, x.view(2, 5, 3, 8)[:1].transpose(1, 2))  # right operand batch 1: broadcast


def test_attention_matmuls_lower_to_integer_kernels():
    torch.manual_seed(0)
    model = Attention().eval()
    x = torch.randn(2, 5, 24)
    # every kind quantized whatever the host (ops="auto" keeps activation matmuls float32 on the avx2 path)
    opt = graphopt.optimize(model, "x86", "quantize(progress=false,ops=[linear,conv2d,matmul])", example_inputs=(x,),
                            calibration=[torch.randn(2, 5, 24) for _ in range(3)])
    line = opt.report.backend["int8"]
    assert "qmatmul:relax (broadcast)×1" in line
    if HOST_VNNI:
        assert "qmatmul:vnni×1" in line
    with torch.no_grad():
        ref = opt.graph_module(x)
    # softmax runs in float32 in both, but not with the same instructions: a probability right on a rounding
    # boundary of its quantizer may land one step apart; everything else is exact
    assert close(opt(x), ref, 1e-2)
    assert torch.nn.functional.cosine_similarity(opt(x).flatten(), ref.flatten(), dim=0) > 0.9999


def test_non_constant_int8_weight_is_a_lowering_error_naming_the_node():
    from graphopt.errors import LoweringError

    class RuntimeWeight(nn.Module):
        def forward(self, x, wq):
            return ops.qlinear(ops.quantize(x, 0.1, 128, 0, 255), wq, torch.ones(4), None, 128)

    gm = torch.fx.symbolic_trace(RuntimeWeight())
    args = (torch.randn(2, 8), torch.randint(-127, 128, (4, 8), dtype=torch.int8))
    with pytest.raises(LoweringError, match="qlinear.*the int8 weight.*not a constant"):
        lower_graph(gm, args, HOST)


@settings(max_examples=12, deadline=None)
@given(lead=st.lists(st.integers(1, 6), min_size=1, max_size=2), k=st.integers(1, 90), n=st.integers(1, 40),
       shift=st.sampled_from([0.0, 3.0, -3.0]), seed=st.integers(0, 2 ** 31 - 1))
def test_dynamic_int8_linear_matches_the_module_on_random_shapes(lead, k, n, shift, seed):
    """Dynamic int8 Linear (input range measured per call) on random shapes and inputs centred or all of one
    sign (zero point at an end of the range): the compiled kernel equals the module within one float32 ulp of
    the output's magnitude (the integer sums are exact; scale and zero point are computed the same way)."""
    g = torch.Generator().manual_seed(seed)
    layer = DynamicQuantLinear(torch.randn(n, k, generator=g), torch.randn(n, generator=g),
                               weight_qmax=weight_qmax_for(int8_path(HOST)))
    got, ref = run_one_layer(layer, torch.randn(*lead, k, generator=g) + shift)
    assert close(got, ref, 4 * ULP), (got - ref).abs().max().item()
