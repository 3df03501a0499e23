"""MetaSchedule tuning mechanics (graphopt/backends/tvm/tuning/) on a tiny MLP with a small trial budget.

Records are written, reused (a second optimize does zero new trials and compiles from them), survive a real
Ctrl-C, corrupted files give TuningError naming file and line (a crash-truncated last line is dropped with a
warning), bad options list the known ones, `graphopt tune` works, and the record directory is per target.
Performance is not checked here (benchmarks/ does that). Every test has its own database directory.
"""
from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import graphopt
from graphopt.backends.targets import resolve_target
from graphopt.backends.tvm.tune import (PROGRESS_FILE, RECORD_FILE, WORKLOAD_FILE, TuneOptions, check_database,
                                        coerce_tune, default_database_dir)
from graphopt.errors import TuningError

REPO = Path(__file__).resolve().parents[2]

# The same model in this process and in the subprocesses (same kernels, so the same records apply).
MODEL_SRC = """
import torch
from torch import nn

def tiny_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 16)).eval()
    return model, torch.randn(2, 64)
"""
_ns: dict = {}
exec(MODEL_SRC, _ns)
tiny_model = _ns["tiny_model"]

# Small search settings: these tests check mechanics, not the quality of the kernels found.
FAST = {"population": 32, "trials_per_iter": 4, "progress": False}
TRIALS = 8

# tqdm's bar: "...  50%|█████     | 4/8 [00:17<00:17,  4.29s/trial...]"
BAR = re.compile(r"\d+%\|.*\| *\d+/\d+ \[")


@pytest.fixture(autouse=True)
def _no_user_cache(tmp_path, monkeypatch):
    """Nothing here may write records into the user's cache directory."""
    monkeypatch.setenv("GRAPHOPT_TUNING_DIR", str(tmp_path / "default-tuning-dir"))


# Each tuning run starts one build/measure worker process per core (tuning/workers.py), and each worker imports
# TVM: ~1 s of CPU per worker (3.8 s before the workers left PyTorch and ml_dtypes out). These tests check
# record, resume and check mechanics, which do not depend on the worker count, so they run with one worker. The
# Ctrl-C test keeps the real count in its subprocess (a process group of several workers that must ignore
# SIGINT); its resumed run here, which checks the record and trial accounting, has one worker like the others.
KEEPS_WORKERS = ("test_ctrl_c_keeps_every_record_and_the_next_run_does_only_the_missing_trials",)


def _one_worker(mp: pytest.MonkeyPatch) -> None:
    from graphopt.backends.tvm.tuning import driver

    mp.setattr(driver, "worker_count", lambda target: 1)


@pytest.fixture(autouse=True)
def _one_tuning_worker(request, monkeypatch):
    if request.node.originalname not in KEEPS_WORKERS:
        _one_worker(monkeypatch)


def _records(db: Path) -> list[str]:
    text = (db / RECORD_FILE).read_text(encoding="utf-8")
    assert text.endswith("\n"), f"{db / RECORD_FILE} does not end with a newline"
    lines = [ln for ln in text.split("\n") if ln.strip()]
    for i, line in enumerate(lines, 1):
        json.loads(line)          # every line is a whole JSON record
    return lines


def _searched(db: Path) -> dict[str, int]:
    tasks = json.loads((db / PROGRESS_FILE).read_text())["tasks"]
    return {v["name"]: int(v["searched"]) for v in tasks.values()}


def _assert_matches(opt, model, x):
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x), rtol=1e-4, atol=1e-5)


