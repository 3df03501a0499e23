"""TVM RPC for graphopt: run compiled models on another machine, and tune there with MetaSchedule.

A device (an ARM board, or this machine's aarch64 runtime under qemu-user) runs a TVM RPC server; graphopt
talks to it with TVM's own RPC client, either directly (host:port of the server) or through a TVM RPC
tracker, which lets several devices of one kind (one *key*) share the work of a tuning run.

  RPCDevice(host, port, key="", tracker=False)   where a device is: its server, or a tracker + device key
  connect(device, timeout=...)                    an RPC session (RemoteError naming host:port/key if none)
  start_tracker()                                 a TVM RPC tracker on this machine (tvm.rpc.tracker.Tracker)
  LocalServer(...)                                a TVM RPC server of THIS machine (loopback tests, x86 devices)
  DeviceServer(runtime, ...)                      graphopt's rpc_device_server.py run by an aarch64 runtime
                                                  (cross.find_aarch64_runtime(): qemu here, native on ARM)
  wait_for_devices(device, count, timeout)        block until a tracker lists `count` free servers of the key
  load_remote(artifact_or_model, session)         RemoteModule: the artifact's library loaded ON the device,
                                                  called with torch tensors, returning torch tensors
  device_threads(session), tuning_target(spec, n) the device's core count; the target to tune for it
  ms_rpc_runner(device, ...)                      MetaSchedule RPCRunner measuring on the tracker's devices
  ms_builder(spec, ...)                           MetaSchedule LocalBuilder that links for the device's arch
  ms_export_for(spec), ms_remote_setup(spec, dev) the builder's f_export; (target, runner, f_export) in one call

On a real device:  `pip install apache-tvm==<same version>`, then
  python -m tvm.exec.rpc_server --host 0.0.0.0 --port 9090 [--tracker HOST:9190 --key arm]
(or `python rpc_device_server.py ...` with this package's file, which starts twice as fast).

Timeouts: every wait here is bounded (connect, tracker requests, server start-up), and raises RemoteError.
"""
from __future__ import annotations

import hashlib
import os
import queue
import signal
import socket
import subprocess
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ...errors import ArtifactError, GraphoptError, InputError, RemoteError
from ..targets import TargetSpec

__all__ = ["RPCDevice", "RemoteError", "connect", "start_tracker", "LocalServer", "DeviceServer",
           "wait_for_devices", "free_port", "RemoteModule", "load_remote", "device_threads", "tuning_target",
           "ms_rpc_runner", "ms_builder", "ms_export_for", "ms_remote_setup",
           "DEVICE_SERVER_SCRIPT"]

DEVICE_SERVER_SCRIPT = str(Path(__file__).with_name("rpc_device_server.py"))


@dataclass(frozen=True)
class RPCDevice:
    """Where a device is reachable.

    tracker=False: host:port is the device's RPC server (key: the server's key, usually "").
    tracker=True:  host:port is a TVM RPC tracker and `key` names the kind of device to request from it.
    """

    host: str
    port: int
    key: str = ""
    tracker: bool = False

    def __str__(self) -> str:
        where = f"tracker {self.host}:{self.port}" if self.tracker else f"RPC server {self.host}:{self.port}"
        return f"{where}" + (f" key '{self.key}'" if self.key else "")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _bounded(fn, timeout: float, what: str):
    """Run fn() in a daemon thread; its result, or RemoteError after `timeout` s (or with fn's error).

    A result that arrives after the caller gave up is dropped at once (a late RPC session is closed, so it does
    not hold the device).
    """
    box: queue.Queue = queue.Queue(maxsize=1)
    lock = threading.Lock()
    state = {"abandoned": False}

    def work():
        try:
            item = (True, fn())
        except BaseException as e:                 # noqa: BLE001 - handed to the caller
            item = (False, e)
        with lock:
            if not state["abandoned"]:
                box.put(item)
                return
        del item                                   # nobody waits: release it (closes a late session)

    threading.Thread(target=work, daemon=True, name=f"graphopt-rpc {what}").start()
    try:
        ok, value = box.get(timeout=timeout)
    except queue.Empty:
        with lock:
            state["abandoned"] = True
            late = None if box.empty() else box.get_nowait()
        if late is None:
            raise RemoteError(f"{what}: no answer within {timeout:g} s") from None
        ok, value = late
    if not ok:
        if isinstance(value, GraphoptError):
            raise value
        raise RemoteError(f"{what}: {type(value).__name__}: {_last_line(str(value))}") from value
    return value


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


