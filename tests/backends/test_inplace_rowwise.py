"""inplace_rowwise.inplace_rowwise_calls: a softmax writes over its own input when nothing else reads it."""
from __future__ import annotations

import math

import torch
from torch import nn

import graphopt


class Scores(nn.Module):
    """Attention weights: softmax of q k^T, the scores read by the softmax only, or also by the output."""

    def __init__(self, reuse: bool):
        super().__init__()
        self.q, self.k, self.reuse = nn.Linear(16, 16), nn.Linear(16, 16), reuse

    def forward(self, x):
        s = self.q(x) @ self.k(x).transpose(-2, -1) / math.sqrt(16)
        p = torch.softmax(s, -1)
        return p + s if self.reuse else p


def _main_after_pass(model, x):
    """The Relax main function, legalized, scheduled and with the pass applied."""
    from tvm import relax

    from graphopt.backends.targets import resolve_target
    from graphopt.backends.tvm.inplace_rowwise import inplace_rowwise_calls
    from graphopt.backends.tvm.lower import lower_graph
    from graphopt.backends.tvm.schedules import apply_default_schedules
    from graphopt.backends.tvm.softmax_lower import graphopt_softmax
    from graphopt.capture import capture

    spec = resolve_target("x86")
    mod = lower_graph(capture(model.eval(), (x,)).gm, (x,), spec).mod
    mod, _ = apply_default_schedules(relax.transform.LegalizeOps()(graphopt_softmax()(mod)), spec.tvm_target())
    return inplace_rowwise_calls()(mod)["main"].script()


def test_softmax_of_scores_read_once_runs_in_place():
    text = _main_after_pass(Scores(reuse=False), torch.randn(2, 12, 16))
    assert "call_tir_inplace(softmax_inplace, (" in text and "R.call_tir(softmax" not in text, text


def test_scores_read_again_or_a_parameter_keep_their_own_output():
    assert "call_tir_inplace" not in _main_after_pass(Scores(reuse=True), torch.randn(2, 12, 16))
    assert "call_tir_inplace" not in _main_after_pass(nn.Softmax(-1), torch.randn(2, 12, 16))


def test_a_schedule_that_splits_a_row_over_threads_keeps_its_own_output():
    """One row of two: dlight's Reduction rule takes it and computes each output element on its own thread,
    each reading the whole row: written over its input, a thread would read another's result."""
    model, x = nn.Sequential(nn.Linear(4, 2), nn.Softmax(1)).eval(), torch.randn(1, 4)
    assert "call_tir_inplace" not in _main_after_pass(model, x)
    opt = graphopt.optimize(model, "x86", "cleanup", example_inputs=(x,))
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x), rtol=2e-5, atol=1e-7)


def test_results_and_the_callers_tensor_unchanged():
    torch.manual_seed(0)
    for reuse in (False, True):
        model, x = Scores(reuse).eval(), torch.randn(2, 12, 16)
        opt = graphopt.optimize(model, "x86", "cleanup", example_inputs=(x,))
        with torch.no_grad():
            torch.testing.assert_close(opt(x), model(x), rtol=2e-5, atol=1e-6)
    softmax, x = nn.Softmax(-1).eval(), torch.randn(3, 40)
    keep = x.clone()
    opt = graphopt.optimize(softmax, "x86", "cleanup", example_inputs=(x,))
    torch.testing.assert_close(opt(x), softmax(x), rtol=2e-5, atol=1e-7)
    assert torch.equal(x, keep)                       # a model input is never written over
