"""Mixed precision (quantize(bits=mixed)): the exact allocation (vs brute force), budgets and their typed errors,
the mixed graph against its per-layer dequantized reference (PyTorch) and its compiled build against the mixed
graph, both sensitivity methods, and the per-layer latency costs from compiled kernels.
"""
from __future__ import annotations

import re

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

import graphopt
from graphopt.errors import BudgetError
from graphopt.pipeline import Pipeline
from graphopt.quant.allocate import allocate, brute_force, parse_budget, parse_budgets
from graphopt.quant.mixed import CHOICES, MixedBuilder, dequantized_weight, mean_error, supported_choices
from graphopt.quant.sensitivity import hessian_sensitivity, output_sensitivity


# ------------------------------------------------------------------------------------------- allocation
@st.composite
def problems(draw):
    n_layers = draw(st.integers(1, 5))
    costs = []
    for _ in range(n_layers):
        k = draw(st.integers(1, 4))
        costs.append([{"size": float(draw(st.integers(1, 1000))),
                       "error": draw(st.floats(0.0, 1.0, allow_nan=False, allow_infinity=False)),
                       "latency": draw(st.floats(0.01, 5.0, allow_nan=False, allow_infinity=False))}
                      for _ in range(k)])
    kinds = draw(st.lists(st.sampled_from(["size", "error", "latency"]), min_size=1, max_size=2, unique=True))
    limits = {}
    for kind in kinds:
        lo = sum(min(c[kind] for c in layer) for layer in costs)
        hi = sum(max(c[kind] for c in layer) for layer in costs)
        # from a little below the least reachable (infeasible) to the most
        limits[kind] = lo + (hi - lo) * draw(st.floats(-0.05, 1.0)) if hi > lo else lo
    objective = draw(st.sampled_from([k for k in ("size", "error", "latency") if k not in kinds]))
    return costs, limits, objective


@settings(max_examples=150, deadline=None)
@given(problems())
# a budget one rounding below the only cheap-enough choice's cost: the oracle and allocate() agree it is met
@example(problem=([[{"size": 1.0, "error": 0.0, "latency": 4.0}, {"size": 2.0, "error": 0.0, "latency": 1.0}]],
                  {"size": 1.0, "latency": 3.9999999999999996}, "error"))
# budgets a few ulps below a reachable total (found by hypothesis): met, as the oracle says, in allocate()'s
# infeasibility check (1), its solver's slack (2: optimal, 3: feasible at all) alike
@example(problem=([[{"size": 1.0, "error": 0.0, "latency": 1.0}, {"size": 1.0, "error": 0.0, "latency": 2.0}]],
                  {"size": 1.0, "latency": 0.9999999999967333}, "error"))
@example(problem=([[{"size": 1.0, "error": 0.0, "latency": 1.0}, {"size": 1.0, "error": 1.0, "latency": 0.5}]],
                  {"size": 1.0, "error": 0.9999999999967333}, "latency"))
@example(problem=([[{"size": 1.0, "error": 0.0, "latency": 1.0}],
                   [{"size": 1.0, "error": 0.0, "latency": 1.5}, {"size": 1.0, "error": 0.0, "latency": 1.0}]],
                  {"size": 2.0, "latency": 1.9999999999983666}, "error"))
def test_allocation_respects_budgets_and_equals_brute_force(problem):
    costs, limits, objective = problem
    best = brute_force(costs, limits, objective)
    if best is None:
        with pytest.raises(BudgetError):
            allocate(costs, limits, objective)
        return
    pick = allocate(costs, limits, objective, secondary="size" if objective != "size" else "error")
    assert len(pick) == len(costs) and all(0 <= j < len(layer) for j, layer in zip(pick, costs))
    for kind, limit in limits.items():
        assert sum(costs[i][j][kind] for i, j in enumerate(pick)) <= limit * (1 + 1e-9) + 1e-12
    got = sum(costs[i][j][objective] for i, j in enumerate(pick))
    spread = sum(max(c[objective] for c in layer) - min(c[objective] for c in layer) for layer in costs)
    assert got <= best[0] + 1e-6 * max(spread, 1e-12)


