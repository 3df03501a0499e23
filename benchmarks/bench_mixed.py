"""Mixed precision vs uniform int8, measured: size, output error and compiled latency, one run.

    python benchmarks/bench_mixed.py                                   # encoder (small) + resnet18, host target
    python benchmarks/bench_mixed.py --models encoder --sensitivity hessian
    python benchmarks/bench_mixed.py --target x86:haswell              # the AVX2 kernels on any newer x86

Variants per model (all compiled for the target in this process; latencies timed interleaved round-robin, so
load changes on a shared machine hit every variant alike; median ms per call at batch 1):
  fp32        our float32 build (the model's fold pipeline)
  int8        uniform int8: + quantize (static: every Linear, Conv2d and activation matmul)
  mixed@err   + quantize(bits=mixed,budget=error:E), E = int8's output error on the calibration batches the
              pass measures on: the smallest model at int8's error
  mixed@size  + quantize(bits=mixed,budget=size:<int8's bytes>B): the lowest error at int8's size
  mixed@size+lat  budget=[size:<int8's bytes>B,latency:<int8's ms>ms]: the lowest error at int8's size and
              no more summed per-layer kernel time than int8's (+1e-6, float rounding; graphopt.backends.tvm.layer_latency: each layer
              compiled alone per choice and timed with kernel_profile; measured once, shared with the pass)
Per-layer choices: fp32, int8 static, int8 dynamic, int8 weight-only, int4 weight-only (groups of 128) for
Linear; fp32 or int8 static for Conv2d and matmuls (the choices the target has kernels for).
Models:
  encoder   bench_quantize's BERT-style encoder (small: 4 layers, hidden 256, seq 64), hashed real sentences
            (16 calibration, the rest held out)
  resnet18  torchvision ResNet-18 (random weights, BN folded), 224x224, random-normal inputs (8 calibration,
            4 held out)
Printed: model bytes (and vs int8), output error vs the float32 model on the held-out inputs (cosine and
relative L2 error) and on the calibration batches the budget is measured on, compiled ms and speed vs int8, the
per-choice layer counts. Writes <out>/mixed_<model>_<target>.json.
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
from graphopt.quant.mixed import mean_error  # noqa: E402


def load(name: str) -> dict:
    from bench_quantize import model_encoder, model_zoo

    return model_encoder("small") if name == "encoder" else model_zoo(name)


def per_sample(fn, xs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([fn(xs[i:i + 1]) for i in range(len(xs))])


def choice_counts(opt) -> str:
    rows = [d for r in opt.report.records if r.name.startswith("quantize") for d in r.details]
    counts: dict[str, int] = {}
    for d in rows:
        key = d.get("choice") or ("int8-static" if d.get("kind") else "?")
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{k} x{v}" for k, v in counts.items())


def int8_layer_ms(model, fold: str, example, calib_b, target: str) -> float:
    """Summed per-layer kernel ms of the uniform int8 assignment (the latency budget of mixed@size+lat)."""
    from graphopt.backends.tvm.layer_latency import layer_latencies
    from graphopt.passes.quantize import activation_dtype_for
    from graphopt.quant.mixed import MixedBuilder

    gm = graphopt.optimize(model, "torch", fold, example_inputs=example).graph_module
    b = MixedBuilder(gm, calib_b, target=target, dtype=activation_dtype_for(target))
    t = time.perf_counter()
    lat = layer_latencies(b, target)
    ms = sum(lat[(p, "int8_static")] for p in b.layers)
    print(f"  per-layer kernel timings: {len(lat)} (layer, choice) pairs in {time.perf_counter() - t:.0f} s; "
          f"int8 layers {ms:.4g} ms, fp32 layers {sum(lat[(p, 'float32')] for p in b.layers):.4g} ms", flush=True)
    return ms


def bench(name: str, args) -> dict:
    spec = load(name)
    model, example, calib, eval_x = spec["model"], spec["example"], spec["calib"], spec["eval_x"]
    fold = spec["fold"]
    calib_b = [(c,) if isinstance(c, torch.Tensor) else tuple(c) for c in calib]
    evalb = calib_b[:4]                              # the quantize pass's eval_batches (default 4)
    with torch.no_grad():
        refs_cal = [model(*b) for b in evalb]
    extra = f",sensitivity={args.sensitivity},progress=false"
    builds: dict[str, str] = {"fp32": fold, "int8": f"{fold},quantize(progress=false)"}
    opts, info = {}, {}

    def build(key: str, pipe: str):
        t = time.perf_counter()
        opt = graphopt.optimize(model, args.target, pipe, example_inputs=example, calibration=calib)
        info[key] = {"pipeline": pipe, "build_s": round(time.perf_counter() - t, 1),
                     "size_bytes": opt.report.final.size_bytes,
                     "cal_err": mean_error(opt.graph_module, evalb, refs_cal)}
        opts[key] = opt
        q = [r for r in opt.report.records if r.name.startswith("quantize")]
        if q:
            info[key]["notes"] = [n for n in q[0].notes if n.startswith("mixed precision")]
            info[key]["choices"] = choice_counts(opt) if "mixed" in pipe else "int8-static (all)"
            info[key]["layers"] = q[0].details if "mixed" in pipe else []
        print(f"  built {key}: {info[key]['build_s']} s, {info[key]['size_bytes']:,} B, calibration error "
              f"{info[key]['cal_err']:.4g}", flush=True)

    for key, pipe in builds.items():
        build(key, pipe)
    e8 = info["int8"]["cal_err"]
    build("mixed@err", f"{fold},quantize(bits=mixed,budget=error:{e8:.6g}{extra})")
    build("mixed@size", f"{fold},quantize(bits=mixed,budget=size:{info['int8']['size_bytes']}B{extra})")
    if not args.no_latency:
        lat8 = int8_layer_ms(model, fold, example, calib_b, args.target)
        info["int8"]["layer_ms"] = lat8
        build("mixed@size+lat", f"{fold},quantize(bits=mixed,budget=[size:{info['int8']['size_bytes']}B,"
                                f"latency:{lat8 * (1 + 1e-6):.9g}ms]{extra})")
    for opt in opts.values():
        with torch.no_grad():
            opt(*example)
    stats = time_interleaved({k: (lambda o=o: o(*example)) for k, o in opts.items()}, rounds=args.rounds,
                             slice_s=0.2)
    ms = {k: v["median_ms"] for k, v in stats.items()}
    ref = per_sample(model, eval_x)
    rows = {}
    for key, opt in opts.items():
        out = per_sample(opt, eval_x)
        rel = float((out.double() - ref.double()).norm() / ref.double().norm())
        cos = F.cosine_similarity(out.flatten().double(), ref.flatten().double(), dim=0).item()
        rows[key] = {"ms": round(ms[key], 3), "speed_vs_int8": round(ms["int8"] / ms[key], 2),
                     "speed_vs_fp32": round(ms["fp32"] / ms[key], 2), "cosine": round(cos, 6),
                     "rel_err": rel, **info[key]}
    mixed_rows = info["mixed@size"]["layers"]
    fixed = info["fp32"]["size_bytes"] - sum(r["float_bytes"] for r in mixed_rows)
    return {"model": name, "target": args.target, "batch": 1, "sensitivity": args.sensitivity, "rows": rows,
            "fixed_bytes": fixed,
            "eval_inputs": len(eval_x), "machine": machine_info()}


def print_result(res: dict) -> None:
    rows = res["rows"]
    print(f"\n{res['model']} (target {res['target']}, batch 1, sensitivity {res['sensitivity']}; held-out inputs: "
          f"{res['eval_inputs']})")
    fixed = res.get("fixed_bytes", 0)
    head = ["variant", "MB", "vs_int8", "layers_MB", "rel_err", "cosine", "cal_err", "ms", "speed_vs_int8", "choices"]
    s8 = rows["int8"]["size_bytes"]
    table = [head] + [[k, f"{r['size_bytes'] / 1e6:.3f}", f"{r['size_bytes'] / s8:.3f}",
                       f"{(r['size_bytes'] - fixed) / 1e6:.3f}", f"{r['rel_err']:.4g}",
                       f"{r['cosine']:.6f}", f"{r['cal_err']:.4g}", str(r["ms"]), str(r["speed_vs_int8"]),
                       r.get("choices", "fp32")] for k, r in rows.items()]
    widths = [max(len(t[i]) for t in table) for i in range(len(head))]
    for t in table:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(t, widths)))
    a, b, c = rows["int8"], rows["mixed@err"], rows["mixed@size"]
    print(f"  at int8's error ({a['cal_err']:.4g} on the calibration batches): mixed is "
          f"{a['size_bytes'] / b['size_bytes']:.2f}x smaller (held-out rel. error {b['rel_err']:.4g} vs "
          f"{a['rel_err']:.4g}), {b['speed_vs_int8']}x int8's speed")
    print(f"  at int8's size ({a['size_bytes']:,} B): mixed error {c['rel_err']:.4g} vs {a['rel_err']:.4g} held out "
          f"({a['rel_err'] / max(c['rel_err'], 1e-30):.2f}x lower), {c['cal_err']:.4g} vs {a['cal_err']:.4g} on "
          f"calibration; {c['size_bytes']:,} B; {c['speed_vs_int8']}x int8's speed")
    if "mixed@size+lat" in rows:
        d = rows["mixed@size+lat"]
        print(f"  at int8's size and summed layer kernel time ({rows['int8'].get('layer_ms', 0):.4g} ms): mixed error "
              f"{d['rel_err']:.4g} vs {a['rel_err']:.4g} held out; {d['speed_vs_int8']}x int8's speed (whole model)")
    print(f"  (layers_MB: bytes of the quantizable layers; the other {fixed / 1e6:.3f} MB - embeddings, norms - "
          f"are float32 in every variant)")
    for k in ("mixed@err", "mixed@size", "mixed@size+lat"):
        if k not in rows:
            continue
        for n in rows[k].get("notes", []):
            print(f"  [{k}] {n}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="encoder,resnet18")
    ap.add_argument("--target", default="x86")
    ap.add_argument("--sensitivity", choices=["output", "hessian"], default="output")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--no-latency", action="store_true", help="skip mixed@size+lat (per-layer compiles)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    threads = set_threads(physical_cores())
    os.makedirs(args.out, exist_ok=True)
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        print(f"{name}:", flush=True)
        res = bench(name, args)
        res["threads"] = threads
        print_result(res)
        path = os.path.join(args.out, f"mixed_{name}_{args.target.replace(':', '-')}_{args.sensitivity}.json")
        with open(path, "w") as f:
            json.dump(res, f, indent=1, default=str)


if __name__ == "__main__":
    main()
