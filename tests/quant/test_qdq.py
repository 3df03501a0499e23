"""The quantized ops and layers against numpy references (bit for bit), and against float layers."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from graphopt.quant import ops
from graphopt.quant.modules import DynamicQuantLinear, QuantConv2d, QuantLinear, WeightOnlyLinear
from graphopt.quant.qparams import QParams, act_qparams, quantize_ref, quantize_weight, weight_qparams


def np_qlinear(xq, wq, out_scale, bias, zp):
    acc = (xq.astype(np.int64) - zp) @ wq.astype(np.int64).T
    return acc.astype(np.float32) * out_scale.astype(np.float32) + bias.astype(np.float32)


def np_qconv2d(xq, wq, out_scale, bias, zp, stride, padding):
    """Integer conv by explicit loops over the kernel taps (int64), padding with the zero point."""
    n, c, h, w = xq.shape
    co, ci, kh, kw = wq.shape
    x = np.pad(xq.astype(np.int64), ((0, 0), (0, 0), (padding[0],) * 2, (padding[1],) * 2),
               constant_values=zp) - zp
    oh = (h + 2 * padding[0] - kh) // stride[0] + 1
    ow = (w + 2 * padding[1] - kw) // stride[1] + 1
    acc = np.zeros((n, co, oh, ow), np.int64)
    for i in range(kh):
        for j in range(kw):
            patch = x[:, :, i:i + stride[0] * oh:stride[0], j:j + stride[1] * ow:stride[1]]
            acc += np.einsum("nchw,oc->nohw", patch, wq[:, :, i, j].astype(np.int64))
    return acc.astype(np.float32) * out_scale.reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1)


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2 ** 31 - 1), dtype=st.sampled_from(["uint8", "int8"]),
       lo=st.floats(-50, 0), hi=st.floats(1e-3, 50))
def test_quantize_matches_numpy_bit_for_bit(seed, dtype, lo, hi):
    qp = act_qparams(lo, hi, dtype)
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(257) * (hi - lo)).astype(np.float32)
    # exact ties k + 0.5 (round half to even) and values far outside the range (clipping)
    x[:8] = ((np.arange(8) - 4 + 0.5) / np.float32(qp.inv_scale)).astype(np.float32)
    x[8:10] = [1e6, -1e6]
    got = ops.quantize(torch.from_numpy(x), qp.scale, qp.zero_point, qp.qmin, qp.qmax)
    assert got.dtype == qp.torch_dtype
    np.testing.assert_array_equal(got.numpy(), quantize_ref(x, qp))


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2 ** 31 - 1), m=st.integers(1, 9), k=st.integers(1, 70), n=st.integers(1, 40),
       signed=st.booleans())
def test_qlinear_matches_numpy_bit_for_bit(seed, m, k, n, signed):
    rng = np.random.default_rng(seed)
    xq = rng.integers(-127, 128, (m, k)).astype(np.int8) if signed else rng.integers(0, 256, (m, k)).astype(
        np.uint8)
    zp = 0 if signed else int(rng.integers(0, 256))
    wq = rng.integers(-127, 128, (n, k)).astype(np.int8)
    out_scale = (rng.random(n) * 1e-3).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    got = ops.qlinear(torch.from_numpy(xq), torch.from_numpy(wq), torch.from_numpy(out_scale),
                      torch.from_numpy(bias), zp)
    np.testing.assert_array_equal(got.numpy(), np_qlinear(xq, wq, out_scale, bias, zp))


@pytest.mark.parametrize("stride,padding", [((1, 1), (1, 1)), ((2, 1), (0, 2))])
def test_qconv2d_matches_numpy_bit_for_bit(stride, padding):
    rng = np.random.default_rng(0)
    xq = rng.integers(0, 256, (2, 5, 9, 8)).astype(np.uint8)
    wq = rng.integers(-127, 128, (7, 5, 3, 3)).astype(np.int8)
    out_scale = (rng.random(7) * 1e-3).astype(np.float32)
    bias = rng.standard_normal(7).astype(np.float32)
    zp = 113
    got = ops.qconv2d(torch.from_numpy(xq), torch.from_numpy(wq), torch.from_numpy(out_scale),
                      torch.from_numpy(bias), zp, list(stride), list(padding), [1, 1], 1)
    np.testing.assert_array_equal(got.numpy(), np_qconv2d(xq, wq, out_scale, bias, zp, stride, padding))


def test_dynamic_qlinear_matches_numpy():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 17)).astype(np.float32) * 3 + 1
    wq = rng.integers(-127, 128, (6, 17)).astype(np.int8)
    w_scale = (rng.random(6) * 1e-2).astype(np.float32)
    bias = rng.standard_normal(6).astype(np.float32)
    lo, hi = np.float32(min(x.min(), 0)), np.float32(max(x.max(), 0))
    scale = np.float32((hi - lo) / np.float32(255))
    inv = np.float32(np.float32(1) / scale)
    zp = np.clip(np.round(-lo * inv), 0, 255).astype(np.float32)
    xq = np.clip(np.round(x * inv) + zp, 0, 255)
    ref = np_qlinear(xq.astype(np.uint8), wq, (scale * w_scale).astype(np.float32), bias, int(zp))
    got = ops.dynamic_qlinear(torch.from_numpy(x), torch.from_numpy(wq), torch.from_numpy(w_scale),
                              torch.from_numpy(bias))
    np.testing.assert_array_equal(got.numpy(), ref)


def test_integer_overflow_is_detected():
    xq = torch.full((1, 140_000), 255, dtype=torch.uint8)
    wq = torch.full((1, 140_000), 127, dtype=torch.int8)
    with pytest.raises(OverflowError, match="int32"):
        ops.qlinear(xq, wq, torch.ones(1), None, 0)


def test_weight_quantization_is_per_channel_symmetric():
    w = torch.tensor([[0.5, -1.0, 0.25], [10.0, 0.0, -5.0]])
    s = weight_qparams(w)
    assert s.tolist() == pytest.approx([1.0 / 127, 10.0 / 127])
    q = quantize_weight(w, s)
    assert q.dtype == torch.int8
    assert q.tolist() == [[64, -127, 32], [127, 0, -64]]


def test_quant_linear_is_close_to_float_within_the_rounding_bound():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    x = torch.randn(16, 64)
    qp = act_qparams(x.min().item(), x.max().item(), "uint8")
    q = QuantLinear(lin.weight, lin.bias, qp)
    y = q(ops.quantize(x, qp.scale, qp.zero_point, qp.qmin, qp.qmax))
    ref = lin(x).detach()
    # |Δ| <= Σ_k |x_k| s_w/2 + |w_k| s_x/2 + s_x s_w / 4, per output
    w_s = weight_qparams(lin.weight)
    bound = (x.abs() @ torch.ones(64, 32)) * (w_s / 2) + (lin.weight.abs().sum(1) * qp.scale / 2) \
        + 64 * qp.scale * w_s / 4
    assert ((y - ref).abs() <= bound.detach() + 1e-5).all()
    assert F.cosine_similarity(y.flatten(), ref.flatten(), dim=0) > 0.999


def test_quant_conv_and_weight_only_and_dynamic_layers_track_float():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, padding=1, stride=2)
    x = torch.randn(2, 4, 10, 10)
    qp = act_qparams(x.min().item(), x.max().item(), "int8")
    qc = QuantConv2d(conv, qp)
    y = qc(ops.quantize(x, qp.scale, qp.zero_point, qp.qmin, qp.qmax))
    assert F.cosine_similarity(y.flatten(), conv(x).detach().flatten(), dim=0) > 0.999
    lin = nn.Linear(16, 8)
    x = torch.randn(3, 5, 16)
    for cls in (DynamicQuantLinear, WeightOnlyLinear):
        y = cls(lin.weight, lin.bias)(x)
        assert y.shape == (3, 5, 8)
        assert F.cosine_similarity(y.flatten(), lin(x).detach().flatten(), dim=0) > 0.999


def test_quant_conv_rejects_unquantizable_padding():
    conv = nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect")
    with pytest.raises(ValueError, match="padding"):
        QuantConv2d(conv, QParams(0.1, 0, "int8"))


def test_ops_survive_torch_export_as_single_nodes():
    torch.manual_seed(0)
    lin = nn.Linear(8, 4)
    qp = act_qparams(-1, 1, "uint8")

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = QuantLinear(lin.weight, lin.bias, qp)
            self.d = DynamicQuantLinear(lin.weight, lin.bias)

        def forward(self, x):
            return self.q(ops.quantize(x, qp.scale, qp.zero_point, qp.qmin, qp.qmax)) + self.d(x)

    ep = torch.export.export(M(), (torch.randn(2, 8),)).run_decompositions()
    names = [n.target.__name__ for n in ep.graph.nodes if n.op == "call_function"]
    assert names.count("quantize.default") == 1
    assert names.count("qlinear.default") == 1
    assert names.count("dynamic_qlinear.default") == 1


def test_qmatmul_matches_numpy_bit_for_bit_and_broadcasts():
    rng = np.random.default_rng(3)
    aq = rng.integers(0, 256, (2, 3, 5, 13)).astype(np.uint8)
    bq = rng.integers(-127, 128, (2, 3, 13, 7)).astype(np.int8)
    ref = ((aq.astype(np.int64) - 9) @ bq.astype(np.int64)).astype(np.float32) * np.float32(0.0123)
    got = ops.qmatmul(torch.from_numpy(aq), torch.from_numpy(bq), 9, float(np.float32(0.0123)))
    np.testing.assert_array_equal(got.numpy(), ref)
    got = ops.qmatmul(torch.from_numpy(aq), torch.from_numpy(bq[:1, :1]), 9, 1.0)
    assert got.shape == (2, 3, 5, 7)


def test_quant_matmul_needs_a_symmetric_int8_right_operand():
    from graphopt.quant.modules import QuantMatmul

    with pytest.raises(ValueError, match="symmetric int8"):
        QuantMatmul(QParams(0.1, 3, "uint8"), QParams(0.1, 3, "uint8"))
