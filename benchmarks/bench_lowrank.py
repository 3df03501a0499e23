"""Low-rank factorization, measured: FLOPs, params, output error and latency of lowrank(energy=0.9).

    python benchmarks/bench_lowrank.py                          # mlp and encoder, torch and x86 targets
    python benchmarks/bench_lowrank.py --models mlp --targets torch --repeats 50
    python benchmarks/bench_lowrank.py --alpha 0.7 --energy 0.9 --out benchmarks/results

Models (random init: nothing can be downloaded):
  mlp      1024-4096-4096-1000 MLP, batch 1
  encoder  BERT-style encoder (graphopt.models.BertStyleEncoder): hidden 512, 4 layers, 8 heads, FFN 2048,
           vocabulary 1000, batch 1, sequence 128
Weights, two settings per model:
  random   the random init as is. Gaussian matrices have flat singular-value spectra: keeping 90% of the
           energy needs ~70% of the rank, which saves nothing, so lowrank rightly leaves every layer alone.
  decay    every Linear weight W = U·diag(s)·Vᵀ rebuilt with random orthogonal U, V and s_i ∝ i^-alpha
           (same Frobenius norm): a synthetic stand-in for the decaying spectra of trained weights. The
           savings therefore depend on alpha, which the output prints; they are not those of a trained model.
Variants timed (interleaved round-robin in one process so machine load hits all alike; median ms per call):
  eager            the original model in PyTorch eager
  torch-lowrank    graphopt target="torch": the factorized fx.GraphModule in PyTorch
  x86-orig         graphopt target="x86", pipeline "cleanup" (the original compiled by TVM, default schedules)
  x86-lowrank      graphopt target="x86", pipeline "cleanup,lowrank(...)"
Output error: relative L2 ‖y − y_ref‖/‖y_ref‖ and max |Δ| / max |y_ref| vs eager on held-out inputs.
Writes <out>/lowrank_<model>.json when --out is given.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import graphopt  # noqa: E402
from _common import physical_cores, set_threads, time_interleaved  # noqa: E402
from graphopt.models import MLP, BertStyleEncoder  # noqa: E402


def make_model(name: str):
    torch.manual_seed(0)
    if name == "mlp":
        return MLP((1024, 4096, 4096, 1000)).eval(), lambda n: torch.randn(n, 1024)
    if name == "encoder":
        model = BertStyleEncoder(vocab=1000, hidden=512, layers=4, heads=8, ffn=2048, max_len=128).eval()
        return model, lambda n: torch.randint(0, 1000, (n, 128))
    raise SystemExit(f"unknown model {name!r}: use mlp, encoder")


def impose_spectrum(model: nn.Module, alpha: float, seed: int = 0) -> nn.Module:
    """Rebuild every Linear weight with singular values ∝ i^-alpha (same Frobenius norm), in place."""
    g = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            out_f, in_f = mod.weight.shape
            k = min(out_f, in_f)
            u, _ = torch.linalg.qr(torch.randn(out_f, k, generator=g))
            v, _ = torch.linalg.qr(torch.randn(in_f, k, generator=g))
            s = torch.arange(1, k + 1, dtype=torch.float32) ** -alpha
            s *= mod.weight.detach().norm() / s.norm()
            with torch.no_grad():
                mod.weight.copy_((u * s) @ v.T)
    return model


def errors(got: torch.Tensor, ref: torch.Tensor) -> dict:
    got, ref = got.detach().double(), ref.detach().double()
    return {"rel_l2": float((got - ref).norm() / ref.norm()),
            "max_rel": float((got - ref).abs().max() / ref.abs().max())}


def time_round_robin(fns: dict, x: tuple, rounds: int) -> dict:
    """Median ms per call of each fn, timed interleaved (benchmarks/_common.time_interleaved: a block of calls
    per fn and round, one untimed call first so the previous runtime's spinning thread pool is not timed)."""
    stats = time_interleaved({k: (lambda fn=fn: fn(*x)) for k, fn in fns.items()}, rounds=rounds, slice_s=0.2)
    return {k: v["median_ms"] for k, v in stats.items()}


def run(name: str, weights: str, args) -> dict:
    model, gen = make_model(name)
    if weights == "decay":
        impose_spectrum(model, args.alpha)
    x = (gen(1),)
    held_out = [(gen(1),) for _ in range(4)]
    spec = f"lowrank(energy={args.energy}" + (",data_aware=true" if args.data_aware else "") + ")"
    calib = [gen(1) for _ in range(args.calib)] if args.data_aware else None
    result = {"model": name, "weights": weights, "alpha": args.alpha if weights == "decay" else None,
              "pipeline": f"cleanup,{spec}", "threads": torch.get_num_threads()}

    start = time.perf_counter()
    opt = graphopt.optimize(model, target="torch", pipeline=f"cleanup,{spec}", example_inputs=x,
                            calibration=calib)
    result["optimize_s"] = round(time.perf_counter() - start, 2)
    orig, final = opt.report.records[0], opt.report.final
    result.update(flops_before=orig.flops, flops_after=final.flops, params_before=orig.params,
                  params_after=final.params, layers_factorized=len(final.details),
                  ranks={d["layer"]: f'{d["rank"]}/{d["full_rank"]}' for d in final.details})
    with torch.no_grad():
        pairs = [(opt(*h), model(*h)) for h in held_out]
    errs = [errors(a, b) for a, b in pairs]
    result["output_error"] = {k: max(e[k] for e in errs) for k in errs[0]}

    fns = {"eager": model, "torch-lowrank": opt}
    if "x86" in args.targets:
        try:
            t0 = time.perf_counter()
            base_x86 = graphopt.optimize(model, target="x86", pipeline="cleanup", example_inputs=x)
            # the factorized graph from above, compiled (the pass itself is not run twice)
            lr_x86 = graphopt.optimize(opt.graph_module, target="x86", pipeline=[], example_inputs=x)
            result["x86_build_s"] = round(time.perf_counter() - t0, 1)
            result["x86_schedule"] = lr_x86.report.backend.get("schedule")
            with torch.no_grad():
                result["x86_output_error"] = errors(lr_x86(*held_out[0]), model(*held_out[0]))
            fns["x86-orig"], fns["x86-lowrank"] = base_x86, lr_x86
        except Exception as e:                        # report, don't hide: the torch figures still stand
            result["x86_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    with torch.no_grad():
        result["latency_ms"] = {k: round(v, 3) for k, v in time_round_robin(fns, x, args.repeats).items()}
    lat = result["latency_ms"]
    result["speedup"] = {"torch-lowrank vs eager": round(lat["eager"] / lat["torch-lowrank"], 2)}
    if "x86-lowrank" in lat:
        result["speedup"]["x86-lowrank vs x86-orig"] = round(lat["x86-orig"] / lat["x86-lowrank"], 2)
        result["speedup"]["x86-lowrank vs eager"] = round(lat["eager"] / lat["x86-lowrank"], 2)
    return result


def show(r: dict) -> None:
    head = f"== {r['model']} / {r['weights']}" + (f" (alpha={r['alpha']})" if r["alpha"] else "") + \
        f" / {r['pipeline']} / {r['threads']} threads"
    print(head)
    print(f"  FLOPs  {r['flops_before'] / 1e6:9.2f}M -> {r['flops_after'] / 1e6:9.2f}M "
          f"({r['flops_after'] / r['flops_before']:.3f}x)")
    print(f"  params {r['params_before'] / 1e6:9.2f}M -> {r['params_after'] / 1e6:9.2f}M "
          f"({r['params_after'] / r['params_before']:.3f}x)   layers factorized: {r['layers_factorized']}")
    if r["ranks"]:
        items = list(r["ranks"].items())
        print("  ranks  " + ", ".join(f"{k} {v}" for k, v in items[:6]) + (" ..." if len(items) > 6 else ""))
    e = r["output_error"]
    print(f"  output error vs eager: rel L2 {e['rel_l2']:.4f}, max|Δ|/max|y| {e['max_rel']:.4f}")
    if "x86_error" in r:
        print(f"  x86: {r['x86_error']}")
    print("  latency (median ms): " + ", ".join(f"{k} {v:.3f}" for k, v in r["latency_ms"].items()))
    print("  speedup: " + ", ".join(f"{k} {v:.2f}x" for k, v in r["speedup"].items()))
    print(f"  optimize (torch) {r['optimize_s']}s" + (f", x86 builds {r['x86_build_s']}s" if "x86_build_s" in r
                                                       else ""))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="mlp,encoder")
    p.add_argument("--weights", default="random,decay", help="random, decay or both")
    p.add_argument("--targets", default="torch,x86", help="torch is always measured; add x86 for TVM")
    p.add_argument("--energy", type=float, default=0.9)
    p.add_argument("--alpha", type=float, default=0.6, help="singular values ∝ i^-alpha for 'decay'")
    p.add_argument("--data-aware", action="store_true", help="lowrank(data_aware=true) on random inputs")
    p.add_argument("--calib", type=int, default=8, help="calibration batches for --data-aware")
    p.add_argument("--repeats", type=int, default=10, help="timing rounds (each times every variant)")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    args.targets = args.targets.split(",")
    set_threads(physical_cores())
    for name in args.models.split(","):
        for weights in args.weights.split(","):
            r = run(name, weights, args)
            show(r)
            if args.out:
                os.makedirs(args.out, exist_ok=True)
                path = os.path.join(args.out, f"lowrank_{name}_{weights}.json")
                with open(path, "w") as f:
                    json.dump(r, f, indent=1)
            sys.stdout.flush()


if __name__ == "__main__":
    main()
