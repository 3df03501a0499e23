"""Accuracy-aware pipeline search: the fastest compiled model whose metric stays within a budget.

    result = graphopt.search(model, "x86", data=(x_val, y_val), metric=graphopt.top1, budget=1.0,
                             example_inputs=(x,), train_data=train, state="search.json")
    print(result.table()); result.plot("pareto.png"); fast = result.model

Every candidate pipeline is compiled for the target and timed there (median latency on the example
inputs), never ranked by FLOPs. State is written after each candidate, so an interrupted search resumes
where it stopped (candidates already measured are not compiled again).
"""
from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from .errors import GraphoptError

__all__ = ["search", "SearchResult", "Candidate", "default_space", "top1", "cosine"]


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


def default_space(*, distill: bool = False, quantize: bool = True) -> list[str]:
    """A grid over the registered compression passes (prune ratios, lowrank energies, int8), each optionally
    followed by distillation. Passes that are not registered are left out."""
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
    if quantize and "quantize" in have:
        options += ["quantize"] + ([f"{o},quantize" for o in options[:2]] if options else [])
    space = [base] + [f"{base},{o}" for o in options]
    if distill and "distill" in have:
        space += [f"{s},distill(epochs=2,progress=false)" for s in space[1:] if "quantize" not in s]
    return space


@dataclass
class SearchResult:
    candidates: list[Candidate]
    baseline: Candidate
    chosen: Candidate | None
    budget: float
    higher_is_better: bool
    model: Any = None                # the chosen OptimizedModel
    notes: list[str] = field(default_factory=list)

    def pareto_front(self) -> list[Candidate]:
        return sorted((c for c in self.candidates if c.pareto), key=lambda c: c.latency_ms)

    def table(self) -> str:
        rows = [("pipeline", "latency ms", "speedup", "metric", "Δ metric", "GFLOPs", "pareto", "ok")]
        for c in sorted(self.candidates, key=lambda c: (c.status != "ok", c.latency_ms)):
            if c.status != "ok":
                rows.append((c.pipeline, "-", "-", "-", "-", "-", "", f"failed: {c.error[:60]}"))
                continue
            rows.append((c.pipeline, f"{c.latency_ms:.2f}", f"{self.baseline.latency_ms / c.latency_ms:.2f}x",
                         f"{c.metric:.2f}", f"{c.metric - self.baseline.metric:+.2f}", f"{c.flops / 1e9:.3f}",
                         "*" if c.pareto else "", "within budget" if c.within_budget else "over budget"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        chosen = self.chosen.pipeline if self.chosen else "(none within budget)"
        lines.append(f"chosen: {chosen}")
        return "\n".join(lines + self.notes)

    def plot(self, path: str) -> str:
        """Write a PNG of latency vs metric, the Pareto front joined and the chosen point marked."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ok = [c for c in self.candidates if c.status == "ok"]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.scatter([c.latency_ms for c in ok], [c.metric for c in ok], c="tab:gray", label="candidates")
        front = self.pareto_front()
        ax.plot([c.latency_ms for c in front], [c.metric for c in front], "o-", c="tab:blue", label="Pareto front")
        if self.chosen:
            ax.scatter([self.chosen.latency_ms], [self.chosen.metric], s=160, facecolors="none",
                       edgecolors="tab:red", linewidths=2, label="chosen")
        limit = self.baseline.metric - self.budget if self.higher_is_better else self.baseline.metric + self.budget
        ax.axhline(limit, ls="--", c="tab:red", lw=1, label=f"budget ({self.budget:g})")
        for c in front:
            ax.annotate(c.pipeline.replace("fold_bn,cleanup", "").strip(",") or "baseline",
                        (c.latency_ms, c.metric), fontsize=7, xytext=(4, 4), textcoords="offset points")
        ax.set_xlabel("latency (ms, compiled, measured)")
        ax.set_ylabel("metric")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


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
                  higher_is_better: bool) -> None:
    if baseline.status != "ok":
        return
    sign = 1.0 if higher_is_better else -1.0
    if sign * (baseline.metric - cand.metric) > budget + 1e-9:
        return
    current = next(iter(kept.values()), None)
    if current is None or cand.latency_ms < current[0]:
        kept.clear()
        kept[cand.pipeline] = (cand.latency_ms, opt)


def search(model: nn.Module, target: str | dict = "x86", data: Any = None, metric: Callable | None = None,
           budget: float = 1.0, *, example_inputs: tuple, space: Iterable[str] | None = None,
           higher_is_better: bool = True, calibration: Iterable | None = None,
           train_data: Iterable | None = None, tune: Any = None, state: str | None = None, repeats: int = 10,
           progress: bool = True) -> SearchResult:
    """Compile and measure each pipeline of `space` on `target`; return the fastest within `budget`.

    metric(compiled_model, data) -> float. budget: the largest allowed drop (or rise, when
    higher_is_better=False) from the baseline, the first pipeline of the space (default "fold_bn,cleanup").
    """
    from .api import optimize

    if metric is None or data is None:
        raise GraphoptError("search() needs data and a metric, e.g. metric=graphopt.top1, "
                            "data=(x_val, y_val)")
    pipelines = list(space) if space is not None else default_space(distill=train_data is not None)
    if not pipelines:
        raise GraphoptError("search space is empty")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    done = _load_state(state)
    meta = {"target": str(target), "budget": budget, "higher_is_better": higher_is_better}
    results: dict[str, Candidate] = {p: done.get(p, Candidate(p)) for p in pipelines}
    best_model: dict[str, Any] = {}      # at most one compiled model held: the fastest within budget
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
            cand.status = "ok"
            _keep_if_best(best_model, cand, opt, results[pipelines[0]], budget, higher_is_better)
        except GraphoptError as e:
            cand.status, cand.error = "failed", f"{type(e).__name__}: {e}"
        _save_state(state, results, meta)
    ok = [c for c in results.values() if c.status == "ok"]
    baseline = results[pipelines[0]]
    if baseline.status != "ok":
        raise GraphoptError(f"the baseline pipeline {baseline.pipeline!r} failed: {baseline.error}")
    sign = 1.0 if higher_is_better else -1.0
    for c in ok:
        c.within_budget = sign * (baseline.metric - c.metric) <= budget + 1e-9
        c.pareto = not any(o is not c and o.latency_ms <= c.latency_ms and sign * o.metric >= sign * c.metric
                           and (o.latency_ms < c.latency_ms or sign * o.metric > sign * c.metric) for o in ok)
    within = [c for c in ok if c.within_budget]
    chosen = min(within, key=lambda c: c.latency_ms) if within else None
    _save_state(state, results, meta)
    result = SearchResult(list(results.values()), baseline, chosen, budget, higher_is_better)
    if chosen is not None:
        kept = best_model.get(chosen.pipeline)
        result.model = kept[1] if kept else optimize(
            model, target, chosen.pipeline, example_inputs=example_inputs, calibration=calibration,
            train_data=train_data, tune=tune)
    failed = [c for c in results.values() if c.status == "failed"]
    if failed:
        result.notes.append(f"{len(failed)} candidate(s) failed; see the table's last column")
    return result
