"""distill: recovers accuracy lost to compression on real data (scikit-learn's bundled digits)."""
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import graphopt
from graphopt.datasets import DigitsCNN, accuracy, batches, digits, train_classifier
from graphopt.errors import CalibrationError
from tests.helpers import WeightNoise  # noqa: F401  (registers test_weight_noise)


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
