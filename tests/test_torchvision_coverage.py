"""Issue 16 item 4: every torchvision classification model compiles for x86 with the default pipeline and
matches eager, and fold_bn,prune(ratio=0.3) runs on it (target "torch"). Hours on two cores: slow only.
The table form: python benchmarks/torchvision_coverage.py"""
import importlib.util
from pathlib import Path

import pytest

torchvision = pytest.importorskip("torchvision")

_SPEC = importlib.util.spec_from_file_location(
    "torchvision_coverage", Path(__file__).resolve().parents[1] / "benchmarks" / "torchvision_coverage.py")
coverage = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(coverage)

NAMES = torchvision.models.list_models(module=torchvision.models)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_default_pipeline_on_x86_matches_eager(name):
    row = coverage.run_one(name, "x86", rtol=1e-3)
    assert row["status"] == "ok", row


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_prune_runs_and_keeps_the_output_shape(name):
    row = coverage.run_one(name, "prune", rtol=1e-3)
    assert row["status"] == "ok", row
    assert row["flops_kept"] < 1.0, row
