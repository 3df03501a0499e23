"""schedule_cpu: a Relax module scheduled for an LLVM CPU target, from tuning records and default schedules."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .defaults import defaults_kept, keep_defaults
from .driver import tune_module
from .options import coerce_tune
from .records import default_database_dir

__all__ = ["schedule_cpu", "fused_calls"]

# the kinds of hand-written fused kernel (relax_match.FUSED_KERNEL_ATTR's values): one call, several
_FUSED = {"inverted residual block": "inverted residual blocks", "attention": "attention"}


def fused_calls(mod) -> str:
    """'17 inverted residual blocks, 4 attention': calls in the module's Relax functions of the kernels that
    fused_inverted_residual and fused_attention add (PrimFuncs carrying FUSED_KERNEL_ATTR), '' when none."""
    from tvm import relax, tirx

    from ..relax_match import FUSED_KERNEL_ATTR, op_name

    kinds = {}
    for gv, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc) and func.attrs is not None and FUSED_KERNEL_ATTR in func.attrs:
            kinds[gv.name_hint] = str(func.attrs[FUSED_KERNEL_ATTR])
    counts = dict.fromkeys(_FUSED, 0)

    def visit(expr):
        if op_name(expr) == "relax.call_tir" and expr.args[0].name_hint in kinds:
            counts[kinds[expr.args[0].name_hint]] += 1

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return ", ".join(f"{n} {one if n == 1 else _FUSED[one]}" for one, n in counts.items() if n)


def schedule_cpu(mod, spec, tune: Any = None, report=None):
    """Relax module -> scheduled module for an LLVM CPU target (build._schedule calls this).

    tune=None: graphopt's default schedules. Tuning options (see coerce_tune): MetaSchedule first, then
    the best records applied and default schedules for the rest. Records report.backend["schedule"],
    ["kernels"], ["fused"] (graphopt's hand-written fused kernels the model calls) and, when tuning,
    ["tuning"].
    """
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu_pipeline

    from .. import schedules

    options = coerce_tune(tune)
    target = spec.tvm_target()
    from ..native_log import native_stderr_filtered

    with target, native_stderr_filtered():         # legalizing a gather logs "Fast mode segfaults ..."
        passes = (cpu_pipeline.library_dispatch_passes(target) + schedules.relax_layout_passes(target)
                  + schedules.legalize_passes(target))
        mod = tvm.transform.Sequential(passes)(mod)
    summary = None
    tuned_kernels = 0
    if options is not None:
        database_dir = Path(options.database) if options.database else default_database_dir(spec)
        db, summary = tune_module(mod, target, options, database_dir=database_dir)
        mod, kept_default = keep_defaults(mod, target, defaults_kept(database_dir))
        with target, db:
            applied = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
        tuned_kernels = _count_changed(mod, applied)
        mod = applied
    mod, stats = schedules.apply_default_schedules(mod, target)
    with target:
        mod = tvm.transform.Sequential(schedules.finalize_passes(target))(mod)
    if report is not None:
        report.backend["schedule"] = "metaschedule+graphopt-default" if options else "graphopt-default"
        kernels = stats.summary()
        if options is not None:
            kernels = (f"{tuned_kernels + kept_default} from tuning records ({kept_default} kept on the default "
                       f"schedule by the paired check), " + kernels)
        report.backend["kernels"] = kernels
        fused = fused_calls(mod)
        if fused:
            report.backend["fused"] = fused
        if summary is not None:
            report.backend["tuning"] = summary.as_dict()
    return mod


def _count_changed(before, after) -> int:
    from tvm import tirx

    n = 0
    for gv, func in after.functions_items():
        if isinstance(func, tirx.PrimFunc):
            try:
                old = before[gv.name_hint]
            except Exception:
                continue
            if not old.same_as(func):
                n += 1
    return n
