"""MetaSchedule's log files for one search, without logging.config (metaschedule_logs)."""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

__all__ = ["MS_LOGGER", "metaschedule_logs"]


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
