"""quantize on matmuls against a constant weight written without nn.Linear (graphopt.quant.const_matmul):
transformers' Conv1D (addmm with an (in, out) weight, GPT-2), x @ W [+ b], F.linear(x, W.t()).

Cheap: the pattern tests run in PyTorch; one tiny GPT-2 (2 layers, 32 wide) is compiled for the host, one
small module for the AVX2 path (x86:haswell)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

import graphopt
from graphopt.capture import capture
from graphopt.quant.const_matmul import linearize
from graphopt.quant.modules import QuantLinear


class Projections(nn.Module):
    """Every spelling of a layer with a constant weight stored (in, out) that const_matmul recognises."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = nn.Parameter(torch.randn(12, 20, generator=g) / 4)       # (in, out)
        self.b1 = nn.Parameter(torch.randn(20, generator=g))
        self.w2 = nn.Parameter(torch.randn(20, 16, generator=g) / 4)       # stored (in, out), used transposed
        self.b2 = nn.Parameter(torch.randn(16, generator=g))
        self.w3 = nn.Parameter(torch.randn(16, 24, generator=g) / 4)
        self.b3 = nn.Parameter(torch.randn(24, generator=g))
        self.w4 = nn.Parameter(torch.randn(24, 8, generator=g) / 4)

    def forward(self, x):                                                   # x: (batch, seq, 12)
        h = torch.relu(x @ self.w1 + self.b1)                               # matmul + bias add
        h = F.gelu(F.linear(h, self.w2.t(), self.b2))                       # linear of a transposed constant
        shape = h.shape[:-1] + (24,)
        h = torch.addmm(self.b3, h.reshape(-1, 16), self.w3).view(shape)    # transformers' Conv1D
        return torch.matmul(h, self.w4)                                     # matmul, no bias


N_LAYERS = 4


def _inputs(seed, n=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 5, 12, generator=g) for _ in range(n)]


