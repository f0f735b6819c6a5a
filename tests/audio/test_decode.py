"""Tests of extractor.decode: formats, downmix, resampling, bad files, memory bounds, segments, fuzzing."""

from __future__ import annotations

import os
import struct
import time
import tracemalloc
from datetime import timedelta

import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extractor.constants import SAMPLE_RATE
from extractor.audio.decode import (
    AudioError,
    Decoded,
    DecodeError,
    DecodeRequest,
    FileJob,
    SegmentError,
    TooLongError,
    decode_request,
    load_audio,
    load_segments,
)
from extractor.audio.pcm import downmix


# --- helpers --------------------------------------------------------------------------------


def tone(freq: float, sr: int, seconds: float, channels: int = 1, amp: float = 0.5) -> np.ndarray:
    t = np.arange(round(sr * seconds)) / sr
    x = (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    if channels == 1:
        return x
    # Distinct channels, so a downmix that drops or repeats one is caught.
    return np.stack([x * (1.0 - 0.2 * c) for c in range(channels)], axis=1)


def noisy_tone(sr: int, seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = tone(440.0, sr, seconds, amp=0.3) + 0.1 * rng.standard_normal(round(sr * seconds))
    return x.astype(np.float32)


def peak_hz(x: np.ndarray, sr: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum)) * sr / len(x)


def write_av(path, x: np.ndarray, sr: int, codec: str = "aac", video: bool = False) -> None:
    """Write mono float32 `x` with PyAV (optionally after a tiny video stream) to test the FFmpeg path."""
    import av

    with av.open(str(path), "w") as out:
        if video:
            vstream = out.add_stream("mpeg4", rate=10)
            vstream.width, vstream.height, vstream.pix_fmt = 32, 32, "yuv420p"
        stream = out.add_stream(codec, rate=sr, layout="mono")
        fmt = stream.codec_context.format.name
        size = stream.codec_context.frame_size or 1024
        if video:
            for i in range(max(1, round(len(x) / sr * 10))):
                frame = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")
                frame.pts = i
                for packet in vstream.encode(frame):
                    out.mux(packet)
            for packet in vstream.encode(None):
                out.mux(packet)
        for i in range(0, len(x), size):
            chunk = x[i : i + size]
            if fmt.startswith("s16"):
                chunk = (chunk * 32767).astype(np.int16)
            frame = av.AudioFrame.from_ndarray(chunk[None, :], format=fmt, layout="mono")
            frame.sample_rate, frame.pts = sr, i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


@pytest.fixture(scope="module")
def real_files(tmp_path_factory) -> dict[str, bytes]:
    """Small valid files of several formats, as bytes, for truncation and fuzzing."""
    d = tmp_path_factory.mktemp("real")
    x = tone(440.0, 22050, 0.5)
    for ext in ("wav", "flac", "ogg", "mp3"):
        sf.write(d / f"a.{ext}", x, 22050)
    write_av(d / "a.m4a", tone(440.0, 16000, 0.5), 16000)
    return {p.suffix: p.read_bytes() for p in d.iterdir()}


# --- formats, downmix, resampling -----------------------------------------------------------


@pytest.mark.parametrize("ext", ["wav", "flac", "ogg"])
@pytest.mark.parametrize("channels", [1, 2])
def test_16k_is_bit_identical_to_soundfile(tmp_path, ext, channels):
    path = tmp_path / f"a.{ext}"
    sf.write(path, tone(440.0, SAMPLE_RATE, 2.5, channels), SAMPLE_RATE)
    ref = sf.read(path, dtype="float32", always_2d=True)[0]
    ref = ref[:, 0] if channels == 1 else ref.mean(axis=1, dtype=np.float32)

    got = load_audio(str(path))

    assert got.samples.dtype == np.float32 and got.samples.ndim == 1
    assert got.samples.flags.c_contiguous
    assert np.array_equal(got.samples, ref)  # no resampler: exact
    assert got.duration_s == len(ref) / SAMPLE_RATE


def test_stereo_downmix_is_channel_mean(tmp_path):
    left = tone(300.0, SAMPLE_RATE, 1.0)
    stereo = np.stack([left, np.zeros_like(left)], axis=1)
    sf.write(tmp_path / "s.wav", stereo, SAMPLE_RATE, subtype="FLOAT")
    got = load_audio(tmp_path / "s.wav").samples
    np.testing.assert_array_equal(got, left / 2)


@pytest.mark.parametrize("sr", [44100, 48000, 8000])
@pytest.mark.parametrize("channels", [1, 2])
def test_resampling_keeps_length_and_frequency(tmp_path, sr, channels):
    seconds = 2.5
    x = tone(1000.0, sr, seconds, channels)
    sf.write(tmp_path / "a.flac", x, sr)

    got = load_audio(tmp_path / "a.flac")

    assert abs(len(got.samples) - len(x) * SAMPLE_RATE / sr) <= 1
    assert got.duration_s == pytest.approx(seconds, abs=1e-3)
    assert abs(peak_hz(got.samples, SAMPLE_RATE) - 1000.0) < 1.0
    # Same level as the source's channel mean: the resampler neither gains nor loses.
    mean_amp = 0.5 * np.mean([1.0 - 0.2 * c for c in range(channels)])
    assert np.abs(got.samples[SAMPLE_RATE // 2 : -SAMPLE_RATE // 2]).max() == pytest.approx(mean_amp, rel=0.01)


@pytest.mark.parametrize(
    "name, codec, video",
    [("a.m4a", "aac", False), ("a.webm", "libopus", False), ("a.mp4", "aac", True)],
)
def test_pyav_formats(tmp_path, name, codec, video):
    path = tmp_path / name
    write_av(path, tone(1000.0, 48000, 2.0), 48000, codec=codec, video=video)
    with pytest.raises(sf.LibsndfileError):
        sf.SoundFile(path)  # so the decode below went through PyAV

    got = load_audio(path)

    # Codecs add priming/padding samples (AAC ~1024, Opus 312 at 48 kHz); a few ms at most.
    assert got.duration_s == pytest.approx(2.0, abs=0.05)
    assert abs(peak_hz(got.samples, SAMPLE_RATE) - 1000.0) < 1.0
    assert got.samples.dtype == np.float32 and got.samples.flags.c_contiguous


def test_pyav_segment_matches_full_decode(tmp_path):
    path = tmp_path / "a.m4a"
    write_av(path, noisy_tone(44100, 4.0), 44100)
    full = load_audio(path).samples
    seg = load_audio(path, start_s=1.25, end_s=2.5).samples
    np.testing.assert_allclose(seg, full[20000:40000], atol=1e-4)


# --- bad files ------------------------------------------------------------------------------


def _bad_file(tmp_path, kind: str) -> str:
    path = tmp_path / f"{kind}.wav"
    good = tmp_path / "good.wav"
    sf.write(good, tone(440.0, SAMPLE_RATE, 1.0), SAMPLE_RATE, subtype="PCM_16")
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "not_audio":
        path.write_bytes(b"just some text, not audio at all\n" * 100)
    elif kind == "truncated":
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "truncated_flac":
        path = tmp_path / "t.flac"
        sf.write(tmp_path / "g.flac", noisy_tone(SAMPLE_RATE, 2.0), SAMPLE_RATE)
        data = (tmp_path / "g.flac").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "header_only":
        path.write_bytes(good.read_bytes()[:44])
    elif kind == "missing":
        pass
    elif kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)  # opening it for reading would block forever
    return str(path)


@pytest.mark.parametrize(
    "kind",
    ["empty", "not_audio", "truncated", "truncated_flac", "header_only", "missing", "directory", "fifo"],
)
def test_bad_files_raise_audio_error_naming_the_path(tmp_path, kind):
    path = _bad_file(tmp_path, kind)
    with pytest.raises(AudioError) as info:
        load_audio(path)
    assert path in str(info.value)
    # A file-level error is the result of every segment of load_segments.
    results = load_segments(path, [(0, 0.5), (None, None)])
    assert all(isinstance(r, AudioError) and path in str(r) for r in results)


@pytest.mark.parametrize("value, word", [(np.nan, "NaN"), (np.inf, "Inf")])
def test_non_finite_samples_are_rejected(tmp_path, value, word):
    x = tone(440.0, SAMPLE_RATE, 1.0)
    x[8000] = value
    sf.write(tmp_path / "f.wav", x, SAMPLE_RATE, subtype="FLOAT")
    with pytest.raises(DecodeError, match=word) as info:
        load_audio(tmp_path / "f.wav")
    assert str(tmp_path / "f.wav") in str(info.value)
    assert "0.500 s" in str(info.value)


def _patch_wav(path, *, data_size: int | None = None, rate: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    if data_size is not None:
        i = data.find(b"data")
        data[i + 4 : i + 8] = struct.pack("<I", data_size)
    if rate is not None:
        i = data.find(b"fmt ")
        data[i + 12 : i + 16] = struct.pack("<I", rate)
    path.write_bytes(bytes(data))


def test_header_claiming_2_to_31_frames_is_cheap(tmp_path):
    path = tmp_path / "liar.wav"
    x = tone(440.0, SAMPLE_RATE, 3.0)
    sf.write(path, x, SAMPLE_RATE, subtype="PCM_16")
    _patch_wav(path, data_size=2 * (2**31 - 1))  # 16-bit mono: ~2^31 frames, 8 GB as float32

    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        result = load_audio(path)
    except AudioError as e:
        result = e
    elapsed = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    assert elapsed < 5
    assert peak < 20e6
    if isinstance(result, Decoded):
        assert len(result.samples) == len(x)  # the real frames
    else:
        assert str(path) in str(result)


@pytest.mark.parametrize("rate", [0, 1, 999, 2_000_000_000])
def test_absurd_sample_rate_is_rejected(tmp_path, rate):
    path = tmp_path / "rate.wav"
    sf.write(path, tone(440.0, SAMPLE_RATE, 0.5), SAMPLE_RATE, subtype="PCM_16")
    _patch_wav(path, rate=rate)
    with pytest.raises(AudioError) as info:
        load_audio(path)
    assert str(path) in str(info.value)


def test_96k_8ch_decodes_in_bounded_memory(tmp_path):
    sr, channels, seconds = 96000, 8, 120
    path = tmp_path / "big.wav"
    block = tone(1000.0, sr, 1.0, channels)  # 1 s; a whole number of periods, so it tiles
    with sf.SoundFile(path, "w", sr, channels, subtype="PCM_16") as f:
        for _ in range(seconds):
            f.write(block)

    tracemalloc.start()
    got = load_audio(path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    out_bytes = seconds * SAMPLE_RATE * 4  # 7.7 MB: the result itself
    source_bytes = seconds * sr * channels * 4  # 369 MB if held whole as float32
    assert len(got.samples) == seconds * SAMPLE_RATE
    assert peak < 3 * out_bytes + 20e6 < source_bytes / 8
    assert abs(peak_hz(got.samples[: SAMPLE_RATE * 10], SAMPLE_RATE) - 1000.0) < 1.0


def test_too_long(tmp_path):
    path = tmp_path / "long.flac"
    sf.write(path, tone(440.0, 44100, 6.0), 44100)
    with pytest.raises(TooLongError, match=r"longer than max_duration_s=2\b") as info:
        load_audio(path, max_duration_s=2.0)
    assert str(path) in str(info.value)
    # A segment inside the limit of a longer file is fine; one longer than the limit is not.
    assert load_audio(path, start_s=1.0, end_s=2.5, max_duration_s=2.0).duration_s == 1.5
    results = load_segments(path, [(0.0, 1.0), (0.0, 5.0)], max_duration_s=2.0)
    assert isinstance(results[0], Decoded)
    assert isinstance(results[1], TooLongError)


THREE_HOURS = 3 * 3600


def _wav_of_silence(path, seconds: int, rate: int = SAMPLE_RATE) -> None:
    """A valid 16-bit mono WAV of `seconds` of silence, written sparse: a true header, no cost."""
    data = seconds * rate * 2
    header = b"RIFF" + struct.pack("<I", 36 + data) + b"WAVE" + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
    with open(path, "wb") as f:
        f.write(header + b"data" + struct.pack("<I", data))
        f.truncate(len(header) + 8 + data)


def _flac_claiming(path, seconds: int) -> None:
    """A 1 s FLAC whose STREAMINFO claims `seconds` (its total-samples field)."""
    sf.write(path, tone(440.0, SAMPLE_RATE, 1.0), SAMPLE_RATE)
    data = bytearray(path.read_bytes())
    assert data[:4] == b"fLaC"
    data[21] &= 0xF0  # STREAMINFO's 36-bit sample count: the low nibble of byte 13, then 4 bytes
    data[22:26] = struct.pack(">I", seconds * SAMPLE_RATE)
    path.write_bytes(bytes(data))


def _ogg_crc(page: bytes) -> int:
    crc = 0
    for byte in page:  # CRC-32, polynomial 0x04C11DB7, not reflected (RFC 3533)
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) & 0xFFFFFFFF if crc & 0x80000000 else (crc << 1) & 0xFFFFFFFF
    return crc


def _opus_claiming(path, seconds: int) -> None:
    """A 1 s Ogg Opus whose last page's granule position claims `seconds` (CRC kept valid)."""
    write_av(path.with_suffix(".webm"), tone(440.0, 48000, 1.0), 48000, codec="libopus")
    import av

    with av.open(str(path.with_suffix(".webm"))) as src, av.open(str(path), "w", format="ogg") as out:
        stream = out.add_stream_from_template(src.streams.audio[0])
        for packet in src.demux(src.streams.audio[0]):
            if packet.dts is not None:
                packet.stream = stream
                out.mux(packet)
    data = bytearray(path.read_bytes())
    last = data.rindex(b"OggS")
    data[last + 6 : last + 14] = struct.pack("<q", seconds * 48000 + 312)
    data[last + 22 : last + 26] = b"\0\0\0\0"
    data[last + 22 : last + 26] = struct.pack("<I", _ogg_crc(bytes(data[last:])))
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("kind", ["wav", "flac_claiming", "opus_claiming"])
def test_a_3_hour_header_is_too_long_before_decoding(tmp_path, kind):
    """Refused at the header, in the job's worker and through load_audio: today's cap (2 h) is not
    decoded first. A real 3 h WAV, and 1 s files whose headers claim 3 h."""
    path = tmp_path / {"wav": "long.wav", "flac_claiming": "liar.flac", "opus_claiming": "liar.opus"}[kind]
    {"wav": _wav_of_silence, "flac_claiming": _flac_claiming, "opus_claiming": _opus_claiming}[kind](path, THREE_HOURS)
    t0 = time.perf_counter()
    (block,) = decode_request(DecodeRequest((FileJob(str(path), (0,), ((None, None),)),)))
    with pytest.raises(TooLongError) as info:
        load_audio(path)
    assert time.perf_counter() - t0 < 2
    assert block.done == [] and [(i, f.kind) for i, f in block.failed] == [(0, "TooLongError")]
    message = block.failed[0][1].message
    assert message == str(info.value) == f"{path} is longer than max_duration_s=7200"


def test_segments_of_a_long_file_are_refused_by_what_they_need(tmp_path):
    """A segment is too long by its own extent, the file's declared end clipping it: a short
    segment of a 3 h file decodes, an open-ended one or one reaching 2.5 h in fails at once."""
    path = tmp_path / "long.wav"
    _wav_of_silence(path, THREE_HOURS)
    t0 = time.perf_counter()
    short, to_end, late = load_segments(path, [(10.0, 20.0), (1.0, None), (5.0, 9000.0)])
    assert time.perf_counter() - t0 < 2
    assert isinstance(short, Decoded) and short.duration_s == 10.0
    assert isinstance(to_end, TooLongError) and str(to_end).startswith(f"segment start_s=1.0, end_s=None of {path} is longer")
    assert isinstance(late, TooLongError) and str(late) == f"segment start_s=5.0, end_s=9000.0 of {path} is longer than max_duration_s=7200"
    # An end past a short file's end is clipped first: no refusal for what is not there.
    small = tmp_path / "small.wav"
    _wav_of_silence(small, 3)
    assert load_audio(small, start_s=1.0, end_s=9000.0, max_duration_s=5.0).duration_s == 2.0


def test_a_declared_length_within_its_slack_of_the_cap_is_decoded_then_judged(tmp_path):
    """Refused at the header only beyond DECLARED_SLACK_S: declared 0.7 s over the cap, the file is
    decoded (its first two windows go out) and fails by what was cut; 9.5 s over, nothing is
    decoded. The record is the same either way."""
    path = tmp_path / "a.wav"
    sf.write(path, noisy_tone(SAMPLE_RATE, 61.2), SAMPLE_RATE)
    for cap, windows in ((60.5, 2), (51.7, 0)):
        blocks = list(decode_request(DecodeRequest((FileJob(str(path), (0,), ((None, None),)),), cap)))
        assert sum(len(b.lengths) for b in blocks) == windows, cap
        assert [str(f) for b in blocks for _, f in b.failed] == [f"TooLongError: {path} is longer than max_duration_s={cap:g}"]


def test_a_1_hz_header_fails_at_once(tmp_path):
    """A 180 KB WAV that claims 1 Hz: the resampler would make 16,000 samples of each one."""
    path = tmp_path / "slow.wav"
    sf.write(path, noisy_tone(SAMPLE_RATE, 5.6), SAMPLE_RATE, subtype="PCM_16")
    _patch_wav(path, rate=1)
    assert 170_000 < path.stat().st_size < 190_000
    t0 = time.perf_counter()
    (block,) = decode_request(DecodeRequest((FileJob(str(path), (0,), ((None, None),)),)))
    assert time.perf_counter() - t0 < 1
    assert [f.kind for _, f in block.failed] == ["DecodeError"]
    assert block.failed[0][1].message == f"cannot decode {path}: implausible sample rate 1 Hz (accepted: 1000..1000000 Hz)"


# --- segments -------------------------------------------------------------------------------

SEGMENTS = [(0.0, 0.5), (1.2345, 3.1), (2.00001, 2.5), (5.0, 9.75), (9.0, None), (None, 0.3)]


def _slice(full: np.ndarray, start_s, end_s) -> np.ndarray:
    a = 0 if start_s is None else round(start_s * SAMPLE_RATE)
    b = None if end_s is None else round(end_s * SAMPLE_RATE)
    return full[a:b]


@pytest.mark.parametrize("ext", ["wav", "flac"])
def test_segments_of_16k_source_equal_slices_exactly(tmp_path, ext):
    path = tmp_path / f"a.{ext}"
    sf.write(path, noisy_tone(SAMPLE_RATE, 10.0), SAMPLE_RATE)
    full = load_audio(path).samples
    for start_s, end_s in SEGMENTS:
        got = load_audio(path, start_s=start_s, end_s=end_s)
        np.testing.assert_array_equal(got.samples, _slice(full, start_s, end_s))
        assert got.duration_s == len(got.samples) / SAMPLE_RATE
    for (start_s, end_s), got in zip(SEGMENTS, load_segments(path, SEGMENTS), strict=True):
        np.testing.assert_array_equal(got.samples, _slice(full, start_s, end_s))


@pytest.mark.parametrize("sr", [44100, 22050, 48000])
def test_segments_of_resampled_source_match_full_decode(tmp_path, sr):
    path = tmp_path / "a.flac"
    sf.write(path, noisy_tone(sr, 10.0), sr)
    full = load_audio(path).samples
    for start_s, end_s in SEGMENTS:
        got = load_audio(path, start_s=start_s, end_s=end_s).samples
        ref = _slice(full, start_s, end_s)
        assert len(got) == len(ref)
        assert np.abs(got - ref).max() < 1e-4
    for (start_s, end_s), got in zip(SEGMENTS, load_segments(path, SEGMENTS), strict=True):
        assert np.abs(got.samples - _slice(full, start_s, end_s)).max() < 1e-4


def test_far_apart_segments_are_each_correct(tmp_path):
    # Segments more than SEGMENT_GAP_S apart are read in separate seeked passes.
    path = tmp_path / "long.flac"
    sf.write(path, noisy_tone(44100, 75.0), 44100)
    full = load_audio(path).samples
    segments = [(70.0, 71.5), (1.0, 2.0), (35.5, 36.0), (74.0, None)]
    for (start_s, end_s), got in zip(segments, load_segments(path, segments), strict=True):
        ref = _slice(full, start_s, end_s)
        assert len(got.samples) == len(ref)
        assert np.abs(got.samples - ref).max() < 1e-4


def test_end_past_eof_is_clipped(tmp_path):
    path = tmp_path / "a.wav"
    sf.write(path, noisy_tone(44100, 3.0), 44100)
    got = load_audio(path, start_s=2.0, end_s=10.0)
    assert got.duration_s == pytest.approx(1.0, abs=1 / SAMPLE_RATE)
    assert len(got.samples) == len(load_audio(path).samples) - 2 * SAMPLE_RATE


def test_bad_segments_fail_alone(tmp_path):
    path = tmp_path / "a.wav"
    sf.write(path, noisy_tone(SAMPLE_RATE, 3.0), SAMPLE_RATE)
    segments = [
        (0.5, 1.0),
        (-1.0, 1.0),  # negative start
        (2.0, 1.0),  # end before start
        (1.0, 1.0),  # empty
        (float("nan"), 1.0),
        (0.0, float("nan")),
        (3.0, 4.0),  # starts exactly at the end of the file
        (10.0, None),  # starts past the end
        (2.5, None),
    ]
    results = load_segments(path, segments)
    assert isinstance(results[0], Decoded) and results[0].duration_s == 0.5
    assert isinstance(results[-1], Decoded) and results[-1].duration_s == 0.5
    for (start_s, end_s), r in zip(segments[1:-1], results[1:-1], strict=True):
        assert isinstance(r, SegmentError), (start_s, end_s, r)
        assert f"start_s={start_s!r}" in str(r) and str(path) in str(r)
    with pytest.raises(SegmentError, match="past the end"):
        load_audio(path, start_s=3.0)


@pytest.mark.parametrize("name, sr", [("a.wav", 16000), ("a.flac", 44100), ("a.m4a", 16000)])
def test_past_end_error_names_the_file_length(tmp_path, name, sr):
    path = tmp_path / name
    if name.endswith(".m4a"):
        write_av(path, noisy_tone(sr, 3.0), sr)
    else:
        sf.write(path, noisy_tone(sr, 3.0), sr)
    length = f"({load_audio(path).duration_s:.3f} s)"
    # Alone, the far segment is a read of its own that finds nothing; the file's length is
    # still reported, not where the read would have started.
    for segments in ([(100.0, 101.0)], [(0.5, 1.0), (100.0, 101.0)], [(3.5, None)]):
        result = load_segments(path, segments)[-1]
        assert isinstance(result, SegmentError) and "past the end" in str(result)
        assert length in str(result), str(result)


def test_decode_request_streams_windows_that_make_up_load_segments(tmp_path):
    """The worker's entry point: windows of each row, then done (or failed) once per row."""
    a, b = tmp_path / "a.wav", tmp_path / "b.flac"
    sf.write(a, noisy_tone(SAMPLE_RATE, 2.0), SAMPLE_RATE)
    sf.write(b, noisy_tone(44100, 70.0, seed=1), 44100)  # three windows: 30 + 30 + 10 s
    req = DecodeRequest((FileJob(str(a), (0, 1), ((0.0, 1.0), (5.0, 6.0))), FileJob(str(b), (2,), ((None, None),))), 120.0)
    windows, done, failed = {}, {}, {}
    for block in decode_request(req):
        pos = 0
        for item, index, n in zip(block.items, block.index, block.lengths):
            windows.setdefault(int(item), {})[int(index)] = block.samples[pos : pos + n]
            pos += n
        assert pos == len(block.samples)
        for item, count, duration in block.done:
            assert item not in done and item not in failed
            done[item] = (count, duration)
        failed.update((i, str(e)) for i, e in block.failed)
    assert set(done) == {0, 2} and set(failed) == {1} and failed[1].startswith("SegmentError: ")
    np.testing.assert_array_equal(windows[0][0], load_audio(a, end_s=1.0).samples)
    whole = load_audio(b).samples
    assert done[2] == (3, len(whole) / SAMPLE_RATE) and [len(w) for _, w in sorted(windows[2].items())] == [480000, 480000, 160000]
    np.testing.assert_array_equal(np.concatenate([w for _, w in sorted(windows[2].items())]), whole)


def test_a_too_short_row_is_a_failure_and_a_too_short_tail_window_adds_nothing(tmp_path):
    short, tail = tmp_path / "short.wav", tmp_path / "tail.wav"
    sf.write(short, noisy_tone(SAMPLE_RATE, 0.015), SAMPLE_RATE)  # 240 samples: no output frame
    sf.write(tail, noisy_tone(SAMPLE_RATE, 30.01), SAMPLE_RATE)  # 30 s + 160 samples
    blocks = list(decode_request(DecodeRequest((FileJob(str(short), (0,), ((None, None),)), FileJob(str(tail), (1,), ((None, None),))))))
    failed = {i: str(e) for blk in blocks for i, e in blk.failed}
    done = {d[0]: d for blk in blocks for d in blk.done}
    assert failed[0].startswith("TooShort: ") and str(short) in failed[0] and "15.0 ms" in failed[0]
    assert done[1][1] == 1 and done[1][2] == pytest.approx(30.01)  # one window; duration counts the tail
    assert [int(n) for blk in blocks for n in blk.lengths] == [480000]


# --- fuzzing --------------------------------------------------------------------------------

FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "150")),
    deadline=timedelta(seconds=3),  # a decode of a few KB takes milliseconds; this catches hangs
    database=None,  # no .hypothesis/ directory in the repository
    suppress_health_check=[HealthCheck.too_slow],
)


