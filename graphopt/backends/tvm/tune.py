"""graphopt.backends.tvm.tune: the tuning API under its first import path; the code is in tuning/."""
from __future__ import annotations

from .tuning import (BEAT_DEFAULT_BY, PROGRESS_FILE, RECORD_FILE, WORKLOAD_FILE, TuneOptions, TuningSummary,
                     check_database, cli_tune, coerce_tune, default_database_dir, defaults_kept, func_key,
                     metaschedule_logs, schedule_cpu, tune_module)

__all__ = ["TuneOptions", "coerce_tune", "default_database_dir", "check_database", "schedule_cpu",
           "tune_module", "TuningSummary", "cli_tune", "metaschedule_logs", "defaults_kept", "func_key",
           "BEAT_DEFAULT_BY", "WORKLOAD_FILE", "RECORD_FILE", "PROGRESS_FILE"]
