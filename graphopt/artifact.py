"""Artifacts: save/load an OptimizedModel (placeholder until the TVM backend lands)."""
from .errors import ArtifactError


def save(opt, path):
    raise ArtifactError("saving artifacts is not implemented yet")


def load(path):
    raise ArtifactError("loading artifacts is not implemented yet")
