"""int4 weight-only GEMVs with bfloat16 input parts (precision="high", backends/tvm/woq4_bf16.py).

The contract: each input x is taken as hi + lo (hi its bfloat16 truncation, lo the bfloat16 nearest to x - hi),
weights exactly, products exact and summed in float32. So the kernel is checked against the float64 matmul of
hi + lo with the dequantized weights (float32 rounding only), and against the true inputs within 2^-16 of
Σ|x|·|w| more. AVX512-BF16 code is built and its assembly read on every x86 host; it runs where the CPU has
AVX512-BF16 (Zen 4, Sapphire Rapids and later), and is skipped elsewhere.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import graphopt
from graphopt.quant.weight_only import PackedWeightOnlyLinear

tvm = pytest.importorskip("tvm")

from graphopt.backends.targets import resolve_target  # noqa: E402
from graphopt.backends.tvm import woq4_bf16  # noqa: E402
from graphopt.backends.tvm.one_task_loops import register  # noqa: E402
from tests.quant.test_int8_paths import _compile, _skip_unless_runs_here, asm_of  # noqa: E402

BF16_TARGET = "x86:znver4"          # AVX-512 with AVX512-BF16 (LLVM's Zen 4)
EPS = float(np.finfo(np.float32).eps)


def _unpack_words(words: np.ndarray, n: int, k: int) -> np.ndarray:
    """Inverse of pack_bf16_words: q [n, k] from words [NB, KW, 16]."""
    w = words.view(np.uint32).transpose(0, 2, 1)                     # [NB, 16, KW]
    q = np.zeros(w.shape + (4, 2), np.uint32)
    for s in range(4):
        for h in range(2):
            q[..., s, h] = (w >> np.uint32(16 * h + 4 * s)) & np.uint32(15)
    return q.reshape(w.shape[0] * 16, -1)[:n, :k]


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 40), k=st.integers(1, 70), seed=st.integers(0, 2 ** 31 - 1))
def test_words_round_trip(n, k, seed):
    q = np.random.default_rng(seed).integers(0, 16, (n, k))
    nbp = (n + 15) // 16
    words = woq4_bf16.pack_bf16_words(q, nbp, (k + 7) // 8)
    assert words.shape == (nbp, (k + 7) // 8, 16) and words.dtype == np.int32
    assert np.array_equal(_unpack_words(words, n, k), q)


def _parts(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The contract's (hi, lo) of float32 x, in numpy: hi truncated (a NaN: NaN), lo = x - hi rounded to the
    nearest bfloat16 (ties to even; 0 where hi is not finite)."""
    bits = x.view(np.uint32)
    hb = np.where(np.isnan(x), np.uint32(0x7FC00000), bits & np.uint32(0xFFFF0000))
    hi = hb.view(np.float32)
    with np.errstate(invalid="ignore"):
        r = np.where(np.isfinite(hi), x - hi, np.float32(0)).astype(np.float32)
    rb = r.view(np.uint32).astype(np.uint64)
    lb = ((rb + 0x7FFF + ((rb >> 16) & 1)) & 0xFFFF0000).astype(np.uint32)
    return hi, lb.view(np.float32)


def _split(x: np.ndarray, groups: int):
    f = woq4_bf16.split_kernel(x.shape[0], x.shape[1], groups)
    lib = tvm.compile(tvm.IRModule({"main": f}), target=resolve_target("x86").tvm_target(), tir_pipeline=register())
    outs = [tvm.runtime.tensor(np.zeros(x.shape, np.uint16)), tvm.runtime.tensor(np.zeros(x.shape, np.uint16)),
            tvm.runtime.tensor(np.zeros((x.shape[0], groups), np.float32))]
    lib(tvm.runtime.tensor(x), tvm.runtime.tensor(np.array([0xFFFF0000], np.uint32)), *outs)
    xh, xl, xs = (o.numpy() for o in outs)
    return ((xh.astype(np.uint32) << 16).view(np.float32), (xl.astype(np.uint32) << 16).view(np.float32), xs)


