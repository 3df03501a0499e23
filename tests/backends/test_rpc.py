"""TVM RPC on loopback: remote runs, a tracker sharing devices, MetaSchedule's RPC runner and builder.

x86 servers (rpc.LocalServer: rpc_device_server.py run by this Python) test the RPC machinery quickly; the
aarch64 server under qemu (conftest.aarch64_server; skipped with the missing piece named when
scripts/setup_cross.sh has not run) tests the cross path. Every wait is bounded by a timeout.
"""
import os
import platform
import tempfile
import time

import numpy as np
import pytest
import torch
from torch import nn

import graphopt
from graphopt.backends.targets import resolve_target
from graphopt.backends.tvm import cross, rpc
from graphopt.errors import ArtifactError, GraphoptError, RemoteError
from tests.backends.conftest import (assert_maps_tvm_without_torch, metaschedule_logger_kept,
                                     needs_aarch64_runtime, needs_cross, reads_proc_maps)

HOST_ALIAS = "x86" if platform.machine() in ("x86_64", "AMD64") else "arm:native"


def _mlp():
    return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 3)).eval(), torch.randn(4, 12)


@pytest.fixture(scope="module")
def host_model(tmp_path_factory):
    model, x = _mlp()
    opt = graphopt.optimize(model, target=HOST_ALIAS, example_inputs=(x,))
    return model, x, opt, opt.save(tmp_path_factory.mktemp("rpc") / "mlp.gopt")


@pytest.fixture(scope="module")
def host_pair(tracker):
    """Two RPC servers of this machine registered with the tracker under one key: two 'devices'."""
    key = "host-pair"
    servers = [rpc.LocalServer(tracker=tracker, key=key) for _ in range(2)]
    yield rpc.RPCDevice(tracker.host, tracker.port, key, tracker=True)
    for s in servers:
        s.terminate()


def _matmul_module(n=32):
    import tvm
    from tvm import te

    a = te.placeholder((n, n), name="A")
    b = te.placeholder((n, n), name="B")
    k = te.reduce_axis((0, n), name="k")
    c = te.compute((n, n), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="C")
    return tvm.IRModule({"main": te.create_prim_func([a, b, c])})


def _measure(runner, artifact_paths, mod):
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo
    from tvm.s_tir.meta_schedule.runner import RunnerInput

    args = ArgInfo.from_prim_func(mod["main"])
    futures = runner.run([RunnerInput(p, "cpu", args) for p in artifact_paths])
    return [f.result() for f in futures]


# ------------------------------------------------------------------------------------- direct servers
@pytest.fixture(scope="module")
def loopback_server():
    """One direct (no tracker) server of this machine for the tests below: starting one costs ~3 s of CPU (a
    process that imports TVM). Each test opens its own session; the module's autouse gc releases it."""
    with rpc.LocalServer() as server:
        yield server


@reads_proc_maps
def test_local_server_is_a_process_of_its_own_that_loads_tvm_without_torch(loopback_server):
    """LocalServer runs rpc_device_server.py with this Python: a process of its own that maps TVM's runtime and
    neither PyTorch nor ml_dtypes (tvm.rpc.Server's worker imported both: ~4 s to start instead of ~1 s)."""
    assert loopback_server.proc.pid != os.getpid() and loopback_server.proc.poll() is None
    assert_maps_tvm_without_torch(loopback_server.proc.pid, "libtvm")


@reads_proc_maps
def test_tracker_process_loads_tvm_without_torch():
    """start_tracker's process (a TVM PopenWorker started without PyTorch and ml_dtypes) serves the tracker."""
    tracker = rpc.start_tracker("127.0.0.1")
    try:
        assert_maps_tvm_without_torch(tracker.proc._proc.pid, "libtvm")
        summary = rpc._tracker_summary(rpc.RPCDevice("127.0.0.1", tracker.port, tracker=True), 10.0)
    finally:
        tracker.terminate()
    assert summary.get("server_info") == []


def test_loopback_server_runs_an_artifact(host_model, loopback_server):
    model, x, opt, path = host_model
    session = rpc.connect(loopback_server.device, timeout=60)
    assert rpc.device_threads(session) >= 1
    remote = rpc.load_remote(path, session)
    got = remote(x)
    torch.testing.assert_close(got, opt(x), rtol=0, atol=0)        # same library, same machine
    with torch.no_grad():
        torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-5)
    del remote, session


def test_connecting_to_nothing_is_a_bounded_remote_error():
    port = rpc.free_port()
    start = time.monotonic()
    with pytest.raises(RemoteError, match=f"127.0.0.1:{port}"):
        rpc.connect(rpc.RPCDevice("127.0.0.1", port), timeout=15)
    assert time.monotonic() - start < 30


def test_artifact_of_the_torch_backend_has_nothing_to_run_remotely(tmp_path, loopback_server):
    model, x = _mlp()
    path = graphopt.optimize(model, target="torch", example_inputs=(x,)).save(tmp_path / "t.gopt")
    with pytest.raises(ArtifactError, match="nothing to run on an RPC device"):
        rpc.load_remote(path, rpc.connect(loopback_server.device, timeout=60))


