"""The parts are the truth (extractor.output.committed): what an operator or a second system can
leave in an output between runs, or do to it during one, ends in a complete, exactly-once output
or a clear refusal naming the file; never a silent "nothing to do" over missing rows."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from builders import speechlike, write_audio
from jobrun import REPO, job_cmd, job_env, parts, read_failures, read_output, run_cli, snapshot, wait_for, write_manifest

SR = 16_000
FLAGS = ["--id-column", "id", "--part-rows", "3", "--decode-workers", "0", "--max-failure-rate", "1"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("committed")
    rows = [{"id": f"r{i:02d}", "path": str(write_audio(root / f"c{i}.flac", speechlike(0.4 + 0.1 * i, SR, seed=i), SR))} for i in range(12)]
    rows.append({"id": "gone", "path": str(root / "missing.wav")})  # a failure record too
    return write_manifest(root / "m.parquet", rows)


@pytest.fixture(scope="module")
def finished(corpus, tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "out"
    code, log = run_cli(["--manifest", str(corpus), "--output", str(out), "--model", str(tiny_model), *FLAGS])
    assert code == 0 and len(parts(out)) >= 3, log
    return out


def rerun(corpus, out, model):
    return run_cli(["--manifest", str(corpus), "--output", str(out), "--model", str(model), *FLAGS])


def assert_equal_to(out, reference):
    got, want = read_output(out), read_output(reference)
    assert got["id"].to_list() == want["id"].to_list() and got["id"].n_unique() == got.height
    assert np.array_equal(np.stack(got["embedding"].to_numpy()), np.stack(want["embedding"].to_numpy()))
    assert read_failures(out)["id"].to_list() == read_failures(reference)["id"].to_list() == ["gone"]


@pytest.mark.parametrize("damage", ["deleted", "truncated", "emptied"])
def test_a_missing_or_damaged_part_is_planned_again_and_moved_aside(damage, corpus, finished, tiny_model, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    victim = parts(out)[1]
    rows = pq.read_metadata(victim).num_rows
    if damage == "deleted":
        victim.unlink()
    else:
        data = victim.read_bytes()
        victim.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"")
    code, log = rerun(corpus, out, tiny_model)
    assert code == 0 and "nothing to do" not in log and f"{rows} rows to embed" in log, log
    assert_equal_to(out, finished)
    if damage != "deleted":
        aside = out / "_quarantine" / "embeddings" / victim.name
        assert aside.exists() and f"{victim} is not whole Parquet" in log and "moved aside" in log, log
    code, log = rerun(corpus, out, tiny_model)
    assert code == 0 and "nothing to do" in log  # the markers vouch for the repaired output


def test_a_part_copied_under_a_new_number_is_refused_naming_both(corpus, finished, tiny_model, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    original = parts(out)[0]
    copy = original.with_name("part-00000-000099.parquet")
    shutil.copy(original, copy)
    before = snapshot(out)
    code, log = rerun(corpus, out, tiny_model)
    assert code == 2 and "committed twice" in log and str(original) in log and str(copy) in log, log
    assert snapshot(out) == before


def test_a_part_of_another_schema_is_refused_naming_it(corpus, finished, tiny_model, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    planted = out / "embeddings" / "part-00000-000050.parquet"
    pq.write_table(pa.table({"id": ["r00"], "vector": [[1.0, 2.0]]}), planted)
    code, log = rerun(corpus, out, tiny_model)
    assert code == 2 and f"{planted} is not a file of this output" in log, log
    planted.unlink()
    pq.write_table(pa.table({"id": ["zz"], "embedding": pa.array([[1.0] * 64], pa.list_(pa.float32(), 64))}), planted)
    code, log = rerun(corpus, out, tiny_model)
    assert code == 2 and f"{planted} was not written with this output's recipe" in log, log


@pytest.mark.parametrize("remove", ["lock", "_shards"])
def test_deleting_a_live_runs_lock_loses_and_duplicates_nothing(remove, corpus, finished, tiny_model, tmp_path):
    """Run A is held by a hook right after its first commit; its lock file (or all of `_shards/`)
    is deleted, as an operator "resetting" it would, and run B starts with the same command. B
    takes a new lock and completes; A, let go, finds its lock is no longer the file it locked and
    stops before writing more (exit 75). No row is lost or written twice, and a rerun has nothing
    to do."""
    out, flags = tmp_path / "out", tmp_path / "flags"
    flags.mkdir()
    cmd = job_cmd(corpus, out, tiny_model, *FLAGS, "--part-rows", "1")
    a = subprocess.Popen(cmd, env=job_env(EXTRACTOR_TEST_HOOK="tests.hooks:stop_after_first_commit", HOOK_DIR=str(flags)),
                         stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=REPO)
    try:
        wait_for(lambda: (flags / f"committed-{a.pid}").exists(), 120, a)
        if remove == "lock":
            (out / "_shards" / "00000.lock").unlink()
        else:
            shutil.rmtree(out / "_shards")
        b = subprocess.run(cmd, env=job_env(), capture_output=True, text=True, cwd=REPO, timeout=180)
        (flags / f"release-{a.pid}").touch()
        _, a_log = a.communicate(timeout=120)
    finally:
        a.kill()
    assert b.returncode == 0, b.stderr
    assert a.returncode == 75 and ("was removed while this run held it" in a_log or "was replaced while this run held it" in a_log), a_log
    assert a_log.count("Traceback") == 0, a_log
    assert_equal_to(out, finished)
    code, log = rerun(corpus, out, tiny_model)
    assert code == 0 and "nothing to do" in log, log


def test_a_stale_lock_left_at_the_markers_is_removed_by_the_next_run_with_nothing_to_do(corpus, tiny_model, tmp_path):
    """SIGKILL once the markers are written and before the lock's release (a hook holds the run
    there): the output is complete, the dead run's lock file stays. The next run has nothing to do,
    takes no lock over, and removes that file, saying so."""
    import signal

    out, flags = tmp_path / "out", tmp_path / "flags"
    flags.mkdir()
    cmd = job_cmd(corpus, out, tiny_model, *FLAGS)
    run = subprocess.Popen(cmd, env=job_env(EXTRACTOR_TEST_HOOK="tests.hooks:pause_at", HOOK_PAUSE="marked", HOOK_DIR=str(flags)),
                           stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL, cwd=REPO)
    try:
        wait_for(lambda: (flags / f"at-marked-{run.pid}").exists(), 120, run)
        run.send_signal(signal.SIGKILL)
        run.wait()
    finally:
        run.kill()
    lock = out / "_shards" / "00000.lock"
    assert lock.exists() and (out / "_SUCCESS").exists()
    assert json.loads(lock.read_text())["pid"] == run.pid
    code, log = rerun(corpus, out, tiny_model)
    assert code == 0 and "nothing to do" in log and "taking over" not in log, log
    assert not lock.exists() and f"removed the lock {lock} left by a run that died" in log, log
