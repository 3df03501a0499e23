"""Peer benchmark: graphopt (untuned and tuned) against PyTorch eager, torch.compile and ONNX Runtime, one run.

    python benchmarks/run.py                                       # benchmarks/configs/default.json
    python benchmarks/run.py --models resnet18,mlp --batches 1,8 --tune 256 --out benchmarks/results
    python benchmarks/run.py --models mlp,resnet18 --batches 1 --tune 0 --image 64     # a quick check
    python benchmarks/run.py --pipeline "fold_bn,cleanup" --variants graphopt,eager,ort

Models (random weights, nothing downloaded; graphopt.models): resnet18, mobilenet_v2 (3x224x224; --image N
for N×N), bert_base (BERT-base shape, int64 token ids at sequence 128; --seq N), mlp (1024-4096-4096-1000),
and any other name graphopt.models knows. Each model runs at every batch in --batches.

Variants, all built and measured in this process:
  graphopt        graphopt.optimize(model, target="x86", pipeline=P, example_inputs=x)  (default schedules)
  graphopt-tuned  the same with tune={"trials": N, "database": D}  (--tune N; 0 skips it). Records are kept in
                  D and reused: a second run tunes nothing new; we report its tuning seconds and new trials.
  graphopt-winograd  the untuned build with precision="winograd" (x86: 3x3 stride-1 convolutions as Winograd
                  F(4x4, 3x3) / F(2x2, 3x3); approximate, ~1e-5 relative per convolution; not in the default
                  variants: ask for it with --variants)
  eager           PyTorch eager, eval(), torch.no_grad()
  torch.compile   torch.compile(model) (default mode); compile time = its first call
  ort             ONNX Runtime fp32: torch.onnx.export to a temp file, CPU execution provider,
                  graph optimizations ORT_ENABLE_ALL, intra-op threads = physical cores
Every runtime uses as many threads as the machine has physical cores (PyTorch, TVM's runtime pool via
TVM_NUM_THREADS, ORT's intra-op pool, BLAS for the peak).

Timing: all variants of one model/batch are timed interleaved round-robin (each round runs every variant for
~--slice seconds), so load changes on a shared machine hit every variant alike. We report per-call median,
p10 and p90 latency; ratio to each peer (variant ms / peer ms: below 1 is faster than that peer); GFLOP/s
(model FLOPs from graphopt.analysis, i.e. 2 x MACs of conv/linear/matmul, / median seconds) and its fraction
of the machine's float32 peak, measured in this run (2048² GEMMs with numpy's BLAS and torch.mm at the same
thread count, at the start, before each case's timing and at the end: the best of all, as load only lowers
it). Correctness: max |Δ| of each variant's output vs eager on the same input; a variant whose
max |Δ| / max |eager output| exceeds --rtol (1e-3) is flagged "DIFF".
A variant that fails (build, export, compile or run) is reported with the first line of its error; the
run goes on. Writes <out>/<--json> (default run.json) after every model/batch and prints a table.

Pipelines: --pipeline, else the config's "pipelines"[model], else its "pipeline", else "fold_bn,cleanup".
Config (JSON or TOML; keys as the long options, e.g. "models", "batches", "tune", "rounds") supplies
defaults; options given on the command line win.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import math
import os
import sys
import tempfile
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from _common import (first_line, format_table, gemm_peak_gflops, machine_info, physical_cores,  # noqa: E402
                     set_threads, time_interleaved)

ALL_VARIANTS = ["graphopt", "graphopt-tuned", "eager", "torch.compile", "ort"]
OPTIONAL_VARIANTS = ["graphopt-winograd"]
PEERS = ["eager", "torch.compile", "ort"]
DEFAULT_CONFIG = os.path.join(HERE, "configs", "default.json")
BUILTIN = {"models": "resnet18,mobilenet_v2,bert_base,mlp", "batches": "1,8", "pipeline": "fold_bn,cleanup",
           "tune": 64, "database": None, "variants": ",".join(ALL_VARIANTS), "rounds": 10, "slice": 0.25, "calls": 0,
           "budget": 120.0, "rtol": 1e-3, "image": None, "seq": None, "threads": 0, "target": "x86",
           "peak_size": 2048,
           "json": "run.json", "out": os.path.join(HERE, "results")}


# ------------------------------------------------------------------------------------------ config
def load_config(path: str | None) -> dict:
    if not path:
        return {}
    if not os.path.exists(path):
        sys.exit(f"run.py: config file {path!r} does not exist")
    with open(path, "rb") as f:
        if path.endswith(".toml"):
            import tomllib

            cfg = tomllib.load(f)
        else:
            cfg = json.loads(f.read().decode())
    if not isinstance(cfg, dict):
        sys.exit(f"run.py: config {path!r} must hold an object/table of options")
    unknown = set(cfg) - set(BUILTIN) - {"pipelines", "description"}
    if unknown:
        sys.exit(f"run.py: config {path!r} has unknown keys {sorted(unknown)}; known: "
                 f"{sorted(set(BUILTIN) | {'pipelines', 'description'})}")
    return cfg


def _csv(v) -> list[str]:
    if isinstance(v, (list, tuple)):
        return [str(x).strip() for x in v if str(x).strip()]
    return [x.strip() for x in str(v).split(",") if x.strip()]


def resolve_options(args: argparse.Namespace) -> dict:
    cfg = load_config(args.config)
    opts = {}
    for key, default in BUILTIN.items():
        cli = getattr(args, key)
        opts[key] = cli if cli is not None else cfg.get(key, default)
    opts["models"] = _csv(opts["models"])
    opts["batches"] = [int(b) for b in _csv(opts["batches"])]
    opts["variants"] = _csv(opts["variants"])
    bad = [v for v in opts["variants"] if v not in ALL_VARIANTS + OPTIONAL_VARIANTS]
    if bad:
        sys.exit(f"run.py: unknown variant(s) {bad}; known: {ALL_VARIANTS + OPTIONAL_VARIANTS}")
    opts["tune"] = int(opts["tune"])
    opts["pipelines"] = {} if args.pipeline is not None else dict(cfg.get("pipelines", {}))
    opts["config"] = args.config
    return opts


def pipeline_for(model: str, opts: dict) -> str:
    return opts["pipelines"].get(model, opts["pipeline"])


# ------------------------------------------------------------------------------------------ models
def make_model(name: str, batch: int, image: int | None, seq: int | None):
    """(model, inputs) from graphopt.models at `batch`; --image / --seq replace the input's spatial size /
    sequence length (the models accept any: adaptive pooling; positions up to 512)."""
    import torch

    from graphopt.models import get_model

    model, inputs = get_model(name, batch=batch)
    x = inputs[0]
    g = torch.Generator().manual_seed(1)
    if image and x.dim() == 4:
        inputs = (torch.randn(batch, x.shape[1], image, image, generator=g),)
    elif seq and x.dim() == 2 and not x.is_floating_point():
        vocab = int(x.max()) + 1
        emb = getattr(model, "tokens", None)
        if emb is not None:
            vocab = emb.num_embeddings
        inputs = (torch.randint(0, vocab, (batch, seq), generator=g),)
    return model.eval(), tuple(inputs)


def model_flops(model, inputs) -> int | None:
    from graphopt.analysis import count_flops
    from graphopt.capture import capture

    try:
        return int(count_flops(capture(model, inputs).gm))
    except Exception as e:
        print(f"  (FLOPs unavailable: {first_line(e)})", flush=True)
        return None


def _flat(out):
    import torch
    from torch.utils import _pytree as pytree

    if isinstance(out, torch.Tensor):
        return [out]
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def compare(out, ref) -> dict:
    """max |Δ| and max |Δ| / max |ref| over all output tensors."""
    import torch

    got, want = _flat(out), _flat(ref)
    if len(got) != len(want):
        raise RuntimeError(f"{len(got)} outputs, eager has {len(want)}")
    max_abs, scale = 0.0, 0.0
    for g, w in zip(got, want):
        g = torch.as_tensor(g).detach().to(torch.float64).reshape(w.shape)
        w = w.detach().to(torch.float64)
        max_abs = max(max_abs, float((g - w).abs().max()) if w.numel() else 0.0)
        scale = max(scale, float(w.abs().max()) if w.numel() else 0.0)
    return {"max_abs_diff": max_abs, "rel_diff": max_abs / scale if scale > 0 else max_abs}


# ------------------------------------------------------------------------------------------ variants
def build_graphopt(model, inputs, pipeline: str, target: str, tune, precision: str = "float32") -> tuple:
    import graphopt

    t = time.perf_counter()
    opt = graphopt.optimize(model, target=target, pipeline=pipeline, example_inputs=inputs, tune=tune,
                            precision=precision)
    info = {"compile_s": time.perf_counter() - t, "pipeline": pipeline}
    be = opt.report.backend
    info["backend"] = {k: be[k] for k in ("schedule", "capture", "lower_s", "schedule_s", "build_s", "vm_init_s",
                                          "precision") if k in be}
    tuning = be.get("tuning")
    if tuning:
        info.update({"tuning_s": float(tuning.get("seconds", 0.0)), "new_trials": tuning.get("new_trials", 0),
                     "reused_records": tuning.get("reused_records", 0), "tuning": dict(tuning)})
    return (lambda: opt(*inputs)), info


def build_eager(model, inputs) -> tuple:
    return (lambda: model(*inputs)), {"compile_s": 0.0}


def build_compile(model, inputs) -> tuple:
    import torch

    torch._dynamo.reset()                  # fresh caches: no shape-generalized (dynamic) recompiles across batches
    compiled = torch.compile(copy.deepcopy(model))
    return (lambda: compiled(*inputs)), {"compile_s": None}   # compile happens at the first call (measured then)


def build_ort(model, inputs, threads: int, tmpdir: str) -> tuple:
    import onnxruntime as ort
    import torch

    t = time.perf_counter()
    path = os.path.join(tmpdir, "model.onnx")
    names = [f"input_{i}" for i in range(len(inputs))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, inputs, path, input_names=names, dynamo=False)
    ort.set_default_logger_severity(3)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    feed = {i.name: x.numpy() for i, x in zip(sess.get_inputs(), inputs)}
    info = {"compile_s": time.perf_counter() - t, "onnx_bytes": os.path.getsize(path),
            "providers": sess.get_providers()}

    def run():
        return [torch.from_numpy(a) for a in sess.run(None, feed)]
    return run, info


# ------------------------------------------------------------------------------------------ one case
def run_case(name: str, batch: int, opts: dict, threads: int, measure_peak) -> dict:
    import torch

    model, inputs = make_model(name, batch, opts["image"], opts["seq"])
    pipeline = pipeline_for(name, opts)
    case = {"model": name, "batch": batch, "inputs": [[list(x.shape), str(x.dtype)] for x in inputs],
            "pipeline": pipeline, "flops": model_flops(model, inputs), "variants": {}, "skipped": {}}
    case["gflop"] = case["flops"] / 1e9 if case["flops"] else None
    print(f"== {name} batch {batch}  inputs {[tuple(x.shape) for x in inputs]}  "
          f"{(case['flops'] or 0) / 1e9:.3f} GFLOP  pipeline {pipeline!r}", flush=True)
    with torch.no_grad():
        ref = model(*inputs)

    fns, results = {}, case["variants"]
    tmp = tempfile.TemporaryDirectory(prefix="graphopt_peers_")
    for v in opts["variants"]:
        if v == "graphopt-tuned" and opts["tune"] <= 0:
            case["skipped"][v] = "--tune 0"
            continue
        t = time.perf_counter()
        try:
            if v == "graphopt":
                fn, info = build_graphopt(model, inputs, pipeline, opts["target"], None)
            elif v == "graphopt-winograd":
                fn, info = build_graphopt(model, inputs, pipeline, opts["target"], None, precision="winograd")
                print(f"  {v}: {info['backend'].get('precision', '')}", flush=True)
            elif v == "graphopt-tuned":
                tune = {"trials": opts["tune"], "progress": sys.stderr.isatty()}
                if opts["database"]:
                    tune["database"] = opts["database"]
                print(f"  tuning {name} batch {batch}: up to {opts['tune']} new trials, records in "
                      f"{opts['database'] or 'graphopt default (user cache dir)'}", flush=True)
                fn, info = build_graphopt(model, inputs, pipeline, opts["target"], tune)
            elif v == "eager":
                fn, info = build_eager(model, inputs)
            elif v == "torch.compile":
                fn, info = build_compile(model, inputs)
            else:
                fn, info = build_ort(model, inputs, threads, tmp.name)
            with torch.no_grad():           # first call: correctness, and torch.compile's compilation
                t1 = time.perf_counter()
                out = fn()
                first = time.perf_counter() - t1
            if info["compile_s"] is None:
                info["compile_s"] = first
            info["first_call_s"] = first
            info.update(compare(out, ref))
            info["flagged"] = info["rel_diff"] > opts["rtol"]
            info["status"] = "ok"
            fns[v] = fn
        except KeyboardInterrupt:
            raise
        except Exception as e:
            info = {"status": "failed", "error": first_line(e), "after_s": round(time.perf_counter() - t, 2)}
        results[v] = info
        extra = ""
        if info["status"] == "ok":
            extra = (f"{info['compile_s']:.1f} s, max|Δ| {info['max_abs_diff']:.2e} "
                     f"(rel {info['rel_diff']:.1e}{', DIFF' if info['flagged'] else ''})")
            if "tuning" in info:
                extra += (f", tuning {info['tuning_s']:.1f} s, {info['new_trials']} new trials, "
                          f"{info['reused_records']} records reused")
        else:
            extra = f"FAILED: {info['error']}"
        print(f"  built {v:<14} {extra}", flush=True)

    def on_error(k, e):
        results[k] = {**results[k], "status": "failed", "error": "while timing: " + first_line(e)}

    measure_peak(f"{name} batch {batch}")           # the peak again, just before this case's timing
    timings = time_interleaved(fns, opts["rounds"], opts["slice"], opts["budget"], calls=opts["calls"],
                               on_error=on_error)
    for v, st in timings.items():
        results[v].update(st)
    for v, info in results.items():
        if info.get("status") != "ok":
            continue
        ms = info["median_ms"]
        info["ratio_to"] = {p: ms / results[p]["median_ms"] for p in PEERS
                            if results.get(p, {}).get("status") == "ok"}
        if case["flops"]:
            info["gflops"] = case["flops"] / (ms / 1e3) / 1e9      # pct_peak: set_pct_peak(), against the best peak
    try:
        case["loadavg_1m"] = round(os.getloadavg()[0], 2)      # a shared machine shows here
    except OSError:
        pass
    tmp.cleanup()
    del fns, model, ref
    gc.collect()
    return case


# ------------------------------------------------------------------------------------------ output
def _f(x, fmt: str, none: str = "-") -> str:
    return none if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def table(cases: list[dict]) -> str:
    head = ["model", "batch", "variant", "median ms", "p10-p90 ms", "/eager", "/compile", "/ORT", "GFLOP/s",
            "%peak", "compile s", "tune s (new)", "rel|Δ|", ""]
    rows = [head]
    for c in cases:
        for v, r in c["variants"].items():
            if r.get("status") != "ok":
                rows.append([c["model"], str(c["batch"]), v, "FAILED", r.get("error", "")[:90]] + [""] * 9)
                continue
            vs = r["ratio_to"]
            tune = "-"
            if "tuning" in r:
                tune = f"{r['tuning_s']:.1f} ({r['new_trials']})"
            rows.append([c["model"], str(c["batch"]), v, f"{r['median_ms']:.2f}",
                         f"{r['p10_ms']:.2f}-{r['p90_ms']:.2f}",
                         _f(vs.get("eager"), ".2f"), _f(vs.get("torch.compile"), ".2f"), _f(vs.get("ort"), ".2f"),
                         _f(r.get("gflops"), ".1f"), _f(r.get("pct_peak"), ".0f"),
                         _f(r["compile_s"], ".1f") if v != "eager" else "-", tune, f"{r['rel_diff']:.1e}",
                         "DIFF" if r["flagged"] else ""])
        for v, why in c.get("skipped", {}).items():
            rows.append([c["model"], str(c["batch"]), v, "skipped", why] + [""] * 9)
    return format_table(rows, right={1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12})


def set_pct_peak(cases: list[dict], peak: float) -> None:
    for c in cases:
        for info in c["variants"].values():
            if info.get("gflops") is not None:
                info["pct_peak"] = 100 * info["gflops"] / peak if peak else None


def header(meta: dict) -> str:
    m = meta["machine"]
    th, pk = m["thread_settings"], m["peak"]
    return "\n".join([
        f"graphopt peer benchmark  {meta['started']}",
        f"CPU: {m['cpu']} (LLVM {m.get('llvm_cpu', '?')}), {m['physical_cores']} physical cores, "
        f"{m['logical_cpus']} logical; load average (1 min) at start {m.get('loadavg_1m', '?')}",
        f"threads: torch {th['torch']}, TVM runtime {th['tvm']} (TVM_NUM_THREADS), ONNX Runtime intra-op "
        f"{th['onnxruntime_intra_op']}, BLAS {th['blas']}  (= physical cores for every variant)",
        f"versions: torch {m['torch']}, torchvision {m['torchvision']}, TVM {m['tvm']}, onnxruntime "
        f"{m['onnxruntime']}, onnx {m['onnx']}, numpy {m['numpy']}, python {m['python']}",
        f"machine peak (measured now): {pk['gflops']:.1f} GFLOP/s float32 (best of {pk['repeats']} "
        f"{pk['n']}x{pk['n']} GEMMs, numpy and torch.mm, best: {pk.get('library', 'numpy')}, {pk['threads']} "
        f"threads; median {pk['median_gflops']:.1f}); %peak uses the best of every such measurement in the run",
    ])


def footer(meta: dict) -> str:
    m = meta["machine"]
    seen = [x["gflops"] for x in m["peak_measurements"]]
    lines = ["ratios: variant ms / peer ms (< 1: faster than that peer). rel|Δ|: max |Δ| vs eager / max |eager "
             f"output|; DIFF: above --rtol {meta['options']['rtol']:g}.",
             f"%peak: GFLOP/s / {m['peak_gflops']:.1f} GFLOP/s, the best of {len(seen)} GEMM peak measurements in "
             f"this run (at the start, before each case's timing, at the end: {min(seen):.1f} to "
             f"{max(seen):.1f}; load lowers them); load average (1 min) at the end {m.get('loadavg_end_1m', '?')}"]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=DEFAULT_CONFIG, help="JSON or TOML file of defaults ('' for none)")
    ap.add_argument("--models", help=f"comma list (default {BUILTIN['models']})")
    ap.add_argument("--batches", help="comma list of batch sizes (default 1,8)")
    ap.add_argument("--pipeline", help="graphopt pipeline for every model (overrides the config's)")
    ap.add_argument("--tune", type=int, help="MetaSchedule trials for graphopt-tuned; 0 skips it (default: the "
                                                 "config's, 64 in configs/default.json)")
    ap.add_argument("--database", help="tuning record directory (default: graphopt's per-target cache dir)")
    ap.add_argument("--variants", help=f"comma list among {','.join(ALL_VARIANTS + OPTIONAL_VARIANTS)}")
    ap.add_argument("--target", help="graphopt target (default x86)")
    ap.add_argument("--rounds", type=int, help="timed round-robin rounds (default 10)")
    ap.add_argument("--slice", type=float, help="seconds per variant per round (default 0.25)")
    ap.add_argument("--calls", type=int, help="timed calls per variant per round (default 0: sized by --slice)")
    ap.add_argument("--budget", type=float, help="seconds of timing per model/batch before stopping early "
                                                 "(after 3 rounds; default 120)")
    ap.add_argument("--rtol", type=float, help="flag outputs whose max |Δ| / max |eager| exceeds this (1e-3)")
    ap.add_argument("--image", type=int, help="image models: N×N inputs instead of 224 (quick checks)")
    ap.add_argument("--seq", type=int, help="sequence models: this sequence length instead of 128")
    ap.add_argument("--threads", type=int, help="threads for every runtime (default 0: physical cores)")
    ap.add_argument("--peak-size", type=int, help="n of the n×n×n GEMMs that measure the machine's peak (default "
                                                    "2048; smaller only for quick checks: a small GEMM under-reads it)")
    ap.add_argument("--out", help="output directory (default benchmarks/results)")
    ap.add_argument("--json", help="JSON file name inside --out (default run.json)")
    args = ap.parse_args(argv)
    opts = resolve_options(args)

    threads = int(opts["threads"]) or physical_cores()
    th = set_threads(threads)                         # before TVM's thread pool starts
    machine = machine_info()
    peak_info = gemm_peak_gflops(threads, n=int(opts["peak_size"]))
    machine.update({"threads": threads, "thread_settings": th, "peak_gflops": peak_info["gflops"],
                    "peak": peak_info, "peak_measurements": [{"when": "start", **peak_info}]})
    meta = {"started": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine,
            "options": dict(opts)}
    print(header(meta), flush=True)
    os.makedirs(opts["out"], exist_ok=True)
    path = os.path.join(opts["out"], opts["json"])
    cases: list[dict] = []

    def measure_peak(when: str) -> float:
        """Measure the GEMM peak again; the run's peak is the best measurement (load only ever lowers it)."""
        info = gemm_peak_gflops(threads, n=int(opts["peak_size"]))
        machine["peak_measurements"].append({"when": when, **info})
        if info["gflops"] > machine["peak_gflops"]:
            machine["peak_gflops"] = info["gflops"]
        set_pct_peak(cases, machine["peak_gflops"])
        return machine["peak_gflops"]

    def save():
        set_pct_peak(cases, machine["peak_gflops"])
        with open(path, "w") as f:
            json.dump({**meta, "results": cases}, f, indent=1, default=str)

    for name in opts["models"]:
        for batch in opts["batches"]:
            try:
                cases.append(run_case(name, batch, opts, threads, measure_peak))
            except KeyboardInterrupt:
                print("interrupted: writing what was measured so far", flush=True)
                save()
                return 130
            except Exception as e:                   # the model itself cannot be made or run: report it, go on
                cases.append({"model": name, "batch": batch, "error": first_line(e), "variants": {},
                              "skipped": {}})
                print(f"  {name} batch {batch} FAILED: {first_line(e)}", flush=True)
            save()
            print(table(cases[-1:]), flush=True)
    measure_peak("end")
    try:
        machine["loadavg_end_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    save()
    print("\n" + header(meta))
    print(table(cases))
    print(footer(meta))
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
