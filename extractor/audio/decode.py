"""Decode audio into the encoder's input: mono float32 at SAMPLE_RATE, cut into 30 s windows.

libsndfile (via soundfile) reads what it can open (wav, flac, ogg vorbis, mp3, aiff, ...); PyAV
(FFmpeg) reads the rest (m4a/aac, webm, video containers), and every Opus stream, which it decodes
with libopus (see OPUS_DECODER). Every per-file problem is an AudioError (audio.errors) whose
message names the problem and the file.

Memory is bounded by a window, never by a file or by what a header claims. The source is read in
blocks of BLOCK_SECONDS, each block is downmixed at once and fed to a streaming resampler, and the
16 kHz signal passes through one sliding buffer from which each row's windows are cut as soon as
they are complete: the buffer holds at most one window plus a block, however long the file and
however many segments of it are wanted (issue 10: a 14-minute podcast's first window is on the
GPU while the rest decodes; 64 segments of one file cost one window of memory, not 64 copies).

Segments are cut on the 16 kHz signal, at `round(t * SAMPLE_RATE)`, so a segment's samples do
not depend on the source rate. Only the region a segment needs is read: libsndfile seeks to a
little before it (see `_run_pass` for why the cut then equals slicing the full decode).

Native decoders can still crash or hang on malformed files; isolating that is the job of
audio.pool, not of this module.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

import numpy as np
import soundfile as sf
import soxr

from ..ledger import Failure
from ..constants import N_SAMPLES, SAMPLE_RATE, encoder_tokens, mel_frames, output_frames
from ..options import DEFAULT_MAX_DURATION_S, DEFAULT_READ_TIMEOUT_S
from . import mp3
from .errors import AudioError, DecodeError, SegmentError, TooLongError, TooShort
from .pcm import downmix, to_float32
from .sources import Source, open_source

logger = logging.getLogger(__name__)

__all__ = ["AudioError", "DecodeError", "Decoded", "DecodeRequest", "FileJob", "SegmentError", "TooLongError", "TooShort",
           "WindowBlock", "decode_request", "has_output_frame", "load_array", "load_audio", "load_segments", "too_short"]

BLOCK_SECONDS = 2.0  # source audio read per step; 96 kHz x 8 ch float32 is 6 MB
MAX_BLOCK_VALUES = 1 << 22  # frames x channels per block (16 MB float32), for absurd channel counts
# Hz; below or above these a header is broken or hostile, not audio. Telephone audio is 8 kHz; a
# header that claims 1 Hz makes the resampler produce 16,000 samples of each one.
MIN_SAMPLE_RATE = 1_000
MAX_SAMPLE_RATE = 1_000_000
RESAMPLE_QUALITY = "HQ"
MAX_SEGMENT_TIME_S = 1e9  # ~32 years: larger start/end values are data errors
# A length a header or container declares is trusted to this much when it refuses a row before
# decoding: codecs' priming and padding make the decoded length differ by tens of ms. A row
# declared within it of max_duration_s is decoded, and refused if it is too long.
DECLARED_SLACK_S = 1.0
# Audio read before a segment so the resampler's filter is warmed up when the segment begins.
# soxr HQ needs well under 10 ms at any rate (measured: 50 ms already gives < 1e-6 difference).
RESAMPLE_MARGIN_S = 0.1
# Segments closer than this are decoded in one pass; farther apart, libsndfile seeks instead.
SEGMENT_GAP_S = 30.0
# A worker sends what it has cut once it holds this many samples (2 MB, about half a minute of audio),
# and at the end of each request: few messages for short clips, little latency for long files.
FLUSH_SAMPLES = 1 << 19
# How Opus is decoded, whatever its container (Ogg, WebM, Matroska, MP4): PyAV demuxes, FFmpeg's
# wrapper of libopus (the reference decoder) decodes at 48 kHz, soxr HQ resamples as for any other
# file. libsndfile runs another build of the same libopus on Ogg Opus, slower, and read in blocks
# it leaves the pre-skip in some streams; FFmpeg's own Opus decoder upsamples SILK frames with
# another filter, so at speech bitrates it is not the same signal (bench/RESULTS.md, "Opus
# decoders"). The recipe records this choice (Recipe.opus_decoder).
OPUS_DECODER = "ffmpeg-libopus"
# RFC 7845: an Ogg Opus stream's first page holds its OpusHead packet alone. Bytes read to see it:
# the page header (27), its segment table (at most 255) and the packet's magic.
_OGG_OPUS_SNIFF_BYTES = 27 + 255 + 8
# A WAV/AIFF data chunk that declares this many bytes or more is a streaming writer's
# "length unknown" placeholder (0xFFFFFFFF, 0x7FFFFFFF, ...), not a truncated file.
_UNKNOWN_LENGTH_BYTES = 0x7FFF0000
# libsndfile logs a data chunk that runs past the end of the file as "data : 96000 (should be 47978)".
_CLAMPED_CHUNK = re.compile(r"^\s*(?:data|SSND)\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)

Segment = tuple[float | None, float | None]  # (start_s, end_s); None means the file's start / end


# --- requests and results -------------------------------------------------------------------


@dataclass(frozen=True)
class FileJob:
    """One file and the rows (`items`) wanted from it, each a segment (or the whole file)."""

    name: str  # path or URL; for embedded audio, what messages call it
    items: tuple[int, ...]
    segments: tuple[Segment, ...]
    data: bytes | None = None  # audio stored in the manifest


@dataclass(frozen=True)
class DecodeRequest:
    """What a decode worker is asked to do: several files, decoded in order (see audio.pool)."""

    files: tuple[FileJob, ...]
    max_duration_s: float = DEFAULT_MAX_DURATION_S
    storage_options: Mapping | None = None  # fsspec options for a "://" path
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S  # a remote read that stalls this long fails
    # OPUS_DECODER, or "libsndfile" for an output whose recipe was computed with it: a resume keeps
    # what its output computed (recipe.Recipe.opus_decoder).
    opus_decoder: str = OPUS_DECODER


@dataclass
class WindowBlock:
    """Windows ready for the encoder, and which rows are done or failed: one worker message.

    A row's windows may come in several blocks (a long file streams); its `done` entry comes with
    or after its last window, and a row is either done or failed, never both. A row that fails
    after some of its windows were sent (a truncation found at the end of the file) is failed:
    the windows already sent are dropped by whoever receives them.
    """

    samples: np.ndarray  # (S,) float32: every window's samples, back to back
    lengths: np.ndarray  # (W,) int64 samples per window
    items: np.ndarray  # (W,) int64 the row of each window
    index: np.ndarray  # (W,) int64 the window's position within its row
    done: list[tuple[int, int, float]] = field(default_factory=list)  # (item, windows, duration_s)
    failed: list[tuple[int, Failure]] = field(default_factory=list)  # (item, why)


@dataclass(frozen=True)
class Decoded:
    samples: np.ndarray  # float32, mono, SAMPLE_RATE, C-contiguous
    duration_s: float  # len(samples) / SAMPLE_RATE


# --- the worker's entry point ---------------------------------------------------------------


def decode_request(request: DecodeRequest) -> Iterator[WindowBlock]:
    """The decode function of audio.pool.DecodePool: a picklable top-level generator whose blocks
    the pool streams to the job as they fill."""
    out = _Blocks()
    for job in request.files:
        for _ in _decode_job(job, out, request.max_duration_s, request.storage_options, request.read_timeout_s, request.opus_decoder):
            yield from out.ready()  # a long file streams: its first windows go while it decodes
        yield from out.ready()
    if not out.empty:
        yield out.take()


class _Blocks:
    """Collects windows into blocks, dropping windows too short for an output frame (a 20 ms tail
    adds nothing to a row) and failing rows left with none (TooShort)."""

    def __init__(self):
        self._reset()
        self._full: list[WindowBlock] = []

    def _reset(self) -> None:
        self.parts: list[np.ndarray] = []
        self.meta: list[tuple[int, int, int]] = []  # (item, index, length)
        self.done: list[tuple[int, int, float]] = []
        self.failed: list[tuple[int, Failure]] = []
        self.samples = 0

    @property
    def empty(self) -> bool:
        return not (self.meta or self.done or self.failed)

    def window(self, item: int, index: int, samples: np.ndarray) -> bool:
        """Add a window; False when it is too short to count (and is dropped)."""
        if not has_output_frame(len(samples)):
            return False
        self.parts.append(samples)
        self.meta.append((item, index, len(samples)))
        self.samples += len(samples)
        if self.samples >= FLUSH_SAMPLES:
            self._full.append(self.take())
        return True

    def row_done(self, item: int, windows: int, duration_s: float, name: str) -> None:
        if windows == 0:
            self.row_failed(item, Failure.of(too_short(name, round(duration_s * SAMPLE_RATE))))
        else:
            self.done.append((item, windows, duration_s))

    def row_failed(self, item: int, error: Failure) -> None:
        self.failed.append((item, error))

    def ready(self) -> list[WindowBlock]:
        full, self._full = self._full, []
        return full

    def take(self) -> WindowBlock:
        meta = np.array(self.meta, dtype=np.int64).reshape(-1, 3)
        block = WindowBlock(
            samples=np.concatenate(self.parts) if self.parts else np.zeros(0, np.float32),
            lengths=meta[:, 2].copy(), items=meta[:, 0].copy(), index=meta[:, 1].copy(),
            done=self.done, failed=self.failed,
        )
        self._reset()
        return block


class _Collect:
    """A sink that keeps each row's whole signal (load_segments: tests and the notebook API)."""

    def __init__(self):
        self.windows: dict[int, list[np.ndarray]] = {}
        self.results: dict[int, Decoded | AudioError] = {}

    def window(self, item: int, index: int, samples: np.ndarray) -> bool:
        self.windows.setdefault(item, []).append(np.array(samples, dtype=np.float32))
        return True

    def row_done(self, item: int, windows: int, duration_s: float, name: str) -> None:
        parts = self.windows.pop(item, [])
        samples = np.ascontiguousarray(np.concatenate(parts) if parts else np.zeros(0, np.float32))
        self.results[item] = Decoded(samples, len(samples) / SAMPLE_RATE)

    def row_failed(self, item: int, error: AudioError) -> None:
        self.windows.pop(item, None)
        self.results[item] = error


