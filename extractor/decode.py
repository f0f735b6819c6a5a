"""Decode one audio file, or parts of it, into the encoder's input: mono float32 at SAMPLE_RATE.

libsndfile (via soundfile) reads what it can open (wav, flac, ogg, mp3, aiff, ...); PyAV (FFmpeg)
reads the rest (m4a/aac, opus, webm, video containers). Every per-file problem is an AudioError
whose message names the problem and the file, because the pipeline records failures as
`f"{type(e).__name__}: {e}"` for millions of files and nobody will have a traceback.

Memory stays bounded on hostile inputs: nothing is allocated from a header's claimed length.
The source is read in blocks of BLOCK_SECONDS, each block is downmixed at once and fed to a
streaming resampler, and decoding stops as soon as the output passes max_duration_s. So a
96 kHz 8-channel file is never held whole at its source rate or width.

Segments are cut on the 16 kHz signal, at `round(t * SAMPLE_RATE)`, so a segment's samples do
not depend on the source rate. Only the region a segment needs is read: libsndfile seeks to a
little before it (see `_run_pass` for why the cut then equals slicing the full decode).

A "://" path (s3://, gs://, https://, ...) is read whole into memory through fsspec, after a size
check against max_duration_s, and decoded from there; a file that cannot be read is an AudioError
like a missing local one. Local paths never touch fsspec.

Native decoders can still crash or hang on malformed files; isolating that is the job of
extractor.workers, not of this module.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
import stat
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import numpy as np
import soundfile as sf
import soxr

from extractor.constants import SAMPLE_RATE

logger = logging.getLogger(__name__)

DEFAULT_MAX_DURATION_S = 3600.0  # one hour of 16 kHz float32 is 230 MB
BLOCK_SECONDS = 2.0  # source audio read per step; 96 kHz x 8 ch float32 is 6 MB
MAX_BLOCK_VALUES = 1 << 22  # frames x channels per block (16 MB float32), for absurd channel counts
MIN_SAMPLE_RATE = 1  # Hz; below or above these a header is broken or hostile, not audio
MAX_SAMPLE_RATE = 1_000_000
RESAMPLE_QUALITY = "HQ"
MAX_SEGMENT_TIME_S = 1e9  # ~32 years: larger start/end values are data errors
# Float WAV/FLAC samples are nominally within [-1, 1]. Far beyond it (1e20 was seen in fuzzing)
# the STFT power overflows float32 and the embedding becomes NaN; such a file is not audio.
MAX_ABS_SAMPLE = 1e4
# Audio read before a segment so the resampler's filter is warmed up when the segment begins.
# soxr HQ needs well under 10 ms at any rate (measured: 50 ms already gives < 1e-6 difference).
RESAMPLE_MARGIN_S = 0.1
# Segments closer than this are decoded in one pass; farther apart, libsndfile seeks instead.
SEGMENT_GAP_S = 30.0
# Bytes per second of the widest audio expected (48 kHz, 8 channels, 32-bit PCM): a remote file
# bigger than max_duration_s of it is refused before it is downloaded into a worker's memory.
REMOTE_MAX_BYTES_PER_S = 48_000 * 8 * 4
# A WAV/AIFF data chunk that declares this many bytes or more is a streaming writer's
# "length unknown" placeholder (0xFFFFFFFF, 0x7FFFFFFF, ...), not a truncated file.
_UNKNOWN_LENGTH_BYTES = 0x7FFF0000
# libsndfile logs a data chunk that runs past the end of the file as "data : 96000 (should be 47978)".
_CLAMPED_CHUNK = re.compile(r"^\s*(?:data|SSND)\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)


class AudioError(Exception):
    """A problem with one file (or one segment of it); the message names the problem and the file."""


class DecodeError(AudioError):
    """The file is not audio we can decode: junk, truncated, no audio stream, NaN samples, ..."""


class TooLongError(AudioError):
    """The decoded audio is longer than max_duration_s."""


class SegmentError(AudioError):
    """A requested segment is invalid or lies outside the file."""


@dataclass(frozen=True)
class Decoded:
    samples: np.ndarray  # float32, mono, SAMPLE_RATE, C-contiguous
    duration_s: float  # len(samples) / SAMPLE_RATE


Segment = tuple[float | None, float | None]  # (start_s, end_s); None means the file's start / end


@dataclass(frozen=True)
class DecodeRequest:
    """What a decode worker is asked to do for one file (see extractor.workers)."""

    path: str
    segments: Sequence[Segment] = ((None, None),)
    max_duration_s: float = DEFAULT_MAX_DURATION_S
    storage_options: Mapping | None = None  # fsspec options for a "://" path


def decode_request(request: DecodeRequest) -> list[Decoded | AudioError]:
    """The default decode function of extractor.workers.DecodePool: a picklable top-level function."""
    return load_segments(
        request.path, list(request.segments), max_duration_s=request.max_duration_s, storage_options=request.storage_options
    )


def load_audio(
    path: str | os.PathLike,
    *,
    start_s: float | None = None,
    end_s: float | None = None,
    max_duration_s: float = DEFAULT_MAX_DURATION_S,
) -> Decoded:
    """Decode `path` (or its [start_s, end_s) part) to mono float32 at SAMPLE_RATE; AudioError if not."""
    (result,) = load_segments(path, [(start_s, end_s)], max_duration_s=max_duration_s)
    if isinstance(result, AudioError):
        raise result
    return result


def load_segments(
    path: str | os.PathLike,
    segments: Sequence[Segment],
    *,
    max_duration_s: float = DEFAULT_MAX_DURATION_S,
    storage_options: Mapping | None = None,
) -> list[Decoded | AudioError]:
    """Decode several segments of one file, opening and reading it once.

    Each result is a Decoded or the AudioError of that segment, so one bad segment does not fail
    the others; a file-level error is returned for every segment.
    """
    path = os.fspath(path)
    if not max_duration_s > 0:
        raise ValueError(f"max_duration_s must be > 0, got {max_duration_s!r}")
    max_samples = math.floor(max_duration_s * SAMPLE_RATE) if math.isfinite(max_duration_s) else None

    results: list[Decoded | AudioError | None] = [None] * len(segments)
    spans: list[_Span] = []
    for i, (start_s, end_s) in enumerate(segments):
        try:
            spans.append(_Span(i, start_s, end_s, *_segment_indices(path, start_s, end_s)))
        except SegmentError as e:
            results[i] = e
    if spans:
        try:
            _decode_spans(path, spans, max_samples, max_duration_s, storage_options)
        except AudioError as e:
            for sp in spans:
                results[sp.index] = e
        else:
            for sp in spans:
                results[sp.index] = sp.result
    return results  # type: ignore[return-value]  # every slot is filled above


# --- segments -------------------------------------------------------------------------------


class _Span:
    """One requested segment in 16 kHz sample indices [a, b) (b None: to the end of the file)."""

    def __init__(self, index: int, start_s, end_s, a: int, b: int | None):
        self.index, self.start_s, self.end_s, self.a, self.b = index, start_s, end_s, a, b
        self.parts: list[np.ndarray] = []
        self.n = 0  # samples collected so far
        self.error: AudioError | None = None
        self.finished = False

    def describe(self) -> str:
        return f"segment start_s={self.start_s!r}, end_s={self.end_s!r}"

    @property
    def result(self) -> Decoded | AudioError:
        if self.error is not None:
            return self.error
        samples = np.concatenate(self.parts) if len(self.parts) != 1 else self.parts[0]
        samples = np.ascontiguousarray(samples, dtype=np.float32)
        return Decoded(samples=samples, duration_s=len(samples) / SAMPLE_RATE)


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


def _decode_spans(
    path: str, spans: list[_Span], max_samples: int | None, max_duration_s: float, storage_options: Mapping | None = None
) -> None:
    """Fill in every span's parts or error; raise AudioError for problems of the whole file."""
    if "://" in path:
        data = _fetch(path, max_duration_s, storage_options)
    else:
        _check_file(path)
        data = None
    try:
        source = _open(path, data)
        try:
            if source.seekable:
                groups = _clusters(spans, round(SEGMENT_GAP_S * SAMPLE_RATE))
            else:
                groups = [spans]  # PyAV is read once from the start (see _AvSource)
            for group in groups:
                _run_pass(source, path, group, max_samples, max_duration_s)
        finally:
            source.close()
    except AudioError:
        raise
    except Exception as e:
        if _out_of_memory(e):
            raise
        # Native decoders fail on hostile files in many ways (LibsndfileError, FFmpegError,
        # OSError, ValueError, ...); all of them mean "this file cannot be decoded".
        raise DecodeError(f"cannot decode {path}: {type(e).__name__}: {e}") from e


