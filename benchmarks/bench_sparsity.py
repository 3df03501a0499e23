"""Sparsity benchmark: block-sparse speed (MLP, BERT-style encoder) and 90% unstructured accuracy + size (digits).

    python benchmarks/bench_sparsity.py                          # speed: mlp, encoder; accuracy: digits cnn, mlp
    python benchmarks/bench_sparsity.py --parts speed --encoder base --target x86:haswell
    python benchmarks/bench_sparsity.py --parts nm --target x86:haswell    # N:M vs BSR vs dense at 50%
    python benchmarks/bench_sparsity.py --parts convs                      # ResNet-18 / MobileNetV2 1x1 convs

speed     each model built by graphopt dense float32 (pipeline "cleanup"), dense int8 ("cleanup,quantize") and at 90% block sparsity with
          16x1 and 1x16 blocks (sparsify, magnitude, one-shot: random weights, speed only; kernel=auto, so a
          layer runs the BSR kernel only where it measured faster), timed interleaved in one run at batch 1
          (PyTorch eager of the dense model as a reference); ratios are dense ms / sparse ms, of the medians,
          the 10th percentiles and the minima (on a heavily shared machine the low percentiles are the
          least disturbed). "<block> int8" variants: the same sparsify followed by quantize (static int8;
          sparse layers on the block-sparse int8 kernels where measured faster than dense int8).
accuracy  digits CNN and a digits MLP (64-256-256-10) trained here on scikit-learn's digits, then
          sparsify(sparsity=0.9, steps=..) - gradual pruning with the dense model as distillation teacher -
          and top-1 accuracy on the held-out quarter; artifacts (.gopt) of the dense and sparse builds
          (kernel=auto and kernel=sparse) compared in bytes, and their latencies interleaved; and each build's
          model file (graphopt.compressed: graph + weights, zstd, no compiled code; compiled again when loaded)
          in bytes against the dense float32 one, with the accuracy of the file loaded back.
nm        the same 50% sparsity in three layouts - 2:4, 4:8 (N:M kernels) and 16x1 blocks (BSR kernel) - against
          dense float32 (pipeline "cleanup"), on the MLP at batch 1 and 8 and the small encoder (its Linears),
          one-shot magnitude masks on random weights (speed only), kernel=sparse by default (every sparsified
          layer on its sparse kernel, so the layouts are compared kernel for kernel; --nm-kernel auto keeps
          the measured per-layer choice), timed interleaved in one run; ratios dense / this. --nm-int8 adds
          dense int8 and each layout followed by quantize (2:4 / 4:8 on the N:M int8 kernel, 16x1 on the
          block-sparse int8 one).
convs     ResNet-18 and MobileNetV2 (torchvision, random init, batch 1): every 1x1 convolution (groups=1) at
          80% 16x1 block sparsity (--conv-sparsity, --conv-block; one-shot magnitude; 3x3, depthwise and Linear
          layers left dense), kernel=auto and kernel=sparse, float32 and int8 (then quantize; ratios against
          dense int8), timed interleaved; ratios dense / this.
Results also go to benchmarks/results/sparsity_*.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import format_table, machine_info, physical_cores, set_threads, time_interleaved  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

import graphopt  # noqa: E402
from graphopt import compressed  # noqa: E402
from graphopt.datasets import DigitsCNN, accuracy, batches, digits, train_classifier  # noqa: E402
from graphopt.models import MLP, BertStyleEncoder  # noqa: E402


def speed_models(encoder: str):
    torch.manual_seed(0)
    yield "mlp 1024-4096-4096-1000", MLP().eval(), (torch.randn(1, 1024),)
    if encoder == "base":
        enc, seq = BertStyleEncoder().eval(), 128
    else:
        enc, seq = BertStyleEncoder(vocab=8000, hidden=256, layers=4, heads=4, ffn=1024).eval(), 64
    yield f"encoder {encoder} (seq {seq})", enc, (torch.randint(0, enc.tokens.num_embeddings, (1, seq)),)


def decisions(opt) -> str:
    rows = opt.report.backend.get("sparse_layers", [])
    n = sum(str(r["kernel"]).startswith("sparse") for r in rows)
    kinds = sorted({r["kernel"] for r in rows if str(r["kernel"]).startswith("sparse int8")})
    return f"{n}/{len(rows)} layers sparse" + (f" ({', '.join(k.split()[-1] for k in kinds)})" if kinds else "")


def calibration(x, n: int = 4) -> list[tuple]:
    """n random batches shaped like the example inputs (token ids stay in the example's range)."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        out.append(tuple(torch.randint(0, int(t.max()) + 1, t.shape, generator=g) if not t.is_floating_point()
                         else torch.randn(t.shape, generator=g) for t in x))
    return out


