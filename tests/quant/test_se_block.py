"""quantize keeps squeeze-and-excitation layers float32 by default (graphopt.quant.se_block): found by
structure in conv SE blocks (timm / torchvision style, symbolic_trace and torch.export graphs) and Linear SE
blocks, not in classifier heads or gated MLPs. PyTorch only (target "torch"): cheap."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphopt
from graphopt.capture import capture
from graphopt.quant import graph as qgraph
from graphopt.quant.modules import QuantConv2d, QuantLinear
from graphopt.quant.se_block import squeeze_excitation_layers


class ConvSE(nn.Module):
    """MobileNetV3's block: pointwise, hard-swish, depthwise, SE (mean -> 1x1 conv -> ReLU -> 1x1 conv ->
    hard-sigmoid -> x * gate), pointwise; then a head (pool -> 1x1 conv -> flatten -> Linear)."""

    def __init__(self):
        super().__init__()
        self.pw = nn.Conv2d(8, 32, 1)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.se_reduce = nn.Conv2d(32, 8, 1)
        self.se_expand = nn.Conv2d(8, 32, 1)
        self.pwl = nn.Conv2d(32, 16, 1)
        self.head = nn.Conv2d(16, 24, 1)
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        h = self.dw(F.hardswish(self.pw(x)))
        s = self.se_expand(torch.relu(self.se_reduce(h.mean((2, 3), keepdim=True))))
        h = self.pwl(h * F.hardsigmoid(s))
        return self.fc(torch.flatten(F.hardswish(self.head(F.adaptive_avg_pool2d(h, 1))), 1))


class LinearSE(nn.Module):
    """SE written with Linear layers on the pooled vector, reshaped to gate the map; then a gated MLP
    (equal-size product: not an SE gate)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.fc1 = nn.Linear(16, 4)
        self.fc2 = nn.Linear(4, 16)
        self.gate = nn.Linear(16, 32)
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 5)

    def forward(self, x):
        h = self.conv(x)
        w = torch.sigmoid(self.fc2(torch.relu(self.fc1(h.mean((2, 3))))))
        h = (h * w.view(-1, 16, 1, 1)).mean((2, 3))
        return self.down(F.silu(self.gate(h)) * self.up(h))


def _se(model, x, method="symbolic_trace"):
    gm = capture(model.eval(), (x,), method=method).gm
    prepared, survey = qgraph.prepare(gm, kinds=["linear", "conv2d", "matmul"])
    return sorted(squeeze_excitation_layers(prepared, survey.sites)), [s.path for s in survey.sites]


def test_conv_se_layers_are_found_and_nothing_else():
    torch.manual_seed(0)
    se, sites = _se(ConvSE(), torch.randn(2, 8, 9, 9))
    assert se == ["se_expand", "se_reduce"]
    assert {"pw", "dw", "pwl", "head", "fc"} <= set(sites)          # the 1x1-map head conv is no SE


def test_found_in_an_exported_graph_too():
    torch.manual_seed(0)
    se, _ = _se(ConvSE(), torch.randn(2, 8, 9, 9), method="export")
    assert len(se) == 2 and all("se_" in p for p in se), se


def test_linear_se_found_gated_mlp_not():
    torch.manual_seed(0)
    se, _ = _se(LinearSE(), torch.randn(2, 3, 6, 6))
    assert se == ["fc1", "fc2"]


def test_torchvision_squeeze_excitation_blocks():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.mobilenet_v3_small(weights=None)
    n_se = sum(isinstance(m, tv.ops.SqueezeExcitation) for m in model.modules())
    se, _ = _se(model, torch.randn(1, 3, 64, 64))
    assert n_se > 0 and len(se) == 2 * n_se and all(".fc1" in p or ".fc2" in p for p in se), se


def _quantize(model, x, options=""):
    calib = [torch.randn(x.shape, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    return graphopt.optimize(model.eval(), "torch", f"quantize(progress=false{options})", example_inputs=(x,),
                             calibration=calib)


def test_pass_keeps_them_float_by_default_and_quantizes_them_on_request():
    torch.manual_seed(0)
    model, x = ConvSE(), torch.randn(2, 8, 9, 9)
    opt = _quantize(model, x)
    gm = opt.graph_module
    assert type(gm.get_submodule("se_reduce")) is nn.Conv2d and type(gm.get_submodule("se_expand")) is nn.Conv2d
    assert isinstance(gm.get_submodule("dw"), QuantConv2d) and isinstance(gm.get_submodule("fc"), QuantLinear)
    rec = opt.report.records[-1]
    assert {d["layer"] for d in rec.details} == {"pw", "dw", "pwl", "head", "fc"}
    assert any("2 squeeze-and-excitation layer(s) in float32" in n for n in rec.notes), rec.notes
    both = _quantize(model, x, ",se_blocks=int8")
    assert isinstance(both.graph_module.get_submodule("se_reduce"), QuantConv2d)
    assert len(both.report.records[-1].details) == 7
    with torch.no_grad():
        ref = model(x)
        for o in (opt, both):
            assert F.cosine_similarity(o(x).flatten(), ref.flatten(), dim=0) > 0.99


def test_tolerance_chooses_among_the_non_se_layers():
    torch.manual_seed(0)
    opt = _quantize(ConvSE(), torch.randn(2, 8, 9, 9), ",tolerance=1e-9")      # unreachable: all kept float
    rec = opt.report.records[-1]
    assert any("kept 5 of 5 layer(s)" in n for n in rec.notes), rec.notes


def test_bad_se_blocks_value_is_an_error():
    from graphopt.passes.quantize import Quantize

    with pytest.raises(ValueError, match="se_blocks"):
        Quantize(se_blocks="fp16")
