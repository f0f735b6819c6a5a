"""Operator-facing progress: a tqdm bar on a terminal, plain log lines at most every 30 s otherwise."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable

from tqdm import tqdm

logger = logging.getLogger(__name__)

LOG_EVERY_S = 30.0


class Progress:
    def __init__(self, total_rows: int, *, enabled: bool = True, stream=None, on_update: Callable[[int, int, float], None] | None = None):
        # on_update(rows, failed, audio_s) sees every update, shown or not: how a multi-device
        # worker (extractor/multidevice.py) feeds its parent's one bar.
        self.on_update = on_update
        self.stream = stream or sys.stderr
        self.total = total_rows
        self.rows = self.failed = 0
        self.audio_s = 0.0
        self.start = time.monotonic()
        self._last_log = self.start
        is_tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self._bar = tqdm(total=total_rows, unit="file", file=self.stream, dynamic_ncols=True, smoothing=0.05) if is_tty else None
        self._log = enabled and not is_tty

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
            logger.info(
                "progress: %d/%d rows (%d failed), %.2f h audio, %.0f audio-s/s",
                self.rows, self.total, self.failed, self.audio_s / 3600, self.audio_s / elapsed,
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
