"""fused_inverted_residual: 1x1 expand -> depthwise -> 1x1 project as one kernel (the wide tensor never written),
checked against PyTorch and against graphopt's unfused build."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

import graphopt

TARGET = {"kind": "llvm", "mcpu": "haswell", "num-cores": 2}      # AVX2: runs on every x86 test machine
X = ("x",)
ACTS = {"relu6": ("minimum", ("maximum", X, 0.0), 6.0), "relu": ("maximum", X, 0.0), "none": X,
        "silu": ("multiply", X, ("divide", 1.0, ("add", 1.0, ("exp", ("negative", X))))),   # as rewrite_elementwise
        "hardswish": ("divide", ("multiply", X, ("minimum", ("maximum", ("add", X, 3.0), 0.0), 6.0)), 6.0)}


def _act(x, name):
    return {"relu6": F.relu6, "relu": F.relu, "none": lambda t: t, "silu": F.silu, "hardswish": F.hardswish}[name](x)


class _Block(nn.Module):
    """An inverted residual block: expand (1x1; none with expand=False: ce == cin), depthwise k x k stride s,
    optional projection and residual."""

    def __init__(self, cin, ce, k=3, s=1, cout=None, residual=False, act1="relu6", act2="relu6", expand=True):
        super().__init__()
        self.expand = nn.Conv2d(cin, ce, 1) if expand else None
        self.dw = nn.Conv2d(ce, ce, k, s, k // 2, groups=ce)
        self.project = nn.Conv2d(ce, cout, 1) if cout else None
        self.residual, self.acts = residual, (act1, act2)

    def forward(self, x):
        e = _act(self.expand(x), self.acts[0]) if self.expand is not None else x
        d = _act(self.dw(e), self.acts[1])
        if self.project is None:
            return d
        y = self.project(d)
        return x + y if self.residual else y


def _nhwc(t):
    return np.ascontiguousarray(t.detach().permute(0, 2, 3, 1).numpy())


def _hwio(w):
    return np.ascontiguousarray(w.detach().permute(2, 3, 1, 0).numpy())


def _run_kernel(block, x, strips, lanes=8, target=TARGET):
    """The kernel for `block` built for `target` and run on `x` (NCHW): its NHWC output."""
    import tvm

    from graphopt.backends.tvm.fused_inverted_residual import inverted_residual_kernel
    from graphopt.backends.tvm.numerics import nan_propagating_minmax
    from graphopt.backends.tvm.one_task_loops import register

    n, cin, h, w = x.shape
    ce, k, s = block.dw.out_channels, block.dw.kernel_size[0], block.dw.stride[0]
    project = None if block.project is None else (block.project.out_channels, block.residual)
    expand = block.expand is not None
    f = inverted_residual_kernel(n, h, w, cin, ce, k, s, ACTS[block.acts[0]], ACTS[block.acts[1]], lanes, strips,
                                 project, expand).with_attr("global_symbol", "main")
    mod = nan_propagating_minmax()(tvm.IRModule({"main": f}))      # as build_module runs it on every kernel
    lib = tvm.tirx.build(mod, target=tvm.target.Target(target), pipeline=register())
    bias = lambda conv: conv.bias.detach().numpy().reshape(1, 1, 1, -1)      # noqa: E731
    zero = np.zeros((1, 1, 1, 1), np.float32)
    args = [_nhwc(x), _hwio(block.expand.weight) if expand else zero, bias(block.expand) if expand else zero,
            _hwio(block.dw.weight), bias(block.dw)]
    if block.project is None:
        args += [zero, zero, zero]
    else:
        args += [_hwio(block.project.weight), bias(block.project), _nhwc(x) if block.residual else zero]
    with torch.no_grad():
        out_shape = _nhwc(block(x)).shape
    out = tvm.runtime.tensor(np.zeros(out_shape, np.float32))
    lib["main"](*(tvm.runtime.tensor(a) for a in args), out)
    return lib, out.numpy()


@settings(max_examples=14, deadline=None)
@given(n=st.integers(1, 3), h=st.integers(1, 13), w=st.integers(1, 30), cin=st.sampled_from([3, 8, 16]),
       ce=st.sampled_from([8, 16, 24, 48]), k=st.sampled_from([3, 5]), s=st.sampled_from([1, 2]),
       project=st.sampled_from(["none", "plain", "residual"]), cout=st.sampled_from([8, 16, 24]),
       acts=st.sampled_from([("relu6", "relu6"), ("relu", "none"), ("none", "relu6"), ("silu", "silu"),
                             ("hardswish", "relu")]),
       strips=st.integers(1, 3), expand=st.booleans(), seed=st.integers(0, 2**16))
def test_the_kernel_matches_pytorch_over_random_shapes(n, h, w, cin, ce, k, s, project, cout, acts, strips, expand,
                                                       seed):
    """Every shape (tails of the pixel tiles, images shorter than the ring, strips without rows), stride,
    kernel size, activation, output form, with and without expand, equals PyTorch's block at float32
    rounding."""
    torch.manual_seed(seed)
    residual = project == "residual"
    if residual:
        s, cout = 1, cin if cin % 8 == 0 else 8
        cin = cout
    if not expand:
        cin = ce
        if residual:
            cout = ce
    block = _Block(cin, ce, k, s, None if project == "none" else cout, residual, *acts, expand=expand).eval()
    x = torch.randn(n, cin, h, w) * 2
    with torch.no_grad():
        ref = _nhwc(block(x))
    _, got = _run_kernel(block, x, strips)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=2e-5)


def test_special_values_as_pytorch():
    """NaN and ±inf inputs: ReLU6 keeps NaN and clamps ±inf as PyTorch's does; what they reach through the
    convolutions (NaN, ±inf, inf - inf) equals PyTorch's block."""
    torch.manual_seed(0)
    block = _Block(8, 16, 3, 1, 8, residual=True).eval()
    x = torch.randn(2, 8, 9, 23)
    x[0, 1, 4, 5] = float("nan")
    x[0, 2, 0, 0] = float("inf")
    x[1, 3, 8, 22] = float("-inf")
    with torch.no_grad():
        ref = _nhwc(block(x))
    _, got = _run_kernel(block, x, strips=2)
    assert np.isnan(ref).any() and np.isnan(got).any()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=2e-5, equal_nan=True)


