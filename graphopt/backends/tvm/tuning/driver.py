"""tune_module: one tuning run over the kernels of a module (seeds, search, paired check), into a database."""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

from ....errors import TuningError
from .defaults import check_against_defaults, seed_defaults
from .interrupt import Interrupt
from .options import TuneOptions
from .records import PROGRESS_FILE, RECORD_FILE, Progress, count_lines, open_database, task_key
from .search import search
from .summary import TuningSummary
from .text import first_line
from .workers import builder_runner, close_workers, import_target_intrinsics, worker_count

__all__ = ["tune_module"]


def _reads_integers(func) -> bool:
    """Whether a kernel takes an integer tensor input (embedding lookups, gathers: `take`). MetaSchedule
    measures candidates on random inputs, and random indices read out of bounds (seen: BERT's embedding
    `take` segfaulted the measuring workers), so such kernels are not tuned; they are memory-bound lookups
    that the default schedules handle."""
    from tvm.s_tir import meta_schedule as ms

    try:
        args = ms.arg_info.ArgInfo.from_prim_func(func)[:-1]      # the last argument is the output
    except Exception:
        return False
    return any(str(getattr(a, "dtype", "")).startswith(("int", "uint")) for a in args)


def _task_flops(mod) -> float:
    try:
        from tvm.s_tir.analysis import estimate_tir_flops

        return float(estimate_tir_flops(mod))
    except Exception:
        return 1.0


def _best_secs(db, mod) -> float | None:
    try:
        if not db.has_workload(mod):
            return None
        recs = db.get_top_k(db.commit_workload(mod), 1)
    except Exception:
        return None
    if not recs:
        return None
    secs = [float(x) for x in (recs[0].run_secs or [])]
    best = sum(secs) / len(secs) if secs else None
    return best if best is not None and best < 1e9 else None


def _records_of(db, mod) -> int:
    try:
        if not db.has_workload(mod):
            return 0
        return len(db.get_top_k(db.commit_workload(mod), 1 << 20))
    except Exception:
        return 0


