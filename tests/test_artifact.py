"""Artifacts: save/load round trips without recompiling, and every damaged artifact refused by name."""
from __future__ import annotations

import hashlib
import json
import os
import time
import zipfile

import pytest
import torch
from torch import nn

import graphopt
from graphopt import artifact
from graphopt.errors import ArtifactError, InputError
from tests.helpers import randomize_bn

tvm = pytest.importorskip("tvm")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x, scale):
        h = torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))
        return self.fc(h) * scale, h


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    torch.manual_seed(0)
    model = randomize_bn(Net()).eval()
    inputs = (torch.randn(2, 3, 12, 12), torch.randn(2, 4))
    start = time.perf_counter()
    opt = graphopt.optimize(model, target="x86", pipeline="", example_inputs=inputs)
    compile_s = time.perf_counter() - start
    path = str(tmp_path_factory.mktemp("artifacts") / "net.gopt")
    assert opt.save(path) == path
    return model, inputs, opt, path, compile_s


def _rewrite(src: str, dst: str, *, member: str | None = None, data=None, meta=None) -> str:
    """Copy the artifact zip `src` to `dst`, replacing one member's bytes or editing the metadata dict."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            raw = zin.read(info.filename)
            if info.filename == member:
                raw = data(raw) if callable(data) else data
            if info.filename == artifact.METADATA and meta is not None:
                d = json.loads(raw)
                meta(d)
                raw = json.dumps(d).encode()
            zout.writestr(info.filename, raw)
    return dst


def _refused(path: str, match: str):
    with pytest.raises(ArtifactError, match=match) as info:
        graphopt.load(path)
    assert os.fspath(path) in str(info.value)          # every refusal names the file
    return info.value


# ------------------------------------------------------------------------------------------- round trip
def test_round_trip_gives_identical_outputs_without_recompiling(built, monkeypatch):
    model, inputs, opt, path, compile_s = built
    import graphopt.backends.tvm as backend
    import graphopt.backends.tvm.build as build

    def no_compile(*a, **k):
        raise AssertionError("load() must not lower or build")

    for owner, name in ((tvm, "compile"), (tvm.relax, "build"), (build, "build_module"), (build, "_schedule"),
                        (backend, "compile_graph"), (backend, "lower_graph")):
        monkeypatch.setattr(owner, name, no_compile)
    start = time.perf_counter()
    loaded = graphopt.load(path)
    load_s = time.perf_counter() - start
    assert load_s < compile_s                          # loading a library is cheaper than building one
    assert loaded.graph_module is None                 # the compiled library is what runs
    assert loaded.target == opt.target
    assert str(loaded.pipeline) == str(opt.pipeline)
    assert loaded.capture_method == opt.capture_method
    assert [r.name for r in loaded.report.records] == [r.name for r in opt.report.records]
    assert loaded.report.backend["build_s"] == opt.report.backend["build_s"]
    got, want = loaded(*inputs), opt(*inputs)
    assert isinstance(got, tuple) and len(got) == 2
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    other = (torch.randn(2, 3, 12, 12), torch.randn(2, 4))
    assert all(torch.equal(a, b) for a, b in zip(loaded(*other), opt(*other)))
    with pytest.raises(InputError, match="input 0: expected shape"):   # the signature survives the trip
        loaded(torch.randn(1, 3, 12, 12), inputs[1])


def test_loaded_artifact_runs_the_saved_library(built, tmp_path):
    _, inputs, _, path, _ = built
    with zipfile.ZipFile(path) as zf:
        saved_lib = zf.read(artifact.LIBRARY)
        meta = json.loads(zf.read(artifact.METADATA))
    assert meta["payload"]["sha256"] == hashlib.sha256(saved_lib).hexdigest()
    loaded = graphopt.load(path)
    assert loaded.compiled.library_bytes == saved_lib
    # saving a loaded model again copies the library: same bytes, same checksum, same outputs
    again = loaded.save(str(tmp_path / "again.gopt"))
    with zipfile.ZipFile(again) as zf:
        assert zf.read(artifact.LIBRARY) == saved_lib
    reloaded = graphopt.load(again)
    assert all(torch.equal(a, b) for a, b in zip(reloaded(*inputs), loaded(*inputs)))


def test_saved_library_has_no_debug_sections(built):
    """The library is linked without the DWARF sections TVM's LLVM codegen emits (they were a fifth of a small
    sparse int8 model's artifact): the section-name table lists no .debug_* section, and the code runs."""
    _, _, _, path, _ = built
    with zipfile.ZipFile(path) as zf:
        lib = zf.read(artifact.LIBRARY)
    assert lib[:4] == b"\x7fELF"
    assert b".debug_info" not in lib and b".debug_loc" not in lib and b".text" in lib


