"""Shared test helpers."""
from dataclasses import dataclass

import torch
from torch import nn

from graphopt.pipeline import Pass, PassResult, register_pass


def is_avx512_target(name: str) -> bool:
    """Whether graphopt's target `name` (e.g. "x86", "x86:haswell") compiles AVX-512 code (16 float lanes)."""
    from graphopt.backends.targets import resolve_target
    from graphopt.backends.tvm.schedules import cpu_vector

    spec = resolve_target(name)
    return spec.arch == "x86_64" and cpu_vector(spec.tvm_target()).lanes("float32") == 16


def instructions_missing_here(target: str) -> list[str]:
    """The instruction sets code built for `target` may use that this machine lacks: `target` is a graphopt
    target name ("x86:skylake-avx512") or an LLVM x86 CPU name ("skylake-avx512"). Code of another architecture,
    or for a CPU LLVM cannot place, counts as missing its whole architecture."""
    from graphopt.backends.targets import missing_instructions, resolve_target
    from graphopt.errors import GraphoptError

    try:
        spec = resolve_target(target)
    except GraphoptError:                          # not a graphopt target name: an LLVM x86 CPU name
        spec = resolve_target(f"x86:{target}")
    if not spec.is_host or spec.kind != "llvm":
        return [spec.arch or spec.kind]
    missing = missing_instructions(spec.tvm)
    return [f"(LLVM cannot tell what {spec.tvm.get('mcpu')} has)"] if missing is None else missing


def runs_here(target: str) -> bool:
    """Whether this machine can run code built for `target` (see instructions_missing_here): AVX-512 code on an
    AVX2 CPU dies of SIGILL and takes the test process with it."""
    return not instructions_missing_here(target)


def same_paths_as_host(name: str) -> bool:
    """Whether graphopt's target `name` compiles the same code paths here as the host's own target "x86": the
    same SIMD width and register count (what every schedule's tiles follow) and the same int8 path. True for
    "x86:haswell" on an AVX2 host (x86 is then e.g. znver1): a test parametrized over both names, or one that
    checks the AVX2 path next to the host's own builds, runs that code once there."""
    from graphopt.backends.targets import resolve_target
    from graphopt.backends.tvm.quant_lower import int8_path
    from graphopt.backends.tvm.schedules import cpu_vector

    host, spec = resolve_target("x86"), resolve_target(name)
    return (spec.arch == host.arch == "x86_64" and int8_path(spec) == int8_path(host)
            and cpu_vector(spec.tvm_target()) == cpu_vector(host.tvm_target()))


# The x86 targets whose code differs on this host: the host's own ("x86") and the AVX2 code path ("x86:haswell")
# unless "x86" compiles the same paths (an AVX2 host: 8 float lanes, the vpmaddubsw int8 path), where a test
# parametrized over both would run the same code twice.
X86_TARGETS = ["x86"] + [t for t in ("x86:haswell",) if not same_paths_as_host(t)]


def randomize_bn(model: torch.nn.Module) -> torch.nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters (a fresh BN is identity)."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            with torch.no_grad():
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
                    m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_(torch.rand(n, generator=g) - 0.5)
    return model


@register_pass("test_weight_noise")
@dataclass
class WeightNoise(Pass):
    """Test-only damage: multiplies every conv/linear weight by (1 + sigma * N(0, 1)), seeded."""

    sigma: float = 0.5
    seed: int = 0
    exact = False

    def run(self, gm, ctx):
        g = torch.Generator().manual_seed(self.seed)
        for m in gm.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                noise = torch.randn(m.weight.shape, generator=g) * self.sigma
                m.weight = nn.Parameter(m.weight.detach() * (1 + noise))
        return PassResult(gm)


def specials(shape, seed: int = 0) -> torch.Tensor:
    """Random values with NaN, +-Inf, -0.0 and large values spread over the tensor (big enough that the
    kernels take their vectorized paths)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3
    flat = x.view(-1)
    for i, v in enumerate((float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-40, 3e38, -3e38)):
        flat[i * 7 % flat.numel()::37] = v
    return x


def sparse_and_dense_libraries(pipeline: str, tmp_path, n: int = 512) -> dict:
    """A seeded n x n Linear through `pipeline` (its text has `{kernel}`) with kernel=sparse and kernel=dense,
    each saved: {kernel: (optimized module, input, bytes of its compiled library in the artifact)}. The
    library's size is read before the zip's deflate, which would shrink a dense build's zeros too."""
    import zipfile

    import graphopt

    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(n, n)).eval(), torch.randn(1, n)
    out = {}
    for kernel in ("sparse", "dense"):
        opt = graphopt.optimize(model, target="x86", example_inputs=(x,), pipeline=pipeline.format(kernel=kernel))
        with zipfile.ZipFile(opt.save(tmp_path / f"{kernel}.gopt")) as zf:
            out[kernel] = (opt, x, zf.getinfo("model.so").file_size)
    return out


def out_of_bounds_reads(mod, target) -> str | None:
    """None when every buffer access of the TIR kernels in `mod` (scheduled, not yet lowered) is in bounds for
    every value of its loop variables after TVM's own lowering and simplification (TVM's OOBChecker, which
    does not look at conditions: a Select evaluates both sides, so its reads must be in bounds regardless);
    else the checker's message. Accesses guarded by an `if` count too, so use shapes where those guards hold
    (graphopt.testing.bounds.eager_out_of_bounds skips them)."""
    import tvm
    import tvm.s_tir

    from graphopt.testing.bounds import lower_module

    lowered = lower_module(mod, target)
    with tvm.target.Target(target):
        try:
            tvm.s_tir.analysis.OOBChecker()(lowered)
        except Exception as e:                  # noqa: BLE001 - TVM raises its InternalError with the access
            return str(e).strip().splitlines()[-1]
    return None
