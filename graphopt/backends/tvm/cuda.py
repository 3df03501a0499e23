"""CUDA: default GPU schedules (dlight), device code built with nvcc (also without a GPU), inspection.

Schedules. Untuned, every fused TIR kernel is scheduled by dlight's GPU rules (`default_schedule_rules()`:
Matmul, GEMV, Reduction, GeneralReduction, then Fallback, which binds any remaining kernel to blocks and
threads). TVM's CUDA Relax pipeline applies exactly these (`tvm.relax.backend.cuda.pipeline`), which is
what `schedule_cuda()` (build.py's CUDA scheduling) runs; `schedule_for_gpu()` runs the same scheduling alone
so tests can check that no kernel is left without thread bindings. Tuned schedules: `schedule_cuda(tune=...)`
runs MetaSchedule on this machine's GPU (it must measure on one), applies the best records, and leaves the rest
to dlight.

Device code. TVM's codegen emits CUDA C++ for the device kernels. Where TVM's CUDA runtime is loaded (a
machine with a driver) TVM compiles it at build time through its `tvm_callback_cuda_compile`; graphopt points
that callback at its own nvcc compile while it builds (unless the user set TVM_CUDA_COMPILE_MODE, or there is
no nvcc: then TVM's NVRTC). Where it is not (no driver:
TVM keeps the CUDA *source* in a placeholder module), `build_device_code()` compiles that source with nvcc
for the target's architecture at build time, and `export_options()` makes `export_library` embed the nvcc
output in place of the source, so a library built here holds real device code:
  fatbin (default): SASS for sm_XX plus PTX for compute_XX (newer GPUs JIT the PTX), via
  `nvcc --fatbin -gencode arch=compute_XX,code=[sm_XX,compute_XX]` with TVM's nvcc flags (TVM's default
  --use_fast_math included, as on a GPU machine).
A GPU machine loads it with cuModuleLoadData through TVM's own CUDA loader; nothing is compiled there.

Inspection. `device_images(path_or_bytes)` lists the SASS/PTX images (kind, architecture, size) found in
a library file, fatbin, cubin or PTX text.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ...errors import BuildError
from ..targets import TargetSpec, gpu_mismatch  # noqa: F401 - gpu_mismatch is part of this module's API

__all__ = ["default_schedule_rules", "schedule_for_gpu", "schedule_cuda", "unscheduled_kernels", "find_nvcc",
           "cuda_runtime_available", "compile_device_code", "nvcc_compile_mode", "build_device_code",
           "export_options", "gpu_mismatch", "DeviceImage", "device_images", "DEVICE_FORMAT"]

DEVICE_FORMAT = "fatbin"
CUDA_PROGRESS_FILE = "graphopt_cuda_progress.json"   # trials measured per set of kernels, beside the records
_FATBIN_MAGIC = 0xBA55ED50
_EM_CUDA = 190
_compiled: dict[tuple[str, str, str], bytes] = {}       # (sha256(source), arch, fmt) -> device code
_lock = threading.Lock()


# ------------------------------------------------------------------------------------------- schedules
def default_schedule_rules():
    """dlight's GPU rules, in the order graphopt (and TVM's CUDA pipeline) tries them."""
    from tvm.s_tir import dlight as dl

    return [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]


def schedule_for_gpu(mod, spec: TargetSpec):
    """Legalize, fuse and schedule a Relax module's kernels for `spec` with the default rules (no codegen)."""
    import tvm
    from tvm import relax
    from tvm.s_tir import dlight as dl

    target = spec.tvm_target()
    with target:
        seq = tvm.transform.Sequential([
            relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(),
            relax.transform.FuseOps(), relax.transform.FuseTIR(),
            dl.ApplyDefaultSchedule(*default_schedule_rules()),
        ])
        return seq(mod)


def schedule_cuda(mod, spec: TargetSpec, tune=None, report=None):
    """Relax module -> scheduled module for a CUDA `spec` (build._schedule calls this for CUDA targets).

    tune=None: TVM's CUDA library dispatch, then legalize/fold/fuse and dlight's default GPU rules (the
    passes of tvm.relax.backend.cuda.pipeline). Tuning options (True, a trial count, a dict or tune.TuneOptions;
    see tune.coerce_tune): MetaSchedule tunes the kernels on this machine's GPU first (TuningError naming what
    is missing when there is none: candidates must be measured on a GPU), the best records are applied, and
    dlight schedules whatever has no record.
    """
    import tvm
    from tvm import relax
    from tvm.relax.backend.cuda import pipeline as cuda_pipeline
    from tvm.s_tir import dlight as dl

    target = spec.tvm_target()
    with target:
        mod = tvm.transform.Sequential(cuda_pipeline.library_dispatch_passes(target) + [
            relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(),
            relax.transform.FuseOps(), relax.transform.FuseTIR()])(mod)
    schedule = "dlight-default"
    if tune not in (None, False):
        mod, summary = _tune_on_gpu(mod, spec, target, tune)
        schedule = "metaschedule+dlight-default"
        if report is not None:
            report.backend["tuning"] = summary
    with target:
        mod = dl.ApplyDefaultSchedule(*default_schedule_rules())(mod)
    if report is not None:
        report.backend["schedule"] = schedule
    return mod


