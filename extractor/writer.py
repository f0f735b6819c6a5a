"""The write stage: finished rows and failure records → committed Parquet parts, on its own thread."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

import numpy as np
import polars as pl
import pyarrow as pa

from .constants import OUTPUT_FRAME_RATE_HZ
from .manifest import Manifest
from .output import OutputDir
from .progress import Progress
from .recipe import METADATA_KEY, Recipe

logger = logging.getLogger(__name__)


def nonfinite_failure(emb: np.ndarray, frames: np.ndarray | None, path: str) -> str | None:
    """The failure record of a row whose embedding is not finite; None when it is.

    Finite samples can still overflow float32 inside the encoder (a float WAV holding 1e20 gives
    an infinite STFT power, found by tests/test_fuzz.py): such a row becomes a failure record,
    never a NaN in the dataset.
    """
    if np.isfinite(emb).all() and (frames is None or np.isfinite(frames).all()):
        return None
    return f"NonFiniteEmbedding: the encoder gave NaN/Inf for {path} (samples too large for float32?)"


class PartWriter:
    """Collects finished rows and failures; commits a part when it is big or old enough."""

    def __init__(
        self,
        out: OutputDir,
        manifest: Manifest,
        pending: pl.DataFrame,
        recipe: Recipe,
        progress: Progress,
        *,
        keep_columns: tuple[str, ...] = (),
        part_rows: int = 10_000,
        part_bytes: int = 256 << 20,
        commit_seconds: float = 60.0,
        gate: Callable[[], None] | None = None,
    ):
        self.out, self.manifest, self.pending, self.recipe, self.progress = out, manifest, pending, recipe, progress
        self.d_model, self.pooling, self.output_dtype = recipe.d_model, recipe.pooling, recipe.output_dtype
        self.part_rows, self.part_bytes, self.commit_seconds = part_rows, part_bytes, commit_seconds
        self.seq = out.next_seq()
        self.rows: list[tuple[int, np.ndarray, np.ndarray | None, float]] = []
        self.failures: list[tuple[int, str]] = []
        self.bytes = 0
        self.first_at: float | None = None
        self.embedded = self.failed = 0
        self.audio_s = 0.0
        self._q: queue.Queue = queue.Queue(maxsize=4096)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="writer", daemon=True)
        self._kept = list(keep_columns)
        self._meta = {METADATA_KEY: recipe.to_json().encode()}
        self._gate = gate  # called (and awaited) before the first commit: see LoadedModel.adapter_check

    def start(self) -> None:
        self._thread.start()

    def put_row(self, item, emb, frames, duration) -> None:
        self._check()
        self._q.put(("row", (item, emb, frames, duration)))

    def put_failure(self, item: int, error: str) -> None:
        self._check()
        self._q.put(("fail", (item, error)))

    def close(self) -> None:
        self._q.put(("close", None))
        self._thread.join()
        self._check()

    def _check(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"writing the output failed: {self.error}") from self.error

    def _loop(self) -> None:
        closing = False
        try:
            while True:
                try:
                    kind, payload = self._q.get(timeout=1.0)
                except queue.Empty:
                    kind, payload = "tick", None
                if kind == "row" and (error := nonfinite_failure(payload[1], payload[2], self.pending["path"][payload[0]])):
                    self.failures.append((payload[0], error))
                    self.first_at = self.first_at or time.monotonic()
                elif kind == "row":
                    self.rows.append(payload)
                    self.bytes += payload[1].nbytes + (payload[2].nbytes if payload[2] is not None else 0)
                    self.first_at = self.first_at or time.monotonic()
                elif kind == "fail":
                    self.failures.append(payload)
                    self.first_at = self.first_at or time.monotonic()
                elif kind == "close":
                    closing = True
                    self._commit()
                    return
                n = len(self.rows) + len(self.failures)
                if n and (
                    n >= self.part_rows
                    or self.bytes >= self.part_bytes
                    or time.monotonic() - self.first_at >= self.commit_seconds
                ):
                    self._commit()
        except BaseException as e:  # surfaced to the device loop through _check()
            logger.error("writer failed: %s", e)
            self.error = e
            if closing:
                # The last commit failed: close() is already waiting and no other "close" comes,
                # so draining for one would hang the run forever.
                return
            # Keep draining so producers never block on a dead writer.
            while True:
                try:
                    if self._q.get(timeout=0.1)[0] == "close":
                        return
                except queue.Empty:
                    continue

    def _commit(self) -> None:
        if self._gate is not None and (self.rows or self.failures):
            self._gate()
            self._gate = None
        name = f"part-{self.out.shard.tag}-{self.seq:06d}.parquet"
        if self.rows:
            self.out.commit_table(self._rows_table(), name, failures=False)
        if self.failures:
            self.out.commit_table(self._failures_table(), name, failures=True)
        if self.rows or self.failures:
            self.seq += 1
            audio = sum(r[3] for r in self.rows)
            self.embedded += len(self.rows)
            self.failed += len(self.failures)
            self.audio_s += audio
            self.progress.update(len(self.rows) + len(self.failures), len(self.failures), audio)
        self.rows, self.failures, self.bytes, self.first_at = [], [], 0, None

    def _rows_table(self) -> pa.Table:
        items = [r[0] for r in self.rows]
        base = self.pending[items]
        np_dtype = np.float16 if self.output_dtype == "float16" else np.float32
        pa_type = pa.float16() if self.output_dtype == "float16" else pa.float32()
        emb = np.stack([r[1] for r in self.rows]).astype(np_dtype)
        cols = {
            "id": self.manifest.to_arrow("id", base["id"]),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), type=pa_type), self.d_model),
            "duration_s": pa.array([r[3] for r in self.rows], type=pa.float64()),
        }
        if self.pooling == "none":
            counts = np.array([len(r[2]) for r in self.rows], dtype=np.int32)
            flat = np.concatenate([r[2] for r in self.rows]).astype(np_dtype)
            inner = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), type=pa_type), self.d_model)
            offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
            cols["frames"] = pa.ListArray.from_arrays(offsets, inner)
            cols["frame_rate_hz"] = pa.array(np.full(len(items), OUTPUT_FRAME_RATE_HZ), type=pa.float64())
        for c in self._kept:
            cols[c] = self.manifest.to_arrow(c, base[c])
        return pa.table(cols).replace_schema_metadata(self._meta)

    def _failures_table(self) -> pa.Table:
        items = [f[0] for f in self.failures]
        base = self.pending[items]
        return pa.table(
            {"id": self.manifest.to_arrow("id", base["id"]), "path": self.manifest.to_arrow("path", base["path"]), "error": pa.array([f[1] for f in self.failures], type=pa.string())}
        ).replace_schema_metadata(self._meta)
