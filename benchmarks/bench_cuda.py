"""CUDA benchmark: graphopt's CUDA target against PyTorch eager CUDA and torch.compile, on a real GPU, one run.

    python benchmarks/bench_cuda.py                                  # resnet18, mobilenet_v2, bert_base; b1, b32
    python benchmarks/bench_cuda.py --models resnet18 --batches 32 --tune 32 --database /tmp/cuda-db
    python benchmarks/bench_cuda.py --artifact model.gopt            # also load an artifact built elsewhere

What one run does, each section reported even when another fails:
  1. per model and batch (graphopt.models, random weights): graphopt.optimize(model, target="cuda") untuned
     (dlight default schedules, the GPU's own sm_XX), PyTorch eager on the GPU, torch.compile (default mode),
     ONNX Runtime's CUDA execution provider when onnxruntime-gpu is installed, and in float16
     (--fp16-batches): graphopt precision="float16" (float32 accumulation) against the model in half
     precision in eager -- all timed interleaved round-robin (CUDA-synchronized), with max |Δ| against eager
     float32 on the GPU. --profile adds graphopt's per-kernel timings (top 12, kernel_profile.py).
  2. --tune N: a short MetaSchedule run on the GPU for the first model at the largest batch, with records kept
     in --database, then a re-compile from those records (it must run zero new trials) and its latency.
  3. --artifact PATH: an artifact saved on another machine (e.g. built for cuda:sm_90 on a CPU-only machine
     with `--save-artifact`) loaded here and run; compared with the reference output saved beside it.
Writes <out>/cuda.json and prints a table. --save-artifact PATH builds the reference artifact on any machine
with nvcc (no GPU needed) and exits.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

import torch  # noqa: E402

import graphopt  # noqa: E402
from graphopt.models import get_model  # noqa: E402
from _common import first_line  # noqa: E402



def gpu_info() -> dict:
    import tvm

    from graphopt.backends.tvm import cuda

    p = torch.cuda.get_device_properties(0)
    return {"gpu": p.name, "capability": f"sm_{p.major}{p.minor}", "sms": p.multi_processor_count,
            "memory_gib": round(p.total_memory / 2**30, 1), "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "tvm": tvm.__version__,
            "tvm_cuda_runtime": cuda.cuda_runtime_available(), "nvcc": cuda.find_nvcc()}


def time_cuda(fns: dict, rounds: int = 7, slice_s: float = 0.1) -> dict:
    """Median/p10/p90 ms per call of each fn, timed interleaved round-robin with CUDA synchronization."""
    calls = {}
    for k, f in fns.items():                     # warm-up, and the number of calls that fill one slice
        for _ in range(3):
            f()
        torch.cuda.synchronize()
        t = time.perf_counter()
        f()
        torch.cuda.synchronize()
        calls[k] = max(1, min(200, int(slice_s / max(time.perf_counter() - t, 1e-6))))
    samples = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(calls[k]):
                f()
            torch.cuda.synchronize()
            samples[k].append((time.perf_counter() - t) * 1e3 / calls[k])
    out = {}
    for k, xs in samples.items():
        xs = sorted(xs)
        out[k] = {"ms": statistics.median(xs), "p10": xs[len(xs) // 10], "p90": xs[-1 - len(xs) // 10]}
    return out


def no_grad_call(fn, x):
    """A closure calling fn(x) under torch.no_grad() (eager and torch.compile variants of the timing loop)."""
    def call():
        with torch.no_grad():
            return fn(x)
    return call


def max_rel_diff(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    d = (got.float() - want.float()).abs().max().item()
    return d, d / max(want.float().abs().max().item(), 1e-30)


def ort_cuda_session(model, x):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise RuntimeError(f"onnxruntime {ort.__version__} has no CUDAExecutionProvider "
                           f"(providers: {', '.join(ort.get_available_providers())}); install onnxruntime-gpu")
    import tempfile

    path = os.path.join(tempfile.mkdtemp(), "m.onnx")
    torch.onnx.export(model.cpu(), (x.cpu(),), path, dynamo=False, opset_version=17)
    model.cuda()
    sess = ort.InferenceSession(path, providers=["CUDAExecutionProvider"])
    name = sess.get_inputs()[0].name
    xn = x.cpu().numpy()
    return lambda: sess.run(None, {name: xn})[0]


def bench_case(name: str, batch: int, fp16: bool, variants: list[str], profile: bool = False) -> dict:
    torch.manual_seed(0)
    model, (x,) = get_model(name, batch)
    row = {"model": name, "batch": batch, "errors": {}, "compile_s": {}, "max_abs": {}, "max_rel": {}}
    fns = {}
    t = time.perf_counter()
    opt = graphopt.optimize(model, target="cuda", example_inputs=(x,))
    row["compile_s"]["graphopt"] = round(time.perf_counter() - t, 1)
    row["schedule"] = opt.report.backend.get("schedule")
    model = model.cuda()
    xc = x.cuda()
    with torch.no_grad():
        want = model(xc)
        got = opt(xc)
    row["max_abs"]["graphopt"], row["max_rel"]["graphopt"] = max_rel_diff(got, want)
    fns["graphopt"] = lambda: opt(xc)

    fns["eager"] = no_grad_call(model, xc)
    if "torch.compile" in variants:
        try:
            t = time.perf_counter()
            compiled = torch.compile(model)
            with torch.no_grad():
                out = compiled(xc)
            torch.cuda.synchronize()
            row["compile_s"]["torch.compile"] = round(time.perf_counter() - t, 1)
            row["max_abs"]["torch.compile"], row["max_rel"]["torch.compile"] = max_rel_diff(out, want)
            fns["torch.compile"] = no_grad_call(compiled, xc)
        except Exception as e:
            row["errors"]["torch.compile"] = first_line(e)
    if "ort" in variants:
        try:
            run = ort_cuda_session(model, xc)
            out = torch.from_numpy(run())
            row["max_abs"]["ort"], row["max_rel"]["ort"] = max_rel_diff(out.cuda(), want)
            fns["ort"] = run
        except Exception as e:
            row["errors"]["ort"] = first_line(e)
    opt16 = None
    if fp16:
        try:       # graphopt precision="float16": float16 operands, float32 accumulation and signature
            t = time.perf_counter()
            try:
                opt16 = graphopt.optimize(model.cpu(), target="cuda", example_inputs=(x,), precision="float16")
            finally:
                model.cuda()              # eager and the other variants run on the GPU whatever happened here
            row["compile_s"]["graphopt-fp16"] = round(time.perf_counter() - t, 1)
            row["max_abs"]["graphopt-fp16"], row["max_rel"]["graphopt-fp16"] = max_rel_diff(opt16(xc), want)
            fns["graphopt-fp16"] = lambda: opt16(xc)
        except Exception as e:
            row["errors"]["graphopt-fp16"] = first_line(e)
        try:       # PyTorch's own float16: the model in half precision (eager)
            half = get_model(name, batch)[0].half().eval().cuda()
            xhc = xc.half() if xc.is_floating_point() else xc
            with torch.no_grad():
                row["max_abs"]["eager-fp16"], row["max_rel"]["eager-fp16"] = max_rel_diff(half(xhc), want)
            fns["eager-fp16"] = no_grad_call(half, xhc)
        except Exception as e:
            row["errors"]["eager-fp16"] = first_line(e)
    if profile:
        from graphopt.backends.tvm.kernel_profile import profile_kernels

        row["profile"] = {}
        for key, mod in (("graphopt", opt), ("graphopt-fp16", opt16)):
            if mod is None:
                continue
            try:
                rows = profile_kernels(mod, xc, repeat=3)
                row["profile"][key] = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
                                       for r in rows[:12]]
            except Exception as e:
                row["errors"][f"profile-{key}"] = first_line(e)
    row["times"] = time_cuda(fns)
    return row


def bench_tuning(name: str, batch: int, trials: int, database: str) -> dict:
    torch.manual_seed(0)
    model, (x,) = get_model(name, batch)
    out = {"model": name, "batch": batch, "trials": trials, "database": database}
    t = time.perf_counter()
    tuned = graphopt.optimize(model, target="cuda", example_inputs=(x,),
                              tune={"trials": trials, "database": database})
    out["tune_s"] = round(time.perf_counter() - t, 1)
    out["summary"] = tuned.report.backend.get("tuning")
    t = time.perf_counter()
    again = graphopt.optimize(model, target="cuda", example_inputs=(x,),
                              tune={"trials": trials, "database": database})
    out["recompile_s"] = round(time.perf_counter() - t, 1)
    out["recompile_summary"] = again.report.backend.get("tuning")
    untuned = graphopt.optimize(model, target="cuda", example_inputs=(x,))
    model = model.cuda()
    xc = x.cuda()
    with torch.no_grad():
        want = model(xc)
    out["max_abs"], out["max_rel"] = max_rel_diff(again(xc), want)
    compiled = torch.compile(model)
    with torch.no_grad():
        compiled(xc)
    out["times"] = time_cuda({"graphopt": lambda: untuned(xc), "graphopt-tuned": lambda: again(xc),
                              "eager": no_grad_call(model, xc), "torch.compile": no_grad_call(compiled, xc)})
    return out


def save_artifact(path: str, arch: str, name: str) -> None:
    """Build the reference artifact for `cuda:<arch>` here (nvcc, no GPU needed) with its input and output."""
    model, (x,) = get_model(name, 2)
    opt = graphopt.optimize(model, target=f"cuda:{arch}", example_inputs=(x,))
    opt.save(path)
    with torch.no_grad():
        torch.save({"x": x, "y": model(x), "model": name}, path + ".ref.pt")
    print(f"saved {path} (+ .ref.pt), {os.path.getsize(path) / 2**20:.1f} MiB")


def run_artifact(path: str) -> dict:
    t = time.perf_counter()
    loaded = graphopt.load(path)
    out = {"path": path, "load_s": round(time.perf_counter() - t, 2), "target": loaded.target.alias}
    ref = torch.load(path + ".ref.pt")
    got = loaded(ref["x"].cuda())
    out["max_abs"], out["max_rel"] = max_rel_diff(got.cpu(), ref["y"])
    return out


def print_table(rows: list[dict]) -> None:
    cols = ["graphopt", "eager", "torch.compile", "ort", "graphopt-fp16", "eager-fp16"]
    print("\n| model, batch | " + " | ".join(cols) +  " | graphopt/eager | graphopt/torch.compile | max rel |Δ| "
          "| graphopt-fp16/eager-fp16 | fp16 max rel |Δ| |")
    print("|" + "---|" * (len(cols) + 6))
    for r in rows:
        if "times" not in r:
            print(f"| {r['model']}, {r['batch']} | failed: {r.get('error')} |")
            continue
        t = r["times"]
        cells = [f"{t[c]['ms']:.3f}" if c in t else "-" for c in cols]
        ratio = lambda a, b: f"{t[a]['ms'] / t[b]['ms']:.2f}" if a in t and b in t else "-"  # noqa: E731
        print(f"| {r['model']}, {r['batch']} | " + " | ".join(cells)
              + f" | {ratio('graphopt', 'eager')} | {ratio('graphopt', 'torch.compile')} | "
              + f"{r['max_rel'].get('graphopt', float('nan')):.2e} | {ratio('graphopt-fp16', 'eager-fp16')} | "
              + f"{r['max_rel'].get('graphopt-fp16', float('nan')):.2e} |")
        for key, prof in r.get("profile", {}).items():
            top = ", ".join(f"{p['name']} {100 * p['share']:.0f}%" for p in prof[:5])
            print(f"|   profile {key}: {top} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet18,mobilenet_v2,bert_base")
    ap.add_argument("--batches", default="32,1")
    ap.add_argument("--fp16-batches", default="32", help="batches that also run float16 ('' for none)")
    ap.add_argument("--variants", default="torch.compile,ort")
    ap.add_argument("--profile", action="store_true", help="per-kernel timings of graphopt's builds (top 12)")
    ap.add_argument("--tune", type=int, default=0, help="MetaSchedule trials on the GPU (0: no tuning section)")
    ap.add_argument("--tune-model", default="resnet18")
    ap.add_argument("--tune-batch", type=int, default=32)
    ap.add_argument("--database", default="/tmp/graphopt-cuda-tuning")
    ap.add_argument("--artifact", default=None, help="load and run this artifact (built elsewhere)")
    ap.add_argument("--save-artifact", default=None, help="build the reference artifact here and exit")
    ap.add_argument("--arch", default="sm_90", help="with --save-artifact: the CUDA architecture")
    ap.add_argument("--artifact-model", default="bert_tiny", help="with --save-artifact: the bundled model")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    a = ap.parse_args(argv)
    if a.save_artifact:
        save_artifact(a.save_artifact, a.arch, a.artifact_model)
        return 0
    if not torch.cuda.is_available():
        sys.exit("bench_cuda.py: no CUDA GPU (torch.cuda.is_available() is False)")
    os.makedirs(a.out, exist_ok=True)
    result = {"machine": gpu_info(), "cases": [], "tuning": None, "artifact": None}
    print(json.dumps(result["machine"]), flush=True)
    dump = lambda: json.dump(result, open(os.path.join(a.out, "cuda.json"), "w"), indent=1, default=str)  # noqa
    variants = [v for v in a.variants.split(",") if v]
    fp16_batches = {int(b) for b in a.fp16_batches.split(",") if b}
    if a.artifact:
        try:
            result["artifact"] = run_artifact(a.artifact)
        except Exception as e:
            result["artifact"] = {"error": first_line(e), "trace": traceback.format_exc()[-2000:]}
        print("artifact:", json.dumps(result["artifact"]), flush=True)
        dump()
    for name in [m for m in a.models.split(",") if m]:
        for batch in [int(b) for b in a.batches.split(",")]:
            try:
                row = bench_case(name, batch, batch in fp16_batches, variants, a.profile)
            except Exception as e:
                row = {"model": name, "batch": batch, "error": first_line(e),
                       "trace": traceback.format_exc()[-3000:]}
            result["cases"].append(row)
            print(json.dumps(row, default=str), flush=True)
            dump()
            torch.cuda.empty_cache()
    if a.tune:
        try:
            result["tuning"] = bench_tuning(a.tune_model, a.tune_batch, a.tune, a.database)
        except Exception as e:
            result["tuning"] = {"error": first_line(e), "trace": traceback.format_exc()[-3000:]}
        print("tuning:", json.dumps(result["tuning"], default=str), flush=True)
        dump()
    print_table(result["cases"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