def bench_speed(args) -> list[dict]:
    out = []
    for name, model, x in speed_models(args.encoder):
        print(f"{name}: building", flush=True)
        builds, info = {}, {}
        t = time.perf_counter()
        builds["dense"] = graphopt.optimize(model, target=args.target, pipeline="cleanup", example_inputs=x)
        info["dense"] = f"build {time.perf_counter() - t:.0f} s"
        calib = calibration(x)
        q = ",quantize(progress=false)"
        if args.int8:
            t = time.perf_counter()
            builds["dense int8"] = graphopt.optimize(model, target=args.target, pipeline="cleanup" + q,
                                                     example_inputs=x, calibration=calib)
            info["dense int8"] = f"build {time.perf_counter() - t:.0f} s"
        for block in args.blocks.split(","):
            for int8 in ((False, True) if args.int8 else (False,)):
                key = block + (" int8" if int8 else "")
                t = time.perf_counter()
                opt = graphopt.optimize(model, target=args.target, example_inputs=x, calibration=calib,
                                        pipeline=f"cleanup,sparsify(sparsity={args.sparsity},pattern={block})"
                                                 + (q if int8 else ""))
                builds[key] = opt
                info[key] = f"{decisions(opt)}, build {time.perf_counter() - t:.0f} s"
                err = (opt(*x) - opt.graph_module(*x)).abs().max().item()
                info[key] += f", max|compiled - graph| {err:.1e}"
        fns = {k: (lambda o=o: o(*x)) for k, o in builds.items()}
        fns["eager"] = lambda: model(*x)
        times = time_interleaved(fns, rounds=args.rounds)
        dense = times["dense"]["median_ms"]
        for k, v in times.items():
            out.append({"model": name, "variant": k, "median_ms": v["median_ms"], "p10_ms": v["p10_ms"],
                        "p90_ms": v["p90_ms"], "min_ms": v["min_ms"], "dense_over_this": dense / v["median_ms"],
                        "dense_over_this_p10": times["dense"]["p10_ms"] / v["p10_ms"],
                        "dense_over_this_min": times["dense"]["min_ms"] / v["min_ms"], "info": info.get(k, ""),
                        "layers": builds[k].report.backend.get("sparse_layers") if k in builds else None})
        print(format_table([["variant", "median ms", "p10", "p90", "min", "dense/this (median)", "(p10)", "(min)",
                             "notes"]] + [
            [r["variant"], f"{r['median_ms']:.3f}", f"{r['p10_ms']:.3f}", f"{r['p90_ms']:.3f}", f"{r['min_ms']:.3f}",
             f"{r['dense_over_this']:.2f}x", f"{r['dense_over_this_p10']:.2f}x", f"{r['dense_over_this_min']:.2f}x",
             r["info"]] for r in out if r["model"] == name], right={1, 2, 3, 4, 5, 6, 7}), flush=True)
    return out


def nm_models():
    torch.manual_seed(0)
    mlp = MLP().eval()
    yield "mlp 1024-4096-4096-1000 batch 1", mlp, (torch.randn(1, 1024),)
    yield "mlp 1024-4096-4096-1000 batch 8", mlp, (torch.randn(8, 1024),)
    enc = BertStyleEncoder(vocab=8000, hidden=256, layers=4, heads=4, ffn=1024).eval()
    yield "encoder small (seq 64)", enc, (torch.randint(0, enc.tokens.num_embeddings, (1, 64)),)


