"""cluster with train_data: the shared centroids are fine-tuned (Deep Compression), the indices stay fixed."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import graphopt
from graphopt.datasets import batches, digits, train_classifier
from graphopt.errors import PipelineError
from graphopt.passes.distill import Distill, holdout, split_batch
from graphopt.quant.cluster import ClusteredLinear, clustered_linear


@pytest.mark.parametrize("k", [5, 16, 40])           # 4-bit (packed) and 8-bit indices
def test_clustered_linear_gradients_are_the_summed_weight_gradients(k):
    torch.manual_seed(k)
    w, b = torch.randn(6, 9), torch.randn(6)
    w[0, :4] = 0.0
    mod = ClusteredLinear(w, b, k)
    x = torch.randn(2, 3, 9)
    g = torch.randn(2, 3, 6)
    ours = [x.clone().requires_grad_(), mod.codebook.clone().requires_grad_(), b.clone().requires_grad_()]
    (clustered_linear(ours[0], mod.index, ours[1], ours[2], mod.bits, 9) * g).sum().backward()
    ref = [t.detach().clone().requires_grad_() for t in ours]
    (nn.functional.linear(ref[0], ref[1][mod.indices().long()], ref[2]) * g).sum().backward()
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-5, atol=1e-5)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 10))

    def forward(self, x):
        return self.net(x)


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    (xtr, ytr), (xte, yte) = digits()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = train_classifier(MLP(), batches(xtr, ytr, 64, shuffle=True), epochs=6)
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():                             # a pruned layer: its zeros must survive the fine-tuning
        w = model.net[1].weight
        w[w.abs() < w.abs().flatten().kthvalue(w.numel() // 2).values] = 0.0
    train = batches(xtr, ytr, 64, shuffle=True)
    plain = graphopt.optimize(model, "torch", "cluster(k=4)", example_inputs=(xte[:8],))
    tuned = graphopt.optimize(model, "torch", "cluster(k=4,max_epochs=12)", example_inputs=(xte[:8],),
                              train_data=train)
    return model, train, plain, tuned


def _layers(opt):
    return {n: m for n, m in opt.graph_module.named_modules() if isinstance(m, ClusteredLinear)}


def test_finetuning_moves_centroids_only(trained):
    model, _, plain, tuned = trained
    a, b = _layers(plain), _layers(tuned)
    assert set(a) == set(b) == {"net.1", "net.3"}
    for name in a:
        assert torch.equal(a[name].index, b[name].index)                   # indices fixed
        assert torch.equal(a[name].bias, b[name].bias)                     # biases untouched
        moved = (a[name].codebook != b[name].codebook)
        assert moved.any(), f"{name}: no centroid moved"
        zero = a[name].codebook == 0                                       # pruned zeros and padding
        assert torch.all(b[name].codebook[zero] == 0) and not moved[zero].any()
    w = tuned.graph_module.get_submodule("net.1").dequantized_weight()
    assert torch.equal(w == 0, model.net[1].weight == 0)                   # sparsity kept exactly
    assert not any(p.requires_grad for p in tuned.graph_module.parameters())
    assert all(not isinstance(t, nn.Parameter) for t in (b["net.1"].codebook, b["net.3"].codebook))


def test_finetuning_does_not_raise_the_held_out_loss_and_reports_it(trained):
    model, train, plain, tuned = trained
    data = [split_batch(item, 1) for item in train]
    _, val = holdout(data, 0.1)                        # the pass's held-out split (its defaults)
    kd = Distill()

    def loss(gm):
        with torch.no_grad():
            return (sum(kd._loss(gm(*x), model(*x), y).item() * len(y) for x, y in val)
                    / sum(len(y) for _, y in val))

    before, after = loss(plain.graph_module), loss(tuned.graph_module)
    assert after <= before + 1e-6, (before, after)
    notes = " ".join(tuned.report.records[-1].notes)
    assert "centroid fine-tuning" in notes and "accuracy" in notes and "loss" in notes
    rows = {r["layer"]: r for r in tuned.report.records[-1].details}
    assert set(rows["net.1"]) >= {"w_err", "w_err_kmeans"}
    assert not any("centroid" in n for n in plain.report.records[-1].notes)


def test_finetune_false_and_bad_lr(trained):
    model, train, plain, _ = trained
    off = graphopt.optimize(model, "torch", "cluster(k=4,finetune=false)", example_inputs=(torch.zeros(8, 1, 8, 8),),
                            train_data=train)
    for name, m in _layers(off).items():
        assert torch.equal(m.codebook, _layers(plain)[name].codebook)
    with pytest.raises(PipelineError, match="lr=0"):
        graphopt.optimize(model, "torch", "cluster(lr=0)", example_inputs=(torch.zeros(1, 1, 8, 8),))
