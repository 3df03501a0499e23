"""How static int8's accuracy on an ecosystem_coverage model depends on the calibration count, on keeping
squeeze-and-excitation layers float (quantize's se_blocks) and on bias correction (quantize's bias_correction,
--bias-correction true,false), measured on the PyTorch QDQ graph (target "torch": no build, the integer
semantics the compiled kernels reproduce) over several fresh inputs, not one.

    python benchmarks/int8_calibration_study.py --model mobilenetv3_large_100
    python benchmarks/int8_calibration_study.py --model regnety_016 --calib 4,32 --evals 8
    python benchmarks/int8_calibration_study.py --model efficientnet_b0 --calib 32 --se float \
        --bias-correction true,false

Prints one line per (se_blocks, calibration count, bias_correction): cosine with eager on the coverage table's
fresh input (seed 1) and the mean and minimum over --evals fresh inputs (seeds 1, 100, 101, ...). Same model,
weights and inputs as benchmarks/ecosystem_coverage.py. Optionally (--layers) the output cosine lost when only one kind
of layer is quantized (depthwise, pointwise, SE, ...), to see where int8 loses accuracy.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import ecosystem_coverage as cov  # noqa: E402


def _cos(a, b) -> float:
    return float(F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def _kind(path: str, gm, se: set) -> str:
    from torch import nn

    mod = gm.get_submodule(path)
    if path in se:
        return "SE (squeeze-excitation)"
    if isinstance(mod, nn.Conv2d):
        if mod.groups > 1:
            return "depthwise/grouped conv"
        return "1x1 conv" if mod.kernel_size == (1, 1) else f"{mod.kernel_size[0]}x{mod.kernel_size[1]} conv"
    return type(mod).__name__


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mobilenetv3_large_100", help=f"from: {','.join(cov.MODELS)}")
    ap.add_argument("--calib", default="4,32", help="calibration counts")
    ap.add_argument("--se", default="float,int8", help="se_blocks values")
    ap.add_argument("--bias-correction", default="true", help="quantize's bias_correction values (true,false)")
    ap.add_argument("--evals", type=int, default=8)
    ap.add_argument("--layers", action="store_true", help="also: cosine lost per layer kind quantized alone")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import graphopt
    from graphopt.quant import graph as qgraph

    model, make, _ = cov.build(args.model)
    evals = [make(1)] + [make(100 + i) for i in range(args.evals - 1)]
    with torch.no_grad():
        refs = [model(*e) for e in evals]

    def score(gm) -> list[float]:
        with torch.no_grad():
            return [_cos(gm(*e), r) for e, r in zip(evals, refs)]

    print(f"{args.model}: static int8 (minmax), PyTorch QDQ graph, cosine with eager over {len(evals)} inputs")
    for se in args.se.split(","):
        for n in map(int, args.calib.split(",")):
            for bc in args.bias_correction.split(","):
                opt = graphopt.optimize(model, "torch", f"fold_bn,cleanup,quantize(progress=false,se_blocks={se},"
                                        f"bias_correction={bc})", example_inputs=make(0),
                                        calibration=[make(10 + i) for i in range(n)])
                c = score(opt.graph_module)
                print(f"  se_blocks={se:5s} calib={n:3d} bias_correction={bc:5s}  fresh {c[0]:.4f}  "
                      f"mean {sum(c) / len(c):.4f}  min {min(c):.4f}", flush=True)
    if args.layers:
        n = max(map(int, args.calib.split(",")))
        base = graphopt.optimize(model, "torch", "fold_bn,cleanup", example_inputs=make(0)).graph_module
        from graphopt.quant.se_block import squeeze_excitation_layers

        prepared, survey = qgraph.prepare(base, kinds=["linear", "conv2d", "matmul"])
        se = set(squeeze_excitation_layers(prepared, survey.sites))
        qgraph.calibrate(prepared, [make(10 + i) for i in range(n)])
        conv = qgraph.Converter(prepared)
        kinds: dict[str, list[str]] = {}
        for p in conv.layer_paths:
            kinds.setdefault(_kind(p, prepared, se), []).append(p)
        print(f"  one kind of layer quantized alone (calib={n}, full-range weights): mean cosine lost")
        for k, ps in sorted(kinds.items()):
            c = score(conv.build(ps))
            print(f"    {k:24s} {len(ps):3d} layer(s)  {1 - sum(c) / len(c):.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
