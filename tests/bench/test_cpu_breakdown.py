"""bench/cpu_breakdown.py on a few small files: every stage is measured, the job's per-window code
(as the pipeline calls it) finishes every row, and the table names every stage per shape."""

from __future__ import annotations

import pytest

import cpu_breakdown as cb
import shapes
import synth_corpus
from synth_model import FULL_AUDIO


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    root = tmp_path_factory.mktemp("cpu")
    specs = {"flac16k_2_20s": synth_corpus.CorpusSpec(4, 0, 2.0, 20.0),
             "mp3_48k_2_10s": synth_corpus.CorpusSpec(2, 1, 2.0, 10.0, 48_000, 1, "mp3"),
             "flac44k_stereo": synth_corpus.CorpusSpec(1, 2, 40.0, 50.0, 44_100, 2, "flac"),
             "opus_48k_1_9s": synth_corpus.CorpusSpec(2, 4, 1.0, 9.0, 48_000, 1, "opus")}
    corpora = synth_corpus.build_corpora([(root / n, s) for n, s in specs.items()], workers=1)
    measured = {n: cb.measure_shape(c, 1, FULL_AUDIO["d_model"], FULL_AUDIO["encoder_layers"]) for n, c in zip(specs, corpora)}
    measured["corpora"] = dict(zip(specs, corpora))
    return measured


def shapes_of(measured):
    return {n: r for n, r in measured.items() if n != "corpora"}


def test_every_stage_is_measured(measured):
    for name, r in shapes_of(measured).items():
        cpu = r["cpu_s"]
        assert set(cb.LABELS) <= set(cpu), name
        assert cpu["decode"] > 0 and cpu["worker_inprocess"] > 0 and cpu["send"] > 0 and cpu["receive"] > 0, name
        assert cpu["worker"] == pytest.approx(cpu["worker_inprocess"] + cpu["send"])
        assert cpu["main"] == pytest.approx(sum(cpu[k] for k in cb.MAIN_STAGES))
        assert r["ms_per_audio_s"]["worker"] == pytest.approx(1e3 * cpu["worker"] / r["audio_s"])
    assert measured["flac16k_2_20s"]["cpu_s"]["resample"] == 0.0  # 16 kHz is not resampled
    assert measured["mp3_48k_2_10s"]["cpu_s"]["resample"] > 0
    assert measured["flac44k_stereo"]["cpu_s"]["downmix"] > 0
    assert measured["opus_48k_1_9s"]["cpu_s"]["resample"] > 0  # decoded by the job's own Opus path (48 kHz)


def test_windows_and_messages_match_the_files(measured):
    assert measured["flac16k_2_20s"]["windows"] == 4  # clips of 2-20 s: one window each
    assert measured["flac44k_stereo"]["windows"] == 2  # 40-50 s: two windows
    assert all(r["messages"] >= 1 and r["batches"] >= 1 for r in shapes_of(measured).values())


def test_the_table_names_each_stage_and_the_cores_needed(measured):
    text = cb.table(shapes_of(measured), 6800.0, "a test CPU")
    for label in cb.LABELS.values():
        assert label in text
    cores = next(line for line in text.splitlines() if line.strip().startswith("decode worker cores"))
    expected = [f"{r['ms_per_audio_s']['worker'] * 6.8:.1f}" for r in shapes_of(measured).values()]
    assert cores.split()[-len(expected):] == expected


def test_the_decode_ceiling_decodes_every_file_through_the_pool(measured):
    corpus = measured["corpora"]["mp3_48k_2_10s"]
    c = shapes.decode_ceiling(corpus, workers=1)
    # Every second of the corpus came back as windows (to the 16 kHz sample), and none failed.
    assert c["audio_seconds"] == pytest.approx(corpus["audio_seconds"], abs=2 / 16_000)
    assert c["failures"] == 0 and c["workers"] == 1
    assert c["audio_seconds_per_second"] > 0 and 0 < c["worker_cores"] <= 1.5


def test_the_opus_candidates_are_timed_and_compared(tmp_path):
    """--opus-candidates on two espeak-ng clips: every candidate timed at every bitrate, and the
    job's path is libsndfile's decode (read whole) to the waveform."""
    import shutil

    if shutil.which("espeak-ng") is None:
        pytest.skip("needs espeak-ng")
    clips = cb.espeak_opus_clips(tmp_path, 2, bitrates=(12_000, 64_000))
    results = cb.opus_candidates(clips, repeats=1)
    for rate in (12_000, 64_000):
        job = results[rate]["libopus via PyAV + soxr HQ (the job now, its code)"]
        assert job["realtime_per_core"] > 0 and job["min_cosine"] > 0.99999
        assert all(r["realtime_per_core"] > 0 for name, r in results[rate].items() if isinstance(r, dict))
    text = cb.opus_table(results, "a test CPU")
    assert "| libsndfile in 2 s blocks + soxr HQ (the job before) |" in text and "12 kbit/s" in text