def _decode_job(job: FileJob, sink, max_duration_s: float, storage_options: Mapping | None,
                read_timeout_s: float = DEFAULT_READ_TIMEOUT_S, opus_decoder: str = OPUS_DECODER) -> Iterator[None]:
    """Decode one file's rows into `sink` (window / row_done / row_failed); never raises AudioError.

    A generator that yields after each decoded block, so the caller can pass on what is cut."""
    max_samples = _max_samples(max_duration_s)
    spans: list[_Span] = []
    for item, (start_s, end_s) in zip(job.items, job.segments):
        try:
            spans.append(_Span(item, start_s, end_s, *_segment_indices(job.name, start_s, end_s)))
        except SegmentError as e:
            _fail(sink, item, e)
    if not spans:
        return
    try:
        # How far into the file the rows reach bounds the bytes it may take (sources.byte_cap).
        extent = max(sp.b if sp.b is not None else sp.a + (max_samples if max_samples is not None else math.inf) for sp in spans)
        source = open_source(job.name, data=job.data, max_duration_s=max_duration_s, extent_s=extent / SAMPLE_RATE,
                             storage_options=storage_options, read_timeout_s=read_timeout_s)
        yield from _decode_spans(source, spans, sink, max_samples, max_duration_s, opus_decoder)
    except AudioError as e:
        for sp in spans:
            if not sp.reported:
                sp.reported = True
                _fail(sink, sp.item, e)
        return
    _report(spans, sink, job.name)


