"""Dynamic shapes, measured: one graphopt build for every batch size and sequence length vs per-shape builds.

    python benchmarks/bench_dynamic.py                                   # small encoder, batch 1/8/32 x seq 16/128/512
    python benchmarks/bench_dynamic.py --encoder base --batches 1,8 --seqs 16,128
    python benchmarks/bench_dynamic.py --int8 --ort                      # + int8 builds and ONNX Runtime peers
    python benchmarks/bench_dynamic.py --int8 --quantize mode=dynamic,bits=4   # the int8 columns run W4A8

A BERT-style encoder (graphopt.models.BertStyleEncoder, random weights; "small": 4 layers, hidden 256; "base":
BERT-base's shape) is compiled ONCE with dynamic={"batch": (1, max batch), "seq": (8, max seq)}. At every grid
point (batch x seq) these variants are timed interleaved round-robin in this process (so load changes on a
shared machine hit all alike; median ms per call):
  dyn          the one dynamic graphopt build (fp32)
  static       a graphopt build for exactly that shape (fp32), with --static (default on)
  ort          ONNX Runtime fp32 with dynamic axes (one session for the whole grid), with --ort
  dyn-int8 / static-int8 / ort-int8    the same in int8 (graphopt quantize, calibrated on varied shapes;
               ORT static QDQ per-channel), with --int8
Prints, per point, the latencies and the ratios dyn/static and dyn/ort (<= 1.0 is as fast or faster), and
the maximum |difference| of each build from eager PyTorch at that point. Writes <out>/dynamic_<encoder>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import (first_line, format_table, machine_info, physical_cores, set_threads,  # noqa: E402
                                time_interleaved)


def make_encoder(size: str, max_seq: int):
    import torch

    from graphopt.models import BertStyleEncoder

    torch.manual_seed(0)
    if size == "base":
        return BertStyleEncoder(max_len=max(512, max_seq)).eval()
    if size == "tiny":
        return BertStyleEncoder(vocab=1000, hidden=64, layers=2, heads=4, ffn=128, max_len=max_seq).eval()
    return BertStyleEncoder(vocab=8000, hidden=256, layers=4, heads=4, ffn=1024, max_len=max_seq).eval()


def ids(vocab: int, batch: int, seq: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed * 1000 + batch * 7 + seq)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def ort_sessions(model, example, calib, tmpdir: str, int8: bool, threads: int) -> dict:
    """ONNX Runtime fp32 (and static QDQ int8) sessions with dynamic batch and sequence axes."""
    import onnxruntime as ort
    import torch

    path = os.path.join(tmpdir, "enc.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, example, path, input_names=["ids"], output_names=["y"], dynamo=False,
                          dynamic_axes={"ids": {0: "batch", 1: "seq"}, "y": {0: "batch"}})
    paths = {"ort": path}
    if int8:
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.it = iter([{"ids": c.numpy()} for c in calib])

            def get_next(self):
                return next(self.it, None)

        qpath = os.path.join(tmpdir, "enc_int8.onnx")
        quantize_static(path, qpath, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        paths["ort-int8"] = qpath
    ort.set_default_logger_severity(3)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    out = {}
    for name, p in paths.items():
        sess = ort.InferenceSession(p, so, providers=["CPUExecutionProvider"])
        out[name] = (lambda s: (lambda x: torch.from_numpy(s.run(None, {"ids": x.numpy()})[0])))(sess)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", default="small", choices=["tiny", "small", "base"])
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--seqs", default="16,128,512")
    ap.add_argument("--target", default="x86")
    ap.add_argument("--int8", action="store_true", help="also int8 builds (and ORT int8 with --ort)")
    ap.add_argument("--ort", action="store_true", help="ONNX Runtime peers with dynamic axes")
    ap.add_argument("--quantize", default="progress=false",
                    help="options of the int8 builds' quantize pass, e.g. 'mode=dynamic,bits=4' (W4A8)")
    ap.add_argument("--no-static", action="store_true", help="skip the per-shape static builds")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--slice", type=float, default=0.3, help="seconds per variant per round")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)

    threads = args.threads or physical_cores()
    set_threads(threads)
    import torch

    import graphopt

    batches = [int(b) for b in args.batches.split(",")]
    seqs = [int(s) for s in args.seqs.split(",")]
    max_b, max_s = max(batches), max(seqs)
    model = make_encoder(args.encoder, max_s)
    vocab = model.tokens.num_embeddings
    # a dim's range has at least two sizes (batch 1..1 would not be dynamic); the example and the calibration
    # shapes stay inside the bounds whatever the grid
    dims = {"batch": (1, max(max_b, 2)), "seq": (8, max(max_s, 16))}
    example = (ids(vocab, 2, 16),)
    # calibration on varied shapes inside the bounds
    calib = [ids(vocab, b, s, seed=1) for b, s in ((1, 16), (2, 64), (4, 32), (1, 128), (2, 8))
             if b <= dims["batch"][1] and s <= dims["seq"][1]]
    print(f"machine: {machine_info().get('cpu', '?')}, {threads} threads; encoder {args.encoder}; "
          f"target {args.target}; dynamic {dims}", flush=True)

    builds: dict[str, object] = {}
    build_s: dict[str, float] = {}

    def build(key: str, pipeline: str, example_inputs, dynamic=None):
        t = time.perf_counter()
        opt = graphopt.optimize(model, args.target, pipeline, example_inputs=example_inputs, dynamic=dynamic,
                                calibration=calib if "quantize" in pipeline else None)
        build_s[key] = round(time.perf_counter() - t, 1)
        print(f"  built {key}: {build_s[key]} s  kernels: {opt.report.backend.get('kernels', '')}", flush=True)
        return opt

    fp32, int8 = "cleanup", f"cleanup,quantize({args.quantize})"
    if args.int8:
        print(f"int8 columns: {int8}", flush=True)
    builds["dyn"] = build("dyn", fp32, example, dims)
    if args.int8:
        builds["dyn-int8"] = build("dyn-int8", int8, example, dims)
    peers = {}
    tmp = tempfile.TemporaryDirectory()
    if args.ort:
        peers = ort_sessions(model, example, calib, tmp.name, args.int8, threads)

    rows, results = [], []
    for b in batches:
        for s in seqs:
            x = ids(vocab, b, s, seed=2)
            fns = {"dyn": builds["dyn"]}
            if not args.no_static:
                fns["static"] = build(f"static {b}x{s}", fp32, (x,))
            if args.int8:
                fns["dyn-int8"] = builds["dyn-int8"]
                if not args.no_static:
                    fns["static-int8"] = build(f"static-int8 {b}x{s}", int8, (x,))
            fns.update(peers)
            with torch.no_grad():
                ref = model(x)
            err = {}
            for k, fn in fns.items():
                try:
                    err[k] = float((fn(x) - ref).abs().max())
                except Exception as e:           # noqa: BLE001 - reported, the grid goes on
                    err[k] = f"error: {first_line(e)}"
            timed = time_interleaved({k: (lambda f=fn: f(x)) for k, fn in fns.items() if not isinstance(err[k], str)},
                                     rounds=args.rounds, slice_s=args.slice, budget_s=60)
            ms = {k: v["median_ms"] for k, v in timed.items()}

            def ratio(a, c):
                return f"{ms[a] / ms[c]:.2f}" if a in ms and c in ms else "-"

            row = {"batch": b, "seq": s, "ms": ms, "max_abs_err": err}
            results.append(row)
            rows.append([str(b), str(s)] + [f"{ms[k]:.2f}" if k in ms else "-" for k in
                                            ("dyn", "static", "ort", "dyn-int8", "static-int8", "ort-int8")]
                        + [ratio("dyn", "static"), ratio("dyn", "ort"), ratio("dyn-int8", "static-int8"),
                           ratio("dyn-int8", "ort-int8")])
            print(f"  {b}x{s}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items())
                  + "; max|Δ| vs eager: " + ", ".join(f"{k} {v:.1e}" if isinstance(v, float) else f"{k} {v}"
                                                      for k, v in err.items()), flush=True)
    header = ["batch", "seq", "dyn ms", "static ms", "ort ms", "dyn-int8", "static-int8", "ort-int8",
              "dyn/static", "dyn/ort", "int8 dyn/static", "int8 dyn/ort"]
    print()
    print(format_table([header] + rows, right=set(range(len(header)))))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"dynamic_{args.encoder}.json"), "w") as f:
            json.dump({"encoder": args.encoder, "target": args.target, "threads": threads, "dynamic": dims,
                       "build_s": build_s, "grid": results}, f, indent=1)
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
