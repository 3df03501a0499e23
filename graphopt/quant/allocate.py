"""Mixed-precision bit allocation: one choice per layer, exactly optimal under budgets (an integer program).

The problem (HAWQ-V3's formulation, generalised to several budgets): layer i has choices j = 0..m_i-1, each with
costs c_k[i][j] for k in {"size", "error", "latency"}; pick exactly one choice per layer (binary x[i][j],
Σ_j x[i][j] = 1) so that every budget k holds, Σ_ij c_k[i][j]·x[i][j] <= B_k, minimising one cost
Σ_ij c_obj[i][j]·x[i][j]. A second solve breaks ties: among the allocations within 1e-9 (relative) of the
optimum, the one minimising the secondary cost (size when the objective is error, else error).

Costs are additive by assumption; what that means for each kind is the caller's business (graphopt.quant.mixed
uses bytes, squared relative output errors and per-layer kernel milliseconds). Solved by scipy.optimize.milp
(HiGHS branch and bound, mip_rel_gap=0), each budget row scaled to 1 so the solver's feasibility tolerance is
relative; the returned allocation is re-checked in float64 against the unscaled budgets.

Budgets as text (the `budget` option of quantize(bits=mixed)):
    size:0.25        model bytes <= 0.25 x the float32 model's bytes (a bare number is a fraction in (0, 1])
    size:3.5MB       model bytes <= 3.5e6 (units B, kB, MB, GB, KiB, MiB, GiB)
    error:0.02       relative L2 error of the outputs vs float32 <= 0.02 (on the calibration batches)
    latency:0.6      summed per-layer kernel time <= 0.6 x the all-float32 layers' time
    latency:1.5ms    summed per-layer kernel time <= 1.5 ms (units us, ms, s)
"""
from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from ..errors import BudgetError

__all__ = ["Budget", "parse_budget", "parse_budgets", "allocate", "brute_force", "KINDS"]

KINDS = ("size", "error", "latency")
_SIZE_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 1024, "mib": 1024 ** 2, "gib": 1024 ** 3}
_TIME_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}
_TEXT = re.compile(r"\s*([A-Za-z]+)\s*[:=]\s*([0-9.eE+\-]+)\s*([A-Za-z]*)\s*")


@dataclass(frozen=True)
class Budget:
    """One budget: `kind` (size, error or latency) <= `value`. `relative`: value is a fraction of the float32
    model's cost of that kind (size, latency); else bytes (size), relative L2 error (error) or ms (latency)."""

    kind: str
    value: float
    relative: bool = False
    text: str = ""

    def limit(self, float_cost: float) -> float:
        """The absolute limit, given the all-float32 cost of this kind."""
        return self.value * float_cost if self.relative else self.value

    def __str__(self) -> str:
        return self.text or f"{self.kind}:{self.value:g}"


