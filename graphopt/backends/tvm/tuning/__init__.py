"""Scheduling of CPU kernels: graphopt's default schedules, and MetaSchedule tuning with kept records.

One concern per module:
    options.py    TuneOptions, coerce_tune (what `tune=` accepts)
    records.py    the database directory per target, record-file checks, the progress file
    workers.py    builder and runner worker pools
    search.py     MetaSchedule's evolutionary search (cost model, search space, progress callback)
    logs.py       MetaSchedule's log files for one search
    interrupt.py  Ctrl-C handling
    defaults.py   the default-vs-searched check (seeds, paired check, kernels kept on the default schedule)
    driver.py     tune_module: one tuning run; summary.py: what it did (TuningSummary)
    schedule.py   schedule_cpu: records + default schedules for a build
    cli.py        `graphopt tune`

    optimize(model, target="x86", example_inputs=x)                 # default schedules (schedules.py)
    optimize(model, target="x86", example_inputs=x, tune=True)      # + MetaSchedule, TuneOptions() budget
    optimize(..., tune=200)                                         # 200 trials in all
    optimize(..., tune={"trials": 200, "trials_per_task": 16, "database": "/path/to/records"})
    graphopt tune --model resnet18 --trials 256                     # cli_tune(args)

Flow (schedule_cpu, called by build._schedule for LLVM targets):
  1. Relax rewrites + layout (schedules.relax_layout_passes), legalize, fold, fuse (schedules.legalize_passes).
  2. With tuning options: every unscheduled kernel is a MetaSchedule task, except kernels with an integer
     input (gathers such as embedding lookups: random measurement inputs would index out of bounds; see
     driver._reads_integers). Graphopt's default schedule of each task is measured first and committed as that
     task's first record, so the search starts from it. The search then runs
     with the trial budget (tasks ordered by FLOPs x calls; `trials_per_task` each until `trials` is spent).
  3. Paired check: seeds and search candidates are measured minutes apart, so a change of machine load in
     between makes them incomparable (seen here: MobileNetV2's default kernels recorded at 0.85-3.9 ms on a
     loaded machine, 0.05-0.27 ms quiet, so 0.18 ms search candidates won and the tuned build ran 3x slower
     than the untuned one). After the search, each searched kernel's best record is measured again back to
     back with its default schedule (default, best, default, best; the faster of each pair of runs); both
     measurements are committed as records, and a kernel whose default schedule is not beaten by more than
     2% keeps it ("default": true in the progress file), whatever older records say.
  4. The best record of each kernel is applied (MetaScheduleApplyDatabase); kernels without a record, or kept
     on their default schedule by step 3, get the default schedules; weight-repacking blocks are split out
     and folded into the constants.

Records: a MetaSchedule JSONDatabase directory per target (default: <user cache dir>/graphopt/tuning/
<target>-<hash>; TuneOptions.database or $GRAPHOPT_TUNING_DIR overrides). Every measured trial is appended to
`database_tuning_record.json` as it is measured, so Ctrl-C or a crash keeps every record measured so far. How
many search trials each task has had is kept in `graphopt_progress.json` beside the records: a task that has
had its quota is not tuned again, so optimizing the same model for the same target twice runs zero new trials
and compiles from the records; a larger budget later tunes only the difference. Record files are checked
before TVM reads them: a truncated last line (a crash mid-write) is dropped with a warning; any other bad
line raises TuningError naming the file and line.

Logs: MetaSchedule's log files go to <database>/logs/, set up by metaschedule_logs for the length of a search
(not by MetaSchedule's logging.config set-up, which fails on a handler without a name); the process's
loggers are left as they were.

Ctrl-C: the first one stops tuning once the candidates being measured are committed (the builder/runner
workers ignore SIGINT, so a terminal's Ctrl-C does not kill them mid-measurement) and raises
KeyboardInterrupt; a second one stops at once. Either way every record already appended stays on disk.

MetaSchedule's stock builder imports tvm.s_tir.tensor_intrin in every build worker (~80 s; CUDA intrinsics
alone ~55 s), so every build hits the default 30 s timeout. The builder here is a function that only lowers
and compiles; the tuning process itself imports only the target's intrinsics (x86 or ARM). The runner
measures in the builder's worker processes (one TVM import less), the workers start without PyTorch and
ml_dtypes (which tvm_ffi imports when it can: 2.9 of a worker's 3.8 s start), and the XGBoost cost model is not
trained before it has the 100 measurements it needs to predict anything (MetaSchedule trains it every round anyway,
several seconds each). Measured on the 2-core test machine: a tiny 2-kernel MLP, 8 trials, ~10 s of tuning at
load ~1.7 and ~24 s at load ~4 (~24-34 s at load ~1.5-2.9 before those two changes); compiling it again from
the records ~1.2 s.
"""
from __future__ import annotations

from .cli import cli_tune
from .defaults import BEAT_DEFAULT_BY, defaults_kept, func_key
from .driver import tune_module
from .logs import metaschedule_logs, tune_contexts
from .options import TuneOptions, coerce_tune
from .records import PROGRESS_FILE, RECORD_FILE, WORKLOAD_FILE, check_database, default_database_dir
from .schedule import schedule_cpu
from .summary import TuningSummary

__all__ = ["TuneOptions", "coerce_tune", "default_database_dir", "check_database", "schedule_cpu",
           "tune_module", "TuningSummary", "cli_tune", "metaschedule_logs", "tune_contexts", "defaults_kept",
           "func_key", "BEAT_DEFAULT_BY", "WORKLOAD_FILE", "RECORD_FILE", "PROGRESS_FILE"]
