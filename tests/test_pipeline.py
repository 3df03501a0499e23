"""Pass registry, pipeline text round-trip, and the pass manager's instrumentation and checks."""
from dataclasses import dataclass
from typing import Literal

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx, nn

import graphopt
from graphopt.errors import PassError, PipelineError
from graphopt.pipeline import Context, Pass, PassManager, PassResult, Pipeline, register_pass


# ---------------------------------------------------------------- a user pass, registered from outside the package
@register_pass("test_scale_options")
@dataclass
class ScaleOptions(Pass):
    """Test-only pass with one option of every supported type; changes nothing."""

    ratio: float = 0.5
    count: int = 3
    flag: bool = False
    mode: Literal["l1", "l2", "taylor"] = "l1"
    name_: str = "x"
    patterns: list[str] | None = None
    limit: float | None = None

    def run(self, gm, ctx):
        return PassResult(gm, changed=False)


@register_pass("test_relu_to_gelu")
@dataclass
class ReluToGelu(Pass):
    """Test-only user pass: swaps ReLU modules for GELU. Declared approximate."""

    exact = False

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        n = 0
        for node in gm.graph.nodes:
            if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.ReLU):
                parent, _, attr = node.target.rpartition(".")
                setattr(gm.get_submodule(parent) if parent else gm, attr, nn.GELU())
                n += 1
        return PassResult(gm, details=[{"replaced": n}])


@register_pass("test_lying_exact")
@dataclass
class LyingExact(Pass):
    """Test-only: claims exactness but scales the first Linear's weight."""

    def run(self, gm, ctx):
        for m in gm.modules():
            if isinstance(m, nn.Linear):
                m.weight = nn.Parameter(m.weight * 1.5)
                break
        return PassResult(gm)


@register_pass("test_breaks_graph")
@dataclass
class BreaksGraph(Pass):
    """Test-only: replaces a Linear by one with the wrong input width."""

    def run(self, gm, ctx):
        for node in gm.graph.nodes:
            if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Linear):
                parent, _, attr = node.target.rpartition(".")
                setattr(gm.get_submodule(parent) if parent else gm, attr, nn.Linear(3, 4))
                break
        return PassResult(gm)


@register_pass("test_raises")
@dataclass
class Raises(Pass):
    def run(self, gm, ctx):
        raise RuntimeError("boom")


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


# ----------------------------------------------------------------------------------------- text form
def test_parse_and_str_round_trip():
    p = Pipeline.parse("fold_bn, test_scale_options(ratio=0.25,count=7,flag=true,mode=taylor,"
                       "patterns=[fc*,'layer 1.*'],limit=none), cleanup")
    assert [x.name for x in p] == ["fold_bn", "test_scale_options", "cleanup"]
    opts = p.passes[1]
    assert (opts.ratio, opts.count, opts.flag, opts.mode, opts.patterns, opts.limit) == (
        0.25, 7, True, "taylor", ["fc*", "layer 1.*"], None)
    assert Pipeline.parse(str(p)) == p
    assert str(Pipeline.parse("fold_bn")) == "fold_bn"
    assert Pipeline.parse("") == Pipeline([])


def test_coerce_accepts_data_forms():
    a = Pipeline.coerce([{"name": "test_scale_options", "ratio": 0.1}, "cleanup"])
    b = Pipeline.parse("test_scale_options(ratio=0.1),cleanup")
    assert a == b
    assert Pipeline.coerce(a.to_data()) == a
    assert Pipeline.coerce(a) is a


def test_int_given_for_float_option_is_accepted():
    assert Pipeline.parse("test_scale_options(ratio=1)").passes[0].ratio == 1.0


@pytest.mark.parametrize("text, fragment", [
    ("nosuchpass", "unknown pass 'nosuchpass'; registered passes: "),
    ("fold_bn(nosuch=1)", "has no option 'nosuch'"),
    ("test_scale_options(count=1.5)", "is not an integer"),
    ("test_scale_options(flag=3)", "is not true/false"),
    ("test_scale_options(mode=l3)", "is not one of l1, l2, taylor"),
    ("test_scale_options(ratio=0.1", "expected ')'"),
    ("test_scale_options(ratio=0.1,ratio=0.2)", "given twice"),
    ("fold_bn cleanup", "expected ','"),
    ("test_scale_options(name_='abc)", "unterminated string"),
])
def test_bad_pipeline_text_errors(text, fragment):
    with pytest.raises(PipelineError) as e:
        Pipeline.parse(text)
    assert fragment in str(e.value)


