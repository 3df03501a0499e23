"""Smoke test of the peer benchmark (benchmarks/run.py): it runs every peer, measures, and writes complete JSON;
a failing variant is reported and the run goes on."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--config", "", "--models", "mlp", "--batches", "1",
       "--tune", "0", "--rounds", "2", "--calls", "2", "--budget", "5", "--peak-size", "512"]
# --peak-size 512: the peak GEMMs (measured at the start and before each case, numpy and torch, 6 each) at 2048
# cost ~8 s of CPU per run here; the tests check that a peak is measured and used, not its value.
# A user's environment: tests/conftest.py sets TVM_NUM_THREADS=1 for the test process; the benchmark picks its own.
ENV = {k: v for k, v in os.environ.items() if k != "TVM_NUM_THREADS"}


def _finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_run_py_rejects_unknown_variant():
    bad = subprocess.run(RUN + ["--variants", "eager,nonsense"], env=ENV, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "unknown variant" in bad.stderr


@pytest.mark.slow        # suite time (issue 16): torch.compile's compile and four peers' timing rounds (~14 s); the failing-variant test below runs run.py by default
def test_run_py_measures_mlp_against_every_peer(tmp_path):
    variants = ["graphopt", "eager", "torch.compile", "ort"]    # all but graphopt-tuned (--tune 0)
    out = subprocess.run(RUN + ["--variants", ",".join(variants), "--out", str(tmp_path)], env=ENV, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    data = json.loads((tmp_path / "run.json").read_text())
    machine = data["machine"]
    assert _finite_positive(machine["peak_gflops"]) and machine["threads"] >= 1
    assert machine["thread_settings"]["tvm"] == machine["thread_settings"]["torch"] == machine["threads"]
    (res,) = data["results"]
    assert res["model"] == "mlp" and res["batch"] == 1 and _finite_positive(res["gflop"])
    assert res["skipped"] == {}                     # graphopt-tuned was not asked for
    assert list(res["variants"]) == variants
    for name, v in res["variants"].items():
        assert v["status"] == "ok" and "error" not in v, (name, v)
        for key in ("median_ms", "p10_ms", "p90_ms", "gflops", "pct_peak"):
            assert _finite_positive(v[key]), (name, key, v[key])
        assert v["p10_ms"] <= v["median_ms"] <= v["p90_ms"]
        assert set(v["ratio_to"]) == {"eager", "torch.compile", "ort"}
        assert v["compile_s"] >= 0 and (name == "eager" or _finite_positive(v["compile_s"]))
        for peer, r in v["ratio_to"].items():
            assert _finite_positive(r)
            assert math.isclose(r, v["median_ms"] / res["variants"][peer]["median_ms"])
        assert v["rel_diff"] < 1e-3 and not v["flagged"]
        assert math.isclose(v["gflops"], res["flops"] / (v["median_ms"] / 1e3) / 1e9)
    assert res["variants"]["eager"]["ratio_to"]["eager"] == 1.0
    assert "graphopt peer benchmark" in out.stdout and "machine peak (measured now)" in out.stdout


def test_run_py_reports_a_failing_variant_and_goes_on(tmp_path):
    out = subprocess.run(RUN + ["--variants", "graphopt,eager", "--pipeline", "no_such_pass", "--out",
                                str(tmp_path)], env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    (res,) = json.loads((tmp_path / "run.json").read_text())["results"]
    failed, eager = res["variants"]["graphopt"], res["variants"]["eager"]
    assert failed["status"] == "failed" and "no_such_pass" in failed["error"]
    assert "\n" not in failed["error"]
    assert eager["status"] == "ok" and _finite_positive(eager["median_ms"])
    assert "FAILED" in out.stdout


@pytest.mark.slow
def test_run_py_tuned_variant_reports_tuning_then_reuses_records(tmp_path):
    """--tune N: the first run measures new trials into the record database, the second reuses them."""
    db = tmp_path / "records"
    cmd = RUN[:RUN.index("--tune")] + ["--tune", "4", "--database", str(db), "--variants", "graphopt-tuned,eager",
                                        "--rounds", "2", "--calls", "2", "--budget", "5"]
    runs = []
    for i in range(2):
        out = subprocess.run(cmd + ["--out", str(tmp_path / str(i))], env=ENV, capture_output=True, text=True,
                             timeout=900)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        (res,) = json.loads((tmp_path / str(i) / "run.json").read_text())["results"]
        runs.append(res["variants"]["graphopt-tuned"])
    first, second = runs
    for v in runs:
        assert v["status"] == "ok", v
        assert _finite_positive(v["median_ms"]) and _finite_positive(v["ratio_to"]["eager"])
        assert v["tuning"]["database"] == str(db) or v["tuning"]["database"].startswith(str(db))
        assert v["rel_diff"] < 1e-3
    assert first["new_trials"] > 0 and _finite_positive(first["tuning_s"])
    assert second["new_trials"] == 0 and second["reused_records"] >= first["new_trials"]


def test_isa_peak_measures_the_int8_paths_this_cpu_runs(monkeypatch):
    """benchmarks/isa_peak.py (the int8 ceiling bench_quantize prints, the int4 one bench_weight_only prints): a
    positive rate for every int8 and int4 weight-only path whose instructions this CPU has (avx2 on any x86
    graphopt supports; the 512-bit ones where AVX-512 is), none for the others; a typed answer, not a crash,
    without a C compiler. Rates are not checked (no timing here)."""
    import platform

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import isa_peak

    if platform.machine() != "x86_64":
        assert "error" in isa_peak.measure(rounds=1, iters=1000)
        return
    from tests.helpers import runs_here

    m = isa_peak.measure(rounds=1, iters=200_000)
    paths = {p["path"]: p for p in m["paths"]}
    assert "avx2" in paths
    assert ("avx512bw" in paths) == runs_here("skylake-avx512") and ("vnni" in paths) == runs_here("cascadelake")
    for p in paths.values():
        assert _finite_positive(p["int8"]) and _finite_positive(p["fp32"]) and _finite_positive(p["ratio"])
    assert isa_peak.summary(m).startswith("int8 ceiling, path avx2:")
    int4 = {p["path"]: p for p in m["int4"]}         # the int4 weight-only GEMV's step, per path
    assert "avx2" in int4 and ("avx512" in int4) == runs_here("skylake-avx512")
    from graphopt.backends.targets import resolve_target
    from graphopt.backends.tvm.woq4_bf16 import has_avx512bf16

    assert ("avx512bf16" in int4) == has_avx512bf16(resolve_target("x86"))     # the precision="high" step
    assert all(_finite_positive(p["weights"]) for p in int4.values())
    assert isa_peak.summary_int4(m).startswith("int4 weight-only ceiling, path avx2:")
    only = isa_peak.measure(rounds=1, iters=200_000, int4_only=True)
    assert only["paths"] == [] and {p["path"] for p in only["int4"]} == set(int4)
    monkeypatch.setenv("CC", "/nonexistent/cc")
    m = isa_peak.measure(rounds=1, iters=1000)
    assert "/nonexistent/cc" in m["error"] and "not measured" in isa_peak.summary(m)
    assert "not measured" in isa_peak.summary_int4(m)


def test_time_interleaved_times_with_the_collector_off_and_restores_it(monkeypatch):
    """benchmarks._common.time_interleaved collects garbage first and keeps the collector off while it times
    (the builds before a timing leave unreachable TVM / ORT objects), then restores the collector's state."""
    import gc

    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks._common import time_interleaved

    seen = []
    for enabled in (True, False):
        (gc.enable if enabled else gc.disable)()
        try:
            out = time_interleaved({"f": lambda: seen.append(gc.isenabled())}, rounds=2, slice_s=0.001)
            assert out["f"]["samples"] >= 2 and gc.isenabled() == enabled
        finally:
            gc.enable()
    assert seen and not any(seen)


