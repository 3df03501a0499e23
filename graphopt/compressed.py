"""Compressed model files (Deep Compression's storage format): weight-shared layers keep a codebook and their
cluster indices entropy-coded with zstd; everything else is the optimized GraphModule, zstd-compressed.

    path = graphopt.compressed.save(opt_or_graph_module, "model.goptz")      # returns the path
    gm = graphopt.compressed.load("model.goptz")                             # the same GraphModule

Layout: b"GOPTZ1\\n", a 4-byte little-endian header length, a JSON header, then the sections back to back.
The header lists each section (name, offset, length, sha256 of the stored bytes, raw length) and, for every
graphopt.quant.cluster.ClusteredLinear, its module path and index shape. Sections:
  graph              torch.save of the GraphModule with every ClusteredLinear's index buffer emptied, zstd
  indices/<path>     that layer's indices, one byte per weight (a skewed distribution: zstd's entropy stage
                     codes it in about its entropy; 4-bit packing first would hide the symbols), zstd level 19
Round trip is bit for bit. A wrong magic, a truncated file, a checksum mismatch, an undecodable section or an
index shape that does not fit its layer raise ArtifactError naming the file and the section.
The graph section is a pickle (like graphopt's .gopt artifacts for target "torch"): load files you trust.
"""
from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import struct

import torch

from .errors import ArtifactError

__all__ = ["save", "load", "MAGIC", "section_sizes"]

MAGIC = b"GOPTZ1\n"
_LEVEL = 19


def _zstd():
    try:
        import zstandard
    except ImportError as e:                                # optional dependency: pip install graphopt[compress]
        raise ArtifactError("compressed model files need the 'zstandard' package (pip install zstandard)") from e
    return zstandard


def _graph_module(obj):
    gm = getattr(obj, "graph_module", obj)
    if not isinstance(gm, torch.nn.Module):
        raise TypeError(f"expected an OptimizedModel or a GraphModule, got {type(obj).__name__}")
    return gm


def save(obj, path: str) -> str:
    """Write `obj` (an OptimizedModel or a GraphModule) as a compressed model file; returns `path`."""
    from .quant.cluster import ClusteredLinear

    zstd = _zstd()
    gm = copy.deepcopy(_graph_module(obj))
    layers, sections = [], []
    for name, mod in gm.named_modules():
        if isinstance(mod, ClusteredLinear):
            idx = mod.indices().contiguous().numpy()
            layers.append({"path": name, "shape": list(idx.shape), "packed_shape": list(mod.index.shape)})
            sections.append((f"indices/{name}", idx.tobytes()))
            mod.index = torch.empty(0, dtype=torch.uint8)
    buf = io.BytesIO()
    torch.save(gm, buf)
    sections.insert(0, ("graph", buf.getvalue()))
    cctx = zstd.ZstdCompressor(level=_LEVEL)
    blobs, table, offset = [], [], 0
    for name, raw in sections:
        data = cctx.compress(raw)
        table.append({"name": name, "offset": offset, "length": len(data), "raw_length": len(raw),
                      "sha256": hashlib.sha256(data).hexdigest()})
        blobs.append(data)
        offset += len(data)
    header = json.dumps({"format": 1, "sections": table, "clustered": layers}).encode()
    with open(path, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<I", len(header)))
        f.write(header)
        for b in blobs:
            f.write(b)
    return path


def _read_header(data: bytes, path: str) -> tuple[dict, int]:
    if not data.startswith(MAGIC):
        raise ArtifactError(f"{path}: not a graphopt compressed model file (bad magic)")
    if len(data) < len(MAGIC) + 4:
        raise ArtifactError(f"{path}: truncated header")
    (n,) = struct.unpack_from("<I", data, len(MAGIC))
    start = len(MAGIC) + 4
    if start + n > len(data):
        raise ArtifactError(f"{path}: truncated header ({n} bytes announced, {len(data) - start} present)")
    try:
        header = json.loads(data[start:start + n])
        header["sections"], header["clustered"]
    except Exception as e:
        raise ArtifactError(f"{path}: unreadable header: {type(e).__name__}: {e}") from None
    return header, start + n


def section_sizes(path: str) -> dict[str, int]:
    """Stored (compressed) bytes of each section of a compressed model file."""
    with open(path, "rb") as f:
        header, _ = _read_header(f.read(), path)
    return {s["name"]: int(s["length"]) for s in header["sections"]}


def load(path: str):
    """The GraphModule stored by save(); ArtifactError when the file is not one or is corrupted."""
    from .quant.cluster import ClusteredLinear

    zstd = _zstd()
    if not os.path.exists(path):
        raise ArtifactError(f"{path}: no such file")
    with open(path, "rb") as f:
        data = f.read()
    header, base = _read_header(data, path)
    dctx = zstd.ZstdDecompressor()
    raw: dict[str, bytes] = {}
    for s in header["sections"]:
        lo, hi = base + int(s["offset"]), base + int(s["offset"]) + int(s["length"])
        if hi > len(data):
            raise ArtifactError(f"{path}: section '{s['name']}' is truncated")
        blob = data[lo:hi]
        if hashlib.sha256(blob).hexdigest() != s["sha256"]:
            raise ArtifactError(f"{path}: section '{s['name']}' is corrupted (checksum mismatch)")
        try:
            raw[s["name"]] = dctx.decompress(blob, max_output_size=int(s["raw_length"]))
        except Exception as e:
            raise ArtifactError(f"{path}: section '{s['name']}' does not decode: {e}") from None
        if len(raw[s["name"]]) != int(s["raw_length"]):
            raise ArtifactError(f"{path}: section '{s['name']}' decodes to the wrong length")
    if "graph" not in raw:
        raise ArtifactError(f"{path}: no graph section")
    try:
        gm = torch.load(io.BytesIO(raw["graph"]), weights_only=False)     # a pickle: trusted files only
    except Exception as e:
        raise ArtifactError(f"{path}: the graph section does not load: {type(e).__name__}: {e}") from None
    from .quant.weight_only import pack_int4

    for layer in header["clustered"]:
        name = f"indices/{layer['path']}"
        try:
            mod = gm.get_submodule(layer["path"])
        except AttributeError:
            raise ArtifactError(f"{path}: clustered layer '{layer['path']}' is not in the graph") from None
        shape = tuple(layer["shape"])
        if (not isinstance(mod, ClusteredLinear) or name not in raw
                or shape != (mod.out_features, mod.in_features) or len(raw[name]) != shape[0] * shape[1]):
            raise ArtifactError(f"{path}: section '{name}' does not fit layer '{layer['path']}'")
        idx = torch.frombuffer(bytearray(raw[name]), dtype=torch.uint8).reshape(shape)
        if int(idx.max()) >= mod.codebook.numel():
            raise ArtifactError(f"{path}: section '{name}' indexes past the codebook")
        mod.index = pack_int4(idx.to(torch.int16)) if mod.bits == 4 else idx.clone()
    return gm