def _max_samples(max_duration_s: float) -> int | None:
    if not max_duration_s > 0:
        raise ValueError(f"max_duration_s must be > 0, got {max_duration_s!r}")
    return math.floor(max_duration_s * SAMPLE_RATE) if math.isfinite(max_duration_s) else None


def _report(spans: list[_Span], sink, name: str) -> None:
    """Each span's row, done or failed, once."""
    for sp in spans:
        if not sp.reported:
            sp.reported = True
            if sp.error is not None:
                _fail(sink, sp.item, sp.error)
            else:
                sink.row_done(sp.item, sp.windows, sp.n / SAMPLE_RATE, name if sp.whole else f"{sp.describe()} of {name}")


def _fail(sink, item: int, error: AudioError) -> None:
    sink.row_failed(item, error if isinstance(sink, _Collect) else Failure.of(error))


def load_audio(path: str | os.PathLike, *, start_s: float | None = None, end_s: float | None = None,
               max_duration_s: float = DEFAULT_MAX_DURATION_S) -> Decoded:
    """Decode `path` (or its [start_s, end_s) part) to mono float32 at SAMPLE_RATE; AudioError if not."""
    (result,) = load_segments(path, [(start_s, end_s)], max_duration_s=max_duration_s)
    if isinstance(result, AudioError):
        raise result
    return result


def load_array(samples: np.ndarray, sample_rate: int, *, name: str = "array",
               max_duration_s: float = DEFAULT_MAX_DURATION_S) -> Decoded:
    """Samples in memory, (frames,) or (frames, channels), integer PCM or float, at `sample_rate`,
    to mono float32 at SAMPLE_RATE exactly as a file of them decodes (the same blocks, downmix,
    checks and streaming resampler); AudioError naming `name` if they cannot be embedded."""
    sink = _Collect()
    span = _Span(0, None, None, 0, None)
    try:
        for _ in _decode_spans(_ArraySource(samples, sample_rate, name), [span], sink, _max_samples(max_duration_s), max_duration_s):
            pass
    except AudioError:
        raise
    _report([span], sink, name)
    result = sink.results[0]
    if isinstance(result, AudioError):
        raise result
    return result


def has_output_frame(samples: int) -> bool:
    """Audio of `samples` at SAMPLE_RATE gives the encoder at least one output frame (its first
    window is its longest)."""
    return output_frames(encoder_tokens(mel_frames(min(samples, N_SAMPLES)))) >= 1


def too_short(name: str, samples: int) -> TooShort:
    return TooShort(f"{name} is too short ({samples / SAMPLE_RATE * 1000:.1f} ms) for one output frame")


def load_segments(path: str | os.PathLike, segments: Sequence[Segment], *, max_duration_s: float = DEFAULT_MAX_DURATION_S,
                  storage_options: Mapping | None = None, data: bytes | None = None) -> list[Decoded | AudioError]:
    """Decode several segments of one file, reading it once: a Decoded or the AudioError of each.

    One bad segment does not fail the others; a file-level error is returned for every segment.
    """
    sink = _Collect()
    job = FileJob(os.fspath(path), tuple(range(len(segments))), tuple(segments), data)
    for _ in _decode_job(job, sink, max_duration_s, storage_options):
        pass
    return [sink.results[i] for i in range(len(segments))]


# --- segments -------------------------------------------------------------------------------


class _Span:
    """One row: a segment in 16 kHz sample indices [a, b) (b None: to the end of the file)."""

    def __init__(self, item: int, start_s, end_s, a: int, b: int | None):
        self.item, self.start_s, self.end_s, self.a, self.b = item, start_s, end_s, a, b
        self.next = a  # where its next window starts
        self.windows = 0  # windows sent (too-short tails are not counted)
        self.n = 0  # samples cut so far
        self.error: AudioError | None = None
        self.finished = False  # nothing more to cut (done, or failed)
        self.reported = False  # row_done or row_failed was called

    @property
    def whole(self) -> bool:
        return self.a == 0 and self.b is None

    def describe(self) -> str:
        return f"segment start_s={self.start_s!r}, end_s={self.end_s!r}"


