"""ARM (aarch64) target: cross-built here, run under qemu-user (or natively on ARM) through TVM RPC.

What is checked where:
  - always: the "arm" aliases resolve to aarch64 LLVM targets; unknown CPUs are refused by name.
  - with the cross compiler: optimize(target="arm:<cpu>") builds, the artifact holds an aarch64 ELF
    library and records its target; on x86 calling it or graphopt.load()ing it is a clear error; a missing
    cross compiler is a clear error naming it.
  - with qemu + the aarch64 TVM runtime (scripts/setup_cross.sh): the artifact's library runs on the
    aarch64 RPC server and matches PyTorch.
"""
import os
import platform
import zipfile

import pytest
import torch
from torch import nn

import graphopt
from graphopt.artifact import read_metadata
from graphopt.backends.targets import resolve_target
from graphopt.backends.tvm import cross, rpc
from graphopt.errors import ArtifactError, GraphoptError, InputError, RemoteError
from tests.backends.conftest import (ON_AARCH64, assert_maps_tvm_without_torch, needs_aarch64_runtime, needs_cross,
                                     reads_proc_maps)
from tests.helpers import randomize_bn


class TwoHead(nn.Module):
    """Conv + BN + ReLU, then a classifier head and a per-channel statistic: two outputs (a tuple)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        return self.fc(y.mean((2, 3))), y.sum((1,))


def _model_and_input():
    return randomize_bn(TwoHead()).eval(), torch.randn(2, 3, 8, 8)


def _library(path) -> bytes:
    meta = read_metadata(path)
    with zipfile.ZipFile(path) as zf:
        return zf.read(meta["payload"]["file"])


@pytest.fixture(scope="module")
def arm_artifact(tmp_path_factory):
    """(model, input, OptimizedModel, artifact path) for target arm:cortex-a72 (one build for the module)."""
    if cross.find_cross_cxx() is None:
        pytest.skip("no aarch64 cross compiler (aarch64-linux-gnu-g++): run scripts/setup_cross.sh")
    model, x = _model_and_input()
    opt = graphopt.optimize(model, target="arm:cortex-a72", example_inputs=(x,))
    path = opt.save(tmp_path_factory.mktemp("arm") / "twohead.gopt")
    return model, x, opt, path


# ------------------------------------------------------------------------------------------- targets
@pytest.mark.parametrize("alias,cpu", [("arm", "generic"), ("arm:cortex-a72", "cortex-a72"),
                                       ("arm:neoverse-n1", "neoverse-n1"), ("aarch64:cortex-a76", "cortex-a76")])
def test_arm_aliases_are_aarch64_llvm_targets(alias, cpu):
    spec = resolve_target(alias)
    assert spec.kind == "llvm" and spec.arch == "aarch64"
    assert spec.tvm["mtriple"] == "aarch64-linux-gnu" and spec.tvm["mcpu"] == cpu
    assert "+neon" in spec.tvm["mattr"]
    assert spec.is_host == ON_AARCH64
    spec.tvm_target()                           # TVM accepts it


def test_unknown_arm_cpu_is_refused_by_name():
    with pytest.raises(GraphoptError, match="cortex-z99"):
        resolve_target("arm:cortex-z99")


# ------------------------------------------------------------------------------------ cross building
@needs_cross
def test_cross_build_exports_an_aarch64_library_with_its_target(arm_artifact):
    _, _, opt, path = arm_artifact
    meta = read_metadata(path)
    assert meta["target"]["alias"] == "arm:cortex-a72" and meta["target"]["arch"] == "aarch64"
    assert meta["target"]["tvm"]["mtriple"] == "aarch64-linux-gnu"
    assert cross.elf_machine(_library(path)) == "aarch64"
    assert opt.report.backend["target"] == "arm:cortex-a72"


@needs_cross
def test_elf_machine_tells_host_and_aarch64_libraries_apart(tmp_path):
    assert cross.elf_machine(b"not an elf file at all") is None
    host_lib = tmp_path / "host.so"
    import tvm
    from tvm import te

    a = te.placeholder((4,), name="a")
    b = te.compute((4,), lambda i: a[i] + 1.0, name="b")
    for target, name, machine in ((resolve_target("x86" if not ON_AARCH64 else "arm:native").tvm, host_lib,
                                   platform.machine()),
                                  (resolve_target("arm:cortex-a72").tvm, tmp_path / "arm.so", "aarch64")):
        lib = tvm.compile(te.create_prim_func([a, b]), target=tvm.target.Target(target))
        opts = {} if name == host_lib else {"fcompile": cross.cross_fcompile()}
        lib.export_library(str(name), **opts)
        assert cross.elf_machine(name) == machine


@pytest.mark.skipif(ON_AARCH64, reason="on an aarch64 host ARM code runs natively")
@needs_cross
def test_arm_module_on_x86_is_a_clear_error(arm_artifact):
    _, x, opt, path = arm_artifact
    with pytest.raises(GraphoptError, match=r"arm:cortex-a72.*cannot run here.*x86_64"):
        opt(x)
    with pytest.raises(ArtifactError, match=r"arm:cortex-a72.*aarch64.*x86_64"):
        graphopt.load(path)


@pytest.mark.skipif(ON_AARCH64, reason="an aarch64 host links natively")
def test_missing_cross_compiler_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("GRAPHOPT_AARCH64_CXX", "graphopt-no-such-aarch64-g++")
    assert cross.find_cross_cxx() is None
    model, x = _model_and_input()
    opt = graphopt.optimize(model, target="arm:cortex-a72", example_inputs=(x,))   # codegen needs no linker
    with pytest.raises(ArtifactError, match=r"graphopt-no-such-aarch64-g\+\+.*setup_cross\.sh"):
        opt.save(tmp_path / "m.gopt")
    assert not os.path.exists(tmp_path / "m.gopt")


# ------------------------------------------------------------------------------- running on aarch64
@needs_aarch64_runtime
@reads_proc_maps
def test_device_server_loads_tvm_without_ml_dtypes_or_torch(aarch64_server):
    """rpc_device_server.py makes TVM's optional `import ml_dtypes` / `import torch` fail: 4.5 of the 8 s TVM's
    import took under qemu. The shared objects the server process mapped say what it loaded."""
    assert_maps_tvm_without_torch(aarch64_server.proc.pid, "libtvm_runtime")


@needs_cross
@needs_aarch64_runtime
def test_arm_artifact_runs_on_aarch64_and_matches_torch(arm_artifact, aarch64_server):
    model, x, _, path = arm_artifact
    session = rpc.connect(aarch64_server.device, timeout=120)
    remote = rpc.load_remote(path, session)
    with torch.no_grad():
        want = model(x)
    got = remote(x)
    assert isinstance(got, tuple) and len(got) == 2
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    x2 = torch.randn_like(x)                       # a second call with new data: no stale state
    with torch.no_grad():
        torch.testing.assert_close(remote(x2)[0], model(x2)[0], rtol=1e-5, atol=1e-5)
    seconds = remote.time(x, number=2, repeat=2)
    assert len(seconds) == 2 and all(0 < s < 10 for s in seconds)
    with pytest.raises(InputError, match=r"input 0: expected tensor\(2, 3, 8, 8\)"):
        remote(torch.randn(1, 3, 8, 8))


@needs_cross
@needs_aarch64_runtime
def test_other_arm_cpu_and_in_memory_model_run_on_aarch64(aarch64_server):
    """neoverse-n1 code (a different -mcpu) and a model not saved first (load_remote of an OptimizedModel)."""
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4)).eval()
    x = torch.randn(3, 16)
    opt = graphopt.optimize(model, target="arm:neoverse-n1", example_inputs=(x,))
    remote = rpc.load_remote(opt, rpc.connect(aarch64_server.device, timeout=120))
    with torch.no_grad():
        torch.testing.assert_close(remote(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(ON_AARCH64, reason="needs a library of another architecture than the device's")
@needs_aarch64_runtime
def test_x86_library_on_the_aarch64_device_is_a_clear_error(aarch64_server):
    model = nn.Sequential(nn.Linear(4, 2)).eval()
    opt = graphopt.optimize(model, target="x86", example_inputs=(torch.randn(1, 4),))
    session = rpc.connect(aarch64_server.device, timeout=120)
    with pytest.raises(RemoteError, match=r"cannot load the library compiled for 'x86:.*x86_64"):
        rpc.load_remote(opt, session)


# ------------------------------------------------------------------------------- int8 on aarch64
def test_int8_path_on_arm_follows_dotprod():
    from graphopt.backends.tvm.quant_lower import int8_path

    assert int8_path(resolve_target("arm:cortex-a76")) == int8_path(resolve_target("arm:neoverse-n1")) == "sdot"
    assert int8_path(resolve_target("arm:cortex-a72")) == int8_path(resolve_target("arm:generic")) == "cpu"


@needs_cross
@needs_aarch64_runtime
def test_int8_kernels_run_on_aarch64_and_equal_the_qdq_graph(aarch64_server):
    """sdot (cortex-a76: +dotprod) under qemu: linear, strided/dilated conv, batched matmul and the
    all-extremes case, bit for bit (scale 1, bias 0) against the QDQ graph in PyTorch; uint8 activations are
    shifted to int8 for sdot. (The generic widening kernels are checked the same way on x86:nehalem.)"""
    from tests.quant.test_int8_paths import Layers, _inputs, asm_of

    module, args = Layers(127).eval(), _inputs()
    with torch.no_grad():
        refs = module(*args)
    opt = graphopt.optimize(module, target="arm:cortex-a76", pipeline=[], example_inputs=args)
    line = opt.report.backend["int8"]
    assert line.startswith("path=sdot:") and "qlinear:sdot×2" in line and "qmatmul:sdot×1" in line
    assert "sdot\tv" in asm_of(opt.compiled.executable)
    remote = rpc.load_remote(opt, rpc.connect(aarch64_server.device, timeout=120))
    for got, ref in zip(remote(*args), refs):
        assert torch.equal(got, ref)


# ------------------------------------------------------------------------------- PyTorch's semantics on aarch64
@needs_cross
@needs_aarch64_runtime
def test_opinfo_samples_with_nan_and_inf_match_pytorch_on_aarch64(aarch64_session):
    """The OpInfo differential harness (graphopt.testing.opinfo) on the ARM build: NaN/Inf samples of the
    ops whose NaN semantics the backend rewrites (relu, clamp, maximum, amax) give PyTorch's answers there
    too (AArch64 FMAX/FMIN from llvm.maximum/minimum), and graphopt's softmax kernel (its row max a maxnum,
    FMAXNM there). The full sweep: benchmarks/opinfo_sweep.py --target arm."""
    from graphopt.testing import opinfo

    cases = opinfo.make_cases(["nn.functional.relu", "clamp", "maximum", "amax", "softmax"], samples=1,
                              variants=["nonfinite"])
    results = opinfo.run_cases(cases, target="arm:cortex-a72", batch=len(cases),
                               execute=opinfo.remote_executor(aarch64_session))
    assert len(results) == len(cases) >= 4
    assert all(r.kind == "match" for r in results), opinfo.summarize(results)


@needs_cross
@needs_aarch64_runtime
def test_winograd_convolutions_run_on_aarch64(aarch64_server):
    """precision="winograd" with NEON's 4 lanes: the same kernels as on x86, run on the aarch64 device; finite
    outputs within the contract, inf/NaN inputs exactly as PyTorch."""
    from tests.backends.test_winograd import _Block

    torch.manual_seed(0)
    model = _Block().eval()
    x = torch.randn(2, 3, 16, 16)
    opt = graphopt.optimize(model, target="arm", pipeline="fold_bn,cleanup", example_inputs=(x,),
                            precision="winograd")
    assert "3 3x3 convolution(s)" in opt.report.backend["precision"]
    remote = rpc.load_remote(opt, rpc.connect(aarch64_server.device, timeout=120))
    with torch.no_grad():
        ref = model(x)
        assert (remote(x) - ref).abs().max() <= 1e-4 * ref.abs().max()
        bad = x.clone()
        bad[0, 1, 4, 4], bad[1, 0, 9, 3] = float("nan"), float("inf")
        out, ref = remote(bad), model(bad)
        assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())


@pytest.mark.slow        # suite time (issue 16): four sparse builds under qemu (~7 s); the N:M int8 kernels run there by default (test_nm_kernels.py)
@needs_cross
@needs_aarch64_runtime
def test_sparse_int8_kernels_run_on_aarch64_and_equal_dense_int8(aarch64_server):
    """sparsify, then quantize, on sdot (cortex-a76): the N:M int8 kernel (tbl + sdot) at 2:4, the block-sparse
    qrow (16x1, one row) and qmvec (unstructured, 20 rows: lanes over rows) kernels, each equal to the dense int8
    build bit for bit on the aarch64 device."""
    from tests.backends.conftest import run_on_aarch64
    from tests.backends.test_sparse_int8 import _MLP, _NMMLP

    for model, pattern, shape, kind in [(_NMMLP, "2:4", (1, 72), "qnm 2:4"), (_MLP, "16x1", (1, 70), "qrow"),
                                        (_MLP, "unstructured", (20, 70), "qmvec")]:
        sparsity = 0.5 if ":" in pattern else 0.6
        outs = {}
        for kernel in ("sparse", "dense"):
            torch.manual_seed(0)
            x = torch.randn(*shape)
            calib = [(torch.randn(*shape),) for _ in range(3)]
            opt = graphopt.optimize(model().eval(), target="arm:cortex-a76", example_inputs=(x,), calibration=calib,
                                    pipeline=f"sparsify(sparsity={sparsity},pattern={pattern},kernel={kernel}),"
                                             "quantize(progress=false)")
            want = f"sparse int8 {kind}" if kernel == "sparse" else "dense int8"
            assert opt.report.backend["sparse_layers"][0]["kernel"] == want
            outs[kernel] = run_on_aarch64(opt, aarch64_server, x)
        assert torch.equal(outs["sparse"], outs["dense"]), pattern
        torch.testing.assert_close(outs["sparse"], opt.graph_module(x), rtol=1e-4, atol=1e-4)


@needs_cross
@needs_aarch64_runtime
def test_fused_attention_runs_on_aarch64(aarch64_server):
    """The fused attention kernel with NEON's 4 lanes (8-column tiles), a causal mask and
    scaled_dot_product_attention's safe softmax: one attention kernel, PyTorch's values on the aarch64 device,
    NaN rows where PyTorch has them."""
    from tests.backends.test_fused_attention import _Attention, _Sdpa

    torch.manual_seed(0)
    session = rpc.connect(aarch64_server.device, timeout=120)       # one session: the device serves one at a time
    for model in (_Attention(mask=True).eval(), _Sdpa().eval()):
        x = torch.randn(2, 11, 64)
        opt = graphopt.optimize(model, target="arm:cortex-a72", pipeline="cleanup", example_inputs=(x,))
        text = opt.compiled.executable.as_text()            # the VM program: what it calls
        assert "attention" in text and "softmax" not in text, text
        remote = rpc.load_remote(opt, session)
        with torch.no_grad():
            torch.testing.assert_close(remote(x), model(x), rtol=1e-4, atol=1e-5)
            bad = x.clone()
            bad[1, 3, 0] = float("nan")
            torch.testing.assert_close(remote(bad), model(bad), rtol=1e-4, atol=1e-5, equal_nan=True)


def test_fused_inverted_residual_runs_on_aarch64(aarch64_server):
    """The fused inverted residual kernel with NEON's 4 lanes (stride 1 with residual, stride 2): one kernel per
    block, PyTorch's values on the aarch64 device, NaN where PyTorch has it."""
    from tests.backends.test_fused_inverted_residual import _Block, _fused_calls

    torch.manual_seed(0)
    session = rpc.connect(aarch64_server.device, timeout=120)       # one session: the device serves one at a time
    model = nn.Sequential(_Block(8, 48, 3, 1, 8, residual=True), _Block(8, 24, 3, 2, 16)).eval()
    x = torch.randn(1, 8, 26, 26)
    opt = graphopt.optimize(model, target="arm:cortex-a72", pipeline="cleanup", example_inputs=(x,))
    assert _fused_calls(opt) >= 2
    remote = rpc.load_remote(opt, session)
    with torch.no_grad():
        torch.testing.assert_close(remote(x), model(x), rtol=1e-4, atol=1e-5)
        bad = x.clone()
        bad[0, 3, 10, 10] = float("nan")
        torch.testing.assert_close(remote(bad), model(bad), rtol=1e-4, atol=1e-5, equal_nan=True)
