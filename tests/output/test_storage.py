"""Object storage (issue 5): manifest, audio and output on s3://, against a real S3-protocol server.

moto's server mode, started on loopback by the fixture below, answers the S3 REST protocol over
HTTP. The job's s3fs client really lists, PUTs, GETs and writes conditionally against it, in this
process and in subprocesses (which find it through AWS_ENDPOINT_URL): nothing is mocked.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import threading
import time
from types import SimpleNamespace

import numpy as np
import polars as pl
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from extractor.audio.decode import AudioError, TooLongError, load_segments
from extractor.output.locks import LockHeld, LockLost, ObjectLock
from extractor.output.storage import open_storage
import s3server
from s3server import s3_server
from jobrun import REPO, job_cmd, job_env, make_corpus, read_output, run_cli, wait_for, write_manifest

BUCKET = "embeddings-test"
N = 8  # audio files; plus one manifest row whose object is missing
LOCK = "_shards/00000.lock"  # the shard's lock object, present only while a run holds it (or after one died)


@pytest.fixture(scope="module")
def s3():
    with s3_server(BUCKET) as server:
        yield server


def keys(fs, prefix: str) -> list[str]:
    fs.invalidate_cache()
    return sorted(k.removeprefix(f"{BUCKET}/{prefix}/") for k in fs.find(f"{BUCKET}/{prefix}"))


def put_manifest(fs, key: str, rows: list[dict]) -> str:
    return s3server.put_manifest(fs, BUCKET, key, rows)


@pytest.fixture(scope="module")
def corpus(s3, tmp_path_factory):
    root = tmp_path_factory.mktemp("s3corpus")
    _, paths, _ = make_corpus(root / "audio", n=N, seed=2)
    for p in paths:
        s3.fs.put_file(str(p), f"{BUCKET}/audio/{p.name}")
    urls = [f"s3://{BUCKET}/audio/{p.name}" for p in paths]
    # One row through fsspec's http filesystem (the same object, path-style, readable anonymously):
    # URLs other than s3:// take the same road.
    s3.fs.chmod(f"{BUCKET}/audio/{paths[1].name}", acl="public-read")
    urls[1] = f"{s3.endpoint}/{BUCKET}/audio/{paths[1].name}"
    ids = [f"r{i:02d}" for i in range(N)]
    missing = {"id": "missing", "path": f"s3://{BUCKET}/audio/missing.flac"}
    return SimpleNamespace(
        ids=ids,
        manifest=put_manifest(s3.fs, "in/manifest.parquet", [{"id": i, "path": u} for i, u in zip(ids, urls)] + [missing]),
        small=put_manifest(s3.fs, "in/small.parquet", [{"id": ids[i], "path": urls[i]} for i in (0, 2, 3)]),
        local=write_manifest(root / "m.parquet", [{"id": i, "path": str(p)} for i, p in zip(ids, paths)] + [{"id": "missing", "path": str(root / "missing.flac")}]),
    )


@pytest.fixture(scope="module")
def reference(corpus, tiny_model, tmp_path_factory):
    """The same rows embedded from local files into a local directory."""
    out = tmp_path_factory.mktemp("reference") / "out"
    code, log = run_cli(["--manifest", str(corpus.local), "--output", str(out), "--model", str(tiny_model), "--id-column", "id",
                         "--decode-workers", "0", "--max-failure-rate", "1"])
    assert code == 0, log
    return read_output(out)


def read_remote(fs, prefix: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The output as readers see it: datasets over s3fs of embeddings/ and _failures/."""
    fs.invalidate_cache()
    rows = pl.from_arrow(ds.dataset(f"{BUCKET}/{prefix}/embeddings", filesystem=fs, format="parquet").to_table()).sort("id")
    if not fs.exists(f"{BUCKET}/{prefix}/_failures"):
        return rows, pl.DataFrame({"id": [], "path": [], "error": []})
    failures = pl.from_arrow(ds.dataset(f"{BUCKET}/{prefix}/_failures", filesystem=fs, format="parquet").to_table()).sort("id")
    return rows, failures


