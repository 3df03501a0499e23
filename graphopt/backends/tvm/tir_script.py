"""`prim_func`: TVMScript's `@T.prim_func` for kernels generated at build time, without its `inspect.stack()`.

`T.prim_func` calls `inspect.stack()` before parsing, to find the variables that string annotations (PEP 563,
`from __future__ import annotations`) name in enclosing functions. `inspect.stack()` reads a source line for
every frame on the stack and looks up each frame's module by scanning `sys.modules`: with torch, TVM and
pytest loaded, ~90 ms per kernel, half of what parsing a generated kernel costs (cProfile of
tests/quant/test_fused_epilogue.py + test_schedules.py: 27.5 of 57 s in `prim_func`). graphopt generates a
kernel per layer shape (quant_lower, weight_only, sparse / N:M kernels, winograd), so every int8 build paid it.

This decorator parses the same way (TVM's own `parse`, closure and global capture, the same PEP 563
resolution: an annotation's name not captured is read from the nearest enclosing function's frame, found by
walking `sys._getframe()` outwards, which is all that resolution reads of the stack). The one thing
`T.prim_func` does with the source lines is notice a function defined in a class body under `@I.ir_module`,
which generated kernels never are. The result is the PrimFunc `T.prim_func` gives
(tests/backends/test_tir_script.py).

Macros (`@T.macro`, used by the weight-only kernels) have the same cost at every use: TVMScript finds the
running parser with `inspect.getouterframes`, which also reads a source line per frame. While graphopt parses,
that lookup walks the frames' globals directly (the same search, in the same order).

Parsing is most of what a generated kernel costs to build (~50 ms each; 184 kernels, 9.4 of the 27 s of four
int8 builds of ResNet-18 and MobileNetV2), and TVMScript turns the same source into its syntax tree at every
parse, twice (once to parse, once for the error report of the well-formedness check). So:
- each kernel definition's source, syntax tree and annotation names are read once per process (`_Definition`;
  TVMScript's PEP 563 resolution read and parsed the source again at every kernel); TVM's parser only
  reads the tree (the two places that write to it, a slice's missing step and an assignment target's context,
  write what they would write every time);
- a kernel is parsed once per process for the same definition and the same values of every name its source
  reads (`_kernel_key`), and later requests get a copy with fresh variables (`s_tir.renew_defs`), so no two
  functions of a module share a variable (kernels that renew_defs does not copy exactly, symbolic shapes, are
  parsed every time). Values that cannot be compared exactly (anything but numbers, strings, tuples, frozen
  dataclasses, enums, functions, modules, TIR variables and immediates) are parsed every time.
Those four builds (scratch script timing every prim_func call, one run each): 184 kernels, 44 of them reused,
parsing 9.4 -> 3.2 s, the four builds 27.0 -> 20.5-21.8 s (three runs).
"""
from __future__ import annotations

import ast
import contextlib
import dataclasses
import enum
import struct
import sys
import types
from collections import OrderedDict
from typing import Any, Callable

from ...errors import LoweringError

__all__ = ["prim_func"]


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


class _Definition:
    """A kernel definition's TVMScript Source with its syntax tree read once, and the names its source reads."""

    def __init__(self, func: Callable):
        from tvm.script.parser.core import doc
        from tvm.script.parser.core.diagnostics import Source

        from tvm.script.parser._core import utils

        self.source = Source(func)
        tree = doc.parse(self.source.source)
        self.source.as_ast = lambda: tree
        self.names = tuple(sorted({n.id for n in ast.walk(ast.parse(self.source.source)) if isinstance(n, ast.Name)}))
        # PEP 563 (string annotations): the names only annotations read, looked up in the enclosing frames
        self.annotation_names = sorted(utils._collect_annotation_names(func)) \
            if utils._has_string_annotations(func) else []
        self.enclosing = utils._get_enclosing_scope_names(func.__qualname__)

    def resolve_annotation_names(self, extra_vars: dict, frame) -> None:
        """utils.resolve_closure_vars with this definition's names: each annotation name not captured, from
        the nearest frame (from `frame` outwards) of an enclosing function that has it."""
        for name in self.annotation_names:
            if name in extra_vars:
                continue
            f = frame
            while f is not None:
                if f.f_code.co_name in self.enclosing and name in f.f_locals:
                    extra_vars[name] = f.f_locals[name]
                    break
                f = f.f_back


_DEFINITIONS: dict[types.CodeType, _Definition] = {}
_KERNELS: OrderedDict = OrderedDict()       # _kernel_key -> PrimFunc, least recently used first
KERNEL_CACHE_SIZE = 512


def _definition(func: Callable) -> _Definition:
    found = _DEFINITIONS.get(func.__code__)
    if found is None:
        found = _DEFINITIONS[func.__code__] = _Definition(func)
    return found


class _Unkeyable(Exception):
    pass


