"""Bias correction of static int8 layers (graphopt.quant.bias_correction) and the quantize pass's use of it."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import graphopt
from graphopt.capture import capture
from graphopt.quant import Converter, QuantConv2d, QuantLinear, calibrate, prepare
from graphopt.quant import ops
from graphopt.quant.bias_correction import correct_biases


class Net(nn.Module):
    """Conv (optionally grouped, optionally without bias) -> ReLU -> conv -> global pooling -> Linear: the
    shape whose per-channel error shifts survive the pooling."""

    def __init__(self, c: int = 8, groups: int = 1, bias: bool = True, stride: int = 1, padding: int = 1,
                 seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.c1 = nn.Conv2d(3, c, 3, padding=padding, bias=bias)
        self.c2 = nn.Conv2d(c, c, 3, padding=padding, stride=stride, groups=groups, bias=bias)
        self.fc = nn.Linear(c, 5, bias=bias)

    def forward(self, x):
        y = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc(y.mean((2, 3)))


def _converter(model, batches, qmax=127):
    prepared, _ = prepare(capture(model, batches[0]).gm)
    calibrate(prepared, batches)
    return Converter(prepared, weight_qmax=qmax)


def _batches(n, seed=0, shape=(2, 3, 12, 12)):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=g) + 0.5,) for _ in range(n)]


def _mean_errors(conv, batches):
    """{layer: per-channel mean over `batches` of (its quantized module on its quantized float-graph input -
    the float layer), and the float output's RMS}."""
    float_g = conv.build([])
    out, handles = {}, []
    for path in conv.layer_paths:
        fmod, qmod = float_g.get_submodule(path), conv.module_for(path)

        def hook(m, args, y, path=path, qmod=qmod):
            qp = qmod.x_qparams
            yq = qmod(ops.quantize(args[0], qp.scale, qp.zero_point, qp.qmin, qp.qmax))
            dim = 1 if isinstance(m, nn.Conv2d) else y.dim() - 1
            red = [d for d in range(y.dim()) if d != dim]
            s = out.setdefault(path, [0.0, 0.0, 0])
            s[0] = s[0] + (yq.double() - y.double()).sum(red)
            s[1] = s[1] + (y.double() ** 2).sum(red)
            s[2] += y.numel() // y.shape[dim]
        handles.append(fmod.register_forward_hook(hook))
    with torch.no_grad():
        for b in batches:
            float_g(*b)
    for h in handles:
        h.remove()
    return {p: (s[0] / s[2], float((s[1] / s[2]).mean().sqrt())) for p, s in out.items()}


@settings(max_examples=20, deadline=None, derandomize=True)
@given(c=st.sampled_from([4, 8, 12]), groups=st.sampled_from([1, 2, 4]), bias=st.booleans(),
       stride=st.sampled_from([1, 2]), padding=st.sampled_from([0, 1]), qmax=st.sampled_from([64, 127]),
       seed=st.integers(0, 1000))
def test_corrected_layers_have_no_mean_error_on_the_calibration_data(c, groups, bias, stride, padding, qmax, seed):
    """After correction each layer's error, its quantized module against the float layer on the float graph's
    inputs, averages to zero per output channel over the calibration batches (float rounding left), and the
    integers, scales and input qparams are those of the uncorrected build."""
    model = Net(c, groups if c % groups == 0 else 1, bias, stride, padding, seed).eval()
    batches = _batches(4, seed)
    plain, conv = _converter(model, batches, qmax), _converter(model, batches, qmax)
    shifts = correct_biases(conv, conv.layer_paths, batches)
    assert set(shifts) == set(conv.layer_paths) == {"c1", "c2", "fc"}
    for path, (mean, rms) in _mean_errors(conv, batches).items():
        assert float(mean.abs().max()) <= 1e-5 * rms, path
        a, b = plain.module_for(path), conv.module_for(path)
        assert torch.equal(a.weight_q, b.weight_q) and torch.equal(a.w_scale, b.w_scale)
        assert a.x_qparams == b.x_qparams
        assert b.bias is not None and (a.bias is None) == (not bias)


def test_correction_removes_a_real_shift_and_reaches_the_built_graph():
    """The shifts it removes are not float noise (the uncorrected layers' mean errors are far from zero), the
    graph conv.build() makes carries the corrected biases, and a layer without bias gets one."""
    model = Net(8, bias=False).eval()
    batches = _batches(8)
    conv = _converter(model, batches)
    before = _mean_errors(conv, batches)
    shifts = correct_biases(conv, conv.layer_paths, batches)
    after = _mean_errors(conv, batches)
    for path in conv.layer_paths:
        assert float(before[path][0].abs().max()) > 1e3 * float(after[path][0].abs().max()), path
        assert shifts[path] > 0
    q = conv.build()
    for path in conv.layer_paths:
        mod = q.get_submodule(path)
        assert isinstance(mod, (QuantConv2d, QuantLinear))
        assert torch.allclose(mod.bias, -(before[path][0].float()), rtol=1e-4, atol=1e-7)


def _cnn(seed=0):
    """A small random CNN (ReLU, BatchNorm folded by the pipeline, global pooling) on 3 x 32 x 32 images."""
    torch.manual_seed(seed)
    blocks = []
    c_in = 3
    for c in (16, 32, 32):
        blocks += [nn.Conv2d(c_in, c, 3, padding=1, stride=2 if c_in != c else 1), nn.BatchNorm2d(c), nn.ReLU()]
        c_in = c
    blocks += [nn.Conv2d(c_in, c_in, 3, padding=1, groups=c_in), nn.BatchNorm2d(c_in), nn.ReLU(),
               nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, 10)]
    model = nn.Sequential(*blocks)
    with torch.no_grad():                       # BN statistics of a trained model, not the identity
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.mark.parametrize("target", ["x86", "x86:haswell"])
def test_quantize_pass_bias_correction_lowers_the_compiled_error(target):
    """End to end, compiled: on inputs it did not calibrate on, bias_correction=true (the default) gives a
    smaller output error than false on both x86 int8 paths (vnni: 8-bit weights; avx2: 7-bit, GPTQ), the
    report says so, and the compiled int8 kernels still match the quantized graph run in PyTorch."""
    model = _cnn()
    g = torch.Generator().manual_seed(1)
    calib = [(torch.rand(1, 3, 32, 32, generator=g),) for _ in range(16)]
    tests = [torch.rand(1, 3, 32, 32, generator=g) for _ in range(4)]
    errs = {}
    for bc in ("true", "false"):
        opt = graphopt.optimize(model, target, f"fold_bn,cleanup,quantize(bias_correction={bc})",
                                example_inputs=calib[0], calibration=calib)
        notes = [n for r in opt.report.records for n in r.notes]
        assert any("bias correction" in n for n in notes) == (bc == "true")
        with torch.no_grad():
            ref = [model(x) for x in tests]
            got = [opt(x) for x in tests]
            errs[bc] = sum(float((a - b).norm() / b.norm()) for a, b in zip(got, ref)) / len(tests)
    assert errs["true"] < 0.5 * errs["false"], errs


