"""One helper for module passes that rewrite TIR kernels one by one."""
from __future__ import annotations

from typing import Any, Callable


def prim_func_pass(name: str, rewrite: Callable[[Any], Any]):
    """Module pass: `rewrite(func)` for every PrimFunc of the module, returning the new function, or None or
    `func` itself where it changes nothing; the module is copied only when some function changed."""
    import tvm
    from tvm import tirx

    @tvm.transform.module_pass(opt_level=0, name=name)
    def _pass(mod, ctx):
        updates = {}
        for gv, func in mod.functions_items():
            if isinstance(func, tirx.PrimFunc):
                new = rewrite(func)
                if new is not None and not new.same_as(func):
                    updates[gv] = new
        if not updates:
            return mod
        mod = mod.clone() if hasattr(mod, "clone") else mod
        for gv, func in updates.items():
            mod[gv] = func
        return mod

    return _pass
