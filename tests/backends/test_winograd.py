"""Winograd 3x3 convolutions (precision="winograd", backends/tvm/winograd.py): each kernel against float64
PyTorch, non-finite inputs exactly as PyTorch propagates them, the Relax rewrite's choices, and whole models
(x86 here; aarch64 under qemu in test_arm.py)."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import graphopt
from graphopt.backends.tvm import winograd as W
from graphopt.backends.targets import resolve_target
from graphopt.errors import GraphoptError
from tests.helpers import is_avx512_target

tvm = pytest.importorskip("tvm")

# every x86 path this machine runs: AVX2 code everywhere, the host's own where it has AVX-512 (16 lanes)
_HOST = resolve_target("x86")
_HOST_AVX512 = is_avx512_target("x86")
PATHS = [("haswell", 8)] + ([(_HOST.tvm["mcpu"], 16)] if _HOST_AVX512 else [])
TARGETS = ["x86:haswell"] + (["x86"] if _HOST_AVX512 else [])


def _build(func, mcpu):
    from graphopt.backends.tvm.numerics import nan_propagating_minmax

    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    return tvm.compile(nan_propagating_minmax()(mod), target=tvm.target.Target({"kind": "llvm", "mcpu": mcpu}))


def _winograd_conv(x, w, b, r, m, relu, mcpu, lanes):
    """The three stages as the compiled model runs them (the GEMM in float32 numpy): NHWC in, NHWC out."""
    n, h, wd, c = x.shape
    k = w.shape[3]
    a2, p = (m + 2) ** 2, n * (-(-h // m)) * (-(-wd // m))
    fin = _build(W.input_transform_kernel(n, h, wd, c, m, lanes), mcpu)
    fout = _build(W.output_transform_kernel(n, h, wd, c, k, m, lanes, r is not None, relu), mcpu)
    v = tvm.runtime.tensor(np.zeros((a2, p, c), np.float32))
    flags = tvm.runtime.tensor(np.zeros(p, np.float32))
    u = W.weight_transform(w, m)
    lim = np.array([W.overflow_limit(u, m)], np.float32)
    fin["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(lim), v, flags)
    mm = np.matmul(v.numpy(), u).astype(np.float32)
    y = tvm.runtime.tensor(np.zeros((n, h, wd, k), np.float32))
    args = [mm, flags, x, w, b] + ([r] if r is not None else [])
    fout["main"](*[a if isinstance(a, tvm.runtime.Tensor) else tvm.runtime.tensor(a) for a in args], y)
    return y.numpy(), flags.numpy()


def _reference(x, w, b, r, relu):
    """float64 PyTorch: conv2d(padding=1) + bias (+ residual) (ReLU), NHWC."""
    xt = torch.tensor(x, dtype=torch.float64).permute(0, 3, 1, 2)
    wt = torch.tensor(w, dtype=torch.float64).permute(3, 2, 0, 1)
    y = torch.nn.functional.conv2d(xt, wt, torch.tensor(b, dtype=torch.float64), padding=1).permute(0, 2, 3, 1)
    if r is not None:
        y = y + torch.tensor(r, dtype=torch.float64)
    return (torch.relu(y) if relu else y).numpy()


def _data(n, h, wd, c, k, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, h, wd, c)).astype(np.float32)
    w = (rng.standard_normal((3, 3, c, k)) / np.sqrt(9 * c)).astype(np.float32)
    b = rng.standard_normal(k).astype(np.float32)
    r = rng.standard_normal((n, h, wd, k)).astype(np.float32)
    return x, w, b, r


@pytest.mark.parametrize("mcpu,lanes", PATHS)
@pytest.mark.parametrize("shape,m,residual,relu", [((1, 8, 8, 16, 16), 4, False, False),
                                                   ((1, 16, 12, 32, 16), 4, True, True),
                                                   ((2, 6, 10, 16, 32), 2, False, True),
                                                   ((1, 14, 14, 32, 48), 2, True, False),
                                                   # partial last tiles (sizes that m does not divide)
                                                   ((2, 7, 7, 16, 16), 4, True, True),
                                                   ((1, 9, 6, 16, 16), 4, False, False),
                                                   ((1, 7, 5, 16, 32), 2, True, False)])
def test_kernels_match_a_float64_convolution(mcpu, lanes, shape, m, residual, relu):
    n, h, wd, c, k = shape
    x, w, b, r = _data(n, h, wd, c, k)
    y, flags = _winograd_conv(x, w, b, r if residual else None, m, relu, mcpu, lanes)
    ref = _reference(x, w, b, r if residual else None, relu)
    assert not flags.any()
    # the contract: within 1e-4 of the largest output (measured ~4e-6 for m=4, ~3e-7 for m=2)
    assert np.abs(y - ref).max() <= 1e-4 * np.abs(ref).max()


@pytest.mark.parametrize("mcpu,lanes", PATHS)
@pytest.mark.parametrize("m", [4, 2])
def test_non_finite_inputs_propagate_exactly_as_in_pytorch(mcpu, lanes, m):
    """An inf or NaN spreads over its whole tile in the transforms (inf - inf = NaN; a NaN where the direct sum
    is inf; finite neighbours poisoned): flagged tiles are computed directly, so every output is NaN, +-inf or
    finite exactly where PyTorch's is, and the finite ones stay within the contract."""
    n, h, wd, c, k = 2, 8, 7, 16, 16            # a partial last tile column too
    x, w, b, r = _data(n, h, wd, c, k, seed=1)
    x[0, 5, 6, 3] = np.inf
    x[0, 0, 0, 1] = -np.inf
    x[1, 2, 6, 0] = np.nan
    x[1, 7, 1, 2] = 3e38                      # finite, but the transforms would overflow: computed directly too
    for relu in (False, True):
        y, flags = _winograd_conv(x, w, b, r, m, relu, mcpu, lanes)
        ref = _reference(x, w, b, r, relu)
        assert flags.sum() >= 4
        np.testing.assert_array_equal(np.isnan(y), np.isnan(ref))
        np.testing.assert_array_equal(np.isposinf(y), np.isposinf(ref))
        np.testing.assert_array_equal(np.isneginf(y), np.isneginf(ref))
        fin = np.isfinite(ref)
        assert np.abs(y[fin] - ref[fin]).max() <= 1e-4 * np.abs(ref[fin]).max()


