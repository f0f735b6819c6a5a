"""Truncation (issue 12): an MP3 whose info header gives its length, and any stream that FFmpeg
reports broken, fails instead of embedding a part of itself.

The MP3s are written by libsndfile (LAME, with a Xing header and a LAME tag) from builders'
speech-like signal; the damaged ones are cut or spliced here. The other containers are written
with PyAV.
"""

from __future__ import annotations

import av
import numpy as np
import pytest
import soundfile as sf

from builders import speechlike, write_audio
from extractor.audio import mp3
from extractor.audio.decode import DecodeRequest, FileJob, WindowBlock, decode_request, load_audio
from extractor.constants import SAMPLE_RATE

SECONDS = 10.0


def read_at(data: bytes):
    return lambda offset, size: data[offset : offset + size]


def decode_record(path) -> tuple[str | None, float | None]:
    """(failure record, duration_s) of a whole file, as the pipeline gets them."""
    request = DecodeRequest((FileJob(str(path), (0,), ((None, None),)),))
    failed, done = None, None
    for m in decode_request(request):
        assert isinstance(m, WindowBlock)
        failed = next((str(e) for _, e in m.failed), failed)
        done = next((d for _, _, d in m.done), done)
    return failed, done


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    path = write_audio(tmp_path_factory.mktemp("mp3") / "clean.mp3", speechlike(SECONDS, sr=44100, seed=1), 44100)
    return path, path.read_bytes()


def frame_starts(data: bytes) -> list[int]:
    """Where each frame of an MP3 without tags begins."""
    starts, pos = [], 0
    while (frame := mp3._parse_header(data[pos : pos + 4])) is not None:
        starts.append(pos)
        pos += frame.length
    return starts


@pytest.mark.parametrize("rate, channels", [(8000, 1), (22050, 1), (44100, 2), (48000, 1)])
def test_the_declared_length_is_what_libsndfile_wrote(tmp_path, rate, channels):
    # MPEG-2.5, MPEG-2 and MPEG-1; mono and stereo put Xing at different offsets.
    x = speechlike(3.0, sr=rate, seed=2)
    path = write_audio(tmp_path / "a.mp3", np.stack([x] * channels, 1) if channels > 1 else x, rate)
    length = mp3.declared_length(read_at(path.read_bytes()))
    assert length is not None and length.header == "Xing" and length.gapless
    assert (length.samples, length.sample_rate) == (len(x), rate)
    assert sf.info(str(path)).frames == len(x)


def test_a_clean_mp3_decodes_whole_with_or_without_an_id3_tag(clean, tmp_path):
    path, data = clean
    tagged = tmp_path / "tagged.mp3"
    body = b"TIT2" + (2990).to_bytes(4, "big") + b"\0\0\x03" + b"x" * 2989  # a 3000-byte title frame
    size = len(body)
    syncsafe = bytes([(size >> 21) & 0x7F, (size >> 14) & 0x7F, (size >> 7) & 0x7F, size & 0x7F])
    tagged.write_bytes(b"ID3\x03\x00\x00" + syncsafe + body + data)
    assert mp3.declared_length(read_at(tagged.read_bytes())) == mp3.declared_length(read_at(data))
    for p in (path, tagged):
        failed, duration = decode_record(p)
        assert failed is None and duration == SECONDS
        assert len(load_audio(p).samples) == SECONDS * SAMPLE_RATE


@pytest.mark.parametrize("damage", ["cut_at_3.5KB", "cut_at_a_third", "junk_at_a_third"])
def test_a_truncated_or_spliced_mp3_is_a_decode_error(clean, tmp_path, damage):
    _, data = clean
    third = len(data) // 3
    junk = np.random.default_rng(0).bytes(4096)
    damaged = {"cut_at_3.5KB": data[:3584], "cut_at_a_third": data[:third], "junk_at_a_third": data[:third] + junk + data[third:]}[damage]
    path = tmp_path / f"{damage}.mp3"
    path.write_bytes(damaged)
    failed, duration = decode_record(path)
    assert duration is None and failed is not None
    assert failed.startswith(f"DecodeError: cannot decode {path}: ") and "truncated MP3" in failed, failed
    assert f"{SECONDS:.3f} s" in failed  # the declared length; the message also gives what decoded