def _tune_on_gpu(mod, spec: TargetSpec, target, tune):
    """MetaSchedule on the local GPU; returns (module with the best records applied, summary dict)."""
    from ...errors import TuningError
    from ..targets import cuda_available

    if not cuda_available() or not cuda_runtime_available():
        missing = ("no CUDA GPU (torch.cuda.is_available() is False)" if not cuda_available()
                   else "TVM's CUDA runtime is not loaded (no libcuda driver library)")
        raise TuningError(f"tuning for '{spec.alias}' measures candidate kernels on a CUDA GPU, and this machine "
                          f"has {missing}: build with tune=None here (dlight schedules), or tune on a GPU machine")
    import tempfile

    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    from .tuning.logs import tune_contexts
    from .tuning.records import Progress

    try:
        from .tuning import coerce_tune

        options = coerce_tune(tune)
    except ImportError:                             # pragma: no cover - tuning/ ships with the backend
        options = None
    trials = int(getattr(options, "trials", tune if isinstance(tune, int) and tune is not True else 64))
    database = getattr(options, "database", None)
    per_iter = int(getattr(options, "trials_per_iter", 16))
    start = time.perf_counter()
    work_dir = Path(database or tempfile.mkdtemp(prefix="graphopt-cuda-tune-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    tasks = ms.relax_integration.extract_tasks(mod, target, {}, module_equality="structural")
    # trials already measured for this set of kernels (a re-compile from kept records runs only what is missing)
    progress = Progress(work_dir / CUDA_PROGRESS_FILE)
    entry = progress.get(_task_set_key(tasks))
    missing = max(0, trials - int(entry.get("searched", 0)))
    summary = {"trials": trials, "new_trials": missing, "tasks": len(tasks), "database": str(work_dir),
               "cost_model": _gpu_cost_model()}
    if missing and tasks:
        builder = ms.builder.LocalBuilder(f_build=_gpu_build(), timeout_sec=float(getattr(options, "timeout", 60.0)))
        nvcc = find_nvcc()
        # ms.relax_integration.tune_relax, with the tune contexts of tuning.logs.tune_contexts: MetaSchedule's own
        # logger set-up (logging.config) fails on a handler without a name on its logger
        with _nvcc_on_path(nvcc) if nvcc else contextlib.nullcontext(), \
                tune_contexts(tasks, str(work_dir)) as (contexts, weights):
            ms.tune.tune_tasks(tasks=contexts, task_weights=weights, work_dir=str(work_dir),
                               max_trials_global=missing, num_trials_per_iter=min(per_iter, missing),
                               builder=builder, runner="local", cost_model=_gpu_cost_model())
        entry["searched"] = trials
        progress.save()
    db = ms.database.JSONDatabase(work_dir=str(work_dir), module_equality="structural")
    with target, db:
        mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
    summary["seconds"] = round(time.perf_counter() - start, 3)
    return mod, summary


def _task_set_key(tasks) -> str:
    """One key for a set of tuning tasks (their structural hashes, order-free)."""
    from .tuning.records import task_key

    keys = sorted(task_key(t.dispatched[0]) for t in tasks)
    return "cuda:" + hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]


def _gpu_cost_model() -> str:
    """MetaSchedule's XGBoost cost model; its random one where xgboost is not installed (measured search)."""
    try:
        import xgboost  # noqa: F401
    except ImportError:
        return "random"
    return "xgb"


def _gpu_build():
    """MetaSchedule f_build without `import tvm.s_tir.tensor_intrin` in every worker (a closure: by value)."""

    def build(mod, target, _params):
        # tvm.driver.build returns the runtime Module the builder exports (tvm.compile's Executable wrapper
        # crosses the worker's FFI boundary as a bare Function: every candidate failed to export on an H200)
        from tvm.driver import build as tvm_build
        from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

        return tvm_build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)

    return build


