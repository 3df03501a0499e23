"""Choose which channel classes to keep: per-group or global ranking, a channel ratio or a FLOPs target.

Each prunable Group (classes in the same set of layer slots) keeps a count k of its classes chosen among
  {multiples of m} ∪ {all},  k ≥ max(min units, blocked classes),
where m = multiple / gcd(multiple, width) (width = positions per class, e.g. head_dim for attention heads,
so a multiple of 8 channels never forces a multiple of 8 heads) and min units = ceil(min_channels / width).
The kept classes are the blocked ones plus the most important free ones.

  scope="layer":  every group removes `ratio` of its classes (before rounding).
  scope="global": the `ratio` least important free classes over the whole model are removed, importance
                  normalized by its group's mean so groups of different layers compare.
  flops_reduction: bisection on that ratio until the FLOPs model (DependencyGraph.estimate_flops) is
                  nearest the requested reduction, then single groups are moved one rounding step at a
                  time while that brings the estimate closer to the target.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..analysis.dependency import DependencyGraph, Group


@dataclass
class Plan:
    keep: np.ndarray             # bool per class root
    ratio: float                 # the ratio (layer) / global fraction that produced it
    flops_before: float
    flops_after: float           # estimated by the FLOPs model

    @property
    def reduction(self) -> float:
        return 1.0 - self.flops_after / self.flops_before if self.flops_before else 0.0


class Selector:
    def __init__(self, dep: DependencyGraph, importance: np.ndarray, *, scope: str, multiple: int,
                 min_channels: int):
        self.dep, self.scope = dep, scope
        self.multiple, self.min_channels = multiple, min_channels
        self.imp = importance
        self.groups: list[Group] = [g for g in dep.groups if g.prunable]
        self.order: dict[int, np.ndarray] = {}          # free classes of each group, least important first
        for g in self.groups:
            free = g.classes[~g.blocked]
            self.order[g.index] = free[np.argsort(importance[free], kind="stable")]
        if scope == "global":
            items = []
            for g in self.groups:
                free = self.order[g.index]
                mean = float(importance[free].mean()) if len(free) else 0.0
                norm = importance[free] / mean if mean > 0 else np.ones(len(free))
                items.append((norm, np.full(len(free), g.index), free))
            if items:
                norm = np.concatenate([i[0] for i in items])
                gidx = np.concatenate([i[1] for i in items])
                ranks = np.argsort(norm, kind="stable")
                self.global_groups = gidx[ranks]
            else:
                self.global_groups = np.zeros(0, dtype=np.int64)
        self.flops_before = dep.estimate_flops(np.ones(dep.num_ids, dtype=bool))

    def options(self, g: Group) -> list[int]:
        n, nb = g.size, int(g.blocked.sum())
        m = max(1, self.multiple // math.gcd(self.multiple, g.width))
        lo = max(1, math.ceil(self.min_channels / g.width), nb)
        return sorted({k for k in range(m, n + 1, m) if k >= lo} | {n})

    def kept_count(self, g: Group, target: float) -> int:
        opts = self.options(g)
        return min(opts, key=lambda k: (abs(k - target), -k))

    def counts(self, ratio: float) -> dict[int, int]:
        """Kept classes per prunable group for a ratio (layer) / global fraction."""
        if self.scope == "global":
            n_prune = int(round(ratio * len(self.global_groups)))
            removed = np.bincount(self.global_groups[:n_prune], minlength=max(len(self.dep.groups), 1)) \
                if n_prune else np.zeros(max(len(self.dep.groups), 1), dtype=np.int64)
        out = {}
        for g in self.groups:
            want = g.size - int(removed[g.index]) if self.scope == "global" else g.size * (1.0 - ratio)
            out[g.index] = self.kept_count(g, want)
        return out

    def keep_for(self, counts: dict[int, int]) -> np.ndarray:
        keep = np.ones(self.dep.num_ids, dtype=bool)
        for g in self.groups:
            drop = g.size - counts[g.index]
            if drop > 0:
                keep[self.order[g.index][:drop]] = False
        return keep

    def plan(self, ratio: float) -> Plan:
        keep = self.keep_for(self.counts(ratio))
        return Plan(keep, ratio, self.flops_before, self.dep.estimate_flops(keep))

    def for_flops(self, reduction: float, iters: int = 30) -> tuple[Plan, str]:
        """The plan whose estimated FLOPs reduction is nearest `reduction`: bisection on the ratio, then a
        local search moving single groups one rounding step (ties: the larger reduction)."""
        most = self.plan(1.0)
        if most.reduction < reduction:
            return most, (f"requested a {reduction:.1%} FLOPs reduction but at most {most.reduction:.1%} "
                          f"is reachable with multiple={self.multiple}, min_channels={self.min_channels} "
                          f"and the channels that must stay; pruned to that")
        lo, hi = 0.0, 1.0
        lo_plan, hi_plan = self.plan(0.0), most
        for _ in range(iters):
            mid = (lo + hi) / 2
            p = self.plan(mid)
            if p.reduction >= reduction:
                hi, hi_plan = mid, p
            else:
                lo, lo_plan = mid, p
        best = hi_plan if abs(hi_plan.reduction - reduction) <= abs(lo_plan.reduction - reduction) else lo_plan
        return self._refine(best, reduction), ""

    def _refine(self, plan: Plan, reduction: float, max_moves: int = 200) -> Plan:
        dep = self.dep
        if not self.flops_before or not self.groups:
            return plan
        terms = dep.flop_terms
        classes = [[dep.cls[ids] for ids in t.factors] for t in terms]
        group_of = np.full(dep.num_ids, -1, dtype=np.int64)
        for g in self.groups:
            group_of[g.classes] = g.index
        affected: dict[int, list[int]] = {g.index: [] for g in self.groups}
        for i, cs in enumerate(classes):
            for gi in {int(x) for c in cs for x in np.unique(group_of[c]) if x >= 0}:
                affected[gi].append(i)

        def value(i: int, keep: np.ndarray) -> float:
            v = float(terms[i].base)
            for c in classes[i]:
                if len(c):
                    v *= float(keep[c].mean())
            return v

        keep = plan.keep.copy()
        counts = {g.index: int(keep[g.classes].sum()) for g in self.groups}
        vals = np.array([value(i, keep) for i in range(len(terms))])
        total = float(vals.sum())
        target = self.flops_before * (1.0 - reduction)
        by_index = {g.index: g for g in self.groups}
        for _ in range(max_moves):
            best = None
            err = abs(total - target)
            for gi, g in by_index.items():
                opts = self.options(g)
                pos = opts.index(counts[gi]) if counts[gi] in opts else None
                if pos is None:
                    continue
                for step in (-1, 1):
                    if not 0 <= pos + step < len(opts):
                        continue
                    k = opts[pos + step]
                    trial = keep.copy()
                    trial[g.classes] = True
                    if g.size - k > 0:
                        trial[self.order[gi][:g.size - k]] = False
                    idx = affected[gi]
                    new_vals = [value(i, trial) for i in idx]
                    new_total = total - float(vals[idx].sum()) + sum(new_vals)
                    e = abs(new_total - target)
                    if e < err - 1e-9 * self.flops_before or (best is not None and e < best[0]):
                        if best is None or e < best[0]:
                            best = (e, gi, k, trial, idx, new_vals, new_total)
            if best is None:
                break
            _, gi, k, keep, idx, new_vals, total = best
            counts[gi] = k
            vals[idx] = new_vals
        return Plan(keep, plan.ratio, self.flops_before, dep.estimate_flops(keep))
