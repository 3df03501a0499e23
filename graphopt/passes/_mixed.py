"""quantize(bits=mixed): the per-layer precision search behind the quantize pass (see Quantize's docstring).

Steps: calibrate once (graphopt.quant.mixed.MixedBuilder); cost every (layer, choice): bytes, sensitivity
(graphopt.quant.sensitivity), and, when a latency budget or objective asks for it, compiled per-layer kernel time
(graphopt.backends.tvm.layer_latency); solve the allocation exactly (graphopt.quant.allocate); build the graph;
measure its output error on the evaluation batches; with an error budget, re-solve with a tighter predicted-error
limit while the measured error exceeds the budget (the per-layer errors are not exactly additive).
"""
from __future__ import annotations

import math

import torch
from torch import fx

from ..errors import BudgetError
from ..pipeline import Context, PassResult
from ..quant import allocate as alloc
from ..quant.mixed import SHORT, MixedBuilder, mean_error

__all__ = ["run_mixed"]

_REFITS = 12


def _fmt_bytes(n: float) -> str:
    for unit, div in (("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g} {unit}"
    return f"{n:.0f} B"


def run_mixed(p, gm: fx.GraphModule, ctx: Context, notes: list[str], qmax: int) -> PassResult:
    """The quantize pass in mixed mode; `p` is the configured Quantize pass."""
    budgets = alloc.parse_budgets(p.budget)
    by_kind = {b.kind: b for b in budgets}
    objective = p.objective
    if objective == "auto":
        objective = "size" if "error" in by_kind else "error"
    if objective in by_kind:
        raise BudgetError(f"objective={objective} is also budgeted ({by_kind[objective]}): minimise another "
                          f"cost, or drop that budget")
    secondary = "size" if objective != "size" else "error"
    need_latency = "latency" in by_kind or objective == "latency"
    batches = ctx.calibration_batches(p.calib_batches, needed_by="quantize (bits=mixed)")
    evalb = batches[:p.eval_batches]
    group = None if p.group_size == -1 else (p.group_size or 128)
    # every kind is a candidate (ops="auto" included): the allocation itself chooses float32 or int8 per layer
    builder = MixedBuilder(gm, batches, target=ctx.target, dtype=p._dtype(ctx), observer=p.observer,
                           percentile=p.percentile, kinds=p.kinds(None), skip=p.skip, weight_qmax=qmax,
                           group_size=group, allowed=p.choices or list(SHORT), progress=p.progress,
                           weight_rounding=p.weight_rounding, bias_correction=p.bias_correction)
    p._survey_notes(builder.survey, notes)
    if not builder.layers:
        return PassResult(gm, changed=False, notes=notes)
    with torch.no_grad():
        refs = [builder.float_gm(*b) for b in evalb]

    # ---- costs
    if p.sensitivity == "hessian":
        from ..quant.sensitivity import hessian_sensitivity

        sens, traces = hessian_sensitivity(builder, evalb, refs, samples=p.hutchinson_samples)
        how = f"Hessian-trace estimate (Hutchinson, {p.hutchinson_samples} samples x {len(evalb)} batch(es))"
    else:
        from ..quant.sensitivity import output_sensitivity

        sens, traces = output_sensitivity(builder, evalb, refs, progress=p.progress), {}
        how = f"measured output error of each layer quantized alone ({len(evalb)} batch(es))"
    latency: dict[tuple[str, str], float] = {}
    if need_latency:
        if ctx.target == "torch":
            raise BudgetError(f"a latency budget or objective needs a compiled target (x86, arm, cuda), not "
                              f"'torch': budgets {', '.join(map(str, budgets))}")
        from ..backends.tvm.layer_latency import layer_latencies

        latency = layer_latencies(builder, ctx.target, progress=p.progress, precision=ctx.precision)
    # one allocation unit per layer: the paths of a layer called at several places take one choice together
    units = builder.units
    layers = [u[0] for u in units]
    costs = []
    for unit in units:
        row = []
        for c in builder.choices[unit[0]]:
            d = {"size": float(builder.unit_bytes(unit, c)), "error": sum(sens[(q, c)] for q in unit)}
            if need_latency:
                d["latency"] = sum(latency[(q, c)] for q in unit)
            row.append(d)
        costs.append(row)
    fixed = builder.fixed_bytes()
    float_size = fixed + sum(builder.unit_bytes(u, "float32") for u in units)
    float_lat = sum(latency.get((pth, "float32"), 0.0) for pth in builder.layers)
    limits: dict[str, float] = {}
    for b in budgets:
        if b.kind == "size":
            limits["size"] = b.limit(float_size) - fixed
            least = fixed + sum(min(d["size"] for d in row) for row in costs)
            if least > b.limit(float_size):
                raise BudgetError(f"budget {b}: the model cannot be smaller than {least:,.0f} B "
                                  f"({least / float_size:.3f} of float32's {float_size:,.0f} B; {fixed:,} B are "
                                  f"not quantizable layers), asked {b.limit(float_size):,.0f} B")
        elif b.kind == "latency":
            limits["latency"] = b.limit(float_lat)
            least = sum(min(d["latency"] for d in row) for row in costs)
            if least > limits["latency"]:
                raise BudgetError(f"budget {b}: the layers' kernels take at least {least:.4g} ms together "
                                  f"({least / max(float_lat, 1e-12):.3f} of float32's {float_lat:.4g} ms), asked "
                                  f"{limits['latency']:.4g} ms")
        else:
            limits["error"] = b.value ** 2

    # ---- solve, build, measure (and refit an error budget against the measured error)
    names = [f"{pth}" for pth in layers]
    try:
        pick = alloc.allocate(costs, limits, objective, secondary, names)
    except BudgetError as e:
        raise BudgetError(f"budgets {', '.join(map(str, budgets))}: {e}") from None
    assign = _expand(builder, pick)
    new = builder.build(assign)
    err = mean_error(new, evalb, refs)
    refits = 0
    if "error" in by_kind:
        pick, assign, new, err, refits = _refit_error(builder, costs, limits, objective, secondary, names,
                                                      by_kind["error"], pick, assign, new, err, evalb, refs)
    predicted = math.sqrt(sum(costs[i][j]["error"] for i, j in enumerate(pick)))
    size = fixed + sum(costs[i][j]["size"] for i, j in enumerate(pick))

    # ---- report
    details = []
    for i, (pth, j) in enumerate(zip(layers, pick)):
        ch = builder.choices[pth][j]
        mine = costs[i][j]
        row = {"layer": pth, "kind": builder.kinds[pth], "choice": SHORT[ch], "bytes": int(mine["size"]),
               "float_bytes": int(costs[i][builder.choices[pth].index("float32")]["size"]),
               "sens_err": math.sqrt(mine["error"])}
        if len(units[i]) > 1:
            row["calls"] = list(units[i])
        if need_latency:
            row["ms"] = mine["latency"]
        if traces:
            row["hess_trace"] = traces.get(pth, float("nan"))
        row["why"] = _why(builder.choices[pth], costs[i], j, objective, limits)
        row["alternatives"] = "; ".join(
            f"{SHORT[c]} err {math.sqrt(d['error']):.2g}, {_fmt_bytes(d['size'])}"
            + (f", {d['latency']:.3g} ms" if need_latency else "")
            for c, d in zip(builder.choices[pth], costs[i]) if c != ch)
        details.append(row)
    counts: dict[str, int] = {}
    for pth in layers:
        counts[SHORT[assign[pth]]] = counts.get(SHORT[assign[pth]], 0) + 1
    notes.append(f"mixed precision: budgets {', '.join(map(str, budgets))}; minimised {objective} (ties: "
                 f"{secondary}); sensitivity: {how}; allocation solved exactly (scipy.optimize.milp, "
                 f"{sum(len(r) for r in costs)} binary variables, {len(layers)} layers)"
                 + (f"; {refits} refit(s) of the error limit against the measured error" if refits else ""))
    notes.append(f"mixed precision result: {', '.join(f'{k} x{v}' for k, v in counts.items())}; model "
                 f"{size:,.0f} B = {size / float_size:.3f} of float32 ({float_size:,.0f} B); output rel. L2 error "
                 f"{err:.4g} measured, {predicted:.4g} predicted (sum of per-layer errors in squares), on "
                 f"{len(evalb)} calibration batch(es)"
                 + (f"; layer kernels {sum(costs[i][j]['latency'] for i, j in enumerate(pick)):.4g} ms vs "
                    f"{float_lat:.4g} ms float32" if need_latency else ""))
    for row in details:
        calls = f", called {len(row['calls'])}x: one choice for every call" if "calls" in row else ""
        notes.append(f"{row['layer']} ({row['kind']}{calls}): {row['choice']}, err {row['sens_err']:.2g} alone, "
                     f"{_fmt_bytes(row['bytes'])} (fp32 {_fmt_bytes(row['float_bytes'])})"
                     + (f", {row['ms']:.3g} ms" if need_latency else "") + f" - {row['why']}")
    p.last_allocation = {"assignment": assign, "size_bytes": size, "float_size_bytes": float_size,
                         "error": err, "predicted_error": predicted, "costs": costs, "layers": layers,
                         "choices": {k: list(v) for k, v in builder.choices.items()}, "limits": dict(limits),
                         "objective": objective}
    return PassResult(new, notes=notes, details=details)


def _expand(builder, pick) -> dict[str, str]:
    """{layer path: choice} from one choice index per allocation unit (every call of a unit takes it)."""
    return {q: builder.choices[unit[0]][j] for unit, j in zip(builder.units, pick) for q in unit}


def _refit_error(builder, costs, limits, objective, secondary, names, budget, pick, assign, new, err,
                 evalb, refs):
    """The per-layer errors do not add exactly. While the measured error is over the budget, search the
    predicted-error limit: first scaled by (budget / measured)², then bisected between the largest limit whose
    allocation measured within the budget and the smallest that did not, to 2% (at most _REFITS solves).
    Returns the allocation with the largest limit that measured within budget."""
    target = budget.value
    refits = 0
    if err <= target:
        return pick, assign, new, err, refits
    hi, lo, best = limits["error"], None, None
    while refits < _REFITS and (lo is None or (hi - lo) > 0.02 * hi):
        refits += 1
        cand = hi * (target / err) ** 2 * 0.98 if lo is None else 0.5 * (lo + hi)
        trial = dict(limits, error=cand)
        p2 = alloc.allocate(costs, trial, objective, secondary, names)
        a2 = _expand(builder, p2)
        g2 = builder.build(a2)
        e2 = mean_error(g2, evalb, refs)
        if e2 <= target:
            lo, best = cand, (p2, a2, g2, e2)
        else:
            hi, err = cand, e2
    if best is None:
        raise BudgetError(f"budget {budget}: after {refits} refits the measured output error is still {err:.4g} (the "
                          f"per-layer errors do not add up on this model); loosen the budget")
    limits["error"] = lo
    return (*best, refits)


def _why(choices: list[str], costs: list[dict], j: int, objective: str, limits: dict) -> str:
    """One sentence: why this choice and not a cheaper one (what the other choices would trade)."""
    mine = costs[j]
    kinds = [objective] + [k for k in limits if k != objective]
    better_obj = [(c, d) for c, d in zip(choices, costs) if d[objective] < mine[objective] - 1e-15]
    if not better_obj:
        other = [k for k in ("size", "error", "latency") if k in mine and k != objective]
        return (f"lowest {objective} of its choices" +
                (f" (its {', '.join(other)} fit the budgets)" if other else ""))
    # a choice that would lower the objective exists: some budget (the binding one) made it too dear
    c, d = min(better_obj, key=lambda cd: cd[1][objective])
    costlier = [k for k in kinds[1:] if d.get(k, 0.0) > mine.get(k, 0.0)]
    parts = []
    for k in costlier:
        delta = d[k] - mine[k]
        txt = (_fmt_bytes(delta) if k == "size" else f"{delta:.3g} ms" if k == "latency" else
               f"err² {delta:.3g} (err {math.sqrt(mine['error']):.2g} -> {math.sqrt(d['error']):.2g})")
        parts.append(f"+{txt}")
    saved = mine[objective] - d[objective]
    save_txt = (_fmt_bytes(saved) if objective == "size" else f"{saved:.3g} ms" if objective == "latency"
                else f"err² {saved:.3g}")
    head = f"{SHORT[c]} would save {save_txt} of {objective} but costs {', '.join(parts) or 'nothing budgeted'}"
    # a choice that alone takes more than the whole budget is not traded against other layers: say so (an error
    # limit is the one the allocation used: the budget, or the predicted-error limit its refits settled on)
    over = [k for k in costlier if k in limits and d[k] > limits[k]]
    if over:
        k = over[0]
        fmt = (_fmt_bytes if k == "size" else (lambda v: f"{v:.3g} ms") if k == "latency"
               else (lambda v: f"err {math.sqrt(max(v, 0.0)):.2g}"))
        return f"{head}: more than the whole {k} budget by itself ({fmt(d[k])} > {fmt(limits[k])})"
    return f"{head}: within the {'/'.join(costlier) or ''} budget that buys more elsewhere"
