"""The x86 int8 kernel paths (vnni, avx512bw, avx2, and the generic 'cpu' kernels): each built for its LLVM
CPU on any host, its assembly checked for the path's instructions, and run here (an AVX-512 + VNNI machine runs
all of them; on an older one the tests that run code skip the paths it cannot run) and compared with the QDQ
graph run in PyTorch.

Output scales are 1 and biases 0, so the float epilogue is exact and every comparison is bit for bit: any
difference would be integer arithmetic (e.g. a saturated vpmaddubsw pair sum).
"""
from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
from torch import nn

import graphopt
from graphopt.backends.targets import resolve_target
from graphopt.quant import ops
from graphopt.quant.modules import QuantConv2d, QuantLinear
from graphopt.quant.qparams import QParams

tvm = pytest.importorskip("tvm")

from graphopt.backends.tvm import build_module, lower_graph  # noqa: E402
from graphopt.backends.tvm.quant_lower import int8_path, weight_qmax_for  # noqa: E402
from graphopt.backends.tvm.runtime import CompiledModule  # noqa: E402
from tests.helpers import instructions_missing_here, same_paths_as_host  # noqa: E402

HOST = resolve_target("x86")
X86_PATHS = {"x86:haswell": "avx2", "x86:skylake-avx512": "avx512bw", "x86:cascadelake": "vnni",
             "x86": int8_path(HOST), "x86:nehalem": "cpu"}       # no AVX2: the generic widening kernels
# The targets the path tests build: a named one that compiles the same code paths as "x86" here (x86:haswell on an
# AVX2 host, x86:cascadelake on a VNNI one) is left out, since the "x86" case runs that code. Every case is built
# and its assembly checked on any host; the tests that run the code skip what this CPU cannot run.
X86_CASES = [t for t in X86_PATHS if t == "x86" or not same_paths_as_host(t)]
QP = QParams(0.0625, 128, "uint8")             # 1/scale = 16 exactly
QP0 = QParams(0.0625, 0, "uint8")              # zero point 0: large inputs quantize to 255


def _skip_unless_runs_here(target: str) -> None:
    """Skip when this machine lacks instructions that code built for `target` may use (e.g. skylake-avx512 code
    on an AVX2-only CPU: it would die of SIGILL). Building such code, and reading its assembly, works anywhere."""
    missing = instructions_missing_here(target)
    if missing:
        pytest.skip(f"this CPU ({HOST.alias}) has no {', '.join(missing)}: cannot run code built for {target}")


def _exact(mod):
    """Scale 1, bias 0: the epilogue float32(acc - zp·ΣW) is exact, so outputs compare bit for bit."""
    mod.out_scale.fill_(1.0)
    if getattr(mod, "bias", None) is not None:
        mod.bias = None
    return mod


def _conv(ci, co, k, qmax, **kw):
    return _exact(QuantConv2d(nn.Conv2d(ci, co, k, bias=False, **kw), QP, weight_qmax=qmax))


