"""Structured pruning, measured: FLOPs reduction vs the latency speedup it actually buys, this run.

    python benchmarks/bench_prune.py                                  # resnet18, mobilenet_v2; torch and x86
    python benchmarks/bench_prune.py --models resnet18 --reductions 0.3,0.5,0.7 --targets torch
    python benchmarks/bench_prune.py --size 224 --repeat 20 --out benchmarks/results

Per model (random weights, batch 1, size×size input) and target, these variants are built in this process:
  base        fold_bn,cleanup                                      (the unpruned reference on that target)
  prune-R     fold_bn,prune(flops_reduction=R,...),cleanup          for each R in --reductions
Targets: "torch" runs the optimized fx.GraphModule in PyTorch eager; "x86" compiles it with graphopt's TVM
backend (default schedules, no tuning). Timings are interleaved round-robin over the variants of one target
(so load changes on a shared machine hit every variant alike); we report the median ms per call.

Columns: FLOPs ratio = base FLOPs / variant FLOPs; speedup = base ms / variant ms on the same target;
efficiency = speedup / FLOPs ratio. The goal from the issue is efficiency >= 0.8 (a 2x FLOPs cut should run
at least 1.6x faster). Writes <out>/prune_<model>.json and prints one table per model.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import graphopt  # noqa: E402
from _common import physical_cores, set_threads, time_interleaved  # noqa: E402
from graphopt.models import get_model  # noqa: E402


def _model(name: str, size: int):
    import torchvision

    torch.manual_seed(0)
    if name in ("resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0", "densenet121"):
        return getattr(torchvision.models, name)().eval(), (torch.randn(1, 3, size, size),)
    return get_model(name)


def bench_model(name: str, args) -> dict:
    model, inputs = _model(name, args.size)
    multiple = args.multiple
    if multiple is None:          # the compiled target's vector width, the same pruned model on every target
        from graphopt.backends.targets import vector_channels

        compiled = [t for t in args.targets if t != "torch"]
        multiple = vector_channels(compiled[0]) if compiled else 8
    prune_opts = f"criterion={args.criterion},scope={args.scope},multiple={multiple}"
    pipelines = {"base": "fold_bn,cleanup"}
    for r in args.reductions:
        pipelines[f"prune-{r:g}"] = f"fold_bn,prune(flops_reduction={r:g},{prune_opts}),cleanup"
    result = {"model": name, "input": [list(x.shape) for x in inputs], "threads": torch.get_num_threads(),
              "pipelines": pipelines, "variants": {}}
    for target in args.targets:
        built = {}
        for key, pipe in pipelines.items():
            t = time.perf_counter()
            opt = graphopt.optimize(model, target=target, pipeline=pipe, example_inputs=inputs)
            build_s = time.perf_counter() - t
            prune_rec = next((r for r in opt.report.records if r.name.startswith("prune")), None)
            info = result["variants"].setdefault(key, {})
            info.update({"flops": opt.report.final.flops, "params": opt.report.final.params,
                         "max_rel_vs_original": opt.report.final.max_rel})
            if prune_rec is not None:
                info["prune_notes"] = prune_rec.notes[:3]
            info.setdefault("build_s", {})[target] = round(build_s, 2)
            built[key] = opt
            print(f"  built {name} {key:>10} for {target}: {build_s:.1f} s", flush=True)
        fns = {k: (lambda o=o: o(*inputs)) for k, o in built.items()}
        for fn in fns.values():                       # warm-up
            for _ in range(args.warmup):
                fn()
        stats = time_interleaved(fns, rounds=args.repeat, slice_s=0.2, budget_s=args.budget)
        base_ms = stats["base"]["median_ms"]
        base_flops = result["variants"]["base"]["flops"]
        for k, st in stats.items():
            info = result["variants"][k]
            ms = st["median_ms"]
            ratio = base_flops / info["flops"]
            info.setdefault("ms", {})[target] = round(ms, 3)
            info.setdefault("samples", {})[target] = st["samples"]
            info.setdefault("speedup", {})[target] = round(base_ms / ms, 3)
            info["flops_ratio"] = round(ratio, 3)
            info["flops_reduction"] = round(1 - 1 / ratio, 4)
            info.setdefault("efficiency", {})[target] = round(base_ms / ms / ratio, 3)
    return result


def table(res: dict, targets: list[str]) -> str:
    head = ["variant", "GFLOPs", "FLOPs cut", "params M"]
    for t in targets:
        head += [f"{t} ms", f"{t} speedup", f"{t} eff."]
    rows = [head]
    for k, v in res["variants"].items():
        row = [k, f"{v['flops'] / 1e9:.3f}", f"{v['flops_reduction']:.1%}", f"{v['params'] / 1e6:.2f}"]
        for t in targets:
            row += [f"{v['ms'][t]:.2f}", f"{v['speedup'][t]:.2f}x", f"{v['efficiency'][t]:.2f}"]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet18,mobilenet_v2")
    ap.add_argument("--reductions", default="0.3,0.5", help="FLOPs fractions to remove")
    ap.add_argument("--targets", default="torch,x86")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--criterion", default="l1")
    ap.add_argument("--scope", default="layer")
    ap.add_argument("--multiple", type=int, default=None,
                    help="channel multiple (default: the compiled target's float32 vector width)")
    ap.add_argument("--repeat", type=int, default=10, help="timing rounds (each times every variant)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--budget", type=float, default=240.0, help="seconds of timing per model and target")
    ap.add_argument("--threads", type=int, default=0, help="torch and TVM threads (0: physical cores)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    args.reductions = [float(r) for r in args.reductions.split(",") if r]
    args.targets = [t for t in args.targets.split(",") if t]
    set_threads(args.threads or physical_cores())
    os.makedirs(args.out, exist_ok=True)
    for name in [m for m in args.models.split(",") if m]:
        print(f"== {name}", flush=True)
        res = bench_model(name, args)
        path = os.path.join(args.out, f"prune_{name}.json")
        with open(path, "w") as f:
            json.dump(res, f, indent=1)
        print(table(res, args.targets))
        print(f"(efficiency = speedup / FLOPs ratio; goal >= 0.8)  -> {path}\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
