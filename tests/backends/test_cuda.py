"""CUDA target: dlight default schedules, device code built by nvcc (with or without a GPU), running on a GPU.

Checked on any machine with nvcc: every kernel gets GPU thread bindings; optimize(target="cuda:sm_XX")
builds and the saved library holds SASS + PTX for exactly that architecture, which TVM's own library
loader hands to the CUDA module loader as a fatbin. Without a GPU, calling or loading the model is a clear
error. The run/accuracy checks need a GPU and are skipped, naming what is missing, where there is none.
"""
import struct
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch
from torch import nn

import graphopt
from graphopt.artifact import read_metadata
from graphopt.backends.targets import cuda_available, resolve_target
from graphopt.backends.tvm import cuda
from graphopt.capture import capture
from graphopt.errors import ArtifactError, BuildError, GraphoptError
from tests.helpers import randomize_bn

NO_NVCC = "nvcc (CUDA toolkit) not found on PATH, CUDA_HOME or /usr/local/cuda"
NO_GPU = "no CUDA GPU here (torch.cuda.is_available() is False)"
needs_nvcc = pytest.mark.skipif(cuda.find_nvcc() is None, reason=NO_NVCC)
needs_gpu = pytest.mark.skipif(not cuda_available(), reason=NO_GPU)
without_gpu = pytest.mark.skipif(cuda_available(), reason="a CUDA GPU is present: the no-GPU behaviour is not testable")
placeholder_only = pytest.mark.skipif(
    cuda.cuda_runtime_available(),
    reason="TVM's CUDA runtime is loaded here, so TVM compiles device code itself (graphopt's nvcc embedding unused)")


def _convnet():
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                      nn.Linear(8 * 8 * 8, 10), nn.Softmax(-1))
    return randomize_bn(m).eval(), torch.randn(2, 3, 8, 8)


def _library(path) -> bytes:
    meta = read_metadata(path)
    with zipfile.ZipFile(path) as zf:
        return zf.read(meta["payload"]["file"])


@pytest.fixture(scope="module")
def sm80_artifact(tmp_path_factory):
    if cuda.find_nvcc() is None and not cuda.cuda_runtime_available():
        pytest.skip(NO_NVCC)
    model, x = _convnet()
    opt = graphopt.optimize(model, target="cuda:sm_80", example_inputs=(x,))
    return model, x, opt, opt.save(tmp_path_factory.mktemp("cuda") / "convnet.gopt")


# ------------------------------------------------------------------------------------------- targets
def test_cuda_aliases():
    spec = resolve_target("cuda:sm_80")
    assert spec.kind == "cuda" and spec.arch == "sm_80"
    assert spec.tvm["kind"] == "cuda" and spec.tvm["arch"] == "sm_80" and spec.tvm["host"]["kind"] == "llvm"
    assert int(str(spec.tvm_target().arch)[3:]) == 80
    assert resolve_target("cuda:sm_90a").arch == "sm_90a"
    default = resolve_target("cuda")
    if cuda_available():
        major, minor = torch.cuda.get_device_capability(0)
        assert default.arch == f"sm_{major}{minor}"
    else:
        assert default.arch == "sm_80"
    for bad in ("cuda:80", "cuda:compute_80", "cuda:sm_x"):
        with pytest.raises(GraphoptError, match="bad CUDA architecture"):
            resolve_target(bad)