def _out_of_memory(e: Exception) -> bool:
    """This process ran out of memory: a resource problem, not a verdict on the file.

    PyAV's av.error.MemoryError is also a MemoryError, but it is FFmpeg's ENOMEM, which a
    hostile file provokes by declaring absurd sizes: that one is the file's fault.
    """
    return isinstance(e, MemoryError) and not type(e).__module__.startswith("av.")


def _check_file(path: str) -> None:
    """Reject what is not a non-empty regular file before any decoder sees it (a FIFO would hang)."""
    try:
        st = os.stat(path)
    except FileNotFoundError as e:
        raise AudioError(f"cannot open {path}: no such file") from e
    except OSError as e:
        raise AudioError(f"cannot open {path}: {e.strerror or e}") from e
    if stat.S_ISDIR(st.st_mode):
        raise AudioError(f"cannot decode {path}: is a directory")
    if not stat.S_ISREG(st.st_mode):
        raise AudioError(f"cannot decode {path}: not a regular file")
    if st.st_size == 0:
        raise DecodeError(f"cannot decode {path}: empty file (0 bytes)")
    if not os.access(path, os.R_OK):
        raise AudioError(f"cannot open {path}: permission denied")


def _fetch(path: str, max_duration_s: float, storage_options: Mapping | None) -> bytes:
    """The whole content of a remote file; AudioError if it cannot be read or is too big."""
    import fsspec

    try:
        fs, key = fsspec.core.url_to_fs(path, **dict(storage_options or {}))
        size = fs.size(key)
        limit = max_duration_s * REMOTE_MAX_BYTES_PER_S
        if size is not None and size > limit:
            raise TooLongError(
                f"{path} is {size:,} bytes, more than max_duration_s={max_duration_s:g} of audio can take "
                f"({limit:,.0f} bytes at {REMOTE_MAX_BYTES_PER_S:,} bytes/s)"
            )
        data = fs.cat_file(key)
    except AudioError:
        raise
    except FileNotFoundError as e:
        raise AudioError(f"cannot read {path}: no such file") from e
    except Exception as e:
        if _out_of_memory(e):
            raise
        # Credentials, endpoints, timeouts, HTTP errors: all mean "this file cannot be read now".
        raise AudioError(f"cannot read {path}: {type(e).__name__}: {e}") from e
    if not data:
        raise DecodeError(f"cannot decode {path}: empty file (0 bytes)")
    return data