def bench_nm(args) -> list[dict]:
    out = []
    for name, model, x in nm_models():
        print(f"{name}: building", flush=True)
        builds, info = {"dense": graphopt.optimize(model, target=args.target, pipeline="cleanup",
                                                   example_inputs=x)}, {}
        variants = [(p, "") for p in args.nm_patterns.split(",")]
        if args.nm_int8:
            # static int8 after the same masks: N:M layers on the N:M int8 kernel, 16x1 on the block-sparse one
            calib = calibration(x)
            builds["dense int8"] = graphopt.optimize(model, target=args.target, example_inputs=x, calibration=calib,
                                                     pipeline="cleanup,quantize(progress=false)")
            variants += [(p, ",quantize(progress=false)") for p in args.nm_patterns.split(",")]
        for pattern, tail in variants:
            t = time.perf_counter()
            opt = graphopt.optimize(model, target=args.target, example_inputs=x,
                                    calibration=calibration(x) if tail else None,
                                    pipeline=f"cleanup,sparsify(sparsity=0.5,pattern={pattern},"
                                             f"kernel={args.nm_kernel}){tail}")
            pattern = pattern + (" int8" if tail else "")
            builds[pattern] = opt
            rows = opt.report.backend.get("sparse_layers", [])
            kernels = sorted({r.get("sparse_kernel", "") for r in rows if r["kernel"] == "sparse"}
                             | {r["kernel"] for r in rows if str(r["kernel"]).startswith("sparse int8")})
            stored = sum(r["stored_bytes"] for r in rows) / 1e6
            dense_b = sum(r["dense_bytes"] for r in rows) / 1e6
            err = (opt(*x) - opt.graph_module(*x)).abs().max().item()
            info[pattern] = (f"{decisions(opt)} [{'; '.join(kernels)}], weights {stored:.1f} MB (dense {dense_b:.1f}), "
                             f"build {time.perf_counter() - t:.0f} s, max|compiled - graph| {err:.1e}")
        fns = {k: (lambda o=o: o(*x)) for k, o in builds.items()}
        times = time_interleaved(fns, rounds=args.rounds)
        d = times["dense"]
        rows_out = []
        for k, v in times.items():
            rows_out.append({"model": name, "variant": k, "target": args.target, "median_ms": v["median_ms"],
                             "p10_ms": v["p10_ms"], "min_ms": v["min_ms"],
                             "dense_over_this": d["median_ms"] / v["median_ms"],
                             "dense_over_this_p10": d["p10_ms"] / v["p10_ms"],
                             "dense_over_this_min": d["min_ms"] / v["min_ms"], "info": info.get(k, "")})
        out += rows_out
        print(format_table([["variant", "median ms", "p10", "min", "dense/this (median)", "(p10)", "(min)", "notes"]]
                           + [[r["variant"], f"{r['median_ms']:.3f}", f"{r['p10_ms']:.3f}", f"{r['min_ms']:.3f}",
                               f"{r['dense_over_this']:.2f}x", f"{r['dense_over_this_p10']:.2f}x",
                               f"{r['dense_over_this_min']:.2f}x", r["info"]] for r in rows_out],
                           right={1, 2, 3, 4, 5, 6}), flush=True)
    return out


def conv_models():
    import torchvision

    for arch in ("resnet18", "mobilenet_v2"):
        torch.manual_seed(0)
        yield arch, torchvision.models.get_model(arch, weights=None).eval(), (torch.randn(1, 3, 224, 224),)


