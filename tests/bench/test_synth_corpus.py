"""The benchmark's corpus generator: each kind has the rate, channels, container and length asked
for, is the same whoever generates it, and is reused from its cache only when nothing changed."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

import synth_corpus as sc

KINDS = {
    "flac16k": sc.CorpusSpec(3, 0, 0.5, 1.5),
    "mp3_48k": sc.CorpusSpec(2, 1, 1.0, 2.0, 48_000, 1, "mp3"),
    "flac44k_stereo": sc.CorpusSpec(1, 2, 1.0, 2.0, 44_100, 2, "flac"),
    "wav16k": sc.CorpusSpec(4, 3, 0.4, 0.8, 16_000, 1, "wav"),
    "opus_48k": sc.CorpusSpec(2, 4, 1.0, 2.0, 48_000, 1, "opus"),
}


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpora")
    jobs = [(root / name, spec) for name, spec in KINDS.items()]
    return root, sc.build_corpora(jobs, workers=1)  # one pool over all four, as bench/shapes.py does


def test_every_kind_has_the_format_and_lengths_asked_for(corpora):
    root, stats = corpora
    for (name, spec), st in zip(KINDS.items(), stats):
        manifest = pq.read_table(st["manifest"]).to_pydict()
        assert manifest["id"] == [f"c{i:06d}" for i in range(spec.clips)]
        planned = sc.plan(spec.clips, spec.seed, spec.min_s, spec.max_s, spec.sample_rate)
        for path, frames in zip(manifest["path"], planned):
            assert path.endswith(f".{spec.container}") and path.startswith(str(root / name))
            info = sf.info(path)
            assert (info.samplerate, info.channels) == (spec.sample_rate, spec.channels), name
            # MP3 through libsndfile (mpg123) is gapless thanks to the LAME/Info header; Ogg Opus
            # declares its length (last granule, pre-skip).
            assert info.frames == frames, (name, info.frames, frames)
        assert st["audio_seconds"] == pytest.approx(planned.sum() / spec.sample_rate)
        assert st["reused"] is False and st["bytes"] > 0
    assert sum(st["cpu_s"] for st in stats) > 0  # the workers' CPU time, what the report extrapolates from


def test_files_sound_like_speech_not_noise(corpora):
    """Quiet syllables over a faint floor: what codecs and FLAC's predictor see in real speech."""
    _, stats = corpora
    for st in stats:
        x, rate = sf.read(pq.read_table(st["manifest"])["path"][0].as_py(), dtype="float32", always_2d=True)
        peak, rms = np.abs(x).max(), np.sqrt((x ** 2).mean())
        assert 0.05 < peak < 0.5 and 0.005 < rms < 0.2, (st["root"], peak, rms)


def test_stereo_channels_differ(corpora):
    _, stats = corpora
    x, _ = sf.read(pq.read_table(stats[2]["manifest"])["path"][0].as_py(), dtype="float32")
    assert x.shape[1] == 2 and not np.allclose(x[:, 0], x[:, 1], atol=1e-3)


def test_a_corpus_is_reused_only_when_its_parameters_match(corpora, tmp_path):
    root, stats = corpora
    digest = hashlib.sha256(open(stats[3]["manifest"], "rb").read()).hexdigest()
    again = sc.build_corpora([(root / "wav16k", KINDS["wav16k"])])[0]
    assert again["reused"] is True
    assert hashlib.sha256(open(again["manifest"], "rb").read()).hexdigest() == digest

    bigger = sc.CorpusSpec(5, 3, 0.4, 0.8, 16_000, 1, "wav")
    rebuilt = sc.build_corpora([(root / "wav16k", bigger)], workers=1)[0]
    assert rebuilt["reused"] is False and rebuilt["clips"] == 5
    assert len(pq.read_table(rebuilt["manifest"])) == 5


def test_the_same_clip_whoever_generates_it(corpora, tmp_path):
    """Seeded per clip, not per process: a rerun elsewhere writes the same bytes (FLAC is
    deterministic), and the first clips of a bigger corpus are the clips of a smaller one."""
    _, stats = corpora
    spec = KINDS["flac16k"]
    st = sc.build_corpora([(tmp_path / "more", sc.CorpusSpec(spec.clips + 2, spec.seed, spec.min_s, spec.max_s))], workers=1)[0]
    ours = pq.read_table(stats[0]["manifest"])["path"].to_pylist()
    theirs = pq.read_table(st["manifest"])["path"].to_pylist()
    for a, b in zip(ours, theirs):
        assert open(a, "rb").read() == open(b, "rb").read()


def test_the_tiny_opus_shape_is_generated_and_decodes_through_the_job(tmp_path):
    """bench/shapes.py's Ogg Opus shape at --tiny: every clip as long as planned, through the job's
    own decoder (libopus via PyAV), at 16 kHz to the sample."""
    import shapes
    from extractor.audio.decode import load_audio

    spec = shapes.corpus_of("opus_48k_1_9s", shapes.parse_args(["--tiny"]))
    assert (spec.container, spec.sample_rate, spec.channels, spec.min_s, spec.max_s) == ("opus", 48_000, 1, 1.0, 9.0)
    st = sc.build_corpora([(tmp_path / "opus", spec)])[0]
    assert st["encoder"] == sc.OPUS_ENCODER and st["clips"] == spec.clips
    planned = sc.plan(spec.clips, spec.seed, spec.min_s, spec.max_s, spec.sample_rate)
    for path, frames in zip(pq.read_table(st["manifest"])["path"].to_pylist(), planned):
        assert path.endswith(".opus")
        assert len(load_audio(path).samples) == round(frames / 3)  # 48 kHz to 16 kHz


def test_bad_specs_are_refused():
    with pytest.raises(ValueError, match="container"):
        sc.CorpusSpec(1, 0, 1.0, 2.0, container="ogg")
    with pytest.raises(ValueError, match="channels"):
        sc.CorpusSpec(1, 0, 1.0, 2.0, channels=6)
    with pytest.raises(ValueError, match="min_s"):
        sc.CorpusSpec(1, 0, 2.0, 1.0)
