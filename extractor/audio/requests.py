"""Decode requests for a run's rows, and what each answer from the decode pool means for them.

No threads and no processes here: the producer (pipeline.py) iterates the requests into the
decode pool and hands every message it gets back to `Requests.answer`.

Grouping. Consecutive rows of one file share a request, so the file is read once (up to
MAX_SEGMENTS_PER_FILE rows: segments of one recording). Short clips are grouped so that a
request holds about REQUEST_AUDIO_S of audio, by the mean duration of the rows decoded so far:
dozens of 0.5 s clips go in one request (few messages), a podcast goes alone (no long tail of
one worker decoding while the others idle).

Retries. A request whose worker crashed fails its file only: its other files are retried one
per request, so the file that killed the worker is the only one that fails, and its message
names it. A worker killed from outside (the OOM killer, an operator) says nothing about its
files: they are tried once more, each on another worker, and fail only if that is killed too.
A file that had sent windows before is decoded again from its start, and the run is told its
earlier windows are void (Answer.retrying).

Audio stored in the manifest is read here, lazily, as requests are made: the job holds one row
group of it plus the requests in flight (manifest.embedded), never the column. A blob larger
than the most its row may take (sources.byte_cap of --max-duration-s) fails at once, unsent.
"""

from __future__ import annotations

import logging
import pickle
from collections import deque
from collections.abc import Iterator, Mapping
from contextlib import closing
from dataclasses import dataclass, field
from itertools import count

from ..ledger import Failure
from ..pending import Pending
from .decode import OPUS_DECODER, DecodeRequest, FileJob, WindowBlock
from .pool import END, WorkerFailure
from .sources import byte_cap

logger = logging.getLogger(__name__)

MAX_SEGMENTS_PER_FILE = 64  # rows of one file decoded together (the file is read once)
REQUEST_AUDIO_S = 20.0  # audio per decode request: many short clips in one, a long file alone
MAX_FILES_PER_REQUEST = 64
ROW = "__row"  # the manifest's row number of each pending row (manifest.read.ROW)


