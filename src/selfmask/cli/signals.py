"""SIGTERM as an exception while a command runs, so every ``finally`` and cleanup runs.

Python's default SIGTERM action ends the process at once: a temporary file beside an
output stays behind, a run folder keeps saying ``trained`` with no results. While a
command runs, :func:`sigterm_raises` turns SIGTERM into :class:`Terminated` (a
``KeyboardInterrupt``, so code that cleans up after Ctrl-C cleans up after it too); the
training loop still installs its own handler (stop at a step boundary) and restores
this one afterwards. A handler someone else installed (or ``SIG_IGN``) is left alone.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived while a command ran."""


def _raise_terminated(_signum: int, _frame: object) -> None:
    raise Terminated("stopped by SIGTERM")


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` (main thread, default action only)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


__all__ = ["Terminated", "sigterm_raises"]
