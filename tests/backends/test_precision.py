"""precision="float16": float16 operands with float32 accumulation, float32 signature (backends/tvm/precision.py).

Checked on the CPU (LLVM converts float16, so the numerics are the same contract as on a GPU): outputs within
float16's rounding of float32, the report names the precision, bad values are typed errors; and for CUDA
(scheduling only, no GPU needed; slow: TVM's CUDA tensor intrinsics take 30-60 s to import) that float16 matrix
products get dlight's tensor-core (wmma) schedule. On a GPU, test_cuda.py runs a float16 build.
"""
import pytest
import torch
from torch import nn

import graphopt
from graphopt.backends.targets import resolve_target
from graphopt.backends.tvm.precision import apply_precision, check_precision
from graphopt.errors import GraphoptError
from tests.helpers import randomize_bn


def _cnn():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 1),
                      nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    return randomize_bn(m).eval(), torch.randn(2, 3, 12, 12)


def _relu6_depthwise():
    """MobileNetV2's block shape: ReLU6 lowers to R.clip with scalar bounds, which ToMixedPrecision cannot type."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16), nn.ReLU6(), nn.Conv2d(16, 16, 3, padding=1, groups=16),
                      nn.ReLU6(), nn.Flatten(), nn.Linear(16 * 8 * 8, 10))
    return randomize_bn(m).eval(), torch.randn(2, 3, 8, 8)


def _encoder():
    torch.manual_seed(0)
    m = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True).eval()
    return m, torch.randn(2, 10, 64)


@pytest.mark.parametrize("make", [_cnn, _relu6_depthwise, _encoder], ids=["cnn", "relu6-depthwise", "encoder"])
def test_float16_matches_float32_within_half_rounding(make):
    model, x = make()
    opt = graphopt.optimize(model, target="x86", example_inputs=(x,), precision="float16")
    with torch.no_grad():
        want = model(x)
    got = opt(x)
    assert got.dtype == torch.float32 and got.shape == want.shape
    rel = ((got - want).abs().max() / want.abs().max()).item()
    assert 0 < rel < 1e-2, rel            # not bit-identical to float32 (it did compute in float16), but close
    assert opt.report.backend["precision"].startswith("float16")


def test_float32_is_the_default_and_unchanged():
    model, x = _cnn()
    opt = graphopt.optimize(model, target="x86", example_inputs=(x,), precision="fp32")
    assert "precision" not in opt.report.backend
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x), rtol=1e-4, atol=1e-5)


def test_bad_precision_is_a_typed_error():
    model, x = _cnn()
    with pytest.raises(GraphoptError, match=r"precision='int3'.*float32, float16"):
        graphopt.optimize(model, target="x86", example_inputs=(x,), precision="int3")
    with pytest.raises(GraphoptError, match="not 'torch'"):
        graphopt.optimize(model, target="torch", example_inputs=(x,), precision="float16")
    assert check_precision("fp16") == "float16"
    assert check_precision("float32-high") == check_precision("high") == "high"


def test_precision_high_is_float32_where_no_int4_gemv_takes_it():
    """precision="high" changes only int4 weight-only GEMVs (tests/quant/test_woq4_bf16.py): a float32 CNN builds
    the same outputs as precision="float32", bit for bit."""
    model, x = _cnn()
    high = graphopt.optimize(model, target="x86", example_inputs=(x,), precision="high")
    plain = graphopt.optimize(model, target="x86", example_inputs=(x,))
    assert torch.equal(high(x), plain(x))
    assert high.report.backend["precision"].startswith("high")


@pytest.mark.slow      # dlight's tensor-core rule imports tvm.s_tir.tensor_intrin.cuda: 30-60 s of TVMScript parsing
def test_cuda_float16_matmuls_get_tensor_core_schedules():
    from graphopt.backends.tvm.cuda import schedule_for_gpu, unscheduled_kernels
    from graphopt.backends.tvm.lower import lower_graph

    m = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 128)).eval()
    x = (torch.randn(128, 256),)
    spec = resolve_target("cuda:sm_90")
    low = lower_graph(torch.fx.symbolic_trace(m), x, spec)
    f16 = schedule_for_gpu(apply_precision(low.mod, "float16"), spec)
    f32 = schedule_for_gpu(low.mod, spec)
    assert unscheduled_kernels(f16) == []
    assert "wmma" in f16.script()           # dlight's MatmulTensorization: float16 in, float32 accumulate
    assert "wmma" not in f32.script()