def _value_key(value: Any, depth: int = 0):
    """A hashable key equal for two values exactly when they parse the same (see the module docstring)."""
    if depth > 8:
        raise _Unkeyable
    kind = type(value)
    if value is None or kind in (bool, int, str):
        return kind, value
    if kind is float:
        return kind, struct.pack("<d", value)          # -0.0 and 0.0, NaN payloads: told apart
    if kind in (tuple, list):
        return (kind,) + tuple(_value_key(v, depth + 1) for v in value)
    if isinstance(value, enum.Enum) or isinstance(value, (types.FunctionType, types.BuiltinFunctionType,
                                                          types.ModuleType, type)):
        return "id", id(value), value               # the value itself keeps its id from being reused
    if dataclasses.is_dataclass(value) and value.__dataclass_params__.frozen:
        return (kind,) + tuple(_value_key(getattr(value, f.name), depth + 1) for f in dataclasses.fields(value))
    if hasattr(value, "dtype") and kind.__module__.startswith("numpy") and getattr(value, "ndim", None) == 0:
        return kind, str(value.dtype), value.tobytes()
    from tvm import tirx

    if kind in (tirx.IntImm, tirx.FloatImm):
        return kind, str(value.ty), _value_key(value.value, depth + 1)
    if kind is tirx.Var:
        return "id", id(value), value
    raise _Unkeyable


def _kernel_key(func: Callable, names: tuple, extra_vars: dict):
    """(code, every name the source reads with its value), or None when a value cannot be keyed."""
    try:
        return (func.__code__,) + tuple((n, _value_key(extra_vars[n])) for n in names if n in extra_vars)
    except _Unkeyable:
        return None


def _renews_exactly(func) -> bool:
    """Whether s_tir.renew_defs copies `func` faithfully: TVM 0.27's misses the variables of a buffer's
    layout (a symbolic shape), so such kernels are not kept."""
    import tvm_ffi
    from tvm import s_tir

    return tvm_ffi.structural_equal(s_tir.renew_defs(func), func)


@contextlib.contextmanager
def _parser_reads_definitions_once():
    """TVMScript's parse() takes each function's Source from `_definition` (restored afterwards)."""
    from tvm.script.parser.core import entry

    original = entry.Source
    entry.Source = lambda program: _definition(program).source if isinstance(program, types.FunctionType) \
        else original(program)
    try:
        yield
    finally:
        entry.Source = original


def prim_func(func: Callable):
    """Parse `func` (a TVMScript function) into a tvm.tirx.PrimFunc, as `@T.prim_func` does."""
    from tvm import s_tir
    from tvm.script.parser._core import parse, utils

    definition = _definition(func)
    extra_vars = utils.inspect_function_capture(func)
    definition.resolve_annotation_names(extra_vars, sys._getframe(1))     # from the caller outwards
    key = _kernel_key(func, definition.names, extra_vars)
    if key is not None and key in _KERNELS:
        _KERNELS.move_to_end(key)
        parsed = s_tir.renew_defs(_KERNELS[key])
    else:
        with _macros_find_their_parser_by_frames(), _parser_reads_definitions_once():
            parsed = parse(func, extra_vars, check_well_formed=True)
        lets = lets_in_vectorized_loops(parsed)
        if lets:
            raise LoweringError(f"kernel {func.__name__}: '{lets[0]}' is assigned inside a vectorized loop, which "
                                f"TVM vectorizes as one scalar (every lane gets the last lane's value): write its "
                                f"expression with T.meta_var instead")
        if key is not None and _renews_exactly(parsed):
            _KERNELS[key] = parsed
            if len(_KERNELS) > KERNEL_CACHE_SIZE:
                _KERNELS.popitem(last=False)
    setattr(parsed, "__name__", func.__name__)
    return parsed


def lets_in_vectorized_loops(func) -> list[str]:
    """Names of the variables bound by assignment (`x = expr` in TVMScript, which TVM 0.27 parses as a one-element
    local buffer, `AllocBuffer` + store) or by a let inside a vectorized loop of PrimFunc `func`. TVM vectorizes
    such a variable as one scalar: `for j in T.vectorized(16): x = X[j]; Y[j] = x * 2` stores 2·X[15] in every
    lane. prim_func refuses them (T.meta_var substitutes the expression instead)."""
    import tvm_ffi
    from tvm import tirx

    found: list[str] = []

    def loop(n):
        if n.kind == tirx.ForKind.VECTORIZED:
            def local(b):
                found.append(b.buffer.name if isinstance(b, tirx.AllocBuffer) else b.var.name)
                return b

            tvm_ffi.structural_map(n.body, [((tirx.AllocBuffer, tirx.Bind, tirx.LetStmt), local)])
        return n

    tvm_ffi.structural_map(func.body, [(tirx.For, loop)])
    return found


prim_func.dispatch_token = "tirx"     # the parser reads the decorator's token to pick the TIR dialect