class _Cutter:
    """The sliding 16 kHz buffer of one pass, from which every span's windows are cut.

    The buffer holds samples from the earliest next-window start of an unfinished span to the end
    of what is decoded: at most N_SAMPLES plus a block, however many spans there are.
    """

    def __init__(self, spans: list[_Span], sink, max_samples: int | None, max_duration_s: float, name: str):
        self.spans, self.sink, self.max_samples, self.max_duration_s, self.name = spans, sink, max_samples, max_duration_s, name
        self.buf = np.zeros(0, np.float32)
        self.base = 0  # absolute index of buf[0]

    def feed(self, out: np.ndarray, out_pos: int) -> Iterator[None]:
        """Take 16 kHz samples starting at absolute index out_pos; cut what is complete, yielding
        after each window (so a caller can send it on before the next: 64 overlapping segments
        complete several windows per block). Returns the new end position."""
        end = out_pos + len(out)
        if len(out):
            if not len(self.buf):
                self.buf, self.base = out, out_pos
            else:
                assert self.base + len(self.buf) == out_pos, (self.base, len(self.buf), out_pos)
                self.buf = np.concatenate([self.buf, out])
        for sp in self.spans:
            if sp.finished:
                continue
            while True:
                stop = sp.next + N_SAMPLES if sp.b is None else min(sp.next + N_SAMPLES, sp.b)
                if stop > end:
                    break
                self._cut(sp, sp.next, stop)
                yield
                if sp.finished or (sp.b is not None and stop >= sp.b):
                    sp.finished = True
                    break
            if not sp.finished and sp.b is None and self.max_samples is not None and end - sp.a > self.max_samples:
                self._too_long(sp)
        self._trim(end)
        return end

    def finish(self, total: int) -> Iterator[None]:
        """End of the file at `total` samples: cut every span's last, partial window."""
        for sp in self.spans:
            if sp.finished:
                continue
            stop = total if sp.b is None else min(sp.b, total)
            if stop > sp.next:
                self._cut(sp, sp.next, stop)
                yield
            sp.finished = True
        self.buf = np.zeros(0, np.float32)

    def _cut(self, sp: _Span, lo: int, hi: int) -> None:
        sp.n += hi - lo
        if self.max_samples is not None and sp.n > self.max_samples:
            self._too_long(sp)
            return
        if self.sink.window(sp.item, sp.windows, self.buf[lo - self.base : hi - self.base]):
            sp.windows += 1
        sp.next = hi

    def _too_long(self, sp: _Span) -> None:
        what = self.name if sp.whole else f"{sp.describe()} of {self.name}"
        sp.error = TooLongError(f"{what} is longer than max_duration_s={self.max_duration_s:g}")
        sp.finished = True

    def _trim(self, end: int) -> None:
        keep = min([sp.next for sp in self.spans if not sp.finished] + [end])
        if keep > self.base:
            self.buf = self.buf[keep - self.base :]
            self.base = keep
            if not len(self.buf):
                self.buf = np.zeros(0, np.float32)


# --- segments (validation) -----------------------------------------------------------------


def _segment_indices(path: str, start_s, end_s) -> tuple[int, int | None]:
    """Validate a segment and turn it into 16 kHz sample indices."""

    def bad(reason: str) -> SegmentError:
        return SegmentError(f"bad segment start_s={start_s!r}, end_s={end_s!r} for {path}: {reason}")

    try:
        start = 0.0 if start_s is None else float(start_s)
        end = math.inf if end_s is None else float(end_s)
    except (TypeError, ValueError) as e:
        raise bad("start_s and end_s must be numbers or None") from e
    if not math.isfinite(start) or start < 0:
        raise bad("start_s must be a finite number >= 0")
    if math.isnan(end) or end <= start:
        raise bad("end_s must be greater than start_s")
    if start > MAX_SEGMENT_TIME_S or (math.isfinite(end) and end > MAX_SEGMENT_TIME_S):
        # round(1e308 * 16000) overflows; no audio is this long, so say so for this row alone.
        raise bad(f"times over {MAX_SEGMENT_TIME_S:.0e} s are not plausible")
    a = round(start * SAMPLE_RATE)
    if math.isinf(end):
        return a, None  # an end past the file's end is clipped, +inf included
    b = round(end * SAMPLE_RATE)
    if b <= a:
        raise bad(f"shorter than one sample at {SAMPLE_RATE} Hz")
    return a, b


def _clusters(spans: list[_Span], gap: int) -> list[list[_Span]]:
    """Group spans that lie close together, so each group is read in one pass."""
    groups: list[list[_Span]] = []
    end: float = -math.inf
    for sp in sorted(spans, key=lambda s: s.a):
        if groups and sp.a <= end + gap:
            groups[-1].append(sp)
        else:
            groups.append([sp])
            end = -math.inf
        end = max(end, math.inf if sp.b is None else sp.b)
    return groups




# --- decoding -------------------------------------------------------------------------------


def _decode_spans(src: Source | _ArraySource, spans: list[_Span], sink, max_samples: int | None,
                  max_duration_s: float, opus_decoder: str = OPUS_DECODER) -> Iterator[None]:
    """Cut every span's windows into `sink`; raise AudioError for problems of the whole file."""
    path = src.name
    try:
        source = _open(src, opus_decoder) if isinstance(src, Source) else src
        try:
            spans = _refuse_declared_too_long(source, path, spans, max_samples, max_duration_s)
            if not spans:
                groups = []
            elif source.seekable:
                groups = _clusters(spans, round(SEGMENT_GAP_S * SAMPLE_RATE))
            else:
                groups = [spans]  # PyAV is read once from the start (see _AvSource)
            for group in groups:
                yield from _run_pass(source, path, group, sink, max_samples, max_duration_s)
        finally:
            source.close()
            src.close()
    except AudioError:
        raise
    except Exception as e:
        if _out_of_memory(e):
            raise
        # Native decoders fail on hostile files in many ways (LibsndfileError, FFmpegError,
        # OSError, ValueError, ...); all of them mean "this file cannot be decoded".
        raise DecodeError(f"cannot decode {path}: {type(e).__name__}: {e}") from e


