"""N:M (2:4, 4:8) sparse kernels: storage, numerics vs the dense masked layer on ragged shapes, the per-layer
decision in sparse_lower, end-to-end sparsify(pattern=N:M) builds for x86 and x86:haswell, artifacts."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import graphopt
from tests.backends.conftest import needs_aarch64_runtime, needs_cross, run_on_aarch64
from tests.helpers import X86_TARGETS, sparse_and_dense_libraries
from graphopt.backends.targets import resolve_target
from graphopt.backends.tvm import sparse_lower
from graphopt.backends.tvm.nm_kernels import (NM, detect_nm, nm_kernel, nm_plan, perm_path, reference_nm, to_nm)

PATTERNS = [(2, 4), (4, 8), (1, 4), (3, 8), (8, 16)]


def _nm_matrix(rng, n_out, k, n, m, extra_zeros: float = 0.0):
    """A random [n_out, k] weight keeping the n largest of every m (and some kept weights zeroed too)."""
    w = rng.standard_normal((n_out, k)).astype(np.float32)
    g = w.reshape(n_out, k // m, m)
    np.put_along_axis(g, np.argsort(-np.abs(g), -1)[..., n:], 0, -1)
    w[rng.random(w.shape) < extra_zeros] = 0
    return w


def _paths():
    """The kernel paths this host runs: the host's own (avx512 or avx2 vpermps on x86), avx2 when the host has
    it, and the portable TIR kernels."""
    host = perm_path(resolve_target("x86"))
    return sorted({host, "avx2" if host == "avx512" else host, "plain"})


def _target_for(path: str):
    import tvm

    return (resolve_target("x86:haswell").tvm_target() if path == "avx2" else
            resolve_target("x86").tvm_target() if path == "avx512" else tvm.target.Target({"kind": "llvm"}))


@settings(max_examples=14, deadline=None)
@given(mrows=st.integers(1, 19), n_out=st.integers(1, 41), groups=st.integers(1, 13),
       pat=st.sampled_from(PATTERNS), path=st.sampled_from(_paths()), lanes=st.sampled_from([4, 8, 16]),
       seed=st.integers(0, 2**16))
def test_nm_kernel_matches_dense(mrows, n_out, groups, pat, path, lanes, seed):
    """Ragged: K = groups·m is rarely a multiple of the window, N_out rarely of the row tile, M of the x tile."""
    _check_kernel(mrows, n_out, groups, pat, path, lanes, seed)


@pytest.mark.parametrize("path", _paths())
@pytest.mark.parametrize("mrows,pat", [(1, (2, 4)), (11, (4, 8)), (3, (8, 16))])
def test_nm_kernel_every_path(path, mrows, pat):
    """Each kernel path this host runs, at batch 1 / small M, 2:4, 4:8 and 8:16 (on AVX2 16 > the window of
    8: the portable kernel), ragged N_out = 21 and 5 groups."""
    _check_kernel(mrows, 21, 5, pat, path, 8, 7)


def _check_kernel(mrows, n_out, groups, pat, path, lanes, seed):
    import tvm

    n, m = pat
    k = groups * m
    rng = np.random.default_rng(seed)
    w = _nm_matrix(rng, n_out, k, n, m, extra_zeros=0.1)
    kind, rows, mt = nm_plan(mrows, m, lanes if path == "plain" else {"avx2": 8, "avx512": 16}[path], path)
    s = to_nm(w, n, m, rows)
    np.testing.assert_array_equal(s.to_dense(), w)
    assert s.values.shape[1] == s.groups * n and s.k_pad >= k and s.indices.dtype == np.uint8
    m_pad = -(-mrows // mt) * mt if kind == "mvec" else mrows
    lib = tvm.compile(tvm.IRModule({"main": nm_kernel(m_pad, s, mt, kind, path)}), target=_target_for(path))
    x = rng.standard_normal((mrows, k)).astype(np.float32)
    b = rng.standard_normal(n_out).astype(np.float32)
    xp = np.zeros((m_pad, s.k_pad), np.float32)
    xp[:mrows, :k] = x
    n_pad = s.values.shape[0] * rows
    bp = np.zeros(n_pad, np.float32)
    bp[:n_out] = b
    out = tvm.runtime.tensor(np.zeros((n_pad, m_pad) if kind == "mvec" else (mrows, n_pad), np.float32))
    xin = np.ascontiguousarray(xp.T) if kind == "mvec" else xp
    lib["main"](*[tvm.runtime.tensor(a) for a in (xin, s.values, s.indices, bp)], out)
    got = out.numpy().T[:mrows] if kind == "mvec" else out.numpy()
    ref = x.astype(np.float64) @ w.astype(np.float64).T + b
    np.testing.assert_allclose(got[:, :n_out], ref, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(ref).max()))
    np.testing.assert_allclose(reference_nm(x, s, b), ref, rtol=1e-12, atol=1e-9)


@settings(max_examples=30, deadline=None)
@given(n_out=st.integers(1, 30), groups=st.integers(1, 20), pat=st.sampled_from(PATTERNS),
       rows=st.sampled_from([4, 8, 16]), seed=st.integers(0, 2**16))
def test_storage_round_trip_and_size(n_out, groups, pat, rows, seed):
    n, m = pat
    rng = np.random.default_rng(seed)
    w = _nm_matrix(rng, n_out, groups * m, n, m)
    s = to_nm(w, n, m, rows)
    np.testing.assert_array_equal(s.to_dense(), w)
    assert s.positions().max() < m
    kept = s.values.size
    assert s.values.nbytes == 4 * kept and s.indices.nbytes == kept * s.bits // 8
    assert s.bits == (2 if m == 4 else 4)   # m = 8, 16


def test_detect_nm():
    rng = np.random.default_rng(0)
    w = _nm_matrix(rng, 12, 32, 2, 4)
    assert detect_nm(w != 0) == (2, 4)                       # the smallest m, though it is also 4:8
    w48 = _nm_matrix(rng, 64, 64, 4, 8)
    assert detect_nm(w48 != 0) == (4, 8)
    assert detect_nm(rng.random((64, 64)) < 0.5) is None      # unstructured
    assert detect_nm(np.ones((4, 8), bool)) is None           # dense
    assert detect_nm(_nm_matrix(rng, 4, 12, 2, 4)[:, :10] != 0) is None   # K not a multiple of any m


def test_to_nm_rejects_non_nm():
    w = np.ones((2, 8), np.float32)
    with pytest.raises(ValueError, match="more than 2 non-zeros"):
        to_nm(w, 2, 4, 8)
    with pytest.raises(ValueError, match="multiple of 4"):
        to_nm(np.zeros((2, 6), np.float32), 2, 4, 8)


class _Net(nn.Module):
    """A 1x1 stride-1 conv, a padded 3x3 conv (im2col), ragged Linear widths (K 480 and 36, N 36 and 7)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(8, 24, 1)
        self.c2 = nn.Conv2d(24, 16, 3, padding=1)
        self.fc1 = nn.Linear(16 * 5 * 6, 36)
        self.fc2 = nn.Linear(36, 7)

    def forward(self, x):
        y = self.c2(torch.relu(self.c1(x)))
        return self.fc2(torch.relu(self.fc1(y.flatten(1))))


