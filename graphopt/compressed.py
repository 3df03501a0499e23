"""Compressed model files (Deep Compression's storage format): weight-shared layers keep a codebook and their
cluster indices entropy-coded with zstd; everything else is the optimized GraphModule, zstd-compressed.

    path = graphopt.compressed.save(opt_or_graph_module, "model.goptz")      # returns the path
    gm = graphopt.compressed.load("model.goptz")                             # the same GraphModule

Layout: b"GOPTZ1\\n", a 4-byte little-endian header length, a JSON header, then the sections back to back.
The header lists each section (name, offset, length, sha256 of the stored bytes, raw length), for every
graphopt.quant.cluster.ClusteredLinear its module path and index shape, and for every sparse tensor its name,
shape, dtype and kind. Sections:
  graph              torch.save of the GraphModule with every ClusteredLinear's index buffer and every sparse
                     tensor emptied, zstd
  indices/<path>     that layer's indices, one byte per weight (a skewed distribution: zstd's entropy stage
                     codes it in about its entropy; 4-bit packing first would hide the symbols), zstd level 19
  bitmap/<name>      a sparse tensor (a parameter or buffer of at least SPARSE_MIN_NUMEL elements, at least
  values/<name>      half of them zero: pruned weights, int8 or float, and their masks) as a bitmap of its
                     non-zeros (1 bit per element, zstd) and the non-zero values in order (zstd; none for a
                     bool mask; a tensor with the bitmap of an earlier one, a mask and its masked weight, refers
                     to that bitmap). zstd alone codes a 90%-zero int8 weight in ~1.9 bits per element (a zero
                     byte costs it at least one bit); bitmap + values come to ~1.2.
A quantized layer's out_scale (w_scale times the input scale, in float32) is recomputed on load rather than
stored, when that gives the same bits (listed under "derived" in the header).
Round trip is bit for bit. A wrong magic, a truncated file, a checksum mismatch, an undecodable section, an
index shape that does not fit its layer or a bitmap and values that disagree raise ArtifactError naming the
file and the section.
The graph section is a pickle (like graphopt's .gopt artifacts for target "torch"): load files you trust.
"""
from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import struct

import numpy as np
import torch

from .errors import ArtifactError

__all__ = ["save", "load", "MAGIC", "section_sizes", "SPARSE_MIN_NUMEL"]

MAGIC = b"GOPTZ1\n"
_LEVEL = 19
SPARSE_MIN_NUMEL = 1024             # smaller tensors: the bitmap's frame costs more than it saves
_SPARSE_DTYPES = {torch.bool, torch.int8, torch.uint8, torch.int16, torch.int32, torch.float16, torch.bfloat16,
                  torch.float32, torch.float64}


def _derived_out_scale(mod) -> torch.Tensor | None:
    """A quantized layer's out_scale as the quantize pass computes it (float32(float64(w_scale)·x_scale)),
    or None when the module has no such buffer."""
    from .quant.modules import _out_scale

    w, x = getattr(mod, "w_scale", None), getattr(mod, "x_scale", None)
    if not isinstance(w, torch.Tensor) or not isinstance(x, float) or not isinstance(mod._buffers.get("out_scale"),
                                                                                  torch.Tensor):
        return None
    return _out_scale(x, w)


