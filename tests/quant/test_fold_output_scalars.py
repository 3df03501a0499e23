"""quant.graph._fold_output_scalars: attention's score scaling goes into the quantized matmul's output scale."""
from __future__ import annotations

import math
import operator

import torch
from torch import nn

import graphopt
from graphopt.quant import graph as qgraph
from graphopt.quant.modules import QuantMatmul


class _Attention(nn.Module):
    def __init__(self, d=32, heads=2, divide=False):
        super().__init__()
        torch.manual_seed(0)
        self.qkv, self.heads, self.divide, self.dh = nn.Linear(d, 3 * d), heads, divide, d // heads

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, self.dh).permute(2, 0, 3, 1, 4)
        dh = self.dh                            # a number (as in graphopt.models and most encoders)
        scores = q @ k.transpose(-2, -1)
        scores = scores / math.sqrt(dh) if self.divide else scores * (1.0 / math.sqrt(dh))
        return (torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(b, s, d)


def _build(model, fold: bool, monkeypatch):
    x = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(1))
    calib = [torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(s)) for s in range(4)]
    with monkeypatch.context() as m:
        if not fold:
            m.setattr(qgraph, "_fold_output_scalars", lambda graph, table: 0)
        opt = graphopt.optimize(model, "torch", "quantize(progress=false)", example_inputs=(x,), calibration=calib)
    return opt, x


def _scaled_matmuls(gm):
    mods = dict(gm.named_modules())
    out = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(mods[str(node.target)], QuantMatmul):
            users = list(node.users)
            out.append((mods[str(node.target)], [u.target for u in users]))
    return out


def test_the_score_scaling_is_folded_and_the_values_are_unchanged(monkeypatch):
    """head_dim 16: the scale 1/4 is a power of two, so folding it changes no value (bit for bit)."""
    model = _Attention().eval()
    folded, x = _build(model, True, monkeypatch)
    plain, _ = _build(model, False, monkeypatch)
    (qk_f, users_f), _ = _scaled_matmuls(folded.graph_module)
    (qk_p, users_p), _ = _scaled_matmuls(plain.graph_module)
    assert operator.mul in users_p and operator.mul not in users_f, (users_p, users_f)
    assert qk_f.out_scale == qk_p.out_scale * 0.25
    assert torch.equal(folded(x), plain(x))


def test_a_division_by_the_root_is_folded_too(monkeypatch):
    """`scores / sqrt(d)`: one rounding of s / c in place of two; the outputs stay within float rounding."""
    model = _Attention(divide=True).eval()
    folded, x = _build(model, True, monkeypatch)
    plain, _ = _build(model, False, monkeypatch)
    (_, users_f), _ = _scaled_matmuls(folded.graph_module)
    assert operator.truediv not in users_f
    torch.testing.assert_close(folded(x), plain(x), rtol=1e-5, atol=1e-6)