def test_metadata_holds_versions_target_signature_and_report(built):
    _, _, opt, path, _ = built
    meta = artifact.read_metadata(path)
    assert meta["format"] == artifact.FORMAT and meta["format_version"] == artifact.FORMAT_VERSION
    assert meta["graphopt_version"] == graphopt.__version__
    assert meta["tvm_version"] == tvm.__version__ and meta["torch_version"] == torch.__version__
    assert meta["target"] == {"alias": opt.target.alias, "kind": "llvm", "arch": opt.target.arch,
                              "tvm": opt.target.tvm}
    assert meta["signature"]["inputs"] == [{"shape": [2, 3, 12, 12], "dtype": "float32"},
                                           {"shape": [2, 4], "dtype": "float32"}]
    assert meta["report"] == json.loads(opt.report.to_json())
    assert meta["capture_method"] == "symbolic_trace" and meta["pipeline"] == ""
    assert "trusted source" in meta["security"]


def test_torch_target_round_trip(tmp_path):
    model = randomize_bn(Net()).eval()
    inputs = (torch.randn(2, 3, 12, 12), torch.randn(2, 4))
    opt = graphopt.optimize(model, target="torch", example_inputs=inputs)
    path = opt.save(str(tmp_path / "net-torch.gopt"))
    loaded = graphopt.load(path)
    assert loaded.graph_module is not None and loaded.compiled is loaded.graph_module
    assert str(loaded.pipeline) == str(opt.pipeline)
    assert all(torch.equal(a, b) for a, b in zip(loaded(*inputs), opt(*inputs)))
    with zipfile.ZipFile(path) as zf:
        assert artifact.GRAPH_MODULE in zf.namelist() and artifact.LIBRARY not in zf.namelist()


def test_save_is_atomic_and_leaves_no_partial_files(built, tmp_path):
    _, _, opt, _, _ = built
    target = tmp_path / "sub" / "model.gopt"
    opt.save(str(target))
    assert sorted(os.listdir(target.parent)) == ["model.gopt"]


# ---------------------------------------------------------------------------------------------- refusals
def test_missing_file(tmp_path):
    _refused(str(tmp_path / "nope.gopt"), "does not exist")


def test_directory(tmp_path):
    _refused(str(tmp_path), "is a directory")


def test_not_an_artifact(tmp_path):
    p = tmp_path / "notes.gopt"
    p.write_text("just some text, not a zip")
    _refused(str(p), "not a graphopt artifact")


def test_zip_without_metadata(tmp_path):
    p = str(tmp_path / "plain.zip")
    with zipfile.ZipFile(p, "w") as zf:
        zf.writestr("hello.txt", "hi")
    _refused(p, "not a graphopt artifact: it has no 'graphopt.json'")


def test_truncated_zip(built, tmp_path):
    _, _, _, path, _ = built
    data = open(path, "rb").read()
    for keep in (len(data) // 2, len(data) - 10):
        p = tmp_path / f"cut{keep}.gopt"
        p.write_bytes(data[:keep])
        _refused(str(p), "truncated or corrupted")


def test_corrupted_library_fails_the_checksum(built, tmp_path):
    _, _, _, path, _ = built

    def flip(raw: bytes) -> bytes:
        mid = len(raw) // 2
        return raw[:mid] + bytes([raw[mid] ^ 0xFF]) + raw[mid + 1:]

    p = _rewrite(path, str(tmp_path / "flipped.gopt"), member=artifact.LIBRARY, data=flip)
    _refused(p, "corrupted: 'model.so'.*sha256")
    p = _rewrite(path, str(tmp_path / "short.gopt"), member=artifact.LIBRARY, data=lambda raw: raw[:-100])
    _refused(p, "corrupted")


def test_bytes_damaged_inside_the_zip(built, tmp_path):
    """Damage the stored (compressed) library bytes in place: zip's CRC or inflate catches it."""
    _, _, _, path, _ = built
    data = bytearray(open(path, "rb").read())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(artifact.LIBRARY)
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    for i in range(start + 100, start + 164):
        data[i] ^= 0x5A
    p = tmp_path / "damaged.gopt"
    p.write_bytes(bytes(data))
    _refused(str(p), "corrupted")


def test_unreadable_metadata(built, tmp_path):
    _, _, _, path, _ = built
    p = _rewrite(path, str(tmp_path / "badjson.gopt"), member=artifact.METADATA, data=b"{not json")
    _refused(p, "unreadable metadata")


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.update(format="something-else"), "not a graphopt artifact"),
    (lambda m: m.update(format_version=99), "format version 99"),
    (lambda m: m.update(graphopt_version="9.0.0"), "graphopt 9.0.0, which is incompatible"),
    (lambda m: m.update(tvm_version="0.19.0"), "compiled with TVM 0.19.0"),
    (lambda m: m.pop("signature"), "lacks 'signature'"),
    (lambda m: m["payload"].update(file="other.so"), "payload 'other.so'"),
])
def test_incompatible_metadata(built, tmp_path, edit, match):
    _, _, _, path, _ = built
    _refused(_rewrite(path, str(tmp_path / "edited.gopt"), meta=edit), match)


