"""GPTQ weight rounding (graphopt.quant.gptq) and the quantize pass's use of it (weight_rounding)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import graphopt
from graphopt.quant.gptq import HessianAccumulator, gptq_round, supports
from graphopt.quant.qparams import quantize_weight, weight_qparams


def _correlated_inputs(rows: int, k: int, seed: int) -> torch.Tensor:
    """Inputs with correlated features and offsets (what a layer after another layer sees)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)
    return torch.randn(rows, k, generator=g) @ mix + torch.rand(k, generator=g)


def _output_error(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> float:
    ref = x.double() @ w.double().T
    return float((ref - x.double() @ (q.double() * scale.double()[:, None]).T).norm() / ref.norm())


def test_uncorrelated_inputs_give_round_to_nearest():
    """With a diagonal H no column can compensate another: GPTQ is round-to-nearest, whatever the order."""
    torch.manual_seed(0)
    w = torch.randn(9, 20)
    scale = weight_qparams(w, 64)
    h = torch.diag(torch.rand(20) + 0.1).double()
    assert torch.equal(gptq_round(w, h, scale, 64), quantize_weight(w, scale, 64))


@settings(max_examples=25, deadline=None, derandomize=True)
@given(k=st.integers(8, 96), n=st.integers(1, 24), qmax=st.sampled_from([64, 127]), seed=st.integers(0, 10_000))
def test_gptq_rounds_on_the_grid(k, n, qmax, seed):
    """Integers on the nearest rounding's grid: |q| <= qmax, int8, the weight's shape; and never far worse than
    nearest rounding on the inputs it saw (GPTQ is greedy: a single layer can come out a little worse, 1 in
    300 random layers by up to 2.6% here, so the bound is loose; the typical gain is checked below)."""
    x = _correlated_inputs(4 * k + 64, k, seed)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed + 1)) * 0.1
    scale = weight_qparams(w, qmax)
    h = 2 * x.double().T @ x.double() / x.shape[0]
    q = gptq_round(w, h, scale, qmax)
    assert q.dtype == torch.int8 and q.shape == w.shape and int(q.abs().max()) <= qmax
    assert _output_error(x, w, q, scale) <= _output_error(x, w, quantize_weight(w, scale, qmax), scale) * 1.25