def test_mixed_precision_int8_static_choices_are_corrected():
    """bits=mixed's int8 static modules carry the corrected bias (bias_correction=true), the plain one with
    false."""
    from graphopt.analysis.shapes import propagate_shapes
    from graphopt.quant.mixed import MixedBuilder

    model = Net(8).eval()
    batches = _batches(4)
    gm = capture(model, batches[0]).gm
    propagate_shapes(gm, batches[0])
    on = MixedBuilder(gm, batches, target="x86", dtype="uint8", group_size=None)
    off = MixedBuilder(gm, batches, target="x86", dtype="uint8", group_size=None, bias_correction=False)
    for path in ("c1", "c2", "fc"):
        a, b = off.module(path, "int8_static"), on.module(path, "int8_static")
        assert torch.equal(a.bias, model.get_submodule(path).bias)
        assert not torch.equal(a.bias, b.bias) and torch.equal(a.weight_q, b.weight_q)


def test_bias_correction_option_parses():
    from graphopt.passes.quantize import Quantize
    from graphopt.pipeline import Pipeline

    (q,) = Pipeline.parse("quantize(bias_correction=false)").passes
    assert isinstance(q, Quantize) and q.bias_correction is False
    assert Quantize().bias_correction is True and "bias_correction" not in str(Pipeline([Quantize()]))


def test_a_layer_whose_calibration_outputs_overflow_keeps_its_bias():
    """A layer whose float outputs reach inf on the calibration data has no finite mean error: it keeps its bias
    (reported as NaN), the others are still corrected; nothing becomes NaN."""
    model = Net(8).eval()
    with torch.no_grad():
        model.c2.weight.mul_(100)
        model.fc.weight.fill_(3e38)                 # x @ W overflows to inf in float32
    batches = _batches(4)
    conv = _converter(model, batches)
    bias = model.fc.bias.detach().clone()
    shifts = correct_biases(conv, conv.layer_paths, batches)
    assert shifts["fc"] != shifts["fc"] and shifts["c1"] > 0 and shifts["c2"] > 0
    assert torch.equal(conv.module_for("fc").bias, bias)
    for path in ("c1", "c2"):
        assert torch.isfinite(conv.module_for(path).bias).all()


def test_sparsified_layers_are_corrected_against_their_masked_output():
    """A sparsify layer (weight x mask) is measured against what it computes, not against its dense weight:
    after correction its mean error is zero too, and its quantized module keeps the zero pattern."""
    from graphopt.passes._sparse import SparseConv2d
    from graphopt.quant.sparse import SparseQuantConv2d

    batches = _batches(4)
    gm = capture(Net(8).eval(), batches[0]).gm       # sparsify swaps the module behind a call_module node
    mask = torch.rand(gm.c2.weight.shape, generator=torch.Generator().manual_seed(3)) < 0.5
    gm.c2 = SparseConv2d.from_conv(gm.c2, mask)
    with torch.no_grad():
        gm.c2.weight.add_(0.5 * ~mask)             # nonzero weights under the mask: only the masked output counts
    prepared, _ = prepare(gm)
    calibrate(prepared, batches)
    conv = Converter(prepared)
    assert conv.layer_paths == ["c1", "c2", "fc"]
    correct_biases(conv, conv.layer_paths, batches)
    q = conv.module_for("c2")
    assert isinstance(q, SparseQuantConv2d) and not q.weight_q[~mask].any()
    for path, (mean, rms) in _mean_errors(conv, batches).items():
        assert float(mean.abs().max()) <= 1e-5 * rms, path
