"""int8 quantization, measured: speed and accuracy of graphopt's int8 builds against float32 peers, this run.

    python benchmarks/bench_quantize.py                                  # digits, mlp, encoder, resnet18, mobilenet_v2
    python benchmarks/bench_quantize.py --models digits,mlp --target x86 --out benchmarks/results
    python benchmarks/bench_quantize.py --models encoder --encoder base  # BERT-base shape (slow to build)
    python benchmarks/bench_quantize.py --ort --target x86:haswell      # the AVX2 int8 path on any newer x86

--target takes graphopt's target aliases (x86, x86:<llvm cpu>, ...): "x86:haswell" builds the AVX2 int8 kernels
and "x86:skylake-avx512" the AVX-512BW ones (no VNNI), which run on this machine when it has those features;
each table says which int8 path (vnni / avx512bw / avx2 / cpu) ran.

Variants per model (all measured in this process, timings interleaved round-robin so load changes on a
shared machine hit every variant alike; median ms per call at batch 1):
  eager        PyTorch eager float32 (the original model)
  ours-fp32    graphopt fold_bn,cleanup compiled for the target (our own float32 build)
  ours-int8    + quantize (static, calibrated; the default for the model's target)
  ours-dyn     + quantize(mode=dynamic)      (Linear-heavy models only)
  ours-woq     + quantize(mode=weight_only)  (Linear-heavy models only)
  ours-int8-w8 + quantize(reduce_range=false), with --full-range-weights: on the avx2/avx512bw paths, full
               [-127, 127] weights through the exact pair split instead of [-64, 64] weights (the trade-off
               of the quantizer's default)
  ort-fp32 / ort-int8   ONNX Runtime float32 and static QDQ int8 (per-channel), with --ort
  ort-int8-rr  ONNX Runtime int8 with reduce_range=True (7-bit weights), with --ort on the avx2 / avx512bw
               paths: ORT's own setting for CPUs without VNNI, where its u8·s8 kernels (vpmaddubsw, as ours)
               saturate 8-bit weight pairs. On a machine that has VNNI, plain ort-int8 runs ORT's VNNI kernels
               with 8-bit weights, so its accuracy there is not what it gets on an AVX2-only CPU; ort-int8-rr
               is the like-for-like peer of our 7-bit-weight AVX2 build.
Accuracy vs float32 (never vs labels alone):
  digits   a CNN trained here on scikit-learn's bundled digits; top-1 accuracy of each variant on the held-out
           split and top-1 agreement with float32
  encoder  a BERT-style encoder (random weights: nothing can be downloaded) fed real English sentences,
           tokenized by hashing words into its vocabulary; cosine similarity and top-1 agreement of outputs
  mlp / resnet18 / mobilenet_v2   random weights and inputs: cosine similarity of outputs with float32
Writes <out>/quantize_<model>.json and prints one table per model.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zlib

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import graphopt  # noqa: E402
from _common import physical_cores, set_threads, time_interleaved  # noqa: E402
from graphopt.datasets import DigitsCNN, batches, digits, train_classifier  # noqa: E402
from graphopt.models import BertStyleEncoder, get_model  # noqa: E402

SENTENCES = """\
The quick brown fox jumps over the lazy dog.
A journey of a thousand miles begins with a single step.
The weather today is cold and windy with a chance of rain.
She sold the old car and bought a bicycle to ride to work.
Compilers translate programs written in one language into another.
Quantization maps floating point values onto a small set of integers.
The museum opens at nine and closes at five on weekdays.
He forgot his umbrella on the train again this morning.
Graph optimizers rewrite neural networks before they are compiled.
The children built a sand castle near the edge of the water.
Please send the report to the whole team before Friday.
Fresh bread from the bakery on the corner sells out early.
The committee postponed the vote until the next meeting.
Light travels faster than sound through the open air.
Our flight was delayed for three hours because of fog.
The recipe calls for two eggs, flour, sugar and a pinch of salt.
Most of the library's books were donated by local families.
The river flooded the valley after a week of heavy rain.
A good night of sleep improves memory and concentration.
The engineers measured the latency of every layer in the model.
Mountains in the north are covered with snow for half the year.
The orchestra played a symphony written more than two centuries ago.
Farmers planted corn in the spring and harvested it in autumn.
The new bridge will connect the island to the mainland.
Nobody expected the small team to win the championship.
The painter mixed blue and yellow to get a bright green.
Reading aloud to children helps them learn new words.
The server crashed because its disk was completely full.
Tourists crowded the square to watch the clock strike noon.
The detective found a muddy footprint under the window.
Solar panels on the roof provide most of the house's power.
The market was full of fruit, vegetables and fresh fish.
"""


def tokenize(sentences: list[str], vocab: int, seq: int) -> torch.Tensor:
    """Word-level ids by a stable hash (crc32) into [2, vocab); id 1 = [CLS] first, 0 = padding."""
    rows = []
    for s in sentences:
        words = [w.strip(".,'").lower() for w in s.split()]
        ids = [1] + [2 + zlib.crc32(w.encode()) % (vocab - 2) for w in words if w][: seq - 1]
        rows.append(ids + [0] * (seq - len(ids)))
    return torch.tensor(rows, dtype=torch.int64)


# ------------------------------------------------------------------------------------------ models
def model_digits():
    torch.manual_seed(0)
    (xtr, ytr), (xte, yte) = digits()
    model = train_classifier(DigitsCNN(), batches(xtr, ytr, 64, shuffle=True), epochs=10)
    calib = [xtr[i:i + 64] for i in range(0, 512, 64)]
    return dict(model=model, example=(xte[:1],), calib=calib, eval_x=xte, labels=yte, linear_heavy=False,
                fold="fold_bn,cleanup")


def model_encoder(size: str):
    torch.manual_seed(0)
    if size == "base":
        model, seq = BertStyleEncoder().eval(), 128
    else:                       # a small BERT: 4 layers, hidden 256 (builds in a minute on 2 cores)
        model, seq = BertStyleEncoder(vocab=8000, hidden=256, layers=4, heads=4, ffn=1024).eval(), 64
    sents = [s for s in SENTENCES.splitlines() if s.strip()]
    ids = tokenize(sents, model.tokens.num_embeddings, seq)
    calib = [ids[i:i + 1] for i in range(0, 16)]                 # first half: calibration
    return dict(model=model, example=(ids[:1],), calib=calib, eval_x=ids[16:], labels=None, linear_heavy=True,
                fold="cleanup")


def model_zoo(name: str):
    model, (x,) = get_model(name)
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(x.shape, generator=g) for _ in range(8)]
    eval_x = torch.cat([torch.randn(x.shape, generator=g) for _ in range(4)])
    return dict(model=model, example=(x,), calib=calib, eval_x=eval_x, labels=None,
                linear_heavy=(name == "mlp"), fold="fold_bn,cleanup")


# ------------------------------------------------------------------------------------------ measure
def per_sample(fn, xs: torch.Tensor) -> torch.Tensor:
    """Run a batch-1 compiled model over every sample."""
    with torch.no_grad():
        return torch.cat([fn(xs[i:i + 1]) for i in range(len(xs))])


def interleaved_ms(fns: dict, x: tuple, rounds: int) -> dict[str, float]:
    """Median ms per call of each fn, timed interleaved (benchmarks/_common.time_interleaved: a block of calls
    per fn and round, one untimed call first so the previous runtime's spinning thread pool is not timed)."""
    for fn in fns.values():                         # warm up
        with torch.no_grad():
            fn(*x)
    stats = time_interleaved({k: (lambda fn=fn: fn(*x)) for k, fn in fns.items()}, rounds=rounds, slice_s=0.2)
    return {k: v["median_ms"] for k, v in stats.items()}


def ort_variants(model, example, calib, tmpdir, reduce_range: bool = False):
    """ONNX Runtime float32 and static QDQ int8 (per-channel weights) sessions, or {} if unavailable;
    `reduce_range`: also ort-int8-rr, the int8 model quantized with 7-bit weights."""
    try:
        import numpy as np
        import onnxruntime as ort
        from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                              quantize_static)
    except ImportError:
        return {}
    path = os.path.join(tmpdir, "model.onnx")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, example, path, input_names=["x"], output_names=["y"], dynamo=False)

    class Reader(CalibrationDataReader):
        def __init__(self):
            rows = [c[i:i + 1] for c in calib for i in range(len(c))][:64]    # the model was exported at batch 1
            self.it = iter([{"x": r.numpy()} for r in rows])

        def get_next(self):
            return next(self.it, None)

    models = [("ort-fp32", path)]
    for key, rr in (("ort-int8", False), ("ort-int8-rr", True))[:2 if reduce_range else 1]:
        qpath = os.path.join(tmpdir, f"{key}.onnx")
        quantize_static(path, qpath, Reader(), quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=rr,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        models.append((key, qpath))
    ort.set_default_logger_severity(3)
    so = ort.SessionOptions()
    so.intra_op_num_threads = physical_cores()
    so.log_severity_level = 3
    out = {}
    for name, p in models:
        sess = ort.InferenceSession(p, so, providers=["CPUExecutionProvider"])
        out[name] = (lambda s: (lambda x: torch.from_numpy(s.run(None, {"x": x.numpy()})[0])))(sess)
    _ = np
    return out


def bench_model(name: str, spec: dict, args) -> dict:
    model, example, calib = spec["model"], spec["example"], spec["calib"]
    variants = {"eager": model}
    builds = {"ours-fp32": spec["fold"]}
    builds["ours-int8"] = spec["fold"] + ",quantize(progress=false)"
    if args.full_range_weights:
        builds["ours-int8-w8"] = spec["fold"] + ",quantize(reduce_range=false,progress=false)"
    if spec["linear_heavy"]:
        builds["ours-dyn"] = spec["fold"] + ",quantize(mode=dynamic)"
        builds["ours-woq"] = spec["fold"] + ",quantize(mode=weight_only)"
    info = {}
    for key, pipe in builds.items():
        t = time.perf_counter()
        opt = graphopt.optimize(model, args.target, pipe, example_inputs=example, calibration=calib)
        info[key] = {"pipeline": pipe, "build_s": round(time.perf_counter() - t, 1),
                     "int8": opt.report.backend.get("int8", ""), "size_bytes": opt.report.final.size_bytes,
                     "notes": [n for r in opt.report.records for n in r.notes]}
        variants[key] = opt
        print(f"  built {key}: {info[key]['build_s']} s  {info[key]['int8']}", flush=True)
    if args.ort:
        import tempfile

        from graphopt.backends.targets import resolve_target
        from graphopt.backends.tvm.quant_lower import PAIR_PATHS, int8_path

        with tempfile.TemporaryDirectory() as d:
            variants.update(ort_variants(model, example, calib, d,
                                         reduce_range=int8_path(resolve_target(args.target)) in PAIR_PATHS))
    ms = interleaved_ms(variants, example, args.rounds)
    with torch.no_grad():
        ref = per_sample(model, spec["eval_x"])
    rows = {}
    for key, fn in variants.items():
        out = ref if key == "eager" else per_sample(fn, spec["eval_x"])
        row = {"ms": round(ms[key], 3), "speedup_vs_ours_fp32": round(ms["ours-fp32"] / ms[key], 2),
               "speedup_vs_eager": round(ms["eager"] / ms[key], 2),
               "cosine": round(F.cosine_similarity(out.flatten().double(), ref.flatten().double(), dim=0).item(),
                               6),
               "top1_agreement": round((out.argmax(-1) == ref.argmax(-1)).float().mean().item() * 100, 2)}
        if spec["labels"] is not None:
            row["top1_accuracy"] = round((out.argmax(-1) == spec["labels"]).float().mean().item() * 100, 2)
        rows[key] = {**row, **info.get(key, {})}
    line = info["ours-int8"]["int8"]
    path = line.split(":", 1)[0].removeprefix("path=") if line.startswith("path=") else "?"
    return {"model": name, "target": args.target, "int8_path": path, "batch": 1, "rows": rows}


def print_table(res: dict) -> None:
    keys = ["ms", "speedup_vs_ours_fp32", "speedup_vs_eager", "cosine", "top1_agreement", "top1_accuracy"]
    keys = [k for k in keys if any(k in r for r in res["rows"].values())]
    head = ["variant"] + keys
    table = [head] + [[v] + [str(r.get(k, "")) for k in keys] for v, r in res["rows"].items()]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    print(f"\n{res['model']} (target {res['target']}, int8 path {res.get('int8_path', '?')}, batch 1)")
    for row in table:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)))
    for v, r in res["rows"].items():
        if r.get("int8"):
            print(f"  [{v}] {r['int8']}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="digits,mlp,encoder,resnet18,mobilenet_v2")
    ap.add_argument("--target", default="x86")
    ap.add_argument("--encoder", choices=["small", "base"], default="small")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--ort", action="store_true", help="also measure ONNX Runtime float32 and int8")
    ap.add_argument("--full-range-weights", action="store_true",
                    help="also build quantize(reduce_range=false): [-127, 127] weights (exact pair split on avx2)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    import isa_peak

    ceiling = isa_peak.measure()           # before the thread pools start: one thread, an idle machine
    print(isa_peak.summary(ceiling), flush=True)
    set_threads(physical_cores())
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        print(f"{name}:", flush=True)
        if name == "digits":
            spec = model_digits()
        elif name == "encoder":
            spec = model_encoder(args.encoder)
        else:
            spec = model_zoo(name)
        res = bench_model(name, spec, args)
        res["int8_ceiling"] = ceiling
        print_table(res)
        with open(os.path.join(args.out, f"quantize_{name}.json"), "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