def _refuse_declared_too_long(source, path: str, spans: list[_Span], max_samples: int | None,
                              max_duration_s: float) -> list[_Span]:
    """Fail, before anything is decoded, the spans that the file's declared length makes longer
    than max_duration_s (a 3 h file is not decoded for 2 h to learn that); the others, to decode.

    A declared length that is wrong makes no row wrong: one that claims too much fails a file
    that is broken anyway (its decode would end short), and one that claims too little is checked
    by the decode (check_complete) and by the cutter, which counts what it cuts."""
    declared = source.declared_frames
    if declared is None or max_samples is None:
        return spans
    total = _resampled_length(declared, source.rate)
    slack = round(DECLARED_SLACK_S * SAMPLE_RATE)
    keep = []
    for sp in spans:
        end = total if sp.b is None else min(sp.b, total)
        if end - sp.a > max_samples + slack:
            # The message the cutter would give: a row's record does not depend on when it was judged.
            what = path if sp.whole else f"{sp.describe()} of {path}"
            sp.error = TooLongError(f"{what} is longer than max_duration_s={max_duration_s:g}")
            sp.finished = True
        else:
            keep.append(sp)
    return keep


def _out_of_memory(e: Exception) -> bool:
    """This process ran out of memory: a resource problem, not a verdict on the file.

    PyAV's av.error.MemoryError is also a MemoryError, but it is FFmpeg's ENOMEM, which a
    hostile file provokes by declaring absurd sizes: that one is the file's fault.
    """
    return isinstance(e, MemoryError) and not type(e).__module__.startswith("av.")


def _open(src: Source, opus_decoder: str = OPUS_DECODER) -> _SndFileSource | _AvSource:
    """Open a source with libsndfile, or with FFmpeg what libsndfile cannot read (and Ogg Opus,
    unless `opus_decoder` is "libsndfile")."""
    path = src.name
    if not src.seekable:
        return _open_av(src, "libsndfile must seek and this source reads forward only (a server without byte ranges)")
    if opus_decoder == OPUS_DECODER and _is_ogg_opus(src.read_at(0, _OGG_OPUS_SNIFF_BYTES)):
        return _open_av(src, f"Ogg Opus is decoded by {OPUS_DECODER}")
    try:
        fd = src.descriptor()
        handle = sf.SoundFile(src.fileobj() if fd is None else fd, closefd=False)
    except Exception as e:
        src.check()  # a read that failed (cap, timeout) is the reason, not the format
        # libsndfile's own words ("Format not recognised."), without soundfile's "Error opening
        # <what it was given>" in front: a descriptor number or a file object's repr names nothing.
        why = e.error_string if isinstance(e, sf.LibsndfileError) else f"{type(e).__name__}: {e}"
        logger.debug("libsndfile cannot open %s (%s); trying PyAV", path, why)
        return _open_av(src, f"not a format libsndfile reads ({why})")
    try:
        src.check()
        length = None
        if handle.format == "MP3":
            # libsndfile stops reading an MP3 at the length it believes: mpg123's guess from the
            # file size and first frame unless a Xing/Info header gives the count (measured: a
            # VBR MP3 without one decodes to 28% of its length, one with a VBRI header to 56%,
            # silently). FFmpeg reads to the end of the stream, so it takes those (mp3.py).
            length = mp3.declared_length(src.read_at)
            if length is None:
                guessed = mp3.variable_bitrate(src.read_at)
            else:
                guessed = length.header == "VBRI" or abs(handle.frames - length.samples) > length.samples_per_frame
            src.check()
            if guessed:
                handle.close()
                return _open_av(src, "libsndfile can only guess this MP3's length")
        source = _SndFileSource(src, handle, length)
    except BaseException:
        handle.close()
        raise
    if source.frames == 0:
        # A WAV from a streaming writer may declare a data size of 0; libsndfile then sees no
        # frames while FFmpeg reads to the end of the file. A header-only file fails either way.
        source.close()
        return _open_av(src, "libsndfile finds no audio frames")
    return source


def _is_ogg_opus(head: bytes) -> bool:
    """`head` (the file's first bytes) starts an Ogg stream whose first packet is an OpusHead."""
    if len(head) < 27 or head[:4] != b"OggS":
        return False
    start = 27 + head[26]  # the first packet follows the page's segment table
    return head[start : start + 8] == b"OpusHead"


def _open_av(src: Source, why_not_libsndfile: str) -> _AvSource:
    path = src.name
    try:
        return _AvSource(src)
    except AudioError:
        raise
    except Exception as e:
        if _out_of_memory(e):
            raise
        src.check()
        raise DecodeError(
            f"cannot decode {path}: {why_not_libsndfile} and FFmpeg cannot open it ({type(e).__name__}: {e})"
        ) from e


def _check_format(path: str, rate, channels) -> None:
    if not channels or channels < 1:
        raise DecodeError(f"cannot decode {path}: audio has {channels} channels")
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise DecodeError(
            f"cannot decode {path}: implausible sample rate {rate} Hz "
            f"(accepted: {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz)"
        )