def tune_module(mod, target, options: TuneOptions, *, database_dir: Path, log=None) -> tuple[Any, TuningSummary]:
    """Tune the kernels of a legalized Relax module (schedules.legalize_passes output) into `database_dir`.

    Returns (JSONDatabase, TuningSummary). KeyboardInterrupt propagates after the records are safe on disk.
    """
    from tvm.s_tir import meta_schedule as ms

    from ..schedules import is_scheduled

    start = time.perf_counter()
    log = log or (lambda msg: None)
    import_target_intrinsics(target)

    db = open_database(database_dir)
    progress = Progress(database_dir / PROGRESS_FILE)
    summary = TuningSummary(database=str(database_dir))

    extracted = [t for t in ms.relax_integration.extract_tasks(mod, target, module_equality="structural")
                 if not is_scheduled(t.dispatched[0]["main"]) and not is_scheduled(t.mod["main"])]
    gathers = {id(t) for t in extracted if _reads_integers(t.dispatched[0]["main"])}
    extracted = [t for t in extracted if id(t) not in gathers]
    summary.untunable = len(gathers)
    summary.tasks = len(extracted)
    if not extracted:
        summary.seconds = time.perf_counter() - start
        return db, summary
    keys = [task_key(t.dispatched[0]) for t in extracted]
    flops = [_task_flops(t.dispatched[0]) * max(1, int(t.weight)) for t in extracted]
    summary.reused_records = sum(_records_of(db, t.dispatched[0]) for t in extracted)
    if getattr(progress, "unreadable", False):
        for t, key in zip(extracted, keys):            # lost counts: a task with records counts as tuned
            if _records_of(db, t.dispatched[0]) > 1:
                progress.get(key)["searched"] = 1 << 30

    per_task = min(options.trials, options.trials_per_task or max(1, math.ceil(options.trials / len(extracted))))
    order = sorted(range(len(extracted)), key=lambda i: -flops[i])
    n_planned = min(len(extracted), max(1, options.trials // per_task))
    planned = order[:n_planned]
    need = {i: max(0, per_task - int(progress.get(keys[i]).get("searched", 0))) for i in planned}
    todo = [i for i in planned if need[i] > 0]
    workers = worker_count(target)
    seeds = []
    if options.seed_defaults:
        seeds = [i for i in range(len(extracted))
                 if not progress.get(keys[i]).get("seeded") and _records_of(db, extracted[i].dispatched[0]) == 0]
    # paired check (step 3): the kernels searched now, and searched ones an older graphopt never checked
    check = [i for i in range(len(extracted)) if i in todo or (
        int(progress.get(keys[i]).get("searched", 0)) > 0 and "default" not in progress.get(keys[i]))
    ] if options.seed_defaults else []
    if not seeds and not todo and not check:      # everything is in the records: nothing to build or measure
        summary.estimated_ms = _estimate_ms(db, extracted, keys, progress)
        summary.seconds = time.perf_counter() - start
        return db, summary
    builder, runner = builder_runner(options, workers)

    bar = _bar(options, total=sum(need[i] for i in todo), tasks=len(extracted))
    interrupt = Interrupt()
    try:
        with interrupt:
            try:
                # 1. seed: graphopt's default schedule of every task that has no record yet
                if seeds:
                    if bar is not None:
                        bar.set_description_str(f"measuring default schedules of {len(seeds)} kernels")
                    n = seed_defaults(db, [extracted[i] for i in seeds], target, builder, runner)
                    summary.new_trials += n
                    for i in seeds:
                        progress.get(keys[i])["seeded"] = True
                        progress.get(keys[i])["name"] = extracted[i].task_name
                    progress.save()
                # 2. search: one MetaSchedule run per distinct remaining quota, so that every task gets exactly
                # its missing trials (one run with a shared per-task cap could give one task another's share)
                summary.tasks_tuned = len(todo)
                groups: dict[int, list[int]] = {}
                for i in todo:
                    groups.setdefault(need[i], []).append(i)
                for quota, members in groups.items():
                    interrupt.check()
                    search(ms, [extracted[i] for i in members], [keys[i] for i in members],
                           [f"task {order.index(i) + 1}/{len(extracted)}" for i in members], quota, options,
                           database_dir, db, builder, runner, workers, bar, progress, summary, interrupt)
                    for i in members:    # finished normally: each had its quota (or its search space ran out)
                        entry = progress.get(keys[i])
                        entry["searched"] = max(int(entry.get("searched", 0)), per_task)
                        entry["name"] = extracted[i].task_name
                    progress.save()
                interrupt.check()
                # 3. paired check of each searched kernel's best record against its default schedule
                if check:
                    if bar is not None:
                        bar.set_description_str(f"checking {len(check)} tuned kernels against their defaults")
                    summary.defaults_kept, summary.check_records = check_against_defaults(
                        db, [extracted[i] for i in check], [keys[i] for i in check], target, builder, runner,
                        progress)
                    progress.save()
            except KeyboardInterrupt:
                raise
            except Exception as e:
                if interrupt.requested:          # Ctrl-C inside TVM surfaces as an FFI RuntimeError
                    raise KeyboardInterrupt from None
                raise TuningError(f"MetaSchedule tuning into {database_dir} failed: {type(e).__name__}: "
                                  f"{first_line(str(e))}") from e
    except KeyboardInterrupt:
        summary.interrupted = True
        progress.save()
        n = count_lines(database_dir / RECORD_FILE)
        if bar is not None:
            bar.close()
            bar = None
        print(f"\ngraphopt: tuning interrupted; {n} records are kept in {database_dir} "
              f"(the next run reuses them and tunes only what is missing)", file=sys.stderr, flush=True)
        raise
    finally:
        if bar is not None:
            bar.close()
        close_workers(builder, runner)
    summary.estimated_ms = _estimate_ms(db, extracted, keys, progress)
    summary.seconds = time.perf_counter() - start
    log(f"tuning: {summary.new_trials} new measurements over {summary.tasks_tuned}/{summary.tasks} kernels, "
        f"{summary.reused_records} records reused, {summary.seconds:.1f} s ({database_dir})")
    return db, summary


def _estimate_ms(db, extracted, keys, progress) -> float | None:
    """Sum over kernels of calls x the latency of what will run: the paired-check measurement of a kernel kept
    on its default schedule, else its best record (None when a kernel has no valid record)."""
    total = 0.0
    for t, key in zip(extracted, keys):
        entry = progress.tasks.get(key, {})
        best = entry.get("default_secs") if entry.get("default") else None
        best = best if best is not None else _best_secs(db, t.dispatched[0])
        if best is None:
            return None
        total += best * max(1, int(t.weight))
    return round(total * 1e3, 4)


def _bar(options: TuneOptions, total: int, tasks: int):
    if not options.progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="trial", desc=f"tuning {tasks} kernels", dynamic_ncols=True, leave=True)
