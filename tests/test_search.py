"""search(): budget selection, Pareto front, plot, resume after an interruption (digits data)."""
import json

import pytest
import torch

import graphopt
from graphopt.datasets import DigitsCNN, batches, digits, train_classifier
from graphopt.errors import GraphoptError
from graphopt.searcher import default_space
from tests.helpers import WeightNoise  # noqa: F401  (registers test_weight_noise)


@pytest.fixture(scope="module")
def digits_model():
    torch.manual_seed(0)
    (xtr, ytr), (xte, yte) = digits()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)            # tiny batches: one thread trains faster on a busy 2-core machine
    try:                                # (the smaller, shorter training of test_quantize's digits model)
        model = train_classifier(DigitsCNN(width=16), batches(xtr, ytr, 64, shuffle=True), epochs=4)
    finally:
        torch.set_num_threads(threads)
    return model, (xte, yte)


SPACE = ["fold_bn,cleanup",
         "fold_bn,cleanup,test_weight_noise(sigma=0.02)",
         "fold_bn,cleanup,test_weight_noise(sigma=1.5)",
         "cleanup"]


def test_search_picks_fastest_within_budget_and_resumes(digits_model, tmp_path):
    model, (xte, yte) = digits_model
    x0 = xte[:16]
    state = tmp_path / "state.json"
    calls = []

    def metric(m, data):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt            # the user hits Ctrl-C during the third candidate
        return graphopt.top1(m, data)

    with pytest.raises(KeyboardInterrupt):
        graphopt.search(model, "torch", (xte, yte), metric, budget=1.0, example_inputs=(x0,), space=SPACE,
                        state=str(state), repeats=3, progress=False)
    saved = json.loads(state.read_text())
    assert [c["status"] for c in saved["candidates"]] == ["ok", "ok", "pending", "pending"]

    calls.clear()
    result = graphopt.search(model, "torch", (xte, yte), graphopt.top1, budget=1.0, example_inputs=(x0,),
                             space=SPACE, state=str(state), repeats=3, progress=False)
    by = {c.pipeline: c for c in result.candidates}
    assert all(c.status == "ok" for c in result.candidates)
    base = result.baseline
    assert base.pipeline == "fold_bn,cleanup" and base.metric > 95
    assert by[SPACE[2]].metric < base.metric - 1.0 and not by[SPACE[2]].within_budget
    assert by[SPACE[1]].within_budget
    within = [c for c in result.candidates if c.within_budget]
    assert result.chosen == min(within, key=lambda c: c.latency_ms)
    assert result.model is not None and graphopt.top1(result.model, (xte, yte)) == pytest.approx(
        result.chosen.metric)
    # Pareto front: no front member is dominated by another candidate
    for c in result.pareto_front():
        assert not any(o.latency_ms < c.latency_ms and o.metric > c.metric for o in result.candidates)
    table = result.table()
    assert "chosen: " + result.chosen.pipeline in table and "over budget" in table
    png = result.plot(str(tmp_path / "pareto.png"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_search_records_failures_and_needs_metric(digits_model):
    model, (xte, yte) = digits_model
    result = graphopt.search(model, "torch", (xte, yte), graphopt.top1, example_inputs=(xte[:16],),
                             space=["fold_bn,cleanup", "fold_bn,cleanup,distill"], repeats=2, progress=False)
    failed = [c for c in result.candidates if c.status == "failed"]
    assert len(failed) == 1 and "distill needs training data" in failed[0].error
    with pytest.raises(GraphoptError, match="needs data and a metric"):
        graphopt.search(model, "torch", example_inputs=(xte[:16],))


def test_corrupt_state_is_a_clear_error(digits_model, tmp_path):
    model, (xte, yte) = digits_model
    bad = tmp_path / "state.json"
    bad.write_text("{not json")
    with pytest.raises(GraphoptError, match=f"search state file {bad} is unreadable"):
        graphopt.search(model, "torch", (xte, yte), graphopt.top1, example_inputs=(xte[:16],),
                        space=SPACE[:1], state=str(bad), progress=False)


def test_default_space_has_sparsity_bits_and_clusters():
    from graphopt.pipeline import Pipeline

    space = default_space()
    with_kd = default_space(distill=True)
    assert space[0] == "fold_bn,cleanup" and len(space) == len(set(space)) == 17
    assert len(with_kd) == 24 and with_kd[:17] == space
    body = [s.removeprefix("fold_bn,cleanup,") for s in space[1:]]
    for want in ("sparsify(sparsity=0.5)", "sparsify(sparsity=0.8,pattern=16x1)", "cluster(k=16)",
                 "quantize(mode=weight_only,bits=4)", "quantize(mode=dynamic,bits=4)",
                 "quantize(bits=mixed,budget=error:0.02)",
                 "sparsify(sparsity=0.5),cluster(k=16)", "sparsify(sparsity=0.5),quantize", "prune(ratio=0.5),quantize"):
        assert want in body, want
    assert not any("cluster" in s or "quantize" in s for s in with_kd[17:])
    for s in with_kd:
        Pipeline.parse(s)                                # every candidate names registered passes and options
    assert not any("sparsify" in s or "cluster" in s for s in default_space(sparsity=False, clusters=False))


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                       torch.nn.ReLU(), torch.nn.Linear(256, 32))

    def forward(self, x):
        return self.net(x)


B = "fold_bn,cleanup"
SIZE_SPACE = [B, f"{B},sparsify(sparsity=0.8,pattern=16x1,kernel=sparse)", f"{B},quantize(mode=weight_only,bits=4)",
              f"{B},cluster(k=16)", f"{B},cluster(k=2)", f"{B},quantize(bits=mixed,budget=error:0.02,progress=false)"]


@pytest.fixture(scope="module")
def size_search(tmp_path_factory):
    """The new axes compiled for x86 (tiny MLP): one search for the smallest stored model, its state reused."""
    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randn(2, 64)
    data = [torch.randn(2, 64) for _ in range(3)]
    state = str(tmp_path_factory.mktemp("search") / "state.json")
    kw = dict(example_inputs=(x,), space=SIZE_SPACE, state=state, repeats=2, progress=False, calibration=data)
    result = graphopt.search(model, "x86", data, graphopt.cosine(model), budget=1.0, objective="size",
                             compressed=True, **kw)
    return model, data, kw, result


def test_search_new_axes_compile_and_report_sizes(size_search):
    from graphopt.searcher import stored_bytes

    model, _, _, result = size_search
    by = {c.pipeline: c for c in result.candidates}
    assert all(c.status == "ok" for c in result.candidates), result.table()
    base = by[B]
    assert base.size_bytes == sum(p.numel() * 4 for p in model.parameters())
    assert by[SIZE_SPACE[1]].size_bytes < base.size_bytes / 3          # values + block indices, no mask
    assert by[SIZE_SPACE[2]].size_bytes < base.size_bytes / 5          # int4 + group scales
    assert by[SIZE_SPACE[3]].size_bytes < base.size_bytes / 5          # 4-bit indices + codebooks
    assert by[SIZE_SPACE[5]].size_bytes < base.size_bytes / 2          # int8 or int4 per layer, within 2% error
    assert all(c.compressed_bytes > 0 for c in result.candidates)
    assert by[SIZE_SPACE[4]].compressed_bytes < by[SIZE_SPACE[3]].compressed_bytes   # 2 symbols code smaller
    assert not by[SIZE_SPACE[4]].within_budget and by[SIZE_SPACE[3]].within_budget
    within = [c for c in result.candidates if c.within_budget]
    assert result.chosen == min(within, key=lambda c: (c.size_bytes, c.latency_ms))
    assert stored_bytes(result.model) == result.chosen.size_bytes
    for c in result.pareto_front():                                     # Pareto over (size, metric)
        assert not any(o.size_bytes < c.size_bytes and o.metric > c.metric for o in result.candidates)
    table = result.table()
    assert "size" in table and "compressed" in table and f"chosen: {result.chosen.pipeline} (the smallest stored weights" in table


def test_search_objective_from_the_same_state_and_older_state_files(size_search, tmp_path):
    model, data, kw, first = size_search
    again = graphopt.search(model, "x86", data, graphopt.cosine(model), budget=1.0, objective="compressed", **kw)
    by_first = {c.pipeline: c for c in first.candidates}
    for c in again.candidates:                                           # nothing compiled again
        assert c.compile_s == by_first[c.pipeline].compile_s and c.size_bytes == by_first[c.pipeline].size_bytes
    within = [c for c in again.candidates if c.within_budget]
    assert again.chosen == min(within, key=lambda c: (c.compressed_bytes, c.latency_ms))
    assert again.chosen.pipeline != SIZE_SPACE[4]                        # the smallest file is over budget

    # a state file written before sizes were recorded: it loads; the size objective measures it again
    old = tmp_path / "old.json"
    fields = ("pipeline", "latency_ms", "metric", "flops", "params", "compile_s", "status", "error", "pareto",
              "within_budget")
    saved = json.loads(open(kw["state"]).read())
    old.write_text(json.dumps({"meta": saved["meta"], "candidates": [
        {k: c[k] for k in fields} for c in saved["candidates"] if c["pipeline"] in SIZE_SPACE[:2]]}))
    small = dict(kw, space=SIZE_SPACE[:2], state=str(old))
    lat = graphopt.search(model, "x86", data, graphopt.cosine(model), budget=1.0, **small)
    assert all(c.size_bytes == 0 for c in lat.candidates) and " - " in lat.table()
    size = graphopt.search(model, "x86", data, graphopt.cosine(model), budget=1.0, objective="size", **small)
    assert all(c.size_bytes > 0 for c in size.candidates)
    assert any("2 candidate(s) from the state file had no size" in n for n in size.notes)
    with pytest.raises(GraphoptError, match="objective='speed'"):
        graphopt.search(model, "x86", data, graphopt.cosine(model), objective="speed", **small)
