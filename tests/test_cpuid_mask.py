"""scripts/as-avx2: a command run under it sees an x86-64 CPU without AVX-512 / VNNI (CPUID faulting).

What a benchmark or a test run under it relies on: PyTorch, LLVM (graphopt's "x86") and the int8 path choice
all see AVX2; the program's own SIGSEGV handlers still get real faults; exec'd children are masked too.
"""
import platform
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "as-avx2"


def _cpuid_faulting() -> bool:
    try:
        return "cpuid_fault" in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


pytestmark = [
    pytest.mark.skipif(platform.machine() != "x86_64", reason="CPUID masking is for x86-64 hosts"),
    pytest.mark.skipif(not _cpuid_faulting(), reason="this CPU or kernel has no CPUID faulting ('cpuid_fault')"),
    pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler (cc) to build scripts/cpuid_mask.c"),
]


def _run(code: str, *extra: str, env_cache: Path) -> subprocess.CompletedProcess:
    import os

    env = dict(os.environ, XDG_CACHE_HOME=str(env_cache))
    return subprocess.run([str(SCRIPT), sys.executable, *extra, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=300)


def test_torch_llvm_and_graphopt_see_an_avx2_cpu(tmp_path):
    r = _run("""
        import torch
        from graphopt.backends.targets import host_cpu, resolve_target
        from graphopt.backends.tvm.quant_lower import int8_path
        print(torch.backends.cpu.get_cpu_capability())
        print(host_cpu())
        print(int8_path(resolve_target("x86")))
        """, env_cache=tmp_path)
    assert r.returncode == 0, r.stderr
    capability, cpu, path = r.stdout.split()
    assert capability == "AVX2"
    assert cpu in ("znver1", "haswell")
    assert path == "avx2"


def test_a_real_segfault_still_reaches_pythons_faulthandler(tmp_path):
    r = _run("import ctypes; ctypes.string_at(0)", "-X", "faulthandler", env_cache=tmp_path)
    assert r.returncode == -11                       # SIGSEGV, as without the mask
    assert "Fatal Python error: Segmentation fault" in r.stderr
    assert "string_at" in r.stderr                   # faulthandler's traceback of the faulting call


def test_children_started_with_exec_are_masked_too(tmp_path):
    # numpy reads CPUID at import (and imports in a tenth of torch's time)
    probe = "from numpy._core._multiarray_umath import __cpu_features__ as f; print(f['AVX2'], f['AVX512F'])"
    r = _run(f"""
        import subprocess, sys
        print(subprocess.run([sys.executable, "-c", {probe!r}], capture_output=True, text=True,
                             check=True).stdout.strip())
        """, env_cache=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "False"]


def _host_has_avx512() -> bool:
    try:
        return "avx512f" in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


@pytest.mark.skipif(not _host_has_avx512(), reason="this host is an AVX2 machine already: the suite ran on one")
def test_host_dependent_tests_pass_on_an_avx2_cpu_view(tmp_path):
    """The tests whose branches depend on the host CPU (which int8 kernels can run here, whether an artifact
    built for another CPU runs here) run again in a process that sees an AVX2 CPU, so an AVX-512 CI machine
    also checks what an AVX2 one would run (the whole suite under scripts/as-avx2 is in the README)."""
    import os

    root = SCRIPT.parents[1]
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    r = subprocess.run([str(SCRIPT), sys.executable, "-m", "pytest", "-q", "-rs", "-x", "-p", "no:cacheprovider",
                        "-p", "no:randomly", "-n", "0", "tests/quant/test_int8_paths.py",
                        "tests/test_artifact.py"], cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "has no avx512bw" in r.stdout          # it did see an AVX2 CPU: the AVX-512-only cases skip there
