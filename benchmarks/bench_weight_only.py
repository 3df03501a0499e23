"""Weight-only quantization, measured: int8 and int4 weight kernels against our float32 build, one run.

    python benchmarks/bench_weight_only.py                              # mlp + encoder, host target
    python benchmarks/bench_weight_only.py --target x86:haswell         # the AVX2 kernels on any newer x86
    python benchmarks/bench_weight_only.py --models mlp --group 32,128 --rounds 11
    python benchmarks/bench_weight_only.py --models encoder --threads 1 --stat p10   # on a loaded machine

Variants per model (built in this process; timings interleaved round-robin, so load changes on a shared
machine hit every variant alike; median ms per call at batch 1, or --stat p10 / min: on a machine other
processes keep busy, a 2-thread kernel waits for whichever thread was descheduled and medians move by 20%
between runs, while the 10th percentile of single calls with --threads 1 stays within a few percent):
  eager       PyTorch eager float32 (the original model)
  fp32        graphopt `cleanup` compiled for the target (our own float32 build)
  woq8        + quantize(mode=weight_only)                     int8, per output channel
  woq4-g<G>   + quantize(mode=weight_only,bits=4,group_size=G) int4, groups of G inputs (one per --group)
  woq4-g<G>-high  the same, built with precision="high" (only where the target has AVX512-BF16): the int4
              GEMV takes each input as two bfloat16 (2^-16 relative) with vdpbf16ps (backends/tvm/woq4_bf16.py)
  w4a8-g<G>   + quantize(mode=dynamic,bits=4,group_size=G)     the same int4 weights, activations int8 per
              call (per row and group): integer dot products (graphopt.quant.w4a8)
  dyn8        + quantize(mode=dynamic)                         int8 weights and per-call uint8 activations
  cluster16   + cluster(k=16) (with --cluster): weight sharing, 4-bit indices into a per-layer codebook of
              16 float32 values; its compressed model file (graphopt.compressed, zstd-coded indices) is
              written and its size printed next to the float32 weights' bytes
Models:
  mlp      graphopt.models "mlp" (1024-4096-4096-1000, batch 1: M = 1, memory-bound GEMV)
  encoder  bench_quantize's BERT-style encoder (small: 4 layers, hidden 256, seq 64 -> every Linear has
           M = 64 rows; base: BERT-base shape, seq 128), fed hashed real sentences
  <other>  a CNN of graphopt.models (e.g. mobilenet_v2, resnet50), `fold_bn,cleanup` first: weight-only and
           W4A8 take its pointwise (1x1) convs (pointwise_convs=true) and its classifier; dyn8 the classifier
Printed per model: ms, speed vs fp32 and vs woq8, cosine with the float32 model's outputs (eager, over the
evaluation inputs), and the size of the compiled weights; then the ratios the issue asks for
(int4 / int8-weight-only speed, int4 / fp32 speed; the same for W4A8, and W4A8 / dyn8), and for the MLP the
int4 GEMV against the int4 ceiling measured first (benchmarks/isa_peak.py: one thread, the kernel's
mask-convert-FMA step in registers; the time at that ceiling bounds what any int4 weight-only GEMV of this
form can gain over int8 weight-only here). Writes <out>/weight_only_<model>_<target>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import graphopt  # noqa: E402
from _common import machine_info, physical_cores, set_threads, time_interleaved  # noqa: E402
from graphopt.backends.targets import resolve_target  # noqa: E402
from graphopt.backends.tvm.woq4_bf16 import has_avx512bf16  # noqa: E402
from graphopt.models import get_model  # noqa: E402


def model_mlp():
    model, (x,) = get_model("mlp")
    g = torch.Generator().manual_seed(1)
    eval_x = torch.cat([torch.randn(x.shape, generator=g) for _ in range(8)])
    return model, (x,), eval_x


def model_encoder(size: str):
    from bench_quantize import model_encoder as enc

    spec = enc(size)
    return spec["model"], spec["example"], spec["eval_x"]


def per_sample(fn, xs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([fn(xs[i:i + 1]) for i in range(len(xs))])


def model_zoo(name: str):
    from bench_quantize import model_zoo as zoo

    spec = zoo(name)
    return spec["model"], spec["example"], spec["eval_x"]


def bench(name: str, args) -> dict:
    base, pw = "cleanup", ""
    if name == "mlp":
        model, example, eval_x = model_mlp()
    elif name == "encoder":
        model, example, eval_x = model_encoder(args.encoder)
    else:                                   # a CNN of graphopt.models: its pointwise convs and classifier
        model, example, eval_x = model_zoo(name)
        base, pw = "fold_bn,cleanup", ",pointwise_convs=true"
    builds = {"fp32": base, "woq8": f"{base},quantize(mode=weight_only{pw})"}
    bf16 = has_avx512bf16(resolve_target(args.target))
    for g in args.group:
        builds[f"woq4-g{g}"] = f"{base},quantize(mode=weight_only,bits=4,group_size={g}{pw})"
        if bf16:
            builds[f"woq4-g{g}-high"] = builds[f"woq4-g{g}"]
    builds["dyn8"] = f"{base},quantize(mode=dynamic)"
    for g in args.group:
        builds[f"w4a8-g{g}"] = f"{base},quantize(mode=dynamic,bits=4,group_size={g}{pw})"
    if args.cluster:
        builds["cluster16"] = f"{base},cluster(k=16)"
    fns, info = {"eager": model}, {}
    for key, pipe in builds.items():
        t = time.perf_counter()
        opt = graphopt.optimize(model, args.target, pipe, example_inputs=example,
                                precision="high" if key.endswith("-high") else "float32")
        info[key] = {"pipeline": pipe, "build_s": round(time.perf_counter() - t, 1),
                     "kernels": opt.report.backend.get("int8", "").split(";")[0],
                     "size_bytes": opt.report.final.size_bytes}
        fns[key] = opt
        if key == "cluster16":
            import tempfile

            from graphopt import compressed

            with tempfile.TemporaryDirectory() as d:
                path = compressed.save(opt, os.path.join(d, "model.goptz"))
                info[key]["compressed_file_bytes"] = os.path.getsize(path)
            info[key]["float32_param_bytes"] = sum(p.numel() * 4 for p in model.parameters())
        print(f"  built {key}: {info[key]['build_s']} s  {info[key]['kernels']}", flush=True)
    for fn in fns.values():
        with torch.no_grad():
            fn(*example)
    stats = time_interleaved({k: (lambda fn=fn: fn(*example)) for k, fn in fns.items()}, rounds=args.rounds,
                             slice_s=0.2)
    ms = {k: v[f"{args.stat}_ms"] for k, v in stats.items()}
    ref = per_sample(model, eval_x)
    rows = {}
    for key, fn in fns.items():
        out = ref if key == "eager" else per_sample(fn, eval_x)
        rows[key] = {"ms": round(ms[key], 3), "vs_fp32": round(ms["fp32"] / ms[key], 2),
                     "vs_woq8": round(ms["woq8"] / ms[key], 2),
                     "cosine": round(F.cosine_similarity(out.flatten().double(), ref.flatten().double(),
                                                         dim=0).item(), 6),
                     **info.get(key, {})}
    res = {"model": name, "target": args.target, "batch": 1, "stat": args.stat, "rows": rows,
           "machine": machine_info()}
    if name == "mlp" and args.int4_ceiling:
        res["int4_gemv"] = int4_against_ceiling(model, rows, args.int4_ceiling, args.threads or physical_cores(),
                                                args.int4_ceiling_high)
    return res


def int4_against_ceiling(model, rows: dict, ceiling: float, threads: int, ceiling_high: float | None = None) -> dict:
    """A batch-1 model of Linear layers (the MLP: every weight converted once per call, for one FMA): the
    woq4 rows' weights per second per thread against the int4 ceiling (G weights/s per core, isa_peak; the
    woq4-*-high rows against the vdpbf16ps step's, `ceiling_high`), and the time at that ceiling against int8
    weight-only's measured time."""
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    floor_ms = weights / (ceiling * 1e9 * threads) * 1e3
    out = {"weights": weights, "ceiling_g_per_core": round(ceiling, 1), "floor_ms": round(floor_ms, 3),
           "woq8_over_floor": round(rows["woq8"]["ms"] / floor_ms, 2)}
    floor_high = weights / (ceiling_high * 1e9 * threads) * 1e3 if ceiling_high else None
    if floor_high:
        out["high"] = {"ceiling_g_per_core": round(ceiling_high, 1), "floor_ms": round(floor_high, 3),
                       "woq8_over_floor": round(rows["woq8"]["ms"] / floor_high, 2)}
    for k, r in rows.items():
        high = k.endswith("-high")
        if k.startswith("woq4") and (not high or floor_high):
            floor = floor_high if high else floor_ms
            out[k] = {"g_weights_per_s_per_thread": round(weights / (r["ms"] * 1e-3) / threads / 1e9, 1),
                      "of_ceiling": round(floor / r["ms"], 2)}
    return out


