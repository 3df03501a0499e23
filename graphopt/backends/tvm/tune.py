"""Scheduling of CPU kernels: graphopt's default schedules, and MetaSchedule tuning with kept records.

    optimize(model, target="x86", example_inputs=x)                 # default schedules (schedules.py)
    optimize(model, target="x86", example_inputs=x, tune=True)      # + MetaSchedule, TuneOptions() budget
    optimize(..., tune=200)                                         # 200 trials in all
    optimize(..., tune={"trials": 200, "trials_per_task": 16, "database": "/path/to/records"})
    graphopt tune --model resnet18 --trials 256                     # cli_tune(args)

Flow (schedule_cpu, called by build._schedule for LLVM targets):
  1. Relax rewrites + layout (schedules.relax_layout_passes), legalize, fold, fuse (schedules.legalize_passes).
  2. With tuning options: every unscheduled kernel is a MetaSchedule task, except kernels with an integer
     input (gathers such as embedding lookups: random measurement inputs would index out of bounds; see
     _reads_integers). Graphopt's default schedule of each task is measured first and committed as that
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
measures in the builder's worker processes (one TVM import less), and the XGBoost cost model is not trained
before it has the 100 measurements it needs to predict anything (MetaSchedule trains it every round anyway,
several seconds each). Measured on the 2-core test machine: a tiny 2-kernel MLP, 8 trials, ~10 s of tuning at
load ~1.7 and ~24 s at load ~4 (~24-34 s at load ~1.5-2.9 before those two changes); compiling it again from
the records ~1.2 s.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import GraphoptError, TuningError

__all__ = ["TuneOptions", "coerce_tune", "default_database_dir", "check_database", "schedule_cpu",
           "tune_module", "TuningSummary", "cli_tune"]

WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
PROGRESS_FILE = "graphopt_progress.json"


# ---------------------------------------------------------------------------------------------- options
@dataclass
class TuneOptions:
    """How to tune. `optimize(tune=...)` accepts True (these defaults), an int (trials), a dict or this.

    trials           total new MetaSchedule trials for this model (across all its kernels)
    trials_per_task  trials per kernel; default: trials spread evenly over the kernels (at least 1 each);
                     when trials < kernels x trials_per_task, the kernels with the most FLOPs x calls go first
    database         record directory (MetaSchedule JSONDatabase); default: per target under the user cache
                     dir, or $GRAPHOPT_TUNING_DIR/<target> when that is set
    timeout          seconds allowed per build and per measurement of one candidate
    progress         show a tqdm progress bar (trials, current task, best latencies)
    trials_per_iter  candidates built and measured per round
    population       evolutionary search population (smaller: faster rounds, less exploration)
    seed             random seed of the search
    seed_defaults    measure graphopt's default schedule of each kernel and keep it as its first record, and
                     check each searched kernel's best record against it, back to back, after the search
    """

    trials: int = 64
    trials_per_task: int | None = None
    database: str | None = None
    timeout: float = 60.0
    progress: bool = True
    trials_per_iter: int = 16
    population: int = 256
    seed: int = 0
    seed_defaults: bool = True

    def __post_init__(self):
        def bad(name, value, expected):
            raise TuningError(f"tune option {name}={value!r}: expected {expected}; {_known_options()}")

        def positive_int(name, value, allow_none=False):
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                bad(name, value, "a positive integer")

        positive_int("trials", self.trials)
        positive_int("trials_per_task", self.trials_per_task, allow_none=True)
        positive_int("trials_per_iter", self.trials_per_iter)
        positive_int("population", self.population)
        if not isinstance(self.timeout, (int, float)) or isinstance(self.timeout, bool) or self.timeout <= 0:
            bad("timeout", self.timeout, "seconds > 0")
        if self.database is not None and not isinstance(self.database, (str, os.PathLike)):
            bad("database", self.database, "a directory path")
        if self.database is not None:
            self.database = os.path.expanduser(os.fspath(self.database))
        for name in ("progress", "seed_defaults"):
            if not isinstance(getattr(self, name), bool):
                bad(name, getattr(self, name), "True or False")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            bad("seed", self.seed, "an integer")


def _known_options() -> str:
    """The accepted forms of `tune=`, for error messages."""
    names = ", ".join(f.name for f in dataclasses.fields(TuneOptions))
    return (f"tune= accepts None/False (no tuning), True (default options), a positive trial count, "
            f"a dict of options or a TuneOptions; known options: {names}")


def coerce_tune(tune: Any) -> TuneOptions | None:
    """None/False/0 -> None (no tuning); True -> TuneOptions(); int n -> n trials; dict -> fields; TuneOptions.

    Anything else (a negative count, a string, an unknown option) raises TuningError listing the known options.
    """
    if tune is None or tune is False:
        return None
    if tune is True:
        return TuneOptions()
    if isinstance(tune, TuneOptions):
        return tune
    if isinstance(tune, int):
        if tune == 0:
            return None
        if tune < 0:
            raise TuningError(f"tune={tune!r}: a trial count must be positive; {_known_options()}")
        return TuneOptions(trials=tune)
    if isinstance(tune, dict):
        names = {f.name for f in dataclasses.fields(TuneOptions)}
        unknown = sorted(map(str, set(tune) - names))
        if unknown:
            raise TuningError(f"unknown tune option(s) {', '.join(map(repr, unknown))}; {_known_options()}")
        return TuneOptions(**tune)
    raise TuningError(f"tune={tune!r} ({type(tune).__name__}) is not a tuning request; {_known_options()}")


# -------------------------------------------------------------------------------------------- databases
def _user_cache_dir() -> Path:
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches"
    if os.name == "nt":
        return Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")


def default_database_dir(spec) -> Path:
    """The record directory of a target: one per TVM target (records of one CPU do not fit another)."""
    key = spec.key() if hasattr(spec, "key") else json.dumps(spec, sort_keys=True, default=str)
    alias = getattr(spec, "alias", "target")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", alias)[:40].strip("_") or "target"
    name = f"{slug}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"
    root = os.environ.get("GRAPHOPT_TUNING_DIR")
    return (Path(root) if root else _user_cache_dir() / "graphopt" / "tuning") / name


def _valid_workload_line(obj) -> str | None:
    if not (isinstance(obj, list) and len(obj) == 2 and isinstance(obj[0], str) and isinstance(obj[1], str)):
        return "expected [structural hash, serialized module]"
    if not obj[0].isdigit():
        return "the structural hash is not a number"
    return None


def _valid_record_line(obj, n_workloads: int) -> str | None:
    if not (isinstance(obj, list) and len(obj) == 2 and isinstance(obj[0], int) and isinstance(obj[1], list)):
        return "expected [workload index, record]"
    if not 0 <= obj[0] < n_workloads:
        return f"workload index {obj[0]} is not among the {n_workloads} workloads of {WORKLOAD_FILE}"
    rec = obj[1]
    if len(rec) < 2 or not isinstance(rec[0], list):
        return "the record has no trace"
    run_secs = rec[1]
    if run_secs is not None and not (isinstance(run_secs, list)
                                     and all(isinstance(x, (int, float)) for x in run_secs)):
        return "run times are not a list of numbers"
    return None


def _check_file(path: Path, validate) -> int:
    """Validate a JSON-lines record file; drop a truncated last line (warning); raise on other damage."""
    if not path.exists():
        return 0
    try:
        data = path.read_bytes()
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TuningError(f"tuning database file {path} is unreadable ({type(e).__name__}: {e}); "
                          f"delete it (the records in it are lost) or point tune['database'] elsewhere") from e
    lines = text.split("\n")
    complete = text.endswith("\n") or text == ""
    good = 0
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        last = i == len(lines) or (i == len(lines) - 1 and lines[-1] == "")
        try:
            obj = json.loads(line)
        except ValueError as e:
            if last and not complete:
                kept = "\n".join(lines[:i - 1]) + ("\n" if i > 1 else "")
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_text(kept, encoding="utf-8")
                os.replace(tmp, path)
                warnings.warn(f"tuning database file {path}: dropped an incomplete last line {i} "
                              f"(written when a run was interrupted); {good} records kept", stacklevel=3)
                return good
            raise TuningError(f"tuning database file {path}, line {i}: not valid JSON ({e}); "
                              f"delete that line or the file to continue") from None
        why = validate(obj)
        if why:
            raise TuningError(f"tuning database file {path}, line {i}: {why}; delete that line or the file "
                              f"to continue")
        good += 1
    if not complete:        # a whole last line without its newline: TVM's next append would join the two lines
        with open(path, "a", encoding="utf-8") as f:
            f.write("\n")
    return good


def check_database(path) -> tuple[int, int]:
    """Check (and, for a crash-truncated last line, repair) a record directory before TVM reads it.

    Returns (workloads, records). Raises TuningError naming the file and line of any other damage.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise TuningError(f"tuning database {path} is a file; it must be a directory (tune['database'] names "
                          f"a directory of MetaSchedule records)")
    n_work = _check_file(path / WORKLOAD_FILE, _valid_workload_line)
    n_rec = _check_file(path / RECORD_FILE, lambda obj: _valid_record_line(obj, n_work))
    return n_work, n_rec


