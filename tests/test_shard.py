"""`--shard-index I --num-shards N`: shards run separately into one output equal one full run.

What an orchestrator relies on: every id lands in exactly one shard (a stable hash of the id),
shards never touch each other's parts or locks, each leaves its own marker, `_SUCCESS` waits for
the last one, and a killed shard resumes on its own.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from builders import speechlike, write_audio
from extractor.manifest.read import shard_of
from jobrun import (REPO, SR, failure_parts, job_cmd, job_env, parts, read_failures, read_output, run_cli, snapshot, wait_for,
                    write_manifest)

N_CLIPS = 10
FLAGS = ["--id-column", "id", "--part-rows", "3", "--max-failure-rate", "0.5", "--decode-workers", "0"]
# In shard 1 of 2 (see test_shard_of_is_stable_and_refines): tests.hooks.crashy_decode hangs on its
# name, the real decoder reads it like any clip.
HANG_ID = "h0"


def make_corpus(root: Path) -> Path:
    """A manifest of eleven clips (the last one named to hang the test decoder) and two rows
    that fail: a missing file and a clip too short for one output frame."""
    rng = np.random.default_rng(5)
    rows = []
    for i in range(N_CLIPS):
        # r01 (shard 1) nearly fills a CPU token budget on its own, so shard 1's first batches
        # leave the producer's sorting pool before it reaches the hanging row.
        seconds = 29.5 if i == 1 else float(rng.uniform(0.3, 1.5))
        path = write_audio(root / f"clip{i:02d}.flac", speechlike(seconds, SR, seed=50 + i), SR)
        rows.append({"id": f"r{i:02d}", "path": str(path)})
    hang = write_audio(root / "clipHANG.flac", speechlike(0.8, SR, seed=70), SR)
    rows.append({"id": "r90", "path": str(root / "missing.wav")})
    rows.append({"id": "r91", "path": str(write_audio(root / "short.wav", speechlike(0.015, SR, seed=9), SR))})
    rows.append({"id": HANG_ID, "path": str(hang)})  # last: shard 1 commits its other rows first
    return write_manifest(root / "manifest.parquet", rows)


def job_args(manifest, out, model, *extra) -> list[str]:
    return ["--manifest", str(manifest), "--output", str(out), "--model", str(model), *FLAGS, *extra]


def one_device_run(manifest: Path, out: Path, model: Path) -> Path:
    """The reference: the whole manifest in one run on one device."""
    code, log = run_cli(job_args(manifest, out, model))
    assert code == 0, log
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def full_run(corpus, tiny_model, tmp_path_factory):
    return one_device_run(corpus, tmp_path_factory.mktemp("full") / "out", tiny_model)


def assert_same_output(a, b) -> None:
    """Same ids exactly once, bit-identical embeddings (CPU), same durations and failure records."""
    ra, rb = read_output(a), read_output(b)
    assert rb["id"].to_list() == ra["id"].to_list()
    assert rb["id"].n_unique() == rb.height
    assert np.array_equal(np.stack(ra["embedding"].to_numpy()), np.stack(rb["embedding"].to_numpy()))
    assert rb["duration_s"].to_list() == ra["duration_s"].to_list()
    fa, fb = read_failures(a), read_failures(b)
    assert fb.select("id", "path", "error").rows() == fa.select("id", "path", "error").rows()
    assert not set(rb["id"]) & set(fb["id"])


def test_shard_of_is_stable_and_refines():
    ids = pl.Series([f"id-{i}" for i in range(2000)])
    # Pinned values: a change of hash would silently reshuffle every orchestrator's shards.
    assert shard_of(pl.Series(["a", "clip", "r00"]), 1000).to_list() == [250, 923, 642]
    assert shard_of(pl.Series([100, 101]), 1000).to_list() == [397, 154]  # the id's string form
    assert shard_of(pl.Series([HANG_ID, "r01"]), 2).to_list() == [1, 1]
    # Sub-shard s of N·D lies inside shard s mod N: --devices splits a shard without moving rows.
    for n, d in ((1, 2), (2, 2), (3, 4)):
        assert (shard_of(ids, n * d) % n).to_list() == shard_of(ids, n).to_list()
    counts = shard_of(ids, 4).value_counts()["count"].to_list()
    assert min(counts) > 400  # roughly balanced


def test_two_shards_equal_one_full_run(corpus, tiny_model, full_run, tmp_path):
    out = tmp_path / "out"
    code, log = run_cli(job_args(corpus, out, tiny_model, "--shard-index", "1", "--num-shards", "2"))
    assert code == 0, log
    assert (out / "_shards" / "00001.done").exists()
    assert not (out / "_SUCCESS").exists()  # shard 0 has not run
    assert {p.name[:10] for p in parts(out)} == {"part-00001"}
    code, log = run_cli(job_args(corpus, out, tiny_model, "--shard-index", "0", "--num-shards", "2"))
    assert code == 0, log
    assert (out / "_shards" / "00000.done").exists() and (out / "_SUCCESS").exists()
    assert {p.name[:10] for p in parts(out)} == {"part-00000", "part-00001"}
    assert_same_output(full_run, out)
    for p in [*parts(out), *failure_parts(out)]:  # each shard wrote only its own rows (a clean shard's failure part: none)
        assert set(shard_of(pl.read_parquet(p)["id"], 2).to_list()) <= {int(p.name[5:10])}
    assert {int(p.name[5:10]) for p in parts(out)} == {0, 1}
    markers = [json.loads((out / "_shards" / f"0000{i}.done").read_text()) for i in (0, 1)]
    success = json.loads((out / "_SUCCESS").read_text())
    assert markers[0]["whole_manifest"] == markers[1]["whole_manifest"] == success["whole_manifest"]  # one manifest
    assert markers[0]["manifest"] != markers[1]["manifest"]  # each its own shard's rows

    # A finished shard's rerun is a no-op, wherever the other shards are.
    before = snapshot(out)
    code, log = run_cli(job_args(corpus, out, tiny_model, "--shard-index", "1", "--num-shards", "2"))
    assert code == 0 and "0 embedded, 0 failed" in log
    assert snapshot(out) == before


def test_killed_shard_resumes_on_its_own(corpus, tiny_model, full_run, tmp_path):
    """Shard 0 finished; shard 1 is SIGKILLed right after its first part (a hook), then rerun alone."""
    out, flags = tmp_path / "out", tmp_path / "flags"
    flags.mkdir()
    assert run_cli(job_args(corpus, out, tiny_model, "--shard-index", "0", "--num-shards", "2"))[0] == 0
    shard0 = {p.name: p.stat().st_mtime_ns for p in out.rglob("part-00000-*.parquet")}
    cmd = job_cmd(corpus, out, tiny_model, *FLAGS, "--shard-index", "1", "--num-shards", "2", "--part-rows", "1")
    env = job_env(EXTRACTOR_TEST_HOOK="tests.hooks:stop_after_first_commit", HOOK_DIR=str(flags))
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=REPO)
    wait_for(lambda: any(flags.glob("committed-*")), 120, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert any(out.rglob("part-00001-*.parquet"))
    assert not (out / "_SUCCESS").exists() and not (out / "_shards" / "00001.done").exists()
    rerun = subprocess.run(cmd, check=False, env=job_env(), capture_output=True, text=True, cwd=REPO)
    assert rerun.returncode == 0, rerun.stderr
    assert "taking over the lock" in rerun.stderr and "00001.lock" in rerun.stderr
    assert (out / "_SUCCESS").exists()
    assert {p.name: p.stat().st_mtime_ns for p in out.rglob("part-00000-*.parquet")} == shard0  # untouched
    assert_same_output(full_run, out)