def test_foreign_architecture_is_refused(built, tmp_path):
    _, _, _, path, _ = built
    import platform

    arch = "x86_64" if platform.machine() in ("aarch64", "arm64") else "aarch64"

    def to_foreign(m):
        m["target"].update(alias=f"{arch}:generic", arch=arch)
        m["target"]["tvm"].update(mtriple=f"{arch}-linux-gnu", mcpu="generic")

    p = _rewrite(path, str(tmp_path / "foreign.gopt"), meta=to_foreign)
    _refused(p, f"cannot run on this machine: it was built for {arch}")


def test_cuda_artifact_without_gpu_is_refused(built, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    _, _, opt, path, _ = built

    def to_cuda(m):
        m["target"] = {"alias": "cuda:sm_80", "kind": "cuda", "arch": "sm_80",
                       "tvm": {"kind": "cuda", "arch": "sm_80", "host": opt.target.tvm}}

    _refused(_rewrite(path, str(tmp_path / "cuda.gopt"), meta=to_cuda), "needs a CUDA GPU")


def test_cpu_with_instructions_this_machine_lacks_is_refused(built, tmp_path):
    from tvm.target import codegen

    from graphopt.backends.targets import X86_TRIPLE, host_cpu

    _, _, opt, path, _ = built
    if opt.target.arch != "x86_64":
        pytest.skip("x86 only")
    here = set(codegen.llvm_get_cpu_features(tvm.target.Target(
        {"kind": "llvm", "mtriple": X86_TRIPLE, "mcpu": host_cpu()})))
    candidate = None
    for cpu in ("diamondrapids", "graniterapids", "sapphirerapids", "znver5", "znver4", "skylake-avx512"):
        if not codegen.llvm_is_valid_cpu(cpu, X86_TRIPLE):
            continue
        need = codegen.llvm_get_cpu_features(tvm.target.Target({"kind": "llvm", "mtriple": X86_TRIPLE,
                                                                "mcpu": cpu}))
        if any(f.startswith(("avx512", "amx", "avx10")) for f in set(need) - here):
            candidate = cpu
            break
    if candidate is None:
        pytest.skip("this CPU has every feature of the candidate CPUs")
    p = _rewrite(path, str(tmp_path / "newer-cpu.gopt"),
                 meta=lambda m: m["target"]["tvm"].update(mcpu=candidate))
    _refused(p, f"compiled for CPU '{candidate}', which has instructions")


def test_save_refuses_a_foreign_target_without_cross_compiler(tmp_path, monkeypatch):
    import platform

    if platform.machine() in ("aarch64", "arm64"):
        pytest.skip("this machine is aarch64")
    monkeypatch.setenv("GRAPHOPT_AARCH64_CXX", "graphopt-no-such-aarch64-g++")   # as if none were installed
    model = nn.Sequential(nn.Linear(4, 3)).eval()
    opt = graphopt.optimize(model, target="arm:cortex-a72", pipeline="", example_inputs=(torch.randn(2, 4),))
    path = str(tmp_path / "arm.gopt")
    with pytest.raises(ArtifactError, match="no cross compiler"):
        opt.save(path)
    assert not os.path.exists(path) and os.listdir(tmp_path) == []


def test_missing_instructions_names_the_instruction_sets_not_the_tuning_flags(monkeypatch):
    """What refuses an artifact (and what the tests check before running code built for a fixed CPU): the
    instruction sets the code's CPU has and this one lacks; LLVM's tuning flags (e.g. 'fast-gather') are not
    instructions. Decided against a stand-in host CPU, so the answer does not depend on this machine."""
    import graphopt.backends.targets as targets
    from tests.helpers import runs_here

    monkeypatch.setattr(targets, "host_cpu", lambda: "haswell")
    missing = targets.missing_instructions({"kind": "llvm", "mtriple": targets.X86_TRIPLE, "mcpu": "skylake-avx512"})
    assert {"avx512f", "avx512bw", "avx512vl"} <= set(missing)
    assert all(f.startswith(("avx", "sse", "fma", "bmi", "f16c", "popcnt", "lzcnt", "movbe")) for f in missing)
    assert "fast-gather" not in missing
    for older in ("haswell", "x86-64", "nehalem"):
        assert targets.missing_instructions({"kind": "llvm", "mtriple": targets.X86_TRIPLE, "mcpu": older}) == []
    assert not runs_here("x86:skylake-avx512") and not runs_here("cascadelake") and runs_here("x86:haswell")
    monkeypatch.setattr(targets, "host_cpu", lambda: "skylake-avx512")
    assert runs_here("skylake-avx512") and runs_here("haswell") and not runs_here("x86:icelake-server")
