import os

import pytest
import torch

# 2-core CI machine: keep torch from oversubscribing when TVM also runs threads.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