def test_the_avx512_kernel_builds_with_zmm_fmas():
    """The AVX-512 form (16 lanes) is built and its FMAs are on zmm registers (not run here: the test machine
    may lack AVX-512)."""
    import tvm

    from graphopt.backends.tvm.fused_inverted_residual import inverted_residual_kernel

    f = inverted_residual_kernel(1, 24, 24, 16, 96, 3, 2, ACTS["relu6"], ACTS["relu6"], 16, 2, (32, False))
    lib = tvm.tirx.build(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}),
                         target=tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512", "num-cores": 2}))
    asm = lib.inspect_source("asm")
    assert "vfmadd231ps\t%zmm" in asm or "vfmadd231ps %zmm" in asm


@pytest.mark.parametrize("n, ho, cores, strips", [(1, 56, 2, 2), (1, 28, 2, 2), (1, 14, 2, None), (1, 7, 2, None),
                                                  (8, 7, 2, 1), (3, 28, 2, 2), (3, 7, 2, 1), (1, 56, 1, 1),
                                                  (2, 56, 4, 2), (1, 56, 4, 4), (1, 30, 4, None)])
def test_strips_keep_the_cores_busy(n, ho, cores, strips):
    """Strips per image: the fewest that spread the tasks evenly over the cores with MIN_STRIP_ROWS rows each,
    else the most with that many rows; None (unfused) when the tasks would leave a core idle."""
    from graphopt.backends.tvm.fused_inverted_residual import strips_for

    assert strips_for(n, ho, cores) == strips


@pytest.fixture
def two_cores(monkeypatch):
    """Targets resolved as for a 2-core host (the fusion decision depends on the target's core count)."""
    from graphopt.backends import targets

    monkeypatch.setattr(targets, "physical_cores", lambda: 2)


def _fused_calls(built) -> int:
    return sum(line.split()[:2][-1].startswith("inverted_residual")
               for line in built.compiled.executable.as_text().splitlines() if line.strip().startswith("call "))


def _unfused(monkeypatch):
    """graphopt with the pass switched off (the same pipeline otherwise)."""
    from graphopt.backends.tvm import fused_inverted_residual

    monkeypatch.setattr(fused_inverted_residual, "strips_for", lambda *a: None)


