"""Deep Compression (Han et al. 2016) through graphopt's passes, measured: prune -> cluster -> quantize ->
entropy-coded file, on digits models trained here; held-out accuracy and file size against float32.

    python benchmarks/bench_deep_compression.py                         # digits CNN + digits MLP
    python benchmarks/bench_deep_compression.py --sparsity 0.9 --k 16 --models cnn

Pipeline (one graphopt.optimize call per model, target "torch" by default: the file is what is measured):
  fold_bn                         the CNN's BatchNorm into its convs
  sparsify(sparsity=S,steps=N)    gradual magnitude pruning of every Linear and Conv2d but the CNN's first conv
                                  (--prune-first prunes it too) (Zhu & Gupta's cubic
                                  schedule) while training on the digits training set with the float model as
                                  distillation teacher (Deep Compression's prune + retrain)
  cluster(k=K)                    weight sharing on the Linear layers: K shared float32 values per layer
                                  (k-means; pruned zeros stay exact zeros), 4-bit indices for K <= 16
  quantize                        int8 static for what is left float (the convs; calibration: training images)
  graphopt.compressed.save        the file: the graph (torch.save, zstd) + each clustered layer's indices
                                  zstd-coded (entropy coding: the pruned zeros make the indices very skewed)
  (cluster fine-tunes its centroids on the training set, indices fixed, since train_data is given)
With --finetune-ks 16,4 (default) a second table per model: the same pruned graph (sparsify run once) clustered
at each k without and with centroid fine-tuning, then quantized: held-out accuracy and file bytes.
Printed per model: held-out accuracy (float32, the compressed graph, the file loaded back, and the x86 build of
the pipeline with --compiled), the float32 parameter bytes, the file's bytes and sections, and the ratio; the
issue's goal is >= 20x smaller within 1 point of accuracy. Writes <out>/deep_compression_<model>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import graphopt  # noqa: E402
from _common import machine_info, physical_cores, set_threads  # noqa: E402
from graphopt import compressed  # noqa: E402
from graphopt.datasets import DigitsCNN, accuracy, batches, digits, train_classifier  # noqa: E402


class DigitsMLP(nn.Module):
    """64-512-256-10 MLP on the flattened 8x8 digits."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(),
                                 nn.Linear(256, 10))

    def forward(self, x):
        return self.net(x)


def bench(name: str, args) -> dict:
    torch.manual_seed(0)
    (xtr, ytr), (xte, yte) = digits()
    train = batches(xtr, ytr, 64, shuffle=True)
    model = train_classifier(DigitsCNN() if name == "cnn" else DigitsMLP(), train, epochs=args.epochs)
    acc_float = accuracy(model, xte, yte)
    float_bytes = sum(p.numel() * 4 for p in model.parameters())
    # the CNN's first conv (1 -> 32 channels, 9 weights per filter, 0.04% of the weights) is not pruned: at 90%
    # a filter keeps one weight (Deep Compression pruned AlexNet's conv1 by 16% only)
    keep = ",exclude=[features.0]" if name == "cnn" and args.keep_first else ""
    pipe = (f"{'fold_bn,' if name == 'cnn' else ''}sparsify(sparsity={args.sparsity},steps={args.steps}{keep}),"
            f"cluster(k={args.k}),quantize(progress=false)")
    t = time.perf_counter()
    opt = graphopt.optimize(model, args.target, pipe, example_inputs=(xte[:1],),
                            calibration=[xtr[i:i + 64] for i in range(0, 512, 64)], train_data=train)
    build_s = time.perf_counter() - t
    gm = opt.graph_module
    acc_graph = accuracy(gm, xte, yte)
    with tempfile.TemporaryDirectory() as d:
        path = compressed.save(opt, os.path.join(d, f"{name}.goptz"))
        file_bytes = os.path.getsize(path)
        sections = compressed.section_sizes(path)
        loaded = compressed.load(path)
        plain = os.path.join(d, "float.pt")
        torch.save(model.state_dict(), plain)
        float_file = os.path.getsize(plain)
    acc_file = accuracy(loaded, xte, yte)
    res = {"model": name, "pipeline": pipe, "build_s": round(build_s, 1), "float_param_bytes": float_bytes,
           "float_state_dict_file_bytes": float_file, "file_bytes": file_bytes, "sections": sections,
           "ratio": float_bytes / file_bytes, "acc_float": acc_float, "acc_graph": acc_graph, "acc_file": acc_file,
           "test_images": len(xte), "notes": [n for r in opt.report.records for n in r.notes]}
    if args.target != "torch":
        res["acc_compiled"] = accuracy(lambda x: torch.cat([opt(x[i:i + 1]) for i in range(len(x))]), xte, yte)
    return res


