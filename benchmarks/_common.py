"""Helpers shared by benchmark scripts: threads, machine description, measured GEMM peak, interleaved timing.

Import this before torch/TVM/numpy are used for timing: `set_threads()` fixes the thread count of every
runtime a benchmark compares (PyTorch, TVM's runtime pool, OpenBLAS, ONNX Runtime sessions made with
`ort_threads()`), so peers are compared at the same parallelism.
"""
from __future__ import annotations

import contextlib
import gc
import os
import platform
import statistics
import sys
import time
from typing import Callable

__all__ = ["physical_cores", "set_threads", "machine_info", "gemm_peak_gflops", "time_interleaved",
           "first_line", "format_table", "peak_rss_gb", "run_child"]


def physical_cores() -> int:
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
        if n:
            return int(n)
    except Exception:
        pass
    return os.cpu_count() or 1


def set_threads(n: int) -> dict:
    """Use `n` threads in PyTorch, TVM's runtime and BLAS. Returns what was set, for the header/JSON.

    TVM's runtime reads TVM_NUM_THREADS when its thread pool starts (first compiled call); without it TVM 0.27
    takes hardware_concurrency / 2 on x86 (it assumes hyper-threading), i.e. 1 thread on a 2-core machine
    without SMT. We set it unless the user already did (then we report theirs).
    """
    import torch

    torch.set_num_threads(n)
    os.environ.setdefault("TVM_NUM_THREADS", str(n))
    return {"torch": torch.get_num_threads(), "tvm": int(os.environ["TVM_NUM_THREADS"]), "blas": n,
            "onnxruntime_intra_op": n}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


_DISTRIBUTIONS = {"tvm": "apache-tvm"}             # import name -> installed distribution, where they differ


def _version(mod: str) -> str:
    """The installed version of `mod`, from the package metadata when it is not imported yet (importing
    torchvision and onnx only to print their versions cost a benchmark run ~1.5 s before it measured anything)."""
    import importlib.metadata
    import importlib.util

    if mod in sys.modules:
        return str(getattr(sys.modules[mod], "__version__", "?"))
    try:
        if importlib.util.find_spec(mod) is None:
            return "unavailable (not installed)"
        return importlib.metadata.version(_DISTRIBUTIONS.get(mod, mod))
    except importlib.metadata.PackageNotFoundError:
        pass
    except Exception as e:                          # report, don't fail: the peer will be reported failed
        return f"unavailable ({type(e).__name__})"
    try:
        m = __import__(mod)
        return str(getattr(m, "__version__", "?"))
    except Exception as e:
        return f"unavailable ({type(e).__name__})"


