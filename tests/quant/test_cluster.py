"""Weight sharing: k-means codebooks, the cluster pass, codebook-lookup kernels, compressed model files."""
from __future__ import annotations

import os
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import graphopt
from graphopt import compressed
from graphopt.errors import ArtifactError, PipelineError
from graphopt.quant.cluster import ClusteredLinear, kmeans_1d



@settings(max_examples=40, deadline=None)
@given(st.integers(2, 40), st.integers(1, 300), st.floats(0.0, 0.9), st.integers(0, 2 ** 31 - 1))
def test_kmeans_codebook_is_small_keeps_zeros_and_assigns_each_value_its_nearest_entry(k, n, zero_frac, seed):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n, generator=g)
    v[torch.rand(n, generator=g) < zero_frac] = 0.0
    codebook, idx = kmeans_1d(v, k)
    assert codebook.dtype == torch.float32 and codebook.numel() <= k
    assert int(idx.min()) >= 0 and int(idx.max()) < codebook.numel()
    deq = codebook[idx]
    assert torch.all(deq[v == 0] == 0)                              # pruned weights stay exactly zero
    nz = v != 0
    dist = (v[nz].double().unsqueeze(1) - codebook.double().unsqueeze(0)).abs()
    assert torch.allclose((deq[nz].double() - v[nz].double()).abs(), dist.min(dim=1).values, rtol=0, atol=1e-7)
    if torch.unique(v).numel() <= k:                                # few distinct values: represented exactly
        assert torch.equal(deq, v)


def test_more_clusters_means_less_error():
    torch.manual_seed(0)
    w = torch.randn(64, 48)
    errs = [(ClusteredLinear(w, None, k).dequantized_weight() - w).norm() / w.norm() for k in (4, 16, 64)]
    assert errs[0] > errs[1] > errs[2] and errs[1] < 0.15


@pytest.mark.parametrize("opts,match", [("k=1", "k=1"), ("k=300", "k=300"), ("iters=0", "iters=0")])
def test_bad_cluster_options_are_typed_errors(opts, match):
    with pytest.raises(PipelineError, match=match):
        graphopt.optimize(nn.Sequential(nn.Linear(4, 2)), "torch", f"cluster({opts})",
                          example_inputs=(torch.randn(1, 4),))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc1, self.fc2 = nn.Linear(4 * 6 * 6, 37), nn.Linear(37, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))


@pytest.fixture(scope="module")
def clustered():
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 1, 8, 8)
    opt = graphopt.optimize(model, "torch", "cluster(k=16)", example_inputs=(x,))
    return model, x, opt


def test_pass_clusters_linears_leaves_convs_and_reports_sizes(clustered):
    pytest.importorskip("zstandard")
    model, x, opt = clustered
    mods = [m for m in opt.graph_module.modules() if isinstance(m, ClusteredLinear)]
    assert len(mods) == 2 and all(m.bits == 4 and m.k <= 16 for m in mods)
    rec = opt.report.records[-1]
    assert any("conv" in n and "not clustered" in n for n in rec.notes)
    assert any("zstd-coded indices" in n for n in rec.notes)
    assert all(0 < d["w_err"] < 0.2 and d["zstd_index_bytes"] > 0 for d in rec.details)
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(opt(x).flatten(), model(x).flatten(), dim=0)
    assert cos > 0.98


def test_compressed_file_round_trips_bit_for_bit(clustered, tmp_path):
    pytest.importorskip("zstandard")
    _, x, opt = clustered
    path = compressed.save(opt, str(tmp_path / "net.goptz"))
    sizes = compressed.section_sizes(path)
    assert set(sizes) == {"graph", "indices/fc1", "indices/fc2"}
    gm = compressed.load(path)
    before = dict(opt.graph_module.named_buffers())
    after = dict(gm.named_buffers())
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(gm(x), opt.graph_module(x))


