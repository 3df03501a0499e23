"""Default-vs-searched: graphopt's default schedule of each kernel as its first record (seed_defaults), the
paired re-measurement of each searched kernel's best record against it (check_against_defaults), and
building the kernels that check kept on the default schedule with it (keep_defaults).
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

from .records import PROGRESS_FILE, task_key
from .text import first_line
from .workers import run_secs

__all__ = ["BEAT_DEFAULT_BY", "seed_defaults", "check_against_defaults", "defaults_kept", "func_key",
           "keep_defaults"]


def seed_defaults(db, tasks, target, builder, runner) -> int:
    """Measure graphopt's default schedule of each task and commit it as a record. Returns measurements."""
    from tvm.s_tir import meta_schedule as ms

    candidates = []
    for task in tasks:
        mod = task.dispatched[0]
        sch = _replayed(mod, target)
        if sch is not None:
            candidates.append((mod, sch))
    if not candidates:
        return 0
    builds = builder.build([ms.builder.BuilderInput(sch.mod, target) for _, sch in candidates])
    # The arguments as built: the builder drops weight-repacking blocks, so a kernel that reads a prepacked
    # weight takes it in the packed layout (as MetaSchedule's own candidates do: remove_preproc=True).
    args_info = [ms.arg_info.ArgInfo.from_entry_func(sch.mod, remove_preproc=True) for _, sch in candidates]
    run_inputs, index = [], []
    for k, b in enumerate(builds):
        if b.error_msg is None and b.artifact_path:
            run_inputs.append(ms.runner.RunnerInput(b.artifact_path, "cpu", args_info[k]))
            index.append(k)
    failed = [(candidates[k][0], b.error_msg) for k, b in enumerate(builds)
              if not (b.error_msg is None and b.artifact_path)]
    futures = runner.run(run_inputs)
    n = 0
    for k, fut in zip(index, futures):
        res = fut.result()
        secs = run_secs(res)
        if secs is None:
            failed.append((candidates[k][0], res.error_msg))
            continue
        mod, sch = candidates[k]
        workload = db.commit_workload(mod)
        db.commit_tuning_record(ms.database.TuningRecord(
            sch.trace, workload, [float(x) for x in res.run_secs], target, args_info[k]))
        n += 1
    if failed:
        warnings.warn(f"tuning: graphopt's default schedule of {len(failed)} kernel(s) could not be measured "
                      f"(first: {first_line(str(failed[0][1]))}); their search starts without it", stacklevel=2)
    _remove_artifacts(builds)
    return n


def _remove_artifacts(builds) -> None:
    """Delete the builder's temporary directories of `builds` (BuilderResults)."""
    for b in builds:
        if b.artifact_path:
            shutil.rmtree(os.path.dirname(b.artifact_path), ignore_errors=True)


BEAT_DEFAULT_BY = 0.02      # a searched schedule replaces the default one only when >2% faster in the paired check