def test_allocation_picks_the_trade_a_knapsack_would():
    # two layers: spending the size on the sensitive one is the only optimum
    costs = [[{"size": 4, "error": 0.0}, {"size": 1, "error": 0.5}],
             [{"size": 4, "error": 0.0}, {"size": 1, "error": 0.01}]]
    assert allocate(costs, {"size": 5}, "error") == [0, 1]
    assert allocate(costs, {"error": 0.2}, "size") == [0, 1]


# --------------------------------------------------------------------------------------------- budgets
@pytest.mark.parametrize("text, match", [
    ("size:3", r"size:3.*fraction"), ("speed:0.5", r"speed:0.5.*unknown kind"), ("size:-1", r"size:-1"),
    ("size:2parsecs", r"size:2parsecs.*unit"), ("error:0.1ms", r"error:0.1ms.*without a unit"),
    ("latency", r"'latency'"), ("latency:0", r"latency:0.*> 0"),
])
def test_bad_budget_text_is_a_typed_error_naming_it(text, match):
    with pytest.raises(BudgetError, match=match):
        parse_budget(text)
    with pytest.raises(BudgetError, match=match):
        Pipeline.parse(f"quantize(bits=mixed,budget=\"{text}\")")


def test_budget_forms():
    assert parse_budget("size:0.25").relative and parse_budget("size:0.25").limit(1000) == 250
    assert parse_budget("size:3MB").limit(1) == 3e6 and parse_budget("size:2KiB").value == 2048
    assert parse_budget("latency:1500us").value == pytest.approx(1.5)
    assert [b.kind for b in parse_budgets({"size": 0.5, "error": 0.01})] == ["size", "error"]
    with pytest.raises(BudgetError, match="size is given more than once"):
        parse_budgets(["size:0.5", "size:1MB"])
    with pytest.raises(BudgetError, match="needs a budget"):
        graphopt.passes.quantize.Quantize(bits="mixed")
    with pytest.raises(ValueError, match="need bits=mixed"):
        graphopt.passes.quantize.Quantize(budget=["size:0.5"])
    p = Pipeline.parse("quantize(bits=mixed,budget=[size:0.3,error:0.05],sensitivity=hessian)")
    assert Pipeline.parse(str(p)) == p


def test_choices_per_target():
    assert supported_choices("x86", "linear") == list(CHOICES)
    assert supported_choices("arm", "linear") == list(CHOICES)
    assert "int4_weight_only" not in supported_choices("cuda", "linear")
    assert supported_choices("x86", "conv2d") == ["float32", "int8_static"]