def _open(path: str, data: bytes | None = None) -> _SndFileSource | _AvSource:
    """Open `path`, or `data` (a remote file's content) named `path` in messages."""
    try:
        handle = sf.SoundFile(path if data is None else io.BytesIO(data))
    except Exception as e:
        logger.debug("libsndfile cannot open %s (%s); trying PyAV", path, e)
        return _open_av(path, f"not a format libsndfile reads ({e})", data)
    try:
        source = _SndFileSource(path, handle)
    except BaseException:
        handle.close()
        raise
    if source.frames == 0:
        # A WAV from a streaming writer may declare a data size of 0; libsndfile then sees no
        # frames while FFmpeg reads to the end of the file. A header-only file fails either way.
        source.close()
        return _open_av(path, "libsndfile finds no audio frames", data)
    return source


def _open_av(path: str, why_not_libsndfile: str, data: bytes | None = None) -> _AvSource:
    try:
        return _AvSource(path, data)
    except AudioError:
        raise
    except Exception as e:
        if _out_of_memory(e):
            raise
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

    def __init__(self, path: str, handle: sf.SoundFile):
        self._f = handle
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
        # mpg123 only estimates an MP3's length when it has no Xing/Info header, so a short read
        # proves nothing there; elsewhere the count is exact.
        self.frames = int(handle.frames)
        self._claimed_frames = None if handle.format == "MP3" else self.frames
        self._path = path

    def blocks(self, start: int) -> Iterator[np.ndarray]:
        f = self._f
        if start and start >= f.frames:
            return  # seeking past the end fails in libsndfile; there is nothing there anyway
        f.seek(start)
        n = _block_frames(self.rate, self.channels)
        while True:
            # soundfile allocates min(n, frames left per header): bounded by the block, never the header.
            data = f.read(n, dtype="float32", always_2d=True)
            if len(data) == 0:
                return
            yield _downmix(data, self._path, f.tell() - len(data), self.rate)

    def check_complete(self, frames_read: int) -> None:
        if self._claimed_frames is not None and frames_read < self._claimed_frames:
            raise DecodeError(
                f"cannot decode {self._path}: truncated file (header declares "
                f"{self._claimed_frames} frames, only {frames_read} could be read)"
            )

    def close(self) -> None:
        self._f.close()


