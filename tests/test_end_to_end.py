"""Issue #2's user flow, end to end on real architectures: optimize for x86, match eager, save, load."""
import time

import pytest
import torch
import torchvision

import graphopt
from tests.helpers import randomize_bn


def _flow(model, inputs, tmp_path, pipeline="fold_bn,cleanup", opt=None):
    """`opt`: the build of `model` for x86 with `pipeline`, when a session fixture already has it."""
    if opt is None:
        opt = graphopt.optimize(model, target="x86", pipeline=pipeline, example_inputs=inputs)
    with torch.no_grad():
        expected = model(*inputs)
    torch.testing.assert_close(opt(*inputs), expected, rtol=1e-4, atol=1e-4)
    text = str(opt.report)
    for column in ("params", "FLOPs", "max|Δ|", "seconds"):
        assert column in text
    assert [r.name for r in opt.report.records] == ["(original)"] + pipeline.split(",")
    path = opt.save(str(tmp_path / "model.gopt"))
    start = time.perf_counter()
    again = graphopt.load(path)
    load_s = time.perf_counter() - start
    assert torch.equal(again(*inputs), opt(*inputs))
    assert again.report.records == opt.report.records and again.report.pipeline == opt.report.pipeline
    return opt, load_s


# MobileNetV2 (~14 s of building here) runs under -m slow: its layers (depthwise/strided convs, ReLU6, inverted
# residuals) are each checked vs eager in tests/backends/test_schedules.py's op families, and the user flow (build,
# match, report, save, load) by ResNet-18 here.
@pytest.mark.parametrize("name", ["resnet18", pytest.param("mobilenet_v2", marks=pytest.mark.slow)])
def test_torchvision_cnn(name, tmp_path, request):
    if name == "resnet18":                  # the session's build (tests/conftest.py): the default pipeline, x86
        model, x, built = request.getfixturevalue("resnet18_x86")
    else:
        model, built = randomize_bn(getattr(torchvision.models, name)()).eval(), None
        x = torch.randn(1, 3, 64, 64)
    opt, _ = _flow(model, (x,), tmp_path, opt=built)
    bn = (torch.nn.BatchNorm2d,)
    assert not any(isinstance(m, bn) for m in opt.graph_module.modules())


def test_transformer_encoder(tmp_path, bert_tiny_x86):
    model, inputs, built = bert_tiny_x86          # the session's build (tests/conftest.py): default pipeline, x86
    opt, _ = _flow(model, inputs, tmp_path, opt=built)
    assert opt.report.backend["capture"] == "symbolic_trace"


def test_torch_nn_transformer_encoder_via_export(tmp_path, transformer_encoder_x86):
    """nn.TransformerEncoder is not symbolically traceable (fast-path checks): captured by torch.export."""
    model, x, built, _ = transformer_encoder_x86    # the session's build (tests/conftest.py): default pipeline, x86
    opt, _ = _flow(model, (x,), tmp_path, opt=built)
    assert opt.report.backend["capture"] == "torch.export"
