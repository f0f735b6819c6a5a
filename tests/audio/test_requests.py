"""extractor.audio.requests: how rows become decode requests and what each answer means for them,
with no thread and no process (the pool's messages are made here)."""

from __future__ import annotations

import pickle

import numpy as np
import polars as pl

from extractor.audio.decode import WindowBlock
from extractor.audio.pool import END, WorkerFailure
from extractor.audio.requests import MAX_SEGMENTS_PER_FILE, REQUEST_AUDIO_S, Limits, Requests, files_per_request
from extractor.audio.sources import byte_cap
from extractor.ledger import Failure
from extractor.pending import Pending

LIMITS = Limits(max_duration_s=60.0)


def rows(paths, **cols) -> pl.DataFrame:
    return pl.DataFrame({"id": [f"r{i}" for i in range(len(paths))], "path": paths, **cols,
                         "__row": list(range(len(paths)))})


def block(items, windows=1, duration=1.0, failed=()):
    n = len(items) * windows
    return WindowBlock(np.zeros(n * 10, np.float32), np.full(n, 10), np.repeat(np.asarray(items, np.int64), windows),
                       np.tile(np.arange(windows), len(items)), [(i, windows, duration) for i in items], list(failed))


def test_rows_of_one_file_share_a_request_up_to_a_limit():
    paths = ["a.wav"] * (MAX_SEGMENTS_PER_FILE + 2) + ["b.wav"]
    reqs = list(Requests(Pending(rows(paths, start_s=[float(i) for i in range(len(paths))])), LIMITS))
    files = [f for _, r in reqs for f in r.files]
    assert [(f.name, len(f.items)) for f in files] == [("a.wav", MAX_SEGMENTS_PER_FILE), ("a.wav", 2), ("b.wav", 1)]
    assert files[1].segments == ((64.0, None), (65.0, None))
    assert sorted(i for f in files for i in f.items) == list(range(len(paths)))


def test_short_clips_are_grouped_by_the_audio_seen_so_far():
    requests = Requests(Pending(rows([f"c{i}.wav" for i in range(200)])), LIMITS)
    it = iter(requests)
    key, first = next(it)
    assert len(first.files) == files_per_request(REQUEST_AUDIO_S) == 1  # nothing seen yet: one file
    requests.answer(key, block([0], duration=0.5))
    key, second = next(it)
    assert len(second.files) == files_per_request(0.5) == 40


def test_chunks_that_arrive_later_continue_the_items():
    more = [rows(["x.wav", "y.wav"]), None]
    requests = list(Requests(Pending(rows(["w.wav"]), lambda: more.pop(0)), LIMITS))
    assert [(f.name, f.items) for _, r in requests for f in r.files] == [("w.wav", (0,)), ("x.wav", (1,)), ("y.wav", (2,))]


def test_answers_say_what_is_decoded_failed_or_unreported():
    requests = Requests(Pending(rows(["a.wav", "b.wav", "c.wav"])), LIMITS)
    (key, req), = [next(iter(requests))]
    assert len(req.files) == 1
    answer = requests.answer(key, block([0], windows=2, duration=3.5, failed=[]))
    assert answer.decoded == [(0, 2, 3.5)] and answer.block is not None and not answer.failed
    assert requests.answer(key, END).failed == []
    requests2 = Requests(Pending(rows(["a.wav"])), LIMITS)
    key, _ = next(iter(requests2))
    (item, failure), = requests2.answer(key, END).failed  # the decoder said nothing of row 0: loudly a failure
    assert item == 0 and failure.kind == "DecodeError" and "a.wav" in failure.message


def test_a_crash_fails_a_lone_file_and_retries_the_files_of_a_group_one_by_one():
    lone = Requests(Pending(rows(["a.wav"])), LIMITS)
    key, _ = next(iter(lone))
    crash = WorkerFailure(Failure("DecoderCrashed", "decoder crashed (signal 11: SIGSEGV) on a.wav"))
    assert lone.answer(key, crash).failed == [(0, crash.failure)] and lone.retries() == []

    group = Requests(Pending(rows(["a.wav", "b.wav", "c.wav"])), LIMITS)
    group._audio_seen, group._rows_seen = 1.0, 1  # clips of 1 s: all three in one request
    key, req = next(iter(group))
    assert len(req.files) == 3
    group.answer(key, block([0]))  # a.wav decoded, then the worker died on b.wav
    answer = group.answer(key, crash)
    assert answer.failed == [] and answer.retrying == []  # no row had sent windows it did not finish
    retries = group.retries()
    assert [r.files[0].name for _, r in retries] == ["b.wav", "c.wav"] and all(len(r.files) == 1 for _, r in retries)


def test_a_worker_killed_from_outside_costs_its_rows_one_more_try():
    requests = Requests(Pending(rows(["long.wav"])), LIMITS)
    key, _ = next(iter(requests))
    requests.answer(key, WindowBlock(np.zeros(10, np.float32), np.array([10]), np.array([0]), np.array([0])))  # a window, then killed
    killed = WorkerFailure(Failure("DecoderKilled", "decode worker 7 was killed (signal 9: SIGKILL) on long.wav"), killed=True)
    answer = requests.answer(key, killed)
    assert answer.failed == [] and answer.retrying == [0]  # its first window is void: it decodes again from the start
    (key2, retry), = requests.retries()
    assert retry.files[0].name == "long.wav" and retry.files[0].items == (0,)
    assert requests.answer(key2, killed).failed == [(0, killed.failure)]  # killed twice: a failure


class Blobs:
    def __init__(self, data):
        self.data = data

    def blobs(self, rows):
        yield from (self.data[r] for r in rows)


def test_stored_audio_travels_out_of_band_and_an_oversized_blob_fails_unsent():
    cap = byte_cap(1.0)
    big = memoryview(bytearray(int(cap) + 1))  # a view: no copy of what the manifest holds
    blobs = Blobs([b"RIFF-small", big, None, b""])
    requests = Requests(Pending(rows(["m#row=0", "m#row=1", "from-path.wav", "m#row=3"])), Limits(max_duration_s=1.0), blobs)
    files = [f for _, r in requests for f in r.files]
    assert [f.name for f in files] == ["m#row=0", "from-path.wav", "m#row=3"]
    assert isinstance(files[0].data, pickle.PickleBuffer) and bytes(files[0].data) == b"RIFF-small"
    assert files[1].data is None and files[2].data == b""
    (item, failure), = requests.unsent()
    assert item == 1 and failure.kind == "TooLongError" and "m#row=1" in failure.message and f"{int(cap) + 1:,}" in failure.message
    buffers = []
    pickle.dumps(files[0], protocol=5, buffer_callback=buffers.append)
    assert len(buffers) == 1  # the audio is a buffer of its own on the wire, not part of the pickle