class Layers(nn.Module):
    """Linear (K % 4 != 0, N not a whole vector), convs (strided + padded, dilated, C % 4 != 0), a batched
    matmul of two activations, and the worst case for vpmaddubsw: every activation 255 against weights at the
    range's extremes (all +qmax, all -qmax)."""

    def __init__(self, qmax: int):
        super().__init__()
        torch.manual_seed(0)
        self.lin = _exact(QuantLinear(torch.randn(21, 37), None, QP, weight_qmax=qmax))
        self.c1 = _conv(6, 18, 3, qmax, stride=2, padding=1)
        self.c2 = _conv(5, 20, 3, qmax, padding=2, dilation=2)
        extremes = torch.ones(24, 64)
        extremes[12:] = -1                                          # rows of +qmax, then rows of -qmax
        self.worst = _exact(QuantLinear(extremes, None, QP0, weight_qmax=qmax))
        self.worst_conv = _exact(QuantConv2d(nn.Conv2d(8, 16, 3, bias=False), QP0, weight_qmax=qmax))
        with torch.no_grad():
            self.worst_conv.weight_q.copy_(torch.where(torch.arange(16).reshape(16, 1, 1, 1) < 8, qmax, -qmax)
                                           .expand(16, 8, 3, 3).to(torch.int8))
        self.bmm_scale = 1.0

    def forward(self, x, img, img2, a, b, big, big_img):
        q = lambda t, qp: ops.quantize(t, qp.scale, qp.zero_point, qp.qmin, qp.qmax)   # noqa: E731
        bq = ops.quantize(b, 0.0625, 0, -127, 127)                  # right operand: full symmetric int8
        return (self.lin(q(x, QP)), self.c1(q(img, QP)), self.c2(q(img2, QP)),
                ops.qmatmul(q(a, QP), bq, QP.zero_point, self.bmm_scale),
                self.worst(q(big, QP0)), self.worst_conv(q(big_img, QP0)))


def _inputs():
    g = torch.Generator().manual_seed(1)
    r = lambda *s: (torch.randint(-80, 80, s, generator=g) + 0.5) / 16       # noqa: E731  (.5 ties)
    return (r(5, 37), r(1, 6, 9, 7), r(2, 5, 8, 11), r(2, 3, 7, 13), r(2, 3, 13, 10),
            torch.full((3, 64), 1e3), torch.full((1, 8, 5, 6), 1e3))


def _compile(module, args, spec, precision: str = "float32"):
    lowered = lower_graph(torch.fx.symbolic_trace(module), args, spec, precision=precision)
    exe = build_module(lowered.mod, spec)
    return CompiledModule(exe, spec, lowered.inputs, lowered.outputs, lowered.out_spec,
                          lowered.const_outputs), exe, lowered


def run_one_layer(layer, x):
    """(compiled output, module output) of `layer` alone on input x, built for the host ("x86")."""
    module = nn.Sequential(layer).eval()
    compiled, _, _ = _compile(module, (x,), resolve_target("x86"))
    with torch.no_grad():
        return compiled(x), module(x)


def built_layers(target: str, module, args):
    """(target, module, args, compiled, executable, lowered) of `module` built for `target` (on any x86 host; a
    test that runs it calls _skip_unless_runs_here): the module-scoped `built` fixtures of the kernel test files."""
    compiled, exe, lowered = _compile(module, args, resolve_target(target))
    return target, module, args, compiled, exe, lowered


def asm_of(exe) -> str:
    """The assembly of every LLVM module in a built executable."""
    out, stack = [], [exe.mod]
    while stack:
        m = stack.pop()
        if m.kind == "llvm":
            out.append(m.inspect_source("asm"))
        stack.extend(m.imports)
    return "\n".join(out)


@pytest.fixture(scope="module", params=X86_CASES)
def built(request):
    target = request.param
    spec = resolve_target(target)
    path = int8_path(spec)
    module = Layers(weight_qmax_for(path)).eval()
    args = _inputs()
    compiled, exe, lowered = _compile(module, args, spec)
    return target, path, module, args, compiled, exe, lowered


def test_int8_path_follows_the_llvm_features():
    expect = {"x86:haswell": "avx2", "x86:znver1": "avx2", "x86:skylake-avx512": "avx512bw",
              "x86:icelake-server": "vnni", "x86:cascadelake": "vnni", "x86:nehalem": "cpu",
              "arm:cortex-a76": "sdot", "arm:neoverse-n1": "sdot", "arm:cortex-a72": "cpu"}
    for target, path in expect.items():
        assert int8_path(resolve_target(target)) == path, target
    assert int8_path(None) == "relax" and int8_path(resolve_target("torch")) == "relax"
    assert weight_qmax_for("avx2") == weight_qmax_for("avx512bw") == 64
    assert weight_qmax_for("vnni") == weight_qmax_for("cpu") == 127


