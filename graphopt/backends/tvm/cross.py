"""Cross compilation for aarch64 and execution of aarch64 code under qemu-user.

Building for "arm" happens on this machine: TVM's LLVM emits aarch64 object code for the target
(`mtriple=aarch64-linux-gnu`, the requested `mcpu`, `+neon`), and a cross linker turns it into a shared
library. What each function here does:

  find_cross_cxx()      the aarch64 C++ cross compiler (Debian's g++-aarch64-linux-gnu), or None
  cross_fcompile()      an `fcompile` for Executable.export_library that links with it (BuildError if absent)
  export_options(spec)  the export_library keyword arguments for a CPU target of another architecture
  ms_export_aarch64     a MetaSchedule builder `f_export` that links tuning candidates for aarch64
  elf_machine(path)     the architecture an ELF file was built for ("aarch64", "x86_64", ...)
  find_aarch64_runtime()  an aarch64 Python with TVM's runtime, runnable here: natively on an aarch64 host, or
                        under qemu-user (installed by scripts/setup_cross.sh), or None
  missing_for_qemu()    what is missing for that, in words (for test skip reasons and error messages)

Environment overrides: GRAPHOPT_AARCH64_CXX (cross compiler), GRAPHOPT_AARCH64_ROOT (the runtime that
scripts/setup_cross.sh installs; default ~/.cache/graphopt/aarch64-runtime), GRAPHOPT_QEMU_AARCH64 (qemu).
Nothing here imports TVM at module import time.
"""
from __future__ import annotations

import os
import platform
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import BuildError
from ..targets import ARM_TRIPLE, TargetSpec

__all__ = ["find_cross_cxx", "cross_fcompile", "export_options", "ms_export_aarch64", "elf_machine",
           "PythonRuntime", "find_aarch64_runtime", "find_qemu", "runtime_root", "missing_for_qemu",
           "SETUP_HINT"]

SETUP_HINT = "run scripts/setup_cross.sh (apt: g++-aarch64-linux-gnu qemu-user-static, plus an aarch64 TVM runtime)"
_CXX_NAMES = ("aarch64-linux-gnu-g++", "aarch64-linux-gnu-g++-12", "aarch64-linux-gnu-g++-13",
              "aarch64-linux-gnu-g++-14")
_ELF_MACHINES = {3: "x86", 40: "arm", 62: "x86_64", 183: "aarch64", 190: "cuda", 243: "riscv"}


def _is_aarch64_host() -> bool:
    return platform.machine() in ("aarch64", "arm64")


# --------------------------------------------------------------------------------------- cross compiler
def find_cross_cxx() -> str | None:
    """Path of a C++ compiler that links aarch64 Linux shared libraries, or None.

    GRAPHOPT_AARCH64_CXX wins when set (None if it names nothing runnable); on an aarch64 host the native
    g++/c++ serves; otherwise the first of aarch64-linux-gnu-g++[-12|-13|-14] on PATH.
    """
    override = os.environ.get("GRAPHOPT_AARCH64_CXX")
    if override:
        return shutil.which(override)
    if _is_aarch64_host():
        return shutil.which("g++") or shutil.which("c++")
    for name in _CXX_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def cross_fcompile():
    """An `fcompile` for `export_library` that links aarch64 shared libraries (TVM's cc.create_shared).

    Raises BuildError naming what to install when no cross compiler is found.
    """
    cxx = find_cross_cxx()
    if cxx is None:
        wanted = os.environ.get("GRAPHOPT_AARCH64_CXX") or "aarch64-linux-gnu-g++"
        raise BuildError(f"cannot link an aarch64 library: no cross compiler '{wanted}' found on PATH; "
                         f"install Debian's g++-aarch64-linux-gnu ({SETUP_HINT}) or set GRAPHOPT_AARCH64_CXX")
    from tvm.support import cc

    def fcompile(output, objects, options=None):
        # A fresh options list per call (tvm's cross_compiler() appends to one shared list across calls).
        cc.create_shared(output, objects, options=list(options or []), cc=cxx)

    fcompile.output_format = "so"
    fcompile.get_target_triple = lambda: ARM_TRIPLE
    fcompile.compiler = cxx
    return fcompile