def _optimize(db, **options):
    model, x = tiny_model()
    tune = {"trials": TRIALS, **FAST, **options}
    if db is not None:
        tune["database"] = str(db)
    start = time.perf_counter()
    opt = graphopt.optimize(model, target="x86", example_inputs=x, tune=tune)
    return opt, model, x, time.perf_counter() - start


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """One real tuning run of the tiny model (8 trials); tests copy its database before touching it.

    It runs with a handler without a name on MetaSchedule's logger (a user's logging set-up, see
    test_tuning_works_with_an_unnamed_handler_on_the_metaschedule_logger), which is removed afterwards."""
    db = tmp_path_factory.mktemp("tuned") / "records"
    logger = logging.getLogger("tvm.s_tir.meta_schedule")
    handler = logging.StreamHandler(io.StringIO())
    assert handler.get_name() is None
    logger.addHandler(handler)
    logger_before = (logger.level, logger.propagate, list(logger.handlers))
    try:
        with pytest.MonkeyPatch.context() as mp:
            _one_worker(mp)
            opt, model, x, seconds = _optimize(db)
        logger_after = (logger.level, logger.propagate, list(logger.handlers))
    finally:
        logger.removeHandler(handler)
    print(f"\nfirst tune of the tiny model ({TRIALS} trials): {seconds:.1f} s, "
          f"tuning {opt.report.backend['tuning']['seconds']:.1f} s")
    return {"db": db, "opt": opt, "model": model, "x": x, "seconds": seconds, "logger_before": logger_before,
            "logger_after": logger_after, "handler_output": handler.stream.getvalue()}


def _copy_db(tuned, tmp_path) -> Path:
    db = tmp_path / "records"
    shutil.copytree(tuned["db"], db)
    return db


