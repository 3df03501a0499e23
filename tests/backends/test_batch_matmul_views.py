"""batch_matmul_views.collapse_batched_matmul_views: 4-D attention matmuls stay 4-D, so their epilogues fuse."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn


class _Scores(nn.Module):
    """q @ kᵀ / sqrt(d) on (batch, heads, seq, d) tensors, then a softmax: what torch.export turns into
    expand + view + bmm + view."""

    def forward(self, q, k):
        return torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1])), dim=-1)


def _lowered_main(model, inputs, dynamic=None):
    from graphopt.backends.targets import resolve_target
    from graphopt.backends.tvm.lower import lower_graph
    from graphopt.capture import capture
    from graphopt.dynamic import parse_dynamic

    spec = parse_dynamic(dynamic, inputs, model) if dynamic else None
    captured = capture(model, inputs, dynamic=spec)
    return lower_graph(captured.gm, inputs, resolve_target("x86"), spec).mod


@pytest.mark.parametrize("dynamic", [None, {"q": {0: "batch", 2: "seq"}, "k": {0: "batch", 2: "seq"},
                                            "batch": (1, 4), "seq": (2, 32)}])
def test_the_bmm_views_collapse_into_one_4d_matmul(dynamic):
    from graphopt.backends.tvm.batch_matmul_views import collapse_batched_matmul_views

    q, k = torch.randn(2, 3, 8, 16), torch.randn(2, 3, 8, 16)
    mod = _lowered_main(_Scores().eval(), (q, k), dynamic)
    before = mod["main"].script()
    assert "R.matmul(" in before and before.count("R.reshape(") >= 3, before
    after = collapse_batched_matmul_views()(mod)["main"].script()
    matmuls = [line for line in after.splitlines() if "R.matmul(" in line]
    assert len(matmuls) == 1 and "R.Tensor((" in matmuls[0], after
    assert after.count("R.reshape(") == 0 and "R.broadcast_to(" not in after, after   # views and expands gone


# The compiled encoder with and without the pass, bit for bit: tests/test_dynamic.py (reuses its dynamic build).
