"""Dynamic dims (graphopt/dynamic.py): one compiled module for every batch size / sequence length in bounds.

Compiled fixtures are module-scoped and tiny (one-layer encoder, hidden 32) to keep the file cheap.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

import graphopt
from graphopt.backends.targets import resolve_target
from graphopt.dynamic import DynamicSpec, parse_dynamic
from graphopt.errors import DynamicShapeError, InputError, PassError
from graphopt.models import BertStyleEncoder
from graphopt.pipeline import Pass, PassResult, register_pass

VOCAB, MAX_SEQ, MAX_BATCH = 300, 48, 6
DIMS = {"batch": (1, MAX_BATCH), "seq": (4, MAX_SEQ)}
SHAPES = [(1, 4), (3, 17), (MAX_BATCH, MAX_SEQ)]


def _encoder():
    torch.manual_seed(0)
    return BertStyleEncoder(vocab=VOCAB, hidden=32, layers=1, heads=2, ffn=64, max_len=MAX_SEQ).eval()


def _ids(b, s, seed=0):
    return torch.randint(0, VOCAB, (b, s), generator=torch.Generator().manual_seed(seed * 100 + b * 7 + s))


@pytest.fixture(scope="module")
def encoder():
    return _encoder()


@pytest.fixture(scope="module")
def fp32(encoder):
    return graphopt.optimize(encoder, "x86", "cleanup", example_inputs=(_ids(2, 16),), dynamic=DIMS)


@pytest.fixture(scope="module")
def int8(encoder):
    calib = [_ids(b, s, seed=1) for b, s in ((1, 16), (2, 40), (4, 9), (1, 33))]      # varied shapes
    # every kind quantized whatever the host (ops="auto" keeps attention float32 on AVX2 hosts: tested below)
    return graphopt.optimize(encoder, "x86", INT8, example_inputs=(_ids(2, 16),), calibration=calib, dynamic=DIMS)


INT8 = "cleanup,quantize(progress=false,ops=[linear,conv2d,matmul])"


# ------------------------------------------------------------------------------------------ compiled
@pytest.mark.parametrize("b,s", SHAPES)
def test_fp32_matches_eager_at_every_shape(encoder, fp32, b, s):
    x = _ids(b, s, seed=2)
    with torch.no_grad():
        ref = encoder(x)
    out = fp32(x)
    assert out.shape == ref.shape == (b, 2)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("b,s", SHAPES)
def test_int8_matches_its_graph_at_every_shape(encoder, int8, b, s):
    x = _ids(b, s, seed=3)
    with torch.no_grad():
        q = int8.graph_module(x)          # the quantized fx graph: what the compiled int8 module computes
        ref = encoder(x)
    out = int8(x)
    torch.testing.assert_close(out, q, rtol=1e-3, atol=1e-3)
    from graphopt.backends.tvm.quant_lower import int8_path

    path = int8_path(resolve_target("x86"))
    # the Linears run the path's own int8 GEMM on the dynamic row count (batch x seq), not TVM's generic one
    assert f"qlinear:{path} (dynamic rows)" in int8.report.backend["int8"], int8.report.backend["int8"]
    assert "qlinear:relax" not in int8.report.backend["int8"]
    cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0)
    assert cos > 0.98, cos



@pytest.mark.parametrize("pipeline", ["cleanup", INT8])
def test_avx2_build_matches_at_every_shape(encoder, pipeline, request):
    """The AVX2 code path (x86:haswell, built on any x86 host): its row-wise kernels (the attention softmax
    over a dynamic length too: RowGroups) and the int8 kernels match the fx graph at every shape. On an AVX2
    host this file's own builds (fp32, int8: same pipelines, example and calibration) are that path."""
    from tests.helpers import same_paths_as_host

    calib = [_ids(b, s, seed=1) for b, s in ((1, 16), (2, 40), (4, 9), (1, 33))]
    if same_paths_as_host("x86:haswell"):
        opt = request.getfixturevalue("int8" if "quantize" in pipeline else "fp32")
    else:
        opt = graphopt.optimize(encoder, "x86:haswell", pipeline, example_inputs=(_ids(2, 16),), dynamic=DIMS,
                                calibration=calib if "quantize" in pipeline else None)
    kernels = opt.report.backend["kernels"]
    # layer norm and softmax (fp32: the softmax inside the fused attention kernel, fused_attention.py)
    assert f"{1 if pipeline == 'cleanup' else 2} RowGroups" in kernels and "DynamicRows" not in kernels, kernels
    for b, s in SHAPES + [(2, 9)]:
        x = _ids(b, s, seed=4)
        with torch.no_grad():
            ref = opt.graph_module(x)
        torch.testing.assert_close(opt(x), ref, rtol=1e-3 if "quantize" in pipeline else 1e-4,
                                   atol=1e-3 if "quantize" in pipeline else 1e-5)

