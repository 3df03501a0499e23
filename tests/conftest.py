import logging
import os

import pytest
import torch

# 2-core CI machine: keep torch from oversubscribing when TVM also runs threads.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

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