def test_time_interleaved_starts_each_round_one_variant_later(monkeypatch):
    """No variant always follows the same one (the first of a round follows the previous round's last and
    its caches): the order of the timed blocks rotates."""
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks._common import time_interleaved

    calls = []
    fns = {k: (lambda k=k: calls.append(k)) for k in "abc"}
    time_interleaved(fns, rounds=3, slice_s=0.0, calls=1, settle_s=0.0)
    blocks = [k for i, k in enumerate(calls) if i == 0 or calls[i - 1] != k]
    sizing, timed = blocks[:3], blocks[3:]
    assert sizing == list("abc") and len(calls) == 3 + 3 * 3 * 2, calls      # an untimed call in every block
    # each fn gets one untimed call before its timed one: the same letter twice, one block
    assert timed == list("abc") + list("bca") + list("cab"), calls


def test_bench_weight_only_rates_the_int4_gemv_against_the_ceiling(monkeypatch):
    """bench_weight_only's MLP line: Linear weights counted, time at the ceiling = weights / (ceiling x threads),
    each woq4 row's fraction of it and woq8's time over it (plain arithmetic on the measured figures)."""
    import torch

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_weight_only

    model = torch.nn.Sequential(torch.nn.Linear(100, 200), torch.nn.ReLU(), torch.nn.Linear(200, 50))
    rows = {"woq8": {"ms": 0.01}, "woq4-g128": {"ms": 0.004}}
    out = bench_weight_only.int4_against_ceiling(model, rows, ceiling=10.0, threads=2)
    assert out["weights"] == 100 * 200 + 200 * 50
    assert out["floor_ms"] == round(30000 / 20e9 * 1e3, 3) and out["woq8_over_floor"] == round(0.01 / 0.0015, 2)
    assert out["woq4-g128"] == {"g_weights_per_s_per_thread": round(30000 / 4e-6 / 2 / 1e9, 1),
                                "of_ceiling": round(0.0015 / 0.004, 2)}


def test_bench_weight_only_rates_precision_high_rows_against_their_own_ceiling(monkeypatch):
    """woq4-*-high rows (the vdpbf16ps kernel) against the ceiling of their own step; without that ceiling (no
    AVX512-BF16) they are not rated."""
    import torch

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_weight_only

    model = torch.nn.Sequential(torch.nn.Linear(100, 200), torch.nn.ReLU(), torch.nn.Linear(200, 50))
    rows = {"woq8": {"ms": 0.01}, "woq4-g128": {"ms": 0.004}, "woq4-g128-high": {"ms": 0.003}}
    out = bench_weight_only.int4_against_ceiling(model, rows, ceiling=10.0, threads=2, ceiling_high=20.0)
    assert out["high"]["floor_ms"] == round(30000 / 40e9 * 1e3, 3)
    assert out["woq4-g128-high"]["of_ceiling"] == round(30000 / 40e9 * 1e3 / 0.003, 2)
    assert out["woq4-g128"]["of_ceiling"] == round(30000 / 20e9 * 1e3 / 0.004, 2)
    assert "woq4-g128-high" not in bench_weight_only.int4_against_ceiling(model, rows, ceiling=10.0, threads=2)
