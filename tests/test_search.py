"""search(): budget selection, Pareto front, plot, resume after an interruption (digits data)."""
import json

import pytest
import torch

import graphopt
from graphopt.datasets import DigitsCNN, batches, digits, train_classifier
from graphopt.errors import GraphoptError
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