@settings(max_examples=6, deadline=None)     # ~0.8 s per example (two kernel builds); fixed shapes above
@given(h=st.integers(1, 13), wd=st.integers(1, 13), cb=st.integers(1, 3), kb=st.integers(1, 3),
       m=st.sampled_from([2, 4]), relu=st.booleans(), residual=st.booleans(), seed=st.integers(0, 99))
def test_random_shapes(h, wd, cb, kb, m, relu, residual, seed):
    n, c, k = 1, cb * 8, kb * 8
    x, w, b, r = _data(n, h, wd, c, k, seed)
    y, _ = _winograd_conv(x, w, b, r if residual else None, m, relu, "haswell", 8)
    ref = _reference(x, w, b, r if residual else None, relu)
    assert np.abs(y - ref).max() <= 1e-4 * max(np.abs(ref).max(), 1e-6)


@pytest.mark.parametrize("m", [4, 2])
@pytest.mark.parametrize("mcpu,lanes", [("haswell", 8), ("skylake-avx512", 16)])
def test_transform_rows_are_stack_buffers_not_heap_workspaces(mcpu, lanes, m):
    """The window, Bᵀ d and Aᵀ M rows the transforms keep (each under 1 KiB at 16 lanes) reach LLVM as
    allocas, not TVMBackendAllocWorkspace calls (a heap allocation per tile); nor do the direct fallback's
    tile indices (let-bound, each was a 4-byte workspace allocated and freed for every tile); built only, on
    both widths."""
    import re

    for func in (W.input_transform_kernel(1, 9, 7, 2 * lanes, m, lanes),
                 W.output_transform_kernel(1, 9, 7, 2 * lanes, lanes, m, lanes, True, True)):
        src = _build(func, mcpu).mod.inspect_source("ll")
        assert not re.findall(r"@__TVMBackendAllocWorkspace", src), (mcpu, m)
        assert "= alloca" in src