# ------------------------------------------------------------------------------------------ mixed graphs
class Net(nn.Module):
    """A conv, six Linear layers and an activation x activation matmul: room for every choice."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.ModuleList([nn.Linear(64, 64) for _ in range(5)] + [nn.Linear(64, 10)])

    def forward(self, x):
        h = torch.relu(self.conv(x)).flatten(2)          # [B, 8, 64]
        for f in self.fc[:-1]:
            h = torch.relu(f(h))
        a = torch.matmul(h, h.transpose(1, 2)) / 8.0     # [B, 8, 8]
        return self.fc[-1](h).sum(1) + a.mean((1, 2)).unsqueeze(1)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    model = Net().eval()
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(2, 3, 8, 8, generator=g) for _ in range(4)]
    return model, calib


@pytest.fixture(scope="module")
def builder(net):
    from graphopt.capture import capture
    from graphopt.analysis.shapes import propagate_shapes

    model, calib = net
    gm = capture(model, (calib[0],)).gm
    propagate_shapes(gm, (calib[0],))
    return MixedBuilder(gm, [(c,) for c in calib], target="x86", dtype="uint8", group_size=32)


def _every_choice(builder) -> dict[str, str]:
    """An assignment using every choice at least once (the Linear layers take the six in turn)."""
    out, i = {}, 0
    for path in builder.layers:
        ch = builder.choices[path]
        out[path] = ch[-1] if builder.kinds[path] != "linear" else CHOICES[i % len(CHOICES)]
        i += builder.kinds[path] == "linear"
    return out


def test_mixed_graph_matches_its_per_layer_dequantized_reference(builder, net):
    model, calib = net
    assign = _every_choice(builder)
    assert set(assign.values()) == set(CHOICES)
    mixed = builder.build(assign)
    ref = builder.build({})                                  # float graph, then weights and inputs replaced
    import copy

    ref = copy.deepcopy(ref)
    handles = []
    for path, choice in assign.items():
        mod = ref.get_submodule(path)
        w = dequantized_weight(builder.module(path, choice))
        if w is not None:
            with torch.no_grad():
                mod.weight.copy_(w)
        bias = getattr(builder.module(path, choice), "bias", None)      # int8 static: bias-corrected
        if bias is not None:
            mod.bias = torch.nn.Parameter(bias.detach().clone(), requires_grad=False)

        def pre(m, args, path=path, choice=choice):
            return tuple(q if (q := builder.quantize_input(path, choice, i, a)) is not None else a
                         for i, a in enumerate(args))
        handles.append(mod.register_forward_pre_hook(pre))
    for x in calib:
        with torch.no_grad():
            got, want, flt = mixed(x), ref(x), model(x)
        scale = want.abs().max()
        assert (got - want).abs().max() <= 1e-4 * scale            # float rounding of the sums, not a step
        assert (got - flt).abs().max() > 1e-4 * scale               # ... and the choices did change the model
    for h in handles:
        h.remove()


def test_mixed_graph_compiled_matches_the_mixed_graph(builder, net):
    from graphopt.backends.targets import resolve_target
    from graphopt.backends.tvm import compile_graph

    _, calib = net
    mixed = builder.build(_every_choice(builder))
    compiled = compile_graph(mixed, (calib[0],), resolve_target("x86"))
    for x in calib:
        with torch.no_grad():
            want = mixed(x)
        assert torch.allclose(compiled(x), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_hessian_estimate_tracks_the_measured_error(builder, net):
    _, calib = net
    batches = [(c,) for c in calib]
    refs = [builder.float_gm(*b) for b in batches]
    measured = output_sensitivity(builder, batches, refs)
    predicted, traces = hessian_sensitivity(builder, batches, refs, samples=8)
    assert set(traces) == {p for p in builder.layers if builder.kinds[p] != "matmul"}
    assert all(t >= 0 for t in traces.values())
    ratios = [predicted[k] / measured[k] for k in measured if measured[k] > 0]
    assert ratios
    med = sorted(ratios)[len(ratios) // 2]
    assert 0.33 < med < 3.0, ratios
    # and both rank int4 weight-only as the most harmful weight-only choice on every Linear layer
    for p in builder.layers:
        if builder.kinds[p] == "linear":
            assert measured[(p, "int4_weight_only")] > measured[(p, "int8_weight_only")]
            assert predicted[(p, "int4_weight_only")] > predicted[(p, "int8_weight_only")]


# ------------------------------------------------------------------------------------------ the pass
@pytest.mark.parametrize("sensitivity", ["output", "hessian"])
def test_pass_meets_an_error_budget_and_is_smaller(net, sensitivity):
    model, calib = net
    budget = 0.02
    opt = graphopt.optimize(model, "torch", f"quantize(bits=mixed,budget=error:{budget},sensitivity={sensitivity},"
                            f"group_size=32,progress=false)", example_inputs=(calib[0],), calibration=calib)
    refs = [model(c) for c in calib]
    err = mean_error(opt, [(c,) for c in calib], refs)
    assert err <= budget
    assert opt.report.final.size_bytes < 0.5 * opt.report.records[0].size_bytes
    rows = opt.report.records[-1].details
    assert {r["layer"] for r in rows} == {"conv", "fc.0", "fc.1", "fc.2", "fc.3", "fc.4", "fc.5", "matmul0"}
    assert all(r["why"] and r["choice"] for r in rows)
    assert any("conv (conv2d):" in n for n in opt.report.records[-1].notes)


def test_pass_meets_a_size_budget_with_the_least_error(net):
    model, calib = net
    orig = None
    errs = []
    for frac in (0.5, 0.3, 0.2):
        opt = graphopt.optimize(model, "torch", f"quantize(bits=mixed,budget=size:{frac},group_size=32,progress=false)",
                                example_inputs=(calib[0],), calibration=calib)
        orig = opt.report.records[0].size_bytes
        assert opt.report.final.size_bytes <= frac * orig
        errs.append(mean_error(opt, [(c,) for c in calib], [model(c) for c in calib]))
    assert errs[0] <= errs[1] * 1.05 and errs[1] <= errs[2] * 1.05        # less room, no less error


def test_unreachable_budget_names_it(net):
    model, calib = net
    with pytest.raises(BudgetError, match=r"size:0.01.*cannot be smaller than"):
        graphopt.optimize(model, "torch", "quantize(bits=mixed,budget=size:0.01,progress=false)",
                          example_inputs=(calib[0],), calibration=calib)
    with pytest.raises(BudgetError, match=r"latency.*compiled target"):
        graphopt.optimize(model, "torch", "quantize(bits=mixed,budget=latency:0.5,progress=false)",
                          example_inputs=(calib[0],), calibration=calib)
    with pytest.raises(BudgetError, match="objective=size is also budgeted"):
        graphopt.optimize(model, "torch", "quantize(bits=mixed,budget=size:0.5,objective=size,progress=false)",
                          example_inputs=(calib[0],), calibration=calib)


def test_why_names_a_choice_over_the_whole_budget_by_itself(net):
    """A budget no quantized choice fits on its own keeps every layer float32, and each layer's reason says
    that (not that the budget buys more elsewhere: nothing else bought anything)."""
    model, calib = net
    opt = graphopt.optimize(model, "torch", "quantize(bits=mixed,budget=error:1e-9,progress=false)",
                            example_inputs=(calib[0],), calibration=calib)
    rows = opt.report.records[-1].details
    assert rows and all(r["choice"] == "fp32" for r in rows), rows
    weighted = [r for r in rows if r["float_bytes"] > 0]        # (an activation matmul has nothing to save)
    assert weighted
    for r in weighted:
        assert re.search(r"more than the whole error budget by itself \(err [0-9.e-]+ > err 1e-09\)", r["why"]), r
    assert not any("elsewhere" in r["why"] for r in rows), rows


def test_latency_costs_come_from_compiled_kernels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 16)).eval()
    calib = [torch.randn(1, 128) for _ in range(2)]
    opt = graphopt.optimize(model, "x86", "quantize(bits=mixed,budget=[latency:50ms,size:0.5],progress=false)",
                            example_inputs=(calib[0],), calibration=calib)
    rows = opt.report.records[-1].details
    assert len(rows) == 2 and all(r["ms"] > 0 for r in rows)
    assert opt.report.final.size_bytes <= 0.5 * opt.report.records[0].size_bytes
    with torch.no_grad():
        assert torch.allclose(opt(calib[1]), opt.graph_module(calib[1]), rtol=1e-4, atol=1e-4)


def test_latency_costs_are_timed_in_the_compile_precision(monkeypatch):
    """optimize(precision=...) reaches the per-layer timings (precision="high" runs other int4 GEMVs on
    AVX512-BF16 CPUs, so its latency costs must come from those): every layer is compiled in that precision."""
    import graphopt.backends.tvm as backend
    from graphopt.backends.tvm import layer_latency

    seen, real = [], backend.compile_graph

    def spy(*args, **kwargs):
        seen.append(kwargs.get("precision", "float32"))
        return real(*args, **kwargs)

    monkeypatch.setattr(backend, "compile_graph", spy)
    layer_latency.clear_cache()                         # measure here, not from an earlier test's layers
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 16)).eval()
    calib = [torch.randn(1, 128) for _ in range(2)]
    graphopt.optimize(model, "x86", "quantize(bits=mixed,budget=latency:50ms,progress=false)",
                      example_inputs=(calib[0],), calibration=calib, precision="high")
    assert len(seen) > 2 and set(seen) == {"high"}