def _open_database(path: Path):
    from tvm.s_tir import meta_schedule as ms

    check_database(path)                       # a file in the way: TuningError before mkdir fails
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TuningError(f"tuning database {path} cannot be created ({type(e).__name__}: {e}); "
                          f"point tune['database'] at a writable directory") from e
    try:
        return ms.database.JSONDatabase(work_dir=str(path), module_equality="structural")
    except Exception as e:
        raise TuningError(f"tuning database {path} could not be loaded ({WORKLOAD_FILE}, {RECORD_FILE}): "
                          f"{type(e).__name__}: {_first_line(str(e))}; delete the directory to start over") from e


class _Progress:
    """graphopt_progress.json: search trials measured per task (structural hash), written after each round."""

    def __init__(self, path: Path):
        self.path = path
        self.tasks: dict[str, dict] = {}
        if path.exists():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                self.tasks = {str(k): dict(v) for k, v in data.get("tasks", {}).items()}
            except (ValueError, OSError, AttributeError, TypeError) as e:
                warnings.warn(f"tuning progress file {path} is unreadable ({e}); trial counts restart from the "
                              f"records (tasks with records count as tuned)", stacklevel=3)
                self.tasks = {}
                self.unreadable = True

    def get(self, key: str) -> dict:
        return self.tasks.setdefault(key, {"searched": 0, "seeded": False})

    def save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"version": 1, "tasks": self.tasks}, indent=1, sort_keys=True),
                       encoding="utf-8")
        os.replace(tmp, self.path)