def _block_frames(rate: int, channels: int) -> int:
    return max(1, min(int(rate * BLOCK_SECONDS), MAX_BLOCK_VALUES // max(channels, 1)))


def _resampled_length(frames: int, rate: int) -> int:
    """How many samples soxr's stream makes of `frames` at `rate`: round half up (measured)."""
    if rate == SAMPLE_RATE:
        return frames
    return (2 * frames * SAMPLE_RATE + rate) // (2 * rate)


class _SndFileSource:
    """A file libsndfile opened; it can seek, so segments read only what they need."""

    seekable = True

    def __init__(self, src: Source, handle: sf.SoundFile, mp3_length: mp3.Mp3Length | None = None):
        path = src.name
        self._f = handle
        self._src = src
        self.rate = int(handle.samplerate)
        self.channels = int(handle.channels)
        _check_format(path, self.rate, self.channels)
        # libsndfile clamps a data chunk that runs past the end of the file and carries on; a file
        # cut short (a broken download, a header with no data) must fail rather than give a part.
        m = _CLAMPED_CHUNK.search(handle.extra_info)
        if m and int(m.group(2)) < int(m.group(1)) < _UNKNOWN_LENGTH_BYTES:
            raise DecodeError(
                f"cannot decode {path}: truncated file (header declares {m.group(1)} bytes of "
                f"audio data, the file holds {m.group(2)})"
            )
        self.frames = int(handle.frames)
        self._path = path
        # For an MP3, libsndfile's count is the Xing/Info header's, which a stream cut short
        # does not change: the header is checked on its own (mp3.py). Elsewhere it is exact.
        self._claimed_frames = None if handle.format == "MP3" else self.frames
        self._mp3 = mp3_length if mp3_length is not None and mp3_length.sample_rate == self.rate else None
        # What the header declares: libsndfile's count, but for an MP3 only its info header's
        # (without one, libsndfile's count is a guess from the file's size).
        self.declared_frames = self._mp3.samples if self._mp3 is not None else self._claimed_frames

    def blocks(self, start: int) -> Iterator[np.ndarray]:
        f = self._f
        if start and start >= f.frames:
            return  # seeking past the end fails in libsndfile; there is nothing there anyway
        f.seek(start)
        n = _block_frames(self.rate, self.channels)
        # The position is counted here: soundfile's tell() is a seek, which libFLAC answers by
        # resyncing the decoder and a remote source by a new request.
        at = start
        while True:
            try:
                # soundfile allocates min(n, frames left per header): bounded by the block, never the header.
                data = f.read(n, dtype="float32", always_2d=True)
            except sf.LibsndfileError as e:
                self._src.check()  # the source failed (cap, timeout), not the decoder
                raise DecodeError(f"cannot decode {self._path}: {self._broken_at(at)} (libsndfile: {e})") from e
            self._src.check()  # a failed read looks like the end of the file to libsndfile
            if len(data) == 0:
                return
            yield downmix(data, self._path, at, self.rate)
            at += len(data)

    def _broken_at(self, frame: int) -> str:
        where = f"{frame / self.rate:.3f} s"
        if self._mp3 is not None:
            declared = f"{self._mp3.seconds:.3f} s its {self._mp3.header} header declares"
            return f"corrupt or truncated MP3: decoding fails at {where} of the {declared}"
        return f"decoding fails at {where}"

    def check_complete(self, frames_read: int) -> None:
        self._src.check()
        if self._claimed_frames is not None and frames_read < self._claimed_frames:
            raise DecodeError(
                f"cannot decode {self._path}: truncated file (header declares "
                f"{self._claimed_frames} frames, only {frames_read} could be read)"
            )
        if self._mp3 is not None and self._mp3.is_short(frames_read):
            raise DecodeError(f"cannot decode {self._path}: {self._mp3.shortfall(frames_read)}")

    def close(self) -> None:
        self._f.close()


class _AvSource:
    """A file FFmpeg opened (via PyAV): its first audio stream, decoded from the start.

    FFmpeg's seeking in audio is keyframe-based and imprecise per container, so segments decode
    from the start and drop what comes before them: exact, bounded in memory, slower for late
    segments of long files.

    FFmpeg conceals many broken streams: it logs an error (a Matroska element that overruns its
    parent, an Ogg page whose CRC fails, ...), skips, and decodes on, so a damaged file would give
    a shorter or garbled signal with no exception. Every error FFmpeg logs while this file's
    packets are read and decoded fails the file instead (DecodeError naming where and what).
    Errors logged while FFmpeg probes the format at open are not counted: probing tries parsers
    that fail on valid files. What FFmpeg does not notice (a stream cut at a packet boundary in a
    container that declares no length) cannot be told from a shorter file.
    """

    seekable = False

    def __init__(self, src: Source):
        import av  # lazily: loading FFmpeg costs time and memory, and most corpora are wav/flac

        path = src.name
        self._path = path
        self._src = src
        self._av = av
        _capture_ffmpeg_errors(av)
        # protocol_whitelist: a playlist-like file (hls, concat) must not make FFmpeg fetch URLs.
        with av.logging.Capture():  # probing logs errors on valid files too: not counted, not printed
            try:
                self._container = av.open(src.fileobj(), options={"protocol_whitelist": "file"}, metadata_errors="ignore")
            except Exception:
                src.check()
                raise
        try:
            src.check()
            audio = self._container.streams.audio
            if not audio:
                raise DecodeError(f"cannot decode {path}: no audio stream in {self._container.format.name} container")
            self._stream = audio[0]
            self._frames = self._decoded(self._stream)
            self.rate = 0  # until the first frame says
            self._pos = 0
            self._packed: tuple[str, np.dtype | None] = ("", None)  # a packed sample format and its dtype
            # The stream header's rate and layout may be missing or wrong; the first frame is not.
            self._first = self._next()
            if self._first is None:
                raise DecodeError(f"cannot decode {path}: no audio samples")
            self.rate = int(self._first.sample_rate)
            self.channels = int(self._first.layout.nb_channels)
            _check_format(path, self.rate, self.channels)
            # An MP3 that libsndfile left to FFmpeg (see _open) still has its header checked.
            self._mp3 = None
            if self._container.format.name == "mp3" and src.seekable:
                length = mp3.declared_length(src.read_at)
                src.check()
                self._mp3 = length if length is not None and length.sample_rate == self.rate else None
            self.declared_frames = self._declared_frames()
        except BaseException:
            self._container.close()
            raise
        self._used = False

    def _declared_frames(self) -> int | None:
        """The length the container declares, where it is exact: an Ogg stream's last granule
        position (less its start and an Opus stream's pre-skip), an MP3's info header. Elsewhere
        FFmpeg may have estimated it from the bitrate: None."""
        if self._mp3 is not None:
            return self._mp3.samples
        stream = self._stream
        if self._container.format.name != "ogg" or not stream.duration or not self._src.seekable:
            return None
        ticks = stream.duration - (stream.start_time or 0)
        if stream.codec_context.codec.canonical_name == "opus":
            ticks -= int.from_bytes(bytes(stream.codec_context.extradata)[10:12], "little")  # OpusHead's pre-skip
        return max(0, round(ticks * stream.time_base * self.rate))

    def _decoded(self, stream) -> Iterator:
        """The stream's frames: Opus through libopus (OPUS_DECODER), the rest through FFmpeg's
        default decoder."""
        if stream.codec_context.codec.canonical_name != "opus":
            return self._container.decode(stream)
        try:
            codec = self._av.CodecContext.create("libopus", "r")
        except self._av.codec.codec.UnknownCodecError as e:
            raise DecodeError(f"cannot decode {self._path}: Opus is decoded by {OPUS_DECODER}, and this FFmpeg build has no libopus") from e
        codec.extradata = stream.codec_context.extradata  # the OpusHead: channels, mapping, gain
        codec.options = {"request_sample_fmt": "flt"}  # libopus's float output; else it rounds to 16 bits
        # The demuxer puts the pre-skip and the end trimming on the packets (skip-samples side
        # data), and libavcodec trims them off for any decoder, this one included.
        return (frame for packet in self._container.demux(stream) for frame in codec.decode(packet))

    def _next(self):
        """The next decoded frame, or None at the end; DecodeError if FFmpeg logs an error."""
        with self._av.logging.Capture() as logs:
            try:
                frame = next(self._frames, None)
            except Exception:
                self._src.check()  # a failed read (cap, timeout) is the cause
                raise
        self._src.check()
        errors = [(name, message.strip()) for level, name, message in logs if level <= self._av.logging.ERROR]
        if errors:
            where = f"{self._pos / self.rate:.3f} s" if self.rate else "the start"
            name, message = errors[0]
            more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
            raise DecodeError(f"cannot decode {self._path}: FFmpeg reports a broken stream at {where}: [{name}] {message}{more}")
        return frame

    def blocks(self, start: int) -> Iterator[np.ndarray]:
        if self._used or start:
            raise RuntimeError("a PyAV source is read once, from the start")  # see _decode_spans
        self._used = True
        return self._batched()

    def _batched(self) -> Iterator[np.ndarray]:
        # Codec frames are 2.5-60 ms; their samples are gathered into blocks and each block
        # downmixed at once, as libsndfile's are (per frame, the checks cost as much as decoding).
        target = _block_frames(self.rate, self.channels)
        batch: list[np.ndarray] = []
        count = start = 0
        frame = self._first
        while frame is not None:
            if frame.sample_rate != self.rate:
                raise DecodeError(
                    f"cannot decode {self._path}: sample rate changes mid-stream "
                    f"({self.rate} -> {frame.sample_rate} Hz)"
                )
            data = self._samples(frame)
            if batch and data.shape[1] != batch[0].shape[1]:  # the layout changed: a block has one
                yield self._mono(batch, start)
                batch, count = [], 0
            if not batch:
                start = self._pos
            batch.append(data)
            count += len(data)
            self._pos += len(data)
            if count >= target:
                yield self._mono(batch, start)
                batch, count = [], 0
            frame = self._next()
        if batch:
            yield self._mono(batch, start)

    def _samples(self, frame) -> np.ndarray:
        """(samples, channels) float32 of a decoded frame."""
        channels = frame.layout.nb_channels
        if channels < 1:
            raise DecodeError(f"cannot decode {self._path}: audio frame has {channels} channels")
        if frame.format.is_planar:
            return to_float32(frame.to_ndarray().T)  # (channels, samples)
        if frame.format.name != self._packed[0]:  # the dtype PyAV gives this format, asked once
            self._packed = (frame.format.name, frame.to_ndarray().dtype)
        # One plane, read in place: to_ndarray stacks a list of planes into a copy, which costs
        # as much as decoding a 20 ms Opus frame.
        data = np.frombuffer(frame.planes[0], self._packed[1], count=frame.samples * channels)
        return to_float32(data.reshape(-1, channels))

    def _mono(self, batch: list[np.ndarray], start: int) -> np.ndarray:
        return downmix(np.concatenate(batch) if len(batch) > 1 else batch[0], self._path, start, self.rate)

    def check_complete(self, frames_read: int) -> None:
        # Container durations are estimates for many formats; FFmpeg's own errors (see _next) are
        # the truncation test here, and an MP3's header.
        self._src.check()
        if self._mp3 is not None and self._mp3.is_short(frames_read):
            raise DecodeError(f"cannot decode {self._path}: {self._mp3.shortfall(frames_read)}")

    def close(self) -> None:
        self._container.close()


class _ArraySource:
    """Samples in memory (the Python API's arrays), read as a file is: blocks of the same size
    as libsndfile's, each scaled and downmixed by audio.pcm, from any frame."""

    seekable = True

    def __init__(self, samples: np.ndarray, rate: int, name: str):
        self.name = self._path = name
        self._data = samples if samples.ndim == 2 else samples.reshape(-1, 1)
        self.rate, self.channels = rate, self._data.shape[1]
        _check_format(name, rate, self.channels)
        self.frames = self.declared_frames = len(self._data)

    def blocks(self, start: int) -> Iterator[np.ndarray]:
        n = _block_frames(self.rate, self.channels)
        for at in range(start, self.frames, n):
            yield downmix(to_float32(self._data[at : at + n]), self._path, at, self.rate)

    def check_complete(self, frames_read: int) -> None:
        pass  # nothing is missing from an array

    def close(self) -> None:
        pass


def _capture_ffmpeg_errors(av) -> None:
    """Let FFmpeg's error logs reach PyAV, which drops every log unless told otherwise, so that
    _AvSource can capture them. Left alone if the application configured PyAV's logging."""
    if av.logging.get_level() is None:
        av.logging.set_level(av.logging.ERROR)
        # By default a log equal to the previous one is dropped: the same error in two files in
        # a row must fail both.
        av.logging.set_skip_repeated(False)


def _run_pass(source, path: str, spans: list[_Span], sink, max_samples: int | None, max_duration_s: float) -> Iterator[None]:
    """Read the region that `spans` cover, resample it block by block and cut it into windows.

    Why a seeked, resampled read equals slicing the full decode: soxr's output sample j sits at
    time j / SAMPLE_RATE. Starting the stream at a source frame s0 that is a multiple of
    `step = rate / gcd(rate, SAMPLE_RATE)` puts its output k at the full signal's index
    k + s0 * SAMPLE_RATE / rate, an integer, with the same filter phase; the output then matches
    the full decode once RESAMPLE_MARGIN_S of warm-up has passed (and the total length agrees,
    so "past the end" is judged on the same length). For 16 kHz sources no resampler runs and
    the read is exact.
    """
    rate = source.rate
    first = min(sp.a for sp in spans)
    last = None if any(sp.b is None for sp in spans) else max(sp.b for sp in spans)
    if rate == SAMPLE_RATE:
        src_start, out_pos, src_stop = first, first, last
        resampler = None
    else:
        step = rate // math.gcd(rate, SAMPLE_RATE)  # at most one second of source
        margin = math.ceil(RESAMPLE_MARGIN_S * rate)
        src_start = max(0, (first * rate // SAMPLE_RATE - margin) // step * step)
        out_pos = src_start * SAMPLE_RATE // rate  # exact by the choice of step
        src_stop = None if last is None else -(-last * rate // SAMPLE_RATE) + margin
        resampler = soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32", quality=RESAMPLE_QUALITY)
    cutter = _Cutter(spans, sink, max_samples, max_duration_s, path)
    cutter.base = out_pos

    # A source that cannot seek is read from its start and what precedes the region is dropped.
    pos = src_start if source.seekable else 0
    fed = False
    reached_end = True
    for block in source.blocks(pos):
        if pos < src_start:
            if pos + len(block) <= src_start:
                pos += len(block)
                continue
            block = block[src_start - pos :]
            pos = src_start
        stop_here = src_stop is not None and pos + len(block) >= src_stop
        if stop_here:
            block = block[: src_stop - pos]
        pos += len(block)
        if len(block):
            fed = True
            out = block if resampler is None else resampler.resample_chunk(block)
            out_pos = yield from cutter.feed(out, out_pos)
            yield
        if stop_here or all(sp.finished for sp in spans):
            reached_end = False
            break
    if resampler is not None and not all(sp.finished for sp in spans):
        out = resampler.resample_chunk(np.zeros(0, np.float32), last=True)
        out_pos = yield from cutter.feed(out, out_pos)

    if reached_end:
        source.check_complete(pos)
        if fed:
            total = out_pos  # the whole file's length at SAMPLE_RATE
        else:
            # Nothing was read: the region starts at or past the end. out_pos is where it would
            # have started; the file's length comes from the frames that are there.
            frames = pos if not source.seekable else min(pos, source.frames)
            total = _resampled_length(frames, rate)
        if total == 0:
            raise DecodeError(f"cannot decode {path}: no audio samples")
        for sp in spans:
            if not sp.finished and sp.a >= total:
                sp.error = SegmentError(f"{sp.describe()} starts at or past the end of {path} ({total / SAMPLE_RATE:.3f} s)")
                sp.finished = True
        yield from cutter.finish(total)
    for sp in spans:
        if sp.error is None and not sp.finished:  # cannot happen; guard the invariant loudly
            raise AssertionError(f"{sp.describe()} of {path} was left unfinished")
