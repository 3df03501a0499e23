"""The test suite's own layout: files that share a session fixture run on one xdist worker (tests/conftest.py,
WORKER_GROUPS), so that the fixture is built once per run rather than once per worker.

Read from the sources (ast), so that the check holds whichever tests a run selects."""
import ast
from pathlib import Path

from tests.conftest import _GROUP_OF, WORKER_GROUPS

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def _fixtures(conftest: Path) -> dict[str, tuple[str, set[str]]]:
    """{fixture name: (scope, names of its parameters)} of the @pytest.fixture functions in `conftest`."""
    found = {}
    for node in ast.walk(ast.parse(conftest.read_text())):
        if not isinstance(node, ast.FunctionDef):
            continue
        for dec in node.decorator_list:
            call = dec if isinstance(dec, ast.Call) else None
            func = call.func if call else dec
            if isinstance(func, ast.Attribute) and func.attr == "fixture":
                scope = next((kw.value.value for kw in (call.keywords if call else []) if kw.arg == "scope"),
                             "function")
                found[node.name] = (scope, {a.arg for a in node.args.args})
    return found


def _names_used(path: Path) -> set[str]:
    """Parameter names of the functions in `path`, and string constants (request.getfixturevalue("...")."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.update(a.arg for a in node.args.args)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.add(node.value)
    return names


def test_files_sharing_a_session_fixture_are_one_worker_group():
    fixtures = {}
    for conftest in TESTS.rglob("conftest.py"):
        fixtures.update(_fixtures(conftest))
    # session fixtures, and the fixtures that use one (a test using aarch64_session needs aarch64_server)
    needs = {name: {name} for name, (scope, _) in fixtures.items() if scope == "session"}
    assert {"tracker", "aarch64_server", "resnet18_x86"} <= set(needs), sorted(fixtures)
    changed = True
    while changed:
        changed = False
        for name, (_, params) in fixtures.items():
            below = set().union(*(needs[p] for p in params if p in needs))
            if below - needs.get(name, set()):
                needs[name] = needs.get(name, set()) | below
                changed = True
    users: dict[str, set[str]] = {}
    for path in TESTS.rglob("test_*.py"):
        if path == Path(__file__).resolve():
            continue
        for name in _names_used(path) & set(needs):
            for session_fixture in needs[name]:
                users.setdefault(session_fixture, set()).add(path.relative_to(ROOT).as_posix())
    assert users.get("aarch64_server") and users.get("resnet18_x86"), users
    for name, files in users.items():
        groups = {_GROUP_OF.get(f, f) for f in files}
        assert len(groups) == 1, (f"session fixture {name!r} is used by {sorted(files)}, which are not in one "
                                  f"WORKER_GROUPS entry of tests/conftest.py: {sorted(groups)}")
    for group, paths in WORKER_GROUPS.items():
        for path in paths:
            assert (ROOT / path).is_file(), f"WORKER_GROUPS[{group!r}] names {path}, which does not exist"


_CRASH_CONFTEST = '''
import sys
sys.path.insert(0, {root!r})
import pytest


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    from tests.xdist_grouping import GroupedFileScheduling
    return GroupedFileScheduling(config, log, groups={{"test_b.py": "bc", "test_c.py": "bc"}})
'''


def test_a_worker_that_dies_in_a_test_fails_that_test_once_and_the_run_ends(tmp_path):
    """A test that kills its xdist worker (SIGILL: code for instructions this CPU lacks) is reported failed, named,
    once; the rest of its file and group runs on the replacement worker; the run ends. xdist 3.8's own loadfile
    scheduler hangs here (the replacement waits for work that never comes) or re-runs the crashing test."""
    import subprocess
    import sys

    (tmp_path / "conftest.py").write_text(_CRASH_CONFTEST.format(root=str(ROOT)))
    (tmp_path / "test_a.py").write_text("def test_1(): pass\ndef test_2(): pass\ndef test_3(): pass\n")
    (tmp_path / "test_b.py").write_text("import os, signal\n"
                                        "def test_before(): pass\n"
                                        "def test_crash(): os.kill(os.getpid(), signal.SIGILL)\n"
                                        "def test_after(): pass\n")
    (tmp_path / "test_c.py").write_text("def test_last(): pass\n")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadfile", "-p", "no:randomly",
                          "-p", "no:cacheprovider", "-rf", "test_a.py", "test_b.py", "test_c.py"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    out = run.stdout + run.stderr
    assert run.returncode == 1, out
    assert "1 failed, 6 passed" in out, out
    assert "crashed while running 'test_b.py::test_crash'" in out, out
