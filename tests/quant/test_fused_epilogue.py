"""Fused requantize epilogues (graphopt/backends/tvm/quant_fuse.py): an int8 conv/linear followed by its
activation, max-pool, flatten and the next quantize lowers to one kernel storing the next layer's codes.

Fused builds are compared bit for bit with the QDQ graph run in PyTorch, or with the unfused lowering of
the same graph (quant_lower.FUSE_EPILOGUES = False: float32 out, elementwise quantize kernel), which
test_int8_paths.py / test_lowering.py hold to the QDQ graph:
  * Chain: a synthetic network whose scales are powers of two and biases multiples of 1/16, so every float32
    operation is exact and the fused kernels must equal PyTorch bit for bit (round-half-even ties
    included). It covers C % 4 != 0, output channels that are not whole vectors, ReLU / ReLU6 / clamp, a
    signed int8 quantize read by a uint8 kernel (the +128 shift), a padded max-pool on the codes, flatten
    into a Linear (weight columns permuted), and a quantized tensor with two users (not fused into its
    consumer: the graph-layout view).
  * the digits CNN with calibrated (non-power-of-two) scales, host path: fused == unfused bit for bit (the
    float32 rounding of scale and bias is the same in both).
Chain on x86 native (the host's int8 path) and x86:haswell (AVX2 vpmaddubsw path); one build per target and
model (builds dominate the run time).
"""
from __future__ import annotations

import functools

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
import torch
import torch.nn.functional as F
from torch import nn

import graphopt
from graphopt.backends.targets import resolve_target
from graphopt.quant import ops
from graphopt.quant.modules import QuantConv2d, QuantLinear
from graphopt.quant.qparams import QParams

tvm = pytest.importorskip("tvm")

from graphopt.backends.tvm import build_module, lower_graph  # noqa: E402
from graphopt.backends.tvm import quant_lower  # noqa: E402
from graphopt.backends.tvm.quant_lower import int8_path, weight_qmax_for  # noqa: E402
from graphopt.backends.tvm.runtime import CompiledModule  # noqa: E402

from tests.helpers import X86_TARGETS  # noqa: E402

from .test_int8_paths import _skip_unless_runs_here  # noqa: E402

TARGETS = X86_TARGETS                   # x86:haswell too where the host's x86 is AVX-512

QA = QParams(1 / 16, 128, "uint8")
QB = QParams(1 / 8, 0, "uint8")
QC = QParams(1 / 16, 0, "int8")            # signed codes, read by the uint8 x86 kernels with a +128 shift
QD = QParams(1 / 4, 3, "uint8")
QE = QParams(1 / 8, 10, "uint8")
QF = QParams(1 / 2, 0, "uint8")


def _q(t, qp):
    lo, hi = (0, 255) if qp.dtype == "uint8" else (-128, 127)
    return ops.quantize(t, qp.scale, qp.zero_point, lo, hi)


def _exact(mod, shift: int, g):
    """out_scale a power of two and bias multiples of 1/16: the float32 epilogue is exact."""
    mod.out_scale.fill_(2.0 ** -shift)
    n = mod.out_scale.shape[0]
    mod.bias = (torch.randint(-32, 32, (n,), generator=g) / 16.0).float()
    return mod