# ------------------------------------------------------------------------------------ builder, runner
def _import_target_intrinsics(target) -> None:
    """Register only the target's tensor intrinsics, so MetaSchedule's `import tvm.s_tir.tensor_intrin`
    (every TuneContext does it) finds the package loaded instead of importing all of it (~80 s, CUDA ~55 s)."""
    import importlib
    import importlib.util

    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None:
        return
    package = importlib.util.module_from_spec(spec)      # the package, without running its __init__
    sys.modules[name] = package
    import tvm.s_tir

    tvm.s_tir.tensor_intrin = package
    triple = str(target.attrs.get("mtriple", "") or "")
    sub = "arm_cpu" if triple.startswith(("aarch64", "arm")) else "x86"
    try:
        importlib.import_module(f"{name}.{sub}")
    except Exception:        # intrinsics only matter for int8 tensorization; tuning float kernels works anyway
        pass


def _make_f_build():
    """The build function of the LocalBuilder workers (pickled by value: workers import only TVM)."""

    def graphopt_build(mod, target, _params):
        from tvm.driver import build as tvm_build
        from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

        mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
        return tvm_build(mod, target=target)

    return graphopt_build


def _make_worker_initializer():
    """Initializer of the builder and runner workers: they ignore SIGINT, so a Ctrl-C in the terminal (sent to
    the whole process group) stops the tuning process at its next safe point instead of killing the workers
    mid-measurement (which would record the round as failed). Pickled by value, like the build function."""

    def graphopt_worker_init():
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)

    return graphopt_worker_init