def _sparse_tensors(gm) -> list[tuple[str, torch.nn.Module, str, str, torch.Tensor]]:
    """(qualified name, owning module, attribute, 'parameter' | 'buffer', tensor) of every tensor stored
    as bitmap + values: at least SPARSE_MIN_NUMEL elements, at least half of them zero."""
    out = []
    for mod_name, mod in gm.named_modules():
        for kind, table in (("parameter", mod._parameters), ("buffer", mod._buffers)):
            for attr, t in table.items():
                if t is None or t.dtype not in _SPARSE_DTYPES or t.numel() < SPARSE_MIN_NUMEL or t.is_sparse:
                    continue
                if int(torch.count_nonzero(t)) * 2 > t.numel():
                    continue
                out.append((f"{mod_name}.{attr}" if mod_name else attr, mod, attr, kind, t))
    return out


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
    derived = []
    for name, mod in gm.named_modules():
        # out_scale is a function of w_scale and x_scale: not stored when recomputing it gives the same bits
        want = _derived_out_scale(mod)
        if want is not None and torch.equal(want, mod._buffers["out_scale"]):
            derived.append(f"{name}.out_scale" if name else "out_scale")
            mod._buffers["out_scale"] = torch.empty(0)
    sparse, bitmaps = [], {}
    for name, mod, attr, kind, t in _sparse_tensors(gm):
        flat = t.detach().contiguous().reshape(-1)
        nz = (flat != 0).numpy()
        bits = np.packbits(nz).tobytes()
        entry = {"name": name, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
                 "kind": kind, "requires_grad": bool(t.requires_grad), "nnz": int(nz.sum())}
        if bits in bitmaps:                  # a mask and its masked weight share one bitmap section
            entry["bitmap"] = bitmaps[bits]
        else:
            bitmaps[bits] = entry["bitmap"] = name
            sections.append((f"bitmap/{name}", bits))
        sparse.append(entry)
        if t.dtype != torch.bool:
            sections.append((f"values/{name}", flat[torch.from_numpy(nz)].numpy().tobytes()))
        empty = torch.empty(0, dtype=t.dtype)
        if kind == "parameter":
            mod._parameters[attr] = torch.nn.Parameter(empty, requires_grad=False)
        else:
            mod._buffers[attr] = empty
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
    header = json.dumps({"format": 1, "sections": table, "clustered": layers, "sparse": sparse,
                         "derived": derived}).encode()
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
    for entry in header.get("sparse", []):
        _restore_sparse(gm, entry, raw, path)
    for name in header.get("derived", []):
        mod_name, _, attr = str(name).rpartition(".")
        try:
            mod = gm.get_submodule(mod_name)
        except AttributeError:
            mod = None
        value = _derived_out_scale(mod) if mod is not None and attr == "out_scale" else None
        if value is None:
            raise ArtifactError(f"{path}: derived tensor '{name}' does not fit the graph")
        mod._buffers[attr] = value
    return gm


def _restore_sparse(gm, entry: dict, raw: dict, path: str) -> None:
    """Put a bitmap + values tensor back into its module (ArtifactError when the sections do not fit it)."""
    name = str(entry.get("name", ""))
    where = f"{path}: sparse tensor '{name}'"
    mod_name, _, attr = name.rpartition(".")
    try:
        mod = gm.get_submodule(mod_name)
        dtype = getattr(torch, str(entry["dtype"]))
        shape = tuple(int(d) for d in entry["shape"])
        kind = entry["kind"]
        table = mod._parameters if kind == "parameter" else mod._buffers
        if attr not in table or kind not in ("parameter", "buffer") or not isinstance(dtype, torch.dtype):
            raise KeyError(attr)
    except (AttributeError, KeyError, TypeError, ValueError):
        raise ArtifactError(f"{where} does not fit the graph") from None
    numel = int(np.prod(shape)) if shape else 1
    section = f"bitmap/{entry.get('bitmap', name)}"
    bits = raw.get(section)
    if bits is None or len(bits) != -(-numel // 8):
        raise ArtifactError(f"{path}: section '{section}' is missing or does not fit {name} {list(shape)}")
    nz = np.unpackbits(np.frombuffer(bits, np.uint8), count=numel).astype(bool)
    if int(nz.sum()) != int(entry.get("nnz", -1)):
        raise ArtifactError(f"{path}: section '{section}' does not match the count of non-zeros of {name}")
    flat = torch.zeros(numel, dtype=dtype)
    if dtype == torch.bool:
        flat[torch.from_numpy(nz)] = True
    else:
        vals = raw.get(f"values/{name}")
        width = torch.empty(0, dtype=dtype).element_size()
        if vals is None or len(vals) != int(nz.sum()) * width:
            raise ArtifactError(f"{path}: section 'values/{name}' is missing or does not match its bitmap")
        flat[torch.from_numpy(nz)] = torch.frombuffer(bytearray(vals), dtype=dtype) if vals else flat[:0]
    t = flat.reshape(shape)
    if kind == "parameter":
        table[attr] = torch.nn.Parameter(t, requires_grad=bool(entry.get("requires_grad", False))
                                         and t.is_floating_point())
    else:
        table[attr] = t
