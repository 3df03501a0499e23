"""Drop TVM's known-harmless native warnings from stderr, keep everything else.

TVM 0.27 logs from C++ straight to file descriptor 2, where Python's warnings filters cannot reach:
  - "Warning: Scope Saving:" / "Scope Loaded:"   once per VM function on every save and load of an executable
                                                   (33 lines for a small BERT artifact)
  - "Fast mode segfaults when there are out-of-bounds indices"   for every gather (`take`) legalized;
                                                   graphopt checks index inputs at call time instead
                                                   (runtime._check_index_range)
`native_stderr_filtered()` redirects fd 2 to a temporary file for the duration of a call and then writes
every other line back to fd 2 (Python-level writes to sys.stderr in that window are kept too, just
delayed, when sys.stderr is fd 2). Use it only around short calls that draw no progress bar.
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile

__all__ = ["native_stderr_filtered", "HARMLESS"]

HARMLESS = ("Warning: Scope Saving:", "Warning: Scope Loaded:",
            "Fast mode segfaults when there are out-of-bounds indices")


@contextlib.contextmanager
def native_stderr_filtered(patterns: tuple[str, ...] = HARMLESS):
    fd = 2                                   # where TVM's C++ logging writes, whatever sys.stderr is now
    try:
        os.fstat(fd)
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):      # no file descriptor 2: nothing to filter
        yield
        return
    saved = os.dup(fd)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), fd)
        try:
            yield
        finally:
            try:
                sys.stderr.flush()
            except Exception:
                pass
            os.dup2(saved, fd)
            os.close(saved)
            tmp.seek(0)
            kept = [line for line in tmp.read().decode("utf-8", "replace").splitlines(keepends=True)
                    if not any(p in line for p in patterns)]
            if kept:
                os.write(fd, "".join(kept).encode("utf-8", "replace"))
