"""Artifacts: save an OptimizedModel to ONE file and load it back without recompiling.

An artifact (suffix ``.gopt`` by convention) is a zip archive holding

  graphopt.json      metadata: format version, graphopt/TVM/torch versions, target (alias + TVM dict),
                     input/output signature, pipeline text, the optimization report, capture method, and the
                     sha256 + size of the payload
  model.so           TVM targets: the compiled library (`Executable.export_library`); deflated when that
                     saves >= 10% (code, sparse and int8 weights), stored as is otherwise (dense float32 weights)
  graph_module.pt    target "torch": the optimized fx.GraphModule (torch.save)

``load(path)`` checks, in this order, and refuses with ArtifactError naming the file: missing file, not a
readable zip (not an artifact, or truncated), no/invalid metadata, a format or graphopt/TVM version this
installation cannot read, a target that cannot run on this machine (other CPU architecture, CPU features
this machine lacks, CUDA without a GPU), and a payload whose checksum does not match (corrupted). Only then is
the payload loaded; nothing is recompiled.

Security: loading an artifact runs its code (a TVM artifact is a shared library that is dlopen'ed; a torch
artifact is a pickle). Load artifacts only from a trusted source. The checksum detects corruption, not
tampering.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import shutil
import tempfile
import time
import zipfile
from typing import Any

from .errors import ArtifactError, GraphoptError
from .optimized import OptimizedModel

__all__ = ["save", "load", "read_metadata", "FORMAT", "FORMAT_VERSION", "SECURITY_NOTE"]

FORMAT = "graphopt-artifact"
FORMAT_VERSION = 1
METADATA = "graphopt.json"
LIBRARY = "model.so"
GRAPH_MODULE = "graph_module.pt"

SECURITY_NOTE = ("Loading a graphopt artifact runs the code inside it (a compiled shared library, or a "
                 "pickled GraphModule), so load artifacts only from a trusted source.")


# --------------------------------------------------------------------------------------------- helpers
def _graphopt_version() -> str:
    import graphopt

    return graphopt.__version__


def _major_minor(version: str) -> tuple[int, int]:
    parts = []
    for piece in str(version).split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    while len(parts) < 2:
        parts.append(0)
    return parts[0], parts[1]


def _compatible(saved: str, ours: str) -> bool:
    """Semantic versioning: same major, and (while major is 0) same minor."""
    s, o = _major_minor(saved), _major_minor(ours)
    return s == o if o[0] == 0 else s[0] == o[0]


def _payload_compression(payload: bytes) -> int:
    """ZIP_DEFLATED when deflate saves >= 10% on a sample of the payload, else ZIP_STORED. Dense float32
    weights barely compress (a few %), so a large dense model is stored as is (saving stays fast); the code of
    a library compresses about 2x, and in a sparse or int8 model's library the code is most of the bytes."""
    import zlib

    chunk, n = 1 << 18, 8
    if len(payload) <= chunk * n:
        sample = payload
    else:
        step = (len(payload) - chunk) // (n - 1)
        sample = b"".join(payload[i * step:i * step + chunk] for i in range(n))
    return zipfile.ZIP_DEFLATED if len(zlib.compress(sample, 1)) <= 0.9 * len(sample) else zipfile.ZIP_STORED


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _target_dict(spec) -> dict:
    return {"alias": spec.alias, "kind": spec.kind, "arch": spec.arch, "tvm": spec.tvm}


