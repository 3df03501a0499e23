"""Random networks (graphopt.testing.random_models) through the passes and the x86 backend (issue 16 item 5).

A handful here, one pipeline each; `python benchmarks/fuzz.py --count 500 --seed S` runs the rest."""
import itertools

import pytest
import torch
from torch import fx

from graphopt.errors import LoweringError, PassError
from graphopt.testing import fuzz
from graphopt.testing.random_models import random_model


def test_random_models_are_determined_by_their_seed():
    a, b = random_model(7), random_model(7)
    assert a.describe == b.describe
    assert all(torch.equal(p, q) for p, q in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    assert torch.equal(a.inputs[0], b.inputs[0])
    assert random_model(8).describe != a.describe
    torch.testing.assert_close(a.fresh_inputs(), b.fresh_inputs())


def test_random_models_cover_the_layer_kinds_and_are_traceable():
    texts = []
    for seed in range(40):
        rm = random_model(seed)
        out = rm.model(*rm.inputs)
        outs = out if isinstance(out, tuple) else (out,)
        assert all(torch.isfinite(t).all() for t in outs), rm.describe
        fx.symbolic_trace(rm.model)
        texts.append(rm.describe)
    text = " ".join(texts)
    for feature in ("conv1x1", "conv3x3", "conv5x5", ",s2", ",d2", "res[", "cat[", "split[", "chunk[", "+bn",
                    "+gn", " ln ", "mha(", "sdpa(", "causal", "se(", "pool2", "linear(", "mlp(", "to_seq",
                    "head:gap", "head:flatten", "head:tokens", "+aux", "+gelu", "+hardswish", "+silu"):
        assert feature in text, feature
    assert any(f"({c}->{c},g{c})" in text for c in range(2, 64)), "no depthwise conv"
    assert any(f",g{g})" in text and f"({c}->" in text for g in (2, 3, 4) for c in range(4, 64)), "no grouped conv"


# (seed, pipeline): eight models, each pipeline twice. The default run keeps one model per pipeline (the cheaper
# of each pair: seeds 0, 1, 2, 7, ~12 s here); `-m slow` runs the other four too (seed 5 with prune alone ~18 s).
CASES = list(zip(range(8), itertools.cycle(fuzz.PIPELINES)))
DEFAULT_SEEDS = (0, 1, 2, 7)
assert {p for s, p in CASES if s in DEFAULT_SEEDS} == set(fuzz.PIPELINES)      # every pipeline in the default run


@pytest.mark.parametrize("seed,pipeline", [c if c[0] in DEFAULT_SEEDS else pytest.param(*c, marks=pytest.mark.slow)
                                           for c in CASES], ids=[f"{s}-{p}" for s, p in CASES])
def test_random_model_compiles_and_matches_eager(seed, pipeline):
    o = fuzz.check(random_model(seed), pipeline, target="x86")
    assert o.status == "matched", f"{o.status} {o.kind}: {o.message}\nmodel: {o.describe}\n{o.trace}"


class _Fake:
    def __init__(self, graph_module, call):
        self.graph_module, self._call = graph_module, call

    def __call__(self, *args):
        return self._call(*args)


@pytest.mark.parametrize("behaviour,status,kind", [
    ("off_by_a_bit", "wrong", "compiled vs eager graph"),
    ("wrong_shape", "wrong", "structure"),
    ("lowering_error", "typed", "LoweringError"),
    ("pass_bug", "typed", "PassError(IndexError)"),
    ("value_error", "crash", "ValueError"),
])
def test_check_classifies_outcomes(monkeypatch, behaviour, status, kind):
    rm = random_model(1)

    def fake_optimize(rm_, pipeline, target, calibration, dynamic=None):
        gm = fx.symbolic_trace(rm_.model)
        if behaviour == "lowering_error":
            raise LoweringError("TVM cannot lower 1 node(s): aten.foo (node foo_1)")
        if behaviour == "pass_bug":
            try:
                [][1]
            except IndexError as e:
                raise PassError("prune", f"IndexError: {e}") from e
        if behaviour == "value_error":
            raise ValueError("boom")
        if behaviour == "wrong_shape":
            return _Fake(gm, lambda *a: torch.zeros(3))
        return _Fake(gm, lambda *a: tuple(t * 1.01 for t in gm(*a)) if isinstance(gm(*a), tuple) else gm(*a) * 1.01)

    monkeypatch.setattr(fuzz, "graphopt_optimize", fake_optimize)
    o = fuzz.check(rm, "prune")
    assert (o.status, o.kind) == (status, kind), o
    assert fuzz.summarize([o])[status] == 1


# Seed 8 (linear layers and an attention block, ~3 s here) in the default run; seed 5 (five attention and linear
# blocks, ~13 s), where the bug below was found, and seed 4 under -m slow. Both 5 and 8 fail on that bug.
@pytest.mark.parametrize("seed,pipeline", [(8, "prune"), pytest.param(5, "prune", marks=pytest.mark.slow),
                                           pytest.param(4, "quantize", marks=pytest.mark.slow)])
def test_random_model_with_dynamic_shapes_compiles_and_matches_at_other_sizes(seed, pipeline):
    """One build over batch 1-4 (and the sequence length), checked at three other sizes. Seed 5 (attention
    blocks, prune then cleanup) once failed the pass manager's own check: cleanup, an exact pass, was compared at
    the other sizes with the ORIGINAL model's outputs, so it 'changed' them by what prune had."""
    o = fuzz.check(random_model(seed), pipeline, target="x86", dynamic=True)
    assert o.status == "matched", (o.kind, o.message, o.describe)
    assert o.pipeline == f"{pipeline}+dyn"


def test_idioms_write_the_same_layers():
    """random_model(seed, idioms=True): in-place activations and keyword calls compute what the plain model does
    (a residual block applied twice is a different network, marked "(same)"), and all three idioms occur."""
    texts = []
    for seed in range(40):
        plain, idiom = random_model(seed), random_model(seed, idioms=True)
        assert torch.equal(plain.inputs[0], idiom.inputs[0])
        fx.symbolic_trace(idiom.model)
        texts.append(idiom.describe)
        if "(same)" not in idiom.describe:
            with torch.no_grad():
                a, b = plain.model(*plain.inputs), idiom.model(*idiom.inputs)
            for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
                torch.testing.assert_close(x, y)
    text = " ".join(texts)
    assert "(same)" in text and "[in-place]" in text and "[input=]" in text


# Idioms in the default run: seed 44 with the default pipeline (cleanup dropped its in-place activations as dead
# code and refused the model: "declared exact but changed the outputs"), seed 16 with quantize (a block applied
# twice, in-place activations, keyword calls through the int8 lowering). The int8 graphs' own accuracy is checked
# against the plain twin below.
IDIOM_CASES = [(16, "quantize"), (44, "default"), pytest.param(12, "prune", marks=pytest.mark.slow),
               pytest.param(37, "lowrank", marks=pytest.mark.slow),
               pytest.param(30, "quantize", marks=pytest.mark.slow)]


@pytest.mark.parametrize("seed,pipeline", IDIOM_CASES)
def test_random_model_with_idioms_compiles_and_matches_eager(seed, pipeline):
    o = fuzz.check(random_model(seed, idioms=True), pipeline, target="x86")
    assert o.status == "matched", f"{o.status} {o.kind}: {o.message}\nmodel: {o.describe}\n{o.trace}"


@pytest.mark.parametrize("seed", [16, 30, 0])
def test_int8_of_idioms_equals_int8_of_the_plain_twin(seed):
    """Static int8 of a network with idioms and of the same network written plainly (shared block copied,
    activations out of place) must agree to float rounding: both get the same qparams, GPTQ off, bias
    corrections per call. Before the call-site analyses and the in-place rewrite they differed by 0.8%, 3.2%
    and 0.4% of max |output| (seeds 16, 30, 0)."""
    import graphopt
    from graphopt.testing.random_models import without_idioms

    rm = random_model(seed, idioms=True)
    calib = [rm.fresh_inputs(seed=10 + i) for i in range(4)]
    x = rm.fresh_inputs()
    outs = []
    for model in (rm.model, without_idioms(rm.model)):
        opt = graphopt.optimize(model, "torch", "fold_bn,quantize(weight_rounding=nearest,progress=false)",
                                example_inputs=rm.inputs, calibration=calib)
        outs.append(opt(*x))
    a, b = (o if isinstance(o, tuple) else (o,) for o in outs)
    for p, q in zip(a, b):
        assert (p - q).abs().max() <= 1e-5 * q.abs().max(), rm.describe
