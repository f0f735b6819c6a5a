"""extractor.pipeline.Receiver: the decode pool read on a thread of its own, so that the workers
are fed and read while the producer packs and stages (issue 10)."""

from __future__ import annotations

import time

import pytest

from builders import speechlike, write_audio
from extractor.audio.decode import DecodeRequest, FileJob, WindowBlock
from extractor.audio.pool import END, DecodePool
from extractor.pipeline import Receiver

# The decode workers import the decode function's module by name: the repository's tests.hooks,
# as the job's --decode-fn does (imported by name here, as tests/audio/test_streaming.py does).
crashy_decode = __import__("tests.hooks", fromlist=["crashy_decode"]).crashy_decode


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    return [str(write_audio(d / f"c{i}.flac", speechlike(1.0, sr=16000, seed=i), 16000)) for i in range(8)]


def requests(paths, first=0):
    return [(first + i, DecodeRequest((FileJob(p, (first + i,), ((None, None),)),))) for i, p in enumerate(paths)]


def test_the_thread_reads_the_pool_while_nobody_reads_the_receiver(clips):
    with DecodePool(1, decode_fn=crashy_decode) as pool, Receiver(pool, iter(requests(clips)), size=3) as received:
        deadline = time.monotonic() + 60
        while not received._queue.full():  # nobody iterates yet: the thread alone fills the queue
            assert time.monotonic() < deadline, "the receiver's thread did not read the pool"
            time.sleep(0.01)
        messages = [m for m in received if m[0] is not None]
    # Every request's block, then its END, in order (one worker), nothing twice and nothing lost.
    assert [k for k, m in messages] == [k for k in range(8) for _ in (0, 1)]
    assert all(isinstance(m, WindowBlock) and m.done[0][0] == k for k, m in messages[::2])
    assert all(m is END for _, m in messages[1::2])


def test_an_error_on_the_thread_is_raised_to_the_reader(clips):
    def broken():
        yield from requests(clips[:1])
        raise ValueError("manifest row 1 is broken")

    with DecodePool(1, decode_fn=crashy_decode) as pool, Receiver(pool, broken(), size=2) as received:
        with pytest.raises(ValueError, match="manifest row 1 is broken"):
            for _ in received:
                pass


def test_leaving_early_stops_the_thread_and_the_busy_worker(tmp_path, clips):
    hang = str(write_audio(tmp_path / "HANG.flac", speechlike(1.0, sr=16000, seed=9), 16000))  # tests.hooks.HANG
    with DecodePool(1, decode_fn=crashy_decode) as pool:
        t0 = time.monotonic()
        with Receiver(pool, iter(requests([hang])), size=2) as received:
            assert next(iter(received)) == (None, None)  # a poll without a message: the worker hangs
            thread = received._thread
        assert not thread.is_alive() and time.monotonic() - t0 < 4.0
        # The hung worker was killed with the abandoned stream; its replacement decodes.
        (key, block), (_, end) = pool.stream(requests(clips[:1], first=5))
    assert key == 5 and isinstance(block, WindowBlock) and end is END


def test_a_decode_worker_killed_from_outside_costs_its_row_one_more_try(tmp_path, clips, tiny_model):
    """SIGKILL of a busy decode worker (the OOM killer, an operator) says nothing about its file:
    the job goes on, the row is tried once more on another worker and embedded, and the log names
    the worker."""
    import os
    import signal
    import subprocess

    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobrun import job_cmd, job_env, read_output, wait_for

    victim = str(write_audio(tmp_path / "KILLME.flac", speechlike(1.5, sr=16000, seed=11), 16000))  # tests.hooks.KILL_ME
    paths = clips[:4] + [victim] + clips[4:]
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"path": paths}), manifest)
    flags, out = tmp_path / "flags", tmp_path / "out"
    flags.mkdir()
    cmd = job_cmd(manifest, out, tiny_model, "--device", "cpu", "--decode-workers", "2", "--decode-fn", "tests.hooks:decode_awaiting_a_kill")
    proc = subprocess.Popen(cmd, env=job_env(HOOK_DIR=str(flags)), stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: any(f.name.startswith("decoding-") for f in flags.iterdir()), 60, proc)
        pid = int(next(f.name for f in flags.iterdir() if f.name.startswith("decoding-")).split("-")[1])
        (flags / "killed-once").touch()
        os.kill(pid, signal.SIGKILL)
        _, log = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0 and f"{len(paths)} embedded, 0 failed" in log, log
    assert f"decode worker {pid} was killed (signal 9: SIGKILL) from outside while on {victim}" in log, log
    assert "retrying 1 row(s) of" in log, log
    assert sorted(read_output(out)["id"].to_list()) == sorted(paths)


def test_a_slow_run_logs_heartbeats_failed_rows_and_what_it_waits_on(tmp_path, clips, tiny_model, monkeypatch):
    """In a log (not a terminal): a progress line every LOG_EVERY_S whether or not a row finished
    (here 0.3 s, decoding takes 1.2 s a file), each failed row with its id, file and reason, and,
    once no row has finished for a while, a line saying what the run waits on."""
    import re

    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobrun import run_cli

    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": ["a", "gone", "b"], "path": [clips[0], str(tmp_path / "missing.wav"), clips[1]]}), manifest)
    monkeypatch.setattr("extractor.progress.LOG_EVERY_S", 0.3)
    monkeypatch.setattr("extractor.engines.local.STALL_DECODE_TIMEOUTS", 0.05)  # 0.5 s of --decode-timeout-s 10
    monkeypatch.setenv("HOOK_DECODE_DELAY_S", "1.2")
    code, log = run_cli(["--manifest", str(manifest), "--output", str(tmp_path / "out"), "--model", str(tiny_model), "--id-column", "id",
                         "--decode-workers", "0", "--decode-timeout-s", "10", "--max-failure-rate", "1",
                         "--decode-fn", "tests.hooks:slow_decode"])
    assert code == 0, log
    counts = re.findall(r"progress: (\d+)/3 rows", log)
    assert len(counts) >= 6 and len(counts) > len(set(counts)), counts  # lines with no new row between them: heartbeats
    assert counts[-1] == "3"
    assert re.search(r"row gone failed \(.*missing\.wav\): AudioError: cannot read .*missing\.wav", log), log
    assert re.search(r"no row has finished for \d+ s; waiting on: decoding 1 request\(s\) \(.*\.flac\)", log), log