class _AvSource:
    """A file FFmpeg opened (via PyAV): its first audio stream, decoded from the start.

    FFmpeg's seeking in audio is keyframe-based and imprecise per container, so segments decode
    from the start and drop what comes before them: exact, bounded in memory, slower for late
    segments of long files.
    """

    seekable = False

    def __init__(self, path: str, data: bytes | None = None):
        import av  # lazily: loading FFmpeg costs time and memory, and most corpora are wav/flac

        self._path = path
        # protocol_whitelist: a playlist-like file (hls, concat) must not make FFmpeg fetch URLs.
        source = path if data is None else io.BytesIO(data)
        self._container = av.open(source, options={"protocol_whitelist": "file"}, metadata_errors="ignore")
        try:
            audio = self._container.streams.audio
            if not audio:
                raise DecodeError(f"cannot decode {path}: no audio stream in {self._container.format.name} container")
            self._stream = audio[0]
            self._frames = self._container.decode(self._stream)
            # The stream header's rate and layout may be missing or wrong; the first frame is not.
            self._first = next(self._frames, None)
            if self._first is None:
                raise DecodeError(f"cannot decode {path}: no audio samples")
            self.rate = int(self._first.sample_rate)
            self.channels = int(self._first.layout.nb_channels)
            _check_format(path, self.rate, self.channels)
        except BaseException:
            self._container.close()
            raise
        self._used = False

    def blocks(self, start: int) -> Iterator[np.ndarray]:
        if self._used or start:
            raise RuntimeError("a PyAV source is read once, from the start")  # see _decode_spans
        self._used = True
        return self._batched()

    def _batched(self) -> Iterator[np.ndarray]:
        # Codec frames are ~1000 samples; batching them into blocks keeps per-block overhead low.
        target = _block_frames(self.rate, self.channels)
        batch: list[np.ndarray] = []
        count, pos = 0, 0
        frames = self._frames
        frame = self._first
        while frame is not None:
            if frame.sample_rate != self.rate:
                raise DecodeError(
                    f"cannot decode {self._path}: sample rate changes mid-stream "
                    f"({self.rate} -> {frame.sample_rate} Hz)"
                )
            mono = self._to_mono(frame, pos)
            pos += len(mono)
            batch.append(mono)
            count += len(mono)
            if count >= target:
                yield np.concatenate(batch)
                batch, count = [], 0
            frame = next(frames, None)
        if batch:
            yield np.concatenate(batch)

    def _to_mono(self, frame, pos: int) -> np.ndarray:
        channels = frame.layout.nb_channels
        if channels < 1:
            raise DecodeError(f"cannot decode {self._path}: audio frame has {channels} channels")
        data = frame.to_ndarray()
        # Planar formats come as (channels, samples), packed ones as (1, samples * channels).
        data = data.T if frame.format.is_planar else data.reshape(-1, channels)
        if data.dtype.kind in "iu":
            info = np.iinfo(data.dtype)
            # Integer PCM to [-1, 1) the way libsndfile does it: divide by 2^(bits-1).
            offset = 0 if data.dtype.kind == "i" else -(1 << (info.bits - 1))
            scale = np.float32(1.0 / (1 << (info.bits - 1)))
            data = (data.astype(np.float32) + np.float32(offset)) * scale
        else:
            data = data.astype(np.float32, copy=False)
        return _downmix(data, self._path, pos, self.rate)

    def check_complete(self, frames_read: int) -> None:
        pass  # container durations are estimates for many formats; no reliable truncation test

    def close(self) -> None:
        self._container.close()