def unscheduled_kernels(mod) -> list[str]:
    """Names of the TIR kernels in `mod` that bind no loop to a GPU block or thread (cannot run on a GPU)."""
    from tvm import tirx

    names = []
    for gvar, func in mod.functions.items():
        if isinstance(func, tirx.PrimFunc) and not re.search(r'thread="(blockIdx|threadIdx)\.[xyz]"', func.script()):
            names.append(gvar.name_hint)
    return sorted(names)


# ---------------------------------------------------------------------------------------- device code
def find_nvcc() -> str | None:
    """nvcc: $GRAPHOPT_NVCC if set (None if that is not runnable), else on PATH, else under $CUDA_HOME /
    $CUDA_PATH / /usr/local/cuda; None if there is none."""
    override = os.environ.get("GRAPHOPT_NVCC")
    if override:
        return shutil.which(override)
    found = shutil.which("nvcc")
    if found:
        return found
    for base in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if base and os.access(os.path.join(base, "bin", "nvcc"), os.X_OK):
            return os.path.join(base, "bin", "nvcc")
    return None


def cuda_runtime_available() -> bool:
    """Whether TVM's CUDA runtime is loaded here (it compiles device code itself, and can launch kernels)."""
    import tvm  # noqa: F401 - importing tvm loads its CUDA runtime library where the driver is present
    import tvm_ffi

    return tvm_ffi.get_global_func("ffi.Module.create.cuda", allow_missing=True) is not None


def _arch_number(arch: str) -> str:
    m = re.fullmatch(r"sm_(\d+[a-z]?)", arch)
    if not m:
        raise BuildError(f"bad CUDA architecture {arch!r}: expected sm_XX (e.g. sm_80)")
    return m.group(1)


@contextlib.contextmanager
def _nvcc_on_path(nvcc: str):
    """TVM runs `nvcc` by name: make sure the one found is first on PATH while it runs."""
    old = os.environ.get("PATH", "")
    os.environ["PATH"] = os.path.dirname(nvcc) + os.pathsep + old
    try:
        yield
    finally:
        os.environ["PATH"] = old


def compile_device_code(source: str, arch: str, fmt: str = DEVICE_FORMAT) -> bytes:
    """Compile CUDA C++ `source` (as TVM emits it) with nvcc for `arch` ("sm_80"); fatbin, cubin or ptx bytes.

    BuildError if nvcc is missing or rejects the code (with nvcc's message). Results are cached per
    (source, arch, fmt) for this process.
    """
    if fmt not in ("fatbin", "cubin", "ptx"):
        raise BuildError(f"unknown CUDA device code format {fmt!r}: use fatbin, cubin or ptx")
    num = _arch_number(arch)
    key = (hashlib.sha256(source.encode()).hexdigest(), arch, fmt)
    with _lock:
        if key in _compiled:
            return _compiled[key]
    nvcc = find_nvcc()
    if nvcc is None:
        raise BuildError(f"cannot build CUDA device code for {arch}: nvcc not found (install the CUDA toolkit, or "
                         f"put its bin/ on PATH or set CUDA_HOME)")
    import tvm
    from tvm.support import nvcc as tvm_nvcc

    gencode = (["-gencode", f"arch=compute_{num},code=[sm_{num},compute_{num}]"] if fmt == "fatbin"
               else ["-arch", f"sm_{num}" if fmt == "cubin" else f"compute_{num}"])
    try:
        with _nvcc_on_path(nvcc), tvm.target.Target({"kind": "cuda", "arch": arch}):
            code = bytes(tvm_nvcc.compile_cuda(source, target_format=fmt, arch=gencode, compiler="nvcc"))
    except Exception as e:
        text = str(e)
        tail = text[text.find("Compilation error:"):] if "Compilation error:" in text else text
        raise BuildError(f"nvcc failed to compile the CUDA kernels for {arch}: "
                         f"{' '.join(tail.split())[:800]}") from e
    with _lock:
        _compiled[key] = code
    return code


@contextlib.contextmanager
def nvcc_compile_mode(spec: TargetSpec):
    """While TVM generates code for `spec`: where TVM's CUDA runtime is loaded (it then compiles kernels at
    codegen through its `tvm_callback_cuda_compile`), have that callback compile with graphopt's nvcc fatbin
    (SASS + PTX, the same device code as on a machine without a GPU). A no-op where TVM has no CUDA runtime
    (build_device_code compiles after codegen), where nvcc is missing (TVM's default, NVRTC, then) or where the
    user chose a compiler with TVM_CUDA_COMPILE_MODE."""
    if not cuda_runtime_available() or find_nvcc() is None or "TVM_CUDA_COMPILE_MODE" in os.environ:
        yield
        return
    with _callback_override("tvm_callback_cuda_compile", lambda code, *_: compile_device_code(str(code), spec.arch)):
        yield


