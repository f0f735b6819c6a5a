"""The local engine: one shard in this process, stopping the way a scheduler expects.

Kubernetes, Airflow and systemd send SIGTERM, a terminal sends SIGINT. The first one stops the
run gracefully: no new work is taken, what is already embedded is committed, the lock is let go,
one line says what was kept, and the command exits 128 + the signal's number (143, 130), well
inside Kubernetes' 30 s grace. A second signal stops at once (the kernel drops the lock, and a
rerun resumes from the committed parts, as after any kill).
"""

from __future__ import annotations

from ..options import JobOptions
from ..shard import run_shard
from ..signals import StopSignal, graceful_signals
from ..summary import Summary

__all__ = ["graceful_signals", "run_local"]


def run_local(opts: JobOptions, *, model=None, stop: StopSignal | None = None) -> Summary:
    """`stop`: the command's, whose handlers are already installed (a signal may have set it)."""
    stop = StopSignal() if stop is None else stop
    with graceful_signals(stop):
        return run_shard(opts, model=model, stop=stop)