def test_unknown_pass_error_lists_registered_passes():
    with pytest.raises(PipelineError) as e:
        Pipeline.parse("nosuchpass")
    assert "fold_bn" in str(e.value) and "cleanup" in str(e.value)


def test_register_pass_rejects_name_clash_and_non_passes():
    with pytest.raises(PipelineError, match="already registered"):
        @register_pass("fold_bn")
        @dataclass
        class Other(Pass):
            pass
    with pytest.raises(PipelineError, match="subclass of graphopt.Pass"):
        register_pass("not_a_pass")(int)


_words = st.from_regex(r"[a-z][a-z0-9_]{0,6}", fullmatch=True).filter(
    lambda s: s not in ("true", "false", "none", "null", "inf", "nan"))
_texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)


@settings(max_examples=200, deadline=None)
@given(ratio=st.floats(allow_nan=False, allow_infinity=False, width=64), count=st.integers(-10**12, 10**12),
       flag=st.booleans(), mode=st.sampled_from(["l1", "l2", "taylor"]), name_=_texts,
       patterns=st.none() | st.lists(_texts | _words, max_size=4),
       limit=st.none() | st.floats(allow_nan=False, width=64))
def test_round_trip_property(ratio, count, flag, mode, name_, patterns, limit):
    p = Pipeline([graphopt.pipeline.make_pass("test_scale_options", dict(
        ratio=ratio, count=count, flag=flag, mode=mode, name_=name_, patterns=patterns, limit=limit)),
        graphopt.pipeline.make_pass("fold_bn")])
    again = Pipeline.parse(str(p))
    assert again == p, str(p)


# ------------------------------------------------------------------------------------- pass manager
def _ctx_and_gm(model, x):
    ctx = Context(original=model, example_inputs=(x,))
    return ctx, fx.symbolic_trace(model)


def test_user_pass_runs_like_builtin_and_is_measured():
    model, x = Small().eval(), torch.randn(5, 8)
    opt = graphopt.optimize(model, target="torch", pipeline="fold_bn,test_relu_to_gelu,cleanup",
                            example_inputs=(x,))
    names = [r.name for r in opt.report.records]
    assert names == ["(original)", "fold_bn", "test_relu_to_gelu", "cleanup"]
    rec = opt.report.records[2]
    assert not rec.exact and rec.max_abs > 0 and rec.details == [{"replaced": 1}]
    expected = model.fc2(torch.nn.functional.gelu(model.fc1(x)))
    torch.testing.assert_close(opt(x), expected)
    assert "test_relu_to_gelu" in graphopt.available_passes()
    # the user's model is untouched
    assert isinstance(model.act, nn.ReLU)


def test_report_counts_params_and_flops():
    model, x = Small().eval(), torch.randn(5, 8)
    opt = graphopt.optimize(model, target="torch", pipeline="cleanup", example_inputs=(x,))
    rec = opt.report.records[0]
    assert rec.params == 8 * 16 + 16 + 16 * 4 + 4
    assert rec.flops == 2 * 5 * (8 * 16 + 16 * 4)
    assert "(original)" in opt.report.table() and "cleanup" in opt.report.table()
    again = graphopt.report.Report.from_dict(opt.report.to_dict())
    assert again.to_dict() == opt.report.to_dict()


def test_exact_pass_that_changes_outputs_fails_with_its_name():
    ctx, gm = _ctx_and_gm(Small().eval(), torch.randn(2, 8))
    with pytest.raises(PassError) as e:
        PassManager("test_lying_exact").run(gm, ctx)
    assert e.value.pass_name == "test_lying_exact" and "declared exact" in str(e.value)


def test_pass_that_breaks_the_graph_fails_with_its_name():
    ctx, gm = _ctx_and_gm(Small().eval(), torch.randn(2, 8))
    with pytest.raises(PassError) as e:
        PassManager("test_breaks_graph").run(gm, ctx)
    assert "test_breaks_graph" in str(e.value) and "does not run" in str(e.value)


def test_pass_that_raises_fails_with_its_name():
    ctx, gm = _ctx_and_gm(Small().eval(), torch.randn(2, 8))
    with pytest.raises(PassError, match="pass 'test_raises': RuntimeError: boom"):
        PassManager("test_raises").run(gm, ctx)