class Chain(nn.Module):
    def __init__(self, qmax: int):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        conv = lambda ci, co, **kw: nn.Conv2d(ci, co, 3, **kw)            # noqa: E731
        self.c1 = _exact(QuantConv2d(conv(6, 20, padding=1), QA, weight_qmax=qmax), 6, g)
        self.c2 = _exact(QuantConv2d(conv(20, 24, padding=1), QB, weight_qmax=qmax), 7, g)
        self.c3 = _exact(QuantConv2d(conv(24, 16, stride=2, padding=1), QC, weight_qmax=qmax), 7, g)
        self.c4 = _exact(QuantConv2d(conv(16, 12, padding=1), QD, weight_qmax=qmax), 7, g)
        self.l1 = _exact(QuantLinear(torch.randn(37, 12 * 3 * 3, generator=g), None, QE, weight_qmax=qmax), 8, g)
        self.l2 = _exact(QuantLinear(torch.randn(10, 37, generator=g), None, QF, weight_qmax=qmax), 6, g)

    def forward(self, x):
        a = _q(x, QA)
        b = _q(F.relu(self.c1(a)), QB)
        side = b.float().sum(dim=1)                       # a second user of b: b is not fused into c2
        c = _q(F.relu6(self.c2(b)), QC)
        d = _q(F.max_pool2d(F.relu(self.c3(c)), 3, 2, padding=1), QD)
        e = _q(torch.flatten(torch.clamp(self.c4(d), -1.0, 5.0), 1), QE)
        f = _q(F.relu(self.l1(e)), QF)
        return self.l2(f), side


def _build(module, args, spec, fuse: bool):
    saved = quant_lower.FUSE_EPILOGUES
    quant_lower.FUSE_EPILOGUES = fuse
    try:
        gm = module if isinstance(module, torch.fx.GraphModule) else torch.fx.symbolic_trace(module)
        lowered = lower_graph(gm, args, spec)
        exe = build_module(lowered.mod, spec)
    finally:
        quant_lower.FUSE_EPILOGUES = saved
    return CompiledModule(exe, spec, lowered.inputs, lowered.outputs, lowered.out_spec, lowered.const_outputs), lowered


def _kernel_outputs(lowered) -> list[str]:
    """dtypes of the graphopt int8 kernels' outputs in the lowered main, after dead-code elimination."""
    from tvm import relax

    main = relax.transform.DeadCodeElimination()(lowered.mod)["main"]
    found = []

    def visit(e):
        if isinstance(e, relax.Call) and getattr(e.op, "name", "") == "relax.call_tir":
            name = e.args[0].name_hint
            if name.startswith("graphopt_q"):
                fields = e.ty.fields if hasattr(e.ty, "fields") else [e.ty]     # codes + float32 sum
                found.extend((name, str(f.dtype)) for f in fields)

    relax.analysis.post_order_visit(main, visit)
    return found


def _inputs():
    g = torch.Generator().manual_seed(1)
    return ((torch.randint(-100, 100, (2, 6, 11, 11), generator=g) + 0.5) / 16,)   # .5: round-half-even ties


@pytest.fixture(scope="module", params=TARGETS)
def chain(request):
    target = request.param
    _skip_unless_runs_here(target)
    if target != "x86" and int8_path(resolve_target(target)) == int8_path(resolve_target("x86")):
        pytest.skip(f"this host's int8 path is {int8_path(resolve_target(target))} too: the x86 case covers it")
    spec = resolve_target(target)
    module = Chain(weight_qmax_for(int8_path(spec))).eval()
    args = _inputs()
    fused, lowered = _build(module, args, spec, True)
    return target, module, args, fused, lowered


def test_chain_fused_equals_the_qdq_graph_bit_for_bit(chain):
    target, module, args, fused, lowered = chain
    assert "fused requantize epilogue×5" in lowered.quant, lowered.quant
    assert "qmaxpool (on int8 codes)×1" in lowered.quant
    with torch.no_grad():
        ref = module(*args)
    for name, y, r in zip(("logits", "side"), fused(*args), ref):
        assert torch.equal(y, r), f"{target}: {name}: fused != PyTorch by {(y - r).abs().max().item()}"
    assert ref[0].abs().max() > 0 and ref[0].std() > 0                 # not a degenerate all-equal output


def test_chain_keeps_codes_between_int8_kernels(chain):
    *_, lowered = chain
    outs = _kernel_outputs(lowered)
    float_out = [n for n, dt in outs if dt == "float32"]
    assert len(float_out) == 1 and float_out[0].startswith("graphopt_qdense"), outs   # the logits only
    assert sum(dt in ("uint8", "int8") for _, dt in outs) == 6                         # 5 layers + the pool


