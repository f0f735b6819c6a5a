"""Tests of extractor.audio.pool: isolation from crashes and hangs, results, streaming, laziness, shutdown."""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from dataclasses import dataclass

from extractor.audio.decode import AudioError, Decoded, load_segments
from extractor.audio.pool import END, DecodePool, WorkerFailure
from extractor.ledger import Failure

TIMEOUT_S = 1.5
REPO = Path(__file__).resolve().parents[2]


# Decode functions run in the workers: top-level, so they pickle by reference.


@dataclass(frozen=True)
class Req:
    """A request of the pool's plain-function form: one file, its segments, one list of results."""

    path: str
    segments: tuple = ((None, None),)
    max_duration_s: float = 60.0


def decode_segments(request: Req):
    return load_segments(request.path, request.segments, max_duration_s=request.max_duration_s)


def faulty_decode(request: Req):
    """decode_request, unless the path asks for a fault."""
    name = os.path.basename(request.path)
    if "segv" in name:
        ctypes.string_at(0)  # a real segfault in native code
    if "sleep" in name:
        time.sleep(60)
    if "raise" in name:
        raise ValueError(f"boom on {request.path}")
    if "pid" in name:
        return os.getpid()
    return decode_segments(request)


def echo_size(request):
    return np.full(request, 0.25, dtype=np.float32)


def chatty(messages: int):
    """A long file's job: many messages, then END."""
    for i in range(messages):
        yield i


# --- helpers --------------------------------------------------------------------------------


def imap(pool: DecodePool, items):
    """(key, result) once per request, in completion order: decode_fn's return value (the last
    message, for a generator) or a WorkerFailure."""
    last = {}
    for key, message in pool.stream(items):
        if message is END:
            yield key, last.pop(key, None)
        elif isinstance(message, WorkerFailure):
            last.pop(key, None)
            yield key, message
        else:
            last[key] = message


def _our_children() -> list:
    return [p for p in mp.active_children() if p.name == "decode-worker"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):  # gone between the two looks
        return False


@pytest.fixture(scope="module")
def audio_files(tmp_path_factory) -> list[str]:
    d = tmp_path_factory.mktemp("audio")
    rng = np.random.default_rng(0)
    paths = []
    for i, (sr, ext) in enumerate([(16000, "wav"), (44100, "flac"), (48000, "wav"), (22050, "ogg")]):
        path = d / f"ok{i}.{ext}"
        sf.write(path, (0.2 * rng.standard_normal((sr * 2, 2))).astype(np.float32), sr)
        paths.append(str(path))
    (d / "junk.wav").write_bytes(b"not audio" * 50)
    paths.append(str(d / "junk.wav"))
    paths.append(str(d / "missing.wav"))
    return paths


@pytest.fixture(scope="module")
def pool():
    """One faulty pool for the module: starting workers is the slow part."""
    before = _our_children()
    with DecodePool(2, timeout_s=TIMEOUT_S, decode_fn=faulty_decode) as p:
        yield p
    assert not set(_our_children()) - set(before)


def _requests(paths, segments=((None, None), (0.5, 1.25))):
    return [(i, Req(p, segments, 60.0)) for i, p in enumerate(paths)]


def _assert_same(got, want):
    assert type(got) is type(want) and len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert type(g) is type(w)
        if isinstance(w, Decoded):
            np.testing.assert_array_equal(g.samples, w.samples)
            assert g.duration_s == w.duration_s
            assert g.samples.flags.c_contiguous and g.samples.flags.writeable
        else:
            assert isinstance(g, AudioError) and str(g) == str(w)


# --- tests ----------------------------------------------------------------------------------


def test_results_equal_in_process_decode(audio_files):
    items = _requests(audio_files)
    with DecodePool(2, decode_fn=decode_segments) as p:
        results = dict(imap(p, items))
    assert sorted(results) == [k for k, _ in items]
    for key, request in items:
        _assert_same(results[key], decode_segments(request))


