"""A run's pending rows, as they reach it: item k is the k-th row handed to this run.

The local engine hands a run all of its shard's pending rows at once; a worker of `--devices` is
handed them a chunk at a time, as it finishes the last (engines/devices.py). Either way the
stages name a row by its item: the decode requests (audio.requests) take rows in order, and the
writer (output.writer) looks the finished ones up again for their id, path and kept columns.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Iterator

import numpy as np
import polars as pl


class Pending:
    """Chunks of pending rows (polars frames of one schema), numbered consecutively as items.

    `chunks()` yields (first item, frame) and may fetch the next chunk when asked (`more`
    returns a frame, or None when the run has no more); `gather(items)` is safe from any thread.
    """

    def __init__(self, first: pl.DataFrame, more: Callable[[], pl.DataFrame | None] | None = None):
        self._frames: list[pl.DataFrame] = [first]
        self._starts: list[int] = [0]
        self._more = more
        self._guard = threading.Lock()

    def __len__(self) -> int:
        """Rows handed to the run so far."""
        with self._guard:
            return self._starts[-1] + self._frames[-1].height

    def chunks(self) -> Iterator[tuple[int, pl.DataFrame]]:
        i = 0
        while True:
            with self._guard:
                have = i < len(self._frames)
                if have:
                    start, frame = self._starts[i], self._frames[i]
            if not have:
                frame = self._more() if self._more is not None else None
                if frame is None:
                    return
                with self._guard:
                    self._starts.append(self._starts[-1] + self._frames[-1].height)
                    self._frames.append(frame)
                continue
            if frame.height:
                yield start, frame
            i += 1

    def gather(self, items: np.ndarray) -> pl.DataFrame:
        """The rows of `items` (ascending or not), in that order."""
        items = np.asarray(items, dtype=np.int64)
        with self._guard:
            frames, starts = list(self._frames), list(self._starts)
        if len(frames) == 1:
            return frames[0][items]
        chunk = np.array([bisect.bisect_right(starts, int(i)) - 1 for i in items], dtype=np.int64)
        order = np.argsort(chunk, kind="stable")
        parts = []
        for c in np.unique(chunk):
            sel = order[chunk[order] == c]
            parts.append((sel, frames[c][items[sel] - starts[c]]))
        out = pl.concat([p for _, p in parts], how="vertical")
        back = np.empty(len(items), dtype=np.int64)
        back[np.concatenate([s for s, _ in parts])] = np.arange(len(items))
        return out[back]
