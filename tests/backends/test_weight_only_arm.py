"""Weight-only int8 / int4 kernels on aarch64 (NEON, 4 float32 lanes): cross-built here, run under qemu-user
through TVM RPC against the dequantized reference (the shapes of tests/quant/test_weight_only.py: ragged
groups, odd K and N, direct and panel kernels)."""
import pytest
import torch

import graphopt
from graphopt.backends.tvm import rpc
from tests.backends.conftest import needs_aarch64_runtime, needs_cross

pytest.importorskip("tvm")


@pytest.fixture(scope="module")
def arm_build():
    from tests.quant.test_weight_only import Layers, _inputs

    module, args = Layers().eval(), _inputs()
    opt = graphopt.optimize(module, target="arm:cortex-a72", pipeline=[], example_inputs=args)
    return module, args, opt


@needs_cross
def test_weight_only_kernels_build_for_aarch64_with_neon_fma(arm_build):
    from tests.quant.test_int8_paths import asm_of

    from tests.quant.test_weight_only import SHAPES

    _, _, opt = arm_build
    line = opt.report.backend["int8"]
    panels4 = sum(1 for m, _, _, bits, _ in SHAPES if bits == 4 and m > 4)
    assert "woq_linear_packed:int4 direct×3" in line and f"woq_linear_packed:int4 panel×{panels4}" in line
    asm = asm_of(opt.compiled.executable)
    assert "fmla\tv" in asm and "ucvtf\tv" in asm            # vector FMA, nibbles converted in vector lanes


@needs_cross
@needs_aarch64_runtime
def test_weight_only_kernels_run_on_aarch64_and_match_the_reference(arm_build, aarch64_server):
    from tests.quant.test_weight_only import SHAPES, _tolerance

    module, args, opt = arm_build
    with torch.no_grad():
        refs = module(*args)
    remote = rpc.load_remote(opt, rpc.connect(aarch64_server.device, timeout=120))
    for shape, layer, x, got, ref in zip(SHAPES, module.layers, args, remote(*args), refs):
        assert not ((got - ref).abs() > _tolerance(layer, x)).any(), f"{shape}: {(got - ref).abs().max():.3g}"


@needs_cross
@needs_aarch64_runtime
@pytest.mark.parametrize("target, path, instruction", [("arm:cortex-a76", "sdot", "sdot\tv"),
                                                       ("arm:cortex-a72", "cpu", "mla\tv")])
def test_w4a8_kernels_run_on_aarch64_and_match_the_reference(aarch64_server, target, path, instruction):
    """W4A8 (int4 weights x int8 activations) under qemu against the reference op (tests/quant/test_w4a8.py's
    shapes and tolerance: the integer sums are exact): sdot on cortex-a76 (+dotprod), the widening NEON
    multiply-adds on cortex-a72 (no dot product)."""
    from tests.quant.test_int8_paths import asm_of
    from tests.quant.test_w4a8 import SHAPES, Layers, _inputs, _tolerance

    module, args = Layers().eval(), _inputs()
    opt = graphopt.optimize(module, target=target, pipeline=[], example_inputs=args)
    assert f"w4a8_linear:{path}×{len(SHAPES) + 1}" in opt.report.backend["int8"]      # + the worst-case layer
    assert instruction in asm_of(opt.compiled.executable)
    with torch.no_grad():
        refs = module(*args)
    remote = rpc.load_remote(opt, rpc.connect(aarch64_server.device, timeout=120))
    for shape, layer, x, got, ref in zip([*SHAPES, "worst"], [*module.layers, module.worst], args, remote(*args),
                                         refs):
        assert not ((got.double() - ref.double()).abs() > _tolerance(layer, x)).any(), \
            f"{shape}: {(got - ref).abs().max():.3g}"
