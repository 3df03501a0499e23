"""Block-sparse int8 kernels (sparsify, then quantize): exact int32 sums on the vnni and AVX2 paths, bit-for-bit
equality with the dense int8 layer end to end, the measured per-layer choice, and int8 values in the artifact."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import graphopt

tvm = pytest.importorskip("tvm")

from graphopt.backends.targets import resolve_target  # noqa: E402
from graphopt.backends.tvm import sparse_qlower  # noqa: E402
from graphopt.backends.tvm.quant_epilogue import FLOAT  # noqa: E402
from graphopt.backends.tvm.quant_lower import int8_path  # noqa: E402
from graphopt.backends.tvm.sparse_int8 import int8_kind, qbsr_kernel, reference, row_tile, to_qbsr  # noqa: E402

HOST = resolve_target("x86")
BLOCKS = [(16, 1), (1, 16), (4, 4), (1, 1), (8, 1), (2, 8), (1, 4), (4, 16)]


def _targets():
    """(target, path) pairs this machine can run: x86:haswell (avx2) always, the native path when it differs."""
    out = [("x86:haswell", "avx2")]
    native = int8_path(HOST)
    if native in ("vnni", "avx512bw"):
        out.append(("x86", native))
    return out


TARGETS = _targets()
_LIBS: dict = {}


def _sparse_int8(rng, n, k, block, density, qmax):
    r, c = block
    keep = rng.random((-(-n // r), -(-k // c))) < density
    mask = np.kron(keep, np.ones((r, c), np.int64))[:n, :k]
    return (rng.integers(-qmax, qmax + 1, (n, k)) * mask).astype(np.int8)


def _run_kernel(x: np.ndarray, wq: np.ndarray, block, target: str, path: str, exact: bool) -> np.ndarray:
    """The kernel's float32(int32 sum) for uint8 x [M, K] (scale 1, bias 0, zero-point term 0: exact)."""
    m, k = x.shape
    n = wq.shape[0]
    kind = int8_kind(block, m, path)
    q = to_qbsr(wq, block, kind)
    np.testing.assert_array_equal(q.to_dense(), wq)
    mt = row_tile(kind, block, m, path)
    rows = -(-m // mt) * mt if kind == "qmvec" else m
    lib = tvm.compile(tvm.IRModule({"main": qbsr_kernel(q, rows, mt, path, exact, FLOAT, n)}),
                      target=resolve_target(target).tvm_target())
    r, c = block
    kp = -(-(-(-k // c) * c) // 4) * 4
    xp = np.zeros((rows, kp), np.uint8)
    xp[:m, :k] = x
    if kind == "qmvec":
        xin = np.ascontiguousarray(xp.reshape(rows, kp // 4, 4).transpose(1, 0, 2) if q.packed else xp.T)
        out = np.zeros((n, rows), np.float32)
    else:
        xin, out = xp, np.zeros((m, n), np.float32)
    nb = q.indptr.shape[0] - 1
    vecs = (np.zeros(nb * r, np.int32), np.ones(nb * r, np.float32), np.zeros(nb * r, np.float32))
    y = tvm.runtime.tensor(out)
    lib["main"](*[tvm.runtime.tensor(a) for a in (xin, q.data, q.indices, q.indptr, *vecs)], y)
    return y.numpy().T[:m] if kind == "qmvec" else y.numpy()


@settings(max_examples=14, deadline=None)
@given(m=st.integers(1, 40), n=st.integers(1, 50), k=st.integers(1, 70), block=st.sampled_from(BLOCKS),
       density=st.floats(0.0, 1.0), tp=st.sampled_from(TARGETS), seed=st.integers(0, 2**16))
def test_kernels_sum_exactly(m, n, k, block, density, tp, seed):
    """Every layout (qrow, qcol, qmvec, packed or gathered), ragged N/K/M, any density: the int32 sums equal
    numpy's (|sum| < 2**24, so the float32 of the sum is exact)."""
    target, path = tp
    rng = np.random.default_rng(seed)
    wq = _sparse_int8(rng, n, k, block, density, 64)
    x = rng.integers(0, 256, (m, k)).astype(np.uint8)
    got = _run_kernel(x, wq, block, target, path, exact=False)
    np.testing.assert_array_equal(got.astype(np.int64), x.astype(np.int64) @ wq.astype(np.int64).T)


@pytest.mark.parametrize("m,block", [(1, (16, 1)), (1, (1, 16)), (20, (16, 1))])
def test_avx2_pairs_saturate_without_reduced_range_and_exact_split_fixes_it(m, block):
    """The AVX2 kernels really sum u8·s8 pairs in int16 (vpmaddubsw): 255·127·2 saturates; the exact split
    (what a layer whose weights exceed ±64 gets) is exact."""
    rng = np.random.default_rng(1)
    wq = np.full((32, 64), 127, np.int8)
    wq[rng.random(wq.shape) < 0.5] = 0
    x = np.full((m, 64), 255, np.uint8)
    want = x.astype(np.int64) @ wq.astype(np.int64).T
    np.testing.assert_array_equal(_run_kernel(x, wq, block, "x86:haswell", "avx2", exact=True), want)
    assert not np.array_equal(_run_kernel(x, wq, block, "x86:haswell", "avx2", exact=False), want)


def test_quads_round_trip():
    rng = np.random.default_rng(0)
    for block in BLOCKS:
        wq = _sparse_int8(rng, 37, 53, block, 0.3, 127)
        for kind in ("qrow", "qcol", "qmvec"):
            if kind == "qcol" and block[1] % 4:
                continue
            q = to_qbsr(wq, block, kind)
            np.testing.assert_array_equal(q.to_dense(), wq)
            x = rng.integers(0, 256, (3, 53)).astype(np.uint8)
            np.testing.assert_array_equal(reference(x, q), x.astype(np.int64) @ wq.astype(np.int64).T)


class _MLP(nn.Module):
    """Ragged widths (default: K % 4 != 0, N not a whole vector), ReLUs between (fused requantize epilogues)."""

    def __init__(self, widths=(70, 93, 45, 10)):
        super().__init__()
        w = widths
        self.a, self.b, self.c = nn.Linear(w[0], w[1]), nn.Linear(w[1], w[2]), nn.Linear(w[2], w[3])

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def _NMMLP():
    """Widths that are whole groups of 8 where N:M needs it (K % m == 0), ragged in N; the last K is 44."""
    return _MLP((72, 96, 44, 10))


def _build(target, pattern, kernel, shape, model=_MLP, sparsity=0.8):
    torch.manual_seed(0)
    x = torch.randn(*shape)
    calib = [(torch.randn(*shape),) for _ in range(3)]
    return graphopt.optimize(model().eval(), target=target, example_inputs=(x,), calibration=calib,
                             pipeline=f"sparsify(sparsity={sparsity},pattern={pattern},kernel={kernel}),"
                                      f"quantize(progress=false)"), x


LAYER_CASES = [("16x1", (1, 70)), ("1x16", (1, 70)), ("4x4", (2, 5, 70)), ("1x16", (37, 70)),
               ("unstructured", (20, 70))]
# Every pattern on the AVX2 path (any x86 host runs it); the native path (vnni / avx512bw) takes a matrix-vector
# and a many-row case in the default run, its other three under -m slow (~2 s of building each). The kernel
# layouts of both paths are all checked by test_kernels_sum_exactly.
NATIVE_DEFAULT = {("16x1", (1, 70)), ("1x16", (37, 70))}


@pytest.mark.parametrize("target,path,pattern,shape", [
    pytest.param(target, path, pattern, shape, id=f"{pattern}-{'x'.join(map(str, shape))}-{target}-{path}",
                 marks=[] if path == "avx2" or (pattern, shape) in NATIVE_DEFAULT else [pytest.mark.slow])
    for target, path in TARGETS for pattern, shape in LAYER_CASES])
def test_sparse_int8_layer_equals_dense_int8_bit_for_bit(target, path, pattern, shape):
    sparse, x = _build(target, pattern, "sparse", shape)
    dense, _ = _build(target, pattern, "dense", shape)
    rows = sparse.report.backend["sparse_layers"]
    assert len(rows) == 3 and all(r["int8"] and r["kernel"].startswith("sparse int8 q") for r in rows)
    assert all(r["kernel"] == "dense int8" for r in dense.report.backend["sparse_layers"])
    assert torch.equal(sparse(x), dense(x))
    torch.testing.assert_close(sparse(x), sparse.graph_module(x), rtol=1e-4, atol=1e-4)
    assert "sparse int8 q" in sparse.report.table()


@pytest.mark.parametrize("dense_s,sparse_s,want", [(1e-3, 2e-3, "dense int8"), (2e-3, 1e-3, "sparse int8")])
def test_auto_keeps_a_slower_sparse_int8_layer_dense(monkeypatch, dense_s, sparse_s, want):
    calls = []
    monkeypatch.setattr(sparse_qlower, "MEASURE", lambda *a: calls.append(a) or (dense_s, sparse_s))
    opt, x = _build("x86", "16x1", "auto", (1, 70))
    rows = opt.report.backend["sparse_layers"]
    assert len(calls) == 3
    assert all(r["kernel"].startswith(want) and "measured" in r["why"] for r in rows)
    assert all((r["stored_bytes"] < r["K"] * r["N"]) == (want == "sparse int8") for r in rows)
    dense, _ = _build("x86", "16x1", "dense", (1, 70))
    assert torch.equal(opt(x), dense(x))


def test_real_measurement_runs():
    rng = np.random.default_rng(0)
    wq = _sparse_int8(rng, 48, 64, (16, 1), 0.3, 64)
    d, s = sparse_qlower.measure_int8_layer(1, wq, (16, 1), HOST, int8_path(HOST), rounds=1)
    assert d > 0 and s > 0


def test_artifact_stores_int8_values(tmp_path):
    """90% 16x1 on a 512x512 Linear: the sparse int8 artifact's library holds int8 values + uint16 indices,
    smaller than the dense int8 one by most of the weight's 256 kB, and round-trips bit for bit."""
    import zipfile

    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(512, 512)).eval(), torch.randn(1, 512)
    calib = [(torch.randn(1, 512),) for _ in range(2)]
    sizes, outs = {}, {}
    for kernel in ("sparse", "dense"):
        opt = graphopt.optimize(model, target="x86", example_inputs=(x,), calibration=calib,
                                pipeline=f"sparsify(sparsity=0.9,pattern=16x1,kernel={kernel}),quantize(progress=false)")
        path = opt.save(tmp_path / f"{kernel}.gopt")
        with zipfile.ZipFile(path) as zf:                                 # the library, before deflate
            sizes[kernel] = zf.getinfo("model.so").file_size
        again = graphopt.load(path)
        outs[kernel] = opt(x)
        assert torch.equal(again(x), outs[kernel])
        row = opt.report.backend["sparse_layers"][0]
        if kernel == "sparse":
            q = to_qbsr(np.zeros((1, 1), np.int8), (16, 1), "qrow")          # the index dtype of a small layer
            assert q.indices.dtype == np.uint16
            assert row["stored_bytes"] < 0.2 * 512 * 512                     # int8 values + indices
    assert sizes["dense"] - sizes["sparse"] > 0.7 * 512 * 512
    assert torch.equal(outs["sparse"], outs["dense"])


def test_paths_without_sparse_int8_kernel_stay_dense():
    from graphopt.backends.tvm.lower import lower_graph
    from graphopt.capture import capture

    assert int8_kind((16, 1), 1, "sdot") == "qrow"                     # ARM +dotprod has them
    assert int8_kind((16, 1), 1, "cpu") is None and int8_kind((16, 1), 1, "relax") is None
    torch.manual_seed(0)
    x = torch.randn(1, 70)
    opt = graphopt.optimize(_MLP().eval(), target="torch", example_inputs=(x,), calibration=[(x,)],
                            pipeline="sparsify(sparsity=0.8,pattern=16x1,kernel=sparse),quantize(progress=false)")
    lowered = lower_graph(capture(opt.graph_module, (x,)).gm, (x,), resolve_target("x86:nehalem"))
    assert all(r["kernel"] == "dense int8" and "no sparse int8 kernel" in r["why"] for r in lowered.sparse_layers)


def test_artifact_deflates_a_compressible_library_and_stores_dense_weights(tmp_path):
    """model.so is deflated when that saves >= 10% (a sparse int8 model: mostly code), stored as is when not
    (random bytes standing in for dense float32 weights); both round-trip."""
    import zipfile

    from graphopt import artifact

    assert artifact._payload_compression(os.urandom(1 << 20)) == zipfile.ZIP_STORED
    assert artifact._payload_compression(b"\x00\x01" * (1 << 20)) == zipfile.ZIP_DEFLATED
    opt, x = _build("x86", "16x1", "sparse", (1, 70))
    path = opt.save(tmp_path / "s8.gopt")
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(artifact.LIBRARY)
    assert info.compress_type == zipfile.ZIP_DEFLATED and info.compress_size < 0.8 * info.file_size
    assert torch.equal(graphopt.load(path)(x), opt(x))


class _Convs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 20, 3, padding=1), nn.Conv2d(20, 33, 1)
        self.c, self.d = nn.Conv2d(33, 18, 1), nn.Conv2d(18, 8, 3, stride=2)

    def forward(self, x):
        return self.d(torch.relu(self.c(torch.relu(self.b(torch.relu(self.a(x)))))))


@pytest.mark.parametrize("target,path", TARGETS)
def test_sparse_int8_1x1_convs_equal_dense_int8_bit_for_bit(target, path):
    """1x1 convs (ragged channels) run as NHWC GEMMs on the sparse int8 kernel; 3x3 ones stay dense int8."""
    torch.manual_seed(0)
    model, x = _Convs().eval(), torch.randn(2, 3, 9, 11)
    calib = [(torch.randn(2, 3, 9, 11),) for _ in range(3)]
    outs = {}
    for kernel in ("sparse", "dense"):
        opt = graphopt.optimize(model, target=target, example_inputs=(x,), calibration=calib,
                                pipeline=f"sparsify(sparsity=0.7,pattern=4x4,kernel={kernel}),quantize(progress=false)")
        outs[kernel] = opt(x)
        rows = {r["layer"]: r for r in opt.report.backend["sparse_layers"]}
        assert rows["a"]["kernel"] == rows["d"]["kernel"] == "dense int8" and "1x1" in rows["a"]["why"]
        assert rows["b"]["op"] == "conv1x1" and rows["b"]["M"] == 2 * 9 * 11
        want = "sparse int8 q" if kernel == "sparse" else "dense int8"
        assert rows["b"]["kernel"].startswith(want) and rows["c"]["kernel"].startswith(want)
    assert torch.equal(outs["sparse"], outs["dense"])
    torch.testing.assert_close(outs["sparse"], opt.graph_module(x), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------ N:M int8 (qnm)
def _nm_int8(rng, n, k, nm, qmax=64, fill=1.0):
    """int8 [N, K] with at most n non-zeros in every m inputs (K padded to m inside), `fill` of them kept."""
    nn_, m = nm
    kk = -(-k // m) * m
    g = rng.integers(-qmax, qmax + 1, (n, kk // m, m))
    keep = np.argsort(rng.random(g.shape), -1)[..., :nn_]
    mask = np.zeros(g.shape, bool)
    np.put_along_axis(mask, keep, True, -1)
    mask &= rng.random(g.shape) < fill
    return (g * mask).reshape(n, kk)[:, :k].astype(np.int8)


def _run_qnm(x: np.ndarray, wq: np.ndarray, target: str, path: str, exact: bool) -> np.ndarray:
    from graphopt.backends.tvm.nm_int8 import qnm_kernel, qnm_lanes, qnm_row_tile, to_qnm

    m, k = x.shape
    n = wq.shape[0]
    q = to_qnm(wq, qnm_lanes(path))
    np.testing.assert_array_equal(q.to_dense(), wq)
    lib = tvm.compile(tvm.IRModule({"main": qnm_kernel(q, m, qnm_row_tile(m, path), path, exact, FLOAT, n)}),
                      target=resolve_target(target).tvm_target())
    xp = np.zeros((m, q.k_pad), np.uint8)
    xp[:, :k] = x
    vecs = (np.zeros(q.n_pad, np.int32), np.ones(q.n_pad, np.float32), np.zeros(q.n_pad, np.float32))
    y = tvm.runtime.tensor(np.zeros((m, n), np.float32))
    lib["main"](*[tvm.runtime.tensor(a) for a in (xp, q.data, q.shuf, *vecs)], y)
    return y.numpy()


@settings(max_examples=10, deadline=None)
@given(m=st.integers(1, 40), n=st.integers(1, 50), k=st.integers(1, 70), nm=st.sampled_from([(2, 4), (4, 8)]),
       fill=st.floats(0.0, 1.0), tp=st.sampled_from(TARGETS), seed=st.integers(0, 2**16))
def test_nm_int8_kernel_sums_exactly(m, n, k, nm, fill, tp, seed):
    """The N:M int8 kernel (byte shuffle + dot product) on ragged M/N/K, any fill of the kept slots: the int32
    sums equal numpy's."""
    target, path = tp
    rng = np.random.default_rng(seed)
    wq = _nm_int8(rng, n, k, nm, fill=fill)
    x = rng.integers(0, 256, (m, k)).astype(np.uint8)
    got = _run_qnm(x, wq, target, path, exact=False)
    np.testing.assert_array_equal(got.astype(np.int64), x.astype(np.int64) @ wq.astype(np.int64).T)


def test_nm_int8_pairs_saturate_on_avx2_and_the_exact_split_fixes_it():
    rng = np.random.default_rng(2)
    wq = _nm_int8(rng, 16, 64, (2, 4))
    wq[wq != 0] = 127                                 # 255·127·2 > 32,767: an int16 pair sum saturates
    x = np.full((1, 64), 255, np.uint8)
    want = x.astype(np.int64) @ wq.astype(np.int64).T
    np.testing.assert_array_equal(_run_qnm(x, wq, "x86:haswell", "avx2", exact=True), want)
    assert not np.array_equal(_run_qnm(x, wq, "x86:haswell", "avx2", exact=False), want)


def test_nm_int8_detection_and_storage():
    from graphopt.backends.tvm.nm_int8 import detect_nm_int8, to_qnm

    rng = np.random.default_rng(0)
    assert detect_nm_int8(_nm_int8(rng, 32, 64, (2, 4))) == (2, 4)
    assert detect_nm_int8(_nm_int8(rng, 32, 64, (4, 8))) == (4, 8)
    # kept weights that quantize to 0 (a tenth here) still make a 2:4 layer
    assert detect_nm_int8(_nm_int8(rng, 32, 64, (2, 4), fill=0.9)) == (2, 4)
    assert detect_nm_int8(_sparse_int8(rng, 32, 64, (1, 1), 0.5, 64)) is None      # unstructured 50%
    assert detect_nm_int8(_nm_int8(rng, 32, 64, (2, 4), fill=0.3)) is None          # far sparser: block kernels
    assert detect_nm_int8(_nm_int8(rng, 32, 64, (8, 16))) is None       # 8:16 may put 5 in a window of 8
    assert detect_nm_int8(_nm_int8(rng, 32, 66, (2, 4))) is None                     # K not whole groups
    q = to_qnm(_nm_int8(rng, 37, 64, (2, 4)), 16)
    assert q.data.shape == q.shuf.shape == (3, 8, 16, 4) and q.stored_bytes == 2 * 3 * 16 * 32
    with pytest.raises(ValueError, match="more than 4 non-zeros"):
        to_qnm(np.ones((4, 16), np.int8), 8)


@pytest.mark.parametrize("target,path,pattern,shape", [
    pytest.param(t, p, pat, shape, id=f"{pat}-{'x'.join(map(str, shape))}-{t}")
    for t, p in TARGETS for pat, shape in [("2:4", (1, 72)), ("4:8", (3, 7, 72))]])
def test_nm_int8_layers_equal_dense_int8_bit_for_bit(target, path, pattern, shape):
    sparse, x = _build(target, pattern, "sparse", shape, _NMMLP, 0.5)
    dense, _ = _build(target, pattern, "dense", shape, _NMMLP, 0.5)
    rows = sparse.report.backend["sparse_layers"]
    # the last Linear (K = 44) is not whole groups of 8: the pass leaves it dense (N:M needs K % m == 0)
    assert [r["kernel"] for r in rows[:2]] == [f"sparse int8 qnm {pattern}"] * 2
    assert all(r["block"] == pattern and r["stored_bytes"] < r["K"] * r["N"] * 1.2 for r in rows[:2])
    assert torch.equal(sparse(x), dense(x))
    torch.testing.assert_close(sparse(x), sparse.graph_module(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("pattern,model,sparsity,int8", [("16x1", _MLP, 0.8, True), ("2:4", _NMMLP, 0.5, True),
                                                        ("16x1", _MLP, 0.8, False)])
def test_sparse_layers_with_dynamic_rows_run_dense_and_match(pattern, model, sparsity, int8):
    """A dynamic batch (graphopt.dynamic): the sparse kernels are built for a static row count, so each sparse
    layer lowers to the dense (int8) kernel with dynamic rows, says so in the report, and matches its graph at
    every size (this was a LoweringError: int() of the symbolic row count)."""
    torch.manual_seed(0)
    k = 72 if model is _NMMLP else 70
    x = torch.randn(2, k)
    opt = graphopt.optimize(model().eval(), target="x86:haswell", example_inputs=(x,),
                            calibration=[(torch.randn(2, k),)] if int8 else None, dynamic={"x": {0: ("batch", 1, 16)}},
                            pipeline=f"sparsify(sparsity={sparsity},pattern={pattern},kernel=sparse)"
                                     + (",quantize(progress=false)" if int8 else ""))
    rows = opt.report.backend["sparse_layers"]
    assert rows and all(r["M"] == "dynamic" and "dynamic rows" in r["why"] and r["kernel"].startswith("dense")
                        for r in rows)
    with torch.no_grad():
        for b in (1, 5, 16):
            xb = torch.randn(b, k)
            torch.testing.assert_close(opt(xb), opt.graph_module(xb), rtol=1e-4, atol=1e-4)