def _downmix(data: np.ndarray, path: str, pos: int, rate: int) -> np.ndarray:
    """(frames, channels) -> mono float32 by the channels' mean; reject NaN/Inf."""
    if data.shape[1] == 1:
        mono = data[:, 0]  # a view: for a 16 kHz mono file the output is soundfile's read, bit for bit
    else:
        mono = data.mean(axis=1, dtype=np.float32)
    if not np.isfinite(mono).all():
        bad = ~np.isfinite(data).all(axis=1)
        if bad.any():
            first = int(np.argmax(bad))
            kind = "NaN" if np.isnan(data[first]).any() else "Inf"
        else:  # finite but so large that the mean overflows float32
            first = int(np.argmax(~np.isfinite(mono)))
            kind = "overflowing"
        raise DecodeError(f"cannot decode {path}: {kind} samples (first at {(pos + first) / rate:.3f} s)")
    peak = float(np.abs(mono).max()) if len(mono) else 0.0
    if peak > MAX_ABS_SAMPLE:
        first = int(np.argmax(np.abs(mono) > MAX_ABS_SAMPLE))
        raise DecodeError(f"cannot decode {path}: implausible sample value {peak:.3g} (first at {(pos + first) / rate:.3f} s; audio is within ±1)")
    return mono


def _run_pass(
    source: _SndFileSource | _AvSource,
    path: str,
    spans: list[_Span],
    max_samples: int | None,
    max_duration_s: float,
) -> None:
    """Read the region that `spans` cover, resample it block by block and hand out the samples.

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
            out_pos = _deliver(spans, out, out_pos, max_samples, max_duration_s, path)
        if stop_here or all(sp.finished for sp in spans):
            reached_end = False
            break
    if resampler is not None and not all(sp.finished for sp in spans):
        out = resampler.resample_chunk(np.zeros(0, np.float32), last=True)
        out_pos = _deliver(spans, out, out_pos, max_samples, max_duration_s, path)

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
                sp.error = SegmentError(
                    f"{sp.describe()} starts at or past the end of {path} ({total / SAMPLE_RATE:.3f} s)"
                )
                sp.parts = []
            sp.finished = True
    for sp in spans:
        if sp.error is None and not sp.parts:  # cannot happen; guard the invariant loudly
            raise AssertionError(f"{sp.describe()} of {path} collected no samples")


def _deliver(
    spans: list[_Span],
    out: np.ndarray,
    out_pos: int,
    max_samples: int | None,
    max_duration_s: float,
    path: str,
) -> int:
    """Copy the part of `out` (16 kHz samples from index out_pos) that each span wants."""
    end = out_pos + len(out)
    for sp in spans:
        if sp.finished:
            continue
        lo = max(sp.a, out_pos)
        hi = end if sp.b is None else min(sp.b, end)
        if hi > lo:
            piece = out[lo - out_pos : hi - out_pos]
            # Copy partial pieces so a short segment does not pin whole blocks in memory.
            sp.parts.append(piece if len(piece) == len(out) else piece.copy())
            sp.n += len(piece)
            if max_samples is not None and sp.n > max_samples:
                whole = sp.a == 0 and sp.b is None
                what = path if whole else f"{sp.describe()} of {path}"
                sp.error = TooLongError(f"{what} is longer than max_duration_s={max_duration_s:g}")
                sp.parts = []
                sp.finished = True
                continue
        if sp.b is not None and end >= sp.b:
            sp.finished = True
    return end
