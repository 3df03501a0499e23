"""The command line: `graphopt passes`, `graphopt optimize` (the README's main job, on a small model)."""
import json
import re

from graphopt.cli import main


def test_passes_lists_contracts(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "fold_bn(" in out and "cleanup(" in out and "Fold eval-mode BatchNorm" in out


def test_optimize_small_model_prints_report_and_saves(tmp_path, capsys):
    art, rep = tmp_path / "m.gopt", tmp_path / "r.json"
    assert main(["optimize", "--model", "bert_tiny", "--target", "x86", "--repeats", "2",
                 "--output", str(art), "--json", str(rep)]) == 0
    out = capsys.readouterr().out
    assert "fold_bn" in out and "output vs eager PyTorch" in out and re.search(r"speedup over eager \d+\.\d\dx", out)
    assert art.exists() and json.loads(rep.read_text())["pipeline"] == "fold_bn,cleanup"


def test_cli_error_is_typed_and_nonzero(capsys):
    assert main(["optimize", "--model", "mlp", "--pipeline", "nosuch", "--repeats", "0"]) == 2
    assert "PipelineError" in capsys.readouterr().err