@pytest.fixture(scope="module")
def digits():
    from graphopt.datasets import DigitsCNN

    target = "x86"
    torch.manual_seed(0)
    model = DigitsCNN(width=8).eval()
    x = torch.randn(1, 1, 8, 8)
    calib = [torch.randn(16, 1, 8, 8)]
    opt = graphopt.optimize(model, target, "fold_bn,cleanup,quantize(progress=false)", example_inputs=(x,),
                            calibration=calib)
    unfused, _ = _build(opt.graph_module, (x,), resolve_target(target), False)
    return target, opt, unfused


def test_digits_cnn_fused_equals_unfused_bit_for_bit(digits):
    target, opt, unfused = digits
    assert "fused requantize epilogue×4" in opt.report.backend["int8"], opt.report.backend["int8"]
    g = torch.Generator().manual_seed(2)
    xs = torch.randn(16, 1, 8, 8, generator=g)
    with torch.no_grad():
        for i in range(len(xs)):
            x = xs[i:i + 1]
            y, u, r = opt(x), unfused(x), opt.graph_module(x)
            assert torch.equal(y, u), f"{target}: sample {i}: fused != unfused by {(y - u).abs().max().item()}"
            assert torch.allclose(y, r, rtol=0, atol=1e-4 * r.abs().max().item())


def test_sdot_chain_lowers_to_shifted_int8_codes():
    """ARM dot-product path (lowered only, no build: cheap): the same chain fuses, and the codes between the
    kernels are int8 (uint8 codes shifted by -128 for sdot's s8·s8 products) with no conversion kernel."""
    spec = resolve_target("arm:neoverse-n1")
    module = Chain(weight_qmax_for(int8_path(spec))).eval()
    lowered = lower_graph(torch.fx.symbolic_trace(module), _inputs(), spec)
    assert lowered.quant.startswith("path=sdot:") and "fused requantize epilogue×5" in lowered.quant
    outs = _kernel_outputs(lowered)
    assert [dt for _, dt in outs].count("float32") == 1
    assert sum(dt == "int8" for _, dt in outs) == 6, outs


class DepthwiseBlock(nn.Module):
    """MobileNetV2's inverted residual without the residual: 1x1 expand + ReLU6, 3x3 depthwise + ReLU6,
    1x1 project. 32 expanded channels (whole 16-channel blocks), a 7-wide image (a partial row tile)."""

    def __init__(self):
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(8, 32, 1), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.ReLU6())
        self.project = nn.Conv2d(32, 16, 1)

    def forward(self, x):
        return self.project(self.dw(self.expand(x)))


@pytest.mark.parametrize("target", TARGETS)
def test_depthwise_conv_reads_the_codes_its_producer_stored(target):
    """The expand conv's fused epilogue stores the depthwise conv's input as the depthwise kernel reads it
    (NHWC uint8, padded with the zero point, whole 16-channel blocks), so no permute/pad/quantize kernel runs
    between them; the result equals the unfused lowering bit for bit and the QDQ graph to float rounding."""
    _skip_unless_runs_here(target)
    torch.manual_seed(0)
    model = DepthwiseBlock().eval()
    x = torch.randn(1, 8, 7, 7)
    opt = graphopt.optimize(model, target, "cleanup,quantize(progress=false)", example_inputs=(x,),
                            calibration=[torch.randn(8, 8, 7, 7)])
    assert "qconv2d:depthwise reads fused codes×1" in opt.report.backend["int8"], opt.report.backend["int8"]
    unfused, _ = _build(opt.graph_module, (x,), resolve_target(target), False)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _ in range(4):
            xi = torch.randn(1, 8, 7, 7, generator=g)
            y, u, r = opt(xi), unfused(xi), opt.graph_module(xi)
            assert torch.equal(y, u), f"{target}: fused != unfused by {(y - u).abs().max().item()}"
            assert torch.allclose(y, r, rtol=0, atol=1e-4 * r.abs().max().item())