@contextlib.contextmanager
def _callback_override(name: str, func):
    """Register `func` as TVM global `name` for the duration; the previous function is restored after."""
    import tvm_ffi

    previous = tvm_ffi.get_global_func(name, allow_missing=True)
    tvm_ffi.register_global_func(name, func, override=True)
    try:
        yield
    finally:
        if previous is not None:
            tvm_ffi.register_global_func(name, previous, override=True)


def _cuda_modules(mod) -> list:
    """The CUDA device modules in an executable's import tree."""
    found, stack, seen = [], [getattr(mod, "mod", mod)], set()
    while stack:
        m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        if m.kind == "cuda":
            found.append(m)
        stack.extend(m.imports)
    return found


def _source_of(module) -> str | None:
    """The CUDA C++ source a placeholder (TVM-without-CUDA-runtime) module holds as its code, else None."""
    try:
        text = module.inspect_source("cuda")
    except Exception:
        return None
    return text if text and "extern \"C\" __global__" in text else None


def build_device_code(executable, spec: TargetSpec, report=None) -> dict:
    """After codegen for a CUDA target: compile the kernels' source with nvcc where TVM kept source only.

    Returns (and records in report.backend) {"cuda_compiler", "cuda_arch", "cuda_device_format",
    "nvcc_s"}. BuildError if the kernels cannot be compiled for spec.arch.
    """
    start = time.perf_counter()
    modules = _cuda_modules(executable)
    if cuda_runtime_available():
        if find_nvcc() is not None and "TVM_CUDA_COMPILE_MODE" not in os.environ:
            compiler = "nvcc (at codegen)"
        else:
            compiler = f"tvm {os.environ.get('TVM_CUDA_COMPILE_MODE', 'nvrtc')} (at codegen)"
        info = {"cuda_compiler": compiler, "cuda_arch": spec.arch}
    else:
        sources = [s for s in (_source_of(m) for m in modules) if s is not None]
        for source in sources:
            compile_device_code(source, spec.arch)
        info = {"cuda_compiler": "nvcc" if sources else "none (no device kernels)", "cuda_arch": spec.arch,
                "cuda_device_format": DEVICE_FORMAT, "nvcc_s": round(time.perf_counter() - start, 3)}
    if report is not None:
        report.backend.update(info)
    return info


# ------------------------------------------------------------------------------------- library export
def _pack_imports_with_device_code(arch: str):
    """An export_library `fpack_imports`: TVM's packed import blob with nvcc code in place of CUDA source.

    The blob (runtime.ModulePackImportsToTensor) stores each device module as
    key "cuda" | u64 payload length | payload = [u64 len "cuda" (format)] [function table] [u64 len source];
    the payload is rewritten to format DEVICE_FORMAT with the compiled code, lengths updated. The C file
    is TVM's own (runtime.ModulePackImportsToC) with the array replaced, so symbols stay TVM's.
    """

    def fpack(mod, is_system_lib, symbol_prefix, workspace_dir):
        import tvm_ffi

        blob = bytes(tvm_ffi.get_global_func("runtime.ModulePackImportsToTensor")(mod).numpy().tobytes())
        for cuda_mod in _cuda_modules(mod):
            source = _source_of(cuda_mod)
            if source is not None:
                blob = _replace_source(blob, source.encode(), compile_device_code(source, arch))
        c_text = tvm_ffi.get_global_func("runtime.ModulePackImportsToC")(mod, is_system_lib, symbol_prefix)
        path = os.path.join(workspace_dir, f"{symbol_prefix}devc.c")
        Path(path).write_text(_replace_c_array(c_text, blob))
        return path

    return fpack


def _u64(n: int) -> bytes:
    return struct.pack("<Q", n)


def _replace_source(blob: bytes, source: bytes, code: bytes) -> bytes:
    (total,) = struct.unpack_from("<Q", blob, 0)
    if total != len(blob) - 8:
        raise BuildError(f"unexpected layout of TVM's packed library ({len(blob)} bytes, header says {total})")
    head = _u64(4) + b"cuda"
    tail = _u64(len(source)) + source
    start = 0
    while True:
        at = blob.find(head, start)
        if at < 0:
            raise BuildError("could not find the CUDA kernels' source in TVM's packed library to replace it "
                             "with nvcc's device code")
        payload_at = at + len(head) + 8
        (payload_len,) = struct.unpack_from("<Q", blob, at + len(head))
        payload = blob[payload_at:payload_at + payload_len]
        if payload.startswith(head) and payload.endswith(tail):
            fmap = payload[len(head):len(payload) - len(tail)]
            fmt = DEVICE_FORMAT.encode()
            new_payload = _u64(len(fmt)) + fmt + fmap + _u64(len(code)) + code
            out = blob[8:at] + head + _u64(len(new_payload)) + new_payload + blob[payload_at + payload_len:]
            return _u64(len(out)) + out
        start = at + 1


