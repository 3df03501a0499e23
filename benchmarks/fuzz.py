"""Random networks through every pipeline, compiled and compared with eager: counts per outcome.

    python benchmarks/fuzz.py --count 500 --seed 0              # models 0..499, the four pipelines, x86
    python benchmarks/fuzz.py --count 50 --seed 1000 --pipelines default,quantize --json fuzz.json
    python benchmarks/fuzz.py --count 426 --seed 74                # resume: models 74..499

Models come from graphopt.testing.random_models (conv/linear/depthwise/grouped convs, residual adds,
concat/split, BN/GN/LN, nn.MultiheadAttention and scaled_dot_product_attention, a dozen activations, random
shapes); model i is random_model(seed + i), the same on every machine (with --idioms, random_model(seed + i,
idioms=True): the same layers with in-place activations, keyword calls and a residual block applied twice).
Each goes through graphopt.testing.fuzz.PIPELINES (default fold_bn,cleanup; prune; lowrank; quantize),
compiled for --target, and is classified: matched, typed GraphoptError (by kind), silently wrong (must be 0),
untyped crash (must be 0). Every outcome that is not `matched` is printed with its model's one-line
description, so a failure can be reproduced with random_model(seed). Exits 1 when anything was silently wrong
or crashed untyped.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import format_table, physical_cores, set_threads  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=500, help="number of random models")
    ap.add_argument("--seed", type=int, default=0, help="seed of the first model")
    ap.add_argument("--pipelines", default="default,prune,lowrank,quantize",
                    help="names from graphopt.testing.fuzz.PIPELINES, comma-separated")
    ap.add_argument("--target", default="x86")
    ap.add_argument("--threads", type=int, default=physical_cores())
    ap.add_argument("--dynamic", action="store_true",
                    help="one build per model for batch 1-4 (and sequence length 2-2x), checked at 3 sizes")
    ap.add_argument("--idioms", action="store_true",
                    help="the same models written with in-place activations, keyword calls and a block applied twice")
    ap.add_argument("--json", default="", help="write every outcome to this file")
    ap.add_argument("--quiet", action="store_true", help="print only what is not matched, and the counts")
    ap.add_argument("--slow", type=float, default=30.0,
                    help="a run over this many seconds prints its three slowest phases (capture, passes, build)")
    args = ap.parse_args(argv)
    set_threads(args.threads)

    from graphopt.testing.fuzz import PIPELINES, run_fuzz, summarize

    pipelines = [p.strip() for p in args.pipelines.split(",") if p.strip()]
    unknown = [p for p in pipelines if p not in PIPELINES]
    if unknown:
        ap.error(f"unknown pipeline(s) {unknown}; known: {', '.join(PIPELINES)}")
    print(f"fuzz: models {args.seed}..{args.seed + args.count - 1}, pipelines {', '.join(pipelines)}, "
          f"target {args.target}, {args.threads} threads" + (", dynamic shapes" if args.dynamic else "")
          + (", idioms" if args.idioms else ""), flush=True)
    start = time.perf_counter()

    def show(o):
        slow = ""
        if o.seconds > args.slow and o.phases:         # say where a slow run's time went
            top = sorted(o.phases.items(), key=lambda kv: -kv[1])[:3]
            slow = "  slowest: " + ", ".join(f"{k} {v:.1f}s" for k, v in top)
        if o.status == "matched":
            if not args.quiet or slow:
                print(f"  {o.seed:5d} {o.pipeline:9s} matched  rel|Δ| {o.max_rel:.1e}  {o.seconds:5.1f}s{slow}",
                      flush=True)
            return
        print(f"  {o.seed:5d} {o.pipeline:9s} {o.status.upper():8s} {o.kind}: {o.message}", flush=True)
        print(f"        model: {o.describe}", flush=True)

    results = run_fuzz(range(args.seed, args.seed + args.count), pipelines, args.target, on_outcome=show,
                       dynamic=args.dynamic, idioms=args.idioms)
    s = summarize(results)
    elapsed = time.perf_counter() - start
    rows = [["pipeline", "runs", "matched", "typed", "wrong", "crash", "max rel|Δ| matched"]]
    for p in pipelines + ["all"]:
        rs = [o for o in results if p == "all" or o.pipeline.removesuffix("+dyn") == p]
        worst = max((o.max_rel for o in rs if o.status == "matched"), default=0.0)
        rows.append([p, str(len(rs))] + [str(sum(o.status == k for o in rs)) for k in
                                          ("matched", "typed", "wrong", "crash")] + [f"{worst:.1e}"])
    print()
    print(format_table(rows, right={1, 2, 3, 4, 5, 6}))
    for k in ("typed", "crash", "wrong"):
        if s[f"{k}_by_kind"]:
            print(f"{k} by kind: " + ", ".join(f"{n}×{c}" for n, c in sorted(s[f'{k}_by_kind'].items())))
    print(f"{args.count} models, {len(results)} runs in {elapsed:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "summary": s, "seconds": elapsed,
                       "outcomes": [{k: v for k, v in o.__dict__.items() if k != "trace"} for o in results]},
                      f, indent=1)
    return 1 if s["wrong"] or s["crash"] else 0


if __name__ == "__main__":
    sys.exit(main())
