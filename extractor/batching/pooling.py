"""Window outputs → one embedding per row: the mean of the valid output frames over all its windows.

Frame-weighted: a 5 s tail window counts for its 125 frames, not for half. Sums are kept in
float64 and divided once, so a row's vector does not depend on how its windows were batched
(only on each window's own float32 sum, which the device gives).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..output.writer import Rows
from .packing import Batch


@dataclass
class _Row:
    sum: np.ndarray | None = None  # (D,) float64
    frames: int = 0
    windows: int = 0
    total: int | None = None  # windows the row has; known once its decode is done
    duration_s: float = 0.0
    frame_parts: dict[int, np.ndarray] = field(default_factory=dict)


class RowPooling:
    """Accumulates window sums per row and hands finished rows (and failures) on, batch by batch.

    A row is finished when all its windows are back and its decode reported how many there are.
    A row that fails after some of its windows were sent (a truncation found at the end of a long
    file) is failed: its windows, processed or still to come, are dropped.
    """

    def __init__(self, d_model: int, keep_frames: bool, emit_rows: Callable[[Rows], None],
                 emit_failures: Callable[[np.ndarray, list], None]):
        self.d_model, self.keep_frames = d_model, keep_frames
        self.emit_rows, self.emit_failures = emit_rows, emit_failures
        self._rows: dict[int, _Row] = {}  # rows with windows back, or several windows
        self._single: dict[int, float] = {}  # rows of one window, none back yet: their duration
        self._failed: set[int] = set()

    def __len__(self) -> int:
        """Rows with windows or a total but not finished yet."""
        return len(self._rows) + len(self._single)

    def done(self, entries: list[tuple[int, int, float]]) -> None:
        """(item, windows, duration_s) of rows whose decode finished."""
        finished = []
        for item, total, duration in entries:
            st = self._rows.get(item)
            if st is None and total == 1 and not self.keep_frames:
                self._single[item] = duration  # the common case: finished in add(), vectorised
                continue
            st = self._rows.setdefault(item, _Row())
            st.total, st.duration_s = total, duration
            if st.windows == total:
                finished.append(item)
        self._finish(finished)

    def fail(self, items: np.ndarray, errors: list[Failure]) -> None:
        for item in items:
            self._rows.pop(int(item), None)
            self._single.pop(int(item), None)
            self._failed.add(int(item))
        self.emit_failures(np.asarray(items, dtype=np.int64), errors)

    def add(self, batch: Batch, sums: np.ndarray, frames: np.ndarray | None, frame_window: np.ndarray | None) -> None:
        """sums: (B, D) float32 sum of each window's valid output frames; frames: (N, D) or None."""
        items = batch.items.tolist()
        rest = range(len(items))
        single = self._single
        if single:
            # Rows of one window (short clips, ~1000 a batch): finished here in one vectorised step.
            one = np.fromiter((i in single for i in items), dtype=bool, count=len(items))
            if one.any():
                idx = np.flatnonzero(one)
                done = [items[j] for j in idx]
                emb = (sums[idx].astype(np.float64) / batch.outs[idx, None]).astype(np.float32)
                self.emit_rows(Rows(np.array(done, dtype=np.int64), emb, np.array([single.pop(i) for i in done])))
                rest = np.flatnonzero(~one).tolist()
        finished = []
        if self.keep_frames:
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
            st.sum = sums[j].astype(np.float64) if st.sum is None else st.sum + sums[j]
            st.frames += int(batch.outs[j])
            st.windows += 1
            if self.keep_frames:
                st.frame_parts[index[j]] = frames[bounds[j] : bounds[j + 1]]
            if st.windows == st.total:
                finished.append(item)
        self._finish(finished)

    def _finish(self, items: list[int]) -> None:
        if not items:
            return
        rows = [self._rows.pop(i) for i in items]
        emb = np.stack([(st.sum / st.frames).astype(np.float32) for st in rows])
        frames = None
        if self.keep_frames:
            frames = [np.concatenate([st.frame_parts[k] for k in sorted(st.frame_parts)]) for st in rows]
        self.emit_rows(Rows(np.array(items, dtype=np.int64), emb, np.array([st.duration_s for st in rows]), frames))
