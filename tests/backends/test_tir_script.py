"""graphopt's `prim_func` decorator (backends/tvm/tir_script.py) parses generated kernels as `@T.prim_func` does,
without inspect.stack()."""
from __future__ import annotations     # string annotations: the case that needs the enclosing frames

import contextlib
import inspect

import numpy as np
import pytest

from graphopt.backends.tvm import quant_lower
from graphopt.backends.tvm.tir_script import prim_func

tvm = pytest.importorskip("tvm")
from tvm.script import tirx as T  # noqa: E402


def _scale_kernel(n: int, m: int, factor: float, dtype: str, ours: bool):
    """A kernel whose annotations name the enclosing function's locals (n, m, dtype) and whose body reads a
    closure value (factor): what quant_lower's generators do."""
    rows = n * 2
    if ours:
        @prim_func
        def scale(A: T.Buffer((rows, m), dtype), B: T.Buffer((rows, m), dtype)):
            T.func_attr({"tirx.noalias": True})
            for i, j in T.grid(rows, m):
                B[i, j] = A[i, j] * T.Cast(dtype, factor)
        return scale

    @T.prim_func
    def scale(A: T.Buffer((rows, m), dtype), B: T.Buffer((rows, m), dtype)):
        T.func_attr({"tirx.noalias": True})
        for i, j in T.grid(rows, m):
            B[i, j] = A[i, j] * T.Cast(dtype, factor)
    return scale


def test_same_primfunc_as_tvmscript_decorator():
    ours, theirs = _scale_kernel(3, 8, 2.5, "float32", True), _scale_kernel(3, 8, 2.5, "float32", False)
    tvm.ir.assert_structural_equal(ours, theirs)
    assert ours.__name__ == theirs.__name__ == "scale"
    lib = tvm.compile(tvm.IRModule({"main": ours.with_attr("global_symbol", "main")}), target="llvm")
    a = np.arange(48, dtype="float32").reshape(6, 8)
    b = tvm.runtime.tensor(np.zeros_like(a))
    lib["main"](tvm.runtime.tensor(a), b)
    np.testing.assert_array_equal(b.numpy(), a * np.float32(2.5))


def test_graphopt_kernels_parse_without_inspect_stack(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("inspect.stack() called")

    monkeypatch.setattr(inspect, "stack", refuse)
    _scale_kernel(2, 4, 1.0, "float32", True)
    func = quant_lower.dense_kernel(4, 8, 2, 1, 1, "avx2")      # a generated int8 GEMM kernel
    assert isinstance(func, tvm.tirx.PrimFunc)
    with pytest.raises(AssertionError, match="inspect.stack"):     # the check above would have seen it
        _scale_kernel(2, 4, 1.0, "float32", False)


def test_kernels_with_macros_parse_without_outer_frame_reads(monkeypatch):
    """The weight-only panel kernel uses T.macro; its macros find the parser without inspect.getouterframes, and
    TVMScript's own lookup is back in place afterwards."""
    from tvm.script.parser.core.parser import ScriptMacro

    from graphopt.backends.tvm import weight_only

    from graphopt.backends.tvm import tir_script

    original = ScriptMacro._find_parser_def
    with pytest.MonkeyPatch.context() as mp:          # TVMScript's own lookup
        mp.setattr(tir_script, "_macros_find_their_parser_by_frames", contextlib.nullcontext)
        built = weight_only.panel_kernel(8, 64, 2, 4, 1, 8, bits=4, G=32, sym=False)

    def refuse(*args, **kwargs):
        raise AssertionError("inspect.getouterframes() called")

    monkeypatch.setattr(inspect, "getouterframes", refuse)
    again = weight_only.panel_kernel(8, 64, 2, 4, 1, 8, bits=4, G=32, sym=False)
    tvm.ir.assert_structural_equal(built, again)
    assert ScriptMacro._find_parser_def is original
