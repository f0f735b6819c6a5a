"""Window results → finished rows: each row's windows combined by the run's pooling strategy.

A long file's windows come back in several batches, in any order; a row is finished once all of
them are back and its decode said how many there are (ledger.Decoded). The strategy
(extractor.pooling) reduced each window on the device; here its windows are combined and
finished, so a row's vector depends only on its own windows, never on how they were batched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..ledger import Failure, Rows
from .packing import Batch


@dataclass
class _Row:
    acc: np.ndarray | None = None  # the strategy's running value
    frames: int = 0  # valid output frames so far
    windows: int = 0
    total: int | None = None  # windows the row has; known once its decode is done
    duration_s: float = 0.0
    frame_parts: dict[int, np.ndarray] = field(default_factory=dict)  # window index → its frames (strategies that keep them)


class RowPooling:
    """Combines window results per row and hands finished rows (and failures) on, batch by batch.

    A row that fails after some of its windows were sent (a truncation found at the end of a long
    file) is failed: its windows, processed or still to come, are dropped. A row decoded again
    from its start (retrying) drops what its earlier windows gave.
    """

    def __init__(self, pooling, emit_rows: Callable[[Rows], None], emit_failures: Callable[[np.ndarray, list[Failure]], None]):
        self.pooling = pooling
        self.emit_rows, self.emit_failures = emit_rows, emit_failures
        self._rows: dict[int, _Row] = {}  # rows with windows back, or several windows
        self._single: dict[int, float] = {}  # rows of one window, none back yet: their duration
        self._failed: set[int] = set()

    def __len__(self) -> int:
        """Rows with windows or a total but not finished yet."""
        return len(self._rows) + len(self._single)

    def decoded(self, entries: list[tuple[int, int, float]]) -> None:
        """(item, windows, duration_s) of rows whose decode finished."""
        finished = []
        for item, total, duration in entries:
            st = self._rows.get(item)
            if st is None and total == 1 and not self.pooling.keeps_frames:
                self._single[item] = duration  # the common case: finished in add(), vectorised
                continue
            st = self._rows.setdefault(item, _Row())
            st.total, st.duration_s = total, duration
            if st.windows == total:
                finished.append(item)
        self._finish(finished)

    def fail(self, items: np.ndarray, failures: list[Failure]) -> None:
        for item in items:
            self._rows.pop(int(item), None)
            self._single.pop(int(item), None)
            self._failed.add(int(item))
        self.emit_failures(np.asarray(items, dtype=np.int64), failures)

    def retrying(self, items: list[int]) -> None:
        for item in items:
            self._rows.pop(int(item), None)
            self._single.pop(int(item), None)

    def add(self, batch: Batch, values: np.ndarray, frames: np.ndarray | None) -> None:
        """values: (B, D) float32, each window's reduction by the strategy; frames: (N, D) or None."""
        items = batch.items.tolist()
        rest = range(len(items))
        single = self._single
        if single:
            # Rows of one window (short clips, ~1000 a batch): finished here in one vectorised step.
            one = np.fromiter((i in single for i in items), dtype=bool, count=len(items))
            if one.any():
                idx = np.flatnonzero(one)
                done = [items[j] for j in idx]
                emb = self.pooling.finish_single(values[idx], batch.outs[idx])
                self.emit_rows(Rows(np.array(done, dtype=np.int64), emb, np.array([single.pop(i) for i in done]),
                                    self.pooling.columns(len(done), None)))
                rest = np.flatnonzero(~one).tolist()
        finished = []
        if frames is not None:
            bounds = np.zeros(batch.size + 1, dtype=np.int64)
            np.cumsum(batch.outs, out=bounds[1:])
        index = batch.index.tolist()
        for j in rest:
            item = items[j]
            if item in self._failed:
                continue
            st = self._rows.get(item)
            if st is None:
                st = self._rows[item] = _Row()
            n = int(batch.outs[j])
            st.acc = self.pooling.combine(st.acc, values[j], n)
            st.frames += n
            st.windows += 1
            if frames is not None:
                st.frame_parts[index[j]] = frames[bounds[j] : bounds[j + 1]]
            if st.windows == st.total:
                finished.append(item)
        self._finish(finished)

    def _finish(self, items: list[int]) -> None:
        if not items:
            return
        rows = [self._rows.pop(i) for i in items]
        emb = np.stack([self.pooling.finish(st.acc, st.frames) for st in rows])
        frames = [np.concatenate([st.frame_parts[k] for k in sorted(st.frame_parts)]) for st in rows] if self.pooling.keeps_frames else None
        self.emit_rows(Rows(np.array(items, dtype=np.int64), emb, np.array([st.duration_s for st in rows]),
                            self.pooling.columns(len(rows), frames)))
