"""Differential sweep: OpInfo samples compiled by graphopt vs eager PyTorch (graphopt/testing/opinfo.py).

    python benchmarks/opinfo_sweep.py                      # COMMON_OPS, 3 samples, plain/nonfinite/edge
    python benchmarks/opinfo_sweep.py --ops clamp,erf -v   # some ops, every result printed
    python benchmarks/opinfo_sweep.py --all                # every OpInfo op graphopt's lowering table covers
    python benchmarks/opinfo_sweep.py --target arm         # built for aarch64, run under qemu (or natively)

Prints per-op counts of match / typed (GraphoptError) / wrong (silently wrong) / crash (untyped exception),
then every case that did not match. Exit status 1 when any case is wrong or crashed.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", default="", help="comma-separated OpInfo names (default: COMMON_OPS)")
    parser.add_argument("--all", action="store_true", help="every OpInfo op whose ATen ops graphopt lowers")
    parser.add_argument("--samples", type=int, default=3, help="float32 samples per op (default 3)")
    parser.add_argument("--variants", default="plain,nonfinite,edge")
    parser.add_argument("--batch", type=int, default=8, help="cases compiled into one module (default 8)")
    parser.add_argument("--target", default="x86")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every result as it comes")
    args = parser.parse_args(argv)

    import torch

    from graphopt.testing import opinfo

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    start = time.perf_counter()
    infos = opinfo.op_infos()
    if args.all:
        ops = opinfo.lowerable_ops(infos)
        print(f"{len(ops)} OpInfo ops lower to graphopt's table", flush=True)
    elif args.ops:
        ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    else:
        ops = list(opinfo.COMMON_OPS)
    cases = opinfo.make_cases(ops, samples=args.samples, variants=args.variants.split(","), infos=infos)
    print(f"{len(cases)} cases from {len(ops)} ops", flush=True)
    progress = (lambda r: print(r, flush=True)) if args.verbose else None
    server, execute = _executor(args.target)
    try:
        results = opinfo.run_cases(cases, target=args.target, batch=args.batch, progress=progress,
                                   execute=execute)
    finally:
        if server is not None:
            server.terminate()
    print(opinfo.summarize(results))
    print(f"\n{time.perf_counter() - start:.0f} s")
    return 1 if any(r.kind in ("wrong", "crash") for r in results) else 0


def _executor(target: str):
    """(server, execute) for run_cases: an ARM build on an x86 host runs on an aarch64 TVM RPC server under
    qemu-user (scripts/setup_cross.sh installs it); any other target runs here."""
    import platform

    from graphopt.backends.targets import resolve_target

    spec = resolve_target(target)
    if spec.kind != "llvm" or spec.arch == platform.machine() or spec.arch != "aarch64":
        return None, None
    from graphopt.backends.tvm import rpc
    from graphopt.testing import opinfo

    server = rpc.DeviceServer(start_timeout=240)
    print(f"running on an aarch64 RPC server ({server.device})", flush=True)
    return server, opinfo.remote_executor(rpc.connect(server.device, timeout=120))


if __name__ == "__main__":
    sys.exit(main())
