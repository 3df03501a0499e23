"""Channel-dependency analysis: which channels are coupled, what is left alone and why."""
import math

import networkx as nx
import numpy as np
import pytest
import torch
import torchvision
from hypothesis import given, settings, strategies as st
from torch import fx, nn

from graphopt.analysis.dependency import build_dependency_graph, connected_classes
from graphopt.analysis.flops import count_flops
from graphopt.models import BertStyleEncoder


@pytest.fixture(autouse=True)
def _one_thread():
    """Inputs here are tiny: one torch thread is as fast, and does not stall when the CPU is shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _dep(model, x, **kw):
    gm = fx.symbolic_trace(model.eval())
    return build_dependency_graph(gm, (x,), **kw)


def _classes(dep, path, role):
    return dep.cls[dep.modules[path].slots[role]]


def _group_of(dep, path, role):
    roots = set(_classes(dep, path, role).tolist())
    return [g for g in dep.groups if roots & set(g.classes.tolist())]


# ------------------------------------------------------------------------------------------ union-find
@settings(max_examples=40, deadline=None)
@given(st.integers(1, 60).flatmap(lambda n: st.tuples(
    st.just(n), st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), max_size=80))))
def test_connected_classes_match_networkx(case):
    n, pairs = case
    a = np.array([p[0] for p in pairs], dtype=np.int64)
    b = np.array([p[1] for p in pairs], dtype=np.int64)
    roots = connected_classes(n, a, b)
    g = nx.Graph()
    g.add_nodes_from(range(n))
    g.add_edges_from(pairs)
    for comp in nx.connected_components(g):
        comp = sorted(comp)
        assert set(roots[comp].tolist()) == {comp[0]}


# ------------------------------------------------------------------------------------------ CNN rules
def test_resnet18_residual_stream_is_one_group():
    dep = _dep(torchvision.models.resnet18(), torch.randn(1, 3, 32, 32))
    stream = set(_classes(dep, "layer1.0.conv2", "out").tolist())
    for path, role in [("conv1", "out"), ("bn1", "ch"), ("layer1.1.conv2", "out"), ("layer1.0.conv1", "in"),
                       ("layer1.1.conv1", "in"), ("layer2.0.conv1", "in"), ("layer2.0.downsample.0", "in")]:
        assert np.array_equal(_classes(dep, path, role), _classes(dep, "conv1", "out")), (path, role)
    # inside a block conv1 -> bn1 -> relu -> conv2 is its own group
    inner = _classes(dep, "layer1.0.conv1", "out")
    assert np.array_equal(inner, _classes(dep, "layer1.0.bn1", "ch"))
    assert np.array_equal(inner, _classes(dep, "layer1.0.conv2", "in"))
    assert not stream & set(inner.tolist())
    # the downsample path joins the next stage's stream
    assert np.array_equal(_classes(dep, "layer2.0.downsample.0", "out"), _classes(dep, "layer2.0.conv2", "out"))
    # every channel is its own class (identity coupling)
    assert len(set(inner.tolist())) == 64
    # classifier outputs and the stem's input channels are left alone, with the reason
    (fc,) = _group_of(dep, "fc", "out")
    assert fc.blocked.all() and any("graph output" in r for r in fc.reasons)
    (stem_in,) = _group_of(dep, "conv1", "in")
    assert stem_in.blocked.all()
    assert dep.graph.has_edge(("layer", "layer1.0.conv1"), ("group", _group_of(dep, "layer1.0.bn1", "ch")[0].index))


def test_concat_shifts_indices():
    class Cat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 6, 1)
            self.bn = nn.BatchNorm2d(10)
            self.c = nn.Conv2d(10, 5, 1)
            self.d = nn.Conv2d(6, 2, 1)

        def forward(self, x):
            a, b = self.a(x), self.b(x)
            return self.c(self.bn(torch.cat([a, b], 1))), self.d(b)

    dep = _dep(Cat(), torch.randn(1, 3, 4, 4))
    c_in = _classes(dep, "c", "in")
    assert np.array_equal(c_in[:4], _classes(dep, "a", "out"))
    assert np.array_equal(c_in[4:], _classes(dep, "b", "out"))
    assert np.array_equal(_classes(dep, "bn", "ch"), c_in)
    assert np.array_equal(_classes(dep, "d", "in"), _classes(dep, "b", "out"))
    # a's channels and b's channels are different groups (b's are read by d as well)
    ga, gb = _group_of(dep, "a", "out"), _group_of(dep, "b", "out")
    assert ga[0].index != gb[0].index and ("d", "in") in gb[0].slots and ("d", "in") not in ga[0].slots


def test_split_chunk_sections():
    class Split(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.l, self.r = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            p, q = self.a(x).chunk(2, dim=1)
            return torch.cat([self.l(p), self.r(q)], 1)

    dep = _dep(Split(), torch.randn(1, 3, 4, 4))
    a = _classes(dep, "a", "out")
    assert np.array_equal(_classes(dep, "l", "in"), a[:4])
    assert np.array_equal(_classes(dep, "r", "in"), a[4:])
    assert any(rw.kind == "split" for rw in dep.rewrites)


def test_depthwise_and_grouped_convs():
    class DW(nn.Module):
        def __init__(self):
            super().__init__()
            self.pw = nn.Conv2d(3, 8, 1)
            self.dw = nn.Conv2d(8, 16, 3, padding=1, groups=8)   # channel multiplier 2
            self.gc = nn.Conv2d(16, 8, 1, groups=4)
            self.out = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.out(self.gc(self.dw(self.pw(x))))

    dep = _dep(DW(), torch.randn(1, 3, 4, 4))
    pw, dw_out = _classes(dep, "pw", "out"), _classes(dep, "dw", "out")
    assert np.array_equal(_classes(dep, "dw", "in"), pw)
    assert np.array_equal(dw_out, np.repeat(pw, 2))           # output channel o follows input o // 2
    gc_in, gc_out = _classes(dep, "gc", "in"), _classes(dep, "gc", "out")
    # groups of 4 inputs and 2 outputs form one class each: groups shrink whole
    assert len(set(gc_in.tolist())) == 4
    assert np.array_equal(np.repeat(gc_in[::4], 2), gc_out)


def test_flatten_into_linear_maps_each_channel_to_hw_features():
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3, padding=1)
            self.fc = nn.Linear(6 * 3 * 3, 4)

        def forward(self, x):
            return self.fc(torch.flatten(self.conv(x), 1))

    dep = _dep(Head(), torch.randn(2, 3, 3, 3))
    assert np.array_equal(_classes(dep, "fc", "in"), np.repeat(_classes(dep, "conv", "out"), 9))


def test_layernorm_groupnorm_and_se_gating():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 1)
            self.gn = nn.GroupNorm(4, 8)
            self.fc1, self.fc2 = nn.Conv2d(8, 2, 1), nn.Conv2d(2, 8, 1)
            self.lin = nn.Linear(8, 6)
            self.ln = nn.LayerNorm(6)
            self.out = nn.Linear(6, 3)

        def forward(self, x):
            y = self.gn(self.conv(x))
            s = torch.sigmoid(self.fc2(torch.relu(self.fc1(y.mean((2, 3), keepdim=True)))))
            y = (y * s).mean((2, 3))
            return self.out(self.ln(self.lin(y)))

    dep = _dep(Net(), torch.randn(1, 3, 4, 4))
    conv = _classes(dep, "conv", "out")
    assert np.array_equal(_classes(dep, "gn", "ch"), conv)
    assert len(set(conv.tolist())) == 4                    # GroupNorm(4, 8): pairs of channels go together
    assert np.array_equal(_classes(dep, "fc1", "in"), conv)
    assert np.array_equal(_classes(dep, "fc2", "out"), conv)   # SE gate couples to the gated channels
    assert np.array_equal(_classes(dep, "lin", "in"), conv)
    assert np.array_equal(_classes(dep, "ln", "ch"), _classes(dep, "lin", "out"))
    assert not dep.blocked[_classes(dep, "fc1", "out")].any()


def test_unsupported_op_and_exclude_are_left_alone_with_reason():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)
            self.d = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            y = torch.roll(self.a(x), 1, dims=1)       # no rule for roll: a's channels must stay
            return self.d(self.c(self.b(y)))

    dep = _dep(Odd(), torch.randn(1, 3, 4, 4), exclude=["c"])
    (ga,) = _group_of(dep, "a", "out")
    assert ga.blocked.all() and any("roll" in r for r in ga.reasons)
    gb = _group_of(dep, "b", "out")
    assert gb[0].blocked.all() and any("pattern 'c'" in r for r in gb[0].reasons)
    gc = _group_of(dep, "c", "out")
    assert gc[0].blocked.all()


def test_indexing_channel_dim_blocks():
    class Pick(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.b = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.b(self.a(x)[:, :4])

    dep = _dep(Pick(), torch.randn(1, 3, 4, 4))
    assert dep.blocked[_classes(dep, "a", "out")].all()


# ---------------------------------------------------------------------------------------- attention
def test_bert_style_heads_are_whole_classes():
    torch.manual_seed(0)
    model = BertStyleEncoder(vocab=50, hidden=32, layers=1, heads=4, ffn=64, max_len=16, num_labels=3)
    dep = _dep(model, torch.randint(0, 50, (2, 8)))
    q = _classes(dep, "layers.0.attention.q", "out")
    assert len(set(q.tolist())) == 4                       # 4 heads of 8 features
    assert np.array_equal(q, np.repeat(q[::8], 8))
    for path, role in [("layers.0.attention.k", "out"), ("layers.0.attention.v", "out"),
                       ("layers.0.attention.out", "in")]:
        assert np.array_equal(_classes(dep, path, role), q), path
    (heads,) = _group_of(dep, "layers.0.attention.q", "out")
    assert heads.width == 8 and heads.prunable
    assert [hs.sources for hs in dep.head_splits][:1] and "layers.0.attention.q" in dep.head_splits[0].sources
    # the hidden (residual) stream couples the embeddings, every LayerNorm and the pooler's input
    hidden = _classes(dep, "tokens", "out")
    for path, role in [("positions", "out"), ("embed_norm", "ch"), ("layers.0.attn_norm", "ch"),
                       ("layers.0.ffn_out", "out"), ("pooler", "in")]:
        assert np.array_equal(_classes(dep, path, role), hidden), path
    assert dep.blocked[_classes(dep, "classifier", "out")].all()
    dep_noheads = _dep(model, torch.randint(0, 50, (2, 8)), prune_heads=False)
    assert dep_noheads.blocked[_classes(dep_noheads, "layers.0.attention.q", "out")].all()


def test_vit_multihead_attention_and_parameters():
    from torchvision.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=4, hidden_dim=32, mlp_dim=64)
    dep = _dep(vit, torch.randn(1, 3, 32, 32))
    attn = "encoder.layers.encoder_layer_0.self_attention"
    stream = _classes(dep, "conv_proj", "out")
    for role in ("in_q", "in_k", "in_v", "out"):
        assert np.array_equal(_classes(dep, attn, role), stream), role
    assert not dep.blocked[_classes(dep, attn, "heads")].any()
    # the class token and position embedding are sliced along their last dim with the stream
    for target in ("class_token", "encoder.pos_embedding"):
        p = dep.params[target]
        assert p.dim == 2 and np.array_equal(dep.cls[p.ids], stream)
    (g,) = _group_of(dep, attn, "heads")
    assert g.width == 8
    assert not dep.blocked[stream].any()


def test_flops_model_matches_count_flops_when_nothing_is_removed():
    for model, x in [(torchvision.models.mobilenet_v2(), torch.randn(1, 3, 32, 32)),
                     (BertStyleEncoder(vocab=50, hidden=32, layers=1, heads=4, ffn=64, max_len=16),
                      torch.randint(0, 50, (1, 8)))]:
        dep = _dep(model, x)
        assert math.isclose(dep.estimate_flops(np.ones(dep.num_ids, dtype=bool)), count_flops(dep.gm))


@pytest.mark.parametrize("name", ["densenet121", "efficientnet_b0"])
def test_concat_and_se_architectures(name):
    dep = _dep(getattr(torchvision.models, name)(), torch.randn(1, 3, 32, 32))
    prunable = [g for g in dep.groups if g.prunable]
    blocked = [g for g in dep.groups if not g.prunable]
    assert len(blocked) == 2                       # the classifier's outputs and the RGB input channels
    assert len(prunable) >= 40
    if name == "densenet121":
        # the first dense layer's new features feed every later layer of the block
        (g,) = _group_of(dep, "features.denseblock1.denselayer1.conv2", "out")
        assert ("features.denseblock1.denselayer6.conv1", "in") in g.slots
        assert ("features.transition1.conv", "in") in g.slots
    else:
        block = "features.2.0.block"
        expanded = _classes(dep, f"{block}.0.0", "out")
        assert np.array_equal(_classes(dep, f"{block}.1.0", "out"), expanded)      # depthwise
        assert np.array_equal(_classes(dep, f"{block}.2.fc2", "out"), expanded)    # SE gate
        assert np.array_equal(_classes(dep, f"{block}.3.0", "in"), expanded)       # projection
