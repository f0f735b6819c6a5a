"""The local engine: one shard in this process, stopping the way a scheduler expects.

Kubernetes, Airflow and systemd send SIGTERM, a terminal sends SIGINT. The first one stops the
run gracefully: no new work is taken, what is already embedded is committed, the lock is let go,
one line says what was kept, and the command exits 128 + the signal's number (143, 130), well
inside Kubernetes' 30 s grace. A second signal stops at once (the kernel drops the lock, and a
rerun resumes from the committed parts, as after any kill).
"""

from __future__ import annotations

import logging
import signal
import threading
from contextlib import contextmanager

from ..errors import Interrupted
from ..options import JobOptions
from ..shard import StopSignal, run_shard
from ..summary import Summary

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def graceful_signals(stop: StopSignal):
    """SIGINT/SIGTERM set `stop` (first) or raise Interrupted (second), while the block runs."""
    if threading.current_thread() is not threading.main_thread():
        yield stop  # only the main thread can take signals; the caller stops us some other way
        return

    def handler(signum, frame):
        if stop.is_set():
            raise Interrupted(signum)
        logger.warning("%s: stopping; what is embedded is committed, the rest is left for a rerun (again to stop at once)",
                       signal.Signals(signum).name)
        stop.stop(signum)

    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def run_local(opts: JobOptions, *, model=None) -> Summary:
    stop = StopSignal()
    with graceful_signals(stop):
        return run_shard(opts, model=model, stop=stop)
