"""Operator-facing progress: a tqdm bar on a terminal, a plain (or JSON) log line every 30 s otherwise.

Counted when rows finish on the device (embedded or failed), not when parts are committed, so a
bar moves per batch; it is closed after the last commit, on the true count. In a log the line
comes every LOG_EVERY_S whether or not a row finished since the last one (a heartbeat), and when
no row has finished for `stall_s`, a line says what the run is waiting on, so that a stalled run
and a slow one read differently.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable

from tqdm import tqdm

logger = logging.getLogger(__name__)

LOG_EVERY_S = 30.0


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """`on_update(rows, failed, audio_s)` sees every update, shown or not: how a worker of
    --devices feeds its parent's one bar (engines/devices.py). `waiting_on()` says, in a few words,
    what the run waits for (the pipeline's view: decode requests in flight, batches queued)."""

    def __init__(self, total_rows: int, *, enabled: bool = True, stream=None, on_update: Callable[[int, int, float], None] | None = None,
                 waiting_on: Callable[[], str] | None = None, stall_s: float | None = None):
        self.on_update = on_update
        self.stream = stream or sys.stderr
        self.total = total_rows
        self.rows = self.failed = 0
        self.audio_s = 0.0
        self.start = self.last_row_at = time.monotonic()
        self.waiting_on, self.stall_s = waiting_on, stall_s
        is_tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self._bar = tqdm(total=total_rows, unit="row", file=self.stream, dynamic_ncols=True, smoothing=0.05) if is_tty else None
        self._log = enabled and not is_tty
        self._guard = threading.Lock()
        self._closed = threading.Event()
        self._stall_said = 0.0  # when the last stall line was logged
        self._heart = threading.Thread(target=self._beat, name="progress", daemon=True) if self._log else None
        if self._heart is not None:
            self._heart.start()

    def eta_s(self) -> float | None:
        elapsed = time.monotonic() - self.start
        if not self.rows or elapsed <= 0:
            return None
        return (self.total - self.rows) * elapsed / self.rows

    def update(self, rows: int, failed: int, audio_s: float) -> None:
        if self.on_update is not None:
            self.on_update(rows, failed, audio_s)
        with self._guard:
            self.rows += rows
            self.failed += failed
            self.audio_s += audio_s
            if rows:
                self.last_row_at = time.monotonic()
        if self._bar is not None:
            elapsed = max(time.monotonic() - self.start, 1e-9)
            self._bar.update(rows)
            self._bar.set_postfix_str(f"{self.audio_s / 3600:.2f} h audio, {self.audio_s / elapsed:,.0f} audio-s/s, {self.failed} failed", refresh=False)

    def watch(self, waiting_on: Callable[[], str], stall_s: float) -> None:
        """Say what the run waits on (`waiting_on()`) once no row has finished for `stall_s`."""
        self.waiting_on, self.stall_s = waiting_on, stall_s

    def _beat(self) -> None:
        while not self._closed.wait(max(LOG_EVERY_S, 0.05)):
            self.log()
            quiet = time.monotonic() - self.last_row_at
            if self.stall_s is not None and quiet >= self.stall_s and time.monotonic() - self._stall_said >= self.stall_s:
                self._stall_said = time.monotonic()
                waiting = self.waiting_on() if self.waiting_on is not None else "unknown"
                logger.warning("no row has finished for %.0f s; waiting on: %s", quiet, waiting,
                               extra={"event": "stalled", "quiet_s": round(quiet, 1), "waiting_on": waiting})

    def log(self) -> None:
        with self._guard:
            rows, failed, audio_s = self.rows, self.failed, self.audio_s
        elapsed = max(time.monotonic() - self.start, 1e-9)
        eta = self.eta_s()
        logger.info(
            "progress: %d/%d rows (%d failed), %.2f h audio, %.0f audio-s/s, ETA %s",
            rows, self.total, failed, audio_s / 3600, audio_s / elapsed, _eta(eta),
            extra={"event": "progress", "rows": rows, "total": self.total, "failed": failed,
                   "audio_hours": round(audio_s / 3600, 4), "audio_seconds_per_second": round(audio_s / elapsed, 1),
                   "eta_s": None if eta is None else round(eta, 1)},
        )

    def close(self) -> None:
        self._closed.set()
        if self._heart is not None and self._heart is not threading.current_thread():
            self._heart.join()
            self._heart = None
            self.log()  # the last line holds the true count
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
