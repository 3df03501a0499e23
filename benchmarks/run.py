"""graphopt against its peers, measured side by side in one run: latency, GFLOP/s, fraction of machine peak.

    python benchmarks/run.py                                   # resnet18, mobilenet_v2, bert_base, mlp; batch 1, 8
    python benchmarks/run.py --models resnet18,mlp --batches 1 --tune 0 --out benchmarks/results
    python benchmarks/run.py --tune 256 --database ~/.cache/graphopt/bench-records   # + tuned variant
    python benchmarks/run.py --config benchmarks/configs/default.json

Variants (every one measured in this process, on the same inputs):
  eager            PyTorch eager, float32, torch.no_grad
  torch.compile    torch.compile(model) (default mode); its first call (compilation) is reported as compile_s
  ort              ONNX Runtime float32, CPU execution provider, all graph optimizations
  graphopt         graphopt.optimize(model, target, pipeline) untuned: graphopt's default schedules
  graphopt-tuned   the same with tune={"trials": N, "database": D} (--tune N > 0); records are reused across
                   runs, so a second run reports ~0 tuning seconds and 0 new trials

Timing: every variant is warmed up, then timed in blocks of --calls calls, the blocks of all variants taking
turns for --rounds rounds (so load drift on a shared machine hits every variant alike, while each block runs
one runtime alone: the thread pools of torch, ORT and TVM spin after a call, and calls interleaved one by one
slow each other down). Reported: median, p10, p90 ms per call over all calls. Threads: every runtime uses the
machine's physical core count. Peak: float32 GEMM (numpy, 2048^3, best of 5) measured at the start of the run;
"% peak" is model GFLOP/s over it. Correctness: max |Δ| of every variant's output vs eager; a relative
difference above 1e-3 is flagged "DIFF" in the table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import graphopt  # noqa: E402
from graphopt.backends.targets import physical_cores  # noqa: E402
from graphopt.models import get_model  # noqa: E402

DEFAULTS = {
    "models": ["resnet18", "mobilenet_v2", "bert_base", "mlp"],
    "batches": [1, 8],
    "pipeline": "fold_bn,cleanup",
    "target": "x86",
    "variants": ["eager", "torch.compile", "ort", "graphopt", "graphopt-tuned"],
    "tune": 0,
    "database": None,
    "rounds": 5,
    "calls": 5,
    "pipelines": {},          # per-model pipeline overrides: {"bert_base": "cleanup"}
}


# ---------------------------------------------------------------------------------------------- helpers
def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


def machine_peak_gflops(threads: int) -> float:
    """float32 GEMM GFLOP/s with numpy (2048^3), best of 5: the machine's practical compute peak."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        threadpool_limits = None
    n = 2048
    a = np.random.rand(n, n).astype(np.float32)
    b = np.random.rand(n, n).astype(np.float32)

    def run():
        a @ b
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t)
        return 2 * n ** 3 / best / 1e9

    if threadpool_limits is not None:
        with threadpool_limits(limits=threads):
            return run()
    return run()


def to_tensor(out):
    if isinstance(out, (tuple, list)):
        out = out[0]
    if isinstance(out, dict):
        out = next(iter(out.values()))
    return out.detach().float() if isinstance(out, torch.Tensor) else torch.as_tensor(np.asarray(out)).float()


def time_blocks(fns: dict, inputs: tuple, rounds: int, calls: int) -> dict[str, list[float]]:
    times = {k: [] for k in fns}
    with torch.no_grad():
        for k, fn in fns.items():              # warm-up
            for _ in range(2):
                fn(*inputs)
        for _ in range(rounds):
            for k, fn in fns.items():
                for _ in range(calls):
                    t = time.perf_counter()
                    fn(*inputs)
                    times[k].append((time.perf_counter() - t) * 1e3)
    return times


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(q * (len(xs) - 1)))))]