def assert_equal_rows(got: pl.DataFrame, want: pl.DataFrame) -> None:
    assert got["id"].to_list() == want["id"].to_list()  # each id exactly once
    assert np.array_equal(np.stack(got["embedding"].to_numpy()), np.stack(want["embedding"].to_numpy()))  # bit for bit
    assert got["duration_s"].to_list() == want["duration_s"].to_list()


def test_kill_and_rerun_on_s3_is_exactly_once_and_equals_a_local_run(s3, corpus, reference, tiny_model, tmp_path):
    """SIGKILL right after the first committed part (a hook holds the run there), then a rerun."""
    out, flags = f"s3://{BUCKET}/killed", tmp_path / "flags"
    flags.mkdir()
    cmd = job_cmd(corpus.manifest, out, tiny_model, "--id-column", "id", "--part-rows", "2", "--decode-workers", "1", "--max-failure-rate", "1")
    proc = subprocess.Popen(cmd, env=job_env(EXTRACTOR_TEST_HOOK="tests.hooks:stop_after_first_commit", HOOK_DIR=str(flags)),
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=REPO)
    wait_for(lambda: (flags / f"committed-{proc.pid}").exists(), 180, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    # What the kill left: complete parts (each a readable Parquet file), the recipe, the lock; no
    # marker, no temporary, no incomplete upload.
    left = keys(s3.fs, "killed")
    committed = [k for k in left if k.startswith(("embeddings/part-", "_failures/part-"))]
    assert committed and set(left) - set(committed) == {"_run.json", LOCK}, left
    for k in committed:
        with s3.fs.open(f"{BUCKET}/killed/{k}", "rb") as f:
            assert pq.read_metadata(f).num_rows > 0
    assert not s3.fs.call_s3("list_multipart_uploads", Bucket=BUCKET, Prefix="killed/").get("Uploads")
    rows, _ = read_remote(s3.fs, "killed")
    assert 0 < rows.height < N

    # A part bigger than 100 MB goes up as a multipart upload; a kill mid-way leaves it incomplete
    # (invisible). The rerun aborts those of its own shard, and only those.
    for name in ("embeddings/part-00000-000099.parquet", "embeddings/part-00001-000000.parquet"):
        s3.fs.call_s3("create_multipart_upload", Bucket=BUCKET, Key=f"killed/{name}")

    rerun = subprocess.run(cmd, env=job_env(), capture_output=True, text=True, cwd=REPO, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "taking over stale lock" in rerun.stderr and "on this host is gone" in rerun.stderr, rerun.stderr
    uploads = s3.fs.call_s3("list_multipart_uploads", Bucket=BUCKET, Prefix="killed/").get("Uploads", [])
    assert [u["Key"] for u in uploads] == ["killed/embeddings/part-00001-000000.parquet"]  # another shard's: left alone

    rows, failures = read_remote(s3.fs, "killed")
    assert_equal_rows(rows, reference)
    assert failures["id"].to_list() == ["missing"]
    assert failures["error"][0] == f"AudioError: cannot read s3://{BUCKET}/audio/missing.flac: not found (no such file)"
    # Polars reads the output directly too (its own S3 client, configured by the same environment).
    assert pl.scan_parquet(f"{out}/embeddings/*.parquet").collect().height == N

    left = keys(s3.fs, "killed")
    assert LOCK not in left and "_SUCCESS" in left and "_shards/00000.done" in left  # the lock is released
    modified = {k: s3.fs.info(f"{BUCKET}/killed/{k}")["LastModified"] for k in left}
    assert modified["_SUCCESS"] == max(modified.values())  # written last


def test_live_lock_refuses_a_second_run_then_storage_options_reach_every_stage(s3, corpus, reference, tiny_model, monkeypatch):
    """--storage-options alone (no endpoint in the environment) points manifest, audio and output at
    the server; while another run holds the shard's lock the job exits 75 (busy: retry later) and
    writes nothing."""
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    options = {"client_kwargs": {"endpoint_url": s3.endpoint}}
    out = f"s3://{BUCKET}/busy"
    args = ["--manifest", corpus.small, "--output", out, "--model", str(tiny_model), "--id-column", "id",
            "--decode-workers", "0", "--storage-options", json.dumps(options)]
    holder = ObjectLock(open_storage(out, options), LOCK)
    holder.acquire()
    try:
        code, log = run_cli(args)
        refused_with = keys(s3.fs, "busy")
    finally:
        holder.release()
    assert code == 75, log
    assert "another run holds" in log and "alive on this host" in log
    assert refused_with == [LOCK]  # nothing written but the holder's lock
    assert keys(s3.fs, "busy") == []  # and the holder's release removed it

    code, log = run_cli(args)
    assert code == 0, log
    rows, _ = read_remote(s3.fs, "busy")
    assert_equal_rows(rows, reference.filter(pl.col("id").is_in(["r00", "r02", "r03"])))
    assert "_SUCCESS" in keys(s3.fs, "busy")


def test_object_lock_stale_takeover_race_and_lost_lock(s3, caplog):
    storage = open_storage(f"s3://{BUCKET}/locks")
    key = f"{BUCKET}/locks/{LOCK}"

    def plant(age_s: float) -> None:  # another machine's run, last seen age_s ago
        record = {"host": "elsewhere", "pid": 4242, "since": "yesterday", "token": "theirs", "heartbeat": time.time() - age_s}
        s3.fs.pipe_file(key, json.dumps(record).encode())

    plant(age_s=5)
    with pytest.raises(LockHeld, match=r"pid 4242 on elsewhere.*last heartbeat 5 s ago"):
        ObjectLock(storage, LOCK, stale_after_s=60).acquire()

    plant(age_s=120)
    lock = ObjectLock(storage, LOCK, stale_after_s=60, heartbeat_s=0.05)
    with caplog.at_level(logging.WARNING, logger="extractor.output.locks"):
        lock.acquire()
    assert "taking over stale lock" in caplog.text and "no heartbeat for 120 s" in caplog.text
    first = json.loads(s3.fs.cat_file(key))["heartbeat"]
    wait_for(lambda: json.loads(s3.fs.cat_file(key))["heartbeat"] > first, 10)  # the heartbeat runs
    lock.check()

    plant(age_s=0)  # taken over behind our back: the next heartbeat finds out, and writes stop

    def lost() -> bool:
        try:
            lock.check()
        except LockLost:
            return True
        return False

    wait_for(lost, 10)
    lock.release()
    assert json.loads(s3.fs.cat_file(key))["token"] == "theirs"  # a lost lock is not deleted

    # Two runs racing for a free lock: the conditional create lets exactly one win.
    s3.fs.rm_file(key)
    contenders = [ObjectLock(storage, LOCK) for _ in range(2)]
    outcome: list[str] = []

    def take(lock: ObjectLock) -> None:
        try:
            lock.acquire()
            outcome.append("won")
        except LockHeld:
            outcome.append("refused")

    threads = [threading.Thread(target=take, args=(c,)) for c in contenders]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcome) == ["refused", "won"]
    for c in contenders:
        c.release()
    assert keys(s3.fs, "locks") == []


def test_unreadable_or_too_long_remote_audio_is_an_audio_error(s3, corpus):
    """A remote file longer than max_duration_s fails as TooLongError once decoding passes the
    limit (it is streamed under a byte cap, never refused or fetched whole by its size: the caps
    are tested in tests/audio/test_sources.py); a store that cannot be reached is named as such."""
    url = f"s3://{BUCKET}/audio/clip000.flac"
    (too_long,) = load_segments(url, [(None, None)], max_duration_s=0.001)
    assert isinstance(too_long, TooLongError) and str(too_long) == f"{url} is longer than max_duration_s=0.001", too_long
    unreachable = {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}, "config_kwargs": {"retries": {"max_attempts": 1}}}
    (error,) = load_segments(url, [(None, None)], storage_options=unreachable)
    assert isinstance(error, AudioError) and str(error).startswith(f"cannot read {url}: "), error
    assert "refused" in str(error) or "cannot connect" in str(error), error