@pytest.mark.parametrize("options, op", [("mode=dynamic,progress=false", "dynamic_qlinear"),
                                         ("mode=dynamic,bits=4,group_size=16", "w4a8_linear")])
def test_dynamic_mode_runs_its_kernels_on_the_dynamic_row_count(encoder, options, op):
    """quantize(mode=dynamic) (activations quantized per call from their min/max) and its W4A8 form (bits=4: int4
    weights, int8 activations per row and group) in a dynamic-shape build: the Linears take the path's kernels
    with a run-time row count and match the quantized graph everywhere."""
    from graphopt.backends.tvm.quant_lower import int8_path

    opt = graphopt.optimize(encoder, "x86", f"cleanup,quantize({options})", example_inputs=(_ids(2, 16),),
                            dynamic=DIMS)
    assert f"{op}:{int8_path(resolve_target('x86'))} (dynamic rows)" in opt.report.backend["int8"]
    for b, s in SHAPES:
        x = _ids(b, s, seed=5)
        with torch.no_grad():
            torch.testing.assert_close(opt(x), opt.graph_module(x), rtol=1e-3, atol=1e-3)


def test_signature_names_dims_and_kernels_are_scheduled(fp32):
    spec = fp32.compiled.inputs[0]
    assert spec.shape == ("batch", "seq") and spec.name == "input_ids"
    assert fp32.compiled.outputs[0].shape == ("batch", 2)
    kernels = fp32.report.backend["kernels"]
    assert "unscheduled" not in kernels and "PackedGemm" in kernels, kernels
    assert "batch in [1, 6]" in fp32.report.backend["dynamic"]
    # every pass was checked at other sizes inside the bounds
    notes = [n for r in fp32.report.records for n in r.notes]
    assert any(n.startswith("checked at other dynamic sizes") for n in notes), notes


@pytest.mark.parametrize("build", ["fp32", "int8"])
def test_kernels_read_reshaped_tensors_in_place(encoder, build, request):
    """Reshapes of dynamic tensors are views, and the kernels after them read the views' sources directly
    (view_args.fold_view_args), graphopt's hand-written int8 attention kernels included (their own dim
    variables bound to the view's dims): the forward pass creates no view objects at run time (each cost 3-4
    VM calls) and still equals eager PyTorch (fp32) or its quantized graph (int8) at a shape that is not the
    example's."""
    from graphopt.backends.tvm.kernel_profile import profile_kernels

    opt = request.getfixturevalue(build)
    x = _ids(3, 11, seed=5)
    names = {r["name"] for r in profile_kernels(opt, x, repeat=1)}
    assert not any("CreateView" in n for n in names), sorted(names)
    kernel = "fused_matmul" if build == "fp32" else "graphopt_qbmm"      # (int8: the attention matmuls)
    assert any(n.startswith(kernel) for n in names), sorted(names)
    with torch.no_grad():
        if build == "fp32":
            torch.testing.assert_close(opt(x), encoder(x), rtol=1e-4, atol=1e-5)
        else:
            torch.testing.assert_close(opt(x), opt.graph_module(x), rtol=1e-3, atol=1e-3)



