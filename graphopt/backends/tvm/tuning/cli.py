"""`graphopt tune`: tune a bundled model for a target and keep the records."""
from __future__ import annotations

import time

__all__ = ["cli_tune"]


def cli_tune(args) -> int:
    """`graphopt tune`: tune a bundled model for a target and keep the records; prints a summary.

    args (argparse.Namespace): model (bundled name), target, pipeline, batch, trials (int),
    database (directory or None). Optional: trials_per_task (int), timeout (seconds), no_progress (bool).
    """
    import torch

    import graphopt
    from graphopt.models import get_model

    torch.manual_seed(0)
    model, inputs = get_model(args.model, batch=args.batch)
    options = {"trials": int(args.trials)}
    if getattr(args, "database", None):
        options["database"] = args.database
    if getattr(args, "trials_per_task", None):
        options["trials_per_task"] = int(args.trials_per_task)
    if getattr(args, "timeout", None):
        options["timeout"] = float(args.timeout)
    if getattr(args, "no_progress", False):
        options["progress"] = False
    n = options["trials"]
    print(f"graphopt tune: {args.model} (batch {args.batch}) for {args.target!r}, {n} trial{'s' * (n != 1)}",
          flush=True)
    start = time.perf_counter()
    try:
        opt = graphopt.optimize(model, target=args.target, pipeline=args.pipeline, example_inputs=inputs,
                                tune=options)
    except KeyboardInterrupt:            # tune_module has said where the records measured so far are kept
        return 130
    total = time.perf_counter() - start
    tuning = opt.report.backend.get("tuning", {})
    print(f"tuned in {total:.1f} s: {tuning.get('new_trials', 0)} new measurements, "
          f"{tuning.get('reused_records', 0)} records reused, {tuning.get('tasks_tuned', 0)}/"
          f"{tuning.get('tasks', 0)} kernels searched")
    print(f"paired check against the default schedules: {tuning.get('check_records', 0)} measurements, "
          f"{tuning.get('defaults_kept', 0)} kernels kept on their default schedule")
    if tuning.get("estimated_ms") is not None:
        print(f"sum of best kernel latencies: {tuning['estimated_ms']:.3f} ms")
    print(f"records: {tuning.get('database', '?')}")
    print(f"kernels: {opt.report.backend.get('kernels', '')}")
    return 0
