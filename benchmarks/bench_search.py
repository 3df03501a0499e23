"""Accuracy-aware search, measured: every latency is from the model compiled for the target, in this run.

    python benchmarks/bench_search.py                      # digits CNN + ResNet-18-shaped + BERT-shaped
    python benchmarks/bench_search.py --models digits --target x86 --out benchmarks/results
    python benchmarks/bench_search.py --models digits --objective size --compressed   # smallest within budget

digits: a CNN trained here on scikit-learn's bundled digits; metric = top-1 accuracy on the held-out
split, budget 1 point; compressed candidates may be followed by distillation on the training split.
resnet18 / bert: random-weight models (no data can be downloaded); metric = cosine similarity (x100) of
outputs with the original model on generated inputs, budget 1.0 (i.e. cosine >= 0.99).
The space is graphopt.searcher.default_space (prune, lowrank, sparsify, cluster, int8 / int4 / mixed
quantize and their combinations; digits adds distillation twins) unless --legacy-space (the grid without
sparsity, bits and clusters). --objective picks latency (default), size (stored weight bytes) or compressed
(graphopt.compressed file bytes; --compressed records them for every objective).
Writes <out>/search_<model>.json and .png, prints each Pareto table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import graphopt  # noqa: E402
from graphopt.datasets import DigitsCNN, accuracy, batches, digits, train_classifier  # noqa: E402
from graphopt.models import BertStyleEncoder  # noqa: E402


def _space(base: str, with_distill: bool, args=None, prune_ratios=(0.25, 0.5), energies=(0.9, 0.95), quant=True):
    if args is not None and not args.legacy_space:
        from graphopt.searcher import default_space

        space = default_space(distill=with_distill)
        return [s.replace("distill(epochs=2,progress=false)", "distill(epochs=3,lr=0.001,progress=false)")
                for s in space]
    have = graphopt.available_passes()
    out = [base]
    comp = []
    if "prune" in have:
        comp += [f"prune(ratio={r})" for r in prune_ratios]
    if "lowrank" in have:
        comp += [f"lowrank(energy={e})" for e in energies]
    if "prune" in have and "lowrank" in have:
        comp += [f"prune(ratio={prune_ratios[0]}),lowrank(energy={energies[-1]})"]
    out += [f"{base},{c}" for c in comp]
    if with_distill and "distill" in have:
        out += [f"{base},{c},distill(epochs=3,lr=0.001,progress=false)" for c in comp]
    if quant and "quantize" in have:
        out += [f"{base},quantize"]
        out += [f"{base},{c},quantize" for c in comp[:1]]
    return out


def run_digits(args):
    torch.manual_seed(0)
    (xtr, ytr), (xte, yte) = digits()
    model = train_classifier(DigitsCNN(), batches(xtr, ytr, 64, shuffle=True), epochs=10)
    print(f"digits CNN trained: test top-1 {accuracy(model, xte, yte):.2f}%", flush=True)
    bs = 64
    n = len(xte) - len(xte) % bs
    data = (xte[:n], yte[:n])
    calib = [xtr[i:i + bs] for i in range(0, 512, bs)]
    return graphopt.search(model, args.target, data, graphopt.top1, budget=1.0, example_inputs=(xte[:bs],),
                           space=_space("fold_bn,cleanup", True, args), calibration=calib,
                           train_data=batches(xtr, ytr, 64, shuffle=True),
                           state=os.path.join(args.out, "search_digits.state.json"), repeats=args.repeats,
                           objective=args.objective, compressed=args.compressed)


def _cosine_search(name, model, make_input, args, n_eval=8):
    torch.manual_seed(1)
    example = make_input()
    data = [make_input() for _ in range(n_eval)]
    calib = [make_input() for _ in range(8)]
    return graphopt.search(model, args.target, data, graphopt.cosine(model), budget=1.0,
                           example_inputs=(example,), space=_space("fold_bn,cleanup", False, args),
                           calibration=calib, state=os.path.join(args.out, f"search_{name}.state.json"),
                           repeats=args.repeats, objective=args.objective, compressed=args.compressed)


def run_resnet18(args):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    size = args.image_size
    return _cosine_search("resnet18", model, lambda: torch.randn(1, 3, size, size), args)


def run_bert(args):
    torch.manual_seed(0)
    model = BertStyleEncoder(hidden=768, heads=12, ffn=3072, layers=args.bert_layers).eval()
    return _cosine_search("bert", model, lambda: torch.randint(0, 30522, (1, 128)), args)


RUNNERS = {"digits": run_digits, "resnet18": run_resnet18, "bert": run_bert}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="digits,resnet18,bert")
    p.add_argument("--target", default="x86")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--bert-layers", type=int, default=4, help="BERT-base width, this many layers")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--objective", default="latency", choices=["latency", "size", "compressed"])
    p.add_argument("--compressed", action="store_true", help="record graphopt.compressed file bytes too")
    p.add_argument("--legacy-space", action="store_true", help="the grid without sparsity, bits and clusters")
    p.add_argument("--resume", action="store_true", help="keep candidates measured by an interrupted run")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if not args.resume:
        for name in args.models.split(","):
            state = os.path.join(args.out, f"search_{name}.state.json")
            if os.path.exists(state):
                os.remove(state)
    summary = {}
    for name in args.models.split(","):
        start = time.perf_counter()
        result = RUNNERS[name](args)
        print(f"\n=== search on {name} (target {args.target}, {time.perf_counter() - start:.0f} s)")
        print(result.table(), flush=True)
        png = result.plot(os.path.join(args.out, f"search_{name}.png"))
        summary[name] = {"baseline": result.baseline.__dict__,
                         "chosen": result.chosen.__dict__ if result.chosen else None,
                         "candidates": [c.__dict__ for c in result.candidates], "plot": png}
    with open(os.path.join(args.out, "search_summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
