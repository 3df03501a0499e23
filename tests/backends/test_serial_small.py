"""serial_small.py: dynamic kernels take a serial copy of their body when a call is small.

The copy is exact (same statements per iteration, only the thread changes): checked bit for bit against the
kernel without it on both sides of the threshold, alone and inside a whole dynamic model."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import graphopt

tvm = pytest.importorskip("tvm")

from tvm import te, tirx  # noqa: E402

from graphopt.backends.tvm import schedules, serial_small  # noqa: E402

TARGET = {"kind": "llvm", "mcpu": "haswell", "num-cores": 2}


def _add_one(n):
    a = te.placeholder((n, tirx.IntImm("int64", 512)), name="a")
    return te.create_prim_func([a, te.compute(a.shape, lambda i, j: a[i, j] + 1.0, name="b")])


def test_dynamic_kernel_runs_serially_below_the_threshold_and_in_parallel_above():
    """An injective kernel over [n, 512]: its parallel loop gets a serial twin taken while n x 512 iterations
    are under PARALLEL_MIN; both give numpy's values on either side of it (n = 31, 32, 33 around 16384)."""
    target = tvm.target.Target(TARGET)
    n = tirx.Var("n", "int64")
    sch = schedules.Injective()._apply(_add_one(n), target)
    func = serial_small.with_serial_branch(sch.mod["main"])
    assert func is not None
    text = func.script()
    assert text.count("T.parallel(") == 1 and "< T.int64(16384):" in text and "else:" in text, text
    assert serial_small.PARALLEL_MIN == 16384
    lib = tvm.compile(tvm.IRModule({"main": func}), target=target)
    for rows in (0, 1, 7, 31, 32, 33, 100):
        a = np.random.default_rng(rows).standard_normal((rows, 512)).astype("float32")
        out = tvm.runtime.tensor(np.full((rows, 512), np.nan, "float32"))
        lib["main"](tvm.runtime.tensor(a), out)
        np.testing.assert_array_equal(out.numpy(), a + np.float32(1))


def test_static_kernels_and_serial_ones_are_left_as_they_are():
    target = tvm.target.Target(TARGET)
    static = schedules.Injective()._apply(_add_one(tirx.IntImm("int64", 512)), target).mod["main"]
    assert "T.parallel(" in static.script()
    assert serial_small.with_serial_branch(static) is None              # a constant count: decided already
    small = schedules.Injective()._apply(_add_one(tirx.IntImm("int64", 2)), target).mod["main"]
    assert serial_small.with_serial_branch(small) is None               # no parallel loop
    dyn = schedules.Injective()._apply(_add_one(tirx.Var("n", "int64")), target).mod["main"]
    assert serial_small.with_serial_branch(dyn, threshold=0) is None    # switched off


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.norm, self.down = nn.Linear(64, 256), nn.LayerNorm(256), nn.Linear(256, 64)

    def forward(self, x):
        h = self.norm(torch.nn.functional.gelu(self.up(x)))
        return torch.softmax(self.down(h), dim=-1) + x


def test_dynamic_model_is_bit_identical_with_and_without_serial_copies(monkeypatch):
    """A dynamic-batch block (GEMMs, GELU, LayerNorm, softmax, residual) built with serial copies and
    without: equal bit for bit at batch sizes that take the serial copies (1, 3) and the parallel bodies (600),
    and within float32 rounding of eager."""
    torch.manual_seed(0)
    model = _Block().eval()
    kw = dict(example_inputs=(torch.randn(4, 64),), dynamic={"batch": (1, 1024)})
    with_copies = graphopt.optimize(model, "x86", "cleanup", **kw)
    monkeypatch.setattr(serial_small, "PARALLEL_MIN", 0)
    without = graphopt.optimize(model, "x86", "cleanup", **kw)
    for rows in (1, 3, 600):
        x = torch.randn(rows, 64)
        out = with_copies(x)
        assert torch.equal(out, without(x)), rows
        with torch.no_grad():
            torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-5)


def test_hand_written_plain_loop_kernels_get_the_copy_when_dynamic_only():
    """quant_lower's int8 batched matmul (plain loops, no root block): the static kernel's count is a constant
    once simplified (casts of its sizes) and is left alone; the dynamic one gets the serial copy, and equals
    the kernel without it exactly at a size under the threshold and one over it."""
    from graphopt.backends.tvm.quant_lower import bmm_dynamic_kernel, bmm_kernel

    assert serial_small.with_serial_branch(bmm_kernel(2, 16, 4, 2, 4, 2, "avx2", 0.5)) is None
    plain = bmm_dynamic_kernel(4, "avx2", 0.5, 2)
    func = serial_small.with_serial_branch(plain)
    assert func is not None and func.script().count("T.parallel(") == 1
    target = tvm.target.Target(TARGET)
    libs = [tvm.compile(f.with_attr("global_symbol", "f"), target=target) for f in (plain, func)]
    rng = np.random.default_rng(0)
    for bt, m, kb, nb in ((1, 3, 2, 2), (8, 64, 16, 8)):           # 6 row x 1 column tiles; 8 x 16 x 4
        a = rng.integers(0, 256, (bt, m, kb * 4)).astype("uint8")
        w = rng.integers(-128, 128, (bt, nb, kb, 8, 4)).astype("int8")
        c = rng.integers(-1000, 1000, (bt, nb * 8)).astype("int32")
        outs = []
        for lib in libs:
            y = tvm.runtime.tensor(np.zeros((bt, m, nb * 8), "float32"))
            lib["f"](tvm.runtime.tensor(a), tvm.runtime.tensor(w), tvm.runtime.tensor(c), y)
            outs.append(y.numpy())
        np.testing.assert_array_equal(outs[0], outs[1])
        ref = np.einsum("bmkq,bnkjq->bmnj", a.reshape(bt, m, kb, 4).astype(np.int64),
                        w.astype(np.int64)).reshape(bt, m, nb * 8) - c[:, None, :]
        np.testing.assert_array_equal(outs[0], ref.astype(np.float32) * np.float32(0.5))