@pytest.fixture(scope="module", params=X86_TARGETS)
def nm_build(request):
    torch.manual_seed(0)
    model, x = _Net().eval(), torch.randn(2, 8, 5, 6)
    opt = graphopt.optimize(model, target=request.param, example_inputs=(x,),
                            pipeline="sparsify(pattern=2:4,kernel=sparse)")
    return opt, x


def test_sparsified_model_matches_eager(nm_build):
    opt, x = nm_build
    torch.testing.assert_close(opt(x), opt.graph_module(x), rtol=1e-5, atol=1e-5)
    rows = {r["layer"]: r for r in opt.report.backend["sparse_layers"]}
    assert set(rows) == {"c1", "c2", "fc1", "fc2"}
    path = perm_path(resolve_target(opt.report.backend["target"]))
    for r in rows.values():
        assert r["kernel"] == "sparse" and r["block"] == "2:4" and r["density"] == 0.5
        assert r["sparse_kernel"].startswith("N:M 2:4") and "N:M 2:4" in r["why"]
        assert (f"{path} vpermps" in r["sparse_kernel"]) == (path != "plain")
    assert rows["c1"]["op"] == "conv1x1" and rows["c2"]["op"] == "conv3x3" and rows["fc1"]["M"] == 2
    assert "(4 N:M)" in opt.report.backend["sparse"]
    text = opt.report.table()
    assert "[sparse] fc1: sparse (kernel=sparse: N:M 2:4" in text