# ------------------------------------------------------------------------------------------------ save
def save(opt, path: str) -> str:
    """Write `opt` (an OptimizedModel) as one artifact file at `path`. Returns the path.

    The file is written to a temporary name beside `path` and renamed, so a failed save never leaves a
    half-written artifact. Raises ArtifactError if `opt` holds nothing that can be saved.
    """
    import torch

    path = os.fspath(path)
    spec = opt.target
    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "graphopt_version": _graphopt_version(),
        "torch_version": torch.__version__,
        "tvm_version": None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "saved_on": {"machine": platform.machine(), "python": platform.python_version()},
        "target": _target_dict(spec),
        "pipeline": str(opt.pipeline),
        "capture_method": getattr(opt, "capture_method", ""),
        "report": opt.report.to_dict() if opt.report is not None else None,
        "security": SECURITY_NOTE,
    }
    if spec.kind == "torch":
        if opt.graph_module is None:
            raise ArtifactError(f"cannot save {path}: this target='torch' model has no graph_module")
        buf = io.BytesIO()
        torch.save(opt.graph_module, buf)
        payload, name = buf.getvalue(), GRAPH_MODULE
        meta["backend"] = "torch"
    else:
        import tvm

        from .backends.tvm.runtime import CompiledModule

        compiled = opt.compiled
        if not isinstance(compiled, CompiledModule):
            raise ArtifactError(f"cannot save {path}: opt.compiled is a {type(compiled).__name__}, "
                                f"not a TVM CompiledModule")
        with tempfile.TemporaryDirectory(prefix="graphopt-save-") as tmp:
            lib_path = os.path.join(tmp, LIBRARY)
            try:
                compiled.export_library(lib_path)
            except GraphoptError as e:
                raise ArtifactError(f"cannot save {path}: {e}") from e
            with open(lib_path, "rb") as f:
                payload = f.read()
        name = LIBRARY
        meta["backend"] = "tvm"
        meta["tvm_version"] = tvm.__version__
        meta["signature"] = compiled.signature()
    meta["payload"] = {"file": name, "sha256": _sha256(payload), "size": len(payload)}

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(prefix=".graphopt-", suffix=".partial", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
            zf.writestr(METADATA, json.dumps(meta, indent=1, sort_keys=True))
            zf.writestr(name, payload, compress_type=_payload_compression(payload), compresslevel=1)
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.unlink(tmp_path)
        raise
    return path


# ------------------------------------------------------------------------------------------------ load
def read_metadata(path: str) -> dict:
    """The metadata of the artifact at `path`, checked for format and version compatibility only."""
    with _open(path) as zf:
        return _metadata(zf, path)


def _open(path: str) -> zipfile.ZipFile:
    if not os.path.exists(path):
        raise ArtifactError(f"artifact {path} does not exist")
    if os.path.isdir(path):
        raise ArtifactError(f"artifact {path} is a directory, not a graphopt artifact file")
    try:
        return zipfile.ZipFile(path, "r")
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as e:
        raise ArtifactError(f"{path} is not a graphopt artifact, or it is truncated or corrupted "
                            f"(not a readable zip archive: {e})") from e


def _read(zf: zipfile.ZipFile, name: str, path: str) -> bytes:
    try:
        return zf.read(name)
    except KeyError:
        raise ArtifactError(f"{path} is not a complete graphopt artifact: it has no '{name}'") from None
    except Exception as e:                        # bad CRC, truncated member, zlib errors
        raise ArtifactError(f"artifact {path} is corrupted: cannot read '{name}' "
                            f"({type(e).__name__}: {e})") from e


def _metadata(zf: zipfile.ZipFile, path: str) -> dict:
    if METADATA not in zf.namelist():
        raise ArtifactError(f"{path} is not a graphopt artifact: it has no '{METADATA}'")
    raw = _read(zf, METADATA, path)
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"artifact {path} has unreadable metadata '{METADATA}': {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not a graphopt artifact (metadata format is "
                            f"{meta.get('format') if isinstance(meta, dict) else type(meta).__name__!r})")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise ArtifactError(f"artifact {path} has format version {version!r}; this graphopt reads "
                            f"version {FORMAT_VERSION}: re-create it with this graphopt")
    ours = _graphopt_version()
    saved = str(meta.get("graphopt_version", ""))
    if not _compatible(saved, ours):
        raise ArtifactError(f"artifact {path} was written by graphopt {saved or '(unknown)'}, which is "
                            f"incompatible with this graphopt {ours}: re-create it with this version")
    for key in ("target", "payload", "backend"):
        if key not in meta:
            raise ArtifactError(f"artifact {path} metadata lacks '{key}'")
    if meta["backend"] == "tvm":
        import tvm

        saved_tvm = str(meta.get("tvm_version") or "")
        if not _compatible(saved_tvm, tvm.__version__):
            raise ArtifactError(f"artifact {path} was compiled with TVM {saved_tvm or '(unknown)'}, "
                                f"incompatible with the installed TVM {tvm.__version__}: re-create it")
        if "signature" not in meta:
            raise ArtifactError(f"artifact {path} metadata lacks 'signature'")
    elif meta["backend"] == "torch":
        import torch

        saved_torch = str(meta.get("torch_version") or "")
        if _major_minor(saved_torch)[0] != _major_minor(torch.__version__)[0]:
            raise ArtifactError(f"artifact {path} was saved with torch {saved_torch or '(unknown)'}, "
                                f"incompatible with the installed torch {torch.__version__}")
    else:
        raise ArtifactError(f"artifact {path} has unknown backend {meta['backend']!r}")
    return meta


def _check_runnable(spec, path: str) -> None:
    """Refuse a target whose code cannot run here: other arch, missing CPU features, CUDA without a GPU
    (or with a GPU older than the code's architecture)."""
    from .backends.targets import cuda_available
    if not spec.is_host:
        if spec.kind == "cuda":
            reason = spec.unavailable_reason() if cuda_available() else "it needs a CUDA GPU and none is available"
        else:
            reason = f"it was built for {spec.arch or '(unknown arch)'} and this machine is {platform.machine()}"
        raise ArtifactError(f"artifact {path} targets '{spec.alias}', which cannot run on this machine: {reason}")
    cpu_dict = spec.tvm.get("host") if spec.kind == "cuda" else spec.tvm
    if not isinstance(cpu_dict, dict) or cpu_dict.get("kind") != "llvm":
        return
    from .backends.targets import host_cpu, missing_instructions

    missing = missing_instructions(cpu_dict)
    if missing:
        raise ArtifactError(f"artifact {path} was compiled for CPU '{cpu_dict.get('mcpu')}', which has "
                            f"instructions this '{host_cpu()}' CPU lacks ({', '.join(missing)}): it cannot run "
                            f"here; re-create it with target='x86'")


