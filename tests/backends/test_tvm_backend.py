"""TVM backend: lowering (export path), build, and the CompiledModule runtime, on real TVM (x86/llvm).

Inputs are small: untuned TVM CPU kernels are slow. Compiled modules are shared per test module.
"""
from __future__ import annotations

import math
import re
import time

import pytest
import torch
from torch import fx, nn

import graphopt
from graphopt.analysis.compare import compare_outputs
from graphopt.backends.targets import resolve_target
from graphopt.errors import BuildError, GraphoptError, InputError, LoweringError
from graphopt.models import BertStyleEncoder
from tests.helpers import randomize_bn

tvm = pytest.importorskip("tvm")

from graphopt.backends.tvm import CompiledModule, build_module, compile_graph, lower_graph  # noqa: E402
from graphopt.backends.tvm.lower import export_graph  # noqa: E402

EXACT = 1e-5          # "exact" = equal up to float32 rounding, relative to max |reference|


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class TwoInTwoOut(nn.Module):
    """Two inputs; a nested output: (tensor, (tensor, {"sum": tensor}), [tensor])."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 4)
        self.b = nn.Linear(3, 4)

    def forward(self, x, y):
        ha, hb = self.a(x), self.b(y)
        return ha * hb, (torch.tanh(ha), {"sum": ha + hb}), [hb.sum(dim=1)]


class Unsupported(nn.Module):
    """linalg.det and fft.rfft have no converter in TVM's ExportedProgram importer."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.block = _DetBlock()

    def forward(self, x):
        y = self.proj(x)
        return self.block(y), torch.fft.rfft(y).abs()


class _DetBlock(nn.Module):
    def forward(self, y):
        return torch.linalg.det(y)


def numpy_double(x):
    return torch.from_numpy(x.detach().numpy() * 2)


fx.wrap("numpy_double")          # a leaf for symbolic_trace; torch.export cannot trace through .numpy()


class _NumpyModel(nn.Module):
    def forward(self, x):
        return numpy_double(x) + 1


def _max_rel(got, ref) -> float:
    diff = compare_outputs(got, ref)
    assert not diff.structure_error, diff.structure_error
    return diff.max_rel


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    model = randomize_bn(SmallCNN()).eval()
    x = torch.randn(2, 3, 16, 16)
    opt = graphopt.optimize(model, target="x86", pipeline="", example_inputs=(x,))
    return model, x, opt


@pytest.fixture(scope="module")
def two_io():
    torch.manual_seed(0)
    model = TwoInTwoOut().eval()
    x, y = torch.randn(5, 6), torch.randn(5, 3)
    opt = graphopt.optimize(model, target="x86", pipeline="", example_inputs=(x, y))
    return model, (x, y), opt


# --------------------------------------------------------------------------------------------- lowering
def test_unfolded_batchnorm_is_exact_through_export(cnn):
    model, x, opt = cnn
    assert isinstance(opt.compiled, CompiledModule)
    # BN is still there (pipeline ""): the eval-mode BN op reaches TVM and must be lowered exactly
    ep = export_graph(opt.graph_module, (x,))
    ops = {getattr(n.target, "__name__", "") for n in ep.graph.nodes if n.op == "call_function"}
    assert any("batch_norm" in op for op in ops), ops
    with torch.no_grad():
        ref = model(x)
    out = opt(x)
    assert isinstance(out, torch.Tensor) and out.shape == ref.shape and out.dtype == ref.dtype
    assert _max_rel(out, ref) < EXACT
    # a second, different input: the compiled code is not specialised to the example values
    x2 = torch.randn_like(x) * 3
    with torch.no_grad():
        assert _max_rel(opt(x2), model(x2)) < EXACT


def test_weights_are_bound_as_constants_not_inputs(cnn):
    _, x, opt = cnn
    lowered = lower_graph(opt.graph_module, (x,))
    assert len(lowered.mod["main"].params) == 1          # only the image; no weight parameters
    assert [str(s) for s in lowered.inputs] == ["tensor(2, 3, 16, 16):float32"]
    assert [s.shape for s in lowered.outputs] == [(2, 10)]


