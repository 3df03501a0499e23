"""Graph analyses: shape propagation, FLOPs/params, output comparison, channel dependencies."""
from .flops import count_flops, count_params, model_size_bytes
from .shapes import propagate_shapes

__all__ = ["count_flops", "count_params", "model_size_bytes", "propagate_shapes"]
