"""Issue 17 item 5: Hugging Face transformers and timm models through graphopt on x86 (fp32 and int8).

Default suite: the two backend bugs the ecosystem sweep found, as plain-PyTorch models (cheap), and one
2-layer, 64-wide BERT through fp32 and int8 (skipped without transformers). Slow: every model of
benchmarks/ecosystem_coverage.py at its --tiny config and at full size, and a dynamic-shape tiny BERT.
The table form: python benchmarks/ecosystem_coverage.py
"""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import graphopt
from graphopt.analysis.compare import compare_outputs

pytest.importorskip("tvm")

_SPEC = importlib.util.spec_from_file_location(
    "ecosystem_coverage", Path(__file__).resolve().parents[1] / "benchmarks" / "ecosystem_coverage.py")
coverage = importlib.util.module_from_spec(_SPEC)
sys.modules.setdefault("ecosystem_coverage", coverage)          # its dataclasses look their module up
_SPEC.loader.exec_module(coverage)


# ------------------------------------------------------------------------ regressions found by the sweep
class PositionIds(nn.Module):
    """RoBERTa's position ids: a cumsum over the non-padding mask (TOPI's scan kernel: bare loops under the
    root block, which relax.transform.SplitLayoutRewritePreproc refused)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(40, 8)
        self.lin = nn.Linear(8, 8)                   # a repacked GEMM in the same module as the scan

    def forward(self, ids):
        mask = ids.ne(1).int()
        pos = (torch.cumsum(mask, dim=1).type_as(mask) * mask).long() + 1
        return self.lin(self.emb(pos))


def test_cumsum_kernel_builds_next_to_repacked_gemm():
    model = PositionIds().eval()
    ids = torch.tensor([[5, 7, 9, 2, 4, 1, 1, 1], [3, 1, 6, 8, 1, 2, 2, 1]])
    opt = graphopt.optimize(model, "x86", example_inputs=(ids,))
    fresh = torch.tensor([[1, 3, 4, 1, 6, 7, 1, 9], [2, 2, 2, 2, 2, 1, 1, 1]])
    with torch.no_grad():
        assert compare_outputs(opt(fresh), model(fresh)).max_rel <= 1e-5


class TensorConstant(nn.Module):
    """torch.tensor(...) inside forward, as GPT-2's attention does: torch.export lifts it to a constant read by
    aten.lift_fresh_copy, and the provenance tags graphopt put on both nodes used to clash in the re-export."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        y = self.lin(x)
        return torch.where(x > 0, y, torch.tensor(torch.finfo(x.dtype).min, dtype=x.dtype)) / torch.tensor(3.0)


def test_lifted_tensor_constant_lowers():
    model = TensorConstant().eval()
    g = torch.Generator().manual_seed(0)
    x, fresh = torch.randn(2, 8, generator=g), torch.randn(2, 8, generator=g)
    opt = graphopt.optimize(model, "x86", example_inputs=(x,), capture_method="export")
    assert opt.report.backend["capture"] == "torch.export"
    with torch.no_grad():
        assert compare_outputs(opt(fresh), model(fresh)).max_rel <= 1e-5


