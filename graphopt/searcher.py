"""Accuracy-aware pipeline search: the fastest compiled model whose metric stays within a budget.

    result = graphopt.search(model, "x86", data=(x_val, y_val), metric=graphopt.top1, budget=1.0,
                             example_inputs=(x,), train_data=train, state="search.json")
    print(result.table()); result.plot("pareto.png"); fast = result.model

Every candidate pipeline is compiled for the target and timed there (median latency on the example
inputs), never ranked by FLOPs. Each candidate also records its size: the bytes of weights the compiled
model stores (`size_bytes`, see stored_bytes()) and, with compressed=True, the bytes of its
graphopt.compressed file (zstd-coded, Deep Compression's storage). `objective` picks what "best" means: the
fastest ("latency", default), the smallest in memory ("size") or the smallest file ("compressed") within the
metric budget; the Pareto front is taken over that axis and the metric. State is written after each
candidate, so an interrupted search resumes where it stopped (candidates already measured are not compiled
again; a state file written before sizes were recorded loads, and its candidates are measured again only when
the objective needs a size they lack).
"""
from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Literal, Sequence

import torch
from torch import nn

from .errors import GraphoptError

__all__ = ["search", "SearchResult", "Candidate", "default_space", "stored_bytes", "top1", "cosine"]

OBJECTIVES = ("latency", "size", "compressed")


@dataclass
class Candidate:
    pipeline: str
    latency_ms: float = math.nan
    metric: float = math.nan
    flops: int = 0
    params: int = 0
    compile_s: float = 0.0
    status: str = "pending"          # "ok" | "failed"
    error: str = ""
    pareto: bool = False
    within_budget: bool = False
    size_bytes: int = 0              # weights as the compiled model stores them (stored_bytes); 0: not measured
    compressed_bytes: int = 0        # graphopt.compressed.save file bytes; 0: not measured

    def axis(self, objective: str) -> float:
        """The candidate's value on `objective`'s axis (lower is better); NaN when not measured."""
        if objective == "latency":
            return self.latency_ms
        v = self.size_bytes if objective == "size" else self.compressed_bytes
        return float(v) if v > 0 else math.nan


def top1(model: Callable, data: tuple[torch.Tensor, torch.Tensor], batch_size: int | None = None) -> float:
    """Top-1 accuracy (percent) of `model` on (inputs, labels); runs in batches of the compiled batch size."""
    x, y = data
    shapes = getattr(model, "input_shapes", None)     # a compiled model takes its example batch size
    bs = batch_size or (shapes[0][0] if shapes and len(shapes[0]) else len(x))
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x) - len(x) % bs, bs):
            correct += (model(x[i:i + bs]).argmax(-1) == y[i:i + bs]).sum().item()
    n = len(x) - len(x) % bs
    return 100.0 * correct / max(n, 1)


def cosine(reference: nn.Module) -> Callable:
    """A metric: mean cosine similarity (x100) between a model's outputs and `reference`'s on the data."""
    def metric(model: Callable, data: Sequence[torch.Tensor]) -> float:
        sims = []
        with torch.no_grad():
            for x in data:
                a, b = model(x).flatten(1).double(), reference(x).flatten(1).double()
                sims.append(torch.nn.functional.cosine_similarity(a, b, dim=1).mean().item())
        return 100.0 * statistics.mean(sims)
    return metric


