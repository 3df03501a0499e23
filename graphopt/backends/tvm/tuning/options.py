"""How to tune: TuneOptions, and coerce_tune for everything `optimize(tune=...)` accepts."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from ....errors import TuningError

__all__ = ["TuneOptions", "coerce_tune"]


@dataclass
class TuneOptions:
    """How to tune. `optimize(tune=...)` accepts True (these defaults), an int (trials), a dict or this.

    trials           total new MetaSchedule trials for this model (across all its kernels)
    trials_per_task  trials per kernel; default: trials spread evenly over the kernels (at least 1 each);
                     when trials < kernels x trials_per_task, the kernels with the most FLOPs x calls go first
    database         record directory (MetaSchedule JSONDatabase); default: per target under the user cache
                     dir, or $GRAPHOPT_TUNING_DIR/<target> when that is set
    timeout          seconds allowed per build and per measurement of one candidate
    progress         show a tqdm progress bar (trials, current task, best latencies)
    trials_per_iter  candidates built and measured per round
    population       evolutionary search population (smaller: faster rounds, less exploration)
    seed             random seed of the search
    seed_defaults    measure graphopt's default schedule of each kernel and keep it as its first record, and
                     check each searched kernel's best record against it, back to back, after the search
    """

    trials: int = 64
    trials_per_task: int | None = None
    database: str | None = None
    timeout: float = 60.0
    progress: bool = True
    trials_per_iter: int = 16
    population: int = 256
    seed: int = 0
    seed_defaults: bool = True

    def __post_init__(self):
        def bad(name, value, expected):
            raise TuningError(f"tune option {name}={value!r}: expected {expected}; {_known_options()}")

        def positive_int(name, value, allow_none=False):
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                bad(name, value, "a positive integer")

        positive_int("trials", self.trials)
        positive_int("trials_per_task", self.trials_per_task, allow_none=True)
        positive_int("trials_per_iter", self.trials_per_iter)
        positive_int("population", self.population)
        if not isinstance(self.timeout, (int, float)) or isinstance(self.timeout, bool) or self.timeout <= 0:
            bad("timeout", self.timeout, "seconds > 0")
        if self.database is not None and not isinstance(self.database, (str, os.PathLike)):
            bad("database", self.database, "a directory path")
        if self.database is not None:
            self.database = os.path.expanduser(os.fspath(self.database))
        for name in ("progress", "seed_defaults"):
            if not isinstance(getattr(self, name), bool):
                bad(name, getattr(self, name), "True or False")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            bad("seed", self.seed, "an integer")


def _known_options() -> str:
    """The accepted forms of `tune=`, for error messages."""
    names = ", ".join(f.name for f in dataclasses.fields(TuneOptions))
    return (f"tune= accepts None/False (no tuning), True (default options), a positive trial count, "
            f"a dict of options or a TuneOptions; known options: {names}")


def coerce_tune(tune: Any) -> TuneOptions | None:
    """None/False/0 -> None (no tuning); True -> TuneOptions(); int n -> n trials; dict -> fields; TuneOptions.

    Anything else (a negative count, a string, an unknown option) raises TuningError listing the known options.
    """
    if tune is None or tune is False:
        return None
    if tune is True:
        return TuneOptions()
    if isinstance(tune, TuneOptions):
        return tune
    if isinstance(tune, int):
        if tune == 0:
            return None
        if tune < 0:
            raise TuningError(f"tune={tune!r}: a trial count must be positive; {_known_options()}")
        return TuneOptions(trials=tune)
    if isinstance(tune, dict):
        names = {f.name for f in dataclasses.fields(TuneOptions)}
        unknown = sorted(map(str, set(tune) - names))
        if unknown:
            raise TuningError(f"unknown tune option(s) {', '.join(map(repr, unknown))}; {_known_options()}")
        return TuneOptions(**tune)
    raise TuningError(f"tune={tune!r} ({type(tune).__name__}) is not a tuning request; {_known_options()}")