def _check_outcome(path, **kwargs) -> None:
    try:
        got = load_audio(path, **kwargs)
    except AudioError as e:
        assert str(path) in str(e)
        return
    assert got.samples.dtype == np.float32 and got.samples.ndim == 1
    assert len(got.samples) > 0 and np.isfinite(got.samples).all()


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


MAGIC = [b"", b"RIFF\x24\x08\x00\x00WAVEfmt ", b"fLaC", b"OggS", b"ID3\x03", b"\xff\xfb", b"\x00\x00\x00\x20ftypM4A "]


@pytest.mark.timeout(120)
@FUZZ
@given(prefix=st.sampled_from(MAGIC), body=st.binary(max_size=4096), ext=st.sampled_from(["wav", "mp3", "bin", "m4a"]))
def test_fuzz_random_bytes(fuzz_dir, prefix, body, ext):
    path = fuzz_dir / f"random.{ext}"
    path.write_bytes(prefix + body)
    _check_outcome(path)


@pytest.mark.timeout(120)
@FUZZ
@given(data=st.data())
def test_fuzz_truncated_and_damaged_real_files(fuzz_dir, real_files, data):
    ext = data.draw(st.sampled_from(sorted(real_files)))
    raw = bytearray(real_files[ext])
    raw = raw[: data.draw(st.integers(0, len(raw)))]
    for _ in range(data.draw(st.integers(0, 8))):  # and a few flipped bytes
        if raw:
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    path = fuzz_dir / f"cut{ext}"
    path.write_bytes(bytes(raw))
    start = data.draw(st.sampled_from([None, 0.1]))
    _check_outcome(path, start_s=start, end_s=None if start is None else 0.3)


@pytest.mark.parametrize("channels", range(1, 10))
def test_downmix_is_numpys_float32_mean_bit_for_bit(channels):
    data = np.random.default_rng(channels).standard_normal((4001, channels)).astype(np.float32)
    want = data[:, 0] if channels == 1 else data.mean(axis=1, dtype=np.float32)
    np.testing.assert_array_equal(downmix(data, "x.wav", 0, 8000), want)


@pytest.mark.parametrize("value, channels, message", [
    (np.nan, 1, "NaN samples (first at 0.250 s)"),
    (-np.inf, 2, "Inf samples (first at 0.250 s)"),
    (3.4e38, 2, "overflowing samples (first at 0.250 s)"),  # finite, but the two channels' sum is not
    (-2e4, 1, "implausible sample value 2e+04 (first at 0.250 s; audio is within ±1)"),  # the peak of a negative sample
])
def test_downmix_refuses_what_is_not_audio(value, channels, message):
    data = np.full((8000, channels), 0.25, np.float32)
    data[2000:2002] = value
    with pytest.raises(DecodeError) as info:
        downmix(data, "x.wav", 0, 8000)
    assert str(info.value) == f"cannot decode x.wav: {message}"