def test_lowering_does_not_touch_the_graph_module(cnn):
    _, x, opt = cnn
    before = {n.name: dict(n.meta) for n in opt.graph_module.graph.nodes}
    code = opt.graph_module.code
    lower_graph(opt.graph_module, (x,))
    after = {n.name: dict(n.meta) for n in opt.graph_module.graph.nodes}
    assert code == opt.graph_module.code
    assert before.keys() == after.keys()
    assert all(before[k].keys() == after[k].keys() for k in before)


def test_folded_pipeline_compiles_and_matches(cnn):
    model, x, _ = cnn
    opt = graphopt.optimize(model, target="x86", example_inputs=(x,))     # default pipeline (fold_bn, ...)
    with torch.no_grad():
        assert _max_rel(opt(x), model(x)) < 1e-4


def test_report_records_backend_seconds(cnn):
    _, _, opt = cnn
    backend = opt.report.backend
    for key in ("lower_s", "schedule_s", "build_s"):
        assert isinstance(backend[key], float) and backend[key] >= 0.0, key
    assert backend["target"] == opt.target.alias
    assert backend["tvm_version"] == tvm.__version__


def test_unsupported_ops_are_all_named_with_their_fx_node_and_module():
    model = Unsupported().eval()
    x = torch.randn(4, 4)
    with pytest.raises(LoweringError) as info:
        graphopt.optimize(model, target="x86", pipeline="", example_inputs=(x,))
    msg = str(info.value)
    assert "aten._linalg_det.default" in msg and "aten._fft_r2c.default" in msg   # both, in one error
    assert "fx node 'linalg_det'" in msg and "fx node 'fft_rfft'" in msg
    assert "in module 'block'" in msg                                           # where det was called
    missing = info.value.unsupported
    assert {m["op"] for m in missing} == {"aten._linalg_det.default", "aten._fft_r2c.default"}
    assert all(m["node"] and m["origin"] for m in missing)


def test_unsupported_op_inside_a_module_names_its_path():
    class Inner(nn.Module):
        def forward(self, x):
            return torch.linalg.inv(x)

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.stage = nn.Sequential(nn.Linear(3, 3), Inner())

        def forward(self, x):
            return self.stage(x)

    gm = fx.symbolic_trace(Outer().eval())
    with pytest.raises(LoweringError, match=r"linalg_inv.*in module 'stage\.1'"):
        lower_graph(gm, (torch.randn(3, 3) + 3 * torch.eye(3),))


def test_non_tensor_input_is_a_lowering_error(cnn):
    _, x, opt = cnn
    with pytest.raises(LoweringError, match="input 1 is a int"):
        lower_graph(opt.graph_module, (x, 3))


@pytest.mark.parametrize("extra,match", [(None, r"output 1 \(at \[1\]\) is None \(NoneType\), not a tensor"),
                                         (3, r"output 1 \(at \['n'\]\) is 3 \(int\), not a tensor")])