def test_corrupted_compressed_files_are_typed_errors(clustered, tmp_path):
    pytest.importorskip("zstandard")
    _, _, opt = clustered
    path = compressed.save(opt, str(tmp_path / "net.goptz"))
    data = open(path, "rb").read()
    header_end = len(data) - sum(compressed.section_sizes(path).values())

    def broken(name: str, blob: bytes) -> str:
        p = str(tmp_path / name)
        with open(p, "wb") as f:
            f.write(blob)
        return p

    cases = {
        "magic": (b"XXXXXX\n" + data[7:], "bad magic"),
        "truncated": (data[:-10], "truncated"),
        "graph": (data[:header_end + 5] + bytes([data[header_end + 5] ^ 0xFF]) + data[header_end + 6:],
                  "section 'graph' is corrupted"),
        "indices": (data[:-3] + bytes([data[-3] ^ 0x01]) + data[-2:], "section 'indices/fc2' is corrupted"),
        "header": (data[:12] + b"{" + data[13:], "unreadable header"),
    }
    for name, (blob, match) in cases.items():
        with pytest.raises(ArtifactError, match=match):
            compressed.load(broken(name, blob))
    with pytest.raises(ArtifactError, match="no such file"):
        compressed.load(str(tmp_path / "missing.goptz"))
    assert os.path.getsize(path) == len(data)


# ---------------------------------------------------------------------------------------- TVM kernels
tvm = pytest.importorskip("tvm")

from graphopt.backends.targets import resolve_target  # noqa: E402
from tests.helpers import X86_TARGETS  # noqa: E402
from tests.quant.test_int8_paths import _compile, asm_of, run_one_layer  # noqa: E402

# (rows, in, out, k): 4-bit and 8-bit indices, direct (M <= 4) and panel kernels, odd K and N, pruned zeros
LUT_SHAPES = [(1, 37, 21, 16), (7, 64, 33, 16), (1, 53, 19, 64), (9, 30, 17, 40)]


