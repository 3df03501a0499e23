"""prepare -> calibrate -> convert on FX graphs, layer subsets, aten graphs, and QAT."""
import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from graphopt.analysis.shapes import propagate_shapes
from graphopt.capture import capture
from graphopt.models import get_model
from graphopt.quant import (Converter, FakeQuantize, QATConv2d, QATLinear, QuantConv2d, QuantLinear, calibrate,
                            convert, prepare, prepare_qat)
from graphopt.quant.observers import Observer


def traced(model, x):
    return capture(model, (x,)).gm


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, stride=2)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        y = torch.relu(self.c1(x))
        y = torch.relu(self.c2(y)) + y[:, :, ::2, ::2]
        return self.fc(self.up(y).mean((2, 3)))


def quant_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.graphopt.quantize.default]


def test_prepare_shares_one_observer_per_tensor_in_attention():
    model, (ids,) = get_model("bert_tiny")
    gm = traced(model, ids)
    prepared, survey = prepare(gm)
    observers = [n for n in prepared.graph.nodes
                 if n.op == "call_module" and isinstance(prepared.get_submodule(n.target), Observer)]
    # per layer: q/k/v share their input; out, ffn_in, ffn_out have their own; plus pooler and classifier
    assert len(survey.sites) == 2 * 6 + 2
    assert len(observers) == 2 * 4 + 2
    qkv_obs = {prepared.get_submodule(f"layers.0.attention.{p}") for p in "qkv"}
    assert len(qkv_obs) == 3
    users = {str(u.target) for n in observers for u in n.users}
    assert {"layers.0.attention.q", "layers.0.attention.k", "layers.0.attention.v"} <= users
    # gm itself is untouched
    assert not any(isinstance(m, Observer) for m in gm.modules())


def test_calibrate_convert_conv_net_runs_integer_layers_and_stays_close():
    torch.manual_seed(0)
    model = ConvNet().eval()
    x = torch.randn(2, 3, 16, 16)
    gm = traced(model, x)
    prepared, survey = prepare(gm)
    assert ("up", "ConvTranspose2d has no int8 kernel") in survey.skipped
    calibrate(prepared, [(torch.randn(2, 3, 16, 16),) for _ in range(4)])
    q = convert(prepared)
    assert isinstance(q.get_submodule("c1"), QuantConv2d) and isinstance(q.get_submodule("fc"), QuantLinear)
    assert isinstance(q.get_submodule("up"), nn.ConvTranspose2d)
    assert len(quant_nodes(q)) == 3
    assert not any(isinstance(m, Observer) for m in q.modules())
    y, ref = q(x), model(x)
    assert F.cosine_similarity(y.flatten(), ref.detach().flatten(), dim=0) > 0.995
    q.graph.lint()


def test_converter_builds_any_subset_and_drops_unused_observers():
    torch.manual_seed(0)
    model = ConvNet().eval()
    x = torch.randn(2, 3, 16, 16)
    prepared, _ = prepare(traced(model, x))
    calibrate(prepared, [(x,)])
    conv = Converter(prepared)
    assert set(conv.layer_paths) == {"c1", "c2", "fc"}
    only = conv.build(["c2"])
    assert isinstance(only.get_submodule("c2"), QuantConv2d)
    assert isinstance(only.get_submodule("c1"), nn.Conv2d) and isinstance(only.get_submodule("fc"), nn.Linear)
    assert len(quant_nodes(only)) == 1
    none = conv.build([])
    assert torch.equal(none(x), model(x))
    with pytest.raises(KeyError, match="up"):
        conv.build(["up"])


def test_convert_before_calibration_is_an_error():
    prepared, _ = prepare(traced(ConvNet().eval(), torch.randn(1, 3, 8, 8)))
    with pytest.raises(RuntimeError, match="calibrate"):
        convert(prepared)


def test_aten_graph_from_torch_export_is_quantized_too():
    torch.manual_seed(0)
    model, (x,) = get_model("bert_tiny")
    gm = capture(model, (x,), method="export").gm
    propagate_shapes(gm, (x,))
    prepared, survey = prepare(gm)
    assert len(survey.sites) == 14                 # functional aten.linear calls became modules
    calibrate(prepared, [(x,)])
    q = convert(prepared)
    assert sum(isinstance(m, QuantLinear) for m in q.modules()) == 14
    assert F.cosine_similarity(q(x).flatten(), model(x).detach().flatten(), dim=0) > 0.99


def test_qat_trains_and_converts_to_the_same_integer_graph():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 3)).eval()
    xs = torch.randn(256, 6)
    target = torch.stack([xs[:, 0] * xs[:, 1], xs[:, 2].abs(), xs[:, 3] - xs[:, 4]], 1)
    gm = fx.symbolic_trace(model)
    qat = prepare_qat(gm, calibration=[(xs[:64],)])
    assert isinstance(qat.get_submodule("0"), QATLinear)
    assert sum(isinstance(m, FakeQuantize) for m in qat.modules()) == 2
    before = F.mse_loss(qat(xs), target).item()
    opt = torch.optim.Adam(qat.parameters(), lr=1e-2)
    qat.train()
    for _ in range(150):
        opt.zero_grad()
        loss = F.mse_loss(qat(xs), target)
        loss.backward()
        opt.step()
    qat.eval()
    after = F.mse_loss(qat(xs), target).item()
    assert after < 0.5 * before
    assert model[0].weight.grad is None                         # the float model was not trained
    q = convert(qat)
    assert isinstance(q.get_submodule("0"), QuantLinear) and len(quant_nodes(q)) == 2
    with torch.no_grad():
        yq, yf = q(xs), qat(xs)
    # same quantization grid; only the summation order of the float epilogue differs
    assert (yq - yf).abs().max() < 1e-3 * yf.abs().max() + 1e-5


def test_qat_conv_layers_get_weight_fake_quant():
    torch.manual_seed(0)
    model = ConvNet().eval()
    x = torch.randn(2, 3, 16, 16)
    qat = prepare_qat(traced(model, x), calibration=[(x,)])
    assert isinstance(qat.get_submodule("c1"), QATConv2d)
    y = qat(x)
    y.sum().backward()
    assert qat.get_submodule("c1").weight.grad is not None


def test_attention_matmuls_get_uint8_left_and_int8_right_operands():
    from graphopt.quant import QuantMatmul

    torch.manual_seed(0)
    model, (ids,) = get_model("bert_tiny")
    gm = traced(model, ids)
    prepared, survey = prepare(gm, kinds=("linear", "matmul"))
    mm = [s for s in survey.sites if s.kind == "matmul"]
    assert [s.path for s in mm] == ["layers.0.attention.matmul0", "layers.0.attention.matmul1",
                                    "layers.1.attention.matmul0", "layers.1.attention.matmul1"]
    for s in mm:
        a, b = (prepared.get_submodule(str(n.target)) for n in s.node.args)
        assert (a.dtype, b.dtype) == ("uint8", "int8")
    calibrate(prepared, [(torch.randint(0, 1000, ids.shape),) for _ in range(2)])
    q = convert(prepared)
    assert sum(isinstance(m, QuantMatmul) for m in q.modules()) == 4
    with torch.no_grad():
        assert F.cosine_similarity(q(ids).flatten(), model(ids).flatten(), dim=0) > 0.99
    # only some layers: the other matmuls keep reading float tensors
    half = Converter(prepared).build(["layers.0.attention.matmul1"])
    assert sum(isinstance(m, QuantMatmul) for m in half.modules()) == 1
    assert len(quant_nodes(half)) == 2