def test_every_x86_path_equals_the_qdq_graph_bit_for_bit(built):
    target, path, module, args, compiled, _, lowered = built
    _skip_unless_runs_here(target)
    assert lowered.quant.startswith(f"path={path}:")
    assert ("no AVX2" in lowered.quant) == (path == "cpu")
    for op in ("qlinear", "qconv2d", "qmatmul"):
        assert f"{op}:{path}" in lowered.quant
    assert f"qlinear:{path} (exact" not in lowered.quant and f"qconv2d:{path} (exact" not in lowered.quant
    with torch.no_grad():
        refs = module(*args)
    got = compiled(*args)
    for name, y, ref in zip(("linear", "conv s2 p1", "conv dilated", "bmm", "worst linear", "worst conv"),
                            got, refs):
        assert torch.equal(y, ref), f"{target} ({path}): {name} differs by {(y - ref).abs().max().item()}"


def test_worst_case_reaches_the_extremes(built):
    """All-255 activations against ±qmax weights: the products the kernels must not saturate are really
    there (guards the test above from passing on a tame input)."""
    target, path, module, args, compiled, _, _ = built
    _skip_unless_runs_here(target)
    qmax = weight_qmax_for(path)
    worst = compiled(*args)[4]
    assert worst[0, 0].item() == 255 * qmax * 64 and worst[0, 23].item() == -255 * qmax * 64


def test_assembly_uses_the_paths_instructions(built):
    target, path, *_, exe, _ = built
    asm = asm_of(exe)
    if path == "avx2":
        assert "vpmaddubsw\t%ymm" in asm and "vpmaddwd\t%ymm" in asm and "zmm" not in asm
    elif path == "avx512bw":
        assert "vpmaddubsw\t%zmm" in asm and "vpmaddwd\t%zmm" in asm and "vpdpbusd" not in asm
    elif path == "vnni":
        assert "vpdpbusd" in asm
    elif path == "cpu":
        assert "ymm" not in asm and "zmm" not in asm                # nehalem: SSE only


@pytest.mark.parametrize("target", ["x86:haswell"])            # avx512bw: the same code at 512 bits
def test_full_range_weights_take_the_exact_split_on_pair_paths(target):
    """A graph quantized for another target (weights up to ±127) still equals its QDQ graph on a vpmaddubsw
    path: those layers switch to the exact pair split, and the note says so."""
    _skip_unless_runs_here(target)
    spec = resolve_target(target)
    module = Layers(127).eval()
    args = _inputs()
    compiled, _, lowered = _compile(module, args, spec)
    assert f"qlinear:{int8_path(spec)} (exact pair split)" in lowered.quant and "exceed ±64" in lowered.quant
    with torch.no_grad():
        refs = module(*args)
    for y, ref in zip(compiled(*args), refs):
        assert torch.equal(y, ref)
    assert compiled(*args)[4][0, 0].item() == 255 * 127 * 64


def test_the_plain_pair_kernel_would_saturate_full_range_weights():
    """Why the range matters: the single vpmaddubsw kernel on ±127 weights and 255 activations gives a wrong
    (saturated) sum; the exact split gives the right one."""
    import numpy as np

    from graphopt.backends.tvm.quant_lower import dense_kernel, pack_dense

    _skip_unless_runs_here("x86:haswell")
    a = np.full((1, 8), 255, np.uint8)
    w = np.full((8, 8), 127, np.int8)
    target = resolve_target("x86:haswell").tvm_target()
    out = {}
    for exact in (False, True):
        lib = tvm.compile(dense_kernel(1, 2, 1, 1, 1, "avx2", exact).with_attr("global_symbol", "f"), target=target)
        y = tvm.runtime.tensor(np.zeros((1, 8), np.float32))
        lib["f"](tvm.runtime.tensor(a), tvm.runtime.tensor(pack_dense(w, "avx2")),
                 tvm.runtime.tensor(np.zeros(8, np.int32)), tvm.runtime.tensor(np.ones(8, np.float32)),
                 tvm.runtime.tensor(np.zeros(8, np.float32)), y)
        out[exact] = y.numpy()[0, 0]
    assert out[True] == 255 * 127 * 8
    assert out[False] == 4 * 32767                                  # each of the 4 pairs saturated