# ----------------------------------------------------------------------------------------- 1. first tune
def test_first_tune_writes_records_and_matches_the_model(tuned):
    db, opt = tuned["db"], tuned["opt"]
    tuning = opt.report.backend["tuning"]
    records = _records(db)
    workloads = (db / WORKLOAD_FILE).read_text().splitlines()
    assert len(records) > 0 and len(workloads) > 0
    assert tuning["database"] == str(db)
    assert tuning["new_trials"] > 0 and tuning["reused_records"] == 0 and not tuning["interrupted"]
    assert 0 < tuning["tasks_tuned"] <= tuning["tasks"]
    # every measurement (default-schedule seeds + search trials + the paired check) is a record on disk
    assert len(records) == tuning["new_trials"] + tuning["check_records"]
    # every searched kernel had its share of the budget, and no more than the budget was searched
    searched = _searched(db)
    per_task = -(-TRIALS // tuning["tasks"])
    assert sum(1 for n in searched.values() if n >= min(per_task, TRIALS)) == tuning["tasks_tuned"]
    assert sum(searched.values()) <= TRIALS
    assert opt.report.backend["schedule"] == "metaschedule+graphopt-default"
    assert re.match(r"[1-9]\d* from tuning records", opt.report.backend["kernels"])
    _assert_matches(opt, tuned["model"], tuned["x"])


def test_default_schedules_are_kept_as_first_records(tuned):
    """Graphopt's default schedule of each kernel is measured and committed before the search. The default
    schedule of the 64->256 Linear repacks its weight (TransformLayout): MetaSchedule's RewriteLayout
    postprocessor fails on such a schedule when the search replays it, which used to abort the whole tuning
    run (tuning/search.py, _guarded_rewrite_layout)."""
    tuning = tuned["opt"].report.backend["tuning"]
    records = [json.loads(line) for line in _records(tuned["db"])]
    first: dict[int, list] = {}
    for workload, record in records:
        first.setdefault(workload, record)
    assert len(first) == tuning["tasks"]                           # every kernel has a record: its seed
    searched = sum(_searched(tuned["db"]).values())
    assert tuning["new_trials"] == tuning["tasks"] + searched > tuning["tasks"]
    repacked = [w for w, record in first.items() if "TransformLayout" in json.dumps(record[0])]
    if not repacked:
        pytest.skip("the default schedules of this model no longer repack weights; nothing more to check")
    assert all(first[w][1][0] < 1e9 for w in repacked), "a default schedule with a repacked weight failed to run"


def _progress(db: Path) -> dict:
    return json.loads((db / PROGRESS_FILE).read_text())


def _set_progress(db: Path, **fields) -> None:
    data = _progress(db)
    for entry in data["tasks"].values():
        for k, v in fields.items():
            if v is None:
                entry.pop(k, None)
            else:
                entry[k] = v
    (db / PROGRESS_FILE).write_text(json.dumps(data))


def test_paired_check_measures_searched_kernels_against_their_defaults(tuned):
    """After the search, each searched kernel's best record is measured back to back with its default schedule;
    both measurements are records, and the verdict is kept in the progress file."""
    tuning = tuned["opt"].report.backend["tuning"]
    entries = [e for e in _progress(tuned["db"])["tasks"].values() if e["searched"] > 0]
    assert entries and all(isinstance(e.get("default"), bool) for e in entries), entries
    measured = [e for e in entries if "default_secs" in e]
    assert tuning["check_records"] == 2 * len(measured)
    for e in measured:
        assert 0 < e["default_secs"] < 1 and 0 < e["best_secs"] < 1
        assert e["default"] == (e["best_secs"] * 1.02 >= e["default_secs"])
    assert tuning["defaults_kept"] == sum(e["default"] for e in measured)
    assert re.search(r"\d+ kept on the default schedule by the paired check", tuned["opt"].report.backend["kernels"])


def test_kernels_the_check_kept_on_default_are_built_with_the_default_schedule(tuned, tmp_path):
    """A kernel marked "default" is scheduled by graphopt's rules, whatever its records say; unmarked kernels
    take their best record."""
    db = _copy_db(tuned, tmp_path)
    _set_progress(db, default=True)
    opt, model, x, _ = _optimize(db)
    tasks = opt.report.backend["tuning"]["tasks"]
    assert opt.report.backend["kernels"].startswith(
        f"{tasks} from tuning records ({tasks} kept on the default schedule by the paired check)"), opt.report.backend
    assert opt.report.backend["tuning"]["new_trials"] == 0 and opt.report.backend["tuning"]["check_records"] == 0
    _assert_matches(opt, model, x)
    _set_progress(db, default=False)
    opt, model, x, _ = _optimize(db)
    assert opt.report.backend["kernels"].startswith(f"{tasks} from tuning records (0 kept"), opt.report.backend
    _assert_matches(opt, model, x)


def test_records_of_an_unchecked_search_are_checked_once(tuned, tmp_path):
    """Records searched without the paired check (an older graphopt) are checked at the next build, once."""
    db = _copy_db(tuned, tmp_path)
    _set_progress(db, default=None, default_secs=None, best_secs=None)
    opt, model, x, _ = _optimize(db)
    tuning = opt.report.backend["tuning"]
    assert tuning["new_trials"] == 0
    assert all(isinstance(e.get("default"), bool) for e in _progress(db)["tasks"].values() if e["searched"] > 0)
    before = (db / RECORD_FILE).read_bytes()
    assert len(_records(db)) == tuning["reused_records"] + tuning["check_records"]
    again, _, _, _ = _optimize(db)
    assert again.report.backend["tuning"]["check_records"] == 0 and (db / RECORD_FILE).read_bytes() == before
    _assert_matches(opt, model, x)


class _EmbeddingMlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(1000, 32)
        self.fc = torch.nn.Linear(32, 8)

    def forward(self, ids):
        return self.fc(self.embed(ids))


def test_kernels_with_integer_inputs_are_not_tuned(tmp_path, recwarn):
    """An embedding lookup reads rows at its integer input; MetaSchedule's random measurement inputs would read
    out of bounds (BERT's `take` segfaulted the measuring workers). Such kernels keep the default schedules."""
    torch.manual_seed(0)
    model = _EmbeddingMlp().eval()
    ids = torch.randint(0, 1000, (2, 16))
    opt = graphopt.optimize(model, target="x86", example_inputs=(ids,),
                            tune={"trials": 4, **FAST, "database": str(tmp_path / "records")})
    tuning = opt.report.backend["tuning"]
    assert tuning["untunable"] >= 1 and tuning["tasks"] >= 1, tuning
    names = {e["name"] for e in _progress(tmp_path / "records")["tasks"].values()}
    assert not any("take" in n for n in names), names
    assert not [w for w in recwarn if "could not be measured" in str(w.message)]
    with torch.no_grad():
        torch.testing.assert_close(opt(ids), model(ids), rtol=1e-4, atol=1e-5)


def test_tuning_works_with_an_unnamed_handler_on_the_metaschedule_logger(tuned):
    """A handler without a name on the "tvm.s_tir.meta_schedule" logger (a user's logging set-up) broke every
    search: MetaSchedule's logger set-up builds a logging.config dict from the handlers' names (TuningError:
    AttributeError: 'NoneType' object has no attribute 'format'). The search runs, the user's handler stays
    and sees MetaSchedule's messages, and the logger is left as it was found. (The module's tuning run has
    such a handler on the logger: see the `tuned` fixture.)"""
    tuning = tuned["opt"].report.backend["tuning"]
    assert tuning["tasks_tuned"] > 0 and tuning["new_trials"] > tuning["tasks"], tuning
    assert tuned["logger_after"] == tuned["logger_before"]
    assert "Logging directory" in tuned["handler_output"]
    assert list((tuned["db"] / "logs").glob("*task_scheduler*.log"))
    _assert_matches(tuned["opt"], tuned["model"], tuned["x"])


def test_tuning_workers_run_tvm_without_importing_pytorch_or_ml_dtypes():
    """The build/measure workers start without PyTorch and ml_dtypes (tvm_ffi imports them when it can: 2.9 s
    of each worker's start), run TVM, and ignore SIGINT."""
    import tvm

    from graphopt.backends.tvm.tuning import workers

    def worker_state():          # a nested function: pickled by value, so the worker does not import this module
        import signal as _signal
        import sys as _sys

        import tvm

        return ({m: _sys.modules.get(m, "absent") for m in ("torch", "ml_dtypes")},
                _signal.getsignal(_signal.SIGINT) is _signal.SIG_IGN, tvm.__version__)

    pool = workers._torch_free_pool(1, 60)
    try:
        skipped, ignores_sigint, version = pool.submit(worker_state).result()
    finally:
        pool.shutdown()
    assert skipped == {"torch": None, "ml_dtypes": None} and ignores_sigint and version == tvm.__version__


# -------------------------------------------------------------------------------------------- 2. reuse
def test_second_optimize_does_zero_trials_and_compiles_from_records(tuned, tmp_path):
    db = _copy_db(tuned, tmp_path)
    before = (db / RECORD_FILE).read_bytes()
    opt, model, x, seconds = _optimize(db)
    print(f"\nre-compile from records: {seconds:.1f} s")
    tuning = opt.report.backend["tuning"]
    assert tuning["new_trials"] == 0 and tuning["tasks_tuned"] == 0
    assert tuning["reused_records"] == len(before.decode().splitlines())
    assert (db / RECORD_FILE).read_bytes() == before
    assert re.match(r"[1-9]\d* from tuning records", opt.report.backend["kernels"])
    _assert_matches(opt, model, x)


def test_tuning_dir_env_var_is_the_default_database(tuned, tmp_path, monkeypatch):
    """Without tune['database'], records live in $GRAPHOPT_TUNING_DIR/<target>: copying records there is
    enough for a second machine-identical run to compile from them."""
    monkeypatch.setenv("GRAPHOPT_TUNING_DIR", str(tmp_path / "cache"))
    target_dir = default_database_dir(resolve_target("x86"))
    assert target_dir.parent == tmp_path / "cache"
    shutil.copytree(tuned["db"], target_dir)
    opt, model, x, _ = _optimize(None)
    tuning = opt.report.backend["tuning"]
    assert tuning["database"] == str(target_dir)
    assert tuning["new_trials"] == 0 and tuning["reused_records"] > 0
    _assert_matches(opt, model, x)


# ---------------------------------------------------------------------------------------- 3. interrupt
SCRIPT = MODEL_SRC + """
import json, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)     # Ctrl-C raises even if started with it ignored
import graphopt

model, x = tiny_model()
graphopt.optimize(model, target="x86", example_inputs=x, tune=json.loads(sys.argv[1]))
print("TUNING FINISHED", flush=True)
"""


def test_ctrl_c_keeps_every_record_and_the_next_run_does_only_the_missing_trials(tmp_path, capfd):
    db = tmp_path / "records"
    options = {"trials": 8, "trials_per_iter": 2, "population": 32, "database": str(db)}   # 2 kernels x 4
    script = tmp_path / "tune_tiny.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(script), json.dumps(options)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:      # wait for the first search round
            if (db / RECORD_FILE).exists() and (db / PROGRESS_FILE).exists():
                try:
                    if sum(_searched(db).values()) > 0:
                        break
                except (ValueError, KeyError):
                    pass
            time.sleep(0.1)
        assert proc.poll() is None, f"tuning ended before it could be interrupted:\n{proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, "no search record appeared within 300 s"
        os.killpg(proc.pid, signal.SIGINT)           # Ctrl-C in a terminal: the whole process group
        sent = time.monotonic()
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    print(f"\nexited {time.monotonic() - sent:.1f} s after Ctrl-C")
    assert "TUNING FINISHED" not in out
    assert proc.returncode != 0
    assert "KeyboardInterrupt" in err
    kept = re.search(r"tuning interrupted; (\d+) records are kept in (.+?) \(", err)
    assert kept, err[-3000:]
    assert Path(kept.group(2)) == db
    assert BAR.search(err), "no tqdm progress bar on stderr"
    for other in ("BuildError", "TuningError", "RuntimeError", "Segmentation"):
        assert other not in err, err[-3000:]

    records = _records(db)                          # every line is whole JSON
    assert len(records) == int(kept.group(1)) > 0
    assert check_database(db)[1] == len(records)
    searched = _searched(db)
    assert 0 < sum(searched.values()) < 8, searched
    missing = sum(max(0, 4 - n) for n in searched.values())
    before = (db / RECORD_FILE).read_bytes()

    capfd.readouterr()
    model, x = tiny_model()
    with pytest.MonkeyPatch.context() as mp:
        _one_worker(mp)
        opt = graphopt.optimize(model, target="x86", example_inputs=x, tune={**options, "progress": False})
    tuning = opt.report.backend["tuning"]
    assert tuning["reused_records"] == len(records)
    assert 0 < tuning["new_trials"] <= missing, (tuning, searched)
    after = (db / RECORD_FILE).read_bytes()
    assert after.startswith(before)                # appended to; nothing measured before is lost
    assert len(_records(db)) == len(records) + tuning["new_trials"] + tuning["check_records"]
    assert all(n == 4 for n in _searched(db).values()), _searched(db)
    assert not BAR.search(capfd.readouterr().err), "progress=False still drew a progress bar"
    _assert_matches(opt, model, x)


# -------------------------------------------------------------------------------------- 4. bad databases
def test_garbage_record_line_raises_naming_file_and_line(tuned, tmp_path):
    db = _copy_db(tuned, tmp_path)
    lines = (db / RECORD_FILE).read_text().splitlines(keepends=True)
    assert len(lines) >= 2
    lines.insert(1, "this is not a record\n")
    (db / RECORD_FILE).write_text("".join(lines))
    with pytest.raises(TuningError, match=re.escape(f"{db / RECORD_FILE}, line 2")):
        _optimize(db)


def test_truncated_last_record_is_dropped_with_a_warning(tuned, tmp_path):
    db = _copy_db(tuned, tmp_path)
    text = (db / RECORD_FILE).read_text()
    lines = text.splitlines(keepends=True)
    (db / RECORD_FILE).write_text(text[:-len(lines[-1]) // 2])      # a crash in the middle of the last write
    with pytest.warns(UserWarning, match="dropped an incomplete last line"):
        opt, model, x, _ = _optimize(db)
    tuning = opt.report.backend["tuning"]
    assert (db / RECORD_FILE).read_text() == "".join(lines[:-1])     # the whole records before it are kept
    assert tuning["reused_records"] == len(lines) - 1
    assert tuning["new_trials"] == 0           # that kernel had its search trials: the record is not re-measured
    _assert_matches(opt, model, x)


def test_garbage_workload_line_raises_naming_file_and_line(tuned, tmp_path):
    db = _copy_db(tuned, tmp_path)
    lines = (db / WORKLOAD_FILE).read_text().splitlines(keepends=True)
    lines.insert(1, '{"not": "a workload"}\n')
    (db / WORKLOAD_FILE).write_text("".join(lines))
    with pytest.raises(TuningError, match=re.escape(f"{db / WORKLOAD_FILE}, line 2")):
        _optimize(db)


def test_unreadable_progress_file_warns_and_counts_kernels_with_records_as_tuned(tuned, tmp_path):
    db = _copy_db(tuned, tmp_path)
    (db / PROGRESS_FILE).write_text('{"tasks": ')
    with pytest.warns(UserWarning, match=re.escape(f"tuning progress file {db / PROGRESS_FILE} is unreadable")):
        opt, model, x, _ = _optimize(db)
    assert opt.report.backend["tuning"]["new_trials"] == 0
    _assert_matches(opt, model, x)


def test_database_path_that_is_a_file_raises(tmp_path):
    path = tmp_path / "records.json"
    path.write_text("{}")
    with pytest.raises(TuningError, match=re.escape(f"tuning database {path} is a file")):
        _optimize(path)
    with pytest.raises(TuningError, match="cannot be created"):          # a file where a parent should be
        _optimize(path / "sub")


def test_check_database_cases(tuned, tmp_path):
    db = _copy_db(tuned, tmp_path)
    n_work, n_rec = check_database(db)
    assert (n_work, n_rec) == (len((db / WORKLOAD_FILE).read_text().splitlines()), len(_records(db)))
    # a whole last record without its newline: kept, and the newline restored (TVM appends after it)
    text = (db / RECORD_FILE).read_text()
    (db / RECORD_FILE).write_text(text.rstrip("\n"))
    assert check_database(db) == (n_work, n_rec)
    assert (db / RECORD_FILE).read_text() == text
    # valid JSON of the wrong shape, a workload index out of range, bytes that are not UTF-8
    first = json.loads(text.splitlines()[0])
    for bad, why in [("[1, 2, 3]", "expected \\[workload index, record\\]"),
                     (json.dumps([n_work + 5, first[1]]), f"workload index {n_work + 5} is not among"),
                     (json.dumps([0, [first[1][0], ["fast"]]]), "run times are not a list of numbers")]:
        (db / RECORD_FILE).write_text(text + bad + "\n")
        with pytest.raises(TuningError, match=re.escape(f"{db / RECORD_FILE}, line {n_rec + 1}: ") + why):
            check_database(db)
    (db / RECORD_FILE).write_bytes(text.encode() + b"\xff\xfe\n")
    with pytest.raises(TuningError, match=re.escape(f"{db / RECORD_FILE} is unreadable")):
        check_database(db)
    # an empty or missing directory is an empty database
    assert check_database(tmp_path / "missing") == (0, 0)


# ---------------------------------------------------------------------------------------- 5. bad options
KNOWN = "known options: " + ", ".join(["trials", "trials_per_task", "database", "timeout", "progress"])


@pytest.mark.parametrize("bad", [{"trialz": 3}, -1, "x"], ids=["unknown-key", "negative", "string"])
def test_bad_tune_options_list_the_known_options(bad, tmp_path):
    model, x = tiny_model()
    with pytest.raises(TuningError, match=re.escape(KNOWN)):
        graphopt.optimize(model, target="x86", example_inputs=x, tune=bad)


@pytest.mark.parametrize("bad", [1.5, {"trials": 0}, {"trials": True}, {"progress": "yes"}, {"timeout": -1},
                                 {"database": 3}, {"trials_per_task": 0}, [8]])
def test_coerce_tune_rejects(bad):
    with pytest.raises(TuningError, match=re.escape(KNOWN)):
        coerce_tune(bad)


def test_coerce_tune_accepts():
    assert coerce_tune(None) is None and coerce_tune(False) is None and coerce_tune(0) is None
    assert coerce_tune(True) == TuneOptions()
    assert coerce_tune(12).trials == 12
    opts = coerce_tune({"trials": 5, "database": Path("/tmp/x"), "progress": False})
    assert (opts.trials, opts.database, opts.progress) == (5, "/tmp/x", False)
    assert coerce_tune({"database": "~/records"}).database == os.path.expanduser("~/records")
    given = TuneOptions(trials=3)
    assert coerce_tune(given) is given


# ------------------------------------------------------------------------------------------------ 6. CLI
@pytest.mark.slow        # suite time (issue 16): a second tuning run through the CLI (~9 s); the CLI's error exit stays in the default run
def test_cli_tune_prints_a_summary_and_keeps_records(tmp_path, monkeypatch, capfd):
    """`graphopt tune` (graphopt.cli.main, the console script's entry point; run in this process: a
    subprocess would pay the torch/TVM imports again)."""
    from graphopt import cli

    db = tmp_path / "cli-records"
    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    code = cli.main(["tune", "--model", "mlp", "--trials", "1", "--database", str(db)])
    out, err = capfd.readouterr()
    print(f"\ngraphopt tune --model mlp --trials 1: {time.perf_counter() - start:.1f} s")
    assert code == 0, err[-3000:]
    assert "graphopt tune: mlp (batch 1) for 'x86', 1 trial" in out
    summary = re.search(r"tuned in [\d.]+ s: (\d+) new measurements, 0 records reused, (\d+)/(\d+) kernels "
                        r"searched", out)
    assert summary, out
    check = re.search(r"paired check against the default schedules: (\d+) measurements, (\d+) kernels kept", out)
    assert check, out
    assert int(summary.group(1)) + int(check.group(1)) == len(_records(db)) > 0
    assert 0 < int(summary.group(2)) <= int(summary.group(3))
    assert f"records: {db}" in out
    assert re.search(r"kernels: [1-9]\d* from tuning records", out), out
    assert BAR.search(err), "no tqdm progress bar on stderr"


def test_cli_tune_unknown_model_exits_nonzero():
    """Through `python -m graphopt.cli` (the module's own entry point), and in this process."""
    from graphopt import cli

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "graphopt.cli", "tune", "--model", "no-such-model"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "no-such-model" in proc.stderr, proc.stderr[-3000:]
    with pytest.raises(SystemExit) as info:
        cli.main(["tune", "--model", "no-such-model"])
    assert info.value.code == 2


# ------------------------------------------------------------------------------------- 7. database dirs
def test_default_database_dir_is_per_target_and_honours_the_env_var(tmp_path, monkeypatch):
    from graphopt.backends.targets import host_cpu

    monkeypatch.setenv("GRAPHOPT_TUNING_DIR", str(tmp_path / "env"))
    # "x86" is this machine's CPU, so two other x86 CPUs (whatever this one is) make four distinct targets
    others = [cpu for cpu in ("skylake-avx512", "znver1", "haswell") if cpu != host_cpu()][:2]
    dirs = {name: default_database_dir(resolve_target(name))
            for name in ["x86", *(f"x86:{cpu}" for cpu in others), "arm"]}
    assert all(d.parent == tmp_path / "env" for d in dirs.values())
    assert len(set(dirs.values())) == len(dirs) == 4                  # one directory per target
    assert default_database_dir(resolve_target("x86")) == dirs["x86"]   # and stable
    if host_cpu() != "generic":                                       # the same target by another name
        assert default_database_dir(resolve_target(f"x86:{host_cpu()}")) == dirs["x86"]
    monkeypatch.delenv("GRAPHOPT_TUNING_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    if sys.platform.startswith("linux"):
        assert default_database_dir(resolve_target("x86")) == tmp_path / "xdg" / "graphopt" / "tuning" / \
            dirs["x86"].name


# ------------------------------------------------------------------------------------------------- slow
@pytest.mark.slow
def test_cost_model_trains_once_it_has_enough_measurements(tmp_path):
    """The XGBoost cost model is not trained while it would predict random scores anyway (fewer than 100
    measurements), and is trained once the search has that many (tuning/search.py, _cost_model)."""
    db = tmp_path / "records"
    opt, model, x, seconds = _optimize(db, trials=112, trials_per_iter=16, population=64)
    print(f"\n112 trials: {seconds:.1f} s")
    assert opt.report.backend["tuning"]["new_trials"] >= 100
    log = "".join(p.read_text() for p in (db / "logs").glob("*task_scheduler*.log"))
    assert "XGB iter" in log, "the cost model was never trained"
    _assert_matches(opt, model, x)


CONV_SRC = """
import torch
from torch import nn

def tiny_cnn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()
    return model, torch.randn(1, 3, 16, 16)
"""


@pytest.mark.slow
def test_conv_net_tunes_matches_and_recompiles_from_records(tmp_path):
    ns: dict = {}
    exec(CONV_SRC, ns)
    model, x = ns["tiny_cnn"]()
    tune = {"trials": 8, **FAST, "database": str(tmp_path / "records")}
    start = time.perf_counter()
    first = graphopt.optimize(model, target="x86", example_inputs=x, tune=tune)
    middle = time.perf_counter()
    second = graphopt.optimize(model, target="x86", example_inputs=x, tune=tune)
    print(f"\nconv net: first tune {middle - start:.1f} s, re-compile {time.perf_counter() - middle:.1f} s")
    assert first.report.backend["tuning"]["new_trials"] > 0
    assert second.report.backend["tuning"]["new_trials"] == 0
    assert second.report.backend["tuning"]["reused_records"] == len(_records(tmp_path / "records"))
    _assert_matches(first, model, x)
    _assert_matches(second, model, x)
