"""MetaSchedule's log files for one search, without logging.config (metaschedule_logs), and the tune contexts
that log to them (tune_contexts)."""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

__all__ = ["MS_LOGGER", "metaschedule_logs", "tune_contexts"]


MS_LOGGER = "tvm.s_tir.meta_schedule"

_LOG_FORMAT = ("%(asctime)s [%(levelname)s] %(message)s", "%Y-%m-%d %H:%M:%S")     # MetaSchedule's


@contextlib.contextmanager
def metaschedule_logs(work_dir, task_names):
    """MetaSchedule's log files for one search, set up without logging.config; yields one logger per task.

    What MetaSchedule's get_loggers_from_work_dir sets up, files and names alike: <work_dir>/logs/
    tvm.s_tir.meta_schedule.logging.task_scheduler.log (the "tvm.s_tir.meta_schedule" logger, DEBUG: the task
    scheduler's tables, the cost model) and one file per task logger; on the console (stdout) only warnings
    and above (or the level the user set on that logger, if higher). MetaSchedule's own set-up goes through
    logging.config.dictConfig, which fails on any handler without a name on that logger (AttributeError:
    'NoneType' object has no attribute 'format') and closes every handler of the process. Here handlers the
    user put on the logger are left as they are, and on exit the loggers' levels, propagation and handlers
    are restored: nothing of the search stays in the process's logging."""
    import logging

    log_dir = Path(work_dir) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    formatter = logging.Formatter(*_LOG_FORMAT)
    added: list[tuple[logging.Logger, logging.Handler]] = []
    saved: list[tuple[logging.Logger, int, bool]] = []

    def attach(logger, handler, level):
        handler.setLevel(level)
        handler.setFormatter(formatter)
        logger.addHandler(handler)
        added.append((logger, handler))

    def own(logger):
        saved.append((logger, logger.level, logger.propagate))
        logger.setLevel(logging.DEBUG)
        logger.propagate = False

    top = logging.getLogger(MS_LOGGER)
    console_level = max(logging.WARNING, top.level)
    try:
        own(top)
        attach(top, logging.FileHandler(log_dir / f"{MS_LOGGER}.logging.task_scheduler.log", encoding="utf-8"),
               logging.DEBUG)
        attach(top, logging.StreamHandler(sys.stdout), console_level)
        width = len(str(len(task_names) - 1))
        loggers = []
        for i, name in enumerate(task_names):
            logger = logging.getLogger(f"{MS_LOGGER}.logging.task_{i:0{width}d}_{name[:100]}")
            own(logger)
            attach(logger, logging.FileHandler(log_dir / f"{logger.name}.log", encoding="utf-8"), logging.DEBUG)
            loggers.append(logger)
        top.info("Logging directory: %s", log_dir)
        yield loggers
    finally:
        for logger, handler in reversed(added):
            logger.removeHandler(handler)
            handler.close()
        for logger, level, propagate in reversed(saved):
            logger.setLevel(level)
            logger.propagate = propagate


@contextlib.contextmanager
def tune_contexts(tasks, work_dir, *, space="post-order-apply", strategy="evolutionary", num_threads="physical",
                  seed=None):
    """MetaSchedule TuneContexts of extracted tasks, with their task weights, logging to metaschedule_logs.

    What ms.relax_integration.extracted_tasks_to_tune_contexts returns (same defaults; tune_relax calls it),
    without its logging.config set-up. Yields (contexts, weights); the logs are set up until the block ends,
    so run the search (ms.tune.tune_tasks) inside it."""
    import warnings

    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.utils import fork_seed

    with metaschedule_logs(work_dir, [t.task_name for t in tasks]) as loggers:
        contexts, weights = [], []
        for task, logger, rand_state in zip(tasks, loggers, fork_seed(seed, n=len(tasks))):
            if task.mod.attrs.get("tirx.is_scheduled", False):
                warnings.warn(f"The task {task.task_name} is already scheduled, skipping it.")
                continue
            contexts.append(ms.TuneContext(mod=task.dispatched[0], target=task.target, space_generator=space,
                                           search_strategy=strategy, task_name=task.task_name, logger=logger,
                                           rand_state=rand_state, num_threads=num_threads).clone())
            weights.append(task.weight)
        yield contexts, weights
