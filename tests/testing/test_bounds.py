"""graphopt.testing.bounds: the static check for out-of-bounds accesses that are always evaluated, and an audit of
whole builds with it (softmax, fused attention, depthwise and dense convs, int8, int4 weight-only)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import graphopt
from graphopt.testing.bounds import eager_out_of_bounds

tvm = pytest.importorskip("tvm")
from tvm.script import tirx as T  # noqa: E402

TARGET = {"kind": "llvm", "mcpu": "haswell", "num-cores": 2}
F32 = "float32"


@T.prim_func
def _select_clamped(A: T.Buffer((5,), F32), B: T.Buffer((8,), F32)):
    for i in range(8):
        B[i] = T.Select(i < 5, A[T.min(i, 4)], T.float32(0))        # the simplifier drops the min: A[i]


@T.prim_func
def _select_likely(A: T.Buffer((5,), F32), B: T.Buffer((8,), F32)):
    for i in range(8):
        B[i] = T.Select(T.likely(i < 5), A[T.min(i, 4)], T.float32(0))


@T.prim_func
def _lazy_guards(A: T.Buffer((5,), F32), B: T.Buffer((8,), F32)):
    for i in range(8):
        B[i] = T.if_then_else(i < 5, A[i], T.float32(0))
        if i < 5:
            B[i] = A[i] + B[i]


@T.prim_func
def _vector_rows(A: T.Buffer((4, 8), F32), B: T.Buffer((2, 16), F32)):
    for r in range(2):
        B[r, T.Ramp(0, 1, 16)] = A[r * 2, T.Ramp(0, 1, 16)]           # a vload running on into the next row


@T.prim_func
def _vector_past(A: T.Buffer((4, 8), F32), B: T.Buffer((2, 16), F32)):
    for r in range(2):
        B[r, T.Ramp(0, 1, 16)] = A[r * 2 + 1, T.Ramp(0, 1, 16)]       # the last row's vector leaves A


def test_the_check_finds_a_selects_read_and_spares_lazy_ones():
    found = eager_out_of_bounds(_select_clamped, TARGET)
    assert [(a.kind, a.buffer, a.first, a.last) for a in found] == [("load", "A", 0, 7)], found
    assert eager_out_of_bounds(_select_likely, TARGET) == []
    assert eager_out_of_bounds(_lazy_guards, TARGET) == []
    assert eager_out_of_bounds(_vector_rows, TARGET) == []
    assert [(a.buffer, a.last) for a in eager_out_of_bounds(_vector_past, TARGET)] == [("A", 39)]


class _Blocks(nn.Module):
    """A softmax with a row tail, attention over 21 keys, a depthwise-separable pair and a transposed conv with
    an infinite weight (graphopt's exact kernel)."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(32, 96)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 16, 1)
        self.up = nn.ConvTranspose2d(16, 8, 3, stride=2, padding=1)
        with torch.no_grad():
            self.up.weight[1, 2, 0, 0] = float("inf")

    def forward(self, x, img):
        q, k, v = self.qkv(x).reshape(1, 21, 3, 2, 16).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) * 0.25, -1) @ v
        y = torch.relu(self.pw(torch.relu(self.dw(img))))
        return att, torch.softmax(x[:, :, :11], -1), self.up(y)


def _kernels(monkeypatch, model, inputs, target, pipeline="cleanup", **kw):
    import graphopt.backends.tvm.build as build

    seen = {}
    original = build._finalize

    def keep(mod, spec):
        seen["mod"] = mod
        return original(mod, spec)

    monkeypatch.setattr(build, "_finalize", keep)
    graphopt.optimize(model, target, pipeline, example_inputs=inputs, **kw)
    return [(gv.name_hint, f) for gv, f in seen["mod"].functions_items() if isinstance(f, tvm.tirx.PrimFunc)]


@pytest.mark.parametrize("target", ["x86:haswell", "x86:skylake-avx512"])
def test_no_kernel_of_these_builds_reads_out_of_bounds(monkeypatch, target):
    torch.manual_seed(0)
    model = _Blocks().eval()
    inputs = (torch.randn(1, 21, 32), torch.randn(1, 8, 14, 14))
    kernels = _kernels(monkeypatch, model, inputs, target)
    assert any("attention" in name for name, _ in kernels), [n for n, _ in kernels]
    bad = {name: [str(a) for a in eager_out_of_bounds(f, TARGET)] for name, f in kernels}
    assert not {k: v for k, v in bad.items() if v}


@pytest.mark.parametrize("pipeline", ["quantize", "quantize(mode=weight_only,bits=4)"])
def test_no_quantized_kernel_reads_out_of_bounds(monkeypatch, pipeline):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, groups=16),
                          nn.ReLU(), nn.Flatten(), nn.Linear(16 * 10 * 10, 40), nn.ReLU(), nn.Linear(40, 10)).eval()
    x = torch.randn(1, 3, 10, 10)
    kernels = _kernels(monkeypatch, model, (x,), "x86:haswell", "cleanup," + pipeline,
                       calibration=[(torch.randn(1, 3, 10, 10),) for _ in range(4)])
    bad = {name: [str(a) for a in eager_out_of_bounds(f, TARGET)] for name, f in kernels}
    assert not {k: v for k, v in bad.items() if v}


@T.prim_func
def _empty_tail(A: T.Buffer((1, 16), F32), B: T.Buffer((8,), F32)):
    for j in range(2, 2):                                            # a tail loop of no iterations
        B[T.Ramp(0, 1, 8)] = A[0, T.Ramp(j * 8, 1, 8)]


def test_an_empty_loop_reads_nothing():
    assert eager_out_of_bounds(_empty_tail, TARGET) == []


@pytest.mark.slow
@pytest.mark.parametrize("target", ["x86:haswell", "x86:skylake-avx512"])
@pytest.mark.parametrize("name, pipeline", [
    ("resnet18", "fold_bn,cleanup"), ("mobilenet_v2", "fold_bn,cleanup"), ("efficientnet_b0", "fold_bn,cleanup"),
    ("bert_tiny", "cleanup"), ("resnet18", "fold_bn,cleanup,quantize"), ("mobilenet_v2", "fold_bn,cleanup,quantize"),
    ("bert_tiny", "cleanup,quantize"), ("bert_tiny", "cleanup,quantize(mode=dynamic)"),
    ("mlp", "cleanup,quantize(mode=weight_only,bits=4)"), ("mlp", "cleanup,quantize(mode=dynamic,bits=4)"),
    ("mlp", "cleanup,sparsify(sparsity=0.9),quantize"), ("resnet18", "fold_bn,cleanup,sparsify(pattern=2:4),quantize"),
    ("mlp", "cleanup,cluster(k=16)")])
def test_no_kernel_of_the_bundled_models_reads_out_of_bounds(monkeypatch, name, pipeline, target):
    """Every kernel of graphopt.models' builds (float32, int8 static and dynamic, int4 weight-only, W4A8, sparse,
    N:M, clustered): no always-evaluated access leaves its buffer (indices read from memory, token ids and sparse
    index pointers, are checked elsewhere and not counted)."""
    from graphopt.models import get_model

    model, inputs = get_model(name, batch=1)
    kernels = _kernels(monkeypatch, model.eval(), inputs, target, pipeline, calibration=[inputs] * 2)
    bad = {n: [str(a) for a in eager_out_of_bounds(f, TARGET) if not a.data_dependent] for n, f in kernels}
    assert not {k: v for k, v in bad.items() if v}
