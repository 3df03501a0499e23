"""Per-kernel timings of a compiled module: where one call's time goes, kernel by kernel.

`profile_kernels(compiled, *inputs)` runs the module's Relax VM with an instrument (TVM's
VirtualMachine.set_instrument) that synchronizes the device and reads the clock before and after every VM
call instruction: each TIR kernel and each builtin (allocation, reshape, copies). The synchronization makes
it slower than a plain call (a few µs per instruction), so shares are the figure to read, not the sum.
"""
from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

__all__ = ["profile_kernels", "format_profile"]


def profile_kernels(compiled: Any, *inputs, repeat: int = 3) -> list[dict]:
    """[{name, calls, ms (per model call), share}] for `compiled` (a CompiledModule or OptimizedModel) on
    `inputs`, slowest first, from the median of `repeat` instrumented calls after one warm-up."""
    from tvm import relax

    module = getattr(compiled, "compiled", compiled)          # OptimizedModel -> CompiledModule
    module.check_inputs(inputs)
    dev = module._tvm_device()
    vm = relax.VirtualMachine(module.executable, dev)
    args = [module._to_tvm(x) for x in inputs]
    runs: list[dict[str, list[float]]] = []
    started: list[float] = []
    current: dict[str, list[float]] = defaultdict(list)

    def instrument(func, symbol, before, ret, *call_args):
        dev.sync()
        now = time.perf_counter()
        if before:
            started.append(now)
        else:
            current[str(symbol)].append(now - started.pop())
        return 0                                              # VMInstrumentReturnKind.kNoOp

    vm["main"](*args)                                         # warm-up, uninstrumented
    vm.set_instrument(instrument)
    for _ in range(max(1, repeat)):
        current = defaultdict(list)
        vm["main"](*args)
        runs.append(current)
    names = sorted({n for r in runs for n in r})
    rows = []
    for n in names:
        per_run = sorted(sum(r.get(n, [])) for r in runs)
        rows.append({"name": n, "calls": len(runs[0].get(n, [])), "ms": per_run[len(per_run) // 2] * 1e3})
    total = sum(r["ms"] for r in rows) or 1.0
    for r in rows:
        r["share"] = r["ms"] / total
    return sorted(rows, key=lambda r: -r["ms"])


def format_profile(rows: list[dict], top: int = 15) -> str:
    """A text table of the `top` slowest rows (name, calls, ms, share)."""
    lines = [f"{'kernel':56s} {'calls':>5s} {'ms':>9s} {'share':>6s}"]
    for r in rows[:top]:
        lines.append(f"{r['name'][:56]:56s} {r['calls']:5d} {r['ms']:9.3f} {100 * r['share']:5.1f}%")
    return "\n".join(lines)