def test_split_takes_each_input_as_two_bfloat16_within_2_pow_minus_16():
    """The split kernel (plain x86 code: runs on every host) against the contract, special values included."""
    rng = np.random.default_rng(0)
    special = [0.0, -0.0, 1.0, -1.5, np.inf, -np.inf, np.nan, 3.4028235e38, -3.4028235e38, 1e-30, 2.0 ** -110,
               1.0 + 2.0 ** -8, 1.0 + 2.0 ** -9, 1.0 + 3 * 2.0 ** -9, 65504.0, 1e-45, -1e-40, 7.0e-39]
    x = np.concatenate([np.array(special, np.float32), (rng.standard_normal(46) * 10.0 ** rng.integers(
        -20, 20, 46)).astype(np.float32)]).reshape(2, 32)
    hi, lo, xs = _split(x, 2)
    want_hi, want_lo = _parts(x)
    assert np.array_equal(hi.view(np.uint32), want_hi.view(np.uint32))
    assert np.array_equal(lo.view(np.uint32), want_lo.view(np.uint32))
    finite = np.isfinite(x)
    assert np.isnan(hi[np.isnan(x)]).all() and (hi[np.isinf(x)] == x[np.isinf(x)]).all()
    assert (lo[~finite] == 0).all()
    normal = finite & (np.abs(x) >= 2.0 ** -110)
    err = np.abs(x[normal].astype(np.float64) - hi[normal] - lo[normal])
    assert (err <= 2.0 ** -16 * np.abs(x[normal])).all()
    assert (hi.view(np.uint32) & 0xFFFF == 0).all() and (lo.view(np.uint32) & 0xFFFF == 0).all()
    # group sums of hi + lo (the kernel's zero-point term); the first row holds inf, -inf and NaN
    assert np.isnan(xs[0, 0])
    sums = (hi[1].astype(np.float64) + lo[1]).reshape(2, 16).sum(1)
    assert np.allclose(xs[1], sums, rtol=1e-6, atol=0)


# (rows, in, out, group): 1-2 rows in groups of 16k inputs or one group per channel (odd K: padded to 16k with
# zero inputs) take the kernel; a group of 8, 3 rows (the float32 GEMV) and 6 rows (the panel) do not
SHAPES = [(1, 256, 40, 128), (2, 96, 33, 32), (1, 37, 21, None), (2, 160, 17, 16), (1, 64, 8, 8), (3, 64, 20, 32),
          (6, 64, 20, 32)]
BF16_LAYERS = 4


class Layers(nn.Module):
    def __init__(self, offset: float = 0.0, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.layers = nn.ModuleList(PackedWeightOnlyLinear(torch.randn(n, k, generator=g) + offset,
                                                           torch.randn(n, generator=g), 4, group)
                                    for _, k, n, group in SHAPES)

    def forward(self, x0, x1, x2, x3, x4, x5, x6):
        return tuple(layer(x) for layer, x in zip(self.layers, (x0, x1, x2, x3, x4, x5, x6)))


def _inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(m, k, generator=g) for m, k, *_ in SHAPES)


def _build(target: str, module, args):
    """(compiled, executable, lowered) of `module` built for `target` with precision="high"."""
    return _compile(module, args, resolve_target(target), precision="high")


@pytest.fixture(scope="module")
def built():
    module = Layers().eval()
    args = _inputs()
    return (module, args) + _build(BF16_TARGET, module, args)


def _bounds(layer, x: torch.Tensor):
    """(float64 reference with x as hi + lo, float64 reference with x, float32 rounding bound, the 2^-16 term)
    per output: 8 float32 ulps of Σ|x|·(|w| + 32·s) + |b| (the kernel sums x·(1 + q/16) and scales by 16·s),
    and 2^-16·Σ|x|·|w|."""
    w = layer.dequantized_weight().double()
    group = layer.group_size or layer.in_features
    s = layer.scales.double().repeat_interleave(group, dim=1)[:, :layer.in_features]
    hi, lo = _parts(x.numpy())
    xb = torch.from_numpy(hi.astype(np.float64) + lo)
    xd, b = x.double(), layer.bias.double()
    rounding = 8 * EPS * (xd.abs() @ (w.abs() + 32 * s).t() + b.abs())
    return xb @ w.t() + b, xd @ w.t() + b, rounding, 2.0 ** -16 * (xd.abs() @ w.abs().t())


def test_int4_gemvs_take_the_bf16_kernel_where_groups_are_16k_inputs(built):
    module, args, compiled, exe, lowered = built
    counts = lowered.quant.split(":", 1)[1].split(";")[0]
    assert f"woq_linear_packed:int4 direct bf16x2×{BF16_LAYERS}" in counts
    assert "woq_linear_packed:int4 direct×2" in counts and "woq_linear_packed:int4 panel×1" in counts
    asm = asm_of(exe)
    assert "vdpbf16ps" in asm and "vpternlogd" in asm


def test_intel_avx512_bf16_targets_take_the_kernel_too():
    """x86:emeraldrapids (the Xeons with AVX-512 VNNI and BF16 our machines include): the same kernel, built."""
    layer = PackedWeightOnlyLinear(torch.randn(40, 256), torch.randn(40), 4, 128)
    _, exe, lowered = _build("x86:emeraldrapids", nn.Sequential(layer).eval(), (torch.randn(1, 256),))
    assert "int4 direct bf16x2×1" in lowered.quant and "vdpbf16ps" in asm_of(exe)


