"""distill: recovers accuracy lost to compression on real data (scikit-learn's bundled digits)."""
import copy

import pytest
import torch
from torch import nn

import graphopt
from graphopt.datasets import DigitsCNN, accuracy, batches, digits, train_classifier
from graphopt.errors import CalibrationError
from tests.helpers import WeightNoise  # noqa: F401  (registers test_weight_noise)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These nets are tiny: a second thread buys nothing, and on a loaded 2-core machine the threads' spinning
    made the digits tests 5-10x slower (126 s against 11 s for one default distillation)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def trained_digits():
    torch.manual_seed(0)
    (xtr, ytr), (xte, yte) = digits()
    model = train_classifier(DigitsCNN(), batches(xtr, ytr, 64, shuffle=True), epochs=8)
    return model, (xtr, ytr), (xte, yte)


def test_distill_recovers_accuracy_after_damage(trained_digits):
    model, (xtr, ytr), (xte, yte) = trained_digits
    base = accuracy(model, xte, yte)
    assert base > 95.0
    x0 = xte[:8]
    damaged = graphopt.optimize(model, target="torch", pipeline="fold_bn,test_weight_noise(sigma=0.6)",
                                example_inputs=(x0,))
    damaged_acc = accuracy(damaged, xte, yte)
    assert damaged_acc < base - 5.0, (base, damaged_acc)

    train = batches(xtr, ytr, 64, shuffle=True)
    opt = graphopt.optimize(model, target="torch",
                            pipeline="fold_bn,test_weight_noise(sigma=0.6),distill(epochs=4,lr=0.002,progress=false)",
                            example_inputs=(x0,), train_data=train)
    recovered = accuracy(opt, xte, yte)
    assert recovered >= base - 1.0, (base, damaged_acc, recovered)
    rec = opt.report.records[-1]
    assert rec.name.startswith("distill") and not rec.exact
    assert "trained" in rec.notes[0] and "with labels" in rec.notes[0]
    # the distilled graph is closer to the teacher than the damaged one
    assert rec.max_abs < opt.report.records[-2].max_abs
    # the user's model is untouched
    assert accuracy(model, xte, yte) == base


def test_distill_teacher_only_without_labels_and_with_features(trained_digits):
    model, (xtr, _), (xte, yte) = trained_digits
    x0 = xte[:8]
    unlabelled = batches(xtr, None, 64, shuffle=True)
    opt = graphopt.optimize(
        model, target="torch", example_inputs=(x0,), train_data=unlabelled,
        pipeline="test_weight_noise(sigma=0.4),distill(epochs=2,features=[features.*],progress=false)")
    notes = " ".join(opt.report.records[-1].notes)
    assert "teacher only" in notes and "feature distillation on: features." in notes
    assert opt.report.records[-1].max_abs < opt.report.records[-2].max_abs


def test_distill_without_data_is_a_clear_error(trained_digits):
    model, _, (xte, _) = trained_digits
    with pytest.raises(CalibrationError, match="distill needs training data"):
        graphopt.optimize(model, target="torch", pipeline="distill", example_inputs=(xte[:2],))


def test_distill_bad_batches_are_a_clear_error(trained_digits):
    model, _, (xte, _) = trained_digits
    bad = [(xte[:4], xte[:4], xte[:4])]
    with pytest.raises(CalibrationError, match="a training batch has 3 elements"):
        graphopt.optimize(model, target="torch", pipeline="distill(progress=false)",
                          example_inputs=(xte[:2],), train_data=bad)


