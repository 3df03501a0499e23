"""Shape/dtype propagation: runs the graph once and records `tensor_meta` on every node."""
from __future__ import annotations

from typing import Any

import torch
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp


def propagate_shapes(gm: fx.GraphModule, example_inputs: tuple) -> Any:
    """Run `gm` on `example_inputs`, store shape/dtype in ``node.meta['tensor_meta']``; return the outputs."""
    with torch.no_grad():
        return ShapeProp(gm).propagate(*example_inputs)


def node_shape(node: fx.Node) -> tuple[int, ...] | None:
    """The propagated shape of a node's (tensor) value, or None when unknown or not a tensor."""
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(shape) if shape is not None else None