def pointwise_only(model) -> list[str]:
    """Module paths of every Conv2d that is not a 1x1, groups=1 convolution (sparsify's exclude list)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)
            and (tuple(m.kernel_size) != (1, 1) or m.groups != 1)]


def bench_convs(args) -> list[dict]:
    """ResNet-18 / MobileNetV2 (random init, batch 1, 224x224): every 1x1 convolution at `--conv-sparsity`
    block sparsity (one-shot magnitude, `--conv-block`), float32 and int8, against the dense builds."""
    out = []
    for name, model, x in conv_models():
        print(f"{name}: building", flush=True)
        sp = {"name": "sparsify", "sparsity": args.conv_sparsity, "pattern": args.conv_block, "layers": "conv",
              "exclude": pointwise_only(model)}
        calib = calibration(x, 2)
        q = [{"name": "quantize", "progress": False}]
        variants = {"dense": ["fold_bn", "cleanup"], "sparse": ["fold_bn", "cleanup", sp],
                    "sparse kernel=sparse": ["fold_bn", "cleanup", {**sp, "kernel": "sparse"}]}
        if args.int8:
            variants.update({"dense int8": ["fold_bn", "cleanup"] + q, "sparse int8": ["fold_bn", "cleanup", sp] + q})
        builds, info = {}, {}
        for k, pipe in variants.items():
            t = time.perf_counter()
            opt = graphopt.optimize(model, target=args.target, example_inputs=x, pipeline=pipe,
                                    calibration=calib if "int8" in k else None)
            builds[k] = opt
            err = (opt(*x) - opt.graph_module(*x)).abs().max().item()
            rows = opt.report.backend.get("sparse_layers", [])
            info[k] = (f"{decisions(opt)}, " if rows else "") + f"build {time.perf_counter() - t:.0f} s, " \
                      f"max|compiled - graph| {err:.1e}"
        times = time_interleaved({k: (lambda o=o: o(*x)) for k, o in builds.items()}, rounds=args.rounds)
        rows_out = []
        for k, v in times.items():
            ref = times["dense int8" if "int8" in k else "dense"]
            rows_out.append({"model": name, "variant": k, "target": args.target, "median_ms": v["median_ms"],
                             "p10_ms": v["p10_ms"], "min_ms": v["min_ms"],
                             "dense_over_this": ref["median_ms"] / v["median_ms"],
                             "dense_over_this_p10": ref["p10_ms"] / v["p10_ms"], "info": info[k],
                             "layers": builds[k].report.backend.get("sparse_layers")})
        out += rows_out
        print(format_table([["variant", "median ms", "p10", "min", "dense/this (median; int8: dense int8)", "(p10)",
                             "notes"]]
                           + [[r["variant"], f"{r['median_ms']:.2f}", f"{r['p10_ms']:.2f}", f"{r['min_ms']:.2f}",
                               f"{r['dense_over_this']:.2f}x", f"{r['dense_over_this_p10']:.2f}x", r["info"]]
                              for r in rows_out], right={1, 2, 3, 4, 5}), flush=True)
    return out


def digits_models():
    (xtr, ytr), (xte, yte) = digits()
    torch.manual_seed(0)
    cnn = train_classifier(DigitsCNN(), batches(xtr, ytr, 64, shuffle=True), epochs=10)
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                        nn.Linear(256, 10))
    mlp = train_classifier(mlp, batches(xtr, ytr, 64, shuffle=True), epochs=20)
    return {"digits cnn": cnn, "digits mlp": mlp}, (xtr, ytr), (xte, yte)


def bench_accuracy(args) -> list[dict]:
    models, (xtr, ytr), (xte, yte) = digits_models()
    out = []
    tmp = tempfile.mkdtemp()
    x1 = (xte[:1],)
    for name, model in models.items():
        torch.manual_seed(0)
        dense_acc = accuracy(model, xte, yte)
        t = time.perf_counter()
        pipe = f"fold_bn,sparsify(sparsity={args.sparsity},steps={args.steps})"
        opt = graphopt.optimize(model, target="torch", pipeline=pipe, example_inputs=x1,
                                train_data=batches(xtr, ytr, 32, shuffle=True))
        train_s = time.perf_counter() - t
        sparse_acc = accuracy(opt.graph_module, xte, yte)
        builds = {"dense": graphopt.optimize(model, target=args.target, pipeline="fold_bn,cleanup", example_inputs=x1)}
        for kernel in ("auto", "sparse"):
            # same trained weights, lowered with another kernel choice
            gm = opt.graph_module
            for m in gm.modules():
                if hasattr(m, "mask") and hasattr(m, "kernel"):
                    m.kernel = kernel
            builds[f"sparse kernel={kernel}"] = graphopt.optimize(gm, target=args.target, pipeline="",
                                                                  example_inputs=x1)
        if args.int8:
            # the same sparse weights, then static int8 (calibrated on 32 training images): int8 values in
            # the sparse kernels (kernel=sparse), and the dense int8 build of the dense model for reference
            calib = [(xtr[i:i + 1],) for i in range(32)]
            builds["dense int8"] = graphopt.optimize(model, target=args.target, example_inputs=x1, calibration=calib,
                                                     pipeline="fold_bn,cleanup,quantize(progress=false)")
            for m in gm.modules():
                if hasattr(m, "mask") and hasattr(m, "kernel"):
                    m.kernel = "sparse"
            builds["sparse int8 kernel=sparse"] = graphopt.optimize(gm, target=args.target, example_inputs=x1,
                                                                    calibration=calib,
                                                                    pipeline="quantize(progress=false)")
        sizes = {k: os.path.getsize(b.save(os.path.join(tmp, f"{name.replace(' ', '_')}_{k.replace(' ', '_').replace('=', '-')}.gopt")))
                 for k, b in builds.items()}
        # the model file (graphopt.compressed: the optimized graph and its weights, zstd; compiled again when
        # loaded): what a size comparison in Deep Compression's sense measures, without the compiled code
        files, file_accs = {}, {}
        for k, b_ in builds.items():
            fpath = os.path.join(tmp, f"{name.replace(' ', '_')}_{k.replace(' ', '_').replace('=', '-')}.goptz")
            files[k] = os.path.getsize(compressed.save(b_, fpath))
            with torch.no_grad():
                gm_back = compressed.load(fpath)
                file_accs[k] = sum((gm_back(xte[i:i + 1]).argmax(-1) == yte[i]).item()
                                   for i in range(len(xte))) / len(xte) * 100
        accs = {}
        with torch.no_grad():
            for k, b in builds.items():
                accs[k] = sum((b(xte[i:i + 1]).argmax(-1) == yte[i]).item() for i in range(len(xte))) / len(xte) * 100
        times = time_interleaved({k: (lambda b=b: b(*x1)) for k, b in builds.items()}, rounds=args.rounds)
        libs = {k: _library_bytes(os.path.join(tmp, f"{name.replace(' ', '_')}_{k.replace(' ', '_').replace('=', '-')}.gopt"))
                for k in builds}
        for k in builds:
            out.append({"model": name, "variant": k, "accuracy": accs[k], "artifact_bytes": sizes[k],
                        "library_bytes": libs[k], "weights_stored": _weights_line(builds[k]),
                        "dense_artifact_over_this": sizes["dense"] / sizes[k], "median_ms": times[k]["median_ms"],
                        "file_bytes": files[k], "file_accuracy": file_accs[k],
                        "dense_file_over_this": files["dense"] / files[k],
                        "dense_artifact_over_file": sizes["dense"] / files[k],
                        "dense_over_this": times["dense"]["median_ms"] / times[k]["median_ms"],
                        "report_sparse": builds[k].report.backend.get("sparse", "")})
        print(f"{name}: dense accuracy (eager) {dense_acc:.2f}%, after {pipe} {sparse_acc:.2f}% "
              f"(delta {sparse_acc - dense_acc:+.2f} pt; {train_s:.0f} s)")
        print(opt.report.records[-1].notes[0])
        print(format_table([["build", "accuracy %", "artifact kB", "dense / this (size)", "library kB (undeflated)",
                             "median ms", "dense / this (time)", "model file kB", "dense file / this",
                             "file accuracy %"]]
                           + [[r["variant"], f"{r['accuracy']:.2f}", f"{r['artifact_bytes'] / 1e3:.1f}",
                               f"{r['dense_artifact_over_this']:.2f}x", f"{r['library_bytes'] / 1e3:.1f}",
                               f"{r['median_ms']:.4f}", f"{r['dense_over_this']:.2f}x", f"{r['file_bytes'] / 1e3:.1f}",
                               f"{r['dense_file_over_this']:.2f}x", f"{r['file_accuracy']:.2f}"]
                              for r in out if r["model"] == name],
                           right={1, 2, 3, 4, 5, 6, 7, 8, 9}))
        for r in out:
            if r["model"] == name and r["report_sparse"]:
                print(f"  [{r['variant']}] {r['report_sparse']}")
        print(flush=True)
    return out


def _library_bytes(path: str) -> int:
    """Size of the artifact's library before the zip's deflate."""
    import zipfile

    with zipfile.ZipFile(path) as zf:
        names = [n for n in zf.namelist() if n != "graphopt.json"]
        return sum(zf.getinfo(n).file_size for n in names)


def _weights_line(opt) -> str:
    return opt.report.backend.get("sparse", "")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="speed,accuracy")
    ap.add_argument("--target", default="x86")
    ap.add_argument("--encoder", choices=["small", "base"], default="small")
    ap.add_argument("--blocks", default="16x1,1x16")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--steps", type=int, default=1500, help="gradual pruning steps (accuracy part)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--nm-patterns", default="2:4,4:8,16x1", help="nm part: the 50%% sparse layouts")
    ap.add_argument("--nm-kernel", default="sparse", choices=["sparse", "auto"], help="nm part: kernel= of sparsify")
    ap.add_argument("--conv-sparsity", type=float, default=0.8, help="convs part: block sparsity of the 1x1 convs")
    ap.add_argument("--conv-block", default="16x1", help="convs part: the block of the 1x1 convs")
    ap.add_argument("--nm-int8", action="store_true",
                    help="nm part: also dense int8 and each pattern followed by quantize (N:M int8 kernel)")
    ap.add_argument("--no-int8", dest="int8", action="store_false",
                    help="speed: skip the int8 variants (dense int8: cleanup,quantize; sparse int8: "
                         "sparsify then quantize, static int8 calibrated on 4 random batches)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    threads = set_threads(physical_cores())
    print(json.dumps({"machine": machine_info(), "threads": threads, "target": args.target}), flush=True)
    os.makedirs(args.out, exist_ok=True)
    for part in args.parts.split(","):
        res = {"speed": bench_speed, "nm": bench_nm, "convs": bench_convs}.get(part, bench_accuracy)(args)
        suffix = f"_{args.target.replace(':', '_')}" if part in ("nm", "convs") else ""
        with open(os.path.join(args.out, f"sparsity_{part}{suffix}.json"), "w") as f:
            json.dump(res, f, indent=2, default=str)


if __name__ == "__main__":
    main()