# ---------------------------------------------------------------------------------------------- variants
def make_ort(model, inputs, tmpdir, threads):
    import onnxruntime as ort

    path = os.path.join(tmpdir, "model.onnx")
    names = [f"in{i}" for i in range(len(inputs))]
    with torch.no_grad():
        torch.onnx.export(model, inputs, path, input_names=names, output_names=["out"], dynamo=False)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])

    def run(*xs):
        return torch.from_numpy(sess.run(None, {n: x.numpy() for n, x in zip(names, xs)})[0])

    return run


def bench(name: str, batch: int, cfg: dict, peak: float, threads: int) -> dict:
    model, inputs = get_model(name, batch=batch)
    pipeline = cfg["pipelines"].get(name, cfg["pipeline"])
    res = {"model": name, "batch": batch, "pipeline": pipeline, "input": [list(x.shape) for x in inputs],
           "variants": {}}
    with torch.no_grad():
        reference = to_tensor(model(*inputs))
    fns, info = {}, {}

    def add(variant, build):
        if variant not in cfg["variants"]:
            return
        t = time.perf_counter()
        try:
            fn, extra = build()
            with torch.no_grad():
                first = time.perf_counter()
                out = to_tensor(fn(*inputs))
                first_s = time.perf_counter() - first
            diff = (out - reference).abs().max().item()
            scale = reference.abs().max().item() or 1.0
            info[variant] = {"build_s": round(time.perf_counter() - t - first_s, 2), "first_call_s": round(first_s, 3),
                             "max_abs_diff": diff, "rel_diff": diff / scale, **extra}
            fns[variant] = fn
            print(f"  {name} b{batch}: {variant} ready ({info[variant]['build_s']} s build, "
                  f"{first_s:.2f} s first call, max|Δ| {diff:.2e})", flush=True)
        except Exception as e:                            # a failing peer is reported, the run goes on
            info[variant] = {"error": first_line(e)}
            print(f"  {name} b{batch}: {variant} FAILED: {first_line(e)}", flush=True)
            if os.environ.get("GRAPHOPT_BENCH_TRACEBACK"):
                traceback.print_exc()

    add("eager", lambda: (model, {}))
    add("torch.compile", lambda: (torch.compile(model), {}))
    tmpdir = tempfile.mkdtemp(prefix="graphopt-bench-")
    add("ort", lambda: (make_ort(model, inputs, tmpdir, threads), {}))

    flops = None

    def build_graphopt(tune):
        nonlocal flops
        opt = graphopt.optimize(model, target=cfg["target"], pipeline=pipeline, example_inputs=inputs, tune=tune)
        flops = opt.report.records[0].flops
        extra = {"kernels": opt.report.backend.get("kernels"),
                 "flops_after_pipeline": opt.report.final.flops}
        if tune:
            t = opt.report.backend.get("tuning", {})
            extra.update({"tuning_s": t.get("seconds"), "new_trials": t.get("new_trials"),
                          "reused_records": t.get("reused_records")})
        return opt, extra

    add("graphopt", lambda: build_graphopt(None))
    if cfg["tune"] > 0:
        tune = {"trials": cfg["tune"]}
        if cfg["database"]:
            tune["database"] = os.path.expanduser(cfg["database"])
        add("graphopt-tuned", lambda: build_graphopt(tune))

    if flops is None:
        from graphopt.analysis.flops import count_flops
        from graphopt.capture import capture

        flops = count_flops(capture(model, inputs).gm)
    res["gflop"] = flops / 1e9
    times = time_blocks(fns, inputs, cfg["rounds"], cfg["calls"])
    for v in info:
        entry = dict(info[v])
        if v in times and times[v]:
            med = statistics.median(times[v])
            entry.update({"median_ms": med, "p10_ms": pct(times[v], 0.1), "p90_ms": pct(times[v], 0.9),
                          "gflops": flops / med / 1e6, "pct_peak": 100 * flops / med / 1e6 / peak})
        res["variants"][v] = entry
    peers = [p for p in ("eager", "torch.compile", "ort") if "median_ms" in res["variants"].get(p, {})]
    for v, e in res["variants"].items():
        if "median_ms" in e:
            e["ratio_to"] = {p: e["median_ms"] / res["variants"][p]["median_ms"] for p in peers}
    return res


