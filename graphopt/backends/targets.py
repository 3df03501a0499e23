"""Target aliases -> TVM targets.

  "torch"                   no compiler: the optimized fx.GraphModule itself (reference backend)
  "x86" / "cpu" / "host"    host LLVM, with the detected CPU (`mcpu`) and physical core count
  "x86:skylake-avx512"      x86-64 with an explicit LLVM CPU name
  "arm" / "arm:<cpu>"       aarch64 Linux (NEON), e.g. "arm:cortex-a72", "arm:neoverse-n1"
  "cuda" / "cuda:sm_80"     NVIDIA GPU; the local GPU's architecture when one is present, else sm_80
  {"kind": "llvm", ...}     any explicit TVM target dict
"""
from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass, field
from typing import Any

from ..errors import GraphoptError

__all__ = ["TargetSpec", "resolve_target", "host_cpu", "physical_cores", "cuda_available", "gpu_mismatch",
           "vector_channels", "missing_instructions"]

ARM_TRIPLE = "aarch64-linux-gnu"
X86_TRIPLE = "x86_64-linux-gnu"


@dataclass(frozen=True)
class TargetSpec:
    alias: str                                  # what the user asked for, normalized
    kind: str                                   # "torch" | "llvm" | "cuda"
    arch: str = ""                              # "x86_64" | "aarch64" | "sm_80" ...
    tvm: dict = field(default_factory=dict)     # TVM target dict (host included for cuda)

    def tvm_target(self):
        import tvm

        return tvm.target.Target(self.tvm)

    @property
    def is_host(self) -> bool:
        """Whether code built for this target can run on this machine."""
        return self.unavailable_reason() is None

    def unavailable_reason(self) -> str | None:
        """Why code built for this target cannot run on this machine, in words; None when it can."""
        if self.kind == "torch":
            return None
        if self.kind == "cuda":
            if not cuda_available():
                return "no CUDA GPU is available"
            return gpu_mismatch(self.arch)
        if self.arch != platform.machine():
            return f"it was built for {self.arch or '(unknown arch)'} and this machine is {platform.machine()}"
        return None

    def key(self) -> str:
        """A stable string naming the target (for record databases and artifact checks)."""
        return json.dumps(self.tvm, sort_keys=True) if self.tvm else self.alias


def physical_cores() -> int:
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
        if n:
            return n
    except Exception:
        pass
    return os.cpu_count() or 1


def host_cpu() -> str:
    """LLVM's name of this machine's CPU (e.g. 'znver1', 'emeraldrapids'), 'generic' if unknown."""
    from tvm.target import codegen

    try:
        cpu = str(codegen.llvm_get_system_cpu())
    except Exception:
        return "generic"
    return cpu if cpu and codegen.llvm_is_valid_cpu(cpu, _host_triple()) else "generic"


# LLVM CPU features that are instruction sets (not tuning flags such as 'fast-gather' or 'slow-3ops-lea').
_ISA_PREFIXES = ("avx", "fma", "f16c", "sse", "ssse", "amx", "bmi", "popcnt", "lzcnt", "movbe", "vpclmulqdq",
                 "gfni", "vaes", "neon", "sve", "dotprod", "i8mm", "bf16", "fullfp16", "fp16fml")
_ISA_EXACT = {"egpr", "ndd", "ccmp", "nf", "zu", "cf", "ppx", "push2pop2"}     # x86 APX (extra registers)
_NOT_EMITTED = {"sse4a"}       # AMD-only; LLVM does not emit it for numeric code


def _cpu_features(tvm_dict: dict) -> set[str] | None:
    try:
        import tvm
        from tvm.target import codegen

        return set(codegen.llvm_get_cpu_features(tvm.target.Target(tvm_dict)))
    except Exception:
        return None


def missing_instructions(cpu_dict: dict) -> list[str] | None:
    """The instruction sets that code built for the LLVM target `cpu_dict` ({"kind": "llvm", "mcpu": ...}) may
    use and this machine's CPU lacks (e.g. ['avx512bw', 'avx512f', ...] for "skylake-avx512" code on an AVX2
    CPU), sorted; [] when it can run here; None when LLVM cannot tell (no mcpu, or an unknown one)."""
    mcpu = cpu_dict.get("mcpu")
    here = host_cpu()
    if not mcpu or mcpu in ("generic", here):
        return []
    host_dict = {k: v for k, v in cpu_dict.items() if k != "mattr"}
    host_dict["mcpu"] = here
    need, have = _cpu_features(cpu_dict), _cpu_features(host_dict)
    if need is None or have is None:
        return None
    return sorted(f for f in need - have
                  if (f.startswith(_ISA_PREFIXES) or f in _ISA_EXACT) and f not in _NOT_EMITTED)


