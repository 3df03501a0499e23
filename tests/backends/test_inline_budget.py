"""Inlining elementwise chains must not grow expressions exponentially (inline_budget.py).

Fuzz seed 66 (mish -> residual add -> gelu_tanh in one fused kernel) once inlined into a 14.8 MB expression and
took 95 s to lower; these check the plan on hand-made chains and the compiled result of such a model."""
import numpy as np
import pytest
import torch
from torch import nn

from graphopt.backends.tvm.inline_budget import BUDGET, expanded_size, plan_inlining


def _chain(depth: int, reads: int):
    """x -> b1 -> ... -> b_depth -> out, each block reading its producer `reads` times."""
    import tvm
    from tvm import te

    x = te.placeholder((4, 8), "float32", name="x")
    t = x
    def reader(prev):
        def body(a, b):
            e = prev[a, b]
            for k in range(1, reads):
                e = e + prev[a, b] * tvm.tirx.const(float(k), "float32")
            return e
        return body

    for i in range(depth):
        t = te.compute((4, 8), reader(t), name=f"b{i}")
    out = te.compute((4, 8), lambda a, b: t[a, b] + 1.0, name="out")
    return te.create_prim_func([x, out])


def _schedule(func):
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    blocks = list(sch.get_child_blocks(sch.get_sblock("root")))
    return sch, blocks, blocks[:-1]


def test_a_short_chain_is_inlined_whole():
    sch, blocks, inner = _schedule(_chain(depth=3, reads=2))
    chosen, _ = plan_inlining(sch, blocks, inner)
    assert len(chosen) == len(inner)


def test_a_chain_that_multiplies_keeps_buffers_and_stays_within_the_budget():
    sch, blocks, inner = _schedule(_chain(depth=8, reads=4))       # 4**8 copies of x if inlined whole
    assert expanded_size(sch, blocks, inner) > 100 * BUDGET
    chosen, sizes = plan_inlining(sch, blocks, inner)
    assert 0 < len(chosen) < len(inner)
    assert max(sizes.values()) <= BUDGET
    names = {sch.get(b).name_hint for b in chosen}
    for b in chosen:
        sch.compute_inline(b)
    left = {sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))}
    assert "out" in left and not names & left


class _Deep(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(6, 6, 3, padding=1, groups=6)

    def forward(self, x):
        y = x + nn.functional.mish(self.conv(x))
        y = nn.functional.gelu(y, approximate="tanh")
        y = nn.functional.mish(nn.functional.softplus(y))
        a, b = torch.split(y, [2, 4], dim=1)
        return torch.cat([torch.tanh(a), nn.functional.mish(b)], dim=1)


def test_a_chain_of_transcendental_activations_compiles_and_matches_eager():
    import graphopt

    torch.manual_seed(0)
    model = _Deep().eval()
    x = torch.randn(1, 6, 7, 9)
    opt = graphopt.optimize(model, target="x86", example_inputs=(x,))
    fresh = torch.randn(1, 6, 7, 9)
    with torch.no_grad():
        ref = model(fresh)
    np.testing.assert_allclose(opt(fresh).numpy(), ref.numpy(), rtol=1e-4, atol=1e-5)


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
