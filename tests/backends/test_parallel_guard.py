"""parallel_guard.serial_when_small: a dynamic kernel's parallel loops run serial on calls with little work."""
from __future__ import annotations

import numpy as np
import pytest
import tvm
import tvm_ffi
from tvm import te, tirx

from graphopt.backends.tvm import schedules
from graphopt.backends.tvm.parallel_guard import PARALLEL_MIN, SERIAL_BELOW_ATTR, serial_when_small

TARGET = {"kind": "llvm", "mcpu": "haswell", "num-cores": 2}


def _gelu_like(cols: int, rows=None):
    """y = x * sigmoid(x) + b over (rows, cols): rows a symbolic size unless given."""
    n = tirx.Var("n", "int64") if rows is None else tirx.IntImm("int64", rows)
    x = te.placeholder((n, tirx.IntImm("int64", cols)), name="x")
    b = te.placeholder((tirx.IntImm("int64", cols),), name="b")
    y = te.compute(x.shape, lambda i, j: x[i, j] * te.sigmoid(x[i, j]) + b[j], name="y")
    return te.create_prim_func([x, b, y])


def _scheduled(funcs: dict):
    """{name: PrimFunc} scheduled by graphopt's default rules, as a module."""
    mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()})
    mod, _ = schedules.apply_default_schedules(mod, tvm.target.Target(TARGET))
    return mod


def test_a_dynamic_elementwise_kernel_gets_a_serial_copy_below_the_threshold():
    mod = _scheduled({"dyn": _gelu_like(256), "big": _gelu_like(1 << 15), "static": _gelu_like(256, rows=4)})
    assert int(mod["dyn"].attrs[SERIAL_BELOW_ATTR]) == PARALLEL_MIN         # Injective's own threshold
    guarded = serial_when_small()(mod)
    text = guarded["dyn"].script()
    assert f"if n * T.int64(256) < T.int64({PARALLEL_MIN}):" in text, text
    serial, parallel = text.split("else:")
    assert "T.parallel(" not in serial and "T.parallel(" in parallel, text
    # a row of 32768 is never small, a static kernel's choice was made at build time: both left as they were
    for name in ("big", "static"):
        assert tvm_ffi.structural_equal(guarded[name], mod[name]), name


def _small_gemm():
    """x [n, 16] @ w [16, 16], n symbolic, w a weight (PackedGemm's packed panels)."""
    n = tirx.Var("n", "int64")
    x, w = te.placeholder((n, tirx.IntImm("int64", 16)), name="x"), te.placeholder((16, 16), name="w")
    r = te.reduce_axis((tirx.IntImm("int64", 0), tirx.IntImm("int64", 16)), name="r")
    mm = te.compute((n, 16), lambda i, j: te.sum(x[i, r] * w[r, j], axis=r), name="mm")
    return te.create_prim_func([x, w, mm]).with_attr("layout_free_buffers", [1])


@pytest.mark.parametrize("rows", [1, 7, 300])
def test_a_small_dynamic_gemm_gets_a_serial_copy(rows):
    """PackedGemm opts in with Injective's threshold: a GEMM of a few rows (its operand copies, or the whole
    product) runs on the calling thread, bit for bit the scheduled kernel's results."""
    mod = _scheduled({"mm": _small_gemm()})
    assert int(mod["mm"].attrs[SERIAL_BELOW_ATTR]) == PARALLEL_MIN
    guarded_mod = serial_when_small()(mod)
    text = guarded_mod["mm"].script()
    assert f"< T.int64({PARALLEL_MIN}):" in text, text
    target = tvm.target.Target(TARGET)
    plain, guarded = tvm.compile(mod, target=target), tvm.compile(guarded_mod, target=target)
    rng = np.random.default_rng(rows)
    xa = rng.standard_normal((rows, 16)).astype("float32")
    xa[0, :2] = [np.nan, np.inf]
    wa = rng.standard_normal((16, 16)).astype("float32")
    outs = []
    for lib in (plain, guarded):
        out = tvm.runtime.tensor(np.zeros((rows, 16), "float32"))
        lib["mm"](tvm.runtime.tensor(xa), tvm.runtime.tensor(wa), out)
        outs.append(out.numpy())
    np.testing.assert_array_equal(outs[0], outs[1])
    with np.errstate(invalid="ignore"):
        np.testing.assert_allclose(outs[1], xa @ wa, rtol=1e-5, atol=1e-5)