def test_stored_bytes(nm_build):
    """fc1 [36, 480] 2:4: values of 240 kept per row + 2-bit positions, rows padded to the row tile."""
    opt, _ = nm_build
    row = next(r for r in opt.report.backend["sparse_layers"] if r["layer"] == "fc1")
    rows = 16 if "avx512" in row["sparse_kernel"] else 8
    n_pad = -(-36 // rows) * rows
    assert row["stored_bytes"] == n_pad * 240 * 4 + n_pad * 240 // 4 + 36 * 4
    assert row["dense_bytes"] == 36 * 480 * 4 + 36 * 4


def test_artifact_round_trip(nm_build, tmp_path):
    opt, x = nm_build
    again = graphopt.load(opt.save(tmp_path / "nm.gopt"))
    torch.testing.assert_close(again(x), opt(x), rtol=0, atol=0)
    assert again.report.backend["sparse_layers"] == opt.report.backend["sparse_layers"]


def test_artifact_stores_compressed_weights(tmp_path):
    """A 2:4 512x512 Linear: the library holds values + packed positions (~0.53 of the dense weight)."""
    builds = sparse_and_dense_libraries("sparsify(pattern=2:4,kernel={kernel})", tmp_path)
    sizes = {kernel: size for kernel, (_, _, size) in builds.items()}
    for opt, x, _ in builds.values():
        torch.testing.assert_close(opt(x), opt.graph_module(x), rtol=1e-5, atol=1e-5)
    assert sizes["dense"] - sizes["sparse"] > 0.4 * 512 * 512 * 4


def _fake(dense_s, sparse_s, calls):
    def fake(*args, **kw):
        calls.append(args)
        return dense_s, sparse_s
    return fake


@pytest.mark.parametrize("dense_s,sparse_s,want", [(1e-3, 2e-3, "dense"), (2e-3, 1e-3, "sparse")])
def test_auto_uses_nm_only_when_measured_faster(monkeypatch, dense_s, sparse_s, want):
    nm_calls, bsr_calls = [], []
    monkeypatch.setattr(sparse_lower, "measure_nm_layer", _fake(dense_s, sparse_s, nm_calls))
    monkeypatch.setattr(sparse_lower, "measure_layer", _fake(1.0, 0.0, bsr_calls))
    sparse_lower.clear_cache()
    try:
        torch.manual_seed(0)
        model, x = nn.Sequential(nn.Linear(64, 24)).eval(), torch.randn(3, 64)
        opt = graphopt.optimize(model, target="x86", pipeline="sparsify(pattern=4:8)", example_inputs=(x,))
    finally:
        sparse_lower.clear_cache()
    row = opt.report.backend["sparse_layers"][0]
    assert len(nm_calls) == 1 and not bsr_calls and nm_calls[0][3] == (4, 8)
    assert row["kernel"] == want and "measured" in row["why"] and row["block"] == "4:8"
    assert row["dense_us"] == pytest.approx(dense_s * 1e6) and row["sparse_us"] == pytest.approx(sparse_s * 1e6)
    assert (row["stored_bytes"] < row["dense_bytes"]) == (want == "sparse")
    torch.testing.assert_close(opt(x), opt.graph_module(x), rtol=1e-5, atol=1e-5)


def test_injected_measure_hook_keeps_slower_nm_layer_dense():
    """SparseLowering.measure (the injectable hook) decides N:M layers too."""
    from graphopt.backends.tvm.lower import lower_graph
    from graphopt.capture import capture

    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8)).eval(), torch.randn(1, 32)
    opt = graphopt.optimize(model, target="torch", pipeline="sparsify(pattern=2:4)", example_inputs=(x,))
    seen = []

    def measure(m, w, bias, block, spec):
        seen.append(w.shape)
        return (1e-3, 2e-3) if w.shape[1] == 32 else (2e-3, 1e-3)   # first layer slower on N:M

    sparse_lower.clear_cache()
    orig = sparse_lower.custom_convert_map
    try:
        sparse_lower.custom_convert_map = lambda ep, spec=None, measure_=None: orig(ep, spec, measure)
        lowered = lower_graph(capture(opt.graph_module, (x,)).gm, (x,), resolve_target("x86"))
    finally:
        sparse_lower.custom_convert_map = orig
    rows = {r["K"]: r for r in lowered.sparse_layers}
    assert sorted(seen) == [(8, 16), (16, 32)]
    assert rows[32]["kernel"] == "dense" and rows[16]["kernel"] == "sparse" and rows[16]["block"] == "2:4"


def test_measure_nm_layer_runs():
    """The real measurement builds and times dense and N:M (no assertion on which is faster)."""
    rng = np.random.default_rng(0)
    w = _nm_matrix(rng, 24, 40, 2, 4)
    d, s = sparse_lower.measure_nm_layer(2, w, np.zeros(24, np.float32), (2, 4), resolve_target("x86"), rounds=1)
    assert d > 0 and s > 0


def test_nm_storage_type():
    s = to_nm(_nm_matrix(np.random.default_rng(1), 5, 16, 2, 4), 2, 4, 8)
    assert isinstance(s, NM) and s.shape == (5, 16) and s.stored_bytes == s.values.nbytes + s.indices.nbytes


@needs_cross
@needs_aarch64_runtime
def test_nm_kernels_run_on_aarch64(aarch64_server):
    """The portable N:M kernels cross-built for aarch64 (NEON, 4 float lanes) and run under qemu: the
    vectorized-over-rows kernel (conv, M=32) and the gather kernel (Linear, M=2), 2:4 and 4:8."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 20), nn.ReLU(),
                          nn.Linear(20, 6)).eval()
    x = torch.randn(2, 8, 4, 4)
    for pattern in ("2:4", "4:8"):
        opt = graphopt.optimize(model, target="arm:cortex-a72", example_inputs=(x,),
                                pipeline=f"sparsify(pattern={pattern},kernel=sparse)")
        rows = opt.report.backend["sparse_layers"]
        want = 3 if pattern == "2:4" else 2                  # Linear(20, 6): 20 is not a multiple of 8
        assert sum(r["kernel"] == "sparse" and r["block"] == pattern for r in rows) == want
        assert all("vpermps" not in r.get("sparse_kernel", "") for r in rows)
        torch.testing.assert_close(run_on_aarch64(opt, aarch64_server, x), opt.graph_module(x), rtol=1e-5, atol=1e-5)
