"""Opus through libopus (decode.OPUS_DECODER), against the recipe it replaced: libsndfile's decode
of the same file at 48 kHz, then soxr HQ to 16 kHz, computed here. Speech from espeak-ng, encoded
by libopus at three bitrates (SILK, hybrid and CELT frames), muxed into Ogg by the FFmpeg command
line and by PyAV's FFmpeg (whose muxer starts the granule positions past zero).

libsndfile is the reference read whole, in one call: read in blocks, as the job read it before,
it does not trim the pre-skip of a stream whose granules start past zero (6.5 ms late, the last
6.5 ms lost; bench/RESULTS.md). FFmpeg trims it either way, as the container says."""

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


def pyav_opus(path, x48: np.ndarray, bitrate: int) -> None:
    import av

    with av.open(str(path), "w", format="ogg") as out:
        stream = out.add_stream("libopus", rate=OPUS_RATE, layout="mono")
        stream.bit_rate = bitrate
        frame = av.AudioFrame.from_ndarray(x48[None, :], format="fltp", layout="mono")
        frame.sample_rate = OPUS_RATE
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)


@pytest.fixture(scope="module")
def opus_files(tmp_path_factory) -> dict[tuple[int, int, str], object]:
    """{(sentence, bitrate, muxer): path of an Ogg Opus file}: 48 kHz mono, as voice notes are."""
    d = tmp_path_factory.mktemp("opus")
    files = {}
    for i, text in enumerate(SENTENCES):
        wav = speak(d / f"s{i}.wav", text)
        x, rate = sf.read(str(wav), dtype="float32")
        x48 = soxr.resample(x, rate, OPUS_RATE, quality="HQ")
        for bitrate in BITRATES:
            files[i, bitrate, "ffmpeg"] = d / f"s{i}-{bitrate // 1000}k.opus"
            ffmpeg("-i", wav, "-ar", OPUS_RATE, "-ac", 1, "-c:a", "libopus", "-b:a", bitrate, files[i, bitrate, "ffmpeg"])
            files[i, bitrate, "pyav"] = d / f"s{i}-{bitrate // 1000}k-pyav.opus"
            pyav_opus(files[i, bitrate, "pyav"], x48, bitrate)
    return files


def reference(path) -> np.ndarray:
    """Today's recipe before OPUS_DECODER: libsndfile decodes (its own libopus), soxr HQ resamples."""
    x, rate = sf.read(str(path), dtype="float32")
    assert rate == OPUS_RATE
    stream = soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
    return np.concatenate([stream.resample_chunk(x), stream.resample_chunk(np.zeros(0, np.float32), last=True)])


def packet_samples(packet: bytes) -> int:
    """Samples at 48 kHz in an Opus packet, from its TOC byte (RFC 6716, section 3.1)."""
    config, code = packet[0] >> 3, packet[0] & 3
    if config < 12:
        size = (480, 960, 1920, 2880)[config % 4]  # SILK: 10, 20, 40, 60 ms
    elif config < 16:
        size = (480, 960)[config % 2]  # hybrid: 10, 20 ms
    else:
        size = (120, 240, 480, 960)[config % 4]  # CELT: 2.5, 5, 10, 20 ms
    return size * (1 if code == 0 else 2 if code < 3 else packet[1] & 0x3F)


def declared_frames(path) -> int:
    """What the Ogg container says the stream holds at 48 kHz (RFC 7845, section 4): the last
    granule position, less the pre-skip, less the start offset (how far the first audio page's
    granule position runs ahead of the samples its packets hold)."""
    data = path.read_bytes()
    pre_skip = struct.unpack_from("<H", data, data.index(b"OpusHead") + 10)[0]
    pages, packets, partial, at = [], [], b"", 0
    while (at := data.find(b"OggS", at)) >= 0:
        granule, count = struct.unpack_from("<q", data, at + 6)[0], data[at + 26]
        lacing = data[at + 27 : at + 27 + count]
        body = at + 27 + count
        for size in lacing:
            partial += data[body : body + size]
            body += size
            if size < 255:
                packets.append(partial)
                partial = b""
        pages.append((granule, len(packets)))
        at = body
    audio = [packet_samples(p) for p in packets[2:]]  # after OpusHead and OpusTags
    granule, ended = next((g, n) for g, n in pages if n > 2)  # the first page that ends an audio packet
    start_offset = granule - sum(audio[: ended - 2])
    return pages[-1][0] - pre_skip - start_offset


