"""graphopt: a compiler-style graph optimizer for PyTorch models, compiled through Apache TVM.

    opt = graphopt.optimize(model, target="x86", pipeline="fold_bn,cleanup", example_inputs=(x,))
    print(opt.report); y = opt(x); opt.save("model.gopt"); again = graphopt.load("model.gopt")
"""
from .api import OptimizedModel, optimize
from .artifact import load
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
