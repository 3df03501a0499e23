"""sparsify: masks honour pattern and sparsity exactly, criteria, gradual schedule, typed errors (torch target)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import graphopt
from graphopt.errors import CalibrationError, PipelineError
from graphopt.passes._sparse import (Pattern, SparseConv2d, SparseLinear, count_groups, masks_from_scores,
                                     parse_pattern)
from graphopt.passes.sparsify import Sparsify, cubic_sparsity
from graphopt.pipeline import Pipeline


def _groups_removed(mask: torch.Tensor, pattern: Pattern) -> int:
    m = mask.reshape(mask.shape[0], -1)
    if pattern.kind != "block":
        return int((~m).sum())
    r, c = pattern.block
    n, k = m.shape
    pad = torch.ones(-(-n // r) * r, -(-k // c) * c, dtype=torch.bool)
    pad[:n, :k] = m
    blocks = pad.reshape(pad.shape[0] // r, r, pad.shape[1] // c, c).permute(0, 2, 1, 3)
    any_kept, all_kept = blocks.any(dim=(2, 3)), blocks.all(dim=(2, 3))
    # real (unpadded) entries of a block are all kept or all removed
    real = torch.zeros_like(pad)
    real[:n, :k] = True
    real_b = real.reshape(pad.shape[0] // r, r, pad.shape[1] // c, c).permute(0, 2, 1, 3)
    kept_real = (blocks & real_b).sum(dim=(2, 3))
    assert torch.equal(kept_real == 0, ~any_kept | (kept_real == 0))
    assert torch.equal((kept_real == real_b.sum(dim=(2, 3))) | (kept_real == 0),
                       torch.ones_like(all_kept)), "a block is partly pruned"
    return int((kept_real == 0).sum())


PATTERNS = st.sampled_from(["unstructured", "2:4", "4:8", "1:4", "16x1", "1x16", "4x4", "2x8", "block(3x5)"])


@settings(max_examples=60, deadline=None)
@given(out=st.integers(1, 40), inp=st.integers(1, 12), pattern=PATTERNS, sparsity=st.floats(0.0, 0.97),
       seed=st.integers(0, 2**16))
def test_masks_exact(out, inp, pattern, sparsity, seed):
    p = parse_pattern(pattern)
    if p.kind == "nm":
        inp = inp * p.m
        sparsity = p.fixed_sparsity()
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(out, inp, generator=g).abs()
    scores[0, 0] = scores[0, -1]                            # a tie
    mask = masks_from_scores({"w": scores}, {"w": (out, inp)}, p, sparsity, "layer")["w"]
    assert mask.shape == (out, inp) and mask.dtype == torch.bool
    if p.kind == "nm":
        assert torch.all(mask.reshape(out, -1, p.m).sum(-1) == p.n)
    else:
        assert _groups_removed(mask, p) == round(sparsity * count_groups((out, inp), p))


@settings(max_examples=25, deadline=None)
@given(shapes=st.lists(st.tuples(st.integers(1, 24), st.integers(1, 24)), min_size=1, max_size=4),
       pattern=st.sampled_from(["unstructured", "4x1", "2x2"]), sparsity=st.floats(0.0, 0.95),
       seed=st.integers(0, 999))
def test_global_scope_exact_total(shapes, pattern, sparsity, seed):
    p = parse_pattern(pattern)
    g = torch.Generator().manual_seed(seed)
    scores = {f"l{i}": torch.rand(s, generator=g) * (i + 1) for i, s in enumerate(shapes)}
    masks = masks_from_scores(scores, {k: tuple(v.shape) for k, v in scores.items()}, p, sparsity, "global")
    removed = sum(_groups_removed(m, p) for m in masks.values())
    total = sum(count_groups(s, p) for s in shapes)
    assert removed == round(sparsity * total)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 4)).eval()


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.Flatten(),
                         nn.Linear(8 * 25, 6)).eval()


@pytest.mark.parametrize("pipe", ["sparsify(sparsity=0.75,pattern=4x4)", "sparsify(pattern=2:4)",
                                  'sparsify(sparsity=0.6,pattern="block(1x8)",scope=global)',
                                  "sparsify(sparsity=0.9)"])
def test_pass_applies_masks_exactly(pipe):
    model, x = _mlp(), torch.randn(3, 16)
    opt = graphopt.optimize(model, target="torch", pipeline=pipe, example_inputs=(x,))
    p = Pipeline.parse(pipe).passes[0]
    gm = opt.graph_module
    layers = [m for m in gm.modules() if isinstance(m, SparseLinear)]
    assert len(layers) == 3
    removed = total = 0
    originals = [m for m in model.modules() if isinstance(m, nn.Linear)]
    for lay, orig in zip(layers, originals):
        assert torch.all(lay.weight[~lay.mask] == 0)
        assert torch.equal(lay.weight[lay.mask], orig.weight[lay.mask])          # kept weights untouched
        r = _groups_removed(lay.mask, p._pattern) if p._pattern.kind != "nm" else None
        if p.scope == "layer" and r is not None:
            assert r == round(p.sparsity * count_groups(tuple(lay.weight.shape), p._pattern))
        removed += r or 0
        total += count_groups(tuple(lay.weight.shape), p._pattern)
    if p.scope == "global":
        assert removed == round(p.sparsity * total)
    rows = opt.report.records[-1].details
    assert [r["layer"] for r in rows] == ["0", "2", "4"] and all("sparsity" in r for r in rows)
    y = gm(x)                                   # the graph computes the masked model
    ref = x
    for m in model:
        ref = nn.functional.linear(ref, dict(zip(originals, layers))[m].weight, m.bias) if m in originals else m(ref)
    torch.testing.assert_close(y, ref)


def test_conv_and_exclude_and_nm_width():
    model, x = _cnn(), torch.randn(2, 3, 5, 5)
    opt = graphopt.optimize(model, target="torch", pipeline="sparsify(sparsity=0.5,pattern=4:8,exclude=[0])",
                            example_inputs=(x,))
    gm = opt.graph_module
    assert isinstance(gm.get_submodule("2"), SparseConv2d) and isinstance(gm.get_submodule("4"), SparseLinear)
    assert not isinstance(gm.get_submodule("0"), SparseConv2d)
    c = gm.get_submodule("2")
    assert torch.all(c.mask.reshape(8, -1, 8).sum(-1) == 4)
    notes = " ".join(opt.report.records[-1].notes)
    assert "0 (exclude)" in notes


def test_nm_ragged_width_left_dense():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    opt = graphopt.optimize(model, target="torch", pipeline="sparsify(pattern=2:4)", example_inputs=(torch.randn(1, 6),))
    assert not isinstance(opt.graph_module.get_submodule("0"), SparseLinear)
    assert isinstance(opt.graph_module.get_submodule("2"), SparseLinear)
    assert "input width 6 is not a multiple of 4" in " ".join(opt.report.records[-1].notes)


def test_obs_criterion_uses_input_scale():
    """Feature 0 of the input is 100x larger: OBS keeps its (small) weights, magnitude removes them."""
    lin = nn.Linear(8, 4, bias=False)
    with torch.no_grad():
        lin.weight.fill_(1.0)
        lin.weight[:, 0] = 0.05
    model = nn.Sequential(lin).eval()
    calib = [torch.randn(16, 8) * torch.tensor([100.0] + [1.0] * 7) for _ in range(2)]
    kept = {}
    for crit in ("magnitude", "obs"):
        opt = graphopt.optimize(model, target="torch", pipeline=f"sparsify(sparsity=0.25,criterion={crit})",
                                example_inputs=(calib[0][:1],), calibration=calib)
        kept[crit] = opt.graph_module.get_submodule("0").mask[:, 0]
    assert not kept["magnitude"].any() and kept["obs"].all()


def test_gradient_criterion_needs_data_and_runs():
    model, x = _mlp(), torch.randn(4, 16)
    with pytest.raises(CalibrationError, match="needs data"):
        graphopt.optimize(model, target="torch", pipeline="sparsify(criterion=gradient)", example_inputs=(x,))
    data = [(torch.randn(8, 16), torch.randint(0, 4, (8,))) for _ in range(3)]
    opt = graphopt.optimize(model, target="torch", pipeline="sparsify(sparsity=0.5,criterion=gradient)",
                            example_inputs=(x,), train_data=data)
    lay = opt.graph_module.get_submodule("0")
    assert int((~lay.mask).sum()) == round(0.5 * lay.weight.numel())


def test_cubic_schedule():
    vals = [cubic_sparsity(t, 0.1, 0.9, 10, 110) for t in range(0, 130)]
    assert vals[0] == vals[10] == 0.1 and vals[110] == vals[-1] == 0.9
    assert all(b >= a for a, b in zip(vals, vals[1:]))
    assert vals[60] == pytest.approx(0.9 + (0.1 - 0.9) * 0.5 ** 3)


def test_gradual_reaches_final_sparsity_and_distill_keeps_masks():
    model, x = _mlp(), torch.randn(2, 16)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(16, 16, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(6)]
    pipe = "sparsify(sparsity=0.8,steps=30,initial_sparsity=0.2,prune_every=5),distill(steps=12)"
    opt = graphopt.optimize(model, target="torch", pipeline=pipe, example_inputs=(x,), train_data=data)
    for lay in (m for m in opt.graph_module.modules() if isinstance(m, SparseLinear)):
        assert int((~lay.mask).sum()) == round(0.8 * lay.weight.numel())
        assert torch.all(lay.weight[~lay.mask] == 0)                 # distill trained, masked stayed zero
    notes = " ".join(opt.report.records[-2].notes)
    assert "cubic schedule 0.2 -> 0.8" in notes and "mask updates" in notes


def test_gradual_needs_train_data():
    with pytest.raises(CalibrationError, match="train_data"):
        graphopt.optimize(_mlp(), target="torch", pipeline="sparsify(steps=5)", example_inputs=(torch.randn(1, 16),))


@pytest.mark.parametrize("text,match", [
    ("sparsify(pattern=3x)", "unknown pattern"),
    ("sparsify(pattern=4:2)", "0 < N < M"),
    ("sparsify(sparsity=1.0)", r"\[0, 1\)"),
    ("sparsify(sparsity=0.7,pattern=2:4)", "fixes sparsity at 0.5"),
    ("sparsify(pattern=2:4,scope=global)", "scope=global"),
    ("sparsify(criterion=l3)", "criterion"),
    ("sparsify(kernel=fast)", "kernel"),
    ("sparsify(sparsity=0.5,initial_sparsity=0.6)", "initial_sparsity"),
    ("sparsify(prune_start=0.8,prune_end=0.5)", "prune_start"),
])
def test_bad_options_are_typed_errors(text, match):
    with pytest.raises(PipelineError, match=match):
        Pipeline.parse(text)


def test_text_round_trip_and_exact_at_zero():
    p = Pipeline.parse('sparsify(sparsity=0.9,pattern="block(16x1)",criterion=obs,exclude=["cls*"])')
    assert Pipeline.parse(str(p)) == p
    assert Sparsify(sparsity=0.0).is_exact() and not Sparsify(sparsity=0.1).is_exact()
    opt = graphopt.optimize(_mlp(), target="torch", pipeline="sparsify(sparsity=0)", example_inputs=(torch.randn(1, 16),))
    assert not any(isinstance(m, SparseLinear) for m in opt.graph_module.modules())
