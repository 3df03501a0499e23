"""`schedule(func)`: a TensorIR schedule whose Python methods skip TVM's per-call argument type check.

TVM's Python `s_tir.Schedule` wraps every primitive (`get_sblock`, `split`, `vectorize`, ... and the
constructor) in `type_checked`, which binds the call's arguments to the method's signature and walks its
type annotations on every call. For graphopt's default schedules, which issue thousands of primitives per
model, that check was about a quarter of the scheduling time (a one-layer encoder: 0.67 of 1.48 s of
scheduling inside the wrappers, 0.35 s of it in the check). The primitives themselves are unchanged: each
method here is the very function the wrapper calls (`__wrapped__`), the FFI still converts and checks every
argument against the C++ signature, and every primitive still checks its own preconditions. Schedules
made elsewhere (MetaSchedule's search, users' own code) keep TVM's class and its check.
"""
from __future__ import annotations

from typing import Any

__all__ = ["schedule"]

_CLASS: list = []


def _unchecked_class():
    """s_tir.Schedule with every type-checked method replaced by the method it wraps (made once)."""
    if _CLASS:
        return _CLASS[0]
    from tvm import s_tir

    base = s_tir.Schedule
    methods = {name: attr.__wrapped__ for name, attr in vars(base).items()
               if callable(attr) and callable(getattr(attr, "__wrapped__", None))}
    cls = type("UncheckedSchedule", (base,), {"__doc__": __doc__, "__module__": __name__, **methods})
    _CLASS.append(cls)
    return cls


def schedule(func: Any):
    """A schedule of `func` (a PrimFunc or IRModule), as `tvm.s_tir.Schedule(func)`, without the Python-side
    argument type check on its methods (see the module docstring)."""
    return _unchecked_class()(func)