def test_bf16_kernel_matches_the_contract(built):
    module, args, compiled, exe, lowered = built
    _skip_unless_runs_here(BF16_TARGET)
    for shape, layer, x, got in zip(SHAPES, module.layers, args, compiled(*args)):
        ref_parts, ref, rounding, parts_term = _bounds(layer, x)
        got = got.double()
        assert got.shape == ref.shape
        assert ((got - ref_parts).abs() <= rounding).all(), (shape, (got - ref_parts).abs().max().item())
        assert ((got - ref).abs() <= rounding + parts_term).all(), (shape, (got - ref).abs().max().item())


def test_bf16_kernel_propagates_nan_and_inf(built):
    module, args, compiled, exe, lowered = built
    _skip_unless_runs_here(BF16_TARGET)
    bad = [x.clone() for x in args]
    bad[0][0, 5] = float("nan")
    bad[1][0, 3] = float("inf")
    bad[1][1, 7] = float("-inf")
    out = compiled(*bad)
    assert torch.isnan(out[0]).all()                      # every weight is 1 + q/16 != 0: NaN reaches all
    assert not torch.isfinite(out[1]).any()               # ±Inf or NaN, as the float32 kernels give
    for i in range(2, len(SHAPES)):
        assert torch.equal(out[i], compiled(*args)[i])


def test_precision_high_keeps_the_float32_kernels_without_avx512_bf16():
    """x86:haswell (AVX2) and x86:skylake-avx512 (AVX-512 without BF16): precision="high" builds the float32
    int4 kernels, the same code as precision="float32"."""
    module = Layers().eval()
    args = _inputs()
    for target in ("x86:haswell", "x86:skylake-avx512"):
        assert not woq4_bf16.has_avx512bf16(resolve_target(target))
        _, exe, lowered = _build(target, module, args)
        assert "bf16" not in lowered.quant and "vdpbf16ps" not in asm_of(exe)
    for target in (BF16_TARGET, "x86:sapphirerapids", "x86:emeraldrapids", "x86:cooperlake"):
        assert woq4_bf16.has_avx512bf16(resolve_target(target)), target
    for target in ("x86:icelake-server", "x86:znver3", "arm"):       # AVX-512 without BF16, AVX2, not x86
        assert not woq4_bf16.has_avx512bf16(resolve_target(target)), target


def test_optimize_with_precision_high_reports_the_kernels_and_round_trips(tmp_path):
    """graphopt.optimize(..., precision="high"): the report names the kernels and the precision; the saved
    artifact loads and gives the same outputs bit for bit."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 10)).eval()
    x = torch.randn(1, 64)
    opt = graphopt.optimize(model, BF16_TARGET, "quantize(mode=weight_only,bits=4,group_size=32)",
                            example_inputs=(x,), precision="high")
    assert "woq_linear_packed:int4 direct bf16x2×2" in opt.report.backend["int8"]
    assert opt.report.backend["precision"].startswith("high")
    _skip_unless_runs_here(BF16_TARGET)
    again = graphopt.load(opt.save(str(tmp_path / "mlp4_high.gopt")))
    assert torch.equal(again(x), opt(x))
    with torch.no_grad():
        ref = opt.graph_module(x)                   # the torch graph of the same quantized model
    assert torch.allclose(opt(x), ref, rtol=1e-4, atol=1e-4)


@settings(max_examples=6, deadline=None)
@given(rows=st.integers(1, 2), k=st.integers(1, 100), n=st.integers(1, 40),
       group=st.sampled_from([None, 16, 32, 64]), offset=st.sampled_from([0.0, 2.0]),
       seed=st.integers(0, 2 ** 31 - 1))
def test_random_layers_match_the_contract(rows, k, n, group, offset, seed):
    """Random int4 GEMVs (per channel or in groups of 16k; ragged last groups; weights centred or all positive,
    so zero points far from 8) against the contract's bounds."""
    g = torch.Generator().manual_seed(seed)
    layer = PackedWeightOnlyLinear(torch.randn(n, k, generator=g) + offset, torch.randn(n, generator=g), 4, group)
    x = torch.randn(rows, k, generator=g) * 3
    compiled, _, lowered = _build(BF16_TARGET, nn.Sequential(layer).eval(), (x,))
    assert "bf16x2×1" in lowered.quant
    _skip_unless_runs_here(BF16_TARGET)
    ref_parts, ref, rounding, parts_term = _bounds(layer, x)
    got = compiled(x).double()
    assert ((got - ref_parts).abs() <= rounding).all(), (got - ref_parts).abs().max().item()
    assert ((got - ref).abs() <= rounding + parts_term).all(), (got - ref).abs().max().item()
