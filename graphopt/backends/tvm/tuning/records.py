"""Record files: the per-target database directory, its checks before TVM reads it, and the progress file.

A database is a MetaSchedule JSONDatabase directory (WORKLOAD_FILE, RECORD_FILE, appended to as trials are
measured) plus graphopt's PROGRESS_FILE (search trials per task, keyed by task_key, and the paired check's
verdicts). check_database drops a crash-truncated last line with a warning and raises TuningError naming
the file and line of any other damage.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import warnings
from pathlib import Path

from ....errors import TuningError
from .text import first_line

__all__ = ["WORKLOAD_FILE", "RECORD_FILE", "PROGRESS_FILE", "default_database_dir", "check_database",
           "open_database", "Progress", "task_key", "count_lines"]


WORKLOAD_FILE = "database_workload.json"

RECORD_FILE = "database_tuning_record.json"

PROGRESS_FILE = "graphopt_progress.json"


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


def open_database(path: Path):
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
                          f"{type(e).__name__}: {first_line(str(e))}; delete the directory to start over") from e


class Progress:
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


def task_key(mod) -> str:
    try:
        from tvm_ffi import structural_hash
    except ImportError:            # older TVM
        from tvm.ir import structural_hash

    return str(structural_hash(mod))


def count_lines(path: Path) -> int:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return sum(1 for line in f if line.strip())
    except OSError:
        return 0
