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

F32 = "float32"     # (a name: a string literal inside an annotation reads as a forward reference to linters)


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


def _fill_kernel(n: int, value, ours: bool = True):
    """A kernel whose body reads a closure value of any type: what the kernel cache keys on."""
    if ours:
        @prim_func
        def fill(B: T.Buffer((n,), F32)):
            for i in range(n):
                B[i] = T.float32(value)
        return fill

    @T.prim_func
    def fill(B: T.Buffer((n,), F32)):
        for i in range(n):
            B[i] = T.float32(value)
    return fill


def _run_fill(func, n):
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target="llvm")
    out = tvm.runtime.tensor(np.full(n, 7.0, dtype=F32))
    lib["main"](out)
    return out.numpy()


def test_a_repeated_kernel_is_the_same_function_with_variables_of_its_own():
    first, again = _fill_kernel(6, 2.5), _fill_kernel(6, 2.5)
    tvm.ir.assert_structural_equal(first, _fill_kernel(6, 2.5, ours=False))
    tvm.ir.assert_structural_equal(first, again)
    assert again.__name__ == "fill"
    # two functions of one module never share a variable (TIR's well-formedness rule)
    mod = tvm.IRModule({"a": first.with_attr("global_symbol", "a"), "b": again.with_attr("global_symbol", "b")})
    assert tvm.s_tir.analysis.verify_well_formed(mod, assert_mode=False)
    assert first.params[0] is not again.params[0]
    np.testing.assert_array_equal(_run_fill(again, 6), np.full(6, 2.5, dtype=F32))


@pytest.mark.parametrize("a, b", [(0.0, -0.0), (1, True), (1, 1.0), (float("nan"), float("inf")), ((1, 2), [1, 2]),
                                  (np.float32(0.5), np.float64(0.5)),
                                  (tvm.tirx.FloatImm("float32", 0.5), tvm.tirx.FloatImm("float16", 0.5)),
                                  (tvm.tirx.IntImm("int32", 2), tvm.tirx.IntImm("int64", 2))])
def test_values_that_compare_equal_but_parse_differently_are_separate_kernels(a, b):
    from graphopt.backends.tvm import tir_script

    assert tir_script._value_key(a) != tir_script._value_key(b)
    if isinstance(a, (bool, int, float)):
        for v in (a, b):     # and what each builds is its own value
            got = _run_fill(_fill_kernel(3, v), 3)
            np.testing.assert_array_equal(got, np.full(3, np.float32(v), dtype=F32))


def test_kernels_over_a_tir_variable_are_keyed_by_that_variable_and_run_at_any_size():
    from graphopt.backends.tvm import tir_script

    n1, n2 = tvm.tirx.Var("n", "int32"), tvm.tirx.Var("n", "int32")
    assert tir_script._value_key(n1) != tir_script._value_key(n2)
    f1, f1_again = _fill_kernel(n1, 1.0), _fill_kernel(n1, 1.0)
    tvm.ir.assert_structural_equal(f1, f1_again)
    for f in (f1, f1_again):
        for size in (3, 5):
            np.testing.assert_array_equal(_run_fill(f, size), np.ones(size, dtype=F32))


def test_values_without_an_exact_key_are_parsed_every_time(monkeypatch):
    from tvm.script.parser.core import entry

    calls = []
    real_parser = entry.Parser
    monkeypatch.setattr(entry, "Parser", lambda *a, **k: calls.append(1) or real_parser(*a, **k))
    table = {"v": 3.0}                   # a dict could change between two requests
    first = _fill_kernel_reading(table)
    table["v"] = 4.0
    second = _fill_kernel_reading(table)
    np.testing.assert_array_equal(_run_fill(first, 2), np.full(2, 3.0, dtype=F32))
    np.testing.assert_array_equal(_run_fill(second, 2), np.full(2, 4.0, dtype=F32))
    assert len(calls) == 2


def _fill_kernel_reading(table: dict):
    @prim_func
    def fill(B: T.Buffer((2,), F32)):
        for i in range(2):
            B[i] = T.float32(table["v"])
    return fill


def test_each_kernel_definition_is_read_into_a_syntax_tree_once(monkeypatch):
    from tvm.script.parser.core import doc

    from tvm.script.parser._core import utils

    from graphopt.backends.tvm import tir_script

    monkeypatch.setattr(tir_script, "_DEFINITIONS", {})        # as in a fresh process, whatever ran before
    reads, annotation_reads = [], []
    real, real_names = doc.parse, utils._collect_annotation_names
    monkeypatch.setattr(doc, "parse", lambda *a, **k: reads.append(1) or real(*a, **k))
    monkeypatch.setattr(utils, "_collect_annotation_names", lambda f: annotation_reads.append(1) or real_names(f))

    def kernel(k):
        @prim_func
        def scale(A: T.Buffer((4,), F32)):
            for i in range(4):
                A[i] = A[i] * T.float32(k)
        return scale

    for k in (1.5, 2.5, 3.5):
        kernel(k)
    assert len(reads) == 1 and len(annotation_reads) == 1       # PEP 563's annotation names: once too


def _doubling_kernel(substitute: bool):
    """Y = 2·X over one vectorized loop, its element named by assignment (a local the vectorizer makes one
    scalar) or by T.meta_var (the expression substituted)."""
    if substitute:
        @prim_func
        def doubled(X: T.Buffer((16,), F32), Y: T.Buffer((16,), F32)):
            T.func_attr({"tirx.noalias": True})
            for j in T.vectorized(16):
                x = T.meta_var(X[j])
                Y[j] = x * T.float32(2)
        return doubled

    @prim_func
    def doubled(X: T.Buffer((16,), F32), Y: T.Buffer((16,), F32)):
        T.func_attr({"tirx.noalias": True})
        for j in T.vectorized(16):
            x = X[j]
            Y[j] = x * T.float32(2)
    return doubled


def test_assignments_inside_vectorized_loops_are_refused():
    """TVM vectorizes a variable assigned inside a vectorized loop as one scalar (every lane got 2·X[15]: the bug
    found writing woq4_bf16's split kernel), so prim_func raises a LoweringError naming it; T.meta_var runs."""
    from graphopt.errors import LoweringError

    with pytest.raises(LoweringError, match="'x' is assigned inside a vectorized loop"):
        _doubling_kernel(substitute=False)
    lib = tvm.compile(_doubling_kernel(substitute=True), target="llvm")
    x = np.arange(16, dtype=np.float32)
    y = tvm.runtime.tensor(np.zeros(16, np.float32))
    lib(tvm.runtime.tensor(x), y)
    assert np.array_equal(y.numpy(), 2 * x)