def _pooled_builder(max_workers: int, timeout_sec: float, recycle_after: int = 16):
    """A MetaSchedule builder whose worker processes live across build rounds (recycled every
    `recycle_after` rounds). MetaSchedule's LocalBuilder starts fresh workers for every round, and each one
    pays the TVM import again (~5-10 s here) before building anything."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.builder import local_builder
    from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

    f_build = _make_f_build()

    @derived_object
    class GraphoptBuilder(ms.builder.PyBuilder):
        def __init__(self):
            super().__init__()
            self._pool = None
            self._rounds = 0

        def _get_pool(self):
            if self._pool is None or self._rounds >= recycle_after:
                self.close()
                self._pool = PopenPoolExecutor(max_workers=max_workers, timeout=timeout_sec,
                                               initializer=_make_worker_initializer())
                self._rounds = 0
            self._rounds += 1
            return self._pool

        def current_pool(self):
            """The pool of the current round (for the runner, which measures in the same workers)."""
            if self._pool is None:
                return self._get_pool()
            return self._pool

        def warm(self):
            """Start the workers now (they import TVM while the caller does other work)."""
            pool = self._get_pool()
            self._rounds -= 1
            for _ in range(max_workers):
                pool.submit(int, 0)

        def close(self):
            if self._pool is not None:
                try:
                    self._pool.shutdown()
                except Exception:
                    pass
                self._pool = None

        def build(self, build_inputs):
            pool = self._get_pool()
            results = []
            args = [(f_build, None, inp.mod, inp.target, None) for inp in build_inputs]
            for res in pool.map_with_error_catching(lambda x: local_builder._worker_func(*x), args):
                if res.status == StatusKind.COMPLETE:
                    results.append(ms.builder.BuilderResult(res.value, None))
                elif res.status == StatusKind.TIMEOUT:
                    results.append(ms.builder.BuilderResult(
                        None, f"graphopt builder: timeout, killed after {timeout_sec} seconds"))
                    self._rounds = recycle_after          # a killed worker: start a fresh pool next round
                else:
                    results.append(ms.builder.BuilderResult(None, f"graphopt builder: {res.value}"))
            return results

    return GraphoptBuilder()


def _pooled_runner(builder, timeout_sec: float, evaluator_config):
    """A MetaSchedule runner that measures in the builder's worker processes, one candidate at a time.

    MetaSchedule builds a whole round, then measures it, so no build runs during a measurement. LocalRunner
    would start one more worker process (another TVM import, ~4 s of CPU here) for the same job."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.runner import local_runner

    @derived_object
    class GraphoptRunner(ms.runner.PyRunner):
        def run(self, runner_inputs):
            pool = builder.current_pool()
            results = []
            for inp in runner_inputs:
                future = pool.submit(local_runner._worker_func, None, None, None, evaluator_config, 1,
                                     str(inp.artifact_path), str(inp.device_type),
                                     tuple(arg.as_json() for arg in inp.args_info))
                try:
                    secs, error = future.result(), None
                except TimeoutError:
                    secs, error = None, f"graphopt runner: timeout, killed after {timeout_sec} seconds"
                except Exception as e:       # the candidate crashed or computed nothing: a failed trial
                    secs, error = None, f"graphopt runner: {type(e).__name__}: {e}"
                results.append(local_runner.LocalRunnerFuture(res=secs, error_message=error))
            return results

    return GraphoptRunner()


def _builder_runner(options: TuneOptions, workers: int):
    from tvm.s_tir import meta_schedule as ms

    builder = _pooled_builder(max_workers=workers, timeout_sec=options.timeout)
    builder.warm()
    runner = _pooled_runner(builder, options.timeout, ms.runner.EvaluatorConfig._normalized(
        ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=40, enable_cpu_cache_flush=False)))
    return builder, runner