def default_space(*, distill: bool = False, quantize: bool = True, sparsity: bool = True,
                  clusters: bool = True) -> list[str]:
    """A grid over the registered compression passes; passes that are not registered are left out.

    Without distill: 17 candidates (the baseline "fold_bn,cleanup" first, every other one starts with it):
      prune(ratio=0.25|0.5)                         structured channels: fewer FLOPs, faster on dense kernels
      lowrank(energy=0.9|0.95), prune+lowrank       factorised Linear/conv
      sparsify(sparsity=0.5)                        unstructured, the level one-shot magnitude pruning keeps
                                                    accuracy on most models: a smaller compressed file
      sparsify(sparsity=0.8,pattern=16x1)           16x1 blocks, the pattern the block-sparse kernels run fastest
                                                    (kernel=auto: each layer sparse only where measured faster)
      cluster(k=16)                                 weight sharing, 4-bit indices (centroids fine-tuned when
                                                    train_data is given)
      sparsify(sparsity=0.5),cluster(k=16)          Deep Compression's prune -> share
      quantize                                      int8 static (needs calibration)
      quantize(mode=weight_only,bits=4)             int4 weights, float activations (no data)
      quantize(mode=dynamic,bits=4)                 the same int4 weights, int8 activations per call (W4A8:
                                                    integer dot products; no data)
      quantize(bits=mixed,budget=error:0.02)        per-layer precision, the smallest model within 2% output
                                                    error (needs calibration)
      prune(ratio=0.25|0.5),quantize                channel pruning then int8 (speed)
      sparsify(sparsity=0.5),quantize               prune then int8 (size: zeros compress)
    Two levels where the accuracy/speed trade-off is steep (prune, lowrank), one level per pattern for
    sparsity, one k (16: 4-bit indices, what the kernels read like int4) and the combinations that compose;
    everything else is left to an explicit `space`. With distill: a "...,distill(epochs=2)" twin of each
    prune / lowrank / sparsify candidate that is not quantized (7 more: 24). Clustered candidates get no
    twin (their centroids are fine-tuned by the cluster pass itself when train_data is given).
    """
    from .pipeline import available_passes

    have = available_passes()
    base = "fold_bn,cleanup"
    options: list[str] = []
    if "prune" in have:
        options += [f"prune(ratio={r})" for r in (0.25, 0.5)]
    if "lowrank" in have:
        options += [f"lowrank(energy={e})" for e in (0.9, 0.95)]
    if "prune" in have and "lowrank" in have:
        options += ["prune(ratio=0.25),lowrank(energy=0.95)"]
    unstructured, block = "sparsify(sparsity=0.5)", "sparsify(sparsity=0.8,pattern=16x1)"
    sparse = sparsity and "sparsify" in have
    if sparse:
        options += [unstructured, block]
    if clusters and "cluster" in have:
        options += ["cluster(k=16)"] + ([f"{unstructured},cluster(k=16)"] if sparse else [])
    structured = [o for o in options if o.startswith("prune(") and "lowrank" not in o]
    if quantize and "quantize" in have:
        options += ["quantize", "quantize(mode=weight_only,bits=4)", "quantize(mode=dynamic,bits=4)",
                    "quantize(bits=mixed,budget=error:0.02)"]
        options += [f"{o},quantize" for o in structured] + ([f"{unstructured},quantize"] if sparse else [])
    space = [base] + [f"{base},{o}" for o in options]
    if distill and "distill" in have:
        space += [f"{s},distill(epochs=2,progress=false)" for s in space[1:]
                  if "quantize" not in s and "cluster" not in s]
    return space


