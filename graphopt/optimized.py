"""OptimizedModel: what optimize() returns and load() restores.

Below both api.py (which makes one) and artifact.py (which saves and restores one), so neither imports the
other.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from torch import fx

    from .backends.targets import TargetSpec
    from .pipeline import Pipeline
    from .report import Report

__all__ = ["OptimizedModel"]


class OptimizedModel:
    """The result of optimize(): callable like the original model, with its report.

    Attributes:
      graph_module: the optimized fx.GraphModule (always runnable in plain PyTorch)
      compiled:     what runs on the target (a TVM CompiledModule, or graph_module for target="torch")
      report:       per-pass params, FLOPs, size, max |Δ| vs original, seconds; plus backend figures
      pipeline:     the Pipeline that was run
      target:       the resolved TargetSpec
    """

    def __init__(self, graph_module: fx.GraphModule | None, compiled: Any, report: Report,
                 pipeline: Pipeline | str, target: TargetSpec, capture_method: str = ""):
        self.graph_module = graph_module
        self.compiled = compiled
        self.report = report
        self.pipeline = pipeline
        self.target = target
        self.capture_method = capture_method
        self.input_shapes: list[tuple[int, ...]] = []     # the example inputs' shapes (compiled signature)
        self.dynamic = None             # graphopt.dynamic.DynamicSpec: the dims that may vary per call, or None

    def __call__(self, *args, **kwargs):
        if self.compiled is self.graph_module and self.graph_module is not None:
            with torch.no_grad():
                return self.graph_module(*args, **kwargs)
        return self.compiled(*args, **kwargs)

    def save(self, path: str) -> str:
        """Write an artifact (compiled library + JSON metadata + checksum). Returns the path."""
        from .artifact import save          # the artifact format sits above this type; it imports this module

        return save(self, path)

    def __repr__(self) -> str:
        return f"OptimizedModel(target={self.target.alias!r}, pipeline={str(self.pipeline)!r})"
