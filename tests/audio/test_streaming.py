"""Decoding memory is bounded by a window, not by a file (issue 10): measured in a real worker."""

from __future__ import annotations

import numpy as np
import soundfile as sf

from extractor.audio.decode import DecodeRequest, FileJob, WindowBlock
from extractor.audio.pool import END, DecodePool
from extractor.constants import N_SAMPLES, SAMPLE_RATE

MB = 1 << 20


def _write_long_wav(path, seconds: int, sr: int = SAMPLE_RATE) -> None:
    """A long file written a minute at a time (never whole in the test's memory either)."""
    rng = np.random.default_rng(0)
    minute = (0.3 * np.sin(2 * np.pi * 220 * np.arange(60 * sr) / sr) + 0.01 * rng.standard_normal(60 * sr)).astype(np.float32)
    with sf.SoundFile(path, "w", sr, 1, subtype="PCM_16") as f:
        for _ in range(seconds // 60):
            f.write(minute)


def _decode_in_worker(request: DecodeRequest) -> tuple[dict, int, int, dict]:
    """Stream `request` through a real decode worker, dropping each block as it comes: (rss report,
    windows, samples, done entries).

    The worker first decodes 10 s of the same file, unmeasured: what a worker allocates once, on
    its first file (libsndfile's and numpy's first buffers, the pipe's, ~14 MB here), is not what
    a file costs, and left in the measure it made the bound flaky (20 MB against 18 MB on a busy
    CI machine, where the request's own growth is ~4 MB)."""
    report, windows, samples, done = None, 0, 0, {}
    first = request.files[0]
    warm_up = DecodeRequest((FileJob(first.name, (0,), ((0.0, 10.0),)),), request.max_duration_s)
    with DecodePool(1, decode_fn=__import__("tests.hooks", fromlist=["x"]).decode_reporting_peak_rss) as pool:
        for _ in pool.stream([(0, warm_up)]):
            pass
        for _, message in pool.stream([(0, request)]):
            if isinstance(message, WindowBlock):
                windows += len(message.lengths)
                samples += int(message.lengths.sum())
                done.update({d[0]: d for d in message.done})
                assert not message.failed, message.failed
            elif message is not END:
                report = message
    return report, windows, samples, done


def test_a_two_hour_file_costs_a_worker_a_window_not_the_file(tmp_path):
    path = tmp_path / "two_hours.wav"
    _write_long_wav(path, 2 * 3600)
    report, windows, samples, done = _decode_in_worker(DecodeRequest((FileJob(str(path), (0,), ((None, None),)),), 3 * 3600.0))
    decoded_bytes = 2 * 3600 * SAMPLE_RATE * 4  # 460 MB of float32 if held whole
    grown = report["rss_peak_after"] - report["rss_peak_before"]
    assert windows == 240 and samples == 2 * 3600 * SAMPLE_RATE and done[0][1] == 240
    assert grown < 48 * MB < decoded_bytes / 9, f"the worker's peak RSS grew by {grown / MB:.0f} MB"


def test_64_segments_of_one_file_cost_no_more_than_one_decoded_copy(tmp_path):
    path = tmp_path / "five_minutes.wav"
    _write_long_wav(path, 300)
    # 64 overlapping segments, each most of the file: 64 copies would be 64 x 17 MB.
    segments = tuple((float(i), 290.0 - i) for i in range(64))
    report, windows, samples, done = _decode_in_worker(DecodeRequest((FileJob(str(path), tuple(range(64)), segments),)))
    one_copy = 300 * SAMPLE_RATE * 4  # 19 MB
    grown = report["rss_peak_after"] - report["rss_peak_before"]
    assert len(done) == 64 and samples == sum(round(e * SAMPLE_RATE) - round(s * SAMPLE_RATE) for s, e in segments)
    assert windows == sum(-(-(round(e * SAMPLE_RATE) - round(s * SAMPLE_RATE)) // N_SAMPLES) for s, e in segments)
    assert grown < one_copy, f"the worker's peak RSS grew by {grown / MB:.0f} MB, one decoded copy is {one_copy / MB:.0f} MB"