def test_row_groups_kernels_are_left_alone():
    """RowGroups runs its static layer norms' row groups in parallel at any size (serial ones were slower at
    1 x 16): its dynamic kernels get no serial copy."""
    from tvm import topi

    n = tirx.Var("n", "int64")
    x = te.placeholder((1, n, 40), name="x")
    g, b = te.placeholder((40,), name="g"), te.placeholder((40,), name="b")
    mod = _scheduled({"ln": te.create_prim_func([x, g, b, topi.nn.layer_norm(x, g, b, axis=[-1], epsilon=1e-5)])})
    assert SERIAL_BELOW_ATTR not in (mod["ln"].attrs or {})
    assert tvm_ffi.structural_equal(serial_when_small()(mod)["ln"], mod["ln"])


@pytest.mark.parametrize("rows", [0, 1, 63, 64, 65, 300])
def test_both_copies_compute_the_same_bits(rows):
    """Rows on both sides of the threshold (64 x 256 = PARALLEL_MIN) give the unguarded kernel's results bit
    for bit (the same loops in the same order, on one thread or two) and numpy's within float rounding."""
    mod = _scheduled({"dyn": _gelu_like(256)})
    target = tvm.target.Target(TARGET)
    plain, guarded = tvm.compile(mod, target=target), tvm.compile(serial_when_small()(mod), target=target)
    rng = np.random.default_rng(rows)
    xa = rng.standard_normal((rows, 256)).astype("float32")
    if rows:
        xa[:, :3] = [np.nan, np.inf, -np.inf]              # special values take the same path in both
    ba = rng.standard_normal(256).astype("float32")
    outs = []
    for lib in (plain, guarded):
        out = tvm.runtime.tensor(np.full((rows, 256), 7.0, "float32"))
        lib["dyn"](tvm.runtime.tensor(xa), tvm.runtime.tensor(ba), out)
        outs.append(out.numpy())
    np.testing.assert_array_equal(outs[0], outs[1])
    with np.errstate(over="ignore", invalid="ignore"):
        ref = xa / (1 + np.exp(-xa)) + ba
    np.testing.assert_allclose(outs[1], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 3, 5), (64, 40, 9)])
def test_a_hand_written_kernel_without_blocks_gets_its_serial_copy(shape):
    """The int8 attention's operand padding (TVMScript, no SBlocks, parallel over batch x heads): the serial
    copy goes beside the loop nest with loop variables of its own; small and large calls give the same bytes."""
    from graphopt.backends.tvm.parallel_guard import guard_function
    from graphopt.backends.tvm.quant_lower import pad_lhs_kernel

    func = pad_lhs_kernel("uint8")
    guarded = guard_function(func)
    assert guarded is not None and "if bt * m * k4 < T.int64(16384):" in guarded.script(), guarded.script()
    target = tvm.target.Target(TARGET)
    libs = [tvm.compile(tvm.IRModule({"main": f}), target=target) for f in (func, guarded)]
    bt, m, k = shape
    a = np.random.default_rng(k).integers(0, 255, shape, dtype=np.uint8)
    outs = []
    for lib in libs:
        out = tvm.runtime.tensor(np.zeros((bt, m, (k + 3) // 4 * 4), np.uint8))
        lib["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(np.array([7], np.int32)), out)
        outs.append(out.numpy())
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[1][..., :k], a)
    assert (outs[1][..., k:] == 7).all()


def test_the_serial_copy_defines_its_own_variables():
    """Every variable the copied nest defines (loops, block iterators, the Let of numerics' NaN-exact clamps)
    is new in the copy: TVM's well-formedness check passes (view_args, for one, skips kernels that fail it)."""
    import tvm_ffi as ffi

    from graphopt.backends.tvm.numerics import nan_propagating_minmax

    n = tirx.Var("n", "int64")
    x = te.placeholder((n, tirx.IntImm("int64", 256)), name="x")
    y = te.compute(x.shape, lambda i, j: te.max(x[i, j], tirx.const(0.0, "float32")), name="relu")
    mod = nan_propagating_minmax()(_scheduled({"relu": te.create_prim_func([x, y])}))
    assert "clamped" in mod["relu"].script()                        # the clamp's Let
    guarded = serial_when_small()(mod)["relu"]
    assert "if n * T.int64(256) < T.int64(16384):" in guarded.script()
    verify = ffi.get_global_func("s_tir.analysis.VerifyWellFormed")
    assert verify(mod["relu"], False) and verify(guarded, False)