def test_num_workers_zero_runs_inline(audio_files):
    items = _requests(audio_files)
    with DecodePool(0, decode_fn=faulty_decode) as p:
        results = list(imap(p, items + [(99, Req("/x/raise.wav"))]))
        assert not _our_children()
    assert [k for k, _ in results] == [k for k, _ in items] + [99]  # in order, in this thread
    for (_, request), (_, got) in zip(items, results[:-1], strict=True):
        _assert_same(got, decode_segments(request))
    assert results[-1][1] == WorkerFailure(Failure("ValueError", "boom on /x/raise.wav"))


def test_segfault_fails_only_that_item(pool, audio_files, tmp_path):
    segv = str(tmp_path / "segv.wav")
    items = _requests(audio_files[:4])
    items.insert(2, ("crash", Req(segv)))
    before = set(_our_children())

    results = dict(imap(pool, items))

    assert results["crash"].error == f"DecoderCrashed: decoder crashed (signal 11: SIGSEGV) on {segv}"
    for key, request in items:
        if key != "crash":
            _assert_same(results[key], decode_segments(request))
    after = set(_our_children())
    assert len(after) == len(before) and all(p.is_alive() for p in after)
    assert before - after  # the crashed worker was replaced


def test_timeout_kills_and_replaces(pool, audio_files, tmp_path):
    before = _our_children()
    sleepy = str(tmp_path / "sleep.wav")
    items = [("hang", Req(sleepy))] + _requests(audio_files[:3])
    t0 = time.monotonic()
    results = dict(imap(pool, items))
    elapsed = time.monotonic() - t0
    assert results["hang"].error == f"DecodeTimeout: decode timed out after 1.5 s on {sleepy}"
    assert TIMEOUT_S <= elapsed < TIMEOUT_S + 3
    for key, request in items[1:]:
        _assert_same(results[key], decode_segments(request))
    assert len(_our_children()) == len(before)


def test_exception_becomes_failure_without_killing_worker(tmp_path):
    with DecodePool(1, decode_fn=faulty_decode) as p:
        bad = str(tmp_path / "raise.wav")
        items = [
            ("pid1", Req(str(tmp_path / "pid"))),
            ("bad", Req(bad)),
            ("pid2", Req(str(tmp_path / "pid"))),
        ]
        results = dict(imap(p, items))
        assert results["bad"].error == f"ValueError: boom on {bad}"
        assert results["pid1"] == results["pid2"]  # the same worker served all three

        # Ctrl-C reaches the whole process group; workers ignore it and keep serving.
        os.kill(results["pid1"], signal.SIGINT)
        time.sleep(0.1)
        assert dict(imap(p, items[:1]))["pid1"] == results["pid1"]


def test_key_names_failure_when_request_has_no_path():
    with DecodePool(1, timeout_s=TIMEOUT_S, decode_fn=echo_size) as p:
        ((key, result),) = list(imap(p, [("item-7", -1)]))  # np.full(-1) raises ValueError
    assert key == "item-7" and isinstance(result, WorkerFailure)
    assert result.error.startswith("ValueError: ")


def test_imap_is_lazy_and_bounded():
    pulled = 0
    yielded = 0
    max_outstanding = 0

    def items():
        nonlocal pulled
        for i in range(40):
            pulled += 1
            yield i, 1000 + i

    with DecodePool(2, decode_fn=echo_size, max_inflight=3) as p:
        for key, result in imap(p, items()):
            yielded += 1
            max_outstanding = max(max_outstanding, pulled - yielded)
            assert isinstance(result, np.ndarray) and len(result) == 1000 + key
    assert yielded == 40
    assert max_outstanding <= 3


def test_large_arrays_round_trip():
    n = 16000 * 60 * 10  # ten minutes of 16 kHz float32: 38 MB
    with DecodePool(2, decode_fn=echo_size) as p:
        results = dict(imap(p, ((i, n + i) for i in range(4))))
    for i, arr in results.items():
        assert arr.dtype == np.float32 and arr.shape == (n + i,) and arr.flags.writeable
        assert arr[0] == 0.25 and arr[-1] == 0.25