# ------------------------------------------------------------------------------------ residual blocks
class ResNetStyle(nn.Module):
    """ResNet basic blocks (torchvision's BasicBlock): a stem conv + ReLU + max-pool whose (float32) output is
    both the first block's input and its identity; a block add(conv2, identity) -> ReLU read by the next conv and the next
    block's add; a stride-2 block whose identity is a 1x1 downsample conv (add of two int8 convs); a last
    block whose sum goes to a float op (mean: the unfused path). 24 and 40 channels: not whole vectors."""

    def __init__(self):
        super().__init__()
        from torchvision.models.resnet import BasicBlock

        self.stem = nn.Sequential(nn.Conv2d(3, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        down = nn.Sequential(nn.Conv2d(24, 40, 1, stride=2, bias=False), nn.BatchNorm2d(40))
        self.blocks = nn.Sequential(BasicBlock(24, 24), BasicBlock(24, 40, 2, down), BasicBlock(40, 40))
        self.fc = nn.Linear(40, 10)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


class MobileNetV2Style(nn.Module):
    """MobileNetV2's inverted residuals (torchvision's InvertedResidual): a block without residual whose
    project conv (no activation) is read by the next expand conv and the next block's add; blocks whose sum
    add(identity, project) (no activation) is quantized for the next 1x1 conv and also the next residual."""

    def __init__(self):
        super().__init__()
        from torchvision.models.mobilenetv2 import InvertedResidual

        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.blocks = nn.Sequential(InvertedResidual(16, 24, 1, 2), InvertedResidual(24, 24, 1, 2),
                                    InvertedResidual(24, 24, 1, 2))
        self.head = nn.Sequential(nn.Conv2d(24, 32, 1), nn.ReLU6())
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(self.head(self.blocks(self.stem(x))).mean((2, 3)))


def _randomize_bn(model, seed: int):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


RESIDUAL_CASES = {"resnet": (ResNetStyle, (1, 3, 22, 22), 7, 2), "mobilenetv2": (MobileNetV2Style, (1, 3, 14, 14), 6, 2)}


def _residual_params():
    """Every (model, target) pair; where there are two targets, each model's second one runs with -m slow (suite
    time, issue 16): the default run still builds both models and both int8 paths."""
    return [pytest.param((m, t), marks=[pytest.mark.slow] if (i + j) % 2 else [])
            for i, m in enumerate(RESIDUAL_CASES) for j, t in enumerate(TARGETS)]


@pytest.fixture(scope="module", params=_residual_params(), ids=lambda p: "-".join(p))
def residual_block(request):
    name, target = request.param
    _skip_unless_runs_here(target)
    opt, x = _residual_opt(name, target)
    unfused, lowered = _build(opt.graph_module, (x,), resolve_target(target), False)
    return name, target, opt, unfused, lowered


@functools.lru_cache(maxsize=None)
def _residual_opt(name: str, target: str):
    """The quantized residual block of RESIDUAL_CASES[name] built for `target`, and its example input."""
    cls, shape, batches, *_ = RESIDUAL_CASES[name]
    torch.manual_seed(0)
    model = _randomize_bn(cls(), 1).eval()
    x = torch.randn(*shape)
    opt = graphopt.optimize(model, target, "fold_bn,cleanup,quantize(progress=false)", example_inputs=(x,),
                            calibration=[torch.randn(batches, *shape[1:])])
    return opt, x


def test_residual_block_fused_equals_unfused_bit_for_bit(residual_block):
    """The residual add, its activation and the quantize run in the producing conv's epilogue (the sum also
    stored as float32 NHWC where the next block's add reads it): the logits equal the unfused lowering (conv
    writes float32, elementwise add/act/quantize kernel) bit for bit, and the QDQ graph to float rounding."""
    name, target, opt, unfused, _ = residual_block
    n_add = RESIDUAL_CASES[name][3]
    assert f"fused residual add×{n_add}" in opt.report.backend["int8"], opt.report.backend["int8"]
    assert "fused float32 second output" in opt.report.backend["int8"]
    if name == "resnet":
        assert "max-pool (float32 and int8 codes)×1" in opt.report.backend["int8"], opt.report.backend["int8"]
    shape = RESIDUAL_CASES[name][1]
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for i in range(4):
            xi = torch.randn(*shape, generator=g)
            y, u, r = opt(xi), unfused(xi), opt.graph_module(xi)
            assert torch.equal(y, u), f"{name} {target}: sample {i}: fused != unfused by {(y - u).abs().max()}"
            assert torch.allclose(y, r, rtol=0, atol=1e-4 * r.abs().max().item())
            assert r.std() > 0


def _called_kernels(mod, spec) -> list[str]:
    """Names of the kernels the scheduled (legalized, fused) module's main calls."""
    from tvm import relax

    from graphopt.backends.tvm.build import _schedule

    called = []

    def visit(e):
        if isinstance(e, relax.Call) and getattr(e.op, "name", "") == "relax.call_tir":
            called.append(e.args[0].name_hint)

    relax.analysis.post_order_visit(_schedule(mod, spec)["main"], visit)
    return called


def test_residual_block_has_no_standalone_quantize_kernel(residual_block):
    """Fused: the only elementwise quantize kernels left are the network input's and the one after the
    mean (float ops), against one per quantized tensor unfused; the only pad kernel is the input's (the
    downsampling block's 3x3 conv and 1x1 downsample read one copy of the codes, padded for the 3x3), and no
    residual is permuted to NHWC by a kernel of its own."""
    name, target, opt, _, lowered = residual_block
    spec = resolve_target(target)
    assert "residual permuted" not in opt.report.backend["int8"], opt.report.backend["int8"]
    fused_mod = lower_graph(opt.graph_module, (torch.randn(*RESIDUAL_CASES[name][1]),), spec).mod
    fused, unfused = _called_kernels(fused_mod, spec), _called_kernels(lowered.mod, spec)
    n_fused, n_unfused = (sum("round" in k for k in ks) for ks in (fused, unfused))
    assert n_fused == 2, fused
    assert n_unfused > n_fused + RESIDUAL_CASES[name][3], unfused
    assert sum("pad" in k for k in fused if not k.startswith("graphopt_q")) == 1, fused


# torchvision's own ResNet and MobileNetV2 classes, shortened to the stages that hold every kind of block the
# full networks have (lowering and scheduling cost grows with the layer count: the whole ResNet-18 and
# MobileNetV2 took ~28 s of CPU here, these ~7 s). ResNet: the stem conv + max-pool, and in each of the four
# stages one BasicBlock (an identity block in stage 1, a block with a strided 1x1 downsample in stages 2-4).
# MobileNetV2: the first conv, the expand-ratio-1 block (depthwise + project, no expand), a stride-2 expand
# block and a residual one, the 1x1 conv to 1280 channels, the classifier.
TORCHVISION_INT8 = {
    "resnet": lambda tv: tv.models.resnet.ResNet(tv.models.resnet.BasicBlock, [1, 1, 1, 1]),
    "mobilenet_v2": lambda tv: tv.models.mobilenet_v2(inverted_residual_setting=[[1, 16, 1, 1], [6, 24, 2, 2]]),
}


@pytest.fixture(scope="module", params=list(TORCHVISION_INT8))
def torchvision_int8(request):
    """A statically quantized torchvision network (random init, 32x32 input; quantized for 'torch': the
    lowering below is for x86, built no further than the scheduled IRModule)."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = TORCHVISION_INT8[request.param](torchvision).eval()
    x = torch.randn(1, 3, 32, 32)
    opt = graphopt.optimize(model, "torch", "fold_bn,cleanup,quantize(progress=false)", example_inputs=(x,),
                            calibration=[torch.randn(2, 3, 32, 32)], verify=False)
    return request.param, opt.graph_module, x


def test_torchvision_int8_has_no_standalone_requantize_between_layers(torchvision_int8):
    """ResNet / MobileNetV2 int8 on x86: the elementwise quantize kernels left in the scheduled module are
    the input's and the one after the global average pool, against one per quantized tensor unfused
    (ResNet's stem max-pool, whose float output is also the first block's identity, stores its codes)."""
    name, gm, x = torchvision_int8
    spec = resolve_target("x86")
    saved = quant_lower.FUSE_EPILOGUES
    try:
        quant_lower.FUSE_EPILOGUES = False
        unfused = _called_kernels(lower_graph(gm, (x,), spec).mod, spec)
    finally:
        quant_lower.FUSE_EPILOGUES = saved
    fused = _called_kernels(lower_graph(gm, (x,), spec).mod, spec)
    n_fused, n_unfused = (sum("round" in k for k in ks) for ks in (fused, unfused))
    quantized = sum(n.target is torch.ops.graphopt.quantize.default for n in gm.graph.nodes)
    assert quantized >= {"resnet": 10, "mobilenet_v2": 11}[name], quantized    # the network is int8 throughout
    assert n_fused == 2, [k for k in fused if "round" in k]
    assert n_unfused >= quantized, (n_unfused, quantized)
    assert len(fused) < len(unfused) - n_unfused + n_fused


@pytest.mark.parametrize("name", RESIDUAL_CASES)
def test_sdot_residual_block_lowers_to_int8_codes(name):
    """ARM dot-product path (lowered only, no build): the residual blocks fuse there too, and every int8
    kernel's codes are int8 (shifted by -128 for sdot) or the float32 sums the next adds read."""
    opt, _ = _residual_opt(name, "x86")
    spec = resolve_target("arm:neoverse-n1")
    lowered = lower_graph(opt.graph_module, (torch.randn(*RESIDUAL_CASES[name][1]),), spec)
    assert lowered.quant.startswith("path=sdot:"), lowered.quant
    assert f"fused residual add×{RESIDUAL_CASES[name][3]}" in lowered.quant, lowered.quant
    outs = _kernel_outputs(lowered)
    assert outs and all(dt in ("int8", "float32") for _, dt in outs), outs
    assert not any(dt == "uint8" for _, dt in outs)


class _GeluFFN(nn.Module):
    """A transformer block's feed-forward half: Linear -> GELU -> Linear, odd widths (not whole vectors)."""

    def __init__(self, approximate: str):
        super().__init__()
        torch.manual_seed(0)
        self.up, self.down, self.act = nn.Linear(40, 72), nn.Linear(72, 24), nn.GELU(approximate)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_linear_gelu_quantize_is_one_kernel_equal_to_the_unfused_pair(target, approximate):
    """Linear -> GELU -> quantize -> Linear: the first int8 GEMM applies the GELU (the same fast_erf / fast_tanh
    polynomial as the unfused elementwise kernel) and the quantize in its epilogue and stores uint8 codes, so
    no float32 tensor and no standalone quantize kernel sit between the two GEMMs; the result equals the
    unfused lowering bit for bit, special values (inf, NaN, huge) included."""
    _skip_unless_runs_here(target)
    model = _GeluFFN(approximate).eval()
    g = torch.Generator().manual_seed(2)
    calib = [torch.randn(3, 5, 40, generator=g) * 2 for _ in range(4)]
    opt = graphopt.optimize(model, target, "quantize(progress=false)", example_inputs=(calib[0],),
                            calibration=calib)
    assert "fused requantize epilogue" in opt.report.backend["int8"]
    unfused, _ = _build(opt.graph_module, (calib[0],), resolve_target(target), False)
    _, lowered = _build(opt.graph_module, (calib[0],), resolve_target(target), True)
    outs = dict(_kernel_outputs(lowered))
    assert len(outs) == 2 and sorted(outs.values()) == ["float32", "uint8"], outs
    odd = torch.randn(3, 5, 40, generator=g) * 30
    odd[0, 0, :3] = torch.tensor([float("inf"), float("-inf"), float("nan")])
    with torch.no_grad():
        for x in (*calib[:2], odd):
            y, u = opt(x), unfused(x)
            assert torch.equal(y.isnan(), u.isnan()) and torch.equal(y[~y.isnan()], u[~u.isnan()]), \
                f"{target} {approximate}: fused != unfused by {(y - u).abs().nan_to_num().max().item()}"
            ref = opt.graph_module(x)
            ok = ~ref.isnan()
            assert (y[ok] - ref[ok]).abs().max().item() < 1e-3 * max(1.0, ref[ok].abs().max().item())


_CLAMPS = st.one_of(st.none(), st.floats(-8, 8, width=32))


@settings(max_examples=300, deadline=None)
@given(scale=st.floats(1 / 1024, 2.0, width=32), zp=st.integers(0, 255), signed=st.booleans(),
       acts=st.lists(st.tuples(_CLAMPS, _CLAMPS), min_size=1, max_size=3),
       ys=st.lists(st.floats(-2.0 ** 20, 2.0 ** 20, width=32), min_size=1, max_size=32))
@example(scale=0.25, zp=0, signed=False, acts=[(None, 0.625)], ys=[0.0])      # a bound on a rounding tie
@example(scale=0.25, zp=128, signed=True, acts=[(-0.375, None)], ys=[0.0])
def test_activation_clamps_fold_into_the_codes_clamp(scale, zp, signed, acts, ys):
    """Epilogue.merged_bounds: quantize(clamps(y)) == the codes' clamp to the merged bounds of quantize(y),
    in float32 as the kernel computes it (the kernel then runs two vector operations fewer per vector), for
    any per-tensor qparams, any chain of ReLU / ReLU6 / clamp bounds and any finite y, the bounds themselves,
    values next to them and the ties of the rounding included; or None (the unmerged expression is used) where
    the clamps' ranges are disjoint or leave a single code."""
    import numpy as np

    from graphopt.backends.tvm.quant_epilogue import Epilogue

    qmin, qmax = (-128, 127) if signed else (0, 255)
    zp = min(max(zp + qmin, qmin), qmax)
    inv = float(np.float32(1.0) / np.float32(scale))
    epi = Epilogue("int8" if signed else "uint8", acts=tuple(acts), inv_scale=inv, zp=zp, qmin=qmin, qmax=qmax)
    bounds = epi.merged_bounds()
    f = np.float32
    edges = [f(b) for a in acts for b in a if b is not None]
    y = np.array(ys + edges + [np.nextafter(e, f(np.inf)) for e in edges]
                 + [np.nextafter(e, f(-np.inf)) for e in edges] + [f((k + 0.5) / inv) for k in range(-4, 4)],
                 dtype=np.float32)

    def codes(v, lo, hi):
        return np.minimum(np.maximum(np.rint(v * f(inv)) + f(zp), f(lo)), f(hi))

    ref = y.copy()
    for lo, hi in acts:
        ref = ref if lo is None else np.maximum(ref, f(lo))
        ref = ref if hi is None else np.minimum(ref, f(hi))
    ref = codes(ref, qmin, qmax)
    lo_all = max([f(a) for a, _ in acts if a is not None], default=-np.inf)
    hi_all = min([f(b) for _, b in acts if b is not None], default=np.inf)
    if bounds is None:       # only where the clamps' ranges are disjoint, or all of y gets one code
        assert lo_all > hi_all or len(set(ref.tolist())) == 1, (acts, bounds)
        return
    np.testing.assert_array_equal(codes(y, *bounds), ref)