def test_a_vbri_header_is_read_and_checked(clean, tmp_path):
    # Fraunhofer's VBRI header, put in place of the Xing frame's content: libsndfile cannot use
    # it (it would decode about half of the file), so FFmpeg decodes it, against its count.
    _, data = clean
    xing = mp3.declared_length(read_at(data))
    first = frame_starts(data)[1]
    vbri = bytearray(data)
    vbri[4:first] = bytes(first - 4)
    vbri[36:54] = b"VBRI" + b"\0\x01" + b"\0\0" + b"\0\x4b" + len(data).to_bytes(4, "big") + xing.frames.to_bytes(4, "big")
    length = mp3.declared_length(read_at(bytes(vbri)))
    assert length == mp3.Mp3Length(xing.frames * 1152, 44100, xing.frames, 1152, "VBRI", gapless=False)
    whole, cut = tmp_path / "vbri.mp3", tmp_path / "vbri_cut.mp3"
    whole.write_bytes(vbri)
    cut.write_bytes(vbri[: len(vbri) // 3])
    failed, duration = decode_record(whole)
    assert failed is None and abs(duration - length.seconds) < 1152 / 44100
    failed, duration = decode_record(cut)
    assert duration is None and failed.startswith(f"DecodeError: cannot decode {cut}: "), failed


def test_without_an_info_header_a_cut_cannot_be_known(clean, tmp_path):
    # What mp3.py says cannot be known: without a header, an MP3 cut short is just a shorter MP3.
    # Whole, it still decodes whole (libsndfile alone stops at its guess of the length, 28% of
    # this VBR file: FFmpeg decodes it instead).
    _, data = clean
    starts = frame_starts(data)
    bare = data[starts[1] :]  # no Xing frame
    assert mp3.declared_length(read_at(bare)) is None and mp3.variable_bitrate(read_at(bare))
    full, cut = tmp_path / "bare.mp3", tmp_path / "bare_cut.mp3"
    full.write_bytes(bare)
    cut.write_bytes(bare[: starts[len(starts) // 3] - starts[1]])
    failed, duration = decode_record(full)
    assert failed is None and abs(duration - SECONDS) < 0.05
    failed, duration = decode_record(cut)
    assert failed is None and duration < SECONDS / 2  # embedded as a shorter file


def test_without_an_info_header_a_trailing_tag_still_decodes_at_constant_bitrate(tmp_path):
    # A constant-bitrate MP3 without a header stays with libsndfile, whose guess of its length is
    # right and which reads past a Lyrics3 tag after the last frame (FFmpeg fails on it).
    x = speechlike(SECONDS, sr=44100, seed=4)
    cbr = tmp_path / "cbr.mp3"
    sf.write(str(cbr), x, 44100, bitrate_mode="CONSTANT", compression_level=0.5)
    data = cbr.read_bytes()
    assert mp3.declared_length(read_at(data)).header == "Info" and not mp3.variable_bitrate(read_at(data))
    bare = data[frame_starts(data)[1] :] + b"LYRICSBEGININD00002" + b"x" * 300 + b"000350LYRICS200"
    path = tmp_path / "cbr_bare_lyrics.mp3"
    path.write_bytes(bare)
    assert mp3.declared_length(read_at(bare)) is None and not mp3.variable_bitrate(read_at(bare))
    failed, duration = decode_record(path)
    assert failed is None and abs(duration - SECONDS) < 0.05


# --- other containers: what FFmpeg reports mid-stream ------------------------------------------


def write_with_pyav(path, fmt: str, codec: str, seconds: float = 6.0, rate: int = 48000):
    x = (speechlike(seconds, sr=rate, seed=6) * 32767).astype(np.int16)
    with av.open(str(path), "w", format=fmt) as c:
        s = c.add_stream(codec, rate=rate, layout="mono")
        for pos in range(0, len(x), 960):
            frame = av.AudioFrame.from_ndarray(x[None, pos : pos + 960], format="s16", layout="mono")
            frame.sample_rate, frame.pts = rate, pos
            c.mux(s.encode(frame))
        c.mux(s.encode(None))
    return path


@pytest.mark.parametrize("fmt, codec, suffix", [("webm", "libopus", "webm"), ("ipod", "aac", "m4a")])
def test_a_stream_ffmpeg_reports_broken_is_a_decode_error(tmp_path, fmt, codec, suffix):
    clean = write_with_pyav(tmp_path / f"clean.{suffix}", fmt, codec)
    failed, duration = decode_record(clean)
    assert failed is None and abs(duration - 6.0) < 0.1
    data = bytearray(clean.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 200] = np.random.default_rng(0).bytes(200)
    # Twice in a row: FFmpeg's logger drops a message equal to the previous one by default.
    for name in ("broken1", "broken2"):
        broken = tmp_path / f"{name}.{suffix}"
        broken.write_bytes(data)
        failed, duration = decode_record(broken)
        assert duration is None and failed.startswith(f"DecodeError: cannot decode {broken}: "), failed