def test_mobilenet_v2_blocks_fuse_and_equal_the_unfused_build(monkeypatch, two_cores):
    """torchvision's MobileNetV2 at batch 2 on a 2-core target: its 17 blocks (16 expanding, the first a
    depthwise-separable pair) become one kernel each,
    and the outputs are bit for bit those of graphopt's unfused build (same sums in the same order), within
    PyTorch's float32 rounding."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(num_classes=10).eval()
    x = torch.randn(2, 3, 96, 96)
    fused = graphopt.optimize(model, "x86", "fold_bn,cleanup", example_inputs=(x,))
    assert _fused_calls(fused) == 17, fused.compiled.executable.as_text()
    assert fused.report.backend["fused"] == "17 inverted residual blocks"          # the report says so
    _unfused(monkeypatch)
    plain = graphopt.optimize(model, "x86", "fold_bn,cleanup", example_inputs=(x,))
    assert _fused_calls(plain) == 0
    assert torch.equal(fused(x), plain(x))
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-5)


class _SqueezeExcite(nn.Module):
    """An EfficientNet-style block (SiLU): the depthwise output feeds a gate and the projection."""

    def __init__(self, cin=16, ce=48, cout=24):
        super().__init__()
        self.expand, self.dw = nn.Conv2d(cin, ce, 1), nn.Conv2d(ce, ce, 3, 1, 1, groups=ce)
        self.fc1, self.fc2, self.project = nn.Conv2d(ce, 8, 1), nn.Conv2d(8, ce, 1), nn.Conv2d(ce, cout, 1)

    def forward(self, x):
        d = F.silu(self.dw(F.silu(self.expand(x))))
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(d.mean((2, 3), keepdim=True)))))
        return self.project(d * gate)


class _ExpandedTwice(nn.Module):
    """The expanded tensor has a second user: it must be written, so the block is not fused."""

    def __init__(self):
        super().__init__()
        self.block = _Block(8, 32, 3, 1, 8)

    def forward(self, x):
        e = F.relu6(self.block.expand(x))
        return self.block.project(F.relu6(self.block.dw(e))), e.sum((2, 3))


def test_a_gated_block_fuses_its_expand_and_depthwise_only(monkeypatch, two_cores):
    """With a squeeze-excitation gate between depthwise and projection, the expand and depthwise convolutions
    (SiLU: x * sigmoid(x), the pre-activation used twice) fuse, their output being the gate's and the
    multiply's input; the values are the unfused build's bit for bit and PyTorch's."""
    torch.manual_seed(0)
    model = _SqueezeExcite().eval()
    x = torch.randn(2, 16, 28, 28)
    built = graphopt.optimize(model, "x86", "fold_bn,cleanup", example_inputs=(x,))
    assert _fused_calls(built) == 1
    _unfused(monkeypatch)
    plain = graphopt.optimize(model, "x86", "fold_bn,cleanup", example_inputs=(x,))
    assert _fused_calls(plain) == 0 and torch.equal(built(x), plain(x))
    with torch.no_grad():
        torch.testing.assert_close(built(x), model(x), rtol=1e-4, atol=1e-5)


def test_hardswish_blocks_fuse_and_equal_the_unfused_build(monkeypatch, two_cores):
    """MobileNetV3's hardswish (x * relu6(x + 3) / 6, as torch.export writes it: extra clamps at ±inf) in both
    activations, with a residual: one kernel, the unfused build's values bit for bit, NaN included."""
    torch.manual_seed(0)
    model = _Block(16, 64, 5, 1, 16, residual=True, act1="hardswish", act2="hardswish").eval()
    x = torch.randn(2, 16, 28, 28) * 3
    x[1, 2, 3, 4] = float("nan")
    built = graphopt.optimize(model, "x86", "cleanup", example_inputs=(x,))
    assert _fused_calls(built) == 1
    _unfused(monkeypatch)
    plain = graphopt.optimize(model, "x86", "cleanup", example_inputs=(x,))
    got, unfused = built(x), plain(x)
    assert torch.equal(got.isnan(), unfused.isnan()) and torch.equal(got.nan_to_num(), unfused.nan_to_num())
    with torch.no_grad():
        torch.testing.assert_close(built(x), model(x), rtol=1e-4, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("model, x, fused", [(_ExpandedTwice(), torch.randn(1, 8, 24, 24), 1),
                                             (_Block(8, 32, 3, 1, 8), torch.randn(1, 8, 12, 12), 0),
                                             (_Block(8, 20, 3, 1, 8), torch.randn(2, 8, 24, 24), 0)],
                         ids=["expanded-used-twice", "one-small-image", "channels-not-whole-vectors"])
def test_blocks_fused_in_part_or_left_alone(model, x, fused, two_cores):
    """An expanded tensor with another user is written: its depthwise conv and projection still fuse (a
    depthwise-separable pair reading it); one 12 x 12 image on two cores (one task, or strips of 6 rows:
    strips_for) and 20 expanded channels (a pruned block: not whole 8-lane vectors) stay separate kernels.
    Values as PyTorch's."""
    model = model.eval()
    built = graphopt.optimize(model, "x86", "cleanup", example_inputs=(x,))
    assert _fused_calls(built) == fused
    with torch.no_grad():
        ref = model(x)
    out = built(x)
    for got, want in zip(out if isinstance(out, tuple) else (out,), ref if isinstance(ref, tuple) else (ref,)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
