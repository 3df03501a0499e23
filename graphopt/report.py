"""The optimization report: one row per pass (params, FLOPs, size, max |Δ| vs original, seconds)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import fx

from .analysis.compare import Diff
from .analysis.flops import count_flops, count_params, model_size_bytes


@dataclass
class PassRecord:
    name: str
    params: int
    flops: int
    size_bytes: int
    max_abs: float
    max_rel: float
    seconds: float
    exact: bool
    notes: list[str] = field(default_factory=list)
    details: list[dict] = field(default_factory=list)

    @classmethod
    def measure(cls, name: str, gm: fx.GraphModule, diff: Diff, *, seconds: float, exact: bool,
                notes=(), details=()) -> "PassRecord":
        return cls(name, count_params(gm), count_flops(gm), model_size_bytes(gm), diff.max_abs,
                   diff.max_rel, seconds, exact, list(notes), list(details))


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


@dataclass
class Report:
    pipeline: str = ""
    records: list[PassRecord] = field(default_factory=list)
    backend: dict[str, Any] = field(default_factory=dict)    # target, lowering/build seconds, ...

    def add(self, rec: PassRecord) -> None:
        self.records.append(rec)

    @property
    def final(self) -> PassRecord:
        return self.records[-1]

    def to_dict(self) -> dict:
        return {"pipeline": self.pipeline, "passes": [asdict(r) for r in self.records],
                "backend": self.backend}

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    @classmethod
    def from_dict(cls, d: dict) -> "Report":
        return cls(d.get("pipeline", ""), [PassRecord(**r) for r in d.get("passes", [])],
                   d.get("backend", {}))

    def table(self) -> str:
        head = ("pass", "params", "FLOPs", "size", "max|Δ|", "rel|Δ|", "seconds", "exact")
        rows = [head]
        for r in self.records:
            rows.append((r.name, _si(r.params), _si(r.flops), _si(r.size_bytes) + "B",
                         f"{r.max_abs:.2e}", f"{r.max_rel:.2e}", f"{r.seconds:.3f}",
                         "yes" if r.exact else "approx"))
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        for r in self.records:
            for note in r.notes:
                lines.append(f"  [{r.name}] {note}")
        if self.backend:
            lines.append("backend: " + ", ".join(f"{k}={v}" for k, v in self.backend.items()
                                                 if k != "sparse_layers"))
        for r in self.backend.get("sparse_layers") or []:      # the sparse kernel decision per layer
            timing = (f", dense {r['dense_us']:.1f} us vs sparse {r['sparse_us']:.1f} us"
                      if r.get("dense_us") is not None else "")
            lines.append(f"  [sparse] {r['layer']}: {r['kernel']} ({r['why']}{timing}); M={r['M']} K={r['K']} "
                         f"N={r['N']} block {r['block']} density {r['density']:.3f}; weights "
                         f"{r['stored_bytes'] / 1e3:.1f} kB (dense {r['dense_bytes'] / 1e3:.1f} kB)")
        return "\n".join(lines)

    def details_table(self, pass_name: str) -> str:
        """Per-layer rows a pass reported (e.g. chosen rank, channels kept)."""
        rows = [d for r in self.records if r.name.split("(")[0] == pass_name for d in r.details]
        if not rows:
            return f"(no per-layer details for {pass_name})"
        keys = list(rows[0].keys())
        table = [keys] + [[_fmt(d.get(k)) for k in keys] for d in rows]
        widths = [max(len(row[i]) for row in table) for i in range(len(keys))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in table)

    def __str__(self) -> str:
        return self.table()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