def _replace_c_array(c_text: str, blob: bytes) -> str:
    m = re.search(r"(const unsigned char \w+\[)(\d+)(\] = \{)(.*?)(\n\};)", c_text, flags=re.S)
    if m is None:
        raise BuildError("unexpected form of TVM's packed-imports C source (no byte array found)")
    hexes = [f"0x{b:02x}" for b in blob]
    rows = ",\n  ".join(",".join(hexes[i:i + 20]) for i in range(0, len(hexes), 20))
    return c_text[:m.start()] + f"{m.group(1)}{len(blob)}{m.group(3)}\n  {rows},{m.group(5)}" + c_text[m.end():]


def export_options(spec: TargetSpec) -> dict:
    """export_library keyword arguments for a CUDA `spec`: embed nvcc device code where TVM holds source."""
    if cuda_runtime_available():
        return {}                                   # TVM compiled the kernels at codegen; its packer suffices
    _arch_number(spec.arch)
    return {"fpack_imports": _pack_imports_with_device_code(spec.arch)}


# ------------------------------------------------------------------------------------------ inspection
@dataclass(frozen=True)
class DeviceImage:
    """One device code image: kind "sass" (a cubin, machine code) or "ptx", for arch "sm_80" / "compute_80"."""

    kind: str
    arch: str
    size: int


def _cubin_arch(elf: bytes) -> int | None:
    if len(elf) < 52 or elf[:4] != b"\x7fELF" or struct.unpack_from("<H", elf, 18)[0] != _EM_CUDA:
        return None
    (flags,) = struct.unpack_from("<I", elf, 48 if elf[4] == 2 else 36)
    return (flags >> 8) & 0xFF if elf[8] >= 8 else flags & 0xFF   # CUDA ELF ABI v8 moved the SM field


def _fatbin_images(data: bytes, at: int) -> tuple[list[DeviceImage], int]:
    magic, version, header, size = struct.unpack_from("<IHHQ", data, at)
    if magic != _FATBIN_MAGIC or version != 1 or header != 16 or at + header + size > len(data):
        return [], at + 4
    images, off, end = [], at + header, at + header + size
    while off + 32 <= end:
        kind, _flags, entry_header, payload = struct.unpack_from("<HHIQ", data, off)
        (sm,) = struct.unpack_from("<I", data, off + 28)
        if entry_header < 32 or off + entry_header + payload > end:
            break
        if kind == 2:
            images.append(DeviceImage("sass", f"sm_{sm}", payload))
        elif kind == 1:
            images.append(DeviceImage("ptx", f"compute_{sm}", payload))
        off += entry_header + payload
    return images, end


def device_images(data) -> list[DeviceImage]:
    """The CUDA device code in `data` (bytes, or a path): fatbins' SASS/PTX entries, bare cubins, PTX text.

    A library exported for a CUDA target holds them inside its packed imports; CUDA C++ source is not
    device code and is not listed.
    """
    if not isinstance(data, (bytes, bytearray)):
        data = Path(data).read_bytes()
    data = bytes(data)
    images: list[DeviceImage] = []
    spans: list[tuple[int, int]] = []
    at = data.find(struct.pack("<I", _FATBIN_MAGIC))
    while at >= 0:
        found, end = _fatbin_images(data, at)
        if found:
            images += found
            spans.append((at, end))
        at = data.find(struct.pack("<I", _FATBIN_MAGIC), max(end, at + 4))
    at = data.find(b"\x7fELF")
    while at >= 0:
        if not any(s <= at < e for s, e in spans):
            sm = _cubin_arch(data[at:at + 64])
            if sm is not None:
                images.append(DeviceImage("sass", f"sm_{sm}", 0))
        at = data.find(b"\x7fELF", at + 4)
    for m in re.finditer(rb"\.version \d+\.\d+\s+\.target (sm_\d+[a-z]?)", data):
        if not any(s <= m.start() < e for s, e in spans):
            images.append(DeviceImage("ptx", "compute_" + m.group(1)[3:].decode(), 0))
    return images
