"""Typed errors. Every error names the thing at fault: a module path, a node, an op, a pass, a file."""


class GraphoptError(Exception):
    """Base class of every error graphopt raises on purpose."""


class CaptureError(GraphoptError):
    """The model could not be turned into an fx.GraphModule (untraceable control flow, unsupported Python)."""


class DynamicShapeError(CaptureError):
    """A dim requested as dynamic cannot be (the model specializes it, branches on it or on data values), or
    the `dynamic=` specification is malformed. Names the input, the dim and, where found, the op and line."""


class PipelineError(GraphoptError):
    """A pipeline text or object is malformed: unknown pass, unknown or badly typed option."""


class PassError(GraphoptError):
    """A pass failed, broke the graph, or (if declared exact) changed the outputs beyond float rounding."""

    def __init__(self, pass_name: str, message: str):
        super().__init__(f"pass '{pass_name}': {message}")
        self.pass_name = pass_name


class LoweringError(GraphoptError):
    """The TVM backend cannot lower an op of the graph. Names the op and the fx node."""


class BuildError(GraphoptError):
    """TVM failed to build/compile the lowered module for the target."""


class InputError(GraphoptError, ValueError):
    """A compiled module was called with inputs that do not match its signature (count, shape, dtype)."""


class ArtifactError(GraphoptError):
    """A saved artifact is missing, corrupted, or was built for a different target/version."""


class TuningError(GraphoptError):
    """Tuning failed or its record database is unreadable. Names the database file."""


class CalibrationError(GraphoptError):
    """A pass that needs calibration data was not given any (or got data of the wrong form)."""


class RemoteError(GraphoptError):
    """An RPC device, server or tracker cannot be reached, or a run on it failed. Names host:port / device key."""


class BudgetError(PipelineError):
    """A mixed-precision budget (quantize(bits=mixed, budget=...)) is malformed, or no allocation of the layers
    can meet it. Names the budget and, when it cannot be met, the least it can be."""