def export_options(spec: TargetSpec) -> dict:
    """export_library keyword arguments for a CPU `spec` whose architecture is not this machine's."""
    if spec.kind == "llvm" and spec.arch == "aarch64":
        return {"fcompile": cross_fcompile()}
    raise BuildError(f"cannot export a library for '{spec.alias}' ({spec.arch}) on this {platform.machine()} "
                     f"machine: graphopt cross-links only for aarch64")


def ms_export_aarch64(mod) -> str:
    """MetaSchedule builder `f_export`: link a built candidate as an aarch64 .so; returns its path.

    (MetaSchedule's default exports a .tar of objects, which the RPC server would have to link with a compiler
    on the device; linking here needs none there.)
    """
    path = os.path.join(tempfile.mkdtemp(prefix="graphopt-ms-"), "candidate.so")
    mod.export_library(path, fcompile=cross_fcompile())
    return path


def elf_machine(path_or_bytes) -> str | None:
    """The machine an ELF file targets ('aarch64', 'x86_64', 'cuda', ...), None if it is not ELF."""
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        head = bytes(path_or_bytes[:20])
    else:
        with open(path_or_bytes, "rb") as f:
            head = f.read(20)
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return None
    endian = "<" if head[5] == 1 else ">"
    (machine,) = struct.unpack_from(endian + "H", head, 18)
    return _ELF_MACHINES.get(machine, f"elf-machine-{machine}")


# -------------------------------------------------------------------------------------- aarch64 runtime
def runtime_root() -> Path:
    """Where scripts/setup_cross.sh installs the aarch64 runtime."""
    root = os.environ.get("GRAPHOPT_AARCH64_ROOT")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "graphopt" / "aarch64-runtime"


def find_qemu() -> str | None:
    """qemu-user for aarch64 (GRAPHOPT_QEMU_AARCH64, qemu-aarch64-static or qemu-aarch64), or None."""
    override = os.environ.get("GRAPHOPT_QEMU_AARCH64")
    if override:
        return shutil.which(override)
    return shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")


@dataclass(frozen=True)
class PythonRuntime:
    """A Python interpreter with TVM's runtime importable: an aarch64 one (find_aarch64_runtime), or this
    machine's own (rpc.LocalServer).

    python:   the command that starts it (the qemu wrapper of scripts/setup_cross.sh, or the host python)
    emulated: True under qemu-user (slow: ~5-15x), False when it runs natively
    env:      extra environment for it
    """

    python: str
    emulated: bool
    env: dict = field(default_factory=dict)

    def command(self, *args: str) -> list[str]:
        return [self.python, *args]

    def environ(self) -> dict:
        env = dict(os.environ)
        env.update(self.env)
        return env

    def run(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """Run the interpreter with `args`; returns the completed process (text output)."""
        return subprocess.run(self.command(*args), env=self.environ(), capture_output=True, text=True,
                              timeout=timeout)


def missing_for_qemu() -> list[str]:
    """What this machine lacks to run aarch64 code with TVM (empty when find_aarch64_runtime() works)."""
    if _is_aarch64_host():
        try:
            import tvm  # noqa: F401
        except Exception as e:          # pragma: no cover - aarch64 hosts only
            return [f"TVM on this aarch64 host ({type(e).__name__}: {e})"]
        return []
    missing = []
    if find_qemu() is None:
        missing.append("qemu-user for aarch64 (qemu-aarch64-static / qemu-aarch64; Debian: qemu-user-static)")
    wrapper = runtime_root() / "bin" / "python3"
    if not os.access(wrapper, os.X_OK):
        missing.append(f"the aarch64 TVM runtime ({wrapper} does not exist)")
    return missing


def find_aarch64_runtime() -> PythonRuntime | None:
    """The aarch64 Python with TVM's runtime on this machine, or None (see missing_for_qemu() for why)."""
    if _is_aarch64_host():
        import sys

        return None if missing_for_qemu() else PythonRuntime(sys.executable, emulated=False)
    if missing_for_qemu():
        return None
    env = {}
    if os.environ.get("GRAPHOPT_QEMU_AARCH64"):
        env["GRAPHOPT_QEMU_AARCH64"] = find_qemu() or ""
    return PythonRuntime(str(runtime_root() / "bin" / "python3"), emulated=True, env=env)