def _run_secs(result) -> float | None:
    if result is None or getattr(result, "error_msg", None):
        return None
    secs = [float(x) for x in (result.run_secs or [])]
    return sum(secs) / len(secs) if secs else None


# ---------------------------------------------------------------------------------------------- tuning
@dataclass
class TuningSummary:
    database: str
    tasks: int = 0                  # kernels MetaSchedule could tune
    tasks_tuned: int = 0            # kernels searched in this run
    new_trials: int = 0             # candidates measured in this run (search + default-schedule seeds)
    reused_records: int = 0         # records that were already in the database
    seconds: float = 0.0
    interrupted: bool = False
    estimated_ms: float | None = None   # sum over kernels of calls x best measured latency
    defaults_kept: int = 0          # searched kernels whose default schedule won the paired check
    check_records: int = 0          # records committed by the paired check (2 per kernel checked)
    untunable: int = 0              # kernels with integer inputs (gathers), left to the default schedules

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _task_key(mod) -> str:
    try:
        from tvm_ffi import structural_hash
    except ImportError:            # older TVM
        from tvm.ir import structural_hash

    return str(structural_hash(mod))


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

    from .schedules import is_scheduled

    start = time.perf_counter()
    log = log or (lambda msg: None)
    _import_target_intrinsics(target)

    db = _open_database(database_dir)
    progress = _Progress(database_dir / PROGRESS_FILE)
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
    keys = [_task_key(t.dispatched[0]) for t in extracted]
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
    workers = _workers(target)
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
    builder, runner = _builder_runner(options, workers)

    bar = _bar(options, total=sum(need[i] for i in todo), tasks=len(extracted))
    interrupt = _Interrupt()
    try:
        with interrupt:
            try:
                # 1. seed: graphopt's default schedule of every task that has no record yet
                if seeds:
                    if bar is not None:
                        bar.set_description_str(f"measuring default schedules of {len(seeds)} kernels")
                    n = _seed_defaults(db, [extracted[i] for i in seeds], target, builder, runner)
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
                    _search(ms, [extracted[i] for i in members], [keys[i] for i in members],
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
                    summary.defaults_kept, summary.check_records = _check_against_defaults(
                        db, [extracted[i] for i in check], [keys[i] for i in check], target, builder, runner,
                        progress)
                    progress.save()
            except KeyboardInterrupt:
                raise
            except Exception as e:
                if interrupt.requested:          # Ctrl-C inside TVM surfaces as an FFI RuntimeError
                    raise KeyboardInterrupt from None
                raise TuningError(f"MetaSchedule tuning into {database_dir} failed: {type(e).__name__}: "
                                  f"{_first_line(str(e))}") from e
    except KeyboardInterrupt:
        summary.interrupted = True
        progress.save()
        n = _count_lines(database_dir / RECORD_FILE)
        if bar is not None:
            bar.close()
            bar = None
        print(f"\ngraphopt: tuning interrupted; {n} records are kept in {database_dir} "
              f"(the next run reuses them and tunes only what is missing)", file=sys.stderr, flush=True)
        raise
    finally:
        if bar is not None:
            bar.close()
        _close(builder, runner)
    summary.estimated_ms = _estimate_ms(db, extracted, keys, progress)
    summary.seconds = time.perf_counter() - start
    log(f"tuning: {summary.new_trials} new measurements over {summary.tasks_tuned}/{summary.tasks} kernels, "
        f"{summary.reused_records} records reused, {summary.seconds:.1f} s ({database_dir})")
    return db, summary


def _search(ms, tasks, keys, labels, quota, options, database_dir, db, builder, runner, workers, bar, progress,
            summary, interrupt) -> None:
    """MetaSchedule's evolutionary search over `tasks`, `quota` new trials each, records into `db`.

    The tune contexts are made here, as ms.relax_integration.extracted_tasks_to_tune_contexts makes them, but
    with the loggers of metaschedule_logs (MetaSchedule's own set-up fails on a handler without a name)."""
    from tvm.s_tir.meta_schedule.utils import fork_seed

    space = _search_space(ms, tasks[0])
    strategy = ms.search_strategy.EvolutionarySearch(population_size=options.population,
                                                     init_min_unmeasured=min(50, options.population))
    with metaschedule_logs(database_dir, [t.task_name for t in tasks]) as loggers:
        contexts = [ms.TuneContext(mod=task.dispatched[0], target=task.target, space_generator=space,
                                   search_strategy=strategy, task_name=task.task_name, logger=logger,
                                   rand_state=rand_state, num_threads=workers).clone()
                    for task, logger, rand_state in zip(tasks, loggers, fork_seed(options.seed, n=len(tasks)))]
        callback = _progress_callback(bar, tasks, keys, labels, progress, summary, interrupt)
        ms.tune.tune_tasks(
            tasks=contexts, task_weights=[t.weight for t in tasks], work_dir=str(database_dir),
            max_trials_global=quota * len(tasks), max_trials_per_task=quota,
            num_trials_per_iter=min(options.trials_per_iter, quota),
            builder=builder, runner=runner, database=db, cost_model=_cost_model(workers),
            measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"), callback])


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


def _cost_model(workers: int):
    """MetaSchedule's XGBoost cost model (as tune_tasks makes it), trained only once it is used.

    XGBModel predicts random scores until it has `num_warmup_samples` (100) measurements, yet retrains after
    every round (~3-6 s each here, plus ~2 s to import xgboost): with budgets below 100 trials per tuning run
    all of that was wasted. The search is the same; only the unused training is skipped."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.cost_model import XGBModel

    @derived_object
    class GraphoptXGBModel(XGBModel._cls):
        def _train(self, xs, ys):
            if self.data_size < self.num_warmup_samples:
                self.last_train_size = 0        # train at the first update that reaches the warm-up size
                return
            super()._train(xs, ys)

    return GraphoptXGBModel(num_tuning_cores=workers, tree_method="auto")


def _search_space(ms, task):
    """MetaSchedule's default search space for the target (its schedule rules, postprocessors and mutators),
    with RewriteLayout guarded (_guarded_rewrite_layout)."""
    probe = ms.TuneContext(mod=task.dispatched[0], target=task.target, space_generator="post-order-apply",
                           task_name="graphopt-space")
    space = probe.space_generator
    postprocs = [_guarded_rewrite_layout(p) if type(p).__name__ == "RewriteLayout" else p for p in space.postprocs]
    return ms.space_generator.PostOrderApply(sch_rules=list(space.sch_rules), postprocs=postprocs,
                                             mutator_probs=dict(space.mutator_probs))


def _repacks_weights(sch) -> bool:
    """Whether a schedule already repacks a weight itself (graphopt's default schedules do: a TransformLayout
    of a cache-read weight; MetaSchedule's own candidates only get one from RewriteLayout)."""
    trace = sch.trace
    if trace is None:
        return False
    return any(inst.kind.name == "TransformLayout" for inst in trace.insts)


def _guarded_rewrite_layout(inner):
    """MetaSchedule's RewriteLayout postprocessor, except on schedules that already repack their weights.

    The default schedule of each kernel is committed as its first record, so the evolutionary search replays
    it with the postprocessors. TVM 0.27's RewriteLayout fails a check on a weight already repacked
    (`args.size() == initial_indices_orig.size()`) and that error would abort the whole search; such a
    schedule needs no layout rewrite. Any other failure of RewriteLayout drops that one candidate."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    @derived_object
    class GraphoptRewriteLayout(ms.postproc.PyPostproc):
        def __init__(self, wrapped):
            super().__init__()
            self.wrapped = wrapped

        def _initialize_with_tune_context(self, context) -> None:
            self.wrapped._initialize_with_tune_context(context)

        def apply(self, sch) -> bool:
            if _repacks_weights(sch):
                return True
            try:
                return bool(self.wrapped.apply(sch))
            except Exception:
                return False

        def clone(self):
            return GraphoptRewriteLayout(self.wrapped.clone())

    return GraphoptRewriteLayout(inner)


class _Interrupt:
    """Ctrl-C while tuning. The first one asks to stop at the next safe point (once the candidates being
    measured are committed to the records, or after the default-schedule seeds) and then raises
    KeyboardInterrupt; a second one goes to the previous handler at once (Python's raises KeyboardInterrupt).

    A KeyboardInterrupt raised inside a TVM callback reaches Python as an FFI RuntimeError, and one raised in
    the middle of an import leaves that import broken, hence the flag and the safe points. Installed in the
    main thread only, over a Python-level handler (not where SIGINT is ignored or left to the OS)."""

    def __init__(self):
        self.requested = False
        self._previous = None
        self._installed = False

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            try:
                previous = signal.getsignal(signal.SIGINT)
                if callable(previous):
                    self._previous = signal.signal(signal.SIGINT, self._handle)
                    self._installed = True
            except (ValueError, OSError):
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:
            if callable(self._previous):
                return self._previous(signum, frame)
            raise KeyboardInterrupt
        self.requested = True
        print("\ngraphopt: Ctrl-C: tuning stops once the candidates being measured are recorded "
              "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt

    def __exit__(self, *exc):
        if self._installed:
            import signal

            signal.signal(signal.SIGINT, self._previous)
            self._installed = False
        return False


def _close(builder, runner) -> None:
    """Stop the worker processes (the runner measures in the builder's)."""
    try:
        builder.close()
    except Exception:
        pass


def _count_lines(path: Path) -> int:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return sum(1 for line in f if line.strip())
    except OSError:
        return 0


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


def _workers(target) -> int:
    cores = target.attrs.get("num-cores")
    try:
        n = int(cores) if cores is not None else 0
    except Exception:
        n = 0
    if n <= 0:
        from ..targets import physical_cores

        n = physical_cores()
    return max(1, n)


def _bar(options: TuneOptions, total: int, tasks: int):
    if not options.progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="trial", desc=f"tuning {tasks} kernels", dynamic_ncols=True, leave=True)


def _seed_defaults(db, tasks, target, builder, runner) -> int:
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
        secs = _run_secs(res)
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
                      f"(first: {_first_line(str(failed[0][1]))}); their search starts without it", stacklevel=2)
    _remove_artifacts(builds)
    return n


def _remove_artifacts(builds) -> None:
    """Delete the builder's temporary directories of `builds` (BuilderResults)."""
    for b in builds:
        if b.artifact_path:
            shutil.rmtree(os.path.dirname(b.artifact_path), ignore_errors=True)


BEAT_DEFAULT_BY = 0.02      # a searched schedule replaces the default one only when >2% faster in the paired check


def _check_against_defaults(db, tasks, keys, target, builder, runner, progress) -> tuple[int, int]:
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
        value = _run_secs(fut.result())
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
    """The task key (_task_key of MetaSchedule's dispatched module) of a PrimFunc of the module being built."""
    import tvm

    return _task_key(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}))


def _keep_defaults(mod, target, keys: set[str]):
    """Schedule the PrimFuncs of `mod` whose task key is in `keys` with the default rules (before the
    database is applied, so that their records are not). Returns (module, count)."""
    import tvm
    from tvm import tirx

    from . import schedules

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

    from .schedules import default_rules

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


def _progress_callback(bar, tasks, keys, labels, progress: _Progress, summary: TuningSummary,
                       interrupt: _Interrupt | None = None):
    from tvm.s_tir import meta_schedule as ms
    from tvm.ir.utils import derived_object

    best: dict[int, float] = {}

    @derived_object
    class GraphoptProgress(ms.measure_callback.PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            n = len(measure_candidates)
            summary.new_trials += n
            for res in runner_results:
                secs = _run_secs(res)
                if secs is not None and secs < best.get(task_id, float("inf")):
                    best[task_id] = secs
            entry = progress.get(keys[task_id])
            entry["searched"] = int(entry.get("searched", 0)) + n
            entry["name"] = tasks[task_id].task_name
            progress.save()
            if bar is not None:
                b = best.get(task_id)
                bar.update(n)
                bar.set_description_str(f"{labels[task_id]} {tasks[task_id].task_name[:28]}")
                bar.set_postfix_str(f"best {b * 1e3:.4f} ms" if b is not None else "no valid candidate yet")
            if interrupt is not None and interrupt.requested:     # this round's records are committed: stop
                raise KeyboardInterrupt("graphopt: tuning interrupted")

    return GraphoptProgress()


# ----------------------------------------------------------------------------------- schedule (build)
def schedule_cpu(mod, spec, tune: Any = None, report=None):
    """Relax module -> scheduled module for an LLVM CPU target (build._schedule calls this).

    tune=None: graphopt's default schedules. Tuning options (see coerce_tune): MetaSchedule first, then
    the best records applied and default schedules for the rest. Records report.backend["schedule"],
    ["kernels"] and, when tuning, ["tuning"].
    """
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu_pipeline

    from . import schedules

    options = coerce_tune(tune)
    target = spec.tvm_target()
    from .native_log import native_stderr_filtered

    with target, native_stderr_filtered():         # legalizing a gather logs "Fast mode segfaults ..."
        passes = (cpu_pipeline.library_dispatch_passes(target) + schedules.relax_layout_passes(target)
                  + schedules.legalize_passes(target))
        mod = tvm.transform.Sequential(passes)(mod)
    summary = None
    tuned_kernels = 0
    if options is not None:
        database_dir = Path(options.database) if options.database else default_database_dir(spec)
        db, summary = tune_module(mod, target, options, database_dir=database_dir)
        mod, kept_default = _keep_defaults(mod, target, defaults_kept(database_dir))
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


# ------------------------------------------------------------------------------------------------ CLI
def cli_tune(args) -> int:
    """`graphopt tune`: tune a bundled model for a target and keep the records; prints a summary.

    args (argparse.Namespace): model (bundled name), target, pipeline, batch, trials (int),
    database (directory or None). Optional: trials_per_task (int), timeout (seconds), no_progress (bool).
    """
    import torch

    import graphopt
    from graphopt.models import get_model

    torch.manual_seed(0)
    model, inputs = get_model(args.model, batch=args.batch)
    options = {"trials": int(args.trials)}
    if getattr(args, "database", None):
        options["database"] = args.database
    if getattr(args, "trials_per_task", None):
        options["trials_per_task"] = int(args.trials_per_task)
    if getattr(args, "timeout", None):
        options["timeout"] = float(args.timeout)
    if getattr(args, "no_progress", False):
        options["progress"] = False
    n = options["trials"]
    print(f"graphopt tune: {args.model} (batch {args.batch}) for {args.target!r}, {n} trial{'s' * (n != 1)}",
          flush=True)
    start = time.perf_counter()
    try:
        opt = graphopt.optimize(model, target=args.target, pipeline=args.pipeline, example_inputs=inputs,
                                tune=options)
    except KeyboardInterrupt:            # tune_module has said where the records measured so far are kept
        return 130
    total = time.perf_counter() - start
    tuning = opt.report.backend.get("tuning", {})
    print(f"tuned in {total:.1f} s: {tuning.get('new_trials', 0)} new measurements, "
          f"{tuning.get('reused_records', 0)} records reused, {tuning.get('tasks_tuned', 0)}/"
          f"{tuning.get('tasks', 0)} kernels searched")
    print(f"paired check against the default schedules: {tuning.get('check_records', 0)} measurements, "
          f"{tuning.get('defaults_kept', 0)} kernels kept on their default schedule")
    if tuning.get("estimated_ms") is not None:
        print(f"sum of best kernel latencies: {tuning['estimated_ms']:.3f} ms")
    print(f"records: {tuning.get('database', '?')}")
    print(f"kernels: {opt.report.backend.get('kernels', '')}")
    return 0


def _first_line(text: str, limit: int = 400) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        return ""
    line = lines[-1] if lines[0].startswith("Traceback") else lines[0]
    return line if len(line) <= limit else line[:limit] + "..."


_ = GraphoptError
