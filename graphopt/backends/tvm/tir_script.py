"""`prim_func`: TVMScript's `@T.prim_func` for kernels generated at build time, without its `inspect.stack()`.

`T.prim_func` calls `inspect.stack()` before parsing, to find the variables that string annotations (PEP 563,
`from __future__ import annotations`) name in enclosing functions. `inspect.stack()` reads a source line for
every frame on the stack and looks up each frame's module by scanning `sys.modules`: with torch, TVM and
pytest loaded, ~90 ms per kernel, half of what parsing a generated kernel costs (cProfile of
tests/quant/test_fused_epilogue.py + test_schedules.py: 27.5 of 57 s in `prim_func`). graphopt generates a
kernel per layer shape (quant_lower, weight_only, sparse / N:M kernels, winograd), so every int8 build paid it.

This decorator parses the same way (TVM's own `parse`, closure and global capture, the same PEP 563
resolution) and hands that resolution the enclosing frames themselves (`sys._getframe`), which is all it
reads of them (`frame.f_code.co_name`, `frame.f_locals`). The one thing `T.prim_func` does with the source
lines is notice a function defined in a class body under `@I.ir_module`, which generated kernels never are.
The result is the PrimFunc `T.prim_func` gives (tests/backends/test_tir_script.py).

Macros (`@T.macro`, used by the weight-only kernels) have the same cost at every use: TVMScript finds the
running parser with `inspect.getouterframes`, which also reads a source line per frame. While graphopt parses,
that lookup walks the frames' globals directly (the same search, in the same order).
"""
from __future__ import annotations

import contextlib
import sys
from typing import Callable

__all__ = ["prim_func"]


class _Frame:
    """The part of inspect.FrameInfo that TVMScript's closure resolution reads."""

    __slots__ = ("frame",)

    def __init__(self, frame):
        self.frame = frame


def _outer_frames() -> list[_Frame]:
    """[this function's caller (prim_func), its caller, ...]: inspect.stack()'s frames, read from nothing."""
    frames, frame = [], sys._getframe(1)
    while frame is not None:
        frames.append(_Frame(frame))
        frame = frame.f_back
    return frames


@contextlib.contextmanager
def _macros_find_their_parser_by_frames():
    """ScriptMacro._find_parser_def without inspect.getouterframes (restored afterwards)."""
    from tvm.script.parser.core.parser import ScriptMacro

    original = ScriptMacro._find_parser_def

    def find_parser_def(self):
        frame = sys._getframe()
        while frame is not None:
            parser = frame.f_globals.get(ScriptMacro.parser_object_name)
            if parser is not None:
                return parser
            frame = frame.f_back
        raise RuntimeError(f"{ScriptMacro.parser_object_name} not available")

    ScriptMacro._find_parser_def = find_parser_def
    try:
        yield
    finally:
        ScriptMacro._find_parser_def = original


def prim_func(func: Callable):
    """Parse `func` (a TVMScript function) into a tvm.tirx.PrimFunc, as `@T.prim_func` does."""
    from tvm.script.parser._core import parse, utils

    outer = _outer_frames()          # [prim_func, the function that defines `func`, ...], as T.prim_func has
    extra_vars = utils.inspect_function_capture(func)
    utils.resolve_closure_vars(func, extra_vars, outer)
    del outer                        # no frame references kept
    with _macros_find_their_parser_by_frames():
        parsed = parse(func, extra_vars, check_well_formed=True)
    setattr(parsed, "__name__", func.__name__)
    return parsed


prim_func.dispatch_token = "tirx"     # the parser reads the decorator's token to pick the TIR dialect
