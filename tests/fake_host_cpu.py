"""pytest plugin: run the suite as if this machine's LLVM CPU were $GRAPHOPT_TEST_HOST_CPU (unset: no effect).

    GRAPHOPT_TEST_HOST_CPU=znver1 python -m pytest -p tests.fake_host_cpu ...

`x86` then resolves to that CPU, and every host-dependent branch (vector width, VNNI or not, the runnable-here
check of artifacts) goes the way it goes on such a machine: on an AVX-512 machine, `znver1` or `haswell`
checks the AVX2-only paths. Code built for an older x86 CPU runs on a newer one; the reverse can fault.
"""
import os

import pytest


def pytest_configure(config):
    cpu = os.environ.get("GRAPHOPT_TEST_HOST_CPU")
    if not cpu:
        return
    import graphopt.backends.targets as targets

    targets.host_cpu = lambda: cpu
    config.issue_config_time_warning(
        pytest.PytestConfigWarning(f"host_cpu() is {cpu!r} in this run (tests/fake_host_cpu.py)"), stacklevel=2)