def check_against_defaults(db, tasks, keys, target, builder, runner, progress) -> tuple[int, int]:
    """Paired re-measurement of each task's best record against its default schedule (flow step 3).

    Commits both fresh measurements as records and sets progress "default" (with "default_secs" and
    "best_secs") per task. Returns (tasks kept on their default schedule, records committed).
    """
    from tvm import s_tir
    from tvm.s_tir import meta_schedule as ms

    pairs = []
    for task, key in zip(tasks, keys):
        mod = task.dispatched[0]
        default = _replayed(mod, target)
        top = db.get_top_k(db.commit_workload(mod), 1) if default is not None else []
        progress.get(key)["default"] = False     # checked (also when there is nothing to compare)
        if not top or str(top[0].trace) == str(default.trace):    # no default, or it is the best record
            continue
        best = s_tir.Schedule(mod, debug_mask="all")
        try:
            top[0].trace.apply_to_schedule(best, remove_postproc=False)
        except Exception:
            continue
        pairs.append((mod, key, default, best))
    if not pairs:
        return 0, 0
    schedules = [s for _, _, d, b in pairs for s in (d, b)]
    builds = builder.build([ms.builder.BuilderInput(s.mod, target) for s in schedules])
    args_info = [ms.arg_info.ArgInfo.from_entry_func(s.mod, remove_preproc=True) for s in schedules]
    run_inputs, owners = [], []
    for p in range(len(pairs)):
        d, b = builds[2 * p], builds[2 * p + 1]
        if d.error_msg is not None or b.error_msg is not None or not d.artifact_path or not b.artifact_path:
            continue
        for k in (2 * p, 2 * p + 1, 2 * p, 2 * p + 1):        # default, best, default, best: back to back
            run_inputs.append(ms.runner.RunnerInput(builds[k].artifact_path, "cpu", args_info[k]))
            owners.append(k)
    secs: dict[int, list[float]] = {}
    for k, fut in zip(owners, runner.run(run_inputs)):
        value = run_secs(fut.result())
        if value is not None:
            secs.setdefault(k, []).append(value)
    kept = committed = 0
    for p, (mod, key, default, best) in enumerate(pairs):
        d, b = secs.get(2 * p), secs.get(2 * p + 1)
        if not d or not b:
            continue
        committed += 2
        workload = db.commit_workload(mod)
        for k, sch, values in ((2 * p, default, d), (2 * p + 1, best, b)):
            db.commit_tuning_record(ms.database.TuningRecord(sch.trace, workload, [min(values)], target,
                                                             args_info[k]))
        entry = progress.get(key)
        entry["default"] = min(b) * (1 + BEAT_DEFAULT_BY) >= min(d)
        entry["default_secs"], entry["best_secs"] = min(d), min(b)
        kept += bool(entry["default"])
    _remove_artifacts(builds)
    return kept, committed


def defaults_kept(database_dir: Path) -> set[str]:
    """Task keys that the paired check kept on graphopt's default schedule (see the progress file)."""
    path = Path(database_dir) / PROGRESS_FILE
    if not path.exists():
        return set()
    try:
        tasks = json.loads(path.read_text(encoding="utf-8")).get("tasks", {})
        return {str(k) for k, v in tasks.items() if isinstance(v, dict) and v.get("default")}
    except (ValueError, OSError, AttributeError):
        return set()


def func_key(func) -> str:
    """The task key (task_key of MetaSchedule's dispatched module) of a PrimFunc of the module being built."""
    import tvm

    return task_key(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}))


def keep_defaults(mod, target, keys: set[str]):
    """Schedule the PrimFuncs of `mod` whose task key is in `keys` with the default rules (before the
    database is applied, so that their records are not). Returns (module, count)."""
    import tvm
    from tvm import tirx

    from .. import schedules

    if not keys:
        return mod, 0
    chosen = [gv for gv, f in mod.functions_items()
              if isinstance(f, tirx.PrimFunc) and not schedules.is_scheduled(f) and func_key(f) in keys]
    if not chosen:
        return mod, 0
    sub, _ = schedules.apply_default_schedules(tvm.IRModule({gv: mod[gv] for gv in chosen}), target)
    mod = mod.clone()
    n = 0
    for gv in chosen:
        if schedules.is_scheduled(sub[gv]):
            mod[gv] = sub[gv]
            n += 1
    return mod, n


def _replayed(mod, target):
    """The default schedule as a replayable s_tir Schedule of the task's module (None if no rule applies)."""
    from tvm import s_tir

    from ..schedules import default_rules

    with target:
        for rule in default_rules():
            try:
                sch = rule.apply(mod["main"], target, False)
            except Exception:
                sch = None
            if sch is None:
                continue
            sch = sch[0] if isinstance(sch, list) else sch
            fresh = s_tir.Schedule(mod, debug_mask="all")
            try:
                sch.trace.apply_to_schedule(fresh, remove_postproc=False)
            except Exception:
                return None
            return fresh
    return None
