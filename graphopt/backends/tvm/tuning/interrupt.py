"""Ctrl-C while tuning: stop at the next safe point, every record already measured kept."""
from __future__ import annotations

import sys

__all__ = ["Interrupt"]


class Interrupt:
    """Ctrl-C while tuning. The first one asks to stop at the next safe point (once the candidates being
    measured are committed to the records, or after the default-schedule seeds) and then raises
    KeyboardInterrupt; a second one goes to the previous handler at once (Python's raises KeyboardInterrupt).

    A KeyboardInterrupt raised inside a TVM callback reaches Python as an FFI RuntimeError, and one raised in
    the middle of an import leaves that import broken, hence the flag and the safe points. Installed in the
    main thread only, over a Python-level handler (not where SIGINT is ignored or left to the OS)."""

    def __init__(self):
        self.requested = False
        self._previous = None
        self._installed = False

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            try:
                previous = signal.getsignal(signal.SIGINT)
                if callable(previous):
                    self._previous = signal.signal(signal.SIGINT, self._handle)
                    self._installed = True
            except (ValueError, OSError):
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:
            if callable(self._previous):
                return self._previous(signum, frame)
            raise KeyboardInterrupt
        self.requested = True
        print("\ngraphopt: Ctrl-C: tuning stops once the candidates being measured are recorded "
              "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt

    def __exit__(self, *exc):
        if self._installed:
            import signal

            signal.signal(signal.SIGINT, self._previous)
            self._installed = False
        return False
