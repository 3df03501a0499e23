"""graphopt.compressed with pruned models: sparse tensors stored as bitmap + values, bit for bit, smaller than
zstd alone, and corrupted sparse sections are typed errors."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import graphopt
from graphopt import compressed
from graphopt.errors import ArtifactError

zstandard = pytest.importorskip("zstandard")


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)).eval()


@pytest.fixture(scope="module")
def pruned():
    """(float32 sparse, int8 sparse) OptimizedModels of one MLP at 90% unstructured sparsity, and an input."""
    x = torch.randn(3, 64)
    calib = [(torch.randn(3, 64),) for _ in range(2)]
    f32 = graphopt.optimize(_mlp(), target="torch", pipeline="sparsify(sparsity=0.9)", example_inputs=(x,))
    i8 = graphopt.optimize(_mlp(), target="torch", pipeline="sparsify(sparsity=0.9),quantize(progress=false)",
                           example_inputs=(x,), calibration=calib)
    return f32, i8, x


def _state(gm) -> dict:
    return {k: v for k, v in gm.state_dict().items()}


@pytest.mark.parametrize("which", ["f32", "i8"])
def test_sparse_tensors_round_trip_bit_for_bit_as_bitmap_and_values(pruned, tmp_path, which):
    f32, i8, x = pruned
    opt = f32 if which == "f32" else i8
    path = compressed.save(opt, str(tmp_path / "m.goptz"))
    sizes = compressed.section_sizes(path)
    weight = "weight" if which == "f32" else "weight_q"
    assert {f"bitmap/2.{weight}", f"values/2.{weight}"} <= set(sizes)
    if which == "f32":                  # the bool mask shares its weight's bitmap: no section of its own
        assert not any(k.endswith(".mask") for k in sizes)
    back = compressed.load(path)
    before, after = _state(opt.graph_module), _state(back)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
    assert [type(p) for p in back.parameters()] == [type(p) for p in opt.graph_module.parameters()]
    with torch.no_grad():
        assert torch.equal(back(x), opt.graph_module(x))
    # the pruned weights in fewer bytes than zstd codes them alone (what the format did before)
    cctx = zstandard.ZstdCompressor(level=19)
    names = [e.split("/", 1)[1] for e in sizes if e.startswith("values/")]
    plain = sum(len(cctx.compress(before[k].numpy().tobytes())) for k in names)
    coded = sum(sizes[f"values/{k}"] + sizes.get(f"bitmap/{k}", 0) for k in names)
    assert len(names) == 3 and coded < 0.9 * plain


def test_dense_and_small_tensors_stay_in_the_graph(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8)).eval()
    with torch.no_grad():
        model[1].weight[:, :40] = 0                      # 62% zero but only 512 elements: below the minimum
    opt = graphopt.optimize(model, target="torch", pipeline="cleanup", example_inputs=(torch.randn(1, 64),))
    path = compressed.save(opt, str(tmp_path / "d.goptz"))
    assert set(compressed.section_sizes(path)) == {"graph"}
    assert torch.equal(compressed.load(path).get_submodule("1").weight, opt.graph_module.get_submodule("1").weight)


def test_corrupted_sparse_sections_are_typed_errors(pruned, tmp_path):
    import json
    import struct

    _, i8, _ = pruned
    path = compressed.save(i8, str(tmp_path / "m.goptz"))
    data = open(path, "rb").read()
    (n,) = struct.unpack_from("<I", data, len(compressed.MAGIC))
    start = len(compressed.MAGIC) + 4
    header = json.loads(data[start:start + n])

    def rewrite(change) -> str:
        h = json.loads(json.dumps(header))
        change(h)
        blob = json.dumps(h).encode()
        p = str(tmp_path / f"bad{len(os.listdir(tmp_path))}.goptz")
        with open(p, "wb") as f:
            f.write(compressed.MAGIC + struct.pack("<I", len(blob)) + blob + data[start + n:])
        return p

    def entry(h, name="2.weight_q"):
        return next(e for e in h["sparse"] if e["name"] == name)

    with pytest.raises(ArtifactError, match="count of non-zeros of 2.weight_q"):
        compressed.load(rewrite(lambda h: entry(h).update(nnz=entry(h)["nnz"] + 1)))
    with pytest.raises(ArtifactError, match=r"'bitmap/2.weight_q' is missing or does not fit"):
        compressed.load(rewrite(lambda h: entry(h).update(shape=[256, 300])))
    with pytest.raises(ArtifactError, match="'values/2.weight_q' is missing or does not match"):
        compressed.load(rewrite(lambda h: entry(h).update(dtype="int16")))
    with pytest.raises(ArtifactError, match="sparse tensor 'nothing.weight' does not fit the graph"):
        compressed.load(rewrite(lambda h: entry(h).update(name="nothing.weight")))
    assert header["derived"] == ["0.out_scale", "2.out_scale", "4.out_scale"]      # recomputed on load
    with pytest.raises(ArtifactError, match="derived tensor 'nothing.out_scale' does not fit the graph"):
        compressed.load(rewrite(lambda h: h["derived"].append("nothing.out_scale")))
    # a flipped byte inside a values section: the checksum names it
    table = {s["name"]: s for s in header["sections"]}
    off = start + n + table["values/2.weight_q"]["offset"] + 3
    p = str(tmp_path / "flip.goptz")
    with open(p, "wb") as f:
        f.write(data[:off] + bytes([data[off] ^ 0x10]) + data[off + 1:])
    with pytest.raises(ArtifactError, match="section 'values/2.weight_q' is corrupted"):
        compressed.load(p)