# ------------------------------------------------------------------------------------------ sessions
def _tracker_summary(device: RPCDevice, timeout: float) -> dict:
    from tvm import rpc

    def ask():
        tracker = rpc.connect_tracker(device.host, device.port)
        try:
            return tracker.summary()
        finally:
            tracker.close()

    return _bounded(ask, timeout, f"asking {device} for its devices")


def _free_servers(summary: dict, key: str) -> tuple[int, int]:
    """(registered servers, free servers) of `key` in a tracker summary."""
    total = sum(1 for s in summary.get("server_info", []) if s.get("key") == f"server:{key}")
    free = int(summary.get("queue_info", {}).get(key, {}).get("free", 0))
    return total, free


def connect(device: RPCDevice, *, timeout: float = 60.0, session_timeout: float = 0):
    """An RPC session on `device` (tvm.rpc.RPCSession). RemoteError, naming the device, within `timeout` s.

    session_timeout: seconds after which the server ends the session (0: never).
    """
    from tvm import rpc

    if device.tracker:
        summary = _tracker_summary(device, timeout)
        total, _ = _free_servers(summary, device.key)
        if total == 0:
            keys = sorted({s.get("key", "").removeprefix("server:") for s in summary.get("server_info", [])})
            raise RemoteError(f"{device}: no device of key '{device.key}' is registered "
                              f"(registered keys: {', '.join(keys) or 'none'})")

        def request():
            tracker = rpc.connect_tracker(device.host, device.port)
            try:
                return tracker.request(device.key, session_timeout=session_timeout, max_retry=2)
            finally:
                tracker.close()

        return _bounded(request, timeout, f"requesting a session from {device} (all its devices busy?)")
    return _bounded(lambda: rpc.connect(device.host, device.port, key=device.key, session_timeout=session_timeout),
                    timeout, f"connecting to {device}")


def wait_for_devices(device: RPCDevice, count: int = 1, *, timeout: float = 120.0) -> int:
    """Wait until the tracker `device` lists at least `count` free servers of its key; returns how many."""
    if not device.tracker:
        raise GraphoptError(f"wait_for_devices needs a tracker, got {device}")
    deadline = time.monotonic() + timeout
    free = 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RemoteError(f"{device}: {free} of {count} device(s) of key '{device.key}' free after {timeout:g} s")
        _, free = _free_servers(_tracker_summary(device, min(left, 30.0)), device.key)
        if free >= count:
            return free
        time.sleep(0.2)


def start_tracker(host: str = "127.0.0.1", port: int | None = None, *, silent: bool = True):
    """Start a TVM RPC tracker on this machine (a tvm.rpc.tracker.Tracker; .host/.port; .terminate()).

    Its process imports TVM without PyTorch and ml_dtypes (tuning/workers.py): it starts in ~1 s, where
    TVM's own start of it imported both (~4 s)."""
    import logging

    from tvm.rpc import tracker as tvm_tracker

    from .tuning.workers import torch_free_worker

    class _Tracker(tvm_tracker.Tracker):
        def __init__(self, host, port, port_end, silent):      # Tracker.__init__ with a torch-free worker
            if silent:
                tvm_tracker.logger.setLevel(logging.WARN)
            self.proc = torch_free_worker()
            self.proc.send(tvm_tracker._popen_start_tracker_server, [host, port, port_end, silent, True, None])
            self.port, self.stop_key = self.proc.recv()
            self.host = host

    port = port or free_port(host)
    return _Tracker(host, port, port + 50, silent)