def load(path: str):
    """Restore an OptimizedModel from an artifact written by `save`, without recompiling.

    The result's graph_module is None for TVM artifacts (the compiled library is what runs). Raises
    ArtifactError naming the file (see the module docstring for the checks). Loading runs the artifact's
    code: load artifacts only from a trusted source.
    """
    from .backends.targets import TargetSpec
    from .pipeline import Pipeline
    from .report import Report

    path = os.fspath(path)
    with _open(path) as zf:
        meta = _metadata(zf, path)
        try:
            spec = TargetSpec(**meta["target"])
        except TypeError as e:
            raise ArtifactError(f"artifact {path} has an unreadable target {meta['target']!r}: {e}") from e
        _check_runnable(spec, path)
        info = meta["payload"]
        name = info.get("file")
        expected = {"tvm": LIBRARY, "torch": GRAPH_MODULE}[meta["backend"]]
        if name != expected:
            raise ArtifactError(f"artifact {path} names payload {name!r}, expected {expected!r}")
        payload = _read(zf, name, path)
    if len(payload) != info.get("size") or _sha256(payload) != info.get("sha256"):
        raise ArtifactError(f"artifact {path} is corrupted: '{name}' ({len(payload)} bytes) does not match its "
                            f"recorded sha256/size ({info.get('size')} bytes)")

    try:
        report = Report.from_dict(meta["report"]) if meta.get("report") else Report(meta.get("pipeline", ""))
    except (TypeError, KeyError) as e:
        raise ArtifactError(f"artifact {path} has an unreadable report: {e}") from e
    report.backend["loaded_from"] = os.path.abspath(path)
    try:
        pipeline: Any = Pipeline.parse(meta.get("pipeline", ""))
    except GraphoptError:            # a pass not registered here (a user pass): keep the text
        pipeline = meta.get("pipeline", "")
    capture_method = meta.get("capture_method", "")

    if meta["backend"] == "torch":
        gm = _load_graph_module(payload, path)
        return OptimizedModel(gm, gm, report, pipeline, spec, capture_method)
    compiled = _load_library(payload, meta, spec, path)
    opt = OptimizedModel(None, compiled, report, pipeline, spec, capture_method)
    if hasattr(opt, "input_shapes"):
        opt.input_shapes = [s.shape for s in compiled.inputs]
    opt.dynamic = compiled.dynamic
    return opt


def _load_graph_module(payload: bytes, path: str):
    import torch
    from torch import fx

    try:
        gm = torch.load(io.BytesIO(payload), weights_only=False)   # a pickle: trusted sources only
    except Exception as e:
        raise ArtifactError(f"artifact {path}: cannot load its GraphModule: {type(e).__name__}: {e}") from e
    if not isinstance(gm, fx.GraphModule):
        raise ArtifactError(f"artifact {path}: '{GRAPH_MODULE}' holds a {type(gm).__name__}, not a GraphModule")
    return gm.eval()


def _load_library(payload: bytes, meta: dict, spec, path: str):
    import tvm

    from .backends.tvm.lower import TensorSpec
    from .backends.tvm.native_log import native_stderr_filtered
    from .backends.tvm.runtime import CompiledModule

    sig = meta["signature"]
    try:
        inputs = [TensorSpec.from_dict(d) for d in sig["inputs"]]
        outputs = [TensorSpec.from_dict(d) for d in sig["outputs"]]
        out_spec = str(sig["out_spec"])
        const_outputs = [int(i) for i in sig.get("const_outputs", [])]
        dynamic = None
        if sig.get("dynamic"):
            from .dynamic import DynamicSpec

            dynamic = DynamicSpec.from_dict(sig["dynamic"])
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"artifact {path} has an unreadable signature: {e}") from e
    tmp = tempfile.mkdtemp(prefix="graphopt-load-")
    try:
        lib_path = os.path.join(tmp, LIBRARY)
        with open(lib_path, "wb") as f:
            f.write(payload)
        try:
            with native_stderr_filtered():                # TVM logs "Scope Loaded:" per VM function
                lib = tvm.runtime.load_module(lib_path)   # dlopen: the library stays mapped after unlink
                return CompiledModule(lib, spec, inputs, outputs, out_spec, const_outputs, library_bytes=payload,
                                      dynamic=dynamic)
        except GraphoptError:
            raise
        except Exception as e:
            raise ArtifactError(f"artifact {path}: its library cannot be loaded: {type(e).__name__}: "
                                f"{str(e).strip().splitlines()[-1] if str(e).strip() else e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
