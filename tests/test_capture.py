"""Capture: never mutates the model, shapes on every node, clear errors, torch.export fallback."""
import pytest
import torch
import torchvision
from torch import nn

from graphopt.capture import capture
from graphopt.errors import CaptureError


class ShapeBranch(nn.Module):
    """Branches on the input's rank: symbolic_trace cannot, torch.export specializes it."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(4, 4), RankBranch())

    def forward(self, x):
        return self.inner(x)


class RankBranch(nn.Module):
    def forward(self, x):
        if x.dim() == 2:
            return x * 2
        return x - 1


class ValueBranch(nn.Module):
    """Branches on a tensor's value: neither tracer can keep that."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(4, 4)

    def forward(self, x):
        y = self.head(x)
        if y.sum() > 0:
            return y * 2
        return y - 1


class Unexportable(nn.Module):
    """Python-level dependence on a tensor value that neither tracer can represent."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 4), Hopeless())

    def forward(self, x):
        return self.body(x)


class Hopeless(nn.Module):
    def forward(self, x):
        n = int(x.abs().sum().item() * 1000) % 7 + 1   # a Python int from data, used as a shape
        return x.repeat(1, n)[:, :4] + float(x.max())


def test_resnet_capture_has_shapes_on_every_node_and_keeps_the_model():
    model = torchvision.models.resnet18()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(1, 3, 64, 64)
    cap = capture(model, (x,))
    assert cap.method == "symbolic_trace"
    for node in cap.gm.graph.nodes:
        if node.op not in ("output",):
            assert "tensor_meta" in node.meta, node.name
    assert model.training, "capture must not switch the user's model to eval"
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not cap.gm.training


def test_data_dependent_control_flow_falls_back_to_export_and_says_so():
    x = torch.randn(2, 4)
    cap = capture(ShapeBranch(), (x,))
    assert cap.method == "torch.export"
    assert any("symbolic_trace failed in module 'inner.1'" in n for n in cap.notes), cap.notes


def test_untraceable_model_names_module_and_reason():
    with pytest.raises(CaptureError) as e:
        capture(Unexportable(), (torch.randn(2, 4),))
    msg = str(e.value)
    assert "Unexportable" in msg and "body.1" in msg and "torch.export failed" in msg


def test_symbolic_trace_only_reports_failure_path():
    with pytest.raises(CaptureError, match=r"module 'inner\.1'"):
        capture(ShapeBranch(), (torch.randn(2, 4),), method="symbolic_trace")


def test_value_dependent_branch_fails_both_ways_with_reasons():
    with pytest.raises(CaptureError) as e:
        capture(ValueBranch(), (torch.randn(2, 4),))
    msg = str(e.value)
    assert "ValueBranch" in msg and "control flow" in msg and "torch.export failed" in msg


def test_wrong_example_inputs_are_reported():
    with pytest.raises(CaptureError, match=r"fails on the example inputs \(tensor\(2, 5\):float32\)"):
        capture(nn.Linear(4, 4), (torch.randn(2, 5),))


def test_not_a_module():
    with pytest.raises(CaptureError, match="expected a torch.nn.Module"):
        capture(lambda x: x, (torch.randn(1),))


def test_multi_input_multi_output():
    class Two(nn.Module):
        def forward(self, a, b):
            return a + b, {"prod": a * b}

    cap = capture(Two(), (torch.randn(3), torch.randn(3)))
    out = cap.gm(torch.ones(3), torch.full((3,), 2.0))
    assert torch.equal(out[0], torch.full((3,), 3.0)) and torch.equal(out[1]["prod"], torch.full((3,), 2.0))