# ----------------------------------------------------------------------------------------- schedules
def test_default_gpu_schedules_bind_every_kernel_to_threads():
    import tvm
    from tvm import relax

    from graphopt.backends.tvm.lower import lower_graph

    model, x = _convnet()
    lowered = lower_graph(capture(model, (x,)).gm, (x,))
    spec = resolve_target("cuda:sm_80")
    with spec.tvm_target():
        unscheduled = tvm.transform.Sequential([relax.transform.LegalizeOps(), relax.transform.FuseOps(),
                                                relax.transform.FuseTIR()])(lowered.mod)
    assert cuda.unscheduled_kernels(unscheduled), "the check must see kernels without thread bindings"
    scheduled = cuda.schedule_for_gpu(lowered.mod, spec)
    kernels = [g.name_hint for g, f in scheduled.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert any("conv2d" in k for k in kernels) and any("softmax" in k or "matmul" in k for k in kernels)
    assert cuda.unscheduled_kernels(scheduled) == []


# --------------------------------------------------------------------------------------- device code
@needs_nvcc
def test_cuda_build_holds_device_code_for_the_requested_arch(sm80_artifact):
    _, _, opt, path = sm80_artifact
    meta = read_metadata(path)
    assert meta["target"]["alias"] == "cuda:sm_80" and meta["target"]["arch"] == "sm_80"
    assert opt.report.backend["cuda_arch"] == "sm_80"
    images = cuda.device_images(_library(path))
    sass = {i.arch for i in images if i.kind == "sass"}
    assert sass == {"sm_80"}, images
    if not cuda.cuda_runtime_available():
        assert opt.report.backend["cuda_compiler"] == "nvcc"
        assert {i.arch for i in images if i.kind == "ptx"} == {"compute_80"}
        assert b'extern "C" __global__' not in _library(path)      # source replaced by device code


@needs_nvcc
def test_other_arch_gives_other_device_code(tmp_path):
    model, x = _convnet()
    opt = graphopt.optimize(model, target="cuda:sm_90", example_inputs=(x,))
    images = cuda.device_images(_library(opt.save(tmp_path / "m90.gopt")))
    assert {i.arch for i in images if i.kind == "sass"} == {"sm_90"}


@needs_nvcc
@placeholder_only
def test_tvm_library_loader_hands_the_fatbin_to_the_cuda_loader(sm80_artifact, tmp_path):
    """Load the saved library with TVM's real loader in a fresh process. Without a CUDA runtime there is no
    'ffi.Module.load_from_bytes.cuda'; the probe registers one that records what TVM's loader passes it
    (the serialized device module: format, function table, code) and returns an empty module. The probe
    imports only TVM (without PyTorch and ml_dtypes, which it does not need: ~1 s instead of ~4 s)."""
    lib = tmp_path / "model.so"
    lib.write_bytes(_library(sm80_artifact[3]))
    seen_file = tmp_path / "seen.bin"
    probe = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = sys.modules["ml_dtypes"] = None
        import tvm, tvm_ffi
        seen = []
        @tvm_ffi.register_global_func("ffi.Module.load_from_bytes.cuda")
        def _load(payload):
            seen.append(bytes(payload))
            return tvm_ffi.get_global_func("runtime.SourceModuleCreate")("", "probe")
        mod = tvm.runtime.load_module({str(lib)!r})
        assert mod.kind == "relax.VMExecutable", mod.kind
        assert len(seen) == 1, len(seen)
        open({str(seen_file)!r}, "wb").write(seen[0])
    """)
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    payload = seen_file.read_bytes()
    (n,) = struct.unpack_from("<Q", payload, 0)
    code_len = None
    for start in range(len(payload) - 8, 8, -1):        # the code is the payload's last length-prefixed field
        (m,) = struct.unpack_from("<Q", payload, start)
        if start + 8 + m == len(payload) and payload[start + 8:start + 12] == struct.pack("<I", 0xBA55ED50):
            code_len = m
            break
    assert payload[8:8 + n].decode() == "fatbin" and code_len
    images = sorted({(i.kind, i.arch) for i in cuda.device_images(payload[-code_len:])})
    assert images == [("ptx", "compute_80"), ("sass", "sm_80")]


@needs_nvcc
def test_device_images_of_cubin_and_ptx():
    source = textwrap.dedent("""
        extern "C" __global__ void add_one(float* __restrict__ x, int n) {
          int i = blockIdx.x * blockDim.x + threadIdx.x;
          if (i < n) x[i] += 1.0f;
        }
    """)
    cubin = cuda.compile_device_code(source, "sm_75", fmt="cubin")
    assert [(i.kind, i.arch) for i in cuda.device_images(cubin)] == [("sass", "sm_75")]
    ptx = cuda.compile_device_code(source, "sm_86", fmt="ptx")
    assert [(i.kind, i.arch) for i in cuda.device_images(ptx)] == [("ptx", "compute_86")]
    fatbin = cuda.compile_device_code(source, "sm_86")
    assert sorted((i.kind, i.arch) for i in cuda.device_images(fatbin)) == [("ptx", "compute_86"), ("sass", "sm_86")]
    assert cuda.device_images(source.encode()) == []


@needs_nvcc
def test_nvcc_errors_are_build_errors_with_nvcc_s_message():
    with pytest.raises(BuildError, match=r"nvcc failed.*sm_80.*undefined_thing"):
        cuda.compile_device_code('extern "C" __global__ void k(float* x) { x[0] = undefined_thing; }', "sm_80")
    with pytest.raises(BuildError, match="bad CUDA architecture"):
        cuda.compile_device_code('extern "C" __global__ void k() {}', "80")


@placeholder_only
def test_missing_nvcc_is_a_build_error_naming_it(monkeypatch):
    monkeypatch.setenv("GRAPHOPT_NVCC", "/nonexistent/graphopt-test/nvcc")
    model = nn.Sequential(nn.Linear(7, 3), nn.Tanh()).eval()          # a kernel no other test compiles
    with pytest.raises(BuildError, match="nvcc not found"):
        graphopt.optimize(model, target="cuda:sm_80", example_inputs=(torch.randn(5, 7),))


# -------------------------------------------------------------------------------------------- running
@without_gpu
@needs_nvcc
def test_cuda_model_without_gpu_is_a_clear_error(sm80_artifact):
    _, x, opt, path = sm80_artifact
    with pytest.raises(GraphoptError, match=r"cuda:sm_80.*no CUDA GPU"):
        opt(x)
    with pytest.raises(ArtifactError, match=r"cuda:sm_80.*needs a CUDA GPU"):
        graphopt.load(path)


@needs_gpu
def test_cuda_model_runs_on_the_gpu_and_matches_torch(tmp_path):
    model, x = _convnet()
    opt = graphopt.optimize(model, target="cuda", example_inputs=(x,))
    xc = x.cuda()
    with torch.no_grad():
        want = model.cuda()(xc)
    got = opt(xc)
    assert got.device.type == "cuda"
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)     # TVM builds CUDA with --use_fast_math
    loaded = graphopt.load(opt.save(tmp_path / "gpu.gopt"))
    torch.testing.assert_close(loaded(xc), got, rtol=0, atol=0)


@needs_gpu
def test_float16_cuda_model_runs_on_the_gpu_and_matches_torch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 128)).eval()
    x = torch.randn(128, 256)
    opt = graphopt.optimize(model, target="cuda", example_inputs=(x,), precision="float16")
    xc = x.cuda()
    with torch.no_grad():
        want = model.cuda()(xc)
    got = opt(xc)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)      # float16 operands, float32 accumulation


# -------------------------------------------------------------------------------- compatibility, tuning
def test_gpu_mismatch_follows_sass_and_ptx_compatibility():
    assert cuda.gpu_mismatch("sm_80", (8, 0)) is None
    assert cuda.gpu_mismatch("sm_80", (8, 6)) is None             # SASS of the same major
    assert cuda.gpu_mismatch("sm_80", (9, 0)) is None             # PTX compute_80 compiles for newer GPUs
    assert "needs at least compute capability 8.6" in cuda.gpu_mismatch("sm_86", (8, 0))
    assert "this GPU is sm_75" in cuda.gpu_mismatch("sm_80", (7, 5))
    assert cuda.gpu_mismatch("sm_90a", (9, 0)) is None
    assert "needs exactly compute capability 9.0" in cuda.gpu_mismatch("sm_90a", (10, 0))


@without_gpu
def test_tuning_for_cuda_without_a_gpu_is_a_tuning_error():
    from graphopt.errors import TuningError

    model = nn.Sequential(nn.Linear(8, 4)).eval()
    with pytest.raises(TuningError, match=r"cuda:sm_80.*measures candidate kernels on a CUDA GPU.*no CUDA GPU"):
        graphopt.optimize(model, target="cuda:sm_80", example_inputs=(torch.randn(2, 8),), tune=4)


@needs_gpu
def test_tuned_cuda_model_runs_on_the_gpu_and_matches_torch():
    model, x = _convnet()
    opt = graphopt.optimize(model, target="cuda", example_inputs=(x,), tune={"trials": 8})
    assert opt.report.backend["schedule"] == "metaschedule+dlight-default"
    xc = x.cuda()
    with torch.no_grad():
        torch.testing.assert_close(opt(xc), model.cuda()(xc), rtol=1e-3, atol=1e-4)


def test_cuda_target_carries_the_thread_limits():
    """MetaSchedule's AutoBind and dlight read these; without them GPU tuning stopped on an H200 with
    "missing attribute `max_threads_per_block`" before any candidate was measured."""
    for alias in ("cuda:sm_75", "cuda:sm_90"):
        attrs = resolve_target(alias).tvm_target().attrs
        assert int(attrs["max_threads_per_block"]) == 1024 and int(attrs["thread_warp_size"]) == 32
        assert int(attrs["max_shared_memory_per_block"]) == 49152


@pytest.mark.slow
def test_cuda_target_builds_metaschedule_tune_contexts():
    """GPU tuning builds one MetaSchedule TuneContext per kernel, which fails without the target's thread
    limits. Building the contexts needs no GPU, but takes minutes here (TuneContext loads TVM's CUDA tensor
    intrinsics), hence slow."""
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    from graphopt.backends.tvm.lower import lower_graph

    model, x = _convnet()
    lowered = lower_graph(capture(model, (x,)).gm, (x,))
    target = resolve_target("cuda:sm_90").tvm_target()
    assert int(target.attrs["max_threads_per_block"]) == 1024 and int(target.attrs["thread_warp_size"]) == 32
    with target:
        mod = relax.transform.LegalizeOps()(lowered.mod)
    tasks = ms.relax_integration.extract_tasks(mod, target)
    assert tasks
    for task in tasks:
        space = ms.space_generator.PostOrderApply(sch_rules=[ms.schedule_rule.AutoBind()], postprocs=[],
                                                  mutator_probs={})
        ctx = ms.TuneContext(mod=task.dispatched[0], target=target, space_generator=space,
                             task_name=task.task_name)
        assert ctx.generate_design_space()


def test_gpu_tuning_cost_model_falls_back_to_random_without_xgboost(monkeypatch):
    import builtins

    assert cuda._gpu_cost_model() in ("xgb", "random")
    real_import = builtins.__import__

    def no_xgboost(name, *args, **kwargs):
        if name == "xgboost":
            raise ImportError("no xgboost here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_xgboost)
    assert cuda._gpu_cost_model() == "random"


@pytest.mark.slow        # suite time (issue 16): a MetaSchedule build worker and nvcc (~7 s)
def test_gpu_tuning_builder_builds_and_exports_a_candidate():
    """MetaSchedule's LocalBuilder runs cuda._gpu_build in a worker and exports what it returns. With
    tvm.compile's Executable that was a bare Function and every candidate failed ('no attribute
    export_library', seen on an H200); building needs no GPU, so it is checked here."""
    import tvm
    from tvm import te
    from tvm.s_tir import dlight as dl
    from tvm.s_tir import meta_schedule as ms

    target = resolve_target("cuda:sm_80").tvm_target()
    a = te.placeholder((8, 64, 7, 7), name="a")
    k1, k2 = te.reduce_axis((0, 7)), te.reduce_axis((0, 7))
    b = te.compute((8, 64), lambda n, c: te.sum(a[n, c, k1, k2], axis=[k1, k2]), name="b")
    mod = tvm.IRModule({"main": te.create_prim_func([a, b])})
    with target:
        mod = dl.ApplyDefaultSchedule(*cuda.default_schedule_rules())(mod)
    builder = ms.builder.LocalBuilder(f_build=cuda._gpu_build(), timeout_sec=300, max_workers=1)
    (result,) = builder.build([ms.builder.BuilderInput(mod, target)])
    assert result.error_msg is None, result.error_msg[-2000:]
    assert result.artifact_path and result.artifact_path.endswith(".tar")


@pytest.mark.slow        # suite time (issue 16): CUDA tuning bookkeeping (~4 s); the CPU's is in test_tune.py
def test_gpu_recompile_from_kept_records_runs_no_new_trials(monkeypatch, tmp_path):
    """A second tuned build with the same database and trial count measures nothing new (the records and
    graphopt_cuda_progress.json say the trials were run); only the missing trials are run when more are asked.
    The GPU check is bypassed: with nothing to measure, no GPU is touched."""
    import contextlib
    import json

    import tvm
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    from graphopt.backends.tvm.lower import lower_graph

    model, x = _convnet()
    spec = resolve_target("cuda:sm_80")
    target = spec.tvm_target()
    with target:
        mod = relax.transform.LegalizeOps()(lower_graph(capture(model, (x,)).gm, (x,)).mod)
    tasks = ms.relax_integration.extract_tasks(mod, target, {}, module_equality="structural")
    (tmp_path / cuda.CUDA_PROGRESS_FILE).write_text(json.dumps(
        {"version": 1, "tasks": {cuda._task_set_key(tasks): {"searched": 16}}}))
    monkeypatch.setattr("graphopt.backends.targets.cuda_available", lambda: True)
    monkeypatch.setattr(cuda, "cuda_runtime_available", lambda: True)
    ran = []
    monkeypatch.setattr(ms.tune, "tune_tasks", lambda **kw: ran.append(kw["max_trials_global"]))
    # building the TuneContexts loads TVM's CUDA tensor intrinsics (minutes); the trial accounting needs none
    monkeypatch.setattr("graphopt.backends.tvm.tuning.logs.tune_contexts",
                        contextlib.contextmanager(lambda tasks, work_dir: (yield [], [])))
    _, summary = cuda._tune_on_gpu(mod, spec, target, {"trials": 16, "database": str(tmp_path)})
    assert ran == [] and summary["new_trials"] == 0 and summary["tasks"] == len(tasks)
    _, summary = cuda._tune_on_gpu(mod, spec, target, {"trials": 40, "database": str(tmp_path)})
    assert ran == [24] and summary["new_trials"] == 24          # only what is missing
    assert isinstance(mod, tvm.IRModule)