def _host_triple() -> str:
    machine = platform.machine()
    return {"x86_64": X86_TRIPLE, "AMD64": X86_TRIPLE, "aarch64": ARM_TRIPLE, "arm64": ARM_TRIPLE}.get(
        machine, f"{machine}-linux-gnu")


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def gpu_mismatch(arch: str, capability: tuple[int, int] | None = None) -> str | None:
    """Why code built for CUDA `arch` ("sm_80") cannot run on a GPU of compute `capability` (default: the
    local GPU 0), or None.

    graphopt's device code is a fatbin of SASS for sm_XY (runs on major X, minor >= Y) and PTX for compute_XY
    (the driver compiles it for any capability >= X.Y): it runs on capability >= X.Y. Architecture-specific
    targets ("sm_90a") run on exactly that capability.
    """
    import re

    m = re.fullmatch(r"sm_(\d+)([a-z]?)", arch)
    if not m:
        return f"bad CUDA architecture {arch!r}"
    digits, specific = int(m.group(1)), bool(m.group(2))
    want = (digits // 10, digits % 10)
    if capability is None:
        if not cuda_available():
            return "no CUDA GPU is available"
        import torch

        capability = tuple(torch.cuda.get_device_capability(0))
    have = (int(capability[0]), int(capability[1]))
    if (specific and have != want) or have < want:
        return (f"it holds code for {arch} and this GPU is sm_{have[0]}{have[1]} "
                f"({'needs exactly' if specific else 'needs at least'} compute capability {want[0]}.{want[1]})")
    return None


def _cuda_arch_of_local_gpu() -> str | None:
    if not cuda_available():
        return None
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    return f"sm_{major}{minor}"


def resolve_target(target: Any) -> TargetSpec:
    """Turn an alias string or a TVM target dict into a TargetSpec. Unknown names raise GraphoptError."""
    if isinstance(target, TargetSpec):
        return target
    if isinstance(target, dict):
        kind = str(target.get("kind", ""))
        if kind not in ("llvm", "cuda", "c"):
            raise GraphoptError(f"unsupported TVM target kind {kind!r} in {target!r}: use llvm or cuda")
        triple = str(target.get("mtriple", _host_triple()))
        arch = triple.split("-")[0] if kind != "cuda" else str(target.get("arch", ""))
        return TargetSpec(alias=json.dumps(target, sort_keys=True), kind="cuda" if kind == "cuda" else "llvm",
                          arch=arch, tvm=dict(target))
    if not isinstance(target, str):
        raise GraphoptError(f"target must be a string alias or a TVM target dict, got {type(target).__name__}")
    name, _, sub = target.strip().partition(":")
    name = name.lower()
    if name == "torch":
        return TargetSpec("torch", "torch")
    if name in ("x86", "x86_64", "cpu", "host", "llvm"):
        if name in ("cpu", "host", "llvm") and platform.machine() in ("aarch64", "arm64"):
            return resolve_target("arm" + (":" + sub if sub else ":native"))
        cpu = sub or host_cpu()
        from tvm.target import codegen

        if not codegen.llvm_is_valid_cpu(cpu, X86_TRIPLE):
            raise GraphoptError(f"unknown x86 CPU {cpu!r} for target {target!r}")
        tvm_dict = {"kind": "llvm", "mtriple": X86_TRIPLE, "mcpu": cpu, "num-cores": physical_cores()}
        return TargetSpec(f"x86:{cpu}", "llvm", "x86_64", tvm_dict)
    if name in ("arm", "aarch64", "arm64"):
        cpu = sub or "generic"
        if cpu == "native":
            cpu = host_cpu()
        from tvm.target import codegen

        if cpu != "generic" and not codegen.llvm_is_valid_cpu(cpu, ARM_TRIPLE):
            raise GraphoptError(f"unknown aarch64 CPU {cpu!r} for target {target!r} "
                                f"(examples: cortex-a72, cortex-a76, neoverse-n1)")
        tvm_dict = {"kind": "llvm", "mtriple": ARM_TRIPLE, "mcpu": cpu, "mattr": ["+neon"]}
        return TargetSpec(f"arm:{cpu}", "llvm", "aarch64", tvm_dict)
    if name in ("cuda", "gpu", "nvidia"):
        arch = sub or _cuda_arch_of_local_gpu() or "sm_80"
        if not arch.startswith("sm_") or not arch[3:].rstrip("a").isdigit():
            raise GraphoptError(f"bad CUDA architecture {arch!r} in target {target!r}: use e.g. cuda:sm_80")
        host = resolve_target("x86" if platform.machine() in ("x86_64", "AMD64") else "arm:native")
        # Thread limits common to every CUDA GPU since sm_30: MetaSchedule's AutoBind and dlight read them
        # (without them GPU tuning stops with "missing attribute `max_threads_per_block`").
        tvm_dict = {"kind": "cuda", "arch": arch, "max_threads_per_block": 1024, "max_num_threads": 1024,
                    "thread_warp_size": 32, "max_shared_memory_per_block": 49152, "host": host.tvm}
        return TargetSpec(f"cuda:{arch}", "cuda", arch, tvm_dict)
    raise GraphoptError(f"unknown target {target!r}: use 'torch', 'x86', 'x86:<cpu>', 'arm', 'arm:<cpu>', "
                        f"'cuda', 'cuda:sm_XX' or a TVM target dict")


def vector_channels(target: Any) -> int:
    """How many float32 channels fill one vector of `target`: the channel multiple that keeps a compiled
    kernel's innermost (channel) axis in whole vectors. 16 on AVX-512 CPUs, 8 with AVX2, 4 on NEON/SSE
    (what the CPU schedules vectorize by, schedules.cpu_vector); 8 for CUDA and the torch reference."""
    spec = resolve_target(target)
    if spec.kind != "llvm":
        return 8
    from .tvm.schedules import cpu_vector

    return cpu_vector(spec.tvm_target()).lanes("float32")