def files_per_request(mean_audio_s: float) -> int:
    """Files per decode request, for files of `mean_audio_s` on average: REQUEST_AUDIO_S of audio."""
    return int(min(MAX_FILES_PER_REQUEST, max(1, REQUEST_AUDIO_S // max(mean_audio_s, 1e-3))))


@dataclass(frozen=True)
class Limits:
    """What every request carries: the duration cap, how remote sources are read, and the Opus decoder."""

    max_duration_s: float
    storage_options: Mapping | None = None
    read_timeout_s: float = 30.0
    opus_decoder: str = OPUS_DECODER  # what the output's recipe decodes Ogg Opus with


@dataclass
class Answer:
    """What one message of the decode pool means for the run's rows."""

    block: WindowBlock | None = None  # windows for the batching stage
    decoded: list[tuple[int, int, float]] = field(default_factory=list)  # (item, windows, duration_s)
    failed: list[tuple[int, Failure]] = field(default_factory=list)
    retrying: list[int] = field(default_factory=list)  # rows decoded again from the start


@dataclass(eq=False)
class _Request:
    files: list[FileJob]
    open: set[int]  # rows neither decoded nor failed yet
    streamed: set[int] = field(default_factory=set)  # rows that sent windows


class Requests:
    """The requests of a run's pending rows (iterate), their retries (`retries()`), and what the
    pool's messages mean (`answer`). `blobs`: the manifest's audio (manifest.embedded), or None."""

    def __init__(self, rows: Pending, limits: Limits, blobs=None):
        self.rows, self.limits, self.blobs = rows, limits, blobs
        self._keys = count()
        self._outstanding: dict[int, _Request] = {}
        self._retries: list[tuple[int, DecodeRequest]] = []
        self._killed: set[int] = set()  # rows whose worker was killed from outside once
        self._unsent: deque[tuple[int, Failure]] = deque()  # rows failed before any request (oversized blobs); filled on the
        # thread that iterates the requests, drained on the one that answers
        self._rows_seen = 0
        self._audio_seen = 0.0

    # -- requests ---------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[int, DecodeRequest]]:
        files = self._files()
        while True:
            per_row = self._audio_seen / self._rows_seen if self._rows_seen else REQUEST_AUDIO_S
            group = [f for _, f in zip(range(files_per_request(per_row)), files)]
            if not group:
                return
            yield self._request(group)

    def retries(self) -> list[tuple[int, DecodeRequest]]:
        """Requests to try again, once the stream that failed them is over."""
        retries, self._retries = self._retries, []
        return retries

    def unsent(self) -> list[tuple[int, Failure]]:
        """Rows failed without a request (a blob over its cap), since the last call."""
        failed = []
        while self._unsent:
            failed.append(self._unsent.popleft())
        return failed

    def _files(self) -> Iterator[FileJob]:
        """FileJobs in the rows' order; consecutive rows of one file share one (read once)."""
        for first, frame in self.rows.chunks():
            n = frame.height
            paths = frame["path"].to_list()
            starts = frame["start_s"].to_list() if "start_s" in frame.columns else [None] * n
            ends = frame["end_s"].to_list() if "end_s" in frame.columns else [None] * n
            if self.blobs is not None:
                cap = byte_cap(self.limits.max_duration_s)
                with closing(self.blobs.blobs(frame[ROW].to_list())) as blobs:  # closes the manifest on every path
                    for i, data in zip(range(n), blobs, strict=True):
                        item = first + i
                        if data is not None and len(data) > cap:
                            self._unsent.append((item, Failure("TooLongError", f"cannot read {paths[i]}: too large: {len(data):,} "
                                                                f"bytes stored in the manifest, more than the {cap:,.0f} that "
                                                                f"{self.limits.max_duration_s:g} s of audio can take")))
                            continue
                        # Out of band: the worker gets the manifest's bytes without a copy into the pickle.
                        if data is not None and len(data):
                            data = pickle.PickleBuffer(data)
                        yield FileJob(paths[i], (item,), ((starts[i], ends[i]),), data)
                continue
            i = 0
            while i < n:
                j = i + 1
                while j < n and paths[j] == paths[i] and j - i < MAX_SEGMENTS_PER_FILE:
                    j += 1
                yield FileJob(paths[i], tuple(first + k for k in range(i, j)), tuple((starts[k], ends[k]) for k in range(i, j)))
                i = j

    def _request(self, files: list[FileJob]) -> tuple[int, DecodeRequest]:
        key = next(self._keys)
        self._outstanding[key] = _Request(files, {i for f in files for i in f.items})
        lim = self.limits
        return key, DecodeRequest(tuple(files), lim.max_duration_s, lim.storage_options, lim.read_timeout_s, lim.opus_decoder)

    # -- answers ----------------------------------------------------------------------------
    def answer(self, key: int, message) -> Answer:
        req = self._outstanding[key]
        if message is END:
            del self._outstanding[key]
            # Cannot happen: every row is reported decoded or failed. Guard it loudly.
            return Answer(failed=[(i, Failure("DecodeError", f"the decoder reported nothing for {self._name(req, i)}"))
                                  for i in sorted(req.open)])
        if isinstance(message, WorkerFailure):
            del self._outstanding[key]
            return self._failed(req, message)
        block: WindowBlock = message
        answer = Answer(block=block if len(block.items) else None)
        req.streamed.update(int(i) for i in block.items)
        for item, failure in block.failed:
            req.open.discard(item)
            answer.failed.append((item, failure))
        for item, windows, duration in block.done:
            req.open.discard(item)
            self._rows_seen += 1
            self._audio_seen += duration
            answer.decoded.append((item, windows, duration))
        return answer

    def _failed(self, req: _Request, message: WorkerFailure) -> Answer:
        left = [FileJob(f.name, tuple(i for i in f.items if i in req.open), tuple(s for i, s in zip(f.items, f.segments) if i in req.open), f.data)
                for f in req.files if any(i in req.open for i in f.items)]
        answer = Answer()
        if message.killed and not req.open & self._killed:
            self._killed.update(req.open)
            logger.warning("retrying %d row(s) of %s once on another decode worker", len(req.open), message.failure.message.rsplit(" on ", 1)[-1])
        elif len(req.files) == 1:
            answer.failed = [(i, message.failure) for i in sorted(req.open)]
            return answer
        # Crashed on one of several files, or killed from outside: each file again, alone.
        self._retries.extend(self._request([f]) for f in left)
        answer.retrying = sorted(req.open & req.streamed)
        return answer

    def _name(self, req: _Request, item: int) -> str:
        return next((f.name for f in req.files if item in f.items), str(item))

    @property
    def outstanding(self) -> int:
        return len(self._outstanding)
