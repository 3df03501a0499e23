"""Fixtures for the remote-device tests (test_arm.py, test_rpc.py): RPC servers and trackers on loopback.

Skips name what is missing; nothing here passes silently without the hardware or tools it needs.
"""
import contextlib
import logging
import os
import platform

import pytest

from graphopt.backends.tvm import cross

ON_AARCH64 = platform.machine() in ("aarch64", "arm64")


def cross_skip_reason() -> str | None:
    if cross.find_cross_cxx() is None:
        return ("no aarch64 cross compiler (aarch64-linux-gnu-g++ from Debian's g++-aarch64-linux-gnu, or "
                "GRAPHOPT_AARCH64_CXX): run scripts/setup_cross.sh")
    return None


def qemu_skip_reason() -> str | None:
    missing = cross.missing_for_qemu()
    if missing:
        return "cannot run aarch64 code here: missing " + "; ".join(missing) + " (run scripts/setup_cross.sh)"
    return None


@contextlib.contextmanager
def metaschedule_logger_kept():
    """MetaSchedule's own entry points (ms.tune_tir, tune_relax) set up its logger with logging.config and leave
    it changed (DEBUG, no propagation, handlers into their work dir); this puts it back as it was."""
    logger = logging.getLogger("tvm.s_tir.meta_schedule")
    level, propagate, handlers = logger.level, logger.propagate, list(logger.handlers)
    try:
        yield
    finally:
        for handler in list(logger.handlers):
            if handler not in handlers:
                logger.removeHandler(handler)
                handler.close()
        for handler in handlers:
            if handler not in logger.handlers:
                logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


needs_cross = pytest.mark.skipif(cross_skip_reason() is not None, reason=cross_skip_reason() or "")
needs_aarch64_runtime = pytest.mark.skipif(qemu_skip_reason() is not None, reason=qemu_skip_reason() or "")
reads_proc_maps = pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc/PID/maps (Linux)")


def assert_maps_tvm_without_torch(pid: int, tvm_library: str) -> None:
    """Process `pid` mapped `tvm_library` (e.g. "libtvm_runtime") and nothing of ml_dtypes or PyTorch: graphopt's
    servers and workers start TVM without them (rpc_device_server.SKIPPED_IMPORTS)."""
    with open(f"/proc/{pid}/maps", encoding="utf-8") as f:
        mapped = {line.split()[-1] for line in f if "/" in line}
    assert any(tvm_library in path for path in mapped), sorted(mapped)
    assert not [path for path in mapped if "ml_dtypes" in path or "libtorch" in path]


@pytest.fixture(scope="session")
def tracker():
    """A TVM RPC tracker on loopback; yields its RPCDevice address (tracker=True, key to be set per use)."""
    from graphopt.backends.tvm import rpc

    t = rpc.start_tracker("127.0.0.1")
    yield rpc.RPCDevice("127.0.0.1", t.port, tracker=True)
    t.terminate()


@pytest.fixture(scope="session")
def aarch64_server(tracker):
    """An aarch64 TVM RPC server (under qemu-user here; native on an aarch64 host), registered with the
    session tracker under key 'aarch64-test'. Yields the DeviceServer (.device: reached via the tracker)."""
    reason = qemu_skip_reason()
    if reason:
        pytest.skip(reason)
    from graphopt.backends.tvm import rpc

    server = rpc.DeviceServer(tracker=tracker, key="aarch64-test", start_timeout=240)
    yield server
    server.terminate()


@pytest.fixture()
def aarch64_session(aarch64_server):
    from graphopt.backends.tvm import rpc

    return rpc.connect(aarch64_server.device, timeout=60)


def run_on_aarch64(opt, server, *args):
    """`opt` (an OptimizedModel built for an aarch64 target) run on the session's aarch64 RPC server; returns
    its outputs. The RPC session is released before returning (the tracker's device serves one at a time)."""
    import gc

    from graphopt.backends.tvm import rpc

    remote = rpc.load_remote(opt, rpc.connect(server.device, timeout=120))
    try:
        return remote(*args)
    finally:
        remote = None
        gc.collect()


@pytest.fixture(autouse=True)
def _release_remote_sessions(request):
    """The session tracker's aarch64 device serves one RPC session at a time, and a session ends only when its
    RPCSession object is freed. A test's session can sit in a reference cycle past the test's end, so the
    next test that asks the tracker found 'all its devices busy' (seen in random and in file order): collect
    cycles after every test of the modules that use the device."""
    yield
    if request.module.__name__.endswith(("test_arm", "test_rpc")):
        import gc

        gc.collect()