# ------------------------------------------------------------------------------------------- tracker
@pytest.mark.slow        # suite time (issue 16): two RPC servers under one tracker (~11 s); loopback and the aarch64 device stay in the default run
def test_tracker_shares_its_devices_and_bounds_waits(host_pair, host_model):
    model, x, _, path = host_model
    assert rpc.wait_for_devices(host_pair, 2, timeout=60) == 2
    sessions = [rpc.connect(host_pair, timeout=60) for _ in range(2)]      # both devices, held at once
    with torch.no_grad():
        want = model(x)
    for session in sessions:
        torch.testing.assert_close(rpc.load_remote(path, session)(x), want, rtol=1e-5, atol=1e-5)
    start = time.monotonic()
    with pytest.raises(RemoteError, match="no answer within 3 s"):         # both busy: a third waits, bounded
        rpc.connect(host_pair, timeout=3)
    assert time.monotonic() - start < 10
    del sessions, session
    rpc.wait_for_devices(host_pair, 2, timeout=60)                         # released, and not taken by the
    with pytest.raises(RemoteError, match=r"no device of key 'no-such-key'.*host-pair"):   # late request
        rpc.connect(rpc.RPCDevice(host_pair.host, host_pair.port, "no-such-key", tracker=True), timeout=30)


def test_ms_rpc_runner_needs_a_tracker_and_a_key():
    with pytest.raises(GraphoptError, match="tracker and a device key"):
        rpc.ms_rpc_runner(rpc.RPCDevice("127.0.0.1", 9090, "x"))


def test_tuning_target_takes_the_device_core_count():
    spec = resolve_target("arm:cortex-a72")
    assert "num-cores" not in spec.tvm
    target = rpc.tuning_target(spec, 4)
    assert int(target.attrs["num-cores"]) == 4 and str(target.attrs["mcpu"]) == "cortex-a72"
    with pytest.raises(GraphoptError, match="num_cores"):
        rpc.tuning_target(spec, 0)


@pytest.mark.slow        # suite time (issue 16): the two-server tracker again; the RPC runner is measured on the aarch64 device by default
def test_ms_rpc_runner_measures_on_every_tracker_device(host_pair):
    """MetaSchedule's RPCRunner, as graphopt configures it, measures candidates on the tracker's devices
    (two at once: max_workers follows the registered device count)."""
    import tvm

    rpc.wait_for_devices(host_pair, 2, timeout=60)
    mod = _matmul_module()
    target = rpc.tuning_target(resolve_target(HOST_ALIAS), 1)
    tmp = tempfile.mkdtemp(prefix="graphopt-test-ms-")
    paths = []
    for i in range(2):
        lib = tvm.compile(mod, target=target)
        paths.append(f"{tmp}/cand{i}.so")
        lib.export_library(paths[-1])
    runner = rpc.ms_rpc_runner(host_pair, session_timeout=60, number=2, repeat=1)
    assert runner.pool is not None
    results = _measure(runner, paths, mod)
    for r in results:
        assert r.error_msg is None, r.error_msg
        secs = [float(s) for s in r.run_secs]
        assert secs and all(0 < s < 1 for s in secs)


# ----------------------------------------------------------------------------------- aarch64 via qemu
@needs_cross
@needs_aarch64_runtime
def test_ms_rpc_runner_measures_an_aarch64_candidate(aarch64_server):
    """A candidate built for arm:cortex-a72 and cross-linked here (ms_export_for) is measured on the aarch64
    device by the runner of ms_remote_setup, whose target carries the device's core count."""
    import tvm

    spec = resolve_target("arm:cortex-a72")
    target, runner, f_export = rpc.ms_remote_setup(spec, aarch64_server.device, timeout=120, number=1)
    assert int(target.attrs["num-cores"]) >= 1 and str(target.attrs["mtriple"]) == "aarch64-linux-gnu"
    mod = _matmul_module(16)
    path = f_export(tvm.compile(mod, target=target))
    assert cross.elf_machine(path) == "aarch64"
    (result,) = _measure(runner, [path], mod)
    assert result.error_msg is None, result.error_msg
    assert 0 < float(result.run_secs[0]) < 1


@pytest.mark.slow
@needs_cross
@needs_aarch64_runtime
def test_metaschedule_tunes_on_the_aarch64_device(aarch64_server):
    """Full MetaSchedule tuning of a matmul for arm:cortex-a72: candidates cross-built by ms_builder, measured
    over RPC on the qemu device; the tuned kernel is correct on the device. (~3-5 min on 2 shared cores.)"""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    spec = resolve_target("arm:cortex-a72")
    target, runner, _ = rpc.ms_remote_setup(spec, aarch64_server.device, timeout=120, number=2)
    mod = _matmul_module(32)
    with tempfile.TemporaryDirectory() as work_dir, metaschedule_logger_kept():
        db = ms.tune_tir(mod, target, work_dir, max_trials_global=8, num_trials_per_iter=4,
                         builder=rpc.ms_builder(spec), runner=runner)
        records = db.get_all_tuning_records()
        assert len(records) >= 4
        secs = sorted(float(r.run_secs[0]) for r in records if r.run_secs)
        assert secs and secs[0] < 1.0, "every candidate failed on the device (run_secs is MetaSchedule's 1e10)"
        sch = ms.tir_integration.compile_tir(db, mod, target)
    assert sch is not None
    lib = tvm.compile(sch.mod, target=target)
    path = f"{tempfile.mkdtemp(prefix='graphopt-test-ms-')}/best.so"
    lib.export_library(path, fcompile=cross.cross_fcompile())
    session = rpc.connect(aarch64_server.device, timeout=120)
    session.upload(path, target="best.so")
    func = session.load_module("best.so")["main"]
    dev = session.cpu(0)
    a, b = np.random.rand(32, 32).astype("float32"), np.random.rand(32, 32).astype("float32")
    c = tvm.runtime.tensor(np.zeros((32, 32), "float32"), dev)
    func(tvm.runtime.tensor(a, dev), tvm.runtime.tensor(b, dev), c)
    np.testing.assert_allclose(c.numpy(), a @ b, rtol=1e-5, atol=1e-5)