def finetune_table(name: str, args) -> list[dict]:
    """Held-out accuracy of `sparsify -> cluster(k) [-> centroid fine-tuning] -> quantize` for each k, pruned once."""
    import copy

    from graphopt.pipeline import Context, PassManager

    torch.manual_seed(0)
    (xtr, ytr), (xte, yte) = digits()
    train = batches(xtr, ytr, 64, shuffle=True)
    model = train_classifier(DigitsCNN() if name == "cnn" else DigitsMLP(), train, epochs=args.epochs)
    keep = ",exclude=[features.0]" if name == "cnn" and args.keep_first else ""
    prune = f"{'fold_bn,' if name == 'cnn' else ''}sparsify(sparsity={args.sparsity},steps={args.steps}{keep})"
    pruned = graphopt.optimize(model, "torch", prune, example_inputs=(xte[:1],), train_data=train).graph_module
    calib = [xtr[i:i + 64] for i in range(0, 512, 64)]
    rows = [{"model": name, "k": "-", "finetune": "-", "stage": prune, "acc": accuracy(model, xte, yte),
             "acc_pruned": accuracy(pruned, xte, yte)}]
    for k in args.finetune_ks:
        for ft in (False, True):
            ctx = Context(original=copy.deepcopy(model).eval(), example_inputs=(xte[:1],), calibration=calib,
                          train_data=train)
            t = time.perf_counter()
            gm, report = PassManager(f"cluster(k={k},finetune={str(ft).lower()}),quantize(progress=false)").run(
                copy.deepcopy(pruned), ctx)
            with tempfile.TemporaryDirectory() as d:
                size = os.path.getsize(compressed.save(gm, os.path.join(d, "m.goptz")))
            notes = [n for r in report.records for n in r.notes if "centroid fine-tuning" in n]
            rows.append({"model": name, "k": k, "finetune": ft, "acc": accuracy(gm, xte, yte), "file_bytes": size,
                         "seconds": round(time.perf_counter() - t, 1), "notes": notes})
    return rows


def print_finetune(rows: list[dict]) -> None:
    head = rows[0]
    print(f"\n{head['model']}: {head['stage']} once (float32 {head['acc']:.2f}%, pruned {head['acc_pruned']:.2f}%), "
          f"then cluster(k) [centroid fine-tuning] -> quantize; held-out accuracy:")
    print("| model | k | fine-tuned | held-out accuracy | vs float32 | file bytes | seconds |")
    print("|---|---|---|---|---|---|---|")
    for r in rows[1:]:
        print(f"| {r['model']} | {r['k']} | {'yes' if r['finetune'] else 'no'} | {r['acc']:.2f}% | "
              f"{r['acc'] - head['acc']:+.2f} pt | {r['file_bytes']:,} | {r['seconds']} |")
    for r in rows[1:]:
        for n in r["notes"]:
            print(f"  [k={r['k']}] {n[:240]}")


def print_result(r: dict) -> None:
    print(f"\n{r['model']}: {r['pipeline']}  ({r['build_s']} s)")
    print(f"  held-out accuracy ({r['test_images']} images): float32 {r['acc_float']:.2f}%, compressed graph "
          f"{r['acc_graph']:.2f}%, file loaded back {r['acc_file']:.2f}%"
          + (f", compiled {r['acc_compiled']:.2f}%" if "acc_compiled" in r else "")
          + f"  (drop {r['acc_float'] - r['acc_file']:.2f} pt; goal <= 1)")
    print(f"  float32 parameters {r['float_param_bytes']:,} B (state_dict file {r['float_state_dict_file_bytes']:,} B)"
          f" -> compressed file {r['file_bytes']:,} B: {r['ratio']:.1f}x smaller (goal >= 20x)")
    print("  sections: " + ", ".join(f"{k} {v:,} B" for k, v in r["sections"].items()))
    for n in r["notes"]:
        if any(s in n for s in ("sparsity", "clustered", "accuracy", "agreement")):
            print(f"  [{n[:200]}]")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="cnn,mlp")
    ap.add_argument("--target", default="torch")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--prune-first", dest="keep_first", action="store_false",
                    help="prune the CNN's first conv too")
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--finetune-ks", default="16,4", help="k values of the fine-tuning table ('' to skip it)")
    ap.add_argument("--skip-pipeline", action="store_true", help="only the fine-tuning table")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    args.finetune_ks = [int(k) for k in args.finetune_ks.split(",") if k.strip()]
    set_threads(physical_cores())
    os.makedirs(args.out, exist_ok=True)
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if not args.skip_pipeline:
            res = bench(name, args)
            res["machine"] = machine_info()
            print_result(res)
            with open(os.path.join(args.out, f"deep_compression_{name}.json"), "w") as f:
                json.dump(res, f, indent=1, default=str)
        if args.finetune_ks:
            rows = finetune_table(name, args)
            print_finetune(rows)
            with open(os.path.join(args.out, f"deep_compression_finetune_{name}.json"), "w") as f:
                json.dump({"rows": rows, "machine": machine_info()}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