class LutLayers(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        mods = []
        for _, k, n, kk in LUT_SHAPES:
            w = torch.randn(n, k)
            w[:, ::4] = 0.0
            mods.append(ClusteredLinear(w, torch.randn(n), kk))
        self.layers = nn.ModuleList(mods)

    def forward(self, a, b, c, d):
        return self.layers[0](a), self.layers[1](b), self.layers[2](c), self.layers[3](d)


@pytest.mark.parametrize("target", X86_TARGETS)
def test_codebook_kernels_match_the_reference(target):
    module = LutLayers().eval()
    g = torch.Generator().manual_seed(1)
    args = tuple(torch.randn(m, k, generator=g) for m, k, _, _ in LUT_SHAPES)
    spec = resolve_target(target)
    compiled, exe, lowered = _compile(module, args, spec)
    from tvm.target import codegen

    panel8 = "codebook8 panel×1" if codegen.target_has_features("avx512f", spec.tvm_target()) else \
        "codebook8 as float32×1"                    # AVX2: no 8-bit lookup faster than float32 in a panel
    assert "clustered_linear:codebook4 direct×1" in lowered.quant and panel8 in lowered.quant, lowered.quant

    if codegen.target_has_features("avx512f", spec.tvm_target()):      # 16-entry lookup: one permute
        assert re.search(r"vperm(ps|d)\t%zmm", asm_of(exe))            # (LLVM may pick the integer form)
    elif codegen.target_has_features("avx2", spec.tvm_target()):
        asm = asm_of(exe)     # panel: two 8-entry permutes and a blend; GEMV: byte shuffles of the entries' bytes
        assert re.search(r"vperm(ps|d)\t%ymm", asm) and re.search(r"vblendvps\t%ymm", asm), "no AVX2 lookup"
        assert re.search(r"vpshufb\t%ymm", asm) and "gather" not in asm, "no AVX2 GEMV byte-shuffle lookup"
        assert re.search(r"vpblendvb\t%ymm", asm), "no group select of the 8-bit (k = 64) GEMV lookup"
    with torch.no_grad():
        refs = module(*args)
    eps = torch.finfo(torch.float32).eps
    for layer, x, got, ref in zip(module.layers, args, compiled(*args), refs):
        tol = (x.abs() @ layer.dequantized_weight().abs().t() + layer.bias.abs()) * 8 * eps
        assert not ((got - ref).abs() > tol).any()


def test_8bit_codebooks_run_as_float32_where_avx2_would_gather():
    """On AVX2, 8-bit indices into more than 64 entries have no byte-shuffle GEMV, and the panel kernel (more
    than 4 rows) gathers 8-bit codebooks: both ran slower than float32, so such layers are the float32 matmul of
    their dequantized weight (w = codebook[q] exactly). 64 entries keep the shuffle GEMV, 4-bit codebooks their
    kernels, AVX-512 its kernels. Values within float32 rounding of the module's."""
    torch.manual_seed(0)
    wide, narrow = ClusteredLinear(torch.randn(40, 70), torch.randn(40), 200), ClusteredLinear(
        torch.randn(40, 70), torch.randn(40), 64)
    assert wide.codebook.numel() > 64 and wide.bits == 8
    g = torch.Generator().manual_seed(2)
    for target, rows, layer, expect in (("x86:haswell", 1, wide, "codebook8 as float32"),
                                        ("x86:haswell", 3, wide, "codebook8 as float32"),
                                        ("x86:haswell", 7, wide, "codebook8 as float32"),
                                        ("x86:haswell", 1, narrow, "codebook8 direct"),
                                        ("x86:haswell", 7, narrow, "codebook8 as float32"),
                                        ("x86:skylake-avx512", 7, narrow, "codebook8 panel"),
                                        ("x86:skylake-avx512", 1, wide, "codebook8 direct")):
        module = nn.Sequential(layer).eval()
        x = torch.randn(rows, 70, generator=g)
        compiled, _, lowered = _compile(module, (x,), resolve_target(target))
        assert f"clustered_linear:{expect}×1" in lowered.quant, (target, rows, lowered.quant)
        if target == "x86:haswell":                 # AVX2 code runs on every x86 graphopt supports
            with torch.no_grad():
                ref = module(x)
            tol = (x.abs() @ layer.dequantized_weight().abs().t() + layer.bias.abs()) * 8 * torch.finfo(
                torch.float32).eps
            assert not ((compiled(x) - ref).abs() > tol).any(), (target, rows)


@pytest.mark.parametrize("k", [16, 40])
def test_codebook_kernel_with_odd_inputs_ignores_the_padding(k):
    """An odd number of inputs leaves the last pair's second weight as padding, index 0, whose codebook entry is
    not 0 when no centroid is (here every weight is positive). The direct kernels (1 and 3 rows) once added
    x[K - 1] · codebook[0] for it: an error of the size of the output (2.3 on this layer), not float rounding."""
    torch.manual_seed(0)
    w = torch.rand(21, 37) + 1.0
    layer = ClusteredLinear(w, torch.randn(21), k)
    assert layer.codebook[0].item() != 0.0
    module = nn.Sequential(layer).eval()
    for rows in (1, 3):
        x = torch.randn(rows, 37)
        compiled, _, lowered = _compile(module, (x,), resolve_target("x86"))
        assert "direct" in lowered.quant
        with torch.no_grad():
            ref = module(x)
        tol = (x.abs() @ layer.dequantized_weight().abs().t() + layer.bias.abs()) * 8 * torch.finfo(torch.float32).eps
        assert not ((compiled(x) - ref).abs() > tol).any(), (rows, (compiled(x) - ref).abs().max().item())


@settings(max_examples=12, deadline=None)
@given(rows=st.integers(1, 7), k_in=st.integers(1, 80), n=st.integers(1, 40),
       k=st.sampled_from([2, 16, 20, 40, 64, 100]),
       offset=st.sampled_from([0.0, 1.5, -3.0]), seed=st.integers(0, 2 ** 31 - 1))
def test_codebook_kernels_match_the_module_on_random_layers(rows, k_in, n, k, offset, seed):
    """Random layers through the codebook kernels (direct up to 4 rows, panel above; 4-bit indices for k <= 16,
    8-bit above: on AVX2 the byte-shuffle GEMV with 1, 2 or 4 groups of 16 entries up to k = 64, a gather past;
    odd and even input counts; codebooks with and without a zero entry) equal the module's codebook[index]
    matmul within float32 rounding."""
    g = torch.Generator().manual_seed(seed)
    layer = ClusteredLinear(torch.randn(n, k_in, generator=g) + offset, torch.randn(n, generator=g), k)
    x = torch.randn(rows, k_in, generator=g)
    got, ref = run_one_layer(layer, x)
    tol = (x.abs() @ layer.dequantized_weight().abs().t() + layer.bias.abs()) * 8 * torch.finfo(torch.float32).eps
    assert not ((got - ref).abs() > tol).any(), (got - ref).abs().max().item()