def test_each_run_time_shape_is_built_once(encoder, fp32, monkeypatch):
    """shape_cse.dedupe_shape_calls: the VM builds each distinct run-time shape (and symbolic scalar) once per
    call, not once per tensor / kernel argument; outputs are bit for bit those of a build without the pass."""
    import tvm

    from graphopt.backends.tvm import shape_cse
    from graphopt.backends.tvm.kernel_profile import profile_kernels

    monkeypatch.setattr(shape_cse, "dedupe_shape_calls",
                        lambda: tvm.transform.module_pass(lambda m, c: m, opt_level=0, name="Identity"))
    plain = graphopt.optimize(encoder, "x86", "cleanup", example_inputs=(_ids(2, 16),), dynamic=DIMS)
    x = _ids(3, 11, seed=6)

    def calls(opt):
        return {r["name"]: r["calls"] for r in profile_kernels(opt, x, repeat=1) if r["name"].startswith("vm.")}

    before, after = calls(plain), calls(fp32)
    for name in ("vm.builtin.make_shape", "vm.builtin.make_prim_value"):
        assert after.get(name, 0) <= 0.6 * before[name], (name, before, after)     # one layer: 32 -> 17 shapes
    assert after.get("vm.builtin.copy", 0) == before.get("vm.builtin.copy", 0)     # no aliases left to copy
    assert after["vm.builtin.alloc_tensor"] == before["vm.builtin.alloc_tensor"]
    assert torch.equal(fp32(x), plain(x))


def test_collapsed_attention_matmuls_equal_the_uncollapsed_ones_bit_for_bit(encoder, monkeypatch):
    """batch_matmul_views.collapse_batched_matmul_views keeps every output element's products and their order:
    the compiled encoder (this file's dynamic build, and a static one) is bit for bit the one built without
    it, and matches eager PyTorch."""
    import tvm

    from graphopt.backends.tvm import batch_matmul_views, fused_attention

    ids = _ids(2, 16)
    # the fused attention kernel needs the collapsed 4-D matmuls (without them the graph stays unfused, and
    # the two would differ by the fused kernel's rounding): compared unfused on both sides
    identity = tvm.transform.module_pass(lambda m, c: m, opt_level=0, name="Identity")
    monkeypatch.setattr(fused_attention, "fuse_attention", lambda lanes: identity)
    static = graphopt.optimize(encoder, "x86", "cleanup", example_inputs=(ids,))
    fp32 = graphopt.optimize(encoder, "x86", "cleanup", example_inputs=(ids,), dynamic=DIMS)
    monkeypatch.setattr(batch_matmul_views, "collapse_batched_matmul_views",
                        lambda: tvm.transform.module_pass(lambda m, c: m, opt_level=0, name="Identity"))
    without = {d: graphopt.optimize(encoder, "x86", "cleanup", example_inputs=(ids,), dynamic=DIMS if d else None)
               for d in (False, True)}
    for built, plain, inputs in ((static, without[False], [ids]), (fp32, without[True], [ids, _ids(3, 21, seed=4)])):
        for x in inputs:
            with torch.no_grad():
                ref = encoder(x)
            assert torch.equal(built(x), plain(x))
            torch.testing.assert_close(built(x), ref, rtol=1e-4, atol=1e-5)


def test_calls_outside_bounds_are_input_errors(fp32):
    with pytest.raises(InputError, match=r"input 0 \('input_ids'\) dim 1 \('seq'\) is 49, outside its bounds 4\.\.48"):
        fp32(_ids(2, MAX_SEQ + 1))
    with pytest.raises(InputError, match=r"dim 0 \('batch'\) is 7, outside its bounds 1\.\.6"):
        fp32(_ids(MAX_BATCH + 1, 8))
    with pytest.raises(InputError, match=r"dim 1 \('seq'\) is 3"):
        fp32(_ids(1, 3))
    with pytest.raises(InputError, match="dtype"):
        fp32(_ids(2, 8).float())