def test_prune_half_the_flops_then_distill_recovers_within_one_point(trained_digits):
    """Issue #7's acceptance: prune 50% FLOPs -> accuracy drops; distillation wins it back (<= 1 point)."""
    model, (xtr, ytr), (xte, yte) = trained_digits
    base = accuracy(model, xte, yte)
    x0 = xte[:8]
    pruned = graphopt.optimize(model, target="torch", pipeline="fold_bn,prune(flops_reduction=0.5)",
                               example_inputs=(x0,))
    flops_kept = pruned.report.final.flops / pruned.report.records[0].flops
    assert flops_kept <= 0.5 + 0.03, flops_kept
    pruned_acc = accuracy(pruned, xte, yte)
    assert pruned_acc < base - 2.0, (base, pruned_acc)

    opt = graphopt.optimize(model, target="torch", example_inputs=(x0,),
                            pipeline="fold_bn,prune(flops_reduction=0.5),distill(epochs=4,lr=0.002,progress=false)",
                            train_data=batches(xtr, ytr, 64, shuffle=True))
    assert opt.report.final.flops == pruned.report.final.flops      # distillation keeps the pruned shapes
    recovered = accuracy(opt, xte, yte)
    assert recovered >= base - 1.0, (base, pruned_acc, recovered)


def test_prune_to_a_quarter_of_the_flops_then_distill_at_defaults_recovers_within_one_point(trained_digits):
    """Issue #16 item 6: at its defaults distill trains until the held-out loss stops improving, so a model
    pruned to ~25% of its FLOPs (near chance) comes back within 1 point of the unpruned model."""
    model, (xtr, ytr), (xte, yte) = trained_digits
    base = accuracy(model, xte, yte)
    x0 = xte[:8]
    pipe = "fold_bn,prune(flops_reduction=0.75)"
    pruned = graphopt.optimize(model, target="torch", pipeline=pipe, example_inputs=(x0,))
    flops_kept = pruned.report.final.flops / pruned.report.records[0].flops
    assert flops_kept <= 0.25 + 0.03, flops_kept
    pruned_acc = accuracy(pruned, xte, yte)
    assert pruned_acc < base - 10.0, (base, pruned_acc)

    opt = graphopt.optimize(model, target="torch", pipeline=pipe + ",distill(progress=false)",
                            example_inputs=(x0,), train_data=batches(xtr, ytr, 64, shuffle=True))
    recovered = accuracy(opt, xte, yte)
    assert recovered >= base - 1.0, (base, pruned_acc, recovered)
    rec = opt.report.records[-1]
    summary, validation = rec.notes[0], rec.notes[1]
    assert "stopped: " in summary and "epochs" in summary, summary
    assert validation.startswith("validation (") and "accuracy" in validation, validation
    epochs = [row["epoch"] for row in rec.details]
    assert epochs == list(range(len(epochs))) and 1 < epochs[-1] <= 50     # one row per epoch, 0 = before


# ---- early stopping and restore-best on a tiny problem (the pass run directly, so its graph can be inspected)
def _tiny(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def _run_distill(teacher, student, data, **options):
    from graphopt.passes.distill import Distill
    from graphopt.pipeline import Context

    gm = torch.fx.symbolic_trace(copy.deepcopy(student))
    x = data[0] if isinstance(data[0], torch.Tensor) else data[0][0]
    ctx = Context(original=teacher, example_inputs=(x,), train_data=data)
    return Distill(progress=False, **options).run(gm, ctx)


def _weights(m):
    return [p.detach().clone() for p in m.parameters()]


def test_holdout_spreads_validation_batches_and_keeps_some_training():
    from graphopt.passes.distill import holdout

    assert holdout([1], 0.1) == ([1], [])               # one batch: nothing to hold out
    assert holdout(list(range(10)), 0.0) == (list(range(10)), [])
    train, val = holdout(list(range(10)), 0.1)
    assert len(val) == 1 and sorted(train + val) == list(range(10))
    train, val = holdout(list(range(20)), 0.2)
    assert len(val) == 4 and val == [2, 7, 12, 17]       # spread evenly, not the tail of a sorted set
    assert holdout([1, 2], 0.9) == ([1], [2])            # never all of it


def test_distill_restores_the_best_weights_when_training_makes_validation_worse():
    """Training batches carry random labels, the held-out batch the teacher's own answers: fitting the noise
    makes the validation loss worse every epoch, so early stopping ends after `patience` epochs and the
    starting weights (epoch 0, the best) come back exactly."""
    from graphopt.passes.distill import holdout

    teacher = _tiny()
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(16, 8, generator=g) for _ in range(4)]
    data = [(x, torch.randint(0, 4, (16,), generator=g)) for x in xs]
    (_, val) = holdout(list(range(len(data))), 0.25)
    for i in val:
        data[i] = (xs[i], teacher(xs[i]).argmax(-1))
    start = _weights(teacher)
    res = _run_distill(teacher, teacher, data, alpha=0.0, lr=0.05, patience=3, val_fraction=0.25)
    summary = res.notes[0]
    assert "trained 3 epochs" in summary and "plateau" in summary, summary
    assert "no epoch improved on the starting weights: kept them" in summary, summary
    assert all(torch.equal(a, b) for a, b in zip(_weights(res.gm), start))
    losses = [row["loss"] for row in res.details]
    assert losses[0] < min(losses[1:]), losses
    # without restore_best the last (worse) weights stay
    res = _run_distill(teacher, teacher, data, alpha=0.0, lr=0.05, patience=3, val_fraction=0.25,
                       restore_best=False)
    assert "kept the last epoch's weights" in res.notes[0]
    assert not all(torch.equal(a, b) for a, b in zip(_weights(res.gm), start))