def machine_info() -> dict:
    info = {"cpu": _cpu_model(), "physical_cores": physical_cores(), "logical_cpus": os.cpu_count(),
            "python": platform.python_version()}
    for mod in ("torch", "torchvision", "tvm", "onnxruntime", "onnx", "numpy"):
        info[mod] = _version(mod)
    try:
        from graphopt.backends.targets import host_cpu

        info["llvm_cpu"] = host_cpu()
    except Exception:
        info["llvm_cpu"] = "?"
    try:
        info["loadavg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    return info


def gemm_peak_gflops(threads: int, n: int = 2048, repeats: int = 5) -> dict:
    """The machine's float32 peak as measured now: best of `repeats` n×n×n GEMMs on `threads` threads, with
    numpy's BLAS and with torch.mm, whichever is faster (`library` says which)."""
    import numpy as np

    try:
        from threadpoolctl import threadpool_limits
        limiter = threadpool_limits(limits=threads, user_api="blas")
    except Exception:                                # no threadpoolctl: BLAS keeps its own thread count
        limiter = None
    try:
        rng = np.random.default_rng(0)
        a = rng.standard_normal((n, n), dtype=np.float32)
        b = rng.standard_normal((n, n), dtype=np.float32)
        a @ b                                        # warm-up (thread pool, page faults)
        secs = []
        for _ in range(repeats):
            t = time.perf_counter()
            a @ b
            secs.append(time.perf_counter() - t)
    finally:
        if limiter is not None:
            limiter.restore_original_limits()
    # numpy's BLAS may not use every instruction the CPU has (here: OpenBLAS reached ~98 GFLOP/s where MKL and
    # graphopt's own kernels exceed 160 on an AVX-512 machine); torch.mm (MKL / oneDNN) too, best of both.
    import torch

    library = "numpy"
    with torch.no_grad():
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        torch.mm(ta, tb)
        tsecs = []
        for _ in range(repeats):
            t = time.perf_counter()
            torch.mm(ta, tb)
            tsecs.append(time.perf_counter() - t)
    if min(tsecs) < min(secs):
        secs, library = tsecs, f"torch.mm ({torch.get_num_threads()} threads)"
    flops = 2.0 * n ** 3
    return {"gflops": round(flops / min(secs) / 1e9, 2), "median_gflops": round(flops / statistics.median(secs)
                                                                                  / 1e9, 2),
            "n": n, "repeats": repeats, "threads": threads, "blas_limited": limiter is not None,
            "library": library}


def _pct(xs: list[float], q: float) -> float:
    """q-quantile (0..1) by linear interpolation."""
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@contextlib.contextmanager
def _gc_paused():
    """Python's garbage collector collected once, then off (as timeit does) while timing: the builds just made
    leave unreachable TVM / ORT objects behind. Measured: the dynamic encoder at 8 x 16 timed 9.8 ms with the
    collector on after the per-shape builds, 5.6 ms with it collected first and off (static build 4.9 / 5.6;
    bench_dynamic.py, two runs, one each way)."""
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def time_interleaved(fns: dict[str, Callable[[], object]], rounds: int, slice_s: float = 0.25,
                     budget_s: float = 300.0, min_rounds: int = 3, calls: int = 0, settle_s: float = 0.05,
                     on_error: Callable[[str, BaseException], None] | None = None) -> dict[str, dict]:
    """Per-call latency statistics of each fn, timed interleaved round-robin.

    Each round calls every fn in turn, so load changes on a shared machine hit every variant alike, and each
    round starts one fn later than the one before. Within a round a fn gets ~`slice_s` seconds: `k` timed
    calls, each timed alone (k sized from a first call, or `calls` when > 0). A block of calls per fn, not one
    call each in turn: the thread pools of torch, ORT and TVM spin for a while after a call, and calls
    interleaved one by one slow each other down. Before each block the process sleeps `settle_s` so the
    previous variant's thread pools go idle (without it, PyTorch eager on a 100 MB MLP measured 19-23 ms right
    after ONNX Runtime's int8 session, 5.2 ms with it), and every fn gets one untimed call first: the steady
    state, not the first call after another variant's work (once only fns under 50 ms got it, and a slow
    fn's block of one or two calls timed that cold call: in bench_dynamic's grid the dynamic encoder, which
    always followed ORT's int8 session, read 1.06-1.09x its static build at 32 x 128 against 1.01 with the
    untimed call, the kernels alone 1.02x by kernel_profile). Garbage is collected before and the collector is off
    during the rounds (_gc_paused). Stops after `rounds` rounds, or once `budget_s` is spent and `min_rounds` are done.
    A fn that raises is dropped (on_error is told) and the others go on.

    Returns {name: {"median_ms", "p10_ms", "p90_ms", "min_ms", "samples", "rounds"}}.
    """
    import torch

    live = dict(fns)
    per_fn: dict[str, int] = {}
    samples: dict[str, list[float]] = {k: [] for k in fns}
    done_rounds = 0

    def fail(k, e):
        live.pop(k, None)
        if on_error is not None:
            on_error(k, e)

    with torch.no_grad(), _gc_paused():
        for k, fn in list(live.items()):             # size the slices
            try:
                t = time.perf_counter()
                fn()
                first = time.perf_counter() - t
                per_fn[k] = calls if calls > 0 else max(1, int(slice_s / max(first, 1e-6)))
            except Exception as e:
                fail(k, e)
        start = time.perf_counter()
        for _ in range(rounds):
            order = list(live.items())
            turn = done_rounds % len(order) if order else 0
            for k, fn in order[turn:] + order[:turn]:        # each round starts one variant later
                try:
                    time.sleep(settle_s)              # let the previous runtime's thread pool go idle
                    fn()                              # untimed: the steady state
                    for _ in range(per_fn[k]):
                        t = time.perf_counter()
                        fn()
                        samples[k].append((time.perf_counter() - t) * 1e3)
                except Exception as e:
                    fail(k, e)
            done_rounds += 1
            if time.perf_counter() - start > budget_s and done_rounds >= min_rounds:
                break
    out = {}
    for k in live:
        xs = samples[k]
        out[k] = {"median_ms": statistics.median(xs), "p10_ms": _pct(xs, 0.1), "p90_ms": _pct(xs, 0.9),
                  "min_ms": min(xs), "samples": len(xs), "rounds": done_rounds}
    return out


def peak_rss_gb(who=None) -> float:
    """Peak resident memory in GiB: this process's VmHWM (getrusage's ru_maxrss survives exec, so a child
    would report the parent's peak when that was higher), or the children's ru_maxrss for `who`."""
    import resource

    if who is None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return round(int(line.split()[1]) / 2**20, 2)
        except OSError:
            pass
    return round(resource.getrusage(resource.RUSAGE_SELF if who is None else who).ru_maxrss / 2**20, 2)


def run_child(cmd: list[str], name: str, which: str, timeout: float) -> dict:
    """Run one coverage case in its own process: the JSON row it prints last, or a failure row (timeout, or
    the exit code and the last stderr line) naming model `name` and run `which`."""
    import json
    import subprocess

    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"model": name, "run": which, "status": "fail", "kind": "timeout", "error": f"over {timeout:g} s"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
    return {"model": name, "run": which, "status": "fail", "kind": f"exit {p.returncode}", "error": tail[:300]}


def append_jsonl(path: str, row: dict) -> None:
    """Append `row` to the JSON-lines file `path` (nothing when `path` is empty): a long sweep cut short
    keeps every row done so far."""
    import json

    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def first_line(e: BaseException | str, limit: int = 300) -> str:
    """An error's first meaningful line (type name included), shortened to `limit` characters."""
    if isinstance(e, BaseException):
        text = str(e).strip()
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        msg = f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    else:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        msg = lines[0] if lines else ""
    return msg if len(msg) <= limit else msg[:limit] + "..."


def format_table(rows: list[list[str]], right: set[int] | None = None) -> str:
    """Rows of strings (first row = header) as aligned text; columns in `right` are right-aligned."""
    right = right or set()
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]

    def fmt(r):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))

    lines = [fmt(rows[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows[1:]]
    return "\n".join(line.rstrip() for line in lines)