@pytest.mark.parametrize("target,qmax", [("x86:skylake-avx512", 64), ("x86", None)])
def test_quantize_pass_picks_the_weight_range_for_the_path(target, qmax):
    _skip_unless_runs_here(target)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, groups=16),
                          nn.ReLU(), nn.Flatten(), nn.Linear(16 * 6 * 6, 10)).eval()
    x = torch.randn(1, 3, 6, 6)
    opt = graphopt.optimize(model, target, "quantize(progress=false)", example_inputs=(x,),
                            calibration=[torch.randn(4, 3, 6, 6)])
    path = int8_path(resolve_target(target))
    qmax = qmax or weight_qmax_for(path)
    gm = opt.graph_module
    conv, dw, lin = (gm.get_submodule(p) for p in ("0", "2", "5"))
    # the grid: scale max|w| / qmax per channel (GPTQ, on 7-bit grids, keeps it; its integers need not reach qmax)
    from graphopt.quant.qparams import weight_qparams

    for q, w in ((conv, model[0].weight), (lin, model[5].weight)):
        assert torch.equal(q.w_scale, weight_qparams(w, qmax)) and q.weight_q.abs().max().item() <= qmax
    assert lin.weight_q.abs().max().item() == qmax                  # too few rows for GPTQ: nearest
    assert dw.weight_q.abs().max().item() == 127                    # depthwise: its own kernel, full range
    notes = " ".join(opt.report.records[-1].notes)
    assert f"int8 path {path}" in notes and f"[-{qmax}, {qmax}]" in notes
    assert "no fast int8 instruction" not in notes
    with torch.no_grad():
        assert torch.equal(opt(x), gm(x)) or torch.allclose(opt(x), gm(x), rtol=0, atol=1e-6)