def test_distill_stops_on_a_plateau_and_keeps_the_best_epoch():
    teacher = _tiny()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.mul_(1 + 0.5 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(32, 8, generator=g) for _ in range(10)]          # unlabelled: teacher only
    res = _run_distill(teacher, student, data, lr=0.01, max_epochs=200)
    summary, validation = res.notes
    assert "plateau: validation loss did not improve for 5 epochs" in summary, summary
    assert "teacher only" in summary and "top-1 agreement with teacher" in validation
    rows = res.details
    kept = min(range(len(rows)), key=lambda i: rows[i]["loss"])
    assert 0 < kept < len(rows) - 1 < 200
    assert f"restored epoch {kept} (best monitored loss)" in summary, summary
    assert rows[kept]["loss"] < 0.5 * rows[0]["loss"]
    # the graph returned is the kept epoch's: its held-out loss is the one recorded for that epoch
    from graphopt.passes.distill import holdout, kd_loss

    _, val = holdout(data, 0.1)
    with torch.no_grad():
        loss = sum(0.9 * kd_loss(res.gm(x), teacher(x), 4.0, "kl").item() * len(x) for x in val) / sum(
            len(x) for x in val)
    assert loss == pytest.approx(rows[kept]["loss"], rel=1e-5)


def test_distill_epochs_and_steps_train_exactly_that_long():
    teacher = _tiny()
    data = [torch.randn(8, 8) for _ in range(5)]                        # 4 train + 1 held out
    res = _run_distill(teacher, _tiny(1), data, epochs=3)
    assert "trained 3 epochs, 12 steps" in res.notes[0] and "epochs=3 done" in res.notes[0]
    res = _run_distill(teacher, _tiny(1), data, steps=6)
    assert "trained 2 epochs, 6 steps" in res.notes[0] and "steps=6 done" in res.notes[0]
    res = _run_distill(teacher, _tiny(1), data[:1], epochs=2)            # one batch: monitored on itself
    assert res.notes[1].startswith("training batches (too few to hold any out)")


def test_distill_reads_a_one_shot_iterator_once():
    teacher = _tiny()
    g = torch.Generator().manual_seed(2)
    data = (torch.randn(8, 8, generator=g) for _ in range(5))          # a generator: iterable only once
    opt = graphopt.optimize(teacher, target="torch", pipeline="distill(epochs=2,progress=false)",
                            example_inputs=(torch.randn(8, 8),), train_data=data)
    assert "trained 2 epochs, 8 steps" in opt.report.final.notes[0]
