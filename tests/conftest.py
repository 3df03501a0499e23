import logging
import os

import pytest
import torch

# One thread for PyTorch and TVM's runtime. The tests run small shapes, where a second thread saves little, and on
# a busy 2-core machine (CI runners share their cores) the threads spin at each barrier waiting for a core: a
# DenseNet-121 forward at 64x64 took 1 s of CPU with 2 threads against 0.03 s with 1 (test_fold_bn.py: 47 s of
# CPU -> 9 s). TVM_NUM_THREADS is read when TVM's pool starts (setdefault: an exported value wins; graphopt's own
# default, the physical core count, is tested in a subprocess without it).
torch.set_num_threads(1)
TVM_NUM_THREADS = os.environ.setdefault("TVM_NUM_THREADS", "1")      # before any test module imports graphopt

# Global state a test could leave behind for the next one (the suite runs in random order: pytest-randomly).
# MetaSchedule reads the handlers of its logger when a search starts; graphopt and the tests read these
# environment variables.
_LOGGERS = ("tvm.s_tir.meta_schedule",)
_ENV_PREFIXES = ("GRAPHOPT_", "TVM_", "XDG_", "OMP_", "CUDA_")


def _global_state() -> dict:
    state = {f"env {k}": v for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES)}
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        state[f"logger {name!r}"] = (logging.getLevelName(logger.level), logger.propagate,
                                     [f"{type(h).__name__}(name={h.get_name()!r})" for h in logger.handlers])
    return state


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _leaves_no_global_state():
    """Fails the test that leaves an environment variable or a logger above changed (a later test, in any
    order, would otherwise run in a process that differs from a fresh one)."""
    before = _global_state()
    yield
    after = _global_state()
    changed = [f"{k}: {before.get(k, '(unset)')!r} -> {after.get(k, '(unset)')!r}"
               for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]
    if changed:
        pytest.fail("this test left global state changed (use monkeypatch, or restore it): " + "; ".join(changed),
                    pytrace=False)


# ------------------------------------------------------------------------------ garbage collection
def pytest_collection_finish(session):
    """Freeze what exists once the tests are collected (torch, TVM, the test modules: ~700k objects, all of them
    alive to the end) so that the cyclic garbage collector stops re-scanning it: every full collection walked
    the whole heap, ~0.3 s each, 24 s of CPU over the suite (the automatic ones and the RPC tests' explicit
    gc.collect() that frees their sessions; gc.callbacks timings, both workers). Objects made later are
    collected as before. (No collection first: what collection left unreachable, e.g. OpInfo's unfinished
    sample generators, would report its GeneratorExit as an unraisable exception in the first test.)"""
    import gc

    gc.freeze()


# ------------------------------------------------------------------- which files share one xdist worker
# With `-n`, pytest-xdist's loadfile mode gives each worker whole files, and a session fixture is made once per
# worker that uses it. The files below share an expensive session fixture (an aarch64 RPC server under qemu:
# ~12 s of CPU to start; the x86 builds of ResNet-18, bert_tiny and nn.TransformerEncoder: ~13 s), so each
# group goes to one worker as one unit and the fixture is made once per run. tests/test_suite.py checks that
# every file using one of these session fixtures is in the fixture's group.
WORKER_GROUPS = {
    "aarch64-server": ("tests/backends/test_arm.py", "tests/backends/test_arm_fp16.py",
                       "tests/backends/test_nm_kernels.py", "tests/backends/test_rpc.py",
                       "tests/backends/test_sparse_kernels.py", "tests/backends/test_weight_only_arm.py"),
    "x86-session-builds": ("tests/backends/test_schedules.py", "tests/backends/test_tvm_backend.py",
                           "tests/test_end_to_end.py"),
}
_GROUP_OF = {path: group for group, paths in WORKER_GROUPS.items() for path in paths}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """loadfile scheduling with the files of each WORKER_GROUPS entry as one work unit (tests/xdist_grouping.py:
    also finishes a crashed worker's file on its replacement instead of hanging)."""
    if config.getoption("dist") != "loadfile":
        return None
    from tests.xdist_grouping import GroupedFileScheduling

    return GroupedFileScheduling(config, log, groups=_GROUP_OF)


# ------------------------------------------------------------------------- builds shared across test files
# The same build checked for different things in different files (end to end: eager match, report, save/load;
# test_schedules: every kernel scheduled). Built once per session: a ResNet-18 or bert_tiny build for x86 is
# the largest single cost of those tests. Tests only call and save these, never change them.
@pytest.fixture(scope="session")
def resnet18_x86():
    """(model, input, OptimizedModel): ResNet-18 with random BN statistics, 1x3x64x64, default pipeline, x86."""
    torchvision = pytest.importorskip("torchvision")
    import graphopt
    from tests.helpers import randomize_bn

    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.resnet18()).eval()
    x = torch.randn(1, 3, 64, 64)
    return model, x, graphopt.optimize(model, "x86", example_inputs=(x,))


@pytest.fixture(scope="session")
def bert_tiny_x86():
    """(model, inputs, OptimizedModel): the bundled bert_tiny, default pipeline, x86."""
    import graphopt
    from graphopt.models import get_model

    torch.manual_seed(0)
    model, inputs = get_model("bert_tiny")
    return model, inputs, graphopt.optimize(model, "x86", example_inputs=inputs)


@pytest.fixture(scope="session")
def transformer_encoder_x86():
    """(model, input, OptimizedModel, warning messages of the build): nn.TransformerEncoder (2 layers, d_model
    32, GELU; not symbolically traceable, so captured by torch.export), default pipeline, x86. Checked by
    test_end_to_end.py (match, report, save, load) and test_schedules.py (every kernel scheduled, no layout
    fall-back); each used to build its own encoder."""
    import warnings

    import graphopt

    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True,
                                             activation="gelu")
    model = torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()
    x = torch.randn(2, 7, 32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = graphopt.optimize(model, "x86", example_inputs=(x,))
    return model, x, opt, [str(w.message) for w in caught]