def test_close_stops_busy_workers_promptly(tmp_path):
    before = set(_our_children())
    p = DecodePool(2, timeout_s=60, decode_fn=faulty_decode)
    it = imap(p, [(1, Req(str(tmp_path / "pid"))), (2, Req(str(tmp_path / "sleep")))])
    assert next(it)[0] == 1  # the other worker is now asleep in decode_fn
    ours = set(_our_children()) - before
    assert len(ours) == 2
    t0 = time.monotonic()
    p.close()
    assert time.monotonic() - t0 < 2
    it.close()
    assert not set(_our_children()) - before
    assert not any(_alive(c.pid) for c in ours)
    with pytest.raises(ValueError, match="closed"):
        list(p.stream([]))


def test_abandoned_imap_does_not_leak_results(tmp_path, audio_files):
    with DecodePool(1, timeout_s=60, decode_fn=faulty_decode) as p:
        it = imap(p, [(1, Req(str(tmp_path / "pid"))), (2, Req(str(tmp_path / "sleep")))])
        next(it)
        it.close()  # the sleeping worker is killed and replaced
        results = list(imap(p, _requests(audio_files[:1])))
        assert [k for k, _ in results] == [0]
        _assert_same(results[0][1], decode_segments(_requests(audio_files[:1])[0][1]))


