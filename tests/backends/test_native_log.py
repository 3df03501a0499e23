"""TVM's harmless native warnings are dropped from stderr; everything else written meanwhile is kept."""
from __future__ import annotations

import os
import sys

import torch

import graphopt
from graphopt.backends.tvm.native_log import native_stderr_filtered
from graphopt.models import BertStyleEncoder


def test_filter_drops_known_lines_and_keeps_the_rest(capfd):
    with native_stderr_filtered():
        os.write(2, b"[05:52:13] executable.cc:340: Warning: Scope Loaded:\n")
        os.write(2, b"a real native error line\n")
        print("python-level stderr line", file=sys.stderr)
        os.write(2, b"transform.h:1261: Warning: Fast mode segfaults when there are out-of-bounds indices. x\n")
    os.write(2, b"after\n")
    err = capfd.readouterr().err
    assert "Scope Loaded" not in err and "Fast mode" not in err
    assert "a real native error line" in err and "python-level stderr line" in err
    assert err.index("a real native error line") < err.index("after")


def test_filter_restores_stderr_when_the_call_raises(capfd):
    try:
        with native_stderr_filtered():
            os.write(2, b"kept before the error\n")
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    os.write(2, b"stderr works again\n")
    err = capfd.readouterr().err
    assert "kept before the error" in err and "stderr works again" in err


def test_building_saving_and_loading_an_encoder_prints_no_tvm_noise(tmp_path, capfd):
    torch.manual_seed(0)
    model = BertStyleEncoder(vocab=100, hidden=32, layers=1, heads=4, ffn=64, max_len=16, num_labels=3).eval()
    ids = torch.randint(0, 100, (1, 12))
    opt = graphopt.optimize(model, target="x86", pipeline="", example_inputs=(ids,))
    path = opt.save(str(tmp_path / "enc.gopt"))
    again = graphopt.load(path)
    torch.testing.assert_close(again(ids), opt(ids), rtol=0, atol=0)
    err = capfd.readouterr().err
    assert "Scope Loaded" not in err and "Scope Saving" not in err and "Fast mode segfaults" not in err, err[-2000:]
