"""Capture: never mutates the model, shapes on every node, clear errors, torch.export fallback."""
import pytest
import torch
import torch.nn.functional as F
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


class KeywordCalls(nn.Module):
    """Layers called with keyword arguments, one of them also with a keyword that must stay one."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(16, 16)
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x):
        y = self.conv(input=x.reshape(2, 2, 4, 2)).reshape(2, 16)
        h = self.lin(input=y).unsqueeze(0)
        return self.attn(h, h, value=h, need_weights=False)[0]


def test_keyword_calls_of_layers_are_captured_positionally():
    """`self.fc(input=x)` is the same call as `self.fc(x)`; the passes read a layer's input as its first
    argument (quantize used to keep such layers float: "called with extra arguments")."""
    import graphopt
    from graphopt.quant import QuantConv2d, QuantLinear

    model = KeywordCalls().eval()
    x = torch.randn(2, 2, 2, 4)
    cap = capture(model, (x,))
    calls = {n.target: n for n in cap.gm.graph.nodes if n.op == "call_module"}
    assert len(calls["lin"].args) == 1 and not calls["lin"].kwargs
    assert len(calls["conv"].args) == 1 and not calls["conv"].kwargs
    assert len(calls["attn"].args) == 3 and calls["attn"].kwargs == {"need_weights": False}
    with torch.no_grad():
        assert torch.equal(cap.gm(x), model(x))
    opt = graphopt.optimize(model, "torch", "quantize(bits=8,progress=false)", example_inputs=(x,),
                            calibration=[(torch.randn(2, 2, 2, 4),) for _ in range(4)])
    kinds = [type(m) for m in opt.graph_module.modules()]
    assert QuantLinear in kinds and QuantConv2d in kinds


class FunctionalKeywords(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.w, self.b = nn.Parameter(torch.randn(8, 16) / 4), nn.Parameter(torch.randn(8))
        self.cw = nn.Parameter(torch.randn(4, 3, 3, 3) / 5)

    def forward(self, x, img):
        c = F.conv2d(img, weight=self.cw, padding=1).mean((2, 3))
        return F.linear(input=x, weight=self.w, bias=self.b) + c.sum(-1, keepdim=True)


def test_functional_layers_with_keyword_weights_are_counted_and_quantized():
    """F.linear(input=x, weight=w) and F.conv2d(img, weight=w): positional after capture (the FLOP count read
    node.args[1] and failed with IndexError on every pipeline)."""
    import graphopt
    from graphopt.analysis.flops import count_flops
    from graphopt.quant import QuantConv2d, QuantLinear

    model = FunctionalKeywords().eval()
    x, img = torch.randn(2, 16), torch.randn(2, 3, 5, 5)
    cap = capture(model, (x, img))
    assert count_flops(cap.gm) == 2 * 2 * 8 * 16 + 2 * (2 * 4 * 5 * 5) * 3 * 9
    opt = graphopt.optimize(model, "torch", "quantize(bits=8,progress=false)", example_inputs=(x, img),
                            calibration=[(torch.randn(2, 16), torch.randn(2, 3, 5, 5)) for _ in range(4)])
    kinds = [type(m) for m in opt.graph_module.modules()]
    assert QuantLinear in kinds and QuantConv2d in kinds