def print_result(res: dict) -> None:
    rows = res["rows"]
    print(f"\n{res['model']} (target {res['target']}, batch 1, {res['stat']} ms, threads {res['threads']['tvm']})")
    head = ["variant", "ms", "vs_fp32", "vs_woq8", "cosine", "weights_MB"]
    table = [head] + [[k, str(r["ms"]), str(r["vs_fp32"]), str(r["vs_woq8"]), str(r["cosine"]),
                       f"{r['size_bytes'] / 1e6:.1f}" if "size_bytes" in r else ""] for k, r in rows.items()]
    widths = [max(len(t[i]) for t in table) for i in range(len(head))]
    for t in table:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(t, widths)))
    for k, r in rows.items():
        if k.startswith("woq4"):
            print(f"  {k}: int4 / int8-weight-only speed {r['vs_woq8']}x (goal >= 1.5), int4 / fp32 speed "
                  f"{r['vs_fp32']}x (goal >= 2), cosine vs float32 {r['cosine']}")
        if k.startswith("w4a8"):
            print(f"  {k}: W4A8 / int8-weight-only speed {r['vs_woq8']}x (goal >= 1.5), W4A8 / fp32 speed "
                  f"{r['vs_fp32']}x (goal >= 2), W4A8 / dyn8 speed {round(rows['dyn8']['ms'] / r['ms'], 2)}x, "
                  f"cosine vs float32 {r['cosine']}")
    print(f"  woq8: int8-weight-only / fp32 speed {rows['woq8']['vs_fp32']}x (goal >= 1.0)")
    c = res.get("int4_gemv")
    if c:
        for k, r in c.items():
            if k.startswith("woq4"):
                top = c["high"] if k.endswith("-high") else c
                print(f"  {k}: {c['weights'] / 1e6:.1f} M weights at {r['g_weights_per_s_per_thread']} G/s per "
                      f"thread, {r['of_ceiling']:.0%} of its int4 ceiling ({top['ceiling_g_per_core']} G/s per core); "
                      f"at the ceiling {top['floor_ms']} ms, {top['woq8_over_floor']}x faster than woq8 here")
    if "cluster16" in rows:
        r = rows["cluster16"]
        print(f"  cluster16: compressed file {r['compressed_file_bytes']:,} B vs float32 parameters "
              f"{r['float32_param_bytes']:,} B ({r['float32_param_bytes'] / r['compressed_file_bytes']:.1f}x "
              f"smaller), speed vs fp32 {r['vs_fp32']}x, cosine {r['cosine']}")
    for k, r in rows.items():
        if r.get("kernels"):
            print(f"  [{k}] {r['kernels']}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mlp,encoder")
    ap.add_argument("--target", default="x86")
    ap.add_argument("--encoder", choices=["small", "base"], default="small")
    ap.add_argument("--group", default="128", help="int4 group sizes, comma-separated")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--cluster", action="store_true", help="also build cluster(k=16) and its compressed file")
    ap.add_argument("--threads", type=int, default=0, help="threads (default: the physical cores)")
    ap.add_argument("--stat", choices=["median", "p10", "min"], default="median",
                    help="per-call statistic the table and ratios use")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    args.group = [int(g) for g in args.group.split(",") if g.strip()]
    if args.threads:            # graphopt's import already set TVM_NUM_THREADS (physical cores) by default
        os.environ["TVM_NUM_THREADS"] = str(args.threads)
    args.int4_ceiling = args.int4_ceiling_high = None
    if "mlp" in args.models.split(","):
        import isa_peak

        m = isa_peak.measure(int4_only=True)       # before the thread pools start: one thread, an idle machine
        print(isa_peak.summary_int4(m), flush=True)
        from graphopt.backends.tvm.weight_only import lanes_for

        spec = resolve_target(args.target)
        path = "avx512" if spec.arch == "x86_64" and lanes_for(spec)[0] == 16 else "avx2"
        args.int4_ceiling = next((p["weights"] for p in m.get("int4", []) if p["path"] == path), None)
        args.int4_ceiling_high = next((p["weights"] for p in m.get("int4", []) if p["path"] == "avx512bf16"
                                       and has_avx512bf16(spec)), None)
    threads = set_threads(args.threads or physical_cores())
    os.makedirs(args.out, exist_ok=True)
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        print(f"{name}:", flush=True)
        res = bench(name, args)
        res["threads"] = threads
        print_result(res)
        path = os.path.join(args.out, f"weight_only_{name}_{args.target.replace(':', '-')}.json")
        with open(path, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