def test_workers_die_with_their_parent(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        import multiprocessing as mp
        from extractor.audio.decode import DecodeRequest, FileJob
        from extractor.audio.pool import DecodePool
        if __name__ == "__main__":
            pool = DecodePool(2)
            list(pool.stream([(0, DecodeRequest((FileJob("/nonexistent.wav", (0,), ((None, None),)),)))]))  # a worker is up and ready
            print(" ".join(str(c.pid) for c in mp.active_children() if c.name == "decode-worker"), flush=True)
            time.sleep(60)
        """
    )
    (tmp_path / "parent.py").write_text(script)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "parent.py")], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(x) for x in proc.stdout.readline().split()]
        assert len(pids) == 2 and all(_alive(pid) for pid in pids)
    finally:
        proc.kill()  # SIGKILL: no atexit, no cleanup code runs in the parent
        proc.wait()
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in pids)


def test_bad_arguments():
    with pytest.raises(ValueError):
        DecodePool(-1)
    with pytest.raises(ValueError):
        DecodePool(1, timeout_s=0)
    with pytest.raises(TypeError, match="picklable"):
        DecodePool(1, decode_fn=lambda r: r)


def stream_three(n):
    """A generator decode function: three messages, or a crash after the first when n < 0."""
    yield n
    if n < 0:
        ctypes.string_at(0)
    yield n + 1
    yield n + 2


def slow_stream(n):
    """Messages a second apart: longer in all than the pool's timeout, never silent that long."""
    for i in range(n):
        time.sleep(1.0)
        yield i


def test_stream_passes_each_message_then_end_or_a_failure_in_its_place():
    with DecodePool(1, decode_fn=stream_three) as p:
        got = list(p.stream([(0, 10), (1, -5), (2, 20)]))
    by_key = {k: [m for kk, m in got if kk == k] for k in (0, 1, 2)}
    assert by_key[0] == [10, 11, 12, END] and by_key[2] == [20, 21, 22, END]
    assert by_key[1][0] == -5 and len(by_key[1]) == 2 and isinstance(by_key[1][1], WorkerFailure)
    assert by_key[1][1].error.startswith("DecoderCrashed: decoder crashed (signal 11: SIGSEGV)")


def test_a_streaming_job_times_out_on_silence_not_on_its_length():
    # 4 s of steady progress under a 1.5 s timeout: each message restarts the job's clock.
    with DecodePool(1, timeout_s=TIMEOUT_S, decode_fn=slow_stream) as p:
        got = [m for _, m in p.stream([(0, 4)])]
    assert got == [0, 1, 2, 3, END]


def test_a_worker_holds_a_second_request_only_while_jobs_are_short(tmp_path):
    """Short jobs (a result and END): the next request waits in the worker's pipe, not in the
    parent, so the worker does not idle through a round trip. Long jobs: one request at a time."""
    with DecodePool(1, decode_fn=faulty_decode) as p:
        assert p._depth() == 1  # one until a job has shown how long jobs are
        held = [len(p._workers[0].jobs) for _ in p.stream((i, Req(str(tmp_path / "pid"))) for i in range(6))]
    assert max(held) == 2
    with DecodePool(1, decode_fn=chatty) as p:
        held = [len(p._workers[0].jobs) for _ in p.stream((i, 6) for i in range(4))]
    assert max(held) == 1 and len(held) == 4 * 7


@pytest.mark.parametrize("fault, error", [("segv", "DecoderCrashed: decoder crashed (signal 11: SIGSEGV) on {}"),
                                          ("sleep", "DecodeTimeout: decode timed out after 1.5 s on {}")])
def test_a_request_queued_behind_a_failing_one_is_decoded_by_the_next_worker(tmp_path, fault, error):
    bad = str(tmp_path / f"{fault}.wav")
    items = [("first", Req(str(tmp_path / "pid"))), ("second", Req(str(tmp_path / "pid"))), ("bad", Req(bad)),
             ("queued", Req(str(tmp_path / "pid")))]
    held_behind_bad = False
    results = {}
    with DecodePool(1, timeout_s=TIMEOUT_S, decode_fn=faulty_decode) as p:
        for key, message in p.stream(items):
            jobs = [j.key for j in p._workers[0].jobs]
            held_behind_bad |= jobs == ["bad", "queued"]
            if message is not END:
                results[key] = message
    assert held_behind_bad  # the interleaving under test: "queued" sat in the failing worker's pipe
    assert results["bad"].error == error.format(bad)
    assert results["first"] == results["second"]  # one worker
    assert isinstance(results["queued"], int) and results["queued"] != results["first"]  # its replacement


def echo_megabytes(request: bytes):
    """A result as large as the request: 10 MB in, 10 MB out."""
    return np.frombuffer(request, dtype=np.uint8).copy()


def test_large_requests_and_results_cross_at_once_without_wedging():
    """While a worker sends a 10 MB result, the parent writes it the next 10 MB request (a short
    job's queued one): on one duplex pipe both writes blocked for good. Neither side waits on the
    other here, and it all comes back, within the decode timeout."""
    payloads = [bytes([i]) * (10 << 20) for i in range(6)]
    t0 = time.monotonic()
    with DecodePool(1, timeout_s=30, decode_fn=echo_megabytes) as p:
        results = dict(imap(p, enumerate(payloads)))
        assert p._depth() == 2  # requests were queued behind a result being sent: the interleaving under test
    assert time.monotonic() - t0 < 30
    assert sorted(results) == list(range(6))
    for i, got in results.items():
        assert isinstance(got, np.ndarray) and len(got) == 10 << 20 and got[0] == i and got[-1] == i


def sleep_then_pid(request: str):
    if request == "sleep":
        time.sleep(60)
    return os.getpid()


def test_a_worker_killed_from_outside_is_reported_as_such():
    with DecodePool(2, timeout_s=60, decode_fn=sleep_then_pid) as p:
        stream = p.stream([("a", "pid"), ("b", "sleep")], poll_s=0.05)
        results = {}
        for key, message in stream:
            if key is None:
                if "a" in results and len(results) == 1:
                    busy = next(w for w in p._workers if w.job is not None and w.job.key == "b")
                    os.kill(busy.process.pid, signal.SIGKILL)  # the OOM killer, an operator
                    results["pid"] = busy.process.pid
                continue
            if message is not END:
                results[key] = message
    failure = results["b"]
    assert isinstance(failure, WorkerFailure) and failure.killed and failure.failure.kind == "DecoderKilled"
    assert failure.error == f"DecoderKilled: decode worker {results['pid']} was killed (signal 9: SIGKILL) on b"
