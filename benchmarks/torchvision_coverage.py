"""Every torchvision classification model through graphopt: does it compile and match eager?

    python benchmarks/torchvision_coverage.py                        # all of list_models(torchvision.models)
    python benchmarks/torchvision_coverage.py --models resnet18,vit_b_16 --json cov.json
    python benchmarks/torchvision_coverage.py --max-params 100e6     # list bigger ones as skipped, with why

Per model (random weights, BatchNorm statistics randomized, zero-initialized layers and ConvNeXt's 1e-6 layer
scales made random, eval mode, batch 1, the smallest input the
architecture takes, 64×64 where it can; see SIZES) two runs, each in its own process (a crash, a memory
blow-up or --timeout cannot take the table down):

  x86    graphopt.optimize(model, "x86") with the default pipeline (fold_bn,cleanup), compiled with default
         schedules; the compiled output is compared with eager on a fresh input: rel|Δ| = max|Δ| / max|eager|,
         `ok` up to --rtol (1e-3), `DIFF` beyond
  prune  fold_bn,prune(ratio=0.3) on target "torch" (the pruned fx graph run in PyTorch): `ok` when it runs
         and keeps the output shapes; FLOPs kept and rel|Δ| vs the original model (approximate by design)

Failures show the error's class (graphopt's typed errors name the op/node/pass) and first line. Models are
run smallest first, so a run cut short still covers the most. Nothing is downloaded (weights=None).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (append_jsonl, first_line, format_table, peak_rss_gb, physical_cores,  # noqa: E402
                     run_child, set_threads)

# smallest input side each family accepts (default 64), and constructor options that make a smaller input valid
SIZES = {"inception_v3": 75, "maxvit_t": 224}
KWARGS = {"vit_b_16": {"image_size": 64}, "vit_b_32": {"image_size": 64}, "vit_l_16": {"image_size": 64},
          "vit_l_32": {"image_size": 64}, "vit_h_14": {"image_size": 56},
          "googlenet": {"aux_logits": False, "init_weights": True},
          "inception_v3": {"aux_logits": False, "init_weights": True}}
DEFAULT_SIZE = 64


def model_names() -> list[str]:
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def build(name: str):
    import torch
    import torchvision

    from graphopt.testing.random_models import randomize_norms

    torch.manual_seed(0)
    kwargs = KWARGS.get(name, {})
    size = kwargs.get("image_size", SIZES.get(name, DEFAULT_SIZE))
    model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    randomize_norms(model, 0)
    with torch.no_grad():              # ViT zero-inits its classifier: every output would be 0 and compare equal
        for m in model.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and not m.weight.any():
                m.weight.normal_(0, 0.02)
        for pname, p in model.named_parameters():   # ConvNeXt's layer scale starts at 1e-6: blocks would vanish
            if pname.endswith("layer_scale"):
                p.uniform_(0.5, 1.0)
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(1, 3, size, size, generator=g), torch.randn(1, 3, size, size, generator=g), size


def run_one(name: str, which: str, rtol: float) -> dict:
    """One model, one run ("x86" or "prune"), in this process. Returns a JSON-able row."""
    import torch

    import graphopt
    from graphopt.analysis.compare import compare_outputs

    row: dict = {"model": name, "run": which}
    try:
        model, x, fresh, size = build(name)
    except Exception as e:                                   # noqa: BLE001
        return {**row, "status": "fail", "kind": type(e).__name__, "error": first_line(e), "stage": "build"}
    row["size"] = size
    row["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    start = time.perf_counter()
    try:
        if which == "x86":
            opt = graphopt.optimize(model, target="x86", example_inputs=(x,))
            row["compile_s"] = round(time.perf_counter() - start, 1)
            got = opt(fresh)
        else:
            opt = graphopt.optimize(model, target="torch", pipeline="fold_bn,prune(ratio=0.3)", example_inputs=(x,))
            row["compile_s"] = round(time.perf_counter() - start, 1)
            got = opt(fresh)
            row["flops_kept"] = round(opt.report.final.flops / opt.report.records[0].flops, 3)
            row["report_max_abs"] = opt.report.final.max_abs
        with torch.no_grad():
            ref = model(fresh)
    except Exception as e:                                   # noqa: BLE001 - the table reports it
        return {**row, "status": "fail", "kind": type(e).__name__, "error": first_line(e),
                "seconds": round(time.perf_counter() - start, 1)}
    diff = compare_outputs(got, ref)             # prune: how far the approximation moved the outputs
    row["rel"] = diff.max_rel
    row["max_abs"] = diff.max_abs
    exact_enough = which == "prune" or diff.max_rel <= rtol
    row["status"] = "ok" if not diff.structure_error and exact_enough else "DIFF"
    if diff.structure_error:
        row["error"] = diff.structure_error
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def _child(name: str, which: str, rtol: float, timeout: float, threads: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--one", name, "--run", which, "--rtol", str(rtol),
           "--threads", str(threads)]
    row = run_child(cmd, name, which, timeout)
    if row.get("kind", "").startswith("exit"):
        import resource

        # killed (e.g. out of memory): the largest child so far, a lower bound on what this one reached
        row["peak_rss_gb_at_least"] = peak_rss_gb(resource.RUSAGE_CHILDREN)
    return row


def _params(name: str) -> float:
    """Parameter count without allocating the weights where the constructor allows (meta device)."""
    import torch
    import torchvision

    kwargs = {k: v for k, v in KWARGS.get(name, {}).items() if k != "init_weights"}
    try:
        with torch.device("meta"):
            m = torchvision.models.get_model(name, weights=None, **kwargs)
    except Exception:                       # e.g. regnet computes its widths with tensors: build it for real
        m = torchvision.models.get_model(name, weights=None, **kwargs)
    return sum(p.numel() for p in m.parameters())


def _cell(r: dict | None) -> list[str]:
    if r is None:
        return ["-", "", ""]
    if r["status"] == "fail":
        return [f"FAIL {r.get('kind', '')}", "", str(r.get("seconds", ""))]
    secs = r.get("compile_s")              # rows of older runs may hold only the total (compile + eager)
    return [r["status"], f"{r['rel']:.1e}", str(secs) if secs is not None else (
        f"({r['seconds']} total)" if r.get("seconds") else "")]


def _peak(rs: dict) -> str:
    """Peak resident memory of the model's runs in GiB, measured (≥: the run was killed before reporting)."""
    peaks = [r["peak_rss_gb"] for r in rs.values() if r.get("peak_rss_gb") is not None]
    if peaks:
        return f"{max(peaks):.1f}"
    low = [r["peak_rss_gb_at_least"] for r in rs.values() if r.get("peak_rss_gb_at_least") is not None]
    return f"≥{max(low):.1f}" if low else ""


