"""Command line: `graphopt optimize | passes | tune`.

    graphopt optimize                      # bundled ResNet-18, host CPU, default pipeline: prints the report
    graphopt optimize --model mlp --pipeline "fold_bn,lowrank(energy=0.9)" --output mlp.gopt
    graphopt passes                        # registered passes and their contracts
"""
from __future__ import annotations

import argparse
import inspect
import statistics
import sys
import time


def _median_ms(fn, args, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn(*args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def cmd_optimize(args: argparse.Namespace) -> int:
    import torch

    import graphopt
    from graphopt.analysis.compare import compare_outputs
    from graphopt.models import get_model

    torch.manual_seed(0)
    model, inputs = get_model(args.model, batch=args.batch)
    print(f"graphopt {graphopt.__version__}: optimizing {args.model} (batch {args.batch}, random weights) "
          f"for target {args.target!r} with pipeline {args.pipeline!r}", flush=True)
    tune = None
    if args.tune:
        tune = {"trials": args.tune}
        if args.database:
            tune["database"] = args.database
    start = time.perf_counter()
    opt = graphopt.optimize(model, target=args.target, pipeline=args.pipeline, example_inputs=inputs,
                            tune=tune, precision=args.precision)
    total = time.perf_counter() - start
    print()
    print(opt.report)
    with torch.no_grad():
        ref = model(*inputs)
    diff = compare_outputs(opt(*inputs), ref)
    print(f"\ncompiled for {opt.target.alias} in {total:.1f} s; output vs eager PyTorch: {diff}")
    if args.repeats > 0:
        with torch.no_grad():
            eager_ms = _median_ms(model, inputs, args.repeats)
            opt_ms = _median_ms(opt, inputs, args.repeats)
        print(f"latency (median of {args.repeats}): eager PyTorch {eager_ms:.2f} ms, graphopt {opt_ms:.2f} ms "
              f"(speedup over eager {eager_ms / opt_ms:.2f}x)")
    if args.output:
        path = opt.save(args.output)
        print(f"saved artifact to {path}")
    if args.json:
        with open(args.json, "w") as f:
            f.write(opt.report.to_json(indent=2))
        print(f"wrote report JSON to {args.json}")
    return 0


def cmd_passes(args: argparse.Namespace) -> int:
    import dataclasses

    from graphopt.pipeline import available_passes

    for name, cls in available_passes().items():
        opts = ", ".join(f"{f.name}={f.default!r}" if f.default is not dataclasses.MISSING else f.name
                         for f in dataclasses.fields(cls))
        print(f"{name}({opts})  [{'exact' if cls.exact else 'approximate'}]")
        doc = inspect.getdoc(cls) or "(no docstring)"
        for line in doc.splitlines():
            print(f"    {line}")
        print()
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from graphopt.backends.tvm.tuning import cli_tune

    return cli_tune(args)


def build_parser() -> argparse.ArgumentParser:
    from graphopt.models import MODELS

    parser = argparse.ArgumentParser(prog="graphopt", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("optimize", help="optimize a bundled model and print the report")
    p.add_argument("--model", default="resnet18", choices=sorted(MODELS))
    p.add_argument("--target", default="x86", help="torch, x86[:cpu], arm[:cpu], cuda[:sm_XX]")
    p.add_argument("--pipeline", default="fold_bn,cleanup")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tune", type=int, default=0, metavar="TRIALS", help="MetaSchedule trials (0: no tuning)")
    p.add_argument("--database", default=None, help="tuning record database directory")
    p.add_argument("--precision", default="float32",
                   help="float32 (default), float16, winograd (CPU: 3x3 convolutions as Winograd, ~1e-5 relative) or "
                        "high (int4 weight-only GEMVs with bfloat16 input parts on AVX512-BF16 CPUs, 2^-16 relative)")
    p.add_argument("--repeats", type=int, default=5, help="latency repeats (0: skip timing)")
    p.add_argument("--output", default=None, help="save the artifact here (.gopt)")
    p.add_argument("--json", default=None, help="write the report as JSON here")
    p.set_defaults(func=cmd_optimize)
    p = sub.add_parser("passes", help="list registered passes with their contracts")
    p.set_defaults(func=cmd_passes)
    p = sub.add_parser("tune", help="tune a bundled model with MetaSchedule and keep the records")
    p.add_argument("--model", default="resnet18", choices=sorted(MODELS))
    p.add_argument("--target", default="x86")
    p.add_argument("--pipeline", default="fold_bn,cleanup")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--trials", type=int, default=64)
    p.add_argument("--database", default=None)
    p.set_defaults(func=cmd_tune)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):      # plain `graphopt`: the main job
        args = parser.parse_args(["optimize"] + (argv or []))
    from graphopt.errors import GraphoptError

    try:
        return args.func(args)
    except GraphoptError as e:
        print(f"graphopt: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
