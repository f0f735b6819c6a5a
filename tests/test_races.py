"""Races between runs on one output, replayed deterministically with hooks (issue 9).

Each test holds a run at an exact point (extractor.hooks; tests/hooks.py), starts or kills
another, then lets go, so the interleaving the test names is the one that runs, every time.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading

import numpy as np
import polars as pl
import pytest

from builders import speechlike, write_audio
from extractor.options import ManifestSpec
from extractor.options import JobOptions
from extractor.engines.local import run_shard
from jobrun import REPO, SR, job_cmd, job_env, parts, read_failures, read_output, snapshot, wait_for, write_manifest

N = 12


@pytest.fixture()
def corpus(tmp_path):
    """Twelve short clips; every third file is missing until `restore()` writes it."""
    audio = tmp_path / "audio"
    audio.mkdir()
    rows, late = [], {}
    for i in range(N):
        path = audio / f"c{i:02d}.wav"
        x = speechlike(0.3 + 0.05 * i, SR, seed=i)
        if i % 3 == 0:
            late[path] = x
        else:
            write_audio(path, x, SR)
        rows.append({"id": f"r{i:02d}", "path": str(path)})
    manifest = write_manifest(tmp_path / "m.parquet", rows)

    def restore() -> None:
        for path, x in late.items():
            write_audio(path, x, SR)

    return manifest, restore


def start(manifest, out, model, flags, *extra, **hook_env):
    env = job_env(**hook_env)
    return subprocess.Popen(job_cmd(manifest, out, model, "--id-column", "id", "--decode-workers", "0", *extra), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO)


def assert_exactly_once(out, manifest) -> None:
    ids = pl.read_parquet(manifest)["id"].to_list()
    done, failed = read_output(out)["id"].to_list(), read_failures(out)["id"].to_list()
    assert len(done) == len(set(done)) and len(failed) == len(set(failed)), "an id was written twice"
    assert not set(done) & set(failed), "an id is both embedded and failed"
    assert sorted(done + failed) == sorted(ids), "an id is in neither parts nor failures"


def test_retry_failed_killed_midway_and_a_run_prepared_meanwhile_is_exactly_once(corpus, tiny_model, tmp_path):
    """The race of issue 9: run A retries failures (it drops them, then re-embeds); run B gets ready
    meanwhile; A is killed after one commit; B then takes over. B plans only under the lock, from
    what is committed, so it embeds exactly the rows A did not."""
    manifest, restore = corpus
    out, flags = tmp_path / "out", tmp_path / "flags"
    flags.mkdir()
    first = subprocess.run(job_cmd(manifest, out, tiny_model, "--id-column", "id", "--decode-workers", "0", "--max-failure-rate", "1"),
                           env=job_env(), capture_output=True, text=True, cwd=REPO)
    assert first.returncode == 0, first.stderr
    assert read_failures(out).height == 4 and read_output(out).height == 8
    restore()
    a = start(manifest, out, tiny_model, flags, "--retry-failed", "--part-rows", "1",
              EXTRACTOR_TEST_HOOK="tests.hooks:stop_after_first_commit", HOOK_DIR=str(flags))
    wait_for(lambda: any(flags.glob("committed-*")), 120, a)  # A dropped the 4 failures and re-embedded 1
    b = start(manifest, out, tiny_model, flags, EXTRACTOR_TEST_HOOK="tests.hooks:pause_at", HOOK_DIR=str(flags), HOOK_PAUSE="prepared")
    wait_for(lambda: (flags / f"at-prepared-{b.pid}").exists(), 120, b)
    a.send_signal(signal.SIGKILL)
    a.wait()
    assert read_output(out).height == 9 and read_failures(out).height == 0  # 3 rows in neither place now
    (flags / f"release-{b.pid}").touch()
    assert b.wait(120) == 0, b.stderr.read()
    assert_exactly_once(out, manifest)
    assert read_output(out).height == N and (out / "_SUCCESS").exists()


def test_two_shard_counts_at_once_one_is_refused_and_writes_nothing(corpus, tiny_model, tmp_path):
    """A run of 2 shards holds its lock on a new output, before it writes; a run of 3 shards
    finishes its shard; the first, let go, is refused (exit 2) and the output is as the second left it."""
    manifest, restore = corpus
    restore()
    out, flags = tmp_path / "out", tmp_path / "flags"
    flags.mkdir()
    a = start(manifest, out, tiny_model, flags, "--num-shards", "2", "--shard-index", "0",
              EXTRACTOR_TEST_HOOK="tests.hooks:pause_at", HOOK_DIR=str(flags), HOOK_PAUSE="planned")
    wait_for(lambda: (flags / f"at-planned-{a.pid}").exists(), 120, a)
    b = subprocess.run(job_cmd(manifest, out, tiny_model, "--id-column", "id", "--decode-workers", "0", "--num-shards", "3", "--shard-index", "1"),
                       env=job_env(), capture_output=True, text=True, cwd=REPO)
    assert b.returncode == 0, b.stderr
    assert json.loads((out / "_run.json").read_text())["num_shards"] == 3
    before = snapshot(out)
    held = before.pop("_shards/00000.lock")  # A's own lock, held while it waits: gone once A is
    assert held
    (flags / f"release-{a.pid}").touch()
    assert a.wait(120) == 2
    log = a.stderr.read()
    assert "num_shards: 3 (existing output) → 2 (this run)" in log
    assert snapshot(out) == before
    # And once the output holds a layout, another is refused before anything (no model, no lock).
    c = subprocess.run(job_cmd(manifest, out, tiny_model, "--id-column", "id", "--num-shards", "2"), env=job_env(),
                       capture_output=True, text=True, cwd=REPO)
    assert c.returncode == 2 and "num_shards" in c.stderr and "model loaded" not in c.stderr
    assert snapshot(out) == before


def test_devices_beside_a_live_run_is_refused_with_nothing_written(corpus, tiny_model, tmp_path):
    manifest, restore = corpus
    restore()
    out, flags = tmp_path / "out", tmp_path / "flags"
    flags.mkdir()
    a = start(manifest, out, tiny_model, flags, "--part-rows", "2",
              EXTRACTOR_TEST_HOOK="tests.hooks:stop_after_first_commit", HOOK_DIR=str(flags))
    try:
        wait_for(lambda: any(flags.glob("committed-*")), 120, a)
        before = snapshot(out)
        b = subprocess.run(job_cmd(manifest, out, tiny_model, "--id-column", "id", "--devices", "cpu,cpu", "--part-rows", "1"),
                           env=job_env(), capture_output=True, text=True, cwd=REPO)
        assert b.returncode == 75, b.stderr  # busy: retry later
        assert "another run holds" in b.stderr and "rows to embed on 2 devices" not in b.stderr
        assert snapshot(out) == before
    finally:
        a.kill()
        a.wait()


def test_an_encoder_error_through_the_api_leaves_no_writer_behind(corpus, tiny_model, tmp_path):
    """The writer is closed before the run lets go of its lock: after the error no thread of the
    run is left that could commit (the writer's timer once committed a part 60 s later), and a
    retry in the same process completes exactly once."""
    from extractor.model.load import load_model
    import torch

    manifest, restore = corpus
    restore()
    out = tmp_path / "out"
    opts = JobOptions(manifest=ManifestSpec(str(manifest), id_column="id"), output=str(out), model=str(tiny_model), device="cpu",
                      decode_workers=1, progress=False, part_rows=1000, commit_seconds=0.2)
    model = load_model(tiny_model, None, torch.device("cpu"), torch.float32)
    real, calls = model.encoder.forward, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) > 5:
            raise RuntimeError("encoder failed")
        return real(*args, **kwargs)

    model.encoder.forward = failing
    threads = set(threading.enumerate())
    with pytest.raises(RuntimeError, match="encoder failed"):
        run_shard(opts, model=model)
    assert set(threading.enumerate()) <= threads, [t.name for t in set(threading.enumerate()) - threads]
    assert not list((out / "_shards").glob("*.lock"))  # the lock was let go, and nothing can write after it
    committed = read_output(out).height if parts(out) else 0
    assert committed <= 5
    model.encoder.forward = real
    summary = run_shard(opts, model=model)
    assert summary.embedded == N - committed and summary.complete
    assert_exactly_once(out, manifest)