def _print_table(results: dict, runs: list, sizes: dict, skipped: dict) -> None:
    header = ["model", "params M", "input"]
    for which in runs:
        header += [f"{which}: result", "rel|Δ|" if which == "x86" else "rel|Δ| vs orig",
                   "compile s" if which == "x86" else "s"] + (["FLOPs kept"] if which == "prune" else [])
    header.append("peak GiB")
    rows = [header]
    for n, rs in results.items():
        first = next(iter(rs.values()), {})
        row = [n, f"{sizes[n] / 1e6:.1f}", str(first.get("size", ""))]
        for which in runs:
            row += _cell(rs.get(which)) + ([str(rs.get(which, {}).get("flops_kept", ""))] if which == "prune" else [])
        rows.append(row + [_peak(rs)])
    for n, why in skipped.items():
        rows.append([n, f"{sizes[n] / 1e6:.1f}", "", f"skipped: {why}"] + [""] * (len(header) - 4))
    print()
    print(format_table(rows, right={1, 2}))
    for n, rs in results.items():
        for which, r in rs.items():
            if r["status"] != "ok":
                print(f"{n} [{which}]: {r.get('kind', r['status'])}: {r.get('error', '')}")
    for which in runs:
        ok = sum(rs.get(which, {}).get("status") == "ok" for rs in results.values())
        print(f"{which}: {ok}/{len(results)} ok")


def _merge(paths: list[str]) -> int:
    """One table from --jsonl files (a later row of the same model and run replaces an earlier one)."""
    results: dict[str, dict[str, dict]] = {}
    for path in paths:
        with open(path) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    results.setdefault(r["model"], {})[r["run"]] = r
    runs = sorted({w for rs in results.values() for w in rs}, key=lambda w: (w != "x86", w))
    sizes = {n: max((r.get("params_m") or 0) for r in rs.values()) * 1e6 for n, rs in results.items()}
    results = dict(sorted(results.items(), key=lambda kv: sizes[kv[0]]))
    _print_table(results, runs, sizes, {})
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="", help="comma-separated names (default: every classification model)")
    ap.add_argument("--runs", default="x86,prune")
    ap.add_argument("--rtol", type=float, default=1e-3)
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per model and run")
    ap.add_argument("--max-params", type=float, default=0, help="list models above this many params as skipped")
    ap.add_argument("--threads", type=int, default=physical_cores())
    ap.add_argument("--json", default="")
    ap.add_argument("--jsonl", default="", help="append each row to this file as soon as it is done (a run cut "
                                                "short keeps what it finished; merge runs with --merge)")
    ap.add_argument("--merge", default="", help="comma-separated --jsonl files: print one table of their rows "
                                                "(the last row of a model and run wins) and run nothing")
    ap.add_argument("--one", default="", help=argparse.SUPPRESS)
    ap.add_argument("--run", default="x86", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    set_threads(args.threads)
    if args.merge:
        return _merge([p for p in args.merge.split(",") if p])
    if args.one:
        row = run_one(args.one, args.run, args.rtol)
        row["peak_rss_gb"] = peak_rss_gb()          # measured: what this model and run needed, in GiB
        print(json.dumps(row), flush=True)
        return 0

    names = [n for n in args.models.split(",") if n] or model_names()
    sizes = {n: _params(n) for n in names}
    names.sort(key=lambda n: sizes[n])
    runs = [r for r in args.runs.split(",") if r]
    results: dict[str, dict[str, dict]] = {}
    skipped: dict[str, str] = {}
    start = time.perf_counter()
    for n in names:
        if args.max_params and sizes[n] > args.max_params:
            skipped[n] = f"{sizes[n] / 1e6:.0f}M params > --max-params {args.max_params / 1e6:.0f}M"
            print(f"{n}: skipped ({skipped[n]})", flush=True)
            continue
        results[n] = {}
        for which in runs:
            r = _child(n, which, args.rtol, args.timeout, args.threads)
            results[n][which] = r
            append_jsonl(args.jsonl, r)
            extra = f" {r.get('error', '')}" if r["status"] != "ok" else ""
            print(f"{n} [{which}] {r['status']} {r.get('kind', '')} rel={r.get('rel', float('nan')):.1e} "
                  f"compile_s={r.get('compile_s', '')} s={r.get('seconds', '')}{extra}", flush=True)
    _print_table(results, runs, sizes, skipped)
    print(f"{len(results)} models in {time.perf_counter() - start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "skipped": skipped}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