@pytest.mark.parametrize("bitrate", BITRATES)
def test_embeddings_match_the_libsndfile_recipe(opus_files, tiny_ref_adapted, bitrate):
    path = opus_files[1, bitrate, "ffmpeg"]
    ours = canonical_embedding(tiny_ref_adapted, load_audio(path).samples)
    theirs = canonical_embedding(tiny_ref_adapted, reference(path))
    assert cosine(ours, theirs) >= 0.9999, (path.name, cosine(ours, theirs))


@pytest.mark.parametrize("muxer", ["ffmpeg", "pyav"])
@pytest.mark.parametrize("bitrate", BITRATES)
def test_samples_are_aligned_and_as_long_as_the_container_says(opus_files, bitrate, muxer):
    """No shift and no sample lost or added: pre-skip and end trimming are the container's."""
    for i in range(len(SENTENCES)):
        path = opus_files[i, bitrate, muxer]
        ours, theirs = load_audio(path).samples, reference(path)
        frames = declared_frames(path)
        assert sf.info(str(path)).frames == frames  # libsndfile honours both trims too
        assert len(ours) == len(theirs) == _resampled_length(frames, OPUS_RATE), (path.name, len(ours), len(theirs))
        # Aligned: of every lag up to a packet either way, 0 correlates best, and nearly perfectly.
        n = len(ours) + len(theirs)
        correlation = np.fft.irfft(np.fft.rfft(ours, n) * np.conj(np.fft.rfft(theirs, n)), n)
        window = PACKET * SAMPLE_RATE // OPUS_RATE
        best = int(np.argmax(np.concatenate([correlation[-window:], correlation[: window + 1]]))) - window
        assert best == 0 and cosine(ours, theirs) >= 0.99999, (path.name, best, cosine(ours, theirs))


def test_opus_in_webm_decodes_like_the_same_packets_in_ogg(opus_files, tmp_path):
    """Matroska carries the pre-skip as CodecDelay and the end trim as DiscardPadding; the same
    packets give the same samples, bit for bit."""
    ogg = opus_files[1, 24_000, "ffmpeg"]
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
    path = opus_files[1, 64_000, "pyav"]
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


def test_an_output_from_before_keeps_decoding_ogg_opus_with_libsndfile(opus_files):
    """A resume of an output whose recipe says libsndfile (every output from before the field)
    keeps it: the requests carry the output's decoder, so no output mixes the two."""
    from extractor.audio.decode import DecodeRequest, FileJob, decode_request

    path = opus_files[0, 24_000, "ffmpeg"]

    def decoded(opus_decoder: str) -> np.ndarray:
        blocks = list(decode_request(DecodeRequest((FileJob(str(path), (0,), ((None, None),)),), opus_decoder=opus_decoder)))
        return np.concatenate([b.samples for b in blocks])

    kept, today = decoded("libsndfile"), decoded(OPUS_DECODER)
    libsndfile = load_segments(str(path), [(None, None)])[0]
    assert not np.array_equal(kept, today)  # two decoders, as the recipe says
    assert np.array_equal(today, libsndfile.samples)  # the default path is today's decoder
    sf_blocks = []
    with sf.SoundFile(str(path)) as f:  # libsndfile read in the job's blocks, as before the field
        stream = soxr.ResampleStream(f.samplerate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
        while len(block := f.read(2 * f.samplerate, dtype="float32")):
            sf_blocks.append(stream.resample_chunk(block))
        sf_blocks.append(stream.resample_chunk(np.zeros(0, np.float32), last=True))
    assert np.array_equal(kept, np.concatenate(sf_blocks))
