"""SIGTERM and SIGINT as a scheduler means them: stop taking work, keep what is embedded.

Light on purpose (no polars, no torch): the command installs these handlers first thing, before
it imports an engine, so that a signal in its first second is a graceful stop too, not a
KeyboardInterrupt that click turns into "Aborted!" and exit 1 (tests/test_reliability.py).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from contextlib import contextmanager

from .errors import Interrupted

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignal(threading.Event):
    """Set by a signal handler: stop taking work, keep what is embedded."""

    signum: int | None = None

    def stop(self, signum: int) -> None:
        self.signum = signum
        self.set()


def _raise_interrupted(signum: int) -> None:
    raise Interrupted(signum)


@contextmanager
def graceful_signals(stop: StopSignal, *, on_second: Callable[[int], None] = _raise_interrupted, what: str = "stopping"):
    """SIGINT/SIGTERM set `stop` (first) or call `on_second` (second; it raises Interrupted unless
    the caller says otherwise), while the block runs. `what` names the stop in its log line."""
    if threading.current_thread() is not threading.main_thread():
        yield stop  # only the main thread can take signals; the caller stops us some other way
        return

    def handler(signum, frame):
        if stop.is_set():
            on_second(signum)
            return
        logger.warning("%s: %s; what is embedded is committed, the rest is left for a rerun (again to stop at once)",
                       signal.Signals(signum).name, what)
        stop.stop(signum)

    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