class CatOntoEmptyCache(nn.Module):
    """transformers' DynamicCache: each layer's keys start as torch.tensor([]) and new keys are cat'ed onto it
    along dim -2 (ATen skips an empty 1-D input beside 4-D ones; TVM's concat refused the mixed ranks)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        k = self.lin(x).view(1, 2, 4, 8)
        return torch.cat([torch.tensor([], dtype=x.dtype), k], dim=-2) * 2 + torch.cat([k, k], dim=1).sum(1, True)


def test_cat_skips_legacy_empty_tensor():
    model = CatOntoEmptyCache().eval()
    g = torch.Generator().manual_seed(0)
    x, fresh = torch.randn(8, 8, generator=g), torch.randn(8, 8, generator=g)
    opt = graphopt.optimize(model, "x86", example_inputs=(x,))
    with torch.no_grad():
        assert compare_outputs(opt(fresh), model(fresh)).max_rel <= 1e-5


class NegativeIndexOnDynamicDim(nn.Module):
    """x[[-1, 0]] on the dynamic batch dim: the negative index wraps by the run-time extent (graphopt's
    index.Tensor converter took int() of the symbolic extent: LoweringError on a dynamic tiny BERT)."""

    def forward(self, x):
        return x[torch.tensor([-1, 0, 1])] * 2


def test_negative_index_on_dynamic_dim():
    model = NegativeIndexOnDynamicDim().eval()
    opt = graphopt.optimize(model, "x86", example_inputs=(torch.randn(4, 3),), dynamic={"batch": (2, 9)})
    for batch in (2, 5, 9):
        x = torch.randn(batch, 3)
        assert torch.equal(opt(x), model(x)), batch


# ----------------------------------------------------------------------------------------- transformers
def test_main_output_wrapper_returns_the_named_field():
    pytest.importorskip("transformers")
    model, make, info = coverage.build("bert", tiny=True, seq=16)
    ids, mask = make(1)
    assert info["output"] == "last_hidden_state" and info["input"] == "input_ids 1x16 + attention_mask"
    assert mask[0, -1] == 0 and mask[0, 0] == 1                       # padded: the mask matters
    with torch.no_grad():
        direct = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        assert torch.equal(model(ids, mask), direct)
        other = mask.clone()
        other[0, -1] = 1
        assert not torch.allclose(model(ids, other)[0, :4], direct[0, :4])   # the mask reaches the attention


@pytest.mark.parametrize("which", ["fp32", "int8"])
def test_tiny_bert_matches_eager(which):
    pytest.importorskip("transformers")
    row = coverage.run_one("bert", which, tiny=True, seq=16)
    assert row["status"] == "ok", row
    assert row["capture"] == "torch.export", row       # HF models do not symbolic_trace (see the README)
    if which == "fp32":
        assert row["rel"] <= 1e-4, row
    else:
        assert row["cos"] >= 0.99 and "qlinear" in row["int8_path"], row


@pytest.mark.slow
def test_tiny_bert_dynamic_batch_and_seq():
    """One build serves batch 1-8 x seq 8-128; fp32 matches eager at three shapes with padding."""
    pytest.importorskip("transformers")
    model, make, _ = coverage.build("bert", tiny=True, seq=32)
    ids, mask = make(0)
    opt = graphopt.optimize(model, "x86", example_inputs=(ids, mask), dynamic={"batch": (1, 8), "seq": (8, 128)})
    g = torch.Generator().manual_seed(3)
    for batch, seq in [(1, 8), (3, 77), (8, 128)]:
        ids = torch.randint(3, model.model.config.vocab_size, (batch, seq), generator=g)
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[0, seq // 2:] = 0
        with torch.no_grad():
            diff = compare_outputs(opt(ids, mask), model(ids, mask))
        assert diff.max_rel <= 1e-4, (batch, seq, diff)
    with pytest.raises(graphopt.InputError, match="seq|129"):
        opt(torch.ones(1, 129, dtype=torch.long), torch.ones(1, 129, dtype=torch.long))


HF_NAMES = [n for n, s in coverage.MODELS.items() if s.source == "transformers"]


@pytest.mark.slow
@pytest.mark.parametrize("which", ["fp32", "int8"])
@pytest.mark.parametrize("name", HF_NAMES)
def test_tiny_transformers_config(name, which):
    pytest.importorskip("transformers")
    row = coverage.run_one(name, which, tiny=True)
    assert row["status"] == "ok", row


@pytest.mark.slow
@pytest.mark.parametrize("which", ["fp32", "int8"])
@pytest.mark.parametrize("name", list(coverage.MODELS))
def test_full_size_model(name, which):
    pytest.importorskip("transformers" if coverage.MODELS[name].source == "transformers" else "timm")
    row = coverage.run_one(name, which)
    assert row["status"] == "ok", row


def test_table_names_the_calibration_counts():
    """Rows calibrated on different counts (older rows carry none: 4) are named under the table."""
    def row(name, cos, calib=None):
        r = {"model": name, "run": "int8", "status": "ok", "cos": cos, "rel": 0.01, "int8_path": "path=vnni",
             "params_m": 1.0, "source": "timm"}
        return {"int8": r if calib is None else {**r, "calib": calib}}

    text = coverage.table({"a": row("a", 0.999, 32), "b": row("b", 0.995), "c": row("c", 0.998, 4)})
    assert "int8 calibrated on 4 random inputs (32: a)" in text
    assert "int8 calibrated on 32 random inputs" in coverage.table({"a": row("a", 0.999, 32)})
