"""A layer called at two places of a model (one nn.Linear / nn.Conv2d object applied twice) quantizes as two
layers with the same weights would: each call gets its own input qparams (quant.graph._unshare gives it a path
of its own), and every analysis of one layer's input or output (bias correction, the report's per-layer error,
Hessian traces, the inputs timed for a latency budget) sees that call alone (graphopt.analysis.call_sites).
With module hooks, bias correction saw both calls of such a layer: a Linear applied to x and to 20·a came out at
cosine 0.87 with float32 (two separate Linears: 0.9996)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import graphopt
from graphopt.analysis.call_sites import paths_by_module, run_with_site_hooks
from graphopt.analysis.shapes import propagate_shapes
from graphopt.capture import capture
from graphopt.quant import QuantConv2d, QuantLinear
from graphopt.quant.mixed import MixedBuilder


class Twice(nn.Module):
    """`first` applied to x, then `second` to 20x its output: `second` is `first` itself (shared=True) or a
    separate layer with the same weights. The two calls see inputs of very different ranges."""

    def __init__(self, kind: str, shared: bool):
        super().__init__()
        torch.manual_seed(0)
        make = (lambda: nn.Linear(32, 32)) if kind == "linear" else (lambda: nn.Conv2d(4, 4, 3, padding=1))
        self.first = make()
        self.head = nn.Linear(32 if kind == "linear" else 4, 5)
        self.pool = kind == "conv2d"
        self.second = self.first if shared else make()
        if not shared:
            self.second.load_state_dict(self.first.state_dict())

    def forward(self, x):
        y = torch.relu(self.second(self.first(x) * 20.0))
        return self.head(y.mean((2, 3)) if self.pool else y)


def _data(kind: str, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    shape = (8, 32) if kind == "linear" else (2, 4, 6, 6)
    return [(torch.randn(shape, generator=g),) for _ in range(n)]


def _cos(a, b) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), 0))


@pytest.mark.parametrize("kind,capture_method", [("linear", "symbolic_trace"), ("conv2d", "symbolic_trace"),
                                                 ("linear", "export")])
def test_static_int8_of_a_layer_called_twice_equals_two_layers_with_its_weights(kind, capture_method):
    calib, (x,) = _data(kind, 8, 1), _data(kind, 1, 2)[0]
    built = {}
    for shared in (True, False):
        model = Twice(kind, shared).eval()
        built[shared] = graphopt.optimize(model, "torch", "quantize(bits=8,progress=false)", example_inputs=(x,),
                                          calibration=calib, capture_method=capture_method)
    got, want = built[True](x), built[False](x)
    assert torch.equal(got, want)
    with torch.no_grad():
        assert _cos(got, Twice(kind, True).eval()(x)) > 0.999
    # each call its own integer module, input scale and bias correction, as the separate layers have
    qcls = QuantLinear if kind == "linear" else QuantConv2d
    mods = {s: [m for m in b.graph_module.modules() if isinstance(m, qcls)] for s, b in built.items()}
    assert len(mods[True]) == len(mods[False]) == (3 if kind == "linear" else 2)
    for a, b in zip(mods[True], mods[False]):
        assert a.x_qparams == b.x_qparams and torch.equal(a.bias, b.bias)
    assert mods[True][0].x_qparams.scale != mods[True][1].x_qparams.scale
    # and the report's per-layer errors are each call's own
    errs = {s: [d["out_err"] for d in b.report.records[-1].details] for s, b in built.items()}
    assert errs[True] == errs[False]


def test_compiled_int8_of_a_layer_called_twice_matches_two_layers():
    """On the host's int8 path. Nearest rounding: where the path takes 7-bit weights (AVX2), GPTQ rounds a weight
    from the inputs of all its calls, once (graphopt.quant.gptq.accumulators), two separate layers each from
    their own."""
    calib, (x,) = _data("linear", 8, 1), _data("linear", 1, 2)[0]
    pipeline = "quantize(bits=8,weight_rounding=nearest,progress=false)"
    got, want = (graphopt.optimize(Twice("linear", s).eval(), "x86", pipeline, example_inputs=(x,),
                                   calibration=calib)(x) for s in (True, False))
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def _builder(model, calib):
    gm = capture(model, calib[0]).gm
    propagate_shapes(gm, calib[0])
    return MixedBuilder(gm, calib, target="x86", dtype="uint8", group_size=32)


def test_mixed_precision_analyses_see_each_call_alone():
    from graphopt.backends.tvm.layer_latency import layer_inputs
    from graphopt.quant.sensitivity import hessian_sensitivity

    calib = _data("linear", 4, 1)
    shared, separate = _builder(Twice("linear", True).eval(), calib), _builder(Twice("linear", False).eval(), calib)
    assert len(shared.layers) == len(separate.layers) == 3
    assert shared.units == paths_by_module(shared.float_gm, shared.layers) == [shared.layers[:2], shared.layers[2:]]
    assert separate.units == [[p] for p in separate.layers]
    ins = [layer_inputs(b, calib[0]) for b in (shared, separate)]
    for p, q in zip(shared.layers, separate.layers):
        assert torch.equal(ins[0][p][0], ins[1][q][0])
    assert not torch.equal(ins[0][shared.layers[0]][0], ins[0][shared.layers[1]][0])
    refs = [shared.float_gm(*b) for b in calib]
    (sens_a, tr_a), (sens_b, tr_b) = (hessian_sensitivity(b, calib, refs, samples=4) for b in (shared, separate))
    assert list(tr_a.values()) == pytest.approx(list(tr_b.values()), rel=1e-5)
    assert list(sens_a.values()) == pytest.approx(list(sens_b.values()), rel=1e-5)


def test_site_hooks_run_once_per_node_and_may_replace_inputs():
    gm = capture(Twice("linear", True).eval(), _data("linear", 1, 0)[0]).gm
    (x,) = _data("linear", 1, 3)[0]
    nodes = [n for n in gm.graph.nodes if n.op == "call_module"]
    assert [n.target for n in nodes] == ["first", "first", "head"]
    gm.add_submodule("first_call", gm.first)                # as quant.graph._unshare names the second call
    nodes[1].target = "first_call"
    gm.recompile()
    paths = [str(n.target) for n in nodes]
    assert paths_by_module(gm, paths) == [paths[:2], paths[2:]]
    calls = []
    out = run_with_site_hooks(gm, (x,), pre={paths[1]: lambda m, args: (args[0] * 0.0,)},
                              post={p: (lambda m, a, o, p=p: calls.append((p, float(a[0].detach().abs().max()))))
                                    for p in paths[:2]})
    assert [c[0] for c in calls] == paths[:2]            # each path once, in graph order
    assert calls[0][1] > 0 and calls[1][1] == 0.0        # the second call saw the replaced input
    with torch.no_grad():
        first = gm.get_submodule(paths[0])
        want = gm.get_submodule("head")(torch.relu(first(torch.zeros(8, 32))))
    assert torch.equal(out, want)


@pytest.mark.parametrize("budget", ["budget='size:0.5'", "budget='size:0.8'", "budget='error:0.02'",
                                    "budget='error:1e-6'", "budget='size:0.7',choices=[int8_static]"])
def test_mixed_precision_gives_a_layer_called_twice_one_choice_and_counts_its_bytes(budget):
    """The calls of one layer take one choice (a float32 call keeps the float weights for every call), its
    float32 bytes count once, and the size the report states is the built model's. Before, the allocation
    counted the shared float weights once per call and a negative rest: with one call float32 and one int8 it
    reported 0.36 of float32 for a model of 1.23."""
    from graphopt.analysis.flops import model_size_bytes

    calib, (x,) = _data("linear", 8, 1), _data("linear", 1, 2)[0]
    model = Twice("linear", True).eval()
    opt = graphopt.optimize(model, "torch", f"quantize(bits=mixed,{budget},progress=false)",
                            example_inputs=(x,), calibration=calib)
    rec = opt.report.records[-1]
    shared = [d for d in rec.details if "calls" in d]
    assert len(shared) == 1 and len(shared[0]["calls"]) == 2 and len(rec.details) == 2
    gm = opt.graph_module
    mods = [gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module"
            and n.target in shared[0]["calls"]]
    assert len(mods) == 2
    assert (mods[0] is mods[1] and type(mods[0]) is nn.Linear) if shared[0]["choice"] == "fp32" else \
        not any(type(m) is nn.Linear for m in mods)
    size = opt.report.records[-1].size_bytes
    assert size == model_size_bytes(opt.graph_module)
    note = next(n for n in rec.notes if n.startswith("mixed precision result"))
    assert f"model {size:,} B" in note
    if "size" in budget:
        assert size <= float(budget.split(":")[1].split("'")[0]) * model_size_bytes(model)
