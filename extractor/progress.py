"""Operator-facing progress: a tqdm bar on a terminal, a plain (or JSON) log line every 30 s otherwise.

Counted when rows finish on the device (embedded or failed), not when parts are committed, so a
bar moves per batch; it is closed after the last commit, on the true count.
"""

from __future__ import annotations

import logging
import sys
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
    def __init__(self, total_rows: int, *, enabled: bool = True, stream=None, on_update: Callable[[int, int, float], None] | None = None):
        # on_update(rows, failed, audio_s) sees every update, shown or not: how a worker of
        # --devices feeds its parent's one bar (engines/devices.py).
        self.on_update = on_update
        self.stream = stream or sys.stderr
        self.total = total_rows
        self.rows = self.failed = 0
        self.audio_s = 0.0
        self.start = time.monotonic()
        self._last_log = self.start
        is_tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self._bar = tqdm(total=total_rows, unit="row", file=self.stream, dynamic_ncols=True, smoothing=0.05) if is_tty else None
        self._log = enabled and not is_tty

    def eta_s(self) -> float | None:
        elapsed = time.monotonic() - self.start
        if not self.rows or elapsed <= 0:
            return None
        return (self.total - self.rows) * elapsed / self.rows

    def update(self, rows: int, failed: int, audio_s: float) -> None:
        if self.on_update is not None:
            self.on_update(rows, failed, audio_s)
        self.rows += rows
        self.failed += failed
        self.audio_s += audio_s
        elapsed = max(time.monotonic() - self.start, 1e-9)
        if self._bar is not None:
            self._bar.update(rows)
            self._bar.set_postfix_str(f"{self.audio_s / 3600:.2f} h audio, {self.audio_s / elapsed:,.0f} audio-s/s, {self.failed} failed", refresh=False)
        elif self._log and time.monotonic() - self._last_log >= LOG_EVERY_S:
            self._last_log = time.monotonic()
            self.log()

    def log(self) -> None:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        eta = self.eta_s()
        logger.info(
            "progress: %d/%d rows (%d failed), %.2f h audio, %.0f audio-s/s, ETA %s",
            self.rows, self.total, self.failed, self.audio_s / 3600, self.audio_s / elapsed, _eta(eta),
            extra={"event": "progress", "rows": self.rows, "total": self.total, "failed": self.failed,
                   "audio_hours": round(self.audio_s / 3600, 4), "audio_seconds_per_second": round(self.audio_s / elapsed, 1),
                   "eta_s": None if eta is None else round(eta, 1)},
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
