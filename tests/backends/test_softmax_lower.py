"""softmax_lower.graphopt_softmax: float32 softmax over the last axis as graphopt's own kernel."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import graphopt
from tests.helpers import X86_TARGETS


def _special_rows(shape, seed=0):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 8
    rows = x.view(-1, shape[-1])
    rows[0, 3] = float("nan")                 # a NaN: the whole row NaN
    rows[1, 0] = float("inf")                 # +inf: the whole row NaN (inf - inf)
    rows[2, :] = float("-inf")                # a fully masked row: NaN, as PyTorch
    rows[3, 5] = float("-inf")                # one masked entry: 0 there
    rows[4, :] = 0.0                          # uniform
    rows[5, 1] = 1e30                         # one huge logit: one-hot
    return x


@pytest.mark.parametrize("target", ["x86", "x86:haswell"])
@pytest.mark.parametrize("shape", [(2, 3, 8, 37), (4, 16, 64), (6, 1), (6, 7), (6, 8), (7, 9)])
def test_softmax_matches_torch_with_special_values(target, shape):
    model = nn.Softmax(-1).eval()
    x = _special_rows(shape) if shape[-1] > 5 else torch.randn(*shape)     # rows shorter than, as long as and
    # longer than one vector of running results (softmax_te's two steps; the tail alone, none, both)
    opt = graphopt.optimize(model, target, "cleanup", example_inputs=(x,))
    got, ref = opt(x), model(x)
    assert torch.equal(torch.isnan(got), torch.isnan(ref))
    torch.testing.assert_close(got, ref, rtol=2e-5, atol=1e-7, equal_nan=True)


def test_softmax_with_a_dynamic_sequence_matches_torch():
    model = nn.Softmax(-1).eval()
    x = _special_rows((2, 4, 24, 24))
    opt = graphopt.optimize(model, "x86", "cleanup", example_inputs=(x,),
                            dynamic={"input": {2: "n", 3: "m"}, "n": (6, 40), "m": (6, 40)})
    for n, m in ((24, 24), (6, 7), (33, 40), (7, 8), (9, 13)):
        y = _special_rows((2, 4, n, m), seed=n)
        torch.testing.assert_close(opt(y), model(y), rtol=2e-5, atol=1e-7, equal_nan=True)


def test_the_pass_takes_last_axis_float32_softmax_only():
    """The last-axis float32 softmax becomes a call of graphopt's kernel (its row max a plain select, not the
    NaN-propagating maximum every other float max gets); a softmax over another axis keeps TOPI's."""
    from graphopt.backends.targets import resolve_target
    from graphopt.backends.tvm.lower import lower_graph
    from graphopt.backends.tvm.softmax_lower import graphopt_softmax
    from graphopt.capture import capture

    class Two(nn.Module):
        def forward(self, x):
            return torch.softmax(x, -1) + torch.softmax(x, 1)

    x = torch.randn(2, 5, 12)          # rows of 12: the two-step row max (shorter rows take one step)
    mod = lower_graph(capture(Two(), (x,)).gm, (x,), resolve_target("x86")).mod
    after = graphopt_softmax()(mod)
    text = after["main"].script()
    assert text.count("R.nn.softmax(") == 1 and "axis=1" in text.split("R.nn.softmax(")[1].split("\n")[0], text
    kernels = [f.script() for gv, f in after.functions_items() if gv.name_hint.startswith("softmax")]
    assert len(kernels) == 1 and "T_softmax_maxelem_lanes" in kernels[0] and "nan_propagating" not in kernels[0]
    opt = graphopt.optimize(Two().eval(), "x86", "cleanup", example_inputs=(x,))
    torch.testing.assert_close(opt(x), Two()(x), rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("length", [3, 9, 11, 12, 16, 19, 20])
@pytest.mark.parametrize("mcpu", ["haswell", "skylake-avx512"])
def test_every_read_of_the_scheduled_kernel_is_in_bounds(length, mcpu):
    """The row max and row sum take the lanes' running results, then the tail, in one Select per element: both
    sides are evaluated, so both reads must be in bounds for every element. TIR's simplifier dropped their
    clamps inside the Select (reading the last row's running results past their buffer), and LLVM may bound a
    loop by such a read: the likely cause of the dropped tail above."""
    import tvm
    from tvm import te

    from graphopt.backends.tvm.schedules import apply_default_schedules
    from graphopt.backends.tvm.softmax_lower import softmax_te
    from tests.helpers import out_of_bounds_reads

    x = te.placeholder((84, length), "float32", name="x")
    f = te.create_prim_func([x, softmax_te(x)]).with_attr("global_symbol", "main")
    target = {"kind": "llvm", "mcpu": mcpu, "num-cores": 2}
    with tvm.target.Target(target):
        mod = apply_default_schedules(tvm.IRModule({"main": f}), tvm.target.Target(target))[0]
    assert out_of_bounds_reads(mod, target) is None


@pytest.mark.parametrize("length", [3, 7, 9, 11, 12, 16, 19])
@pytest.mark.parametrize("target", X86_TARGETS)
def test_the_row_max_takes_the_tail_past_the_last_whole_vector(target, length):
    """Rows whose largest values sit past the last whole 8-float vector, the rest lower than exp's range
    (-89, -1000) below them: the max must include the tail, or exp(x - max) overflows. With the row max as a
    reduction of llvm.maxnum, LLVM's AVX-512 code dropped the tail of 11- and 12-long rows (NaN out on every
    AVX-512 target; the AVX2 build was right); the kernel's max is now a plain select."""
    x = torch.full((84, length), -89.0)
    x[:, -2], x[:, -1] = -2.9173226, 0.0
    x[1::2, : length - 2] = -1000.0
    model = nn.Softmax(-1).eval()
    opt = graphopt.optimize(model, target, example_inputs=(x,))
    got = opt(x)
    assert not got.isnan().any()
    torch.testing.assert_close(got, model(x), rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("target", X86_TARGETS)
def test_quantized_attention_over_two_vector_rows_builds_and_matches_its_graph(target):
    """The int8 attention softmax (fused with its quantize) over 16-long rows: RowGroups' first step is one
    vector per row; run as interleaved, unrolled scalar chains, the second step's sums made LLVM's SLP
    vectorizer emit IR that failed verification ("Instruction does not dominate all uses")."""
    from graphopt.models import BertStyleEncoder

    torch.manual_seed(0)
    model = BertStyleEncoder(vocab=100, hidden=32, layers=1, heads=2, ffn=64, max_len=16).eval()
    x = torch.randint(0, 100, (1, 16))
    calib = [(torch.randint(0, 100, (1, 16)),) for _ in range(2)]
    opt = graphopt.optimize(model, target, "cleanup,quantize(progress=false)", example_inputs=(x,),
                            calibration=calib)
    assert "RowGroups" in opt.report.backend["kernels"]
    with torch.no_grad():
        torch.testing.assert_close(opt(x), opt.graph_module(x), rtol=1e-3, atol=1e-3)
