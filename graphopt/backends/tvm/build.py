"""Build: Relax IRModule -> TVM Relax VM executable, for a TargetSpec.

Three steps, each one function:

  _schedule(mod, spec, tune, report)   legalize Relax ops to TIR, fold constants, fuse, and schedule the TIR
                                       kernels. THE place where tuning and default schedules plug in (issue #3
                                       owns graphopt/backends/tvm/tuning/ and wires it in here). Until then:
                                       TVM's default passes for the target (CPU: none beyond fusion; CUDA:
                                       dlight default GPU schedules).
  _finalize(mod, spec)                 TVM's dataflow lowering + memory planning + VM codegen: an executable.
  export_library(executable, path, spec)
                                       write the executable as a shared library; per-target hook (a cross
                                       compiler `fcompile` for aarch64 goes in `_export_options`).

Every TVM failure surfaces as BuildError (TuningError for a tuning request this build cannot honour).
"""
from __future__ import annotations

import importlib
import time
from typing import Any

from ...errors import BuildError, TuningError
from ..targets import TargetSpec

__all__ = ["build_module", "export_library", "relax_backend"]

# TVM's per-target pipeline pieces live in tvm.relax.backend.<name>.pipeline (the `tvm.relax.pipeline`
# dispatchers of TVM 0.27 miss `dataflow_lower_passes` for CPU, so we import the modules directly).
_BACKENDS = {"llvm": "cpu_generic", "cuda": "cuda"}


def relax_backend(target) -> Any:
    """The module holding TVM's default Relax pipeline pieces for a tvm.target.Target."""
    kind = target.kind.name
    if kind not in _BACKENDS:
        raise BuildError(f"no Relax pipeline for TVM target kind {kind!r} (supported: {', '.join(_BACKENDS)})")
    return importlib.import_module(f"tvm.relax.backend.{_BACKENDS[kind]}.pipeline")


def _target(spec: TargetSpec):
    try:
        return spec.tvm_target()
    except Exception as e:
        raise BuildError(f"invalid TVM target {spec.tvm!r} for '{spec.alias}': {type(e).__name__}: {e}") from e


def _schedule(mod, spec: TargetSpec, tune: Any = None, report=None):
    """Legalize, fold, fuse and schedule the TIR kernels of `mod` for `spec`; returns the scheduled module.

    CPU (LLVM): graphopt's default schedules, and MetaSchedule's records when `tune` asks for them
    (tuning/schedule.py). CUDA: dlight's default GPU schedules, MetaSchedule on a GPU when asked (cuda.py).
    Any other TVM target: TVM's own library dispatch and legalization, kernels unscheduled; tuning there is a
    TuningError.
    """
    if spec.kind == "llvm":      # CPU: graphopt's default schedules, MetaSchedule when asked (tuning/)
        from .tuning import schedule_cpu

        return schedule_cpu(mod, spec, tune, report)
    if spec.kind == "cuda":      # GPU: dlight default schedules; MetaSchedule on a GPU when asked (cuda.py)
        from .cuda import schedule_cuda

        return schedule_cuda(mod, spec, tune, report)
    if tune not in (None, False):
        raise TuningError(f"tune={tune!r}: tuning is not available in this build of graphopt yet "
                          f"(graphopt/backends/tvm/tuning/); use tune=None for TVM's default schedules")
    import tvm

    target = _target(spec)
    backend = relax_backend(target)
    with target:
        seq = tvm.transform.Sequential(backend.library_dispatch_passes(target) + backend.legalize_passes(target))
        mod = seq(mod)
    if report is not None:
        report.backend["schedule"] = "tvm-default"
    return mod


def _finalize(mod, spec: TargetSpec):
    """Dataflow lowering, memory planning and VM codegen of a scheduled module: a relax VMExecutable.

    CPU kernels are compiled without TVM's per-kernel argument checks (`tirx.disable_assert`): every kernel
    is called only by the module's own VM, with tensors its memory plan allocated or that the VM checked at
    entry (match_cast on the inputs, after graphopt's own InputError checks), so the checks never fire, and
    they were most of the LLVM IR and of the compile time (~25 kB of IR per kernel: 32 small kernels compiled
    and JIT-loaded in 0.45 s with them, 0.14 s without). GRAPHOPT_KERNEL_ASSERTS=1 keeps them (debugging).
    CPU kernels go through TVM's TIR pipeline plus one_task_loops (no thread-pool launch for a loop of one
    iteration)."""
    import os

    import tvm
    from tvm import relax

    target = _target(spec)
    backend = relax_backend(target)
    first = []
    if spec.kind == "llvm":             # dynamic dims: kernels read views' sources in place (view_args.py)
        from .inplace_rowwise import inplace_rowwise_calls
        from .view_args import fold_view_args

        first = [fold_view_args(), inplace_rowwise_calls()]     # softmax over its own input (inplace_rowwise)
    finalize = list(backend.finalize_passes(target))
    if spec.kind == "llvm":             # dynamic dims: each run-time shape built once (shape_cse.py)
        from .shape_cse import dedupe_shape_calls

        at = next((i + 1 for i, p in enumerate(finalize) if p.info.name == "VMShapeLower"), None)
        if at is not None:
            finalize.insert(at, dedupe_shape_calls())
    passes = tvm.transform.Sequential(first + backend.dataflow_lower_passes(target) + finalize)
    if spec.kind != "llvm":
        return relax.build(mod, target, relax_pipeline=passes)
    from .one_task_loops import register          # parallel loops of <= 1 iteration: no launch

    tir_pipeline = register()
    if os.environ.get("GRAPHOPT_KERNEL_ASSERTS", "") not in ("", "0"):
        return relax.build(mod, target, relax_pipeline=passes, tir_pipeline=tir_pipeline)
    with _pass_config({"tirx.disable_assert": True}):
        return relax.build(mod, target, relax_pipeline=passes, tir_pipeline=tir_pipeline)