def test_reduce_range_option_overrides_the_path():
    _skip_unless_runs_here("x86:haswell")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 8)).eval()
    x = torch.randn(2, 12)
    for text, qmax in (("quantize(reduce_range=false,progress=false)", 127),
                       ("quantize(reduce_range=true,progress=false)", 64)):
        opt = graphopt.optimize(model, "torch" if qmax == 64 else "x86:haswell", text, example_inputs=(x,),
                                calibration=[torch.randn(4, 12)])
        assert opt.graph_module.get_submodule("0").weight_q.abs().max().item() == qmax
        if qmax == 127:
            assert "exact pair split" in opt.report.backend["int8"]
            with torch.no_grad():
                assert torch.allclose(opt(x), opt.graph_module(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("target", X86_CASES)
def test_dynamic_row_count_kernel_equals_the_static_one(target):
    """The int8 GEMM built for a row count known only at run time (a dynamic batch x sequence: one kernel,
    register tile for many rows, the last row tile clamping its loads and guarding its stores) gives the
    static kernel's outputs bit for bit at row counts that are and are not whole tiles."""
    import numpy as np
    from tvm import tirx

    from graphopt.backends.tvm.quant_lower import (DYNAMIC_ROWS_HINT, _tiles, dense_kernel, lanes_of,
                                                    pack_dense)

    _skip_unless_runs_here(target)
    path = int8_path(resolve_target(target))
    L = lanes_of(path)
    K, N = 36, 3 * L - 5                           # K % 4 == 0 after padding; N not whole vectors
    kb, nb = K // 4, (N + L - 1) // L
    rng = np.random.default_rng(0)
    w = rng.integers(-weight_qmax_for(path), weight_qmax_for(path) + 1, (N, K)).astype(np.int8)
    c = np.zeros(nb * L, np.int32)
    c[:N] = rng.integers(-500, 500, N)
    s = np.zeros(nb * L, np.float32)
    s[:N] = rng.uniform(0.01, 0.1, N)
    b = np.zeros(nb * L, np.float32)
    b[:N] = rng.normal(size=N)
    tgt = resolve_target(target).tvm_target()
    mt, nt = _tiles(DYNAMIC_ROWS_HINT, nb, 1, path)
    dyn = tvm.compile(dense_kernel(tirx.Var("m", "int64"), kb, nb, mt, nt, path, n_out=N)
                      .with_attr("global_symbol", "f"), target=tgt)
    for m in (1, mt, mt + 1, 3 * mt - 1):
        a = rng.integers(0, 256 if path != "sdot" else 128, (m, K)).astype(np.uint8)
        out = {}
        for name, lib, knt in (("dynamic", dyn, nt), ("static", None, None)):
            if lib is None:
                smt, knt = _tiles(m, nb, 1, path)
                lib = tvm.compile(dense_kernel(m, kb, nb, smt, knt, path, n_out=N).with_attr("global_symbol", "f"),
                                  target=tgt)
            args = [pack_dense(w, path, knt), c, s, b]     # the weights as that kernel's tile reads them
            y = tvm.runtime.tensor(np.zeros((m, N), np.float32))
            lib["f"](tvm.runtime.tensor(a), *[tvm.runtime.tensor(v) for v in args], y)
            out[name] = y.numpy()
        ref = (a.astype(np.int64) @ w.T.astype(np.int64) - c[:N]).astype(np.float32) * s[:N] + b[:N]
        np.testing.assert_array_equal(out["dynamic"], out["static"])
        np.testing.assert_allclose(out["dynamic"], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("target", X86_CASES)
def test_dynamic_batched_matmul_kernels_are_exact(target):
    """The int8 attention matmul for sizes known only at run time: left operand padded to whole 4-byte groups
    (pad_lhs_kernel), right one packed with its zero-point term (pack_rhs_kernel), then bmm_dynamic_kernel
    with one and two column blocks per register tile (the packed columns padded to whole tiles); one build of
    each serves every size and equals the integer product exactly, ragged K and N included."""
    import numpy as np

    from graphopt.backends.tvm.quant_lower import (DYNAMIC_ROWS_HINT, _tiles, bmm_dynamic_kernel, lanes_of,
                                                    pack_rhs_kernel, pad_lhs_kernel)

    _skip_unless_runs_here(target)
    path = int8_path(resolve_target(target))
    L, tgt, T = lanes_of(path), resolve_target(target).tvm_target(), tvm.runtime.tensor
    a_dtype = "int8" if path == "sdot" else "uint8"
    mt = _tiles(DYNAMIC_ROWS_HINT, 1, 1, path)[0]
    pack, pad = (tvm.compile(f.with_attr("global_symbol", "f"), target=tgt)
                 for f in (pack_rhs_kernel(path), pad_lhs_kernel(a_dtype)))
    bmms = {nt: tvm.compile(bmm_dynamic_kernel(mt, path, 0.5, nt).with_attr("global_symbol", "f"), target=tgt)
            for nt in (1, 2)}
    rng = np.random.default_rng(0)
    zp = 7
    for (bt, m, k, n), nt in itertools.product(((3, 5, 7, 19), (2, 16, 64, 16), (1, 1, 3, 1),
                                                 (4, mt + 1, 17, 2 * L + 1), (2, 3, 8, 3 * L)), (1, 2)):
        bmm = bmms[nt]
        a = rng.integers(0, 256, (bt, m, k)).astype(a_dtype)
        b = rng.integers(-128, 128, (bt, k, n)).astype(np.int8)
        kb, nb = (k + 3) // 4, (n + L * nt - 1) // (L * nt) * nt       # whole register tiles of columns
        ap = T(np.zeros((bt, m, kb * 4), a_dtype))
        pad["f"](T(a), T(np.array([zp], np.int32)), ap)
        np.testing.assert_array_equal(ap.numpy()[..., :k], a)                    # the row copied as is
        assert (ap.numpy()[..., k:] == np.array(zp).astype(a_dtype)).all()       # the group's rest: zp
        w = T(np.zeros((bt, nb, kb, L, 4) if path != "cpu" else (bt, nb, kb, 4, L), np.int8))
        c = T(np.zeros((bt, n), np.int32))
        pack["f"](T(b), T(np.array([zp], np.int32)), w, c)
        y = T(np.zeros((bt, m, n), np.float32))
        bmm["f"](ap, w, c, y)
        acc = a.astype(np.int64) @ b.astype(np.int64) - zp * b.astype(np.int64).sum(1)[:, None, :]
        np.testing.assert_array_equal(y.numpy(), acc.astype(np.float32) * np.float32(0.5))


@pytest.mark.parametrize("k,stride,requant", [(3, 1, True), (3, 2, False), (5, 1, False), (5, 2, True)])
def test_depthwise_float_accumulation_equals_int32_bit_for_bit(k, stride, requant):
    """The depthwise int8 kernel sums its integer products in float32 (FMAs; quant_lower.FLOAT_DEPTHWISE):
    exact while every partial sum stays below 2^24, so it stores what the int32 kernel stores, bit for bit, with a
    float32 output and with a ReLU6 + requantize epilogue, at calibrated (non-power-of-two) scales, on random codes
    and on the worst case (every input 255, every weight -128 or 127)."""
    import numpy as np

    from graphopt.backends.tvm import quant_lower
    from graphopt.backends.tvm.quant_epilogue import FLOAT, Epilogue

    _skip_unless_runs_here("x86")
    rng = np.random.default_rng(k * 10 + stride)
    n, h, w, cb = 2, 9 + k, 11 + k, 2
    oh, ow = (h - k) // stride + 1, (w - k) // stride + 1
    epi = Epilogue("uint8", acts=((0.0, 6.0),), inv_scale=float(np.float32(1 / 0.0371)), zp=3) if requant else FLOAT
    x = rng.integers(0, 256, (n, h, w, cb * 16), dtype=np.uint8)
    x[0] = 255
    wt = rng.integers(-128, 128, (k, k, cb * 16), dtype=np.int8)
    wt[..., :8] = np.where(rng.random((k, k, 8)) < 0.5, -128, 127)
    c = rng.integers(-(1 << 20), 1 << 20, cb * 16, dtype=np.int32)
    s = rng.uniform(1e-4, 1e-2, cb * 16).astype(np.float32)
    b = rng.normal(size=cb * 16).astype(np.float32)
    target = resolve_target("x86").tvm_target()
    out = {}
    saved = quant_lower.FLOAT_DEPTHWISE
    try:
        for fa in (True, False):
            quant_lower.FLOAT_DEPTHWISE = fa
            func = quant_lower.depthwise_kernel(n, h, w, cb, oh, ow, k, k, (stride, stride), (1, 1), 4, epi)
            lib = tvm.compile(func.with_attr("global_symbol", "f"), target=target)
            y = tvm.runtime.tensor(np.zeros((n, oh, ow, cb * 16), epi.dtype))
            lib["f"](*(tvm.runtime.tensor(a) for a in (x, wt, c, s, b)), y)
            out[fa] = y.numpy()
    finally:
        quant_lower.FLOAT_DEPTHWISE = saved
    assert out[True].tobytes() == out[False].tobytes()
    acc = sum(x[:, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride].astype(np.int64)
              * wt[i, j].astype(np.int64) for i in range(k) for j in range(k))
    if not requant:                                           # and the values are the integer sums' (float64)
        ref = (acc - c).astype(np.float32) * s + b
        np.testing.assert_allclose(out[True], ref, rtol=1e-6, atol=1e-6)


class _ConvChain(nn.Module):
    """quantize -> int8 conv -> clamp(0, 6) -> quantize -> int8 1x1 conv, every float step exact (power-of-two
    scales), so the compiled chain (fused requantize epilogue, merged clamps) equals PyTorch bit for bit."""

    def __init__(self, conv: nn.Conv2d, qmax: int, depthwise: bool):
        super().__init__()
        self.c1 = _exact(QuantConv2d(conv, QP, weight_qmax=127 if depthwise else qmax))
        self.c1.out_scale.fill_(1 / 64)
        self.c2 = _exact(QuantConv2d(nn.Conv2d(conv.out_channels, 5, 1, bias=False), QB8, weight_qmax=qmax))

    def forward(self, x):
        q = lambda t, qp: ops.quantize(t, qp.scale, qp.zero_point, qp.qmin, qp.qmax)   # noqa: E731
        return self.c2(q(torch.clamp(self.c1(q(x, QP)), 0.0, 6.0), QB8))


QB8 = QParams(0.125, 0, "uint8")


@settings(max_examples=12, deadline=None)
@given(c=st.integers(1, 20), co=st.integers(1, 24), k=st.integers(1, 3), stride=st.integers(1, 2),
       pad=st.integers(0, 2), dilation=st.integers(1, 2), depthwise=st.booleans(), h=st.integers(0, 9),
       w=st.integers(0, 9), seed=st.integers(0, 2 ** 31 - 1))
def test_int8_conv_chains_match_the_qdq_graph_on_random_geometry(c, co, k, stride, pad, dilation, depthwise, h, w,
                                                                seed):
    """Random conv geometry (channels not multiples of 4 or 16, kernel 1-3, stride, padding, dilation, depthwise
    or dense, odd sizes) through the host's int8 kernels and a fused ReLU6-like clamp + requantize into a 1x1
    conv: bit for bit the QDQ graph run in PyTorch."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    span = dilation * (k - 1) + 1
    hh, ww = max(span - 2 * pad, 1) + h, max(span - 2 * pad, 1) + w
    conv = nn.Conv2d(c, c if depthwise else co, k, stride=stride, padding=pad, dilation=dilation,
                     groups=c if depthwise else 1, bias=False)
    module = _ConvChain(conv, weight_qmax_for(int8_path(HOST)), depthwise).eval()
    x = (torch.randint(-80, 80, (1, c, hh, ww), generator=g) + 0.5) / 16          # .5 ties
    compiled, _, lowered = _compile(module, (x,), HOST)
    with torch.no_grad():
        ref = module(x)
    assert torch.equal(compiled(x), ref), (lowered.quant, (compiled(x) - ref).abs().max().item())


@settings(max_examples=12, deadline=None)
@given(lead=st.lists(st.integers(1, 7), min_size=1, max_size=2), k=st.integers(1, 100), n=st.integers(1, 50),
       seed=st.integers(0, 2 ** 31 - 1))
def test_int8_linear_matches_the_qdq_graph_on_random_shapes(lead, k, n, seed):
    """Random Linear shapes (one or two leading dims, K and N not multiples of 4 or the vector width: register
    tiles with tails) through the host's int8 kernel: bit for bit the QDQ graph (scale 1, no bias: exact)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layer = _exact(QuantLinear(torch.randn(n, k), None, QP, weight_qmax=weight_qmax_for(int8_path(HOST))))

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = layer

        def forward(self, x):
            return self.lin(ops.quantize(x, QP.scale, QP.zero_point, QP.qmin, QP.qmax))

    module = One().eval()
    x = (torch.randint(-80, 80, (*lead, k), generator=g) + 0.5) / 16
    compiled, _, lowered = _compile(module, (x,), HOST)
    with torch.no_grad():
        ref = module(x)
    assert torch.equal(compiled(x), ref), (lowered.quant, (compiled(x) - ref).abs().max().item())