def _wait_registered(tracker: tuple[str, int], key: str, port: int, timeout: float) -> None:
    """Block until the tracker lists the server on `port` under `key` with a free slot (RemoteError if not)."""
    device = RPCDevice(tracker[0], tracker[1], key, tracker=True)
    deadline = time.monotonic() + timeout
    while True:
        summary = _tracker_summary(device, max(1.0, min(30.0, deadline - time.monotonic())))
        ours = any(s.get("key") == f"server:{key}" and list(s.get("addr", []))[-1:] == [port]
                   for s in summary.get("server_info", []))
        if ours and _free_servers(summary, key)[1] > 0:
            return
        if time.monotonic() > deadline:
            raise RemoteError(f"the RPC server on port {port} did not register with {device} within {timeout:g} s")
        time.sleep(0.1)


def _address(tracker) -> tuple[str, int] | None:
    if tracker is None:
        return None
    if isinstance(tracker, RPCDevice):
        return (tracker.host, tracker.port)
    host, port = tracker
    return (str(host), int(port))


def _reach(host: str, port: int, key: str, tracker: tuple[str, int] | None) -> RPCDevice:
    if tracker is not None:
        return RPCDevice(tracker[0], tracker[1], key, tracker=True)
    return RPCDevice(host, port, key)


class DeviceServer:
    """graphopt's rpc_device_server.py run in a subprocess by a cross.PythonRuntime: an aarch64 one (under qemu,
    or native on ARM) here, this machine's Python in LocalServer.

    runtime: a cross.PythonRuntime (default: cross.find_aarch64_runtime(); RemoteError naming what is
    missing if there is none). Start-up under qemu takes ~3-30 s (TVM's import, emulated); `start_timeout`
    bounds it. With `tracker` the server registers there under `key`.
    """

    _WHAT = "the aarch64 RPC server"

    def __init__(self, runtime=None, host: str = "127.0.0.1", port: int | None = None, *, key: str = "",
                 tracker: RPCDevice | tuple[str, int] | None = None, start_timeout: float = 180.0,
                 silent: bool = True):
        from . import cross

        if runtime is None:
            runtime = cross.find_aarch64_runtime()
            if runtime is None:
                raise RemoteError("no aarch64 runtime to run an RPC server: missing "
                                  + "; ".join(cross.missing_for_qemu()) + f" ({cross.SETUP_HINT})")
        self.runtime = runtime
        port = port or free_port(host)
        args = [DEVICE_SERVER_SCRIPT, "--host", host, "--port", str(port), "--port-end", str(port + 50)]
        args += ["--silent"] if silent else []
        self.tracker = _address(tracker)
        if self.tracker is not None:
            args += ["--tracker", f"{self.tracker[0]}:{self.tracker[1]}", "--key", key]
        self.host, self.key = host, key
        self.started_s = 0.0
        start = time.monotonic()
        self.proc = subprocess.Popen(runtime.command(*args), env=runtime.environ(), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self._lines: list[str] = []
        ready: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, args=(ready,), daemon=True, name="graphopt-device-server").start()
        try:
            self.port = ready.get(timeout=start_timeout)
        except queue.Empty:
            self.terminate()
            raise RemoteError(f"{self._WHAT} ({runtime.python}) did not start within {start_timeout:g} s; "
                              f"output: {' | '.join(self._lines[-5:]) or '(none)'}") from None
        if self.port is None:
            code = self.proc.poll()
            self.terminate()
            raise RemoteError(f"{self._WHAT} ({runtime.python}) exited (code {code}) before listening: "
                              f"{' | '.join(self._lines[-8:]) or '(no output)'}")
        if self.tracker is not None:
            try:
                _wait_registered(self.tracker, key, self.port, max(10.0, start_timeout - (time.monotonic() - start)))
            except BaseException:
                self.terminate()
                raise
        self.started_s = time.monotonic() - start

    def _pump(self, ready: queue.Queue) -> None:
        announced = False
        for line in self.proc.stdout:
            line = line.rstrip()
            self._lines.append(line)
            del self._lines[:-200]
            if not announced and line.startswith("graphopt-rpc-server listening on "):
                announced = True
                ready.put(int(line.rsplit(":", 1)[1]))
        if not announced:
            ready.put(None)

    @property
    def device(self) -> RPCDevice:
        """How to reach this server (through its tracker when it registered with one)."""
        return _reach(self.host, self.port, self.key, self.tracker)

    @property
    def output(self) -> str:
        return "\n".join(self._lines)

    def terminate(self) -> None:
        """Stop the server and the session processes it forked (its own process group)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.terminate()


class LocalServer(DeviceServer):
    """A TVM RPC server on this machine, e.g. for loopback tests or an x86 device: rpc_device_server.py run by
    this Python in a subprocess (its own process group; terminate() stops it and its sessions' processes).

    It imports TVM only: it listens after ~1 s here, where tvm.rpc.Server's worker process, which imports TVM
    with PyTorch and ml_dtypes, took ~4 s. With `tracker` (an RPCDevice of a tracker, or (host, port)) it
    registers there under `key`. Use as a context manager, or call .terminate().
    """

    _WHAT = "this machine's RPC server"

    def __init__(self, host: str = "127.0.0.1", port: int | None = None, *, key: str = "",
                 tracker: RPCDevice | tuple[str, int] | None = None, silent: bool = True,
                 start_timeout: float = 120.0):
        import sys

        from .cross import PythonRuntime

        super().__init__(PythonRuntime(sys.executable, emulated=False), host, port, key=key, tracker=tracker,
                         start_timeout=start_timeout, silent=silent)


# ------------------------------------------------------------------------------------- remote modules
class RemoteModule:
    """A compiled model's library loaded on an RPC device; call it like the model with torch tensors.

    Inputs are checked against the signature (count, dtype, shape) before anything is sent; outputs come back
    as CPU torch tensors in the model's output structure. `time(*inputs)` measures on the device.
    """

    def __init__(self, session, library: bytes, spec: TargetSpec, signature: dict, name: str = "model.so"):
        import tvm
        from tvm import relax
        from torch.utils import _pytree as pytree

        from .lower import TensorSpec

        self.session, self.spec = session, spec
        self.inputs = [TensorSpec.from_dict(d) for d in signature["inputs"]]
        self.outputs = [TensorSpec.from_dict(d) for d in signature["outputs"]]
        self._tree = pytree.treespec_loads(signature["out_spec"])
        digest = hashlib.sha256(library).hexdigest()[:12]
        remote_name = f"graphopt-{digest}-{name}"
        try:
            session.upload(bytearray(library), target=remote_name)
            self.library = session.load_module(remote_name)
        except Exception as e:
            raise RemoteError(f"the device cannot load the library compiled for '{spec.alias}' "
                              f"({spec.arch}): {type(e).__name__}: {_last_line(str(e))}") from e
        self.device = session.cuda(0) if spec.kind == "cuda" else session.cpu(0)
        self.vm = relax.VirtualMachine(self.library, self.device)
        self._tvm = tvm

    def _send(self, args: Sequence[Any]) -> None:
        import torch

        from .lower import TensorSpec

        if len(args) != len(self.inputs):
            raise InputError(f"expected {len(self.inputs)} input(s) "
                             f"({', '.join(str(s) for s in self.inputs)}), got {len(args)}")
        sent = []
        for i, (x, s) in enumerate(zip(args, self.inputs)):
            if not isinstance(x, torch.Tensor):
                raise InputError(f"input {i}: expected {s}, got {type(x).__name__}")
            got = TensorSpec.of(x)
            if got.dtype != s.dtype or not s.matches(got.shape):
                raise InputError(f"input {i}: expected {s}, got {got}")
            sent.append(self._tvm.runtime.tensor(x.detach().cpu().contiguous().numpy(), self.device))
        self.vm.set_input("main", *sent)

    def __call__(self, *args):
        import torch
        from torch.utils import _pytree as pytree

        self._send(args)
        try:
            self.vm.invoke_stateful("main")
            flat = self._outputs()
        except Exception as e:
            raise RemoteError(f"running '{self.spec.alias}' on the device failed: {type(e).__name__}: "
                              f"{_last_line(str(e))}") from e
        leaves = [torch.from_numpy(t.numpy()) for t in flat]
        return pytree.tree_unflatten(leaves, self._tree)

    def _outputs(self) -> list:
        """The flat outputs of the last invoke_stateful("main"). (Not VirtualMachine.get_outputs: its recursive
        closure makes a reference cycle that keeps the VM, and so the device's session, alive until the next
        garbage collection, and a device serves one session at a time.)"""
        arity = self.vm._get_output_arity("main")
        if arity == -1:
            return [self.vm._get_output("main")]
        return [self.vm._get_output("main", i) for i in range(arity)]

    def time(self, *args, number: int = 10, repeat: int = 3, min_repeat_ms: int = 0) -> list[float]:
        """Seconds per run on the device (one figure per repeat, each the mean of `number` runs)."""
        self._send(args)
        evaluator = self.vm.time_evaluator("invoke_stateful", self.device, number=number, repeat=repeat,
                                           min_repeat_ms=min_repeat_ms)
        return [float(r) for r in evaluator("main").results]


def load_remote(model, session) -> RemoteModule:
    """Load a compiled model on an RPC `session` (from connect()): an artifact path or an OptimizedModel.

    The artifact's checksum is verified before upload. This is how an "arm" artifact built here runs on a
    device (or under qemu); for a model that can run here, graphopt.load(path) is the direct way.
    """
    if isinstance(model, (str, os.PathLike)):
        from ...artifact import read_metadata

        path = os.fspath(model)
        meta = read_metadata(path)
        if meta.get("backend") != "tvm":
            raise ArtifactError(f"artifact {path} holds a {meta.get('backend')!r} model, not a compiled library: "
                                f"there is nothing to run on an RPC device")
        info = meta["payload"]
        with zipfile.ZipFile(path) as zf:
            library = zf.read(info["file"])
        if hashlib.sha256(library).hexdigest() != info.get("sha256"):
            raise ArtifactError(f"artifact {path} is corrupted: its library does not match its sha256")
        spec = TargetSpec(**meta["target"])
        return RemoteModule(session, library, spec, meta["signature"])
    compiled = getattr(model, "compiled", model)
    from .runtime import CompiledModule

    if not isinstance(compiled, CompiledModule):
        raise GraphoptError(f"load_remote needs an artifact path or a TVM-compiled model, got "
                            f"{type(model).__name__}")
    import tempfile

    with tempfile.TemporaryDirectory(prefix="graphopt-remote-") as tmp:
        lib_path = os.path.join(tmp, "model.so")
        compiled.export_library(lib_path)
        library = Path(lib_path).read_bytes()
    return RemoteModule(session, library, compiled.spec, compiled.signature())


# ----------------------------------------------------------------------------------------- MetaSchedule
def ms_rpc_runner(device: RPCDevice, *, session_timeout: float = 60.0, number: int = 3, repeat: int = 1,
                  min_repeat_ms: int = 0, max_workers: int | None = None, cpu_cache_flush: bool = False):
    """MetaSchedule's RPCRunner measuring candidates on the devices a tracker serves under `device.key`.

    max_workers: concurrent measurements (default: the number of registered servers of the key, at least 1),
    so that several devices share the work.
    """
    if not device.tracker or not device.key:
        raise GraphoptError(f"MetaSchedule's RPC runner needs a tracker and a device key, got {device}")
    from tvm.s_tir.meta_schedule.runner import EvaluatorConfig, RPCConfig, RPCRunner

    if max_workers is None:
        total, _ = _free_servers(_tracker_summary(device, 30.0), device.key)
        max_workers = max(1, total)
    rpc_config = RPCConfig(tracker_host=device.host, tracker_port=device.port, tracker_key=device.key,
                           session_timeout_sec=int(session_timeout))
    evaluator = EvaluatorConfig(number=number, repeat=repeat, min_repeat_ms=min_repeat_ms,
                                enable_cpu_cache_flush=cpu_cache_flush)
    return RPCRunner(rpc_config=rpc_config, evaluator_config=evaluator, max_workers=max_workers)


def device_threads(session) -> int:
    """How many threads TVM's runtime uses on the device of `session` (its core count, or TVM_NUM_THREADS)."""
    try:
        return int(session.get_function("runtime.NumThreads")())
    except Exception as e:
        raise RemoteError(f"cannot ask the device for its thread count: {type(e).__name__}: "
                          f"{_last_line(str(e))}") from e


def tuning_target(spec: TargetSpec, num_cores: int):
    """The tvm.target.Target to tune `spec` for a device with `num_cores` cores.

    MetaSchedule needs "num-cores" on CPU targets; the "arm" aliases leave it out (the device decides), so it
    comes from the device (device_threads(session)) or the user.
    """
    import tvm

    if num_cores < 1:
        raise GraphoptError(f"num_cores must be >= 1, got {num_cores}")
    tvm_dict = dict(spec.tvm)
    if spec.kind == "llvm":
        tvm_dict["num-cores"] = int(num_cores)
    elif spec.kind == "cuda" and isinstance(tvm_dict.get("host"), dict):
        tvm_dict["host"] = dict(tvm_dict["host"], **{"num-cores": int(num_cores)})
    return tvm.target.Target(tvm_dict)


def _make_ms_build():
    """A MetaSchedule f_build without `import tvm.s_tir.tensor_intrin` (~80 s in every builder worker).

    A closure, so cloudpickle ships it by value and the builder's workers need not import graphopt.
    """

    def build(mod, target, _params):
        import tvm
        from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

        mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
        return tvm.compile(mod, target=target)

    return build


def _make_ms_export(cxx: str | None):
    """A MetaSchedule f_export linking a .so (with the cross compiler `cxx`, or the host's when None)."""

    def export(mod) -> str:
        import os as _os
        import tempfile as _tempfile

        from tvm.support import cc

        path = _os.path.join(_tempfile.mkdtemp(prefix="graphopt-ms-"), "candidate.so")
        if cxx is None:
            mod.export_library(path)
        else:
            def fcompile(output, objects, options=None):
                cc.create_shared(output, objects, options=list(options or []), cc=cxx)

            fcompile.output_format = "so"
            mod.export_library(path, fcompile=fcompile)
        return path

    return export


def ms_export_for(spec: TargetSpec):
    """A MetaSchedule builder `f_export` that links candidates as a .so an RPC device of `spec` can load:
    with the aarch64 cross compiler when `spec` is not this machine's architecture (BuildError if none is
    installed), else with the host compiler. A closure: the builder workers need not import graphopt."""
    import platform

    cxx = None
    if spec.kind == "llvm" and spec.arch and spec.arch != platform.machine():
        from . import cross

        cxx = cross.cross_fcompile().compiler
    return _make_ms_export(cxx)


def ms_remote_setup(spec: TargetSpec, device: RPCDevice, *, timeout: float = 60.0, number: int = 3,
                    repeat: int = 1, min_repeat_ms: int = 0):
    """Everything MetaSchedule needs to tune `spec` on the devices a tracker serves under `device.key`:
    (target with the device's core count, RPCRunner, builder f_export). RemoteError if no device answers.

    For tuning/: use the target for task extraction and tuning, pass f_export to the builder workers
    (LocalBuilder(f_export=...) or local_builder._worker_func(f_build, f_export, ...)), and the runner as is.
    """
    session = connect(device, timeout=timeout)
    try:
        threads = device_threads(session)
    finally:
        del session                                 # a device serves one session at a time
    runner = ms_rpc_runner(device, session_timeout=timeout, number=number, repeat=repeat,
                           min_repeat_ms=min_repeat_ms)
    return tuning_target(spec, threads), runner, ms_export_for(spec)


def ms_builder(spec: TargetSpec, *, max_workers: int | None = None, timeout_sec: float = 120.0):
    """MetaSchedule LocalBuilder producing .so candidates an RPC device can load for `spec`.

    For aarch64 on another machine, candidates are linked with the cross compiler (cross.find_cross_cxx();
    BuildError if absent), so the device needs no compiler.
    """
    from tvm.s_tir.meta_schedule.builder import LocalBuilder

    f_export = ms_export_for(spec)
    workers = max_workers or max(1, min(2, os.cpu_count() or 1))
    return LocalBuilder(max_workers=workers, timeout_sec=timeout_sec, f_build=_make_ms_build(), f_export=f_export)
