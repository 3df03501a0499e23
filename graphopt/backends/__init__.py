"""Backends: 'torch' (the optimized GraphModule itself) and TVM (x86, ARM, CUDA)."""
from .targets import TargetSpec, resolve_target

__all__ = ["TargetSpec", "resolve_target"]
