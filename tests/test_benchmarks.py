"""Smoke test of the peer benchmark (benchmarks/run.py): it runs, measures, and writes complete JSON."""
import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_run_py_measures_mlp_against_eager(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--models", "mlp", "--batches", "1",
           "--variants", "eager,graphopt,nonsense"]
    bad = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "unknown variant" in bad.stderr
    cmd[-1] = "eager,graphopt"
    out = subprocess.run(cmd + ["--rounds", "1", "--calls", "2", "--out", str(tmp_path)], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    data = json.loads((tmp_path / "run.json").read_text())
    assert data["machine"]["peak_gflops"] > 0 and data["machine"]["threads"] >= 1
    (res,) = data["results"]
    assert res["model"] == "mlp" and res["gflop"] > 0
    assert set(res["variants"]) == {"eager", "graphopt"}
    for name, v in res["variants"].items():
        assert "error" not in v, (name, v)
        assert math.isfinite(v["median_ms"]) and v["median_ms"] > 0
        assert v["rel_diff"] < 1e-3
        assert math.isclose(v["ratio_to"]["eager"], v["median_ms"] / res["variants"]["eager"]["median_ms"])
    assert "mlp batch 1" in out.stdout and "x eager" in out.stdout