# ----------------------------------------------------------------------------------------------- output
def print_table(res: dict) -> None:
    peers = [p for p in ("eager", "torch.compile", "ort") if "median_ms" in res["variants"].get(p, {})]
    print(f"\n{res['model']} batch {res['batch']} ({res['gflop']:.3f} GFLOP; pipeline {res['pipeline']})")
    head = f"  {'variant':15s} {'median ms':>10s} {'p10':>8s} {'p90':>8s} {'GFLOP/s':>8s} {'% peak':>7s} " + \
        " ".join(f"{'x ' + p:>15s}" for p in peers) + f" {'build s':>8s} {'tune s':>7s}  check"
    print(head)
    for v, e in res["variants"].items():
        if "error" in e:
            print(f"  {v:15s} FAILED: {e['error']}")
            continue
        if "median_ms" not in e:
            continue
        ratios = " ".join(f"{e['ratio_to'][p]:15.2f}" for p in peers)
        tune_s = e.get("tuning_s")
        check = "DIFF" if e["rel_diff"] > 1e-3 else "ok"
        print(f"  {v:15s} {e['median_ms']:10.3f} {e['p10_ms']:8.3f} {e['p90_ms']:8.3f} {e['gflops']:8.1f} "
              f"{e['pct_peak']:7.1f} {ratios} {e['build_s']:8.1f} {'' if tune_s is None else f'{tune_s:7.1f}':>7s}"
              f"  {check} (max|Δ| {e['max_abs_diff']:.1e})")


def load_config(path: str | None) -> dict:
    cfg = json.loads(json.dumps(DEFAULTS))
    if path:
        with open(path, encoding="utf-8") as f:
            user = json.load(f)
        unknown = sorted(set(user) - set(DEFAULTS))
        if unknown:
            raise SystemExit(f"{path}: unknown key(s) {unknown}; known: {sorted(DEFAULTS)}")
        cfg.update(user)
    return cfg


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="JSON file with any of: " + ", ".join(DEFAULTS))
    ap.add_argument("--models")
    ap.add_argument("--batches")
    ap.add_argument("--pipeline")
    ap.add_argument("--target")
    ap.add_argument("--variants", help="comma list of " + ",".join(DEFAULTS["variants"]))
    ap.add_argument("--tune", type=int, help="MetaSchedule trials for graphopt-tuned (0: skip it)")
    ap.add_argument("--database", help="tuning record directory (default: graphopt's per-target cache)")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--calls", type=int)
    ap.add_argument("--out", help="directory for run.json")
    args = ap.parse_args(argv)
    cfg = load_config(args.config)
    for key in ("models", "batches", "variants"):
        value = getattr(args, key)
        if value:
            cfg[key] = [int(v) if key == "batches" else v for v in value.split(",") if v]
    for key in ("pipeline", "target", "tune", "database", "rounds", "calls"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    unknown = sorted(set(cfg["variants"]) - set(DEFAULTS["variants"]))
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; known: {DEFAULTS['variants']}")

    threads = physical_cores()
    torch.set_num_threads(threads)
    peak = machine_peak_gflops(threads)
    import tvm

    try:
        import onnxruntime
        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = "not installed"
    header = {"cpu": _cpu_name(), "threads": threads, "peak_gflops": peak, "torch": torch.__version__,
              "tvm": tvm.__version__, "onnxruntime": ort_version, "graphopt": graphopt.__version__,
              "python": platform.python_version(), "config": cfg}
    print(f"{header['cpu']}, {threads} threads for every runtime; measured fp32 GEMM peak {peak:.1f} GFLOP/s")
    print(f"torch {header['torch']}, TVM {header['tvm']}, onnxruntime {ort_version}; target {cfg['target']}")
    results = []
    for name in cfg["models"]:
        for batch in cfg["batches"]:
            res = bench(name, batch, cfg, peak, threads)
            print_table(res)
            results.append(res)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "run.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"machine": header, "results": results}, f, indent=1)
        print(f"\n-> {path}")
    return 0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    sys.exit(main())
