"""Worker pools: MetaSchedule's builder and runner, in worker processes that live across rounds.

The builder's workers only lower and compile (no tvm.s_tir.tensor_intrin import, no PyTorch or ml_dtypes),
ignore SIGINT (a terminal's Ctrl-C reaches the tuning process, which stops at a safe point), and the runner
measures in the same processes, one candidate at a time.
"""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from ..rpc_device_server import SKIPPED_IMPORTS

if TYPE_CHECKING:
    from .options import TuneOptions

__all__ = ["import_target_intrinsics", "builder_runner", "run_secs", "worker_count", "close_workers",
           "torch_free_worker"]

# The worker's entry point: TVM's popen worker with the imports the RPC device server skips (PyTorch, ml_dtypes)
# made to fail. tvm_ffi imports both when it can, for DLPack and numpy bfloat16/float8 conversions the workers
# never make (they build and measure TVM kernels only): 2.9 of the 3.8 s a worker took to start here (PyTorch
# 2.3 s, ml_dtypes 0.6 s), for every worker of every tuning run.
WORKER_MAIN = ("import runpy, sys; " + "".join(f"sys.modules[{name!r}] = None; " for name in SKIPPED_IMPORTS)
               + "runpy.run_module('tvm.exec.popen_worker', run_name='__main__')")


def import_target_intrinsics(target) -> None:
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


_CLASSES: dict = {}


def _torch_free_classes():
    """(TorchFreeWorker, TorchFreePool): TVM's PopenWorker and PopenPoolExecutor whose worker processes start
    with WORKER_MAIN (on Windows: TVM's own start). Made once (they subclass TVM's, imported on first use)."""
    if _CLASSES:
        return _CLASSES["worker"], _CLASSES["pool"]
    import os
    import subprocess
    import threading

    from tvm.support.popen_pool import PopenPoolExecutor, PopenWorker

    class TorchFreeWorker(PopenWorker):
        def _start(self):
            if self._proc is not None or sys.platform == "win32":
                return super()._start()
            main_read, worker_write = os.pipe()
            worker_read, main_write = os.pipe()
            cmd = [sys.executable, "-c", WORKER_MAIN, str(worker_read), str(worker_write)]
            self._proc = subprocess.Popen(cmd, pass_fds=(worker_read, worker_write), stdout=self._stdout,
                                          stderr=self._stderr)
            os.close(worker_read)
            os.close(worker_write)
            self._reader = os.fdopen(main_read, "rb")
            self._writer = os.fdopen(main_write, "wb")
            return None

    class TorchFreePool(PopenPoolExecutor):
        def _worker_run(self, fn, args, kwargs):
            with self._lock:
                tid = threading.get_ident()
                if tid not in self._worker_map:
                    self._worker_map[tid] = TorchFreeWorker(self._initializer, self._initargs,
                                                            self._maximum_process_uses, self._stdout,
                                                            self._stderr)
                proc = self._worker_map[tid]
            proc.send(fn, args, kwargs, self._timeout)
            return proc.recv()

    _CLASSES.update(worker=TorchFreeWorker, pool=TorchFreePool)
    return TorchFreeWorker, TorchFreePool


def torch_free_worker():
    """One TVM PopenWorker process that imports TVM without PyTorch and ml_dtypes (e.g. for an RPC tracker)."""
    return _torch_free_classes()[0]()


def _torch_free_pool(max_workers: int, timeout_sec: float):
    """The tuning workers: a TVM PopenPoolExecutor of torch-free workers that ignore SIGINT."""
    return _torch_free_classes()[1](max_workers=max_workers, timeout=timeout_sec,
                                    initializer=_make_worker_initializer())


def _pooled_builder(max_workers: int, timeout_sec: float, recycle_after: int = 16):
    """A MetaSchedule builder whose worker processes live across build rounds (recycled every
    `recycle_after` rounds). MetaSchedule's LocalBuilder starts fresh workers for every round, and each one
    pays the TVM import again (~1 s of CPU without PyTorch and ml_dtypes, 3.8 s with them) before building
    anything."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.builder import local_builder
    from tvm.support.popen_pool import StatusKind

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
                self._pool = _torch_free_pool(max_workers, timeout_sec)
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
    would start one more worker process (another TVM import, ~1 s of CPU) for the same job."""
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


def builder_runner(options: TuneOptions, workers: int):
    from tvm.s_tir import meta_schedule as ms

    builder = _pooled_builder(max_workers=workers, timeout_sec=options.timeout)
    builder.warm()
    runner = _pooled_runner(builder, options.timeout, ms.runner.EvaluatorConfig._normalized(
        ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=40, enable_cpu_cache_flush=False)))
    return builder, runner


def run_secs(result) -> float | None:
    if result is None or getattr(result, "error_msg", None):
        return None
    secs = [float(x) for x in (result.run_secs or [])]
    return sum(secs) / len(secs) if secs else None


def worker_count(target) -> int:
    cores = target.attrs.get("num-cores")
    try:
        n = int(cores) if cores is not None else 0
    except Exception:
        n = 0
    if n <= 0:
        from ...targets import physical_cores

        n = physical_cores()
    return max(1, n)


def close_workers(builder, runner) -> None:
    """Stop the worker processes (the runner measures in the builder's)."""
    try:
        builder.close()
    except Exception:
        pass
