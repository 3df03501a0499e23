"""fold_bn: exact on real architectures with random BN statistics; every foldable BN gone; others named."""
import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import graphopt
from tests.helpers import randomize_bn

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _count_bn(module):
    return sum(isinstance(m, BN_TYPES) for m in module.modules())


def _fold(model, x, pipeline="fold_bn"):
    return graphopt.optimize(model, target="torch", pipeline=pipeline, example_inputs=(x,))


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "densenet121"])
def test_torchvision_models_fold_exactly(name):
    model = randomize_bn(getattr(torchvision.models, name)()).eval()
    x = torch.randn(2, 3, 64, 64)
    opt = _fold(model, x)
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x), rtol=1e-5, atol=1e-5)
    rec = opt.report.records[-1]
    assert rec.max_rel < 1e-5
    left = [n for n in rec.notes if n.startswith("left BN")]
    # every BN is either folded (a detail row) or left and named (a note); none silently kept
    assert len(rec.details) + len(left) == _count_bn(model)
    assert _count_bn(opt.graph_module) == len(left)
    if name == "densenet121":
        # DenseNet is pre-activation: norm1 follows a concat (cannot fold), norm2 follows conv1 (folds)
        assert len(rec.details) > 0 and len(left) > 0
    else:
        assert left == []


@pytest.mark.parametrize("layer, bn, x", [
    (nn.Conv1d(3, 6, 3), nn.BatchNorm1d(6), torch.randn(2, 3, 10)),
    (nn.Conv2d(4, 8, 3, groups=2, bias=False), nn.BatchNorm2d(8), torch.randn(2, 4, 9, 9)),
    (nn.Conv3d(2, 4, 3), nn.BatchNorm3d(4), torch.randn(1, 2, 5, 5, 5)),
    (nn.ConvTranspose2d(4, 6, 3, stride=2), nn.BatchNorm2d(6), torch.randn(2, 4, 5, 5)),
    (nn.ConvTranspose2d(4, 6, 3, groups=2, bias=False), nn.BatchNorm2d(6), torch.randn(2, 4, 5, 5)),
    (nn.ConvTranspose1d(3, 4, 2), nn.BatchNorm1d(4), torch.randn(2, 3, 7)),
    (nn.Linear(5, 7), nn.BatchNorm1d(7), torch.randn(4, 5)),
])
def test_each_layer_kind_folds_exactly(layer, bn, x):
    model = randomize_bn(nn.Sequential(layer, bn, nn.ReLU())).eval()
    opt = _fold(model, x)
    assert _count_bn(opt.graph_module) == 0
    torch.testing.assert_close(opt(x), model(x), rtol=1e-5, atol=1e-5)


class Unfoldable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn_shared = nn.BatchNorm2d(4)        # conv output also used by the residual below
        self.bn_after_relu = nn.BatchNorm2d(4)    # input is not a conv
        self.bn_batchstats = nn.BatchNorm2d(4, track_running_stats=False)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.lin = nn.Linear(4, 4)
        self.bn_seq = nn.BatchNorm1d(6)           # Linear output is 3-D: BN normalizes dim 1, not features

    def forward(self, x):
        y = self.conv(x)
        z = self.bn_shared(y) + y
        z = self.bn_after_relu(torch.relu(z))
        z = self.bn_batchstats(self.conv2(z))
        s = z.flatten(2).transpose(1, 2)[:, :6]   # (N, 6, 4)
        return self.bn_seq(self.lin(s))


def test_unfoldable_bns_are_left_and_named():
    model = randomize_bn(Unfoldable()).eval()
    x = torch.randn(2, 3, 6, 6)
    opt = _fold(model, x)
    notes = "\n".join(opt.report.records[-1].notes)
    assert "left BN 'bn_shared'" in notes and "also used elsewhere" in notes
    assert "left BN 'bn_after_relu'" in notes
    assert "left BN 'bn_batchstats'" in notes and "no running statistics" in notes
    assert "left BN 'bn_seq'" in notes and "normalizes dim 1" in notes
    assert _count_bn(opt.graph_module) == 4
    torch.testing.assert_close(opt(x), model(x), rtol=1e-5, atol=1e-5)


class SharedConv(nn.Module):
    """One conv module called twice, each call followed by a different BN."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn1, self.bn2 = nn.BatchNorm2d(3), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn2(self.conv(self.bn1(self.conv(x))))


def test_shared_module_is_not_modified_in_place():
    model = randomize_bn(SharedConv()).eval()
    x = torch.randn(1, 3, 8, 8)
    weight_before = model.conv.weight.clone()
    opt = _fold(model, x)
    assert _count_bn(opt.graph_module) == 0
    torch.testing.assert_close(opt(x), model(x), rtol=1e-5, atol=1e-5)
    assert torch.equal(model.conv.weight, weight_before)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 6), st.integers(1, 3), st.booleans(), st.booleans()),
                min_size=1, max_size=5), st.integers(0, 2**31 - 1))
def test_random_conv_bn_stacks_fold_exactly(layers, seed):
    torch.manual_seed(seed)
    mods, c = [], 3
    for out, k, bias, relu in layers:
        mods += [nn.Conv2d(c, out, k, padding=k // 2, bias=bias), nn.BatchNorm2d(out)]
        if relu:
            mods.append(nn.ReLU())
        c = out
    model = randomize_bn(nn.Sequential(*mods)).eval()
    x = torch.randn(2, 3, 7, 7)
    opt = _fold(model, x)
    assert _count_bn(opt.graph_module) == 0
    torch.testing.assert_close(opt(x), model(x), rtol=1e-5, atol=1e-5)