def parse_budget(text) -> Budget:
    """A Budget from its text form (module docstring) or a (kind, value) pair; BudgetError naming it if bad."""
    if isinstance(text, Budget):
        return text
    if isinstance(text, (tuple, list)) and len(text) == 2:
        text = f"{text[0]}:{text[1]}"
    if not isinstance(text, str):
        raise BudgetError(f"budget {text!r}: expected text like 'size:0.25', 'size:3MB', 'error:0.02' or "
                          f"'latency:0.6'")
    m = _TEXT.fullmatch(text)
    if not m:
        raise BudgetError(f"budget {text!r}: expected <kind>:<value>[unit] with kind size, error or latency "
                          f"(e.g. 'size:0.25', 'size:3MB', 'error:0.02', 'latency:1.5ms')")
    kind, num, unit = m.group(1).lower(), m.group(2), m.group(3).lower()
    if kind not in KINDS:
        raise BudgetError(f"budget {text!r}: unknown kind {kind!r}; choose size, error or latency")
    try:
        value = float(num)
    except ValueError:
        raise BudgetError(f"budget {text!r}: {num!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise BudgetError(f"budget {text!r}: the value must be a finite number > 0")
    if kind == "error":
        if unit:
            raise BudgetError(f"budget {text!r}: an error budget is a relative L2 error, without a unit")
        return Budget(kind, value, False, text)
    units = _SIZE_UNITS if kind == "size" else _TIME_UNITS
    if unit:
        if unit not in units:
            raise BudgetError(f"budget {text!r}: unknown {kind} unit {unit!r}; use one of {', '.join(units)}")
        return Budget(kind, value * units[unit], False, text)
    if value > 1:
        raise BudgetError(f"budget {text!r}: a bare {kind} budget is a fraction of the float32 model's {kind} in "
                          f"(0, 1]; give an absolute one with a unit (e.g. '{kind}:{num}"
                          f"{'MB' if kind == 'size' else 'ms'}')")
    return Budget(kind, value, True, text)


def parse_budgets(spec) -> list[Budget]:
    """Budgets from text, a list of texts, a Budget or a {kind: value} dict; at most one per kind."""
    if spec is None or (isinstance(spec, (list, tuple)) and not spec):
        raise BudgetError("bits=mixed needs a budget: e.g. budget='size:0.25', 'error:0.02' or 'latency:0.6'")
    if isinstance(spec, Mapping):
        items = [f"{k}:{v}" for k, v in spec.items()]
    elif isinstance(spec, (str, Budget)):
        items = [spec]
    else:
        items = list(spec)
    budgets = [parse_budget(s) for s in items]
    kinds = [b.kind for b in budgets]
    for k in KINDS:
        if kinds.count(k) > 1:
            raise BudgetError(f"budgets {', '.join(map(str, budgets))}: {k} is given more than once")
    return budgets


# a budget counts as met up to this relative excess (float rounding of sums of costs): the same everywhere, in the
# infeasibility check, the solver's slack and the final check (1e-12 in the first two disagreed with the 1e-9 of
# the last on budgets a few ulps below a reachable cost: hypothesis found three such cases)
_RTOL = 1e-9


def _allowed(limit: float) -> float:
    """The most a budget `limit` accepts: the limit plus _RTOL of it."""
    return limit + _RTOL * abs(limit)


def _solve(costs: Sequence[Sequence[Mapping[str, float]]], limits: Mapping[str, float], objective: str,
           cap: tuple[str, float] | None = None, shrink: float = 0.0) -> list[int] | None:
    """One milp solve; None when infeasible. `shrink` tightens every budget's slack by that fraction."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    sizes = [len(c) for c in costs]
    offsets = np.cumsum([0] + sizes)
    nvar = int(offsets[-1])
    upper = np.ones(nvar)

    def row(kind: str) -> np.ndarray:
        return np.array([float(ch.get(kind, 0.0)) for layer in costs for ch in layer])

    one = np.zeros((len(costs), nvar))
    for i in range(len(costs)):
        one[i, offsets[i]:offsets[i + 1]] = 1.0
    rows, lo, hi = [one], [1.0] * len(costs), [1.0] * len(costs)
    for kind, limit in list(limits.items()) + ([cap] if cap else []):
        # each layer's costs above its cheapest choice (one choice is taken per layer, so the cheapest ones add
        # up to a constant), against the slack the budget leaves over that constant
        mins = np.concatenate([np.full(s, min(float(ch.get(kind, 0.0)) for ch in layer))
                               for s, layer in zip(sizes, costs)])
        extra = row(kind) - mins
        # the budget as _feasible reads it (met up to _RTOL relative: the float rounding of sums)
        slack = (_allowed(limit) - float(sum(min(float(ch.get(kind, 0.0)) for ch in layer) for layer in costs))) * (1 - shrink)
        if slack < 0:
            return None
        eps = 1e-12 * abs(limit)                   # float rounding of the sums
        over = extra > slack + eps
        upper[over] = 0.0                          # a choice that alone overruns the slack is never feasible
        extra = np.where(over, 0.0, extra)
        if slack > eps:                            # scaled to [0, 1]: the solver's tolerance is relative
            rows.append((extra / slack)[None, :])
            lo.append(-np.inf)
            hi.append(1.0)
    c = row(objective)
    c = c - np.concatenate([np.full(s, min(float(ch.get(objective, 0.0)) for ch in layer))
                            for s, layer in zip(sizes, costs)])
    span = float(np.max(np.abs(c))) if c.size else 0.0
    c = c / span if span > 0 else c
    res = milp(c, constraints=LinearConstraint(np.vstack(rows), lo, hi), integrality=np.ones(nvar),
               bounds=Bounds(0, upper), options={"mip_rel_gap": 0.0, "presolve": True})
    if res.x is None or res.status != 0:
        return None
    x = np.round(res.x).astype(int)
    return [int(np.argmax(x[offsets[i]:offsets[i + 1]])) for i in range(len(costs))]


def _total(costs, pick, kind: str) -> float:
    return float(sum(costs[i][j].get(kind, 0.0) for i, j in enumerate(pick)))


def _feasible(costs, pick, limits) -> bool:
    return all(_total(costs, pick, k) <= _allowed(lim) for k, lim in limits.items())


def allocate(costs: Sequence[Sequence[Mapping[str, float]]], limits: Mapping[str, float], objective: str,
             secondary: str | None = None, names: Sequence[str] = ()) -> list[int]:
    """The index of the chosen option of each layer: minimises Σ cost[objective] subject to Σ cost[k] <= limits[k]
    for every k in `limits` (absolute numbers), one choice per layer; ties broken by `secondary`.

    `costs[i][j]` maps a cost kind to the cost of choice j of layer i. Raises BudgetError when no allocation
    meets the budgets, naming the budget and the least it can be (the sum of each layer's cheapest choice).
    """
    if not costs:
        return []
    for i, layer in enumerate(costs):
        if not layer:
            raise ValueError(f"layer {names[i] if i < len(names) else i} has no choice")
    for kind, limit in limits.items():
        least = sum(min(float(ch.get(kind, 0.0)) for ch in layer) for layer in costs)
        if least > _allowed(limit):
            raise BudgetError(f"budget {kind} <= {limit:.6g} cannot be met: the least {kind} any allocation of the "
                              f"{len(costs)} layer(s) reaches is {least:.6g}")
    pick = _solve(costs, limits, objective)
    if pick is None or not _feasible(costs, pick, limits):
        # the solver's tolerance let a budget slip by a hair: tighten by that much and solve again
        pick = _solve(costs, limits, objective, shrink=1e-5)
        if pick is None or not _feasible(costs, pick, limits):
            raise BudgetError(f"no allocation meets the budgets {', '.join(f'{k} <= {v:.6g}' for k, v in limits.items())}"
                              f" together")
    if secondary and secondary != objective:
        best = _total(costs, pick, objective)
        cap = (objective, best + 1e-9 * max(abs(best), 1e-300))
        alt = _solve(costs, limits, secondary, cap=cap)
        if alt is not None and _feasible(costs, alt, limits) and _total(costs, alt, objective) <= cap[1]:
            pick = alt
    return pick


def brute_force(costs: Sequence[Sequence[Mapping[str, float]]], limits: Mapping[str, float],
                objective: str) -> tuple[float, list[int]] | None:
    """(best objective, allocation) by enumerating every allocation (small cases only: the test oracle). Feasible
    means what allocate() accepts (`_feasible`: a budget met up to 1e-9 relative, the float rounding of sums;
    a strict comparison disagreed with allocate() on a budget of 3.9999999999999996 against a cost of 4.0)."""
    best = None
    for pick in itertools.product(*[range(len(layer)) for layer in costs]):
        if not _feasible(costs, pick, limits):
            continue
        val = _total(costs, pick, objective)
        if best is None or val < best[0]:
            best = (val, list(pick))
    return best