def test_weight_transform_is_g_w_gt():
    """U = G w Gᵀ per (c, k): F(2x2, 3x3) on a 1x3 filter gives (g0, (g0+g1+g2)/2, (g0-g1+g2)/2, g2) per row."""
    w = np.zeros((3, 3, 1, 1), np.float32)
    w[:, :, 0, 0] = [[1, 2, 3], [0, 0, 0], [0, 0, 0]]
    u = W.weight_transform(w, 2).reshape(4, 4)
    np.testing.assert_allclose(u[0], [1, 3, 1, 3], rtol=1e-6)
    assert np.all(u[3] == 0)


def test_tile_size_choice():
    assert W.MIN_TILES == 16
    assert W.tile_size(56, 56) == 4 and W.tile_size(28, 28) == 4
    assert W.tile_size(14, 14) == 4                   # 16 tiles; the padded 16x16 still costs less than 2x2's
    assert W.tile_size(7, 7) == 2                     # 4x4 tiles: only 4, too few for the GEMM to pay
    assert W.tile_size(7, 7, batch=4) == 4 and W.tile_size(8, 8, batch=4) == 4
    assert W.tile_size(6, 6) is None and W.tile_size(8, 8) == 2
    assert W.tile_size(1, 1, batch=64) is None        # 15 of 16 outputs padding: dearer than direct


class _Block(torch.nn.Module):
    """A ResNet basic block at 16x16 (Winograd, with residual + ReLU epilogues), a stride-2 conv (direct) and a
    conv on a 7x7 map (Winograd with partial tiles), behind a 3-channel stem (direct)."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.c1 = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(16)
        self.c2 = torch.nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.down = torch.nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.c3 = torch.nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x):
        y = torch.relu(self.stem(x))
        z = torch.relu(self.bn1(self.c1(y)))
        z = torch.relu(self.c2(z) + y)
        z = torch.nn.functional.avg_pool2d(self.down(z), 1)[:, :, :7, :7]
        return self.c3(z)


@pytest.mark.parametrize("target", TARGETS)
def test_model_compiles_with_winograd_and_matches_eager(target, tmp_path):
    torch.manual_seed(0)
    model = _Block().eval()
    for bn in model.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 16, 16)
    opt = graphopt.optimize(model, target, "fold_bn,cleanup", example_inputs=(x,), precision="winograd")
    note = opt.report.backend["precision"]
    # c1 (its batch norm folded in, then ReLU), c2 (+ residual, ReLU) and c3 on the 7x7 map (partial 2x2
    # tiles: 2 x 16 tiles); the stem (3 input channels: not a whole SIMD vector) and the stride-2 conv stay
    # direct
    assert "3 3x3 convolution(s)" in note and "2x 16x16x16->16 F(4x4,3x3)" in note, note
    assert "7x7x16->16 F(2x2,3x3)" in note, note
    with torch.no_grad():
        ref = model(x)
        for inp in (x, torch.randn(2, 3, 16, 16) * 10):
            ref = model(inp)
            assert (opt(inp) - ref).abs().max() <= 1e-4 * ref.abs().max()
        bad = x.clone()
        bad[0, 1, 4, 4] = float("nan")
        bad[1, 0, 9, 3] = float("inf")
        out, ref = opt(bad), model(bad)
        assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
        loaded = graphopt.load(opt.save(str(tmp_path / "winograd.gopt")))      # an artifact like any other
        assert torch.equal(loaded(x), opt(x))


def test_winograd_is_refused_off_cpu_targets():
    model = torch.nn.Conv2d(8, 8, 3, padding=1).eval()
    x = torch.randn(1, 8, 16, 16)
    for target in ("torch", "cuda:sm_80"):
        with pytest.raises(GraphoptError, match="winograd"):
            graphopt.optimize(model, target, "cleanup", example_inputs=(x,), precision="winograd")
