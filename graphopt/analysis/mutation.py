"""In-place ops in a captured graph: which nodes mutate a tensor, and rewriting them out of place.

symbolic_trace records `y.relu_()` as a node whose result nobody uses while the later readers of the
mutated tensor keep reading `y`: the graph means what it computes only when run in order in PyTorch. A pass
that inserts a node after `y` (quantize's observers and quantize ops) then reads `y` before the mutation, and
dead-code elimination drops the mutation (nothing uses its result). `functionalize_inplace` rewrites each such
op out of place (`relu_` -> `relu`, `F.relu(x, inplace=True)` -> `inplace=False`; an nn.ReLU(inplace=True)
module stays as it is) and points the readers of the tensor after the op at its result, where that is the same
computation: the tensor shares its memory with no other value read after the op (checked by running the
graph), and it is not one of the model's own parameters or buffers. The ops it cannot rewrite stay, and
`eliminate_dead_code` keeps them.
"""
from __future__ import annotations

import inspect
import operator

import torch
import torch.nn.functional as F
from torch import fx

__all__ = ["mutated_arg", "functionalize_inplace", "eliminate_dead_code"]

_INPLACE_FUNCTIONS = {operator.setitem}
# in-place methods whose name without "_" is another computation (Tensor.resize, Tensor.bernoulli's arguments)
_OTHER_OUT_OF_PLACE = {"resize_", "bernoulli_"}


def _inplace_kwarg(node: fx.Node) -> bool:
    """Whether a call_function node passes inplace=True (F.relu(x, inplace=True), F.relu(x, True))."""
    if node.kwargs.get("inplace") is True:
        return True
    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):
        return False
    return bound.arguments.get("inplace") is True


def mutated_arg(node: fx.Node) -> fx.Node | None:
    """The node whose tensor `node` changes in place (its first argument), or None."""
    first = node.args[0] if node.args else None
    if not isinstance(first, fx.Node):
        return None
    if node.op == "call_method":
        name = str(node.target)
        return first if name.endswith("_") and not name.startswith("_") else None
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        if node.target in _INPLACE_FUNCTIONS or (name.endswith("_") and not name.startswith("_")):
            return first
        return first if _inplace_kwarg(node) else None
    if node.op == "call_module" and node.graph.owning_module is not None:
        mod = node.graph.owning_module.get_submodule(str(node.target))
        return first if getattr(mod, "inplace", False) is True else None
    return None


def _out_of_place(node: fx.Node) -> dict | None:
    """How to rewrite `node` out of place: {"target": ...} and/or {"kwargs": ...}, or None if it cannot be."""
    if node.op == "call_method":
        base = str(node.target)[:-1]
        if str(node.target) in _OTHER_OUT_OF_PLACE or not callable(getattr(torch.Tensor, base, None)):
            return None
        return {"target": base}
    if node.op == "call_function":
        if node.target in _INPLACE_FUNCTIONS:
            return None
        name = getattr(node.target, "__name__", "")
        if name.endswith("_"):
            for space in (F, torch):
                if getattr(space, name, None) is node.target and callable(getattr(space, name[:-1], None)):
                    return {"target": getattr(space, name[:-1])}
            return None
        try:
            bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
        except (TypeError, ValueError):
            return None
        bound.arguments["inplace"] = False
        return {"args": bound.args, "kwargs": bound.kwargs}
    if node.op == "call_module":
        return {}                               # its output is the changed tensor: the later readers move to it
    return None


def _storages(gm: fx.GraphModule, example_inputs: tuple) -> dict[fx.Node, int]:
    """{node: the address of its tensor value's storage} from one run of gm on the example inputs."""
    out: dict[fx.Node, int] = {}

    class _Record(fx.Interpreter):
        def run_node(self, n):
            value = super().run_node(n)
            if isinstance(value, torch.Tensor) and value.layout == torch.strided:
                out[n] = value.untyped_storage().data_ptr()
            return value

    with torch.no_grad():
        _Record(gm).run(*example_inputs)
    return out


def functionalize_inplace(gm: fx.GraphModule, example_inputs: tuple) -> tuple[int, list[str]]:
    """Rewrite gm's in-place ops out of place where that computes the same (module docstring).

    Returns (how many were rewritten, notes naming those kept in place and why)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}

    def later_readers(node):
        target = mutated_arg(node)
        return [u for u in target.users if u is not node and order[u] > order[node]]

    # nn.ReLU(inplace=True) as in `x = self.relu(x)` (torchvision's models): nothing reads x after it
    todo = [n for n in gm.graph.nodes if mutated_arg(n) is not None and (n.op != "call_module" or later_readers(n))]
    if not todo:
        return 0, []
    storages = _storages(gm, example_inputs)
    done, kept = 0, []
    for node in todo:
        target, later = mutated_arg(node), later_readers(node)
        if target.op == "get_attr":
            kept.append(f"kept in-place '{node.name}': it changes the model's own '{target.target}'")
            continue
        how = _out_of_place(node)
        if how is None:
            kept.append(f"kept in-place '{node.name}' ({node.target}): no out-of-place form")
            continue
        addr = storages.get(target)
        if addr is None:
            kept.append(f"kept in-place '{node.name}': what it changes is not a tensor")
            continue
        # another value sharing that memory (a view of it, or what it is a view of), read after the op,
        # would see the change: moving the readers of `target` alone would not be the same computation
        aliases = [m for m, a in storages.items() if a == addr and m is not target and m is not node
                   and order[m] < order[node]]
        read_later = [m for m in aliases if any(order[u] > order[node] for u in m.users)
                      or any(u.op == "output" for u in m.users)]
        if read_later:
            kept.append(f"kept in-place '{node.name}': '{read_later[0].name}' shares the memory of "
                        f"'{target.name}' and is read after it")
            continue
        if "target" in how:
            node.target = how["target"]
        if "args" in how:
            node.args, node.kwargs = tuple(how["args"]), dict(how["kwargs"])
        for user in later:
            user.replace_input_with(target, node)
        done += 1
    gm.graph.lint()
    gm.recompile()
    return done, kept


def eliminate_dead_code(gm: fx.GraphModule) -> int:
    """Drop the nodes whose values nobody uses, keeping those that change a tensor in place; returns how many
    were dropped."""
    before = len(gm.graph.nodes)
    gm.graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure() or mutated_arg(n) is not None)
    return before - len(gm.graph.nodes)