def test_gptq_lowers_the_layer_output_error_on_the_inputs_it_saw():
    """Over 40 fixed random layers with correlated inputs, GPTQ's output error is typically well below
    nearest rounding's (median ratio about 0.7 here; asserted < 0.85) and at worst about equal (< 1.1)."""
    ratios = []
    for i in range(40):
        k, n, qmax = 8 + (i * 37) % 89, 1 + (i * 11) % 24, (64, 127)[i % 2]
        x = _correlated_inputs(4 * k + 64, k, 100 + i)
        w = torch.randn(n, k, generator=torch.Generator().manual_seed(200 + i)) * 0.1
        scale = weight_qparams(w, qmax)
        h = 2 * x.double().T @ x.double() / x.shape[0]
        ratios.append(_output_error(x, w, gptq_round(w, h, scale, qmax), scale)
                      / _output_error(x, w, quantize_weight(w, scale, qmax), scale))
    ratios.sort()
    assert ratios[len(ratios) // 2] < 0.85 and ratios[-1] < 1.1, ratios


def _textbook_gptq(w: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    """GPTQ as its paper writes it (float64, one column at a time, no blocks): the upper Cholesky factor U of
    H⁻¹, q_j = round(w_j / s), w_{j+1:} -= (w_j - q_j s) / U_jj · U_{j, j+1:}; columns by descending H_jj."""
    w, h = w.double().clone(), h.double().clone()
    k = w.shape[1]
    order = torch.argsort(torch.diag(h), descending=True, stable=True)
    w, h = w[:, order], h[order][:, order]
    h += 0.01 * torch.mean(torch.diag(h)) * torch.eye(k, dtype=h.dtype)
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    s = scale.double()
    q = torch.zeros_like(w)
    for j in range(k):
        q[:, j] = torch.clamp(torch.round(w[:, j] / s), -qmax, qmax)
        e = (w[:, j] - q[:, j] * s) / u[j, j]
        w[:, j + 1:] -= e[:, None] * u[j, j + 1:][None, :]
    out = torch.empty_like(q)
    out[:, order] = q
    return out.to(torch.int8)


@pytest.mark.parametrize("k,n", [(40, 6), (300, 16)])       # 300: three blocks of 128 columns
def test_the_ldl_form_rounds_as_gptq_through_the_inverse(k, n):
    """gptq_round's LDL form (no inverse) against the paper's update through chol(H⁻¹) in float64: the same
    integers but for the few that float32 rounding tips the other way (and what follows from them), at the
    same output error."""
    x = _correlated_inputs(4 * k, k, 7)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(8)) * 0.1
    scale = weight_qparams(w, 64)
    h = 2 * x.double().T @ x.double() / x.shape[0]
    q, ref = gptq_round(w, h, scale, 64), _textbook_gptq(w, h, scale, 64)
    assert float((q != ref).float().mean()) < 0.01
    assert _output_error(x, w, q, scale) == pytest.approx(_output_error(x, w, ref, scale), rel=0.01)


def test_calibration_collects_the_layer_statistics_in_its_first_pass_only():
    """The quantize pass takes GPTQ's input statistics from the calibration's forward passes: histogram
    observers run the batches twice, the statistics see them once, and equal those of the float model."""
    from graphopt.quant import graph as qgraph
    from graphopt.quant.gptq import accumulators, collecting, input_hessians

    model, calib = _cnn(), _calibration(3)
    gm = torch.fx.symbolic_trace(model)
    prepared, survey = qgraph.prepare(gm, observer="percentile")
    accs = accumulators({s.path: prepared.get_submodule(s.path) for s in survey.sites}, len(calib))
    assert sorted(accs) == ["0", "10", "2", "6"]                     # not the depthwise conv
    assert qgraph.calibrate(prepared, calib, first_pass=collecting(accs)) == 2
    ref = input_hessians(model, {p: model.get_submodule(p) for p in accs}, calib)
    for path, a in accs.items():
        assert a.rows == ref[model.get_submodule(path)].rows == 6 * (144 if path != "10" else 1)
        assert torch.allclose(a.hessian(), ref[model.get_submodule(path)].hessian(), rtol=1e-5, atol=1e-6)
    n = accs["0"].rows
    with torch.no_grad():
        prepared(*calib[0])                                          # hooks are gone after calibration
    assert accs["0"].rows == n


def test_inputs_that_are_always_zero_get_zero_weights():
    torch.manual_seed(0)
    x = _correlated_inputs(256, 12, 3)
    x[:, [2, 7]] = 0
    w = torch.randn(5, 12)
    h = 2 * x.double().T @ x.double() / x.shape[0]
    q = gptq_round(w, h, weight_qparams(w, 64), 64)
    assert not q[:, [2, 7]].any()


@pytest.mark.parametrize("padding,mode", [((1, 1), "zeros"), ("same", "zeros"), ((1, 0), "reflect")])
def test_conv_input_rows_are_the_im2col_patches_of_the_weight_layout(padding, mode):
    """A Conv2d's input rows (graphopt.analysis.layer_inputs.weight_rows) times its flattened weight are the
    convolution (padding, padding mode, stride, dilation included), so GPTQ compensates in the weight's own
    input order; the accumulator's H is 2 XᵀX / rows."""
    from graphopt.analysis.layer_inputs import weight_rows

    torch.manual_seed(0)
    stride = (1, 1) if padding == "same" else (2, 1)
    conv = nn.Conv2d(3, 4, (3, 2), stride=stride, padding=padding, dilation=(1, 2), bias=False, padding_mode=mode)
    x = torch.randn(2, 3, 9, 8)
    rows = weight_rows(conv, x)
    with torch.no_grad():
        y = conv(x).permute(0, 2, 3, 1).reshape(-1, 4)
        assert torch.allclose(rows @ conv.weight.reshape(4, -1).T, y, atol=1e-5)
    acc = HessianAccumulator(conv, calls=1, max_rows=10 ** 6)
    acc.add(rows)
    assert acc.rows == y.shape[0]
    assert torch.allclose(acc.hessian(), 2 * rows.T @ rows / acc.rows, rtol=1e-5, atol=1e-5)


def test_accumulator_samples_at_most_max_rows_evenly_over_calls():
    lin = nn.Linear(6, 2)
    acc = HessianAccumulator(lin, calls=4, max_rows=100)
    for i in range(4):
        acc.add(torch.randn(150, 6))
    assert acc.rows == 4 * 25


def test_supports_dense_layers_only():
    from graphopt.passes._sparse import SparseLinear

    assert supports(nn.Linear(4, 4)) and supports(nn.Conv2d(3, 4, 3))
    assert not supports(nn.Conv2d(4, 4, 3, groups=4))
    assert not supports(SparseLinear.__new__(SparseLinear))


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 24, 1), nn.ReLU(),
                         nn.Conv2d(24, 24, 3, padding=1, groups=24), nn.ReLU(), nn.Conv2d(24, 32, 1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()


def _calibration(n: int = 6) -> list:
    g = torch.Generator().manual_seed(1)
    return [(torch.rand(2, 3, 12, 12, generator=g) * 2 - 0.5,) for _ in range(n)]


def test_quantize_rounds_7bit_weights_by_gptq_by_default():
    """reduce_range (the AVX2 / AVX-512BW grid): 'auto' takes GPTQ for the dense layers with enough input
    rows (the 3x3 and 1x1 convs here, not the depthwise conv nor the classifier, seen in 12 rows < 32),
    on the same grid as nearest rounding, each with a smaller output error on the calibration inputs than
    nearest rounding; 'nearest' turns it off; with 8-bit weights 'auto' rounds to nearest."""
    model, calib = _cnn(), _calibration()
    example = calib[0]
    builds = {}
    for rounding in ("auto", "nearest"):
        builds[rounding] = graphopt.optimize(
            model, "torch", f"quantize(reduce_range=true,weight_rounding={rounding},progress=false)",
            example_inputs=example, calibration=calib)
    notes = " ".join(builds["auto"].report.records[-1].notes)
    assert "weights of 3 of 5 layer(s) rounded by GPTQ" in notes
    assert "GPTQ" not in " ".join(builds["nearest"].report.records[-1].notes)
    auto, near = (builds[r].graph_module for r in ("auto", "nearest"))
    for path in ("0", "2", "6"):
        a, b = auto.get_submodule(path), near.get_submodule(path)
        assert torch.equal(a.w_scale, b.w_scale) and int(a.weight_q.abs().max()) <= 64
        assert not torch.equal(a.weight_q, b.weight_q)
    for path in ("4", "10"):                       # depthwise; classifier (12 rows < MIN_ROWS): nearest
        assert torch.equal(auto.get_submodule(path).weight_q, near.get_submodule(path).weight_q)
    x = torch.cat([b[0] for b in calib])
    for path in ("0", "2", "6"):                   # each layer's output error on the calibration inputs
        i = int(path)
        with torch.no_grad():
            inp = model[:i](x)
            ref = model[i](inp)
            errs = [float((F.conv2d(inp, m.get_submodule(path).dequantized_weight(), model[i].bias,
                                    padding=model[i].padding) - ref).norm() / ref.norm()) for m in (auto, near)]
        assert errs[0] < errs[1], (path, errs)
    full = graphopt.optimize(model, "torch", "quantize(reduce_range=false,progress=false)", example_inputs=example,
                             calibration=calib)
    assert "GPTQ" not in " ".join(full.report.records[-1].notes)


def test_gptq_weights_compile_to_kernels_equal_to_their_reference():
    """The compiled AVX2 int8 kernels run GPTQ's integers like any others: outputs equal the quantized graph
    run in PyTorch (the reference of every int8 path)."""
    pytest.importorskip("tvm")
    from tests.helpers import instructions_missing_here

    if instructions_missing_here("x86:haswell"):
        pytest.skip("needs an x86 CPU with AVX2")
    model, calib = _cnn(), _calibration()
    opt = graphopt.optimize(model, "x86:haswell", "quantize(progress=false)", example_inputs=calib[0],
                            calibration=calib)
    assert "rounded by GPTQ" in " ".join(opt.report.records[-1].notes)
    x = _calibration(1)[0][0]
    with torch.no_grad():
        assert torch.allclose(opt(x), opt.graph_module(x), rtol=0, atol=1e-5)


def test_weight_rounding_is_checked():
    from graphopt.errors import PipelineError
    from graphopt.passes.quantize import Quantize

    with pytest.raises(ValueError, match="weight_rounding"):
        Quantize(weight_rounding="best")
    with pytest.raises(PipelineError, match="weight_rounding"):
        graphopt.optimize(_cnn(), "torch", "quantize(weight_rounding=best)", example_inputs=_calibration(1)[0],
                          calibration=_calibration(1))


@pytest.mark.parametrize("bits,group", [(4, 8), (4, 16), (4, None), (8, 8)])
def test_grouped_weights_keep_quantize_groups_grid(bits, group):
    """Weight-only grids (int4 asymmetric / int8 symmetric, groups of inputs): GPTQ keeps quantize_groups'
    scales and zero points, stays in its integer range, equals it where H is diagonal, and lowers the layer's
    output error on the inputs it saw."""
    from graphopt.quant.gptq import gptq_round_groups
    from graphopt.quant.weight_only import BITS, dequantize_groups, quantize_groups

    w = torch.randn(12, 40, generator=torch.Generator().manual_seed(2)) * 0.1
    x = _correlated_inputs(400, 40, 5)
    h = 2 * x.double().T @ x.double() / x.shape[0]
    q0, s0, z0 = quantize_groups(w, bits, group)
    q, s, z = gptq_round_groups(w, h, bits, group)
    assert torch.equal(s, s0) and torch.equal(z, z0) and q.dtype == q0.dtype and q.shape == q0.shape
    lo, hi = BITS[bits]
    assert lo <= int(q.min()) and int(q.max()) <= hi
    diag = torch.diag(torch.diag(h))
    assert torch.equal(gptq_round_groups(w, diag, bits, group)[0], q0)

    def err(qq):
        return float((x @ w.T - x @ dequantize_groups(qq, s, z, group).T).norm())
    assert err(q) < err(q0)


def _pointwise_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 48, 1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(48 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, 8)).eval()


