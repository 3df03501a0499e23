"""In-place ops in traced models (graphopt.analysis.mutation): rewritten out of place at capture where that is
the same computation, kept where a view of the changed tensor is read later, and never dropped as dead code.

symbolic_trace records `y.relu_()` as a node nobody reads, while later layers read `y`. Before: cleanup (in the
default pipeline) dropped it as dead code and failed its exactness check (0.78 of max |reference|), and static
int8 quantized `y` before the ReLU (its observer and quantize op go right after `y`): cosine 0.73 with float32.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphopt
from graphopt.capture import capture


class Dangling(nn.Module):
    """A Linear's output changed in place by `how`, then read by the next Linear (and the residual)."""

    def __init__(self, how: str):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)
        self.act = nn.ReLU(inplace=True)
        self.how = how

    def forward(self, x):
        y = self.a(x)
        if self.how == "method":
            y.relu_()
        elif self.how == "function":
            F.relu(y, inplace=True)
        elif self.how == "torch_function":
            torch.relu_(y)
        elif self.how == "module":
            self.act(y)
        elif self.how == "chain":
            y.mul_(2.0).add_(1.0).clamp_(min=0.0)
        return self.b(y) + y


HOWS = ["method", "function", "torch_function", "module", "chain"]


@pytest.mark.parametrize("how", HOWS)
def test_inplace_ops_are_rewritten_out_of_place(how):
    model = Dangling(how).eval()
    x = torch.randn(4, 16)
    cap = capture(model, (x,))
    with torch.no_grad():
        assert torch.equal(cap.gm(x), model(x))
    assert any("rewritten out of place" in n for n in cap.notes)
    # the second Linear now reads the changed value, not the Linear's own output
    b = next(n for n in cap.gm.graph.nodes if n.op == "call_module" and n.target == "b")
    assert b.args[0].target != "a"


@pytest.mark.parametrize("how", HOWS)
def test_default_pipeline_and_int8_keep_the_inplace_op(how):
    model = Dangling(how).eval()
    x = torch.randn(32, 16)
    calib = [(torch.randn(32, 16),) for _ in range(4)]
    with torch.no_grad():
        ref = model(x)
    assert torch.allclose(graphopt.optimize(model, "torch", example_inputs=(x,))(x), ref)      # fold_bn,cleanup
    q = graphopt.optimize(model, "torch", "quantize(bits=8,progress=false)", example_inputs=(x,),
                          calibration=calib)
    assert F.cosine_similarity(q(x).flatten(), ref.flatten(), 0) > 0.999


class ViewReadLater(nn.Module):
    """The changed tensor's view, taken before the change, is read after it: not rewritable."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 16)

    def forward(self, x):
        y = self.a(x)
        v = y.view(4, 4, 4)
        y.relu_()
        return v.sum(-1) + 1.0


def test_inplace_ops_that_cannot_be_rewritten_are_kept_and_survive_cleanup():
    model = ViewReadLater().eval()
    x = torch.randn(4, 16)
    cap = capture(model, (x,))
    assert any("kept in-place" in n and "shares the memory" in n for n in cap.notes)
    opt = graphopt.optimize(model, "torch", "cleanup", example_inputs=(x,))
    assert "relu_" in opt.graph_module.code
    with torch.no_grad():
        assert torch.equal(opt(x), model(x))


def test_compiled_inplace_model_matches_eager():
    model = Dangling("chain").eval()
    x = torch.randn(4, 16)
    opt = graphopt.optimize(model, "x86", example_inputs=(x,))
    with torch.no_grad():
        assert torch.allclose(opt(x), model(x), rtol=1e-5, atol=1e-5)


class ScalesItsInput(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        x.mul_(2.0)                          # changes the caller's tensor in eager PyTorch
        return self.fc(x) + x


@pytest.mark.parametrize("target", ["torch", "x86"])
def test_a_model_that_changes_its_input_is_captured_on_copies(target):
    """Capture, the reference outputs and the pass checks run the model on copies of the example inputs (before,
    each run doubled them again and capture refused the model: "disagrees with the model"); the optimized module
    computes the eager result and leaves its argument as it was."""
    x = torch.randn(2, 8)
    x0 = x.clone()
    opt = graphopt.optimize(ScalesItsInput().eval(), target, example_inputs=(x,))
    assert torch.equal(x, x0)
    y = torch.randn(2, 8)
    y0 = y.clone()
    with torch.no_grad():
        want = ScalesItsInput().eval()(y.clone())
    got = opt(y)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(y, y0)


class KeptThenLinear(nn.Module):
    """An in-place ReLU that stays (a view taken before it is read after it), then a Linear reading its tensor."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        y = self.a(x)
        v = y.view(-1, 4, 4)
        y.relu_()
        return self.b(y) + v.sum(-1).repeat(1, 4)


@pytest.mark.parametrize("target", ["torch", "x86"])
def test_int8_observes_a_layer_input_after_a_kept_inplace_op(target):
    """quantize puts each observer (and so the quantize op) right before the first layer reading the tensor, not
    right after the tensor's producer: the kept relu_ has changed it by then (cosine 0.981 before, 0.99997 now)."""
    model = KeptThenLinear().eval()
    x = torch.randn(32, 16)
    calib = [(torch.randn(32, 16),) for _ in range(4)]
    opt = graphopt.optimize(model, target, "quantize(bits=8,progress=false)", example_inputs=(x,),
                            calibration=calib)
    assert any("kept in-place" in n for n in opt.report.records[0].notes)
    with torch.no_grad():
        ref = model(x.clone())
    assert F.cosine_similarity(opt(x.clone()).flatten(), ref.flatten(), 0) > 0.9995


def test_inplace_methods_without_an_out_of_place_twin_are_kept():
    """Tensor.resize_ is not Tensor.resize with the change made elsewhere (and fill_, copy_ have no twin): they
    stay in place, noted, and the graph computes what the model does."""

    class Resized(nn.Module):
        def forward(self, x):
            y = x * 2
            y.resize_(4, 2)
            z = torch.empty_like(y)
            z.copy_(y)
            return z + 1

    x = torch.randn(2, 4)
    cap = capture(Resized(), (x,))
    kept = [n for n in cap.notes if "no out-of-place form" in n]
    assert len(kept) == 2 and "resize_" in kept[0] and "copy_" in kept[1]
    opt = graphopt.optimize(Resized(), "torch", example_inputs=(x,))
    assert torch.equal(opt(x), Resized()(x.clone()))