def _fmt_bytes(n: float) -> str:
    if not n or n != n:
        return "-"
    for unit, div in (("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g} {unit}"
    return f"{n:.0f} B"


_AXIS_LABEL = {"latency": "latency (ms, compiled, measured)", "size": "stored weights (bytes)",
               "compressed": "compressed file (bytes)"}


@dataclass
class SearchResult:
    candidates: list[Candidate]
    baseline: Candidate
    chosen: Candidate | None
    budget: float
    higher_is_better: bool
    model: Any = None                # the chosen OptimizedModel
    notes: list[str] = field(default_factory=list)
    objective: str = "latency"

    def pareto_front(self) -> list[Candidate]:
        """The candidates no other beats on both the objective's axis and the metric, by that axis."""
        return sorted((c for c in self.candidates if c.pareto), key=lambda c: c.axis(self.objective))

    def table(self) -> str:
        show_z = any(c.compressed_bytes > 0 for c in self.candidates)
        base = self.baseline
        head = ("pipeline", "latency ms", "speedup", "size", "smaller") + (("compressed", "smaller") if show_z
                                                                            else ()) + (
            "metric", "Δ metric", "GFLOPs", "pareto", "ok")
        rows = [head]

        def ratio(a: float, b: float) -> str:
            return f"{a / b:.2f}x" if a > 0 and b > 0 else "-"

        for c in sorted(self.candidates, key=lambda c: (c.status != "ok", c.axis(self.objective))):
            if c.status != "ok":
                rows.append((c.pipeline,) + ("-",) * (len(head) - 3) + ("", f"failed: {c.error[:60]}"))
                continue
            z = (_fmt_bytes(c.compressed_bytes), ratio(base.compressed_bytes, c.compressed_bytes)) if show_z else ()
            rows.append((c.pipeline, f"{c.latency_ms:.2f}", ratio(base.latency_ms, c.latency_ms),
                         _fmt_bytes(c.size_bytes), ratio(base.size_bytes, c.size_bytes)) + z +
                        (f"{c.metric:.2f}", f"{c.metric - base.metric:+.2f}", f"{c.flops / 1e9:.3f}",
                         "*" if c.pareto else "", "within budget" if c.within_budget else "over budget"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        chosen = self.chosen.pipeline if self.chosen else "(none within budget)"
        what = {"latency": "the fastest", "size": "the smallest stored weights",
                "compressed": "the smallest compressed file"}[self.objective]
        lines.append(f"chosen: {chosen} ({what} within budget {self.budget:g})")
        lines.append("size: weight bytes the compiled model stores (sparse layers on the block-sparse kernel at "
                     "their values + indices); smaller: baseline / candidate"
                     + ("; compressed: graphopt.compressed.save file bytes" if show_z else ""))
        return "\n".join(lines + self.notes)

    def plot(self, path: str) -> str:
        """Write a PNG of the objective's axis (latency or bytes) vs metric, the Pareto front joined and the
        chosen point marked."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        obj = self.objective
        ok = [c for c in self.candidates if c.status == "ok" and c.axis(obj) == c.axis(obj)]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.scatter([c.axis(obj) for c in ok], [c.metric for c in ok], c="tab:gray", label="candidates")
        front = self.pareto_front()
        ax.plot([c.axis(obj) for c in front], [c.metric for c in front], "o-", c="tab:blue", label="Pareto front")
        if self.chosen:
            ax.scatter([self.chosen.axis(obj)], [self.chosen.metric], s=160, facecolors="none",
                       edgecolors="tab:red", linewidths=2, label="chosen")
        limit = self.baseline.metric - self.budget if self.higher_is_better else self.baseline.metric + self.budget
        ax.axhline(limit, ls="--", c="tab:red", lw=1, label=f"budget ({self.budget:g})")
        for c in front:
            ax.annotate(c.pipeline.replace("fold_bn,cleanup", "").strip(",") or "baseline",
                        (c.axis(obj), c.metric), fontsize=7, xytext=(4, 4), textcoords="offset points")
        if obj != "latency":
            ax.set_xscale("log")
        ax.set_xlabel(_AXIS_LABEL[obj])
        ax.set_ylabel("metric")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def stored_bytes(opt: Any) -> int:
    """Bytes of weights (parameters and buffers) an OptimizedModel stores: the final graph's, as the report
    counts them (int8 at 1 byte, int4 and 4-bit cluster indices at half a byte), except that sparse layers
    (sparsify) count without their masks (folded into the weights when compiled) and, where the backend put a
    layer on the block-sparse kernel (report.backend["sparse_layers"]), at the bytes it stores for it (values +
    block indices + bias) instead of its dense weight."""
    from .passes._sparse import SparseConv2d, SparseLinear

    gm = opt.graph_module
    total = int(opt.report.final.size_bytes)
    rows = [r for r in opt.report.backend.get("sparse_layers") or [] if r.get("kernel") == "sparse"]
    sparse_paths = {r.get("layer") for r in rows}
    for path, mod in gm.named_modules():
        if not isinstance(mod, (SparseLinear, SparseConv2d)):
            continue
        total -= mod.mask.numel() * mod.mask.element_size()
        if path in sparse_paths:
            total -= sum(t.numel() * t.element_size() for t in (mod.weight, mod.bias) if t is not None)
    return total + sum(int(r["stored_bytes"]) for r in rows if r.get("layer") in
                       {p for p, m in gm.named_modules() if isinstance(m, (SparseLinear, SparseConv2d))})


def _compressed_bytes(opt: Any) -> int:
    from . import compressed

    with tempfile.TemporaryDirectory() as d:
        return os.path.getsize(compressed.save(opt, os.path.join(d, "candidate.goptz")))


def _median_latency_ms(fn: Callable, inputs: tuple, repeats: int) -> float:
    with torch.no_grad():
        fn(*inputs)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn(*inputs)
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _load_state(path: str | None) -> dict[str, Candidate]:
    if not path or not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            data = json.load(f)
        return {d["pipeline"]: Candidate(**d) for d in data["candidates"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise GraphoptError(f"search state file {path} is unreadable ({type(e).__name__}: {e}); "
                            f"move it away to start over") from e


def _save_state(path: str | None, candidates: dict[str, Candidate], meta: dict) -> None:
    if not path:
        return
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump({"meta": meta, "candidates": [asdict(c) for c in candidates.values()]}, f, indent=1)
    os.replace(tmp, path)      # atomic: an interrupt never leaves a half-written state


def _keep_if_best(kept: dict, cand: Candidate, opt: Any, baseline: Candidate, budget: float,
                  higher_is_better: bool, objective: str) -> None:
    if baseline.status != "ok":
        return
    sign = 1.0 if higher_is_better else -1.0
    if sign * (baseline.metric - cand.metric) > budget + 1e-9:
        return
    key = (cand.axis(objective), cand.latency_ms)
    current = next(iter(kept.values()), None)
    if current is None or key < current[0]:
        kept.clear()
        kept[cand.pipeline] = (key, opt)


def search(model: nn.Module, target: str | dict = "x86", data: Any = None, metric: Callable | None = None,
           budget: float = 1.0, *, example_inputs: tuple, space: Iterable[str] | None = None,
           higher_is_better: bool = True, calibration: Iterable | None = None,
           train_data: Iterable | None = None, tune: Any = None, state: str | None = None, repeats: int = 10,
           objective: Literal["latency", "size", "compressed"] = "latency", compressed: bool = False,
           progress: bool = True) -> SearchResult:
    """Compile and measure each pipeline of `space` on `target`; return the best within `budget`.

    metric(compiled_model, data) -> float. budget: the largest allowed drop (or rise, when
    higher_is_better=False) from the baseline, the first pipeline of the space (default "fold_bn,cleanup").
    objective: what is minimised among the candidates within budget: "latency" (median ms on the target),
    "size" (stored_bytes(): weight bytes the compiled model stores) or "compressed" (bytes of the
    graphopt.compressed file; implies compressed=True). Ties go to the faster candidate.
    compressed: also write every candidate with graphopt.compressed.save (zstd level 19: about 1 s per 1-2 MB
    of weights) and record the file's bytes. Needs the zstandard package.
    """
    from .api import optimize

    if metric is None or data is None:
        raise GraphoptError("search() needs data and a metric, e.g. metric=graphopt.top1, "
                            "data=(x_val, y_val)")
    if objective not in OBJECTIVES:
        raise GraphoptError(f"search(objective={objective!r}): choose one of {', '.join(OBJECTIVES)}")
    compressed = compressed or objective == "compressed"
    if compressed:
        from .compressed import _zstd

        _zstd()                                          # ArtifactError now, not after the first compile
    pipelines = list(space) if space is not None else default_space(distill=train_data is not None)
    if not pipelines:
        raise GraphoptError("search space is empty")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    done = _load_state(state)
    meta = {"target": str(target), "budget": budget, "higher_is_better": higher_is_better,
            "objective": objective}
    results: dict[str, Candidate] = {p: done.get(p, Candidate(p)) for p in pipelines}
    remeasured = 0
    for c in results.values():               # a state file from before sizes were recorded
        if c.status == "ok" and ((objective == "size" and c.size_bytes <= 0)
                                 or (compressed and c.compressed_bytes <= 0)):
            c.status, remeasured = "pending", remeasured + 1
    best_model: dict[str, Any] = {}      # at most one compiled model held: the best within budget
    bar = pipelines
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(pipelines, desc="search", unit="pipeline", leave=False)
    for p in bar:
        cand = results[p]
        if cand.status in ("ok", "failed"):
            continue                                     # measured before an interruption
        start = time.perf_counter()
        try:
            opt = optimize(model, target, p, example_inputs=example_inputs, calibration=calibration,
                           train_data=train_data, tune=tune)
            cand.compile_s = time.perf_counter() - start
            cand.latency_ms = _median_latency_ms(opt, example_inputs, repeats)
            cand.metric = float(metric(opt, data))
            cand.flops, cand.params = opt.report.final.flops, opt.report.final.params
            cand.size_bytes = stored_bytes(opt)
            if compressed:
                cand.compressed_bytes = _compressed_bytes(opt)
            cand.status, cand.error = "ok", ""
            _keep_if_best(best_model, cand, opt, results[pipelines[0]], budget, higher_is_better, objective)
        except GraphoptError as e:
            cand.status, cand.error = "failed", f"{type(e).__name__}: {e}"
        _save_state(state, results, meta)
    ok = [c for c in results.values() if c.status == "ok"]
    baseline = results[pipelines[0]]
    if baseline.status != "ok":
        raise GraphoptError(f"the baseline pipeline {baseline.pipeline!r} failed: {baseline.error}")
    sign = 1.0 if higher_is_better else -1.0
    ranked = [c for c in ok if c.axis(objective) == c.axis(objective)]       # measured on the axis
    for c in ok:
        c.within_budget = sign * (baseline.metric - c.metric) <= budget + 1e-9
        a = c.axis(objective)
        c.pareto = c in ranked and not any(
            o is not c and o.axis(objective) <= a and sign * o.metric >= sign * c.metric
            and (o.axis(objective) < a or sign * o.metric > sign * c.metric) for o in ranked)
    within = [c for c in ranked if c.within_budget]
    chosen = min(within, key=lambda c: (c.axis(objective), c.latency_ms)) if within else None
    _save_state(state, results, meta)
    result = SearchResult(list(results.values()), baseline, chosen, budget, higher_is_better, objective=objective)
    if chosen is not None:
        kept = best_model.get(chosen.pipeline)
        result.model = kept[1] if kept else optimize(
            model, target, chosen.pipeline, example_inputs=example_inputs, calibration=calibration,
            train_data=train_data, tune=tune)
    failed = [c for c in results.values() if c.status == "failed"]
    if failed:
        result.notes.append(f"{len(failed)} candidate(s) failed; see the table's last column")
    if remeasured:
        result.notes.append(f"{remeasured} candidate(s) from the state file had no "
                            f"{'size' if objective == 'size' else 'compressed size'} measurement (an older state file): compiled and measured again")
    return result
