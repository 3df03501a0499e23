"""Hooks on the call sites of a torch.fx GraphModule, not on module objects.

A module called at several places of a graph (one nn.Linear applied twice) is one object, so its nn.Module
hooks fire at every call. graphopt.quant gives each call of such a layer its own module path, the object still
shared (graph._unshare: the calls see different inputs, so they get different input qparams); an analysis of
one path's input or output (bias correction, per-layer error, per-layer latency) must see that call only.
`run_with_site_hooks` runs the graph node by node and calls a path's hooks at the node that names it.
"""
from __future__ import annotations

from typing import Callable, Mapping

from torch import fx, nn

__all__ = ["run_with_site_hooks", "paths_by_module"]

PreHook = Callable[[nn.Module, tuple], "tuple | None"]
PostHook = Callable[[nn.Module, tuple, object], None]


class _SiteHooks(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, pre: Mapping[str, PreHook], post: Mapping[str, PostHook]):
        super().__init__(gm)
        self.pre, self.post = pre, post

    def call_module(self, target, args, kwargs):
        mod = self.fetch_attr(target)
        if target in self.pre:
            new = self.pre[target](mod, args)
            if new is not None:
                args = tuple(new)
        out = super().call_module(target, args, kwargs)
        if target in self.post:
            self.post[target](mod, args, out)
        return out


def run_with_site_hooks(gm: fx.GraphModule, args: tuple, *, pre: Mapping[str, PreHook] | None = None,
                        post: Mapping[str, PostHook] | None = None):
    """gm(*args), with pre[path](module, args) called before the call_module node of `path` (a tuple it
    returns replaces the args, as an nn.Module forward pre-hook's does) and post[path](module, args, output)
    after it. Each node runs once, so a path's hooks run once per call of gm whatever else calls its module."""
    return _SiteHooks(gm, pre or {}, post or {}).run(*args)


def paths_by_module(gm: nn.Module, paths) -> list[list[str]]:
    """`paths` (submodule paths of gm) grouped by the module object they name, in order of first appearance: a
    layer called at several places is one group of several paths."""
    groups: dict[int, list[str]] = {}
    for path in paths:
        groups.setdefault(id(gm.get_submodule(path)), []).append(path)
    return list(groups.values())
