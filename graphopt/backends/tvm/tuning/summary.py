"""TuningSummary: what one tuning run did (the report's backend["tuning"])."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = ["TuningSummary"]


@dataclass
class TuningSummary:
    database: str
    tasks: int = 0                  # kernels MetaSchedule could tune
    tasks_tuned: int = 0            # kernels searched in this run
    new_trials: int = 0             # candidates measured in this run (search + default-schedule seeds)
    reused_records: int = 0         # records that were already in the database
    seconds: float = 0.0
    interrupted: bool = False
    estimated_ms: float | None = None   # sum over kernels of calls x best measured latency
    defaults_kept: int = 0          # searched kernels whose default schedule won the paired check
    check_records: int = 0          # records committed by the paired check (2 per kernel checked)
    untunable: int = 0              # kernels with integer inputs (gathers), left to the default schedules

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)