def test_artifact_round_trip_keeps_dynamism(fp32, encoder, tmp_path):
    path = fp32.save(str(tmp_path / "enc.gopt"))
    loaded = graphopt.load(path)
    assert loaded.dynamic is not None and loaded.dynamic.dims["seq"].max == MAX_SEQ
    assert loaded.compiled.inputs[0].shape == ("batch", "seq")
    for b, s in ((1, 5), (4, 31)):
        x = _ids(b, s, seed=4)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), encoder(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(InputError, match="'seq'"):
        loaded(_ids(1, MAX_SEQ + 1))


# --------------------------------------------------------------------------- models that cannot be dynamic
class DataBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.lin(x)
        return x


class FixedReshape(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x).reshape(3, -1)


class ShapeBranch(nn.Module):
    def forward(self, x):
        if x.shape[1] > 8:
            return x.sum(1)
        return x.mean(1)


def test_data_dependent_control_flow_is_a_typed_error_naming_the_op():
    with pytest.raises(DynamicShapeError, match=r"aten\.item.*|x\.sum\(\) > 0") as e:
        graphopt.optimize(DataBranch(), "torch", example_inputs=(torch.randn(3, 5, 4),), dynamic={"batch": (1, 8)})
    assert "if x.sum() > 0" in str(e.value) and "data" in str(e.value)


def test_specialized_dim_is_a_typed_error_naming_the_dim_and_line():
    with pytest.raises(DynamicShapeError, match="batch") as e:
        graphopt.optimize(FixedReshape(), "torch", example_inputs=(torch.randn(3, 5, 4),), dynamic={"batch": (1, 8)})
    assert "reshape(3, -1)" in str(e.value)
    with pytest.raises(DynamicShapeError, match="seq") as e:
        graphopt.optimize(ShapeBranch(), "torch", example_inputs=(torch.randn(2, 10, 4),),
                          dynamic={"seq": (2, 16)})
    assert "x.shape[1] > 8" in str(e.value)


# --------------------------------------------------------------------------------------------- parsing
def test_parse_forms_and_errors():
    x, m = torch.zeros(2, 16, dtype=torch.long), torch.zeros(2, 16, dtype=torch.long)

    class Two(nn.Module):
        def forward(self, input_ids, mask):
            return input_ids + mask

    spec = parse_dynamic({"batch": (1, 8), "seq": (2, 64)}, (x, m), Two())
    assert spec.axes == {0: {0: "batch", 1: "seq"}, 1: {0: "batch", 1: "seq"}}
    from torch.export import Dim

    spec2 = parse_dynamic({"mask": {1: Dim("seq", min=2, max=64)}, "input_ids": {1: "seq"}}, (x, m), Two())
    assert spec2.axes == {0: {1: "seq"}, 1: {1: "seq"}} and spec2.dims["seq"].max == 64
    spec3 = parse_dynamic(({0: Dim("b", max=8)}, None), (x, m), Two())
    assert spec3.axes == {0: {0: "b"}} and spec3.dims["b"].min == 0      # torch.export Dim default
    assert DynamicSpec.from_dict(spec.to_dict()).to_dict() == spec.to_dict()
    with pytest.raises(DynamicShapeError, match="no upper bound"):
        parse_dynamic({"input_ids": {0: Dim("batch")}}, (x, m), Two())
    with pytest.raises(DynamicShapeError, match="'heads' is not placed"):
        parse_dynamic({"heads": (1, 4)}, (x, m), Two())
    with pytest.raises(DynamicShapeError, match="outside its bounds"):
        parse_dynamic({"seq": (1, 8)}, (x, m), Two())
    # shared dims must agree at call time
    with pytest.raises(InputError, match="must agree"):
        spec.check((torch.zeros(2, 9, dtype=torch.long), torch.zeros(2, 10, dtype=torch.long)))


# ------------------------------------------------------------------------------- passes with dynamic dims
class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_fold_bn_prune_lowrank_with_dynamic_batch_compiled():
    torch.manual_seed(0)
    model = ConvBN().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(3, 3, 8, 8)
    # cleanup after the approximating passes too: an exact pass is checked at the other sizes against the graph
    # before it (it was checked against the original model there, so any cleanup after prune "changed" them)
    opt = graphopt.optimize(model, "x86", "fold_bn,cleanup,prune(ratio=0.25),lowrank(energy=0.99),cleanup",
                            example_inputs=(x,), dynamic={"batch": (1, 16)})
    assert "unscheduled" not in opt.report.backend["kernels"], opt.report.backend["kernels"]
    for b in (1, 5, 16):
        xb = torch.randn(b, 3, 8, 8)
        with torch.no_grad():
            torch.testing.assert_close(opt(xb), opt.graph_module(xb), rtol=1e-4, atol=1e-4)


def test_indexing_a_dynamic_dim_from_either_end():
    """x[:, -1] (a GPT's last token) on a dynamic sequence: the negative index counts from the actual end."""
    class Ends(torch.nn.Module):
        def forward(self, x):
            return x[:, -1] * 2, x[:, 0], x[:, -2]

    model, x = Ends().eval(), torch.randn(2, 5, 3)
    opt = graphopt.optimize(model, target="x86", example_inputs=(x,), dynamic={"x": {1: "seq"}, "seq": (2, 16)})
    for n in (2, 5, 9, 16):
        y = torch.randn(2, n, 3)
        for got, ref in zip(opt(y), model(y)):
            assert torch.equal(got, ref), n



class _Attention(nn.Module):
    """Input straight into int8 Linears, then softmax(q·kᵀ)·v: both matmuls of two activations in int8."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        p = torch.softmax(torch.matmul(self.q(x), self.k(x).transpose(-1, -2)) * 0.25, -1)
        return torch.matmul(p, self.v(x))


def test_int8_attention_with_a_quantized_input_stays_dynamic_and_exact():
    """The model's input is quantized first (so the fusion planner looks at shapes over the input's dims: it
    once int()-ed those SymInts, which specialized the export and gave a static model that failed at any other
    size), and attention's two activation matmuls run the dynamic int8 kernels (q·kᵀ: N = seq; p·v: K = seq,
    padded to whole 4-byte groups at run time). Equal to the quantized graph at every size."""
    from graphopt.backends.tvm.quant_lower import int8_path

    torch.manual_seed(0)
    model = _Attention().eval()
    calib = [torch.randn(2, 8, 16), torch.randn(1, 37, 16), torch.randn(3, 20, 16)]
    opt = graphopt.optimize(model, "x86", "quantize(progress=false,ops=[linear,conv2d,matmul])",
                            example_inputs=(torch.randn(2, 12, 16),),
                            calibration=calib, dynamic={"x": {0: "batch", 1: "seq"}, "batch": (1, 4), "seq": (4, 64)})
    line = opt.report.backend["int8"]
    path = int8_path(resolve_target("x86"))
    assert f"qmatmul:{path} (dynamic)" in line and f"qlinear:{path} (dynamic rows)" in line, line
    assert opt.compiled.inputs[0].shape == ("batch", "seq", 16)
    for b, s in ((1, 4), (1, 5), (2, 16), (3, 37), (4, 64)):
        x = torch.randn(b, s, 16)
        with torch.no_grad():
            torch.testing.assert_close(opt(x), opt.graph_module(x), rtol=0, atol=1e-6)


# ------------------------------------------------------------------ the pass manager's check at other sizes
class _Adds(nn.Module):
    """`inner(x) + term(x)`: the test passes' changed graphs."""

    def __init__(self, inner, term):
        super().__init__()
        self.inner, self.term = inner, term

    def forward(self, x):
        return self.inner(x) + self.term(x)