@pytest.mark.parametrize("mode", ["weight_only", "dynamic"])
def test_int4_layers_round_by_gptq_when_calibration_is_given(mode):
    """int4 weight-only and W4A8 (mode=dynamic, bits=4): with calibration data 'auto' rounds the packed
    layers by GPTQ (the pointwise conv found through its copied weight), on the nearest rounding's grid, each
    with a smaller output error on the calibration inputs; without calibration, or with 'nearest', nearest
    rounding as before."""
    model = _pointwise_net()
    g = torch.Generator().manual_seed(3)
    calib = [(torch.rand(12, 3, 6, 6, generator=g),) for _ in range(3)]
    text = f"quantize(mode={mode},bits=4,group_size=16,pointwise_convs=true,progress=false"
    gptq = graphopt.optimize(model, "torch", text + ")", example_inputs=calib[0], calibration=calib)
    near = graphopt.optimize(model, "torch", text + ",weight_rounding=nearest)", example_inputs=calib[0],
                             calibration=calib)
    plain = graphopt.optimize(model, "torch", text + ")", example_inputs=calib[0])
    assert "weights of 3 of 3 layer(s) rounded by GPTQ" in " ".join(gptq.report.records[-1].notes)
    for o in (near, plain):
        assert "GPTQ" not in " ".join(o.report.records[-1].notes)
    x = torch.cat([b[0] for b in calib])
    inputs = {"2": model[:2](x), "5": model[:5](x)}
    for path, inp in inputs.items():
        a, b, c = (o.graph_module.get_submodule(path) for o in (gptq, near, plain))
        a, b, c = (getattr(m, "linear", m) for m in (a, b, c))
        assert torch.equal(a.scales, b.scales) and torch.equal(a.zeros, b.zeros)
        assert torch.equal(b.weight_q, c.weight_q) and not torch.equal(a.weight_q, b.weight_q)
        ref = model[int(path)]
        with torch.no_grad():
            rows = inp if path == "5" else inp.permute(0, 2, 3, 1).reshape(-1, 32)
            w = ref.weight.reshape(ref.weight.shape[0], -1)
            errs = [float((rows @ m.dequantized_weight().T - rows @ w.T).norm()) for m in (a, b)]
        assert errs[0] < errs[1], (path, errs)