def _pass_config(extra: dict):
    """The current PassContext with `extra` added to its config (opt level, passes and instruments kept)."""
    import tvm

    cur = tvm.transform.PassContext.current()
    return tvm.transform.PassContext(opt_level=cur.opt_level, required_pass=list(cur.required_pass),
                                     disabled_pass=list(cur.disabled_pass), instruments=list(cur.instruments),
                                     config={**dict(cur.config), **extra})


def build_module(mod, spec: TargetSpec, *, tune: Any = None, report=None):
    """Relax IRModule -> relax VMExecutable for `spec`. Records schedule/build seconds in report.backend.

    Raises BuildError (TuningError for an unsupported tuning request).
    """
    if spec.kind not in _BACKENDS:
        raise BuildError(f"target '{spec.alias}' (kind {spec.kind!r}) is not a TVM target")
    start = time.perf_counter()
    try:
        scheduled = _schedule(mod, spec, tune, report)
    except (BuildError, TuningError):
        raise
    except Exception as e:
        raise BuildError(f"scheduling for '{spec.alias}' failed: {type(e).__name__}: {_first_line(str(e))}") from e
    try:
        from .numerics import nan_propagating_minmax      # PyTorch's NaN semantics for every float min/max

        if spec.kind == "llvm":     # CPU only: CUDA C has no llvm.maximum, and a rewritten reduction max
            scheduled = nan_propagating_minmax()(scheduled)     # is no reducer cross-thread lowering matches
    except Exception as e:
        raise BuildError(f"NaN-propagating min/max for '{spec.alias}' failed: {type(e).__name__}: "
                         f"{_first_line(str(e))}") from e
    if spec.kind == "llvm":         # a dynamic kernel's small calls on one thread (parallel_guard.py)
        from .parallel_guard import serial_when_small

        try:
            scheduled = serial_when_small()(scheduled)
        except Exception as e:
            raise BuildError(f"serial copies of small dynamic kernels for '{spec.alias}' failed: "
                             f"{type(e).__name__}: {_first_line(str(e))}") from e
    scheduled_at = time.perf_counter()
    try:
        if spec.kind == "cuda":                    # device code from nvcc, also without a GPU (cuda.py)
            from .cuda import build_device_code, nvcc_compile_mode

            with nvcc_compile_mode(spec):
                executable = _finalize(scheduled, spec)
            build_device_code(executable, spec, report)
        else:
            executable = _finalize(scheduled, spec)
    except BuildError:
        raise
    except Exception as e:
        raise BuildError(f"building for '{spec.alias}' failed: {type(e).__name__}: {_first_line(str(e))}") from e
    end = time.perf_counter()
    if report is not None:
        report.backend["target"] = spec.alias
        report.backend["schedule_s"] = round(scheduled_at - start, 3)
        report.backend["build_s"] = round(end - scheduled_at, 3)
    return executable


# ------------------------------------------------------------------------------------------ libraries
STRIP_DEBUG = ("-Wl,--strip-debug",)


def _export_options(spec: TargetSpec) -> dict:
    """Keyword arguments for Executable.export_library on this machine for `spec` (e.g. fcompile).

    CPU libraries are linked without the DWARF debug sections TVM's LLVM codegen emits (`--strip-debug`: no
    effect on the code; a 90%-sparse int8 digits MLP's artifact 57.6 -> 45.3 kB, its dense float32 one
    326.5 -> 322.4 kB). Code for another CPU architecture is cross-linked (cross.py).
    """
    import platform

    if spec.kind == "llvm" and spec.arch and spec.arch != platform.machine():
        from .cross import export_options          # aarch64: cross-link (BuildError if no cross compiler)

        return {**export_options(spec), "options": list(STRIP_DEBUG)}
    if spec.kind == "llvm":
        return {"options": list(STRIP_DEBUG)}
    if spec.kind == "cuda":
        from .cuda import export_options as cuda_export_options    # embeds nvcc's device code

        return cuda_export_options(spec)
    return {}


def export_library(executable, path: str, spec: TargetSpec) -> str:
    """Write `executable` (a relax VMExecutable) as a shared library at `path` for `spec`. Returns path."""
    options = _export_options(spec)
    from .native_log import native_stderr_filtered

    try:
        with native_stderr_filtered():
            executable.export_library(str(path), **options)
    except Exception as e:
        raise BuildError(f"exporting the library for '{spec.alias}' to {path} failed: "
                         f"{type(e).__name__}: {_first_line(str(e))}") from e
    return str(path)


def _first_line(text: str, limit: int = 600) -> str:
    """The informative line of an error message (TVM puts its reason after a C++ traceback)."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        return ""
    line = lines[-1] if lines[0].startswith("Traceback") else lines[0]
    return line if len(line) <= limit else line[:limit] + "..."
