"""float16 as a mixed-precision choice: offered only where the target has fast float16 arithmetic (aarch64 CPUs
with FP16, e.g. cortex-a76), never on x86; cross-built for arm and run under qemu when available."""
import pytest
import torch
from torch import nn

import graphopt
from graphopt.backends.tvm import rpc
from graphopt.quant.half import HalfLinear
from graphopt.quant.mixed import CHOICES, supported_choices
from tests.backends.conftest import needs_aarch64_runtime, needs_cross


@pytest.mark.parametrize("target,fp16", [("arm:cortex-a76", True), ("arm:neoverse-n1", True),
                                         ("arm:cortex-a72", False), ("arm", False), ("x86", False),
                                         ("x86:haswell", False), ("x86:sapphirerapids", False),
                                         ("torch", False), ("cuda:sm_80", False)])
def test_float16_is_offered_only_with_fast_float16(target, fp16):
    got = supported_choices(target, "linear")
    assert ("float16" in got) == fp16
    assert [c for c in got if c != "float16"] == [c for c in CHOICES if target.startswith(("arm", "x86", "torch"))
                                                   or c in ("float32", "int8_static", "int8_dynamic")]
    assert "float16" not in supported_choices(target, "conv2d")


def test_half_linear_is_the_float16_rounded_linear():
    torch.manual_seed(0)
    lin = nn.Linear(48, 24)
    mod = HalfLinear(lin.weight, lin.bias)
    x = torch.randn(3, 48)
    ref = nn.functional.linear(x.half().double(), lin.weight.half().double()) + lin.bias.double()
    torch.testing.assert_close(mod(x).double(), ref, rtol=2e-3, atol=2e-3)      # product rounded to float16
    assert mod(x).dtype == torch.float32 and mod.weight.dtype == torch.float16
    assert graphopt.analysis.model_size_bytes(mod) == 48 * 24 * 2 + 24 * 4


@pytest.fixture(scope="module")
def fp16_arm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)).eval()
    x = torch.randn(2, 64)
    calib = [torch.randn(2, 64) for _ in range(4)]
    # float32 or float16 per layer, about half the bytes: the allocation must take float16 for the big layers
    opt = graphopt.optimize(model, "arm:cortex-a76", "quantize(bits=mixed,budget=size:0.55,choices=[float16],"
                            "progress=false)", example_inputs=(x,), calibration=calib)
    return model, x, opt


@needs_cross
def test_mixed_takes_float16_on_arm_and_cross_builds(fp16_arm):
    model, x, opt = fp16_arm
    halves = [n for n, m in opt.graph_module.named_modules() if isinstance(m, HalfLinear)]
    assert halves and opt.report.backend["target"] == "arm:cortex-a76"
    rows = opt.report.records[-1].details
    assert sum(r["choice"] == "fp16" for r in rows) == len(halves)
    assert opt.report.final.size_bytes <= 0.55 * sum(p.numel() * 4 for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(opt.graph_module(x), model(x), rtol=0, atol=5e-3 * model(x).abs().max().item())


@needs_cross
@needs_aarch64_runtime
def test_float16_layers_run_on_aarch64(fp16_arm, aarch64_server):
    model, x, opt = fp16_arm
    remote = rpc.load_remote(opt, rpc.connect(aarch64_server.device, timeout=120))
    with torch.no_grad():
        want = opt.graph_module(x)
        scale = want.abs().max().item()
        got = remote(x)
        torch.testing.assert_close(got, want, rtol=0, atol=2e-3 * scale)     # float16 rounding of the products
        torch.testing.assert_close(got, model(x), rtol=0, atol=5e-3 * scale)