def test_mixed_precision_choices_round_as_the_uniform_pass_does():
    """bits=mixed builds its int8 static choices (7-bit grid) and int4 choices with GPTQ under 'auto', as
    the uniform modes do, and with nearest rounding under 'nearest'; the grids are the same either way."""
    from graphopt.quant.mixed import MixedBuilder

    model = _pointwise_net()
    g = torch.Generator().manual_seed(3)
    batches = [(torch.rand(12, 3, 6, 6, generator=g),) for _ in range(3)]
    gm = torch.fx.symbolic_trace(model)
    kw = dict(target="torch", dtype="uint8", kinds=("linear", "conv2d"), weight_qmax=64, group_size=16)
    auto = MixedBuilder(gm, batches, weight_rounding="auto", **kw)
    near = MixedBuilder(gm, batches, weight_rounding="nearest", **kw)
    for path in ("0", "2", "5"):
        a, b = auto.module(path, "int8_static"), near.module(path, "int8_static")
        assert torch.equal(a.w_scale, b.w_scale) and not torch.equal(a.weight_q, b.weight_q)
    for choice in ("int4_weight_only", "int4_dynamic"):
        assert choice in auto.choices["5"]
        a, b = auto.module("5", choice), near.module("5", choice)
        assert torch.equal(a.scales, b.scales) and not torch.equal(a.weight_q, b.weight_q)
