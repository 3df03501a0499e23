"""Error-message text shared by the tuning modules."""
from __future__ import annotations

from ..build import _first_line


def first_line(text: str, limit: int = 400) -> str:
    """The informative line of an error message (build._first_line, with tuning's shorter limit)."""
    return _first_line(text, limit)
