"""Opus through libopus (decode.OPUS_DECODER), against the recipe it replaced: libsndfile's decode
of the same file at 48 kHz, then soxr HQ to 16 kHz, computed here. Speech from espeak-ng, encoded
by FFmpeg's libopus at three bitrates (SILK, hybrid and CELT frames)."""

from __future__ import annotations

import shutil
import struct
import subprocess

import numpy as np
import pytest
import soundfile as sf
import soxr

from builders import speak
from canonical import canonical_embedding, cosine
from extractor.audio.decode import OPUS_DECODER, _resampled_length, load_audio, load_segments
from extractor.constants import SAMPLE_RATE
from extractor.recipe import Recipe

BITRATES = (12_000, 24_000, 64_000)  # bit/s: a voice note, a WebRTC call, music-grade
OPUS_RATE = 48_000
PACKET = OPUS_RATE // 50  # 20 ms, FFmpeg's libopus default frame
SENTENCES = (
    "Please call Stella and ask her to bring these things with her from the store.",
    "Six spoons of fresh snow peas, five thick slabs of blue cheese, and maybe a snack for her brother Bob.",
)

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None or shutil.which("espeak-ng") is None,
                                reason="needs ffmpeg and espeak-ng")


def ffmpeg(*args) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", *map(str, args)], check=True)


@pytest.fixture(scope="module")
def opus_files(tmp_path_factory) -> dict[tuple[int, int], object]:
    """{(sentence, bitrate): path of an Ogg Opus file}: 48 kHz mono, as FFmpeg writes voice notes."""
    d = tmp_path_factory.mktemp("opus")
    files = {}
    for i, text in enumerate(SENTENCES):
        wav = speak(d / f"s{i}.wav", text)
        for rate in BITRATES:
            files[i, rate] = d / f"s{i}-{rate // 1000}k.opus"
            ffmpeg("-i", wav, "-ar", OPUS_RATE, "-ac", 1, "-c:a", "libopus", "-b:a", rate, files[i, rate])
    return files


def reference(path) -> np.ndarray:
    """Today's recipe before OPUS_DECODER: libsndfile decodes (its own libopus), soxr HQ resamples."""
    x, rate = sf.read(str(path), dtype="float32")
    assert rate == OPUS_RATE
    stream = soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
    return np.concatenate([stream.resample_chunk(x), stream.resample_chunk(np.zeros(0, np.float32), last=True)])


def declared_frames(path) -> int:
    """What the Ogg container says the stream holds at 48 kHz: the last page's granule position
    minus the OpusHead's pre-skip (RFC 7845, sections 4 and 5.1)."""
    data = path.read_bytes()
    pre_skip = struct.unpack_from("<H", data, data.index(b"OpusHead") + 10)[0]
    granule = struct.unpack_from("<q", data, data.rindex(b"OggS") + 6)[0]
    return granule - pre_skip


@pytest.mark.parametrize("bitrate", BITRATES)
def test_embeddings_match_the_libsndfile_recipe(opus_files, tiny_ref_adapted, bitrate):
    for i in range(len(SENTENCES)):
        path = opus_files[i, bitrate]
        ours = canonical_embedding(tiny_ref_adapted, load_audio(path).samples)
        theirs = canonical_embedding(tiny_ref_adapted, reference(path))
        assert cosine(ours, theirs) >= 0.9999, (path.name, cosine(ours, theirs))


@pytest.mark.parametrize("bitrate", BITRATES)
def test_samples_are_aligned_and_as_long_as_the_container_says(opus_files, bitrate):
    """No shift and no sample lost or added: pre-skip and end trimming are the container's."""
    for i in range(len(SENTENCES)):
        path = opus_files[i, bitrate]
        ours, theirs = load_audio(path).samples, reference(path)
        frames = declared_frames(path)
        assert sf.info(str(path)).frames == frames  # libsndfile honours both trims too
        assert len(ours) == len(theirs) == _resampled_length(frames, OPUS_RATE), (path.name, len(ours), len(theirs))
        # Aligned: lag 0 is the best of every lag up to a packet (6.7 ms at 16 kHz) either way.
        lags = range(-PACKET // 3, PACKET // 3 + 1)
        scores = {lag: cosine(ours[max(lag, 0):len(ours) + min(lag, 0)], theirs[max(-lag, 0):len(theirs) - max(lag, 0)]) for lag in lags}
        assert max(scores, key=scores.get) == 0 and scores[0] >= 0.99999, (path.name, scores[0])


def test_opus_in_webm_decodes_like_the_same_packets_in_ogg(opus_files, tmp_path):
    """Matroska carries the pre-skip as CodecDelay and the end trim as DiscardPadding; the same
    packets give the same samples, bit for bit."""
    ogg = opus_files[1, 24_000]
    webm = tmp_path / "same.webm"
    ffmpeg("-i", ogg, "-c", "copy", webm)
    np.testing.assert_array_equal(load_audio(webm).samples, load_audio(ogg).samples)


def test_ogg_opus_written_by_libsndfile_matches_too(tmp_path):
    """Another encoder's stream (libsndfile's own, with its own pre-skip), read back both ways."""
    x, rate = sf.read(str(speak(tmp_path / "s.wav", SENTENCES[0])), dtype="float32")
    path = tmp_path / "s.ogg"
    sf.write(str(path), soxr.resample(x, rate, OPUS_RATE), OPUS_RATE, format="OGG", subtype="OPUS")
    ours, theirs = load_audio(path).samples, reference(path)
    assert len(ours) == len(theirs) and cosine(ours, theirs) >= 0.99999


def test_a_segment_of_an_opus_file_is_the_slice_of_its_whole_decode(opus_files):
    """As for any resampled source: equal once the resampler's warm-up margin has passed."""
    path = opus_files[1, 64_000]
    full = load_audio(path).samples
    seg, late = load_segments(path, [(0.5, 1.25), (2.0, None)])
    np.testing.assert_allclose(seg.samples, full[8000:20000], atol=1e-6)
    np.testing.assert_allclose(late.samples, full[32000:], atol=1e-6)


def test_the_recipe_records_the_opus_decoder_and_old_outputs_read_as_libsndfile():
    new = Recipe("m", None, 64, True, "float32")
    assert new.opus_decoder == OPUS_DECODER
    old = {k: v for k, v in new.__dict__.items() if k != "opus_decoder"}  # a _run.json from before the field
    assert Recipe.from_dict(old).opus_decoder == "libsndfile"
    assert new.differences(Recipe.from_dict(old)) == [f"opus_decoder: 'libsndfile' (existing output) → {OPUS_DECODER!r} (this run)"]