def _adding(gm, term) -> PassResult:
    return PassResult(torch.fx.symbolic_trace(_Adds(gm, term)))


@register_pass("test_output_offset")
@dataclass
class _OutputOffset(Pass):
    """Test-only approximation: adds `delta` to the Linear's bias (the same absolute error at every size)."""

    delta: float = 1e-3
    exact = False

    def run(self, gm, ctx):
        for m in gm.modules():
            if isinstance(m, nn.Linear):
                m.bias = nn.Parameter(m.bias.detach() + self.delta)
        return PassResult(gm)


@register_pass("test_wrong_at_other_sizes")
@dataclass
class _WrongAtOtherSizes(Pass):
    """Test-only bug: the graph is exact at batch 4 (the example's) and off by (batch - 4) elsewhere."""

    exact = False

    def run(self, gm, ctx):
        return _adding(gm, lambda x: x.shape[0] - 4)


class _Shrinks(nn.Module):
    """Outputs whose magnitude falls with the batch size (1 / batch^3), bias zero."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(8, 8)
        with torch.no_grad():
            self.lin.bias.zero_()

    def forward(self, x):
        return self.lin(x / x.shape[0] ** 3)


def test_variant_check_takes_errors_relative_to_the_larger_output_scale():
    """An approximation with the same absolute error at every size passes the check at other dynamic sizes even
    where a size's outputs are 5x smaller than the example's (its error relative to its own outputs is then 5x
    the example's: the old criterion rejected it); a graph that is right only at the example's size is still a
    PassError naming the size."""
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    model = _Shrinks().eval()
    scale = float(model(x).detach().abs().max())
    opt = graphopt.optimize(model, "torch", f"test_output_offset(delta={0.02 * scale})", example_inputs=(x,),
                            dynamic={"batch": (1, 8)})
    notes = [n for r in opt.report.records for n in r.notes if n.startswith("checked at other dynamic sizes")]
    assert notes and "(7, 8)" in notes[0], notes        # batch 7: outputs (4/7)^3 of the example's
    with pytest.raises(PassError, match=r"test_wrong_at_other_sizes.*input shape\(s\) \(1, 8\)"):
        graphopt.optimize(model, "torch", "test_wrong_at_other_sizes", example_inputs=(x,), dynamic={"batch": (1, 8)})


@register_pass("test_feature_leak")
@dataclass
class _FeatureLeak(Pass):
    """Test-only approximation whose error depends on the data, not the size: adds `delta` times the mean over
    the sequence of each input's first feature."""

    delta: float = 1e-3
    exact = False

    def run(self, gm, ctx):
        delta = self.delta
        return _adding(gm, lambda x: delta * x[:, :, 0].mean(1, keepdim=True))


class _Pooled(nn.Module):
    """A Linear over every token, mean-pooled over the sequence."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(x).mean(1)


def test_variant_check_measures_an_approximation_on_the_calibration_data_too():
    """The example may be a lucky input for an approximation (here its error cancels over the example's 16
    tokens, not over the first 8, which the check at seq 8 runs): with calibration data, whose error at the
    example's sizes shows what the pass really costs, the same graph passes; without, it is a PassError; and
    a graph wrong only at other sizes stays a PassError with calibration data (resized to the example's
    sizes, it is exact there)."""
    x = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(0))
    x[:, :, 0] = torch.tensor([1.0] * 8 + [-1.0] * 8)          # the leak cancels over 16 tokens, not over 8
    model = _Pooled().eval()
    delta = 0.3 * float(model(x).detach().abs().max())
    calib = [torch.randn(2, s, 8, generator=torch.Generator().manual_seed(s)) for s in (8, 12, 32)]
    for c in calib:
        c[:, :, 0] = 1.0                                         # the leak's full size: delta
    dynamic = {"x": {1: "seq"}, "seq": (8, 32)}
    with pytest.raises(PassError, match=r"test_feature_leak.*not at input shape\(s\) \(2, 8, 8\)"):
        graphopt.optimize(model, "torch", f"test_feature_leak(delta={delta})", example_inputs=(x,), dynamic=dynamic)
    opt = graphopt.optimize(model, "torch", f"test_feature_leak(delta={delta})", example_inputs=(x,),
                            dynamic=dynamic, calibration=calib)
    notes = [n for r in opt.report.records for n in r.notes if n.startswith("checked at other dynamic sizes")]
    assert notes and "(2, 8, 8)" in notes[0], notes
    with pytest.raises(PassError, match=r"test_wrong_at_other_sizes.*not at input shape\(s\) \(1, 16, 8\)"):
        graphopt.optimize(model, "torch", "test_wrong_at_other_sizes", example_inputs=(x.repeat(2, 1, 1),),
                          dynamic={"x": {0: "batch"}, "batch": (1, 8)}, calibration=[c[:1] for c in calib])


class _TwoInputs(nn.Module):
    """Two float inputs sharing the dynamic dims (batch, seq): no index bound, so every call can take the
    per-call check's fast path."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 4)

    def forward(self, x, y):
        return self.proj(x) + y


@pytest.fixture(scope="module")
def two_inputs():
    torch.manual_seed(0)
    model = _TwoInputs().eval()
    dims = {"x": {0: "batch", 1: "seq"}, "y": {0: "batch", 1: "seq"}, "batch": (1, 4), "seq": (2, 9)}
    return model, graphopt.optimize(model, "x86", "cleanup", example_inputs=(torch.randn(2, 5, 8),
                                                                              torch.randn(2, 5, 4)), dynamic=dims)


def test_the_per_call_fast_path_accepts_exactly_what_the_full_check_accepts(two_inputs):
    """A dynamic module's call checks its inputs in a fast path (dtype, static dims, each dynamic dim inside
    its bounds and equal across the inputs sharing it) and runs the full check, which names what is wrong,
    only when that fails: the two agree on every combination of sizes in and out of bounds, shared dims that
    disagree, a wrong feature size, rank or dtype; and what the fast path accepts runs and equals eager."""
    import itertools

    model, opt = two_inputs
    compiled = opt.compiled
    cases = []
    for bx, by, sx, sy in itertools.product((0, 1, 4, 5), (1, 4), (1, 2, 9, 10), (2, 9)):
        cases.append((torch.randn(bx, sx, 8), torch.randn(by, sy, 4)))
    cases += [(torch.randn(2, 5, 7), torch.randn(2, 5, 4)), (torch.randn(2, 5, 8), torch.randn(2, 5, 4, 1)),
              (torch.randn(2, 5, 8).double(), torch.randn(2, 5, 4)), (torch.randn(5, 8), torch.randn(2, 5, 4))]
    accepted = 0
    for args in cases:
        try:
            compiled.check_inputs(args)
            full = True
        except InputError:
            full = False
        assert compiled._matches(args) == full, [tuple(a.shape) for a in args]
        if full:
            accepted += 1
            with torch.no_grad():
                torch.testing.assert_close(opt(*args), model(*args), rtol=1e-5, atol=1e-5)
        else:
            with pytest.raises(InputError):
                opt(*args)
    assert 0 < accepted < len(cases)


def test_the_fast_path_checks_index_inputs_like_the_full_check(fp32):
    """Token ids (an index input: embedding rows 0..VOCAB-1) take the fast path too, which also checks their
    range; an id out of range falls to the full check, whose InputError names input, position and value."""
    compiled = fp32.compiled
    for low, high in ((0, VOCAB - 1), (0, VOCAB), (-1, 5), (3, 3)):
        ids = _ids(2, 9)
        ids[0, 0], ids[1, 8] = low, high
        try:
            compiled.check_inputs((ids,))
            full = True
        except InputError:
            full = False
        assert compiled._matches((ids,)) == full == (low >= 0 and high < VOCAB)
    bad = _ids(2, 9)
    bad[1, 3] = VOCAB
    with pytest.raises(InputError, match=rf"input 0: index {VOCAB} at position \(1, 3\) is out of range"):
        fp32(bad)


def test_int8_attention_stays_float32_on_the_avx2_path_by_default(encoder):
    """quantize's ops="auto" on the avx2 int8 path: Linears int8, the attention matmuls float32, run as the
    fused attention kernel (no int8 matmul of two activations is faster than float32 there); the compiled
    model equals its quantized graph at several shapes."""
    calib = [_ids(b, s, seed=1) for b, s in ((1, 16), (2, 40), (4, 9))]
    opt = graphopt.optimize(encoder, "x86:haswell", "cleanup,quantize(progress=false)", example_inputs=(_ids(2, 16),),
                            calibration=calib, dynamic=DIMS)
    line = opt.report.backend["int8"]
    assert "qlinear:avx2" in line and "qmatmul" not in line, line
    notes = [n for r in opt.report.records for n in r.notes]
    assert any("(attention) stay float32 on int8 path 'avx2'" in n for n in notes), notes
    for b, s in ((1, 8), (3, 21)):
        x = _ids(b, s, seed=6)
        with torch.no_grad():
            torch.testing.assert_close(opt(x), opt.graph_module(x), rtol=1e-3, atol=1e-3)
