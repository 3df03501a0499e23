"""graphopt: a compiler-style graph optimizer for PyTorch models, compiled through Apache TVM.

    opt = graphopt.optimize(model, target="x86", pipeline="fold_bn,cleanup", example_inputs=(x,))
    print(opt.report); y = opt(x); opt.save("model.gopt"); again = graphopt.load("model.gopt")
"""
import os as _os

from .backends.targets import physical_cores as _physical_cores

# TVM 0.27's CPU runtime sizes its thread pool, when it starts, from TVM_NUM_THREADS, else from
# hardware_concurrency()/2 (it assumes 2-way SMT): on a 2-core machine without SMT that is one thread, half the
# machine. graphopt compiles for the physical core count (targets.py), so its runtime uses that many threads
# unless the user chose otherwise.
_os.environ.setdefault("TVM_NUM_THREADS", str(_physical_cores()))

from .api import OptimizedModel, optimize  # noqa: E402
from .artifact import load  # noqa: E402
from .errors import (ArtifactError, BuildError, CalibrationError, CaptureError, GraphoptError, InputError,
                     LoweringError, PassError, PipelineError, TuningError)
from .pipeline import Context, Pass, PassResult, Pipeline, available_passes, register_pass
from .searcher import SearchResult, cosine, search, top1

__version__ = "0.1.0"

__all__ = [
    "optimize", "load", "OptimizedModel", "Pipeline", "Pass", "PassResult", "Context", "register_pass",
    "available_passes", "search", "SearchResult", "top1", "cosine", "GraphoptError", "CaptureError", "PipelineError", "PassError", "LoweringError",
    "BuildError", "InputError", "ArtifactError", "TuningError", "CalibrationError",
]