@pytest.mark.parametrize("method", ["symbolic_trace", "export"])
def test_each_spelling_becomes_a_linear_with_the_weight_transposed(method):
    model = Projections().eval()
    (x,) = _inputs(0)
    gm = capture(model, (x,), method=method).gm
    assert linearize(gm) == N_LAYERS
    lins = [m for m in gm.modules() if isinstance(m, nn.Linear)]
    assert len(lins) == N_LAYERS
    weights = {tuple(m.weight.shape): m for m in lins}
    # (out, in): the constant's dim 1 is now the output channel, the value its transpose
    assert torch.equal(weights[(20, 12)].weight, model.w1.detach().t())
    assert torch.equal(weights[(20, 12)].bias, model.b1.detach())
    assert torch.equal(weights[(16, 20)].weight, model.w2.detach().t())
    assert torch.equal(weights[(24, 16)].bias, model.b3.detach())
    assert weights[(8, 24)].bias is None
    left = {n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")}
    assert not left & {torch.addmm, torch.matmul, F.linear, torch.ops.aten.addmm.default,
                       torch.ops.aten.matmul.default, torch.ops.aten.linear.default, torch.ops.aten.t.default}
    (fresh,) = _inputs(1)
    with torch.no_grad():
        assert torch.allclose(gm(fresh), model(fresh), rtol=1e-5, atol=1e-5)


class NotLayers(nn.Module):
    """Look-alikes const_matmul must leave alone: scaled addmm, a bias with several rows, a 3-D constant,
    a constant on the left, and a matmul of two activations (quantize's matmul kind, not a Linear)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(6, 6, generator=g))
        self.row = nn.Parameter(torch.randn(6, generator=g))
        self.rows = nn.Parameter(torch.randn(4, 6, generator=g))
        self.cube = nn.Parameter(torch.randn(2, 6, 6, generator=g))

    def forward(self, x):                                                   # x: (4, 6)
        a = torch.addmm(self.row, x, self.w, beta=0.5)                  # beta != 1
        b = torch.addmm(self.rows, x, self.w)                               # (4, 6) bias: not a row
        c = torch.matmul(x, self.cube)                                      # batched constant
        d = self.w @ x.t()                                                  # constant on the left
        e = x @ x.t()                                                       # two activations
        return a, b, c, d, e


def test_look_alikes_are_left_alone():
    model = NotLayers().eval()
    x = torch.randn(4, 6)
    gm = capture(model, (x,), method="symbolic_trace").gm
    assert linearize(gm) == 0
    assert not any(isinstance(m, nn.Linear) for m in gm.modules())


def test_a_bias_of_another_dtype_is_not_folded():
    """x @ W + b with b float64 promotes the sum to float64: the Linear takes the product, the add stays."""

    class Promoting(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(6, 4))
            self.register_buffer("b", torch.randn(4, dtype=torch.float64))

        def forward(self, x):
            return x @ self.w + self.b

    model, x = Promoting().eval(), torch.randn(3, 6)
    gm = capture(model, (x,), method="symbolic_trace").gm
    assert linearize(gm) == 1
    (lin,) = [m for m in gm.modules() if isinstance(m, nn.Linear)]
    assert lin.bias is None
    with torch.no_grad():
        out = gm(x)
    assert out.dtype == torch.float64 and torch.allclose(out, model(x))


@settings(max_examples=20, deadline=None)
@given(k=st.integers(1, 9), n=st.integers(1, 9), lead=st.lists(st.integers(1, 4), min_size=1, max_size=3),
       form=st.sampled_from(["addmm", "matmul_bias", "bias_matmul", "matmul", "mm", "linear_t", "linear_T",
                             "linear_transpose", "linear_permute"]),
       seed=st.integers(0, 2 ** 16))
def test_linearize_keeps_the_product(k, n, lead, form, seed):
    """Any shapes and spellings: the rewritten graph computes what the original does (float rounding)."""
    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn(k, n, generator=g), torch.randn(n, generator=g)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w, self.b = nn.Parameter(w), nn.Parameter(b)

        def forward(self, x):
            if form == "addmm":
                return torch.addmm(self.b, x.reshape(-1, k), self.w)
            if form == "matmul_bias":
                return x @ self.w + self.b
            if form == "bias_matmul":
                return self.b + torch.matmul(x, self.w)
            if form == "matmul":
                return torch.matmul(x, self.w)
            if form == "mm":
                return torch.mm(x.reshape(-1, k), self.w)
            if form == "linear_t":
                return F.linear(x, self.w.t(), self.b)
            if form == "linear_T":
                return F.linear(x, self.w.T)
            if form == "linear_transpose":
                return F.linear(x, self.w.transpose(1, 0), self.b)
            return F.linear(x, self.w.permute(1, 0), self.b)

    x = torch.randn(*([2] if form in ("addmm", "mm") else lead), k, generator=g)
    if form in ("matmul", "matmul_bias", "bias_matmul") and x.dim() < 2:
        x = x.unsqueeze(0)
    gm = fx.symbolic_trace(M().eval())
    ShapeProp(gm).propagate(x)                                  # the tensor_meta capture() would give
    with torch.no_grad():
        ref = gm(x)
    assert linearize(gm) == 1
    (lin,) = [m for m in gm.modules() if isinstance(m, nn.Linear)]
    assert tuple(lin.weight.shape) == (n, k)
    with torch.no_grad():
        assert torch.allclose(gm(x), ref, rtol=1e-5, atol=1e-5)


def test_static_quantize_turns_each_into_a_quant_linear_per_output_channel():
    model = Projections().eval()
    opt = graphopt.optimize(model, "torch", "quantize(progress=false)", example_inputs=tuple(_inputs(0)),
                            calibration=_inputs(2, 4))
    qlins = {n: m for n, m in opt.graph_module.named_modules() if isinstance(m, QuantLinear)}
    assert len(qlins) == N_LAYERS
    rec = opt.report.records[-1]
    assert {d["kind"] for d in rec.details} == {"linear"} and len(rec.details) == N_LAYERS
    assert all(0 <= d["out_err"] < 0.05 for d in rec.details)
    by_shape = {(m.out_features, m.in_features): m for m in qlins.values()}
    conv1d = by_shape[(24, 16)]                                 # the addmm: output channel = the weight's dim 1
    assert conv1d.w_scale.shape == (24,)
    w = model.w3.detach().t()
    assert torch.allclose(conv1d.w_scale, w.abs().amax(1) / 127)
    assert (conv1d.dequantized_weight() - w).abs().max() <= conv1d.w_scale.max() / 2 + 1e-7
    (fresh,) = _inputs(1)
    with torch.no_grad():
        cos = F.cosine_similarity(opt(fresh).flatten(), model(fresh).flatten(), dim=0)
    assert cos > 0.999


def test_dynamic_and_weight_only_modes_take_them_too():
    from graphopt.quant.modules import DynamicQuantLinear, WeightOnlyLinear

    model = Projections().eval()
    for mode, cls in (("dynamic", DynamicQuantLinear), ("weight_only", WeightOnlyLinear)):
        opt = graphopt.optimize(model, "torch", f"quantize(mode={mode})", example_inputs=tuple(_inputs(0)))
        assert sum(isinstance(m, cls) for m in opt.graph_module.modules()) == N_LAYERS, mode


# ------------------------------------------------------------------------------------------- compiled
def test_avx2_path_runs_them_on_the_int8_kernels_and_matches_the_qdq_graph():
    """x86:haswell: every layer on the vpmaddubsw kernels (weights in [-64, 64]), the result the QDQ graph's
    up to float32 rounding in the epilogue (integer accumulation is exact), as tests/quant/test_lowering.py."""
    pytest.importorskip("tvm")
    from graphopt.backends.targets import resolve_target
    from graphopt.backends.tvm.quant_lower import int8_path

    model = Projections().eval()
    opt = graphopt.optimize(model, "x86:haswell", "quantize(progress=false)", example_inputs=tuple(_inputs(0)),
                            calibration=_inputs(2, 4))
    line = opt.report.backend["int8"]
    assert int8_path(resolve_target("x86:haswell")) == "avx2"
    assert line.startswith("path=avx2") and f"qlinear:avx2×{N_LAYERS}" in line, line
    assert all(m.weight_q.abs().max() <= 64 for m in opt.graph_module.modules() if isinstance(m, QuantLinear))
    (fresh,) = _inputs(1)
    with torch.no_grad():
        ref = opt.graph_module(fresh)
    got = opt(fresh)
    assert (got - ref).abs().max().item() <= 1e-6 * ref.abs().max().item()


@pytest.fixture(scope="module")
def tiny_gpt2():
    pytest.importorskip("tvm")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    config._attn_implementation = "sdpa"
    gpt2 = transformers.GPT2Model(config).eval()
    with torch.no_grad():                           # GPT-2's 0.02-std init: widen it so every layer matters
        for p in gpt2.parameters():
            p.normal_(0, 0.3 if p.dim() == 2 else 0.1)

    class LastHidden(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = gpt2

        def forward(self, ids):
            return self.model(input_ids=ids).last_hidden_state

    model = LastHidden().eval()
    ids = lambda seed: (torch.randint(0, 96, (1, 16), generator=torch.Generator().manual_seed(seed)),)  # noqa
    opt = graphopt.optimize(model, "x86", "fold_bn,cleanup,quantize(progress=false)", example_inputs=ids(0),
                            calibration=[ids(10 + i) for i in range(8)])
    return model, ids, opt


def test_tiny_gpt2_conv1d_projections_become_int8_kernels(tiny_gpt2):
    model, ids, opt = tiny_gpt2
    assert opt.report.backend["capture"] == "torch.export"
    line = opt.report.backend["int8"]
    assert "qlinear" in line and "×8" in line.split("qlinear", 1)[1].split(",")[0], line   # 2 layers x 4
    rec = next(r for r in opt.report.records if r.name.startswith("quantize"))
    layers = sorted(d["layer"] for d in rec.details)
    assert len(layers) == 8 and all(d["kind"] == "linear" for d in rec.details)
    for part in ("attn_c_attn", "attn_c_proj", "mlp_c_fc", "mlp_c_proj"):
        assert sum(layer.endswith(part) for layer in layers) == 2, (part, layers)
    assert all(0 <= d["out_err"] < 0.2 for d in rec.details), rec.details
    # per output channel of the Conv1D: its weight's dim 1
    c_fc = model.model.h[0].mlp.c_fc
    q = opt.graph_module.get_submodule(next(p for p in layers if p.endswith("h_0_mlp_c_fc")))
    assert q.w_scale.shape == (c_fc.weight.shape[1],) and q.in_features == c_fc.weight.shape[0]


def test_tiny_gpt2_int8_matches_fp32_eager(tiny_gpt2):
    model, ids, opt = tiny_gpt2
    for seed in (1, 2):
        with torch.no_grad():
            ref, qdq = model(*ids(seed)), opt.graph_module(*ids(seed))
        got = opt(*ids(seed))
        assert F.cosine_similarity(got.flatten().double(), ref.flatten().double(), dim=0) > 0.99
        # the compiled kernels compute the QDQ graph (float32 rounding in the epilogue, layer norms, GELU)
        assert F.cosine_similarity(got.flatten().double(), qdq.flatten().double(), dim=0) > 0.99999