def test_non_tensor_output_is_a_lowering_error_naming_it(extra, match):
    """Outputs are checked before TVM's importer, whose own message ("Unsupported output type in exported graph
    output: <class 'int'>") named no output; the message gives the output's place in what the model returns."""

    class Extra(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return (self.fc(x), None) if extra is None else {"y": self.fc(x), "n": extra}

    gm = fx.symbolic_trace(Extra())
    with pytest.raises(LoweringError, match=match):
        lower_graph(gm, (torch.randn(2, 4),))


def test_float16_model_failure_says_what_to_do():
    """TVM's importer computes addmm / convolution in float32 and then adds the float16 bias: the error names the
    node, as any importer failure, and says how to get float16 arithmetic instead."""
    gm = fx.symbolic_trace(nn.Sequential(nn.Linear(8, 8)).half().eval())
    with pytest.raises(LoweringError, match=r"importer failed at aten\.addmm.*holds float16 tensors.*"
                                            r"model\.float\(\) with precision='float16'"):
        lower_graph(gm, (torch.randn(2, 8).half(),))


def test_export_failure_is_a_lowering_error():
    gm = fx.symbolic_trace(_NumpyModel())
    x = torch.randn(3)
    assert torch.allclose(gm(x), x * 2 + 1)                  # runs in PyTorch, but torch.export cannot trace it
    with pytest.raises(LoweringError, match="torch.export of the optimized graph failed"):
        lower_graph(gm, (x,))


def test_importer_failure_names_the_node():
    """Boolean-mask indexing exports (aten.index.Tensor) but TVM's converter rejects bool indices."""

    class Masked(nn.Module):
        def forward(self, x):
            return x[x > 0].sum()

    gm = fx.symbolic_trace(Masked())
    with pytest.raises(LoweringError, match=r"importer failed at aten\.index\.Tensor .*fx node 'getitem'"):
        lower_graph(gm, (torch.randn(8),))


# ------------------------------------------------------------------------------------------------ build
def test_bad_tvm_target_is_a_build_error(cnn):
    _, x, opt = cnn
    lowered = lower_graph(opt.graph_module, (x,))
    spec = resolve_target({"kind": "llvm", "no-such-option": 1})
    with pytest.raises(BuildError, match="no-such-option"):
        build_module(lowered.mod, spec)


def test_foreign_cpu_target_builds_but_refuses_to_run_here(cnn):
    model, x, opt = cnn
    import platform

    if platform.machine() in ("aarch64", "arm64"):
        pytest.skip("this machine is aarch64")
    other = graphopt.optimize(model, target="arm:cortex-a72", pipeline="", example_inputs=(x,))
    assert other.target.arch == "aarch64"
    with pytest.raises(GraphoptError, match="cannot run here"):
        other(x)


# ---------------------------------------------------------------------------------------------- runtime
def test_multi_input_nested_outputs_keep_their_structure(two_io):
    model, (x, y), opt = two_io
    out = opt(x, y)
    with torch.no_grad():
        ref = model(x, y)
    assert isinstance(out, tuple) and len(out) == 3
    assert isinstance(out[1], tuple) and isinstance(out[1][1], dict) and list(out[1][1]) == ["sum"]
    assert isinstance(out[2], list) and len(out[2]) == 1
    assert _max_rel(out, ref) < EXACT
    for a, b in zip(torch.utils._pytree.tree_leaves(out), torch.utils._pytree.tree_leaves(ref)):
        assert a.shape == b.shape and a.dtype == b.dtype


def test_outputs_are_fresh_tensors_per_call(two_io):
    _, (x, y), opt = two_io
    first = opt(x, y)[0]
    kept = first.clone()
    second = opt(x * 2, y - 1)[0]
    assert torch.equal(first, kept)                    # the second call did not overwrite the first result
    assert first.data_ptr() != second.data_ptr()
    assert not torch.equal(first, second)


def test_outputs_that_depend_on_no_input_are_copied_per_call():
    """TVM folds `table * 2` into a constant of the executable; handing it out by reference would let a
    caller's in-place edit change every later result."""

    class WithConstant(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("table", torch.arange(4.0))

        def forward(self, x):
            return x + 1, self.table * 2

    model = WithConstant().eval()
    x = torch.randn(4)
    opt = graphopt.optimize(model, target="x86", pipeline="", example_inputs=(x,))
    assert opt.compiled.const_outputs == [1]
    first = opt(x)[1]
    first.add_(100)
    assert torch.equal(opt(x)[1], torch.arange(4.0) * 2)


def test_non_contiguous_and_unaligned_inputs(two_io):
    model, (x, y), opt = two_io
    xt = torch.randn(6, 5).t()                         # transposed: not contiguous
    base = torch.randn(5 * 3 + 1)
    yu = base[1:].view(5, 3)                           # contiguous, but 4 bytes off TVM's 64-byte alignment
    assert not xt.is_contiguous() and yu.data_ptr() % 64 != 0
    with torch.no_grad():
        assert _max_rel(opt(xt, yu), model(xt, yu)) < EXACT


def test_requires_grad_inputs_are_accepted(two_io):
    model, (x, y), opt = two_io
    xg = x.clone().requires_grad_(True)
    with torch.no_grad():
        assert _max_rel(opt(xg, y), model(x, y)) < EXACT


@pytest.mark.parametrize("args, match", [
    (lambda x, y: (x,), r"expected 2 input\(s\).*got 1"),
    (lambda x, y: (x, y, y), r"expected 2 input\(s\).*got 3"),
    (lambda x, y: (x[:4], y), r"input 0: expected shape \(5, 6\).*got \(4, 6\)"),
    (lambda x, y: (x, y.reshape(3, 5)), r"input 1: expected shape \(5, 3\).*got \(3, 5\)"),
    (lambda x, y: (x.double(), y), r"input 0: expected dtype float32.*got float64"),
    (lambda x, y: (x, y.to(torch.int64)), r"input 1: expected dtype float32.*got int64"),
    (lambda x, y: (x, y.numpy()), r"input 1: expected tensor\(5, 3\):float32, got ndarray"),
])
def test_wrong_inputs_are_input_errors(two_io, args, match):
    _, (x, y), opt = two_io
    with pytest.raises(InputError, match=match):
        opt(*args(x, y))


def test_keyword_arguments_are_input_errors(two_io):
    _, (x, y), opt = two_io
    with pytest.raises(InputError, match="keyword"):
        opt(x, y=y)


def test_input_error_is_a_value_error(two_io):
    _, (x, _), opt = two_io
    with pytest.raises(ValueError):
        opt(x, x)


def test_compiled_module_keeps_target_and_signature(two_io):
    _, (x, y), opt = two_io
    c = opt.compiled
    assert c.target == opt.target and c.torch_device == torch.device("cpu")
    sig = c.signature()
    assert sig["inputs"] == [{"shape": [5, 6], "dtype": "float32"}, {"shape": [5, 3], "dtype": "float32"}]
    assert [o["shape"] for o in sig["outputs"]] == [[5, 4], [5, 4], [5, 4], [5]]


def test_compile_graph_directly_on_an_exported_graph_module():
    """A GraphModule captured by torch.export (no call_module nodes) lowers too."""
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.LayerNorm(8)).eval()
    x = torch.randn(3, 8)
    gm = torch.export.export(model, (x,)).module()
    compiled = compile_graph(gm, (x,), resolve_target("x86"))
    with torch.no_grad():
        assert _max_rel(compiled(x), model(x)) < EXACT


# ------------------------------------------------------------------------------------------ real models
def test_attention_encoder_matches_eager():
    torch.manual_seed(0)
    model = BertStyleEncoder(vocab=100, hidden=32, layers=2, heads=4, ffn=64, max_len=16, num_labels=3).eval()
    ids = torch.randint(0, 100, (2, 12))
    opt = graphopt.optimize(model, target="x86", pipeline="", example_inputs=(ids,))
    with torch.no_grad():
        ref = model(ids)
        ids2 = torch.randint(0, 100, (2, 12))
        ref2 = model(ids2)
    assert (opt(ids) - ref).abs().max().item() < 1e-4
    assert (opt(ids2) - ref2).abs().max().item() < 1e-4


class _TwoTables(nn.Module):
    """Token ids through an embedding, class ids through index_select, and a float input beside them."""

    def __init__(self):
        super().__init__()
        self.tokens = nn.Embedding(50, 8)
        self.classes = nn.Parameter(torch.randn(7, 8))

    def forward(self, ids, cls, scale):
        return self.tokens(ids).sum(1) + torch.index_select(self.classes, 0, cls) * scale


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    torch.manual_seed(0)
    model = _TwoTables().eval()
    args = (torch.randint(0, 50, (3, 5)), torch.randint(0, 7, (3,)), torch.randn(3, 8))
    opt = graphopt.optimize(model, target="x86", pipeline="", example_inputs=args)
    path = tmp_path_factory.mktemp("tables") / "tables.gopt"
    opt.save(str(path))
    return model, args, opt, graphopt.load(str(path))


@pytest.mark.parametrize("which,value,rows,where", [
    (0, 50, 50, "embedding"), (0, -1, 50, "embedding"), (0, 10**9, 50, "embedding"),
    (1, 7, 7, "index_select"), (1, -7, 7, "index_select"),
])
def test_out_of_range_indices_are_input_errors_as_in_torch(tables, which, value, rows, where):
    """TVM's gather does not check bounds (BERT with token id 10**6 segfaulted); torch raises IndexError. The
    compiled module (and the same module loaded from its artifact) raises InputError naming input, position,
    value, op and module before anything runs."""
    model, args, opt, loaded = tables
    bad = [a.clone() for a in args]
    flat = bad[which].view(-1)
    flat[-1] = value
    pos = tuple(int(p) for p in divmod(flat.numel() - 1, bad[which].shape[-1])) if bad[which].dim() == 2 \
        else (flat.numel() - 1,)
    with pytest.raises(IndexError):
        model(*bad)
    for m in (opt, loaded):
        with pytest.raises(InputError, match=re.escape(f"input {which}: index {value} at position {pos} is out "
                                                       f"of range for aten.{where}") + r".*" +
                           re.escape(f"({rows} rows: valid indices are 0..{rows - 1})")):
            m(*bad)
    with torch.no_grad():                                # in-range edge values still run and match
        edge = [a.clone() for a in args]
        edge[which].view(-1)[0] = rows - 1
        assert _max_rel(loaded(*edge), model(*edge)) < EXACT


def test_index_bounds_are_in_the_signature_only_for_index_inputs(tables):
    _, _, opt, loaded = tables
    for m in (opt, loaded):
        sig = m.compiled.signature()["inputs"]
        assert [s.get("index_bound") for s in sig] == [50, 7, None]
        assert "module 'tokens'" in sig[0]["index_of"]


def _torchvision_check(name: str, size: int):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = randomize_bn(getattr(torchvision.models, name)()).eval()
    x = torch.randn(1, 3, size, size)
    start = time.perf_counter()
    opt = graphopt.optimize(model, target="x86", pipeline="", example_inputs=(x,))
    compile_s = time.perf_counter() - start
    with torch.no_grad():
        ref = model(x)
    out = opt(x)
    assert math.isfinite(compile_s)
    assert _max_rel(out, ref) < 1e-4, name
    return opt


# ~12 s here, most of it lowering + LLVM codegen. The default suite checks the same in two cheaper halves:
# BN left unfolded (pipeline "") reaches TVM and is exact (test_unfolded_batchnorm_is_exact_through_export),
# and ResNet-18 itself compiles for x86 and matches eager (the session's resnet18_x86 build, default pipeline:
# test_end_to_end.py, test_schedules.py).
@pytest.mark.slow
def test_resnet18_small_input_matches_eager():
    _torchvision_check("resnet18", 64)


@pytest.mark.slow                                       # ~19 s here (52 layers to lower and build)
def test_mobilenet_v2_small_input_matches_eager():
    _torchvision_check("mobilenet_v2", 64)


def test_tvm_runtime_uses_the_physical_cores_unless_the_user_says_otherwise():
    """TVM 0.27 alone would size its pool at hardware_concurrency()/2 (1 thread on a 2-core machine)."""
    import os
    import subprocess
    import sys

    from graphopt.backends.targets import physical_cores

    import tvm

    code = ("import graphopt, tvm; print(tvm.get_global_func('runtime.NumThreads')())")
    env = {k: v for k, v in os.environ.items() if k != "TVM_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == str(physical_cores()), out.stderr[-1000:]
    # the user's setting wins: this process imported graphopt with TVM_NUM_THREADS already set (by
    # tests/conftest.py, or exported by whoever runs the tests)
    from tests.conftest import TVM_NUM_THREADS

    assert tvm.get_global_func("runtime.NumThreads")() == int(TVM_NUM_THREADS)


def _kernel_ir(opt) -> str:
    return "".join(m.inspect_source("ll") for m in opt.compiled.executable.mod.imports if m.kind == "llvm")


def test_cpu_kernels_are_compiled_without_argument_checks_and_the_vm_still_checks_its_inputs(monkeypatch):
    """The module's VM is the only caller of its kernels, so TVM's per-kernel argument checks (most of their
    LLVM IR and compile time) are left out; GRAPHOPT_KERNEL_ASSERTS=1 keeps them. The VM's own check of the
    inputs stays, below graphopt's InputError."""
    import numpy as np

    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval(), torch.randn(2, 8)
    fast = graphopt.optimize(model, "x86", example_inputs=(x,))
    monkeypatch.setenv("GRAPHOPT_KERNEL_ASSERTS", "1")
    checked = graphopt.optimize(model, "x86", example_inputs=(x,))
    monkeypatch.delenv("GRAPHOPT_KERNEL_ASSERTS")
    assert "Mismatched type on argument" in _kernel_ir(checked)
    assert "Mismatched type on argument" not in _kernel_ir(fast)
    assert len(_kernel_ir(fast)) * 2 < len(_kernel_ir(checked))
    with torch.no_grad():
        assert torch.equal(fast(x), checked(x))
        torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(InputError, match="expected shape"):
        fast(torch.randn(3, 8))
    fast.compiled._ensure_vm()
    with pytest.raises(Exception, match="input_shape"):          # the VM's entry check, below InputError
        fast.compiled._main(tvm.runtime.tensor(np.zeros((3, 8), "float32")))
