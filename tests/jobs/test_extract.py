"""The job end to end through its CLI: output contract, resume, refusals, failures, exit codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from builders import build_adapter, speechlike, write_audio
from canonical import canonical_embedding, cosine
from jobs.extract import ENV_PREFIX, extract
from jobrun import (REPO, SR, base_args, failure_parts, job_cmd, job_env, make_corpus, parts, read_failures, read_output,
                    run_cli, snapshot, wait_for, write_manifest)

















@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    audio, paths, waves = make_corpus(root / "audio", n=6)
    rows = [{"id": 100 + i, "path": str(p), "speaker": f"s{i % 2}"} for i, p in enumerate(paths)]
    return {"root": root, "paths": paths, "waves": waves, "manifest": write_manifest(root / "manifest.parquet", rows)}


@pytest.fixture(scope="module")
def finished(corpus, tiny_model, tiny_adapter, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "emb"
    code, output = run_cli(base_args(corpus["manifest"], out, tiny_model, tiny_adapter, "--id-column", "id", "--keep-columns", "speaker", "--part-rows", "4"))
    assert code == 0, output
    return out, output


def test_output_contract(finished, corpus, tiny_ref_adapted):
    out, log = finished
    df = read_output(out)
    assert df["id"].to_list() == list(range(100, 106))
    schema = pq.read_schema(parts(out)[0])
    assert schema.field("id").type == pa.int64()  # the canonical type of integer ids
    assert schema.field("embedding").type == pa.list_(pa.float32(), 64)  # fixed_size_list<float32>[d_model]
    assert schema.field("duration_s").type == pa.float64()
    assert schema.field("speaker").type == pa.large_string()  # the canonical type of strings
    assert set(schema.names) == {"id", "path", "embedding", "duration_s", "speaker"}  # path: to notice a changed one
    recipe = json.loads(schema.metadata[b"qwen2_audio_embeddings.recipe"])
    run = json.loads((out / "_run.json").read_text())["recipe"]
    assert recipe == run and run["padding_mask"] is True and run["dtype"] == "float32" and run["adapter_fingerprint"]
    assert (out / "_SUCCESS").exists()
    assert len(parts(out)) == 2  # --part-rows 4 over 6 rows
    for i, x in enumerate(corpus["waves"]):
        row = df.filter(pl.col("id") == 100 + i)
        assert row["duration_s"][0] == pytest.approx(len(x) / SR)
        assert cosine(np.asarray(row["embedding"][0]), canonical_embedding(tiny_ref_adapted, x)) >= 0.9999
    # Readers see the embeddings folder as a dataset, and only the parts.
    assert ds.dataset(out / "embeddings").to_table().num_rows == 6
    assert pl.scan_parquet(out / "embeddings").collect().height == 6
    assert "done: 6 embedded, 0 failed, 0 skipped of 6 rows" in log


def test_rerun_of_finished_job_is_a_noop(finished, corpus, tiny_model, tiny_adapter):
    out, _ = finished
    before = snapshot(out)
    code, log = run_cli(base_args(corpus["manifest"], out, tiny_model, tiny_adapter, "--id-column", "id", "--keep-columns", "speaker"))
    assert code == 0
    assert "0 embedded, 0 failed, 6 skipped" in log
    assert snapshot(out) == before


def test_resume_with_another_adapter_is_refused(finished, corpus, tiny_model, tmp_path):
    out, _ = finished
    other = build_adapter(tmp_path / "other", tiny_model, layout="tf5_full", seed=7)
    before = snapshot(out)
    code, log = run_cli(base_args(corpus["manifest"], out, tiny_model, other, "--id-column", "id"))
    assert code == 2
    assert "adapter_fingerprint" in log and "refusing to mix" in log
    assert snapshot(out) == before


def test_resume_with_other_masking_is_refused(finished, corpus, tiny_model, tiny_adapter):
    out, _ = finished
    code, log = run_cli(base_args(corpus["manifest"], out, tiny_model, tiny_adapter, "--id-column", "id", "--no-padding-mask"))
    assert code == 2 and "padding_mask" in log


def test_new_manifest_rows_are_processed_incrementally(corpus, tiny_model, tmp_path):
    out = tmp_path / "out"
    first = [{"path": str(p)} for p in corpus["paths"][:4]]
    m = write_manifest(tmp_path / "m.parquet", first)
    assert run_cli(base_args(m, out, tiny_model))[0] == 0
    parts_before = {p: p.stat().st_mtime_ns for p in parts(out)}
    write_manifest(m, first + [{"path": str(p)} for p in corpus["paths"][4:]])
    code, log = run_cli(base_args(m, out, tiny_model))
    assert code == 0 and "2 embedded, 0 failed, 4 skipped" in log
    assert all(p.stat().st_mtime_ns == t for p, t in parts_before.items())  # untouched
    df = read_output(out)
    assert sorted(df["id"].to_list()) == sorted(str(p) for p in corpus["paths"])  # path is the id
    assert (out / "_SUCCESS").exists()


def bad_files(root: Path, good: Path) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    files = {}
    files["empty"] = root / "empty.wav"
    files["empty"].write_bytes(b"")
    files["not_audio"] = root / "notes.flac"
    files["not_audio"].write_text("this is not audio\n" * 50)
    data = good.read_bytes()
    files["truncated"] = root / "truncated.flac"
    files["truncated"].write_bytes(data[: len(data) // 3])
    files["header_only"] = root / "header_only.wav"
    write_audio(files["header_only"], np.zeros(0, dtype=np.float32), SR)
    files["missing"] = root / "missing.wav"
    files["directory"] = root / "a_directory.wav"
    files["directory"].mkdir()
    files["too_short"] = root / "too_short.wav"
    write_audio(files["too_short"], speechlike(0.015, SR, seed=3), SR)  # 240 samples: no output frame
    return files


def test_bad_audio_becomes_failure_records(corpus, tiny_model, tmp_path):
    bad = bad_files(tmp_path / "bad", corpus["paths"][0])
    rows = [{"path": str(p)} for p in corpus["paths"][:3]] + [{"path": str(p)} for p in bad.values()]
    m = write_manifest(tmp_path / "m.parquet", rows)
    out = tmp_path / "out"
    code, log = run_cli(base_args(m, out, tiny_model, None, "--max-failure-rate", "0.9"))
    assert code == 0, log
    ok, failed = read_output(out), read_failures(out)
    assert sorted(ok["id"].to_list()) == sorted(str(p) for p in corpus["paths"][:3])
    assert sorted(failed["id"].to_list()) == sorted(str(p) for p in bad.values())
    assert not set(ok["id"]) & set(failed["id"])
    errors = dict(zip(failed["path"].to_list(), failed["error"].to_list()))
    for kind, path in bad.items():
        msg = errors[str(path)]
        assert ": " in msg and msg.split(":")[0].isidentifier(), msg  # "ExceptionClass: message"
    assert errors[str(bad["too_short"])].startswith("TooShort:") and "too short" in errors[str(bad["too_short"])]
    assert "missing" in errors[str(bad["missing"])].lower() or "no such file" in errors[str(bad["missing"])].lower()
    assert "directory" in errors[str(bad["directory"])].lower()
    # Over the limit (this run's failures, 7 of 10): exit 3, the output is still complete.
    out3 = tmp_path / "out3"
    code, log = run_cli(base_args(m, out3, tiny_model, None, "--max-failure-rate", "0.5"))
    assert code == 3 and (out3 / "_SUCCESS").exists() and "over --max-failure-rate" in log


def test_failed_rows_are_retried_only_on_request(corpus, tiny_model, tmp_path):
    late = tmp_path / "late.flac"  # missing now, written later
    rows = [{"path": str(corpus["paths"][0])}, {"path": str(late)}]
    m = write_manifest(tmp_path / "m.parquet", rows)
    out = tmp_path / "out"
    assert run_cli(base_args(m, out, tiny_model, None, "--max-failure-rate", "1"))[0] == 0
    assert read_failures(out)["id"].to_list() == [str(late)]
    write_audio(late, speechlike(1.0, SR, seed=5), SR)
    code, log = run_cli(base_args(m, out, tiny_model, None, "--max-failure-rate", "1"))
    assert code == 0 and "0 embedded, 0 failed, 2 skipped" in log
    code, log = run_cli(base_args(m, out, tiny_model, None, "--retry-failed"))
    assert code == 0 and "1 embedded, 0 failed" in log
    assert sorted(read_output(out)["id"].to_list()) == sorted(r["path"] for r in rows)
    assert read_failures(out).height == 0  # never in both places


@pytest.mark.parametrize(
    "problem",
    ["missing_file", "not_parquet", "missing_column", "null_path", "duplicate_ids", "missing_keep_column", "bad_id_column"],
)
def test_bad_manifest_is_refused_with_nothing_written(problem, corpus, tiny_model, tmp_path):
    p = [str(x) for x in corpus["paths"]]
    m = tmp_path / "m.parquet"
    extra = []
    if problem == "missing_file":
        m = tmp_path / "nope.parquet"
    elif problem == "not_parquet":
        m.write_text("id,path\n1,a.wav\n")
    elif problem == "missing_column":
        write_manifest(m, [{"file": x} for x in p])
    elif problem == "null_path":
        write_manifest(m, [{"path": p[0]}, {"path": None}, {"path": p[1]}])
    elif problem == "duplicate_ids":
        write_manifest(m, [{"id": 1, "path": p[0]}, {"id": 1, "path": p[1]}, {"id": 2, "path": p[2]}])
        extra = ["--id-column", "id"]
    elif problem == "missing_keep_column":
        write_manifest(m, [{"path": x} for x in p])
        extra = ["--keep-columns", "speaker"]
    elif problem == "bad_id_column":
        write_manifest(m, [{"path": x} for x in p])
        extra = ["--id-column", "uid"]
    out = tmp_path / "out"
    code, log = run_cli(base_args(m, out, tiny_model, None, *extra))
    assert code == 2, log
    assert not out.exists()
    expected = {"missing_file": "does not exist", "not_parquet": "Parquet", "missing_column": "lacks column",
                "null_path": "null or empty", "duplicate_ids": "duplicate id", "missing_keep_column": "speaker", "bad_id_column": "uid"}[problem]
    assert expected in log


def test_bad_model_or_adapter_is_a_config_error(corpus, tiny_model, tmp_path):
    out = tmp_path / "out"
    (tmp_path / "empty_model").mkdir()
    code, log = run_cli(base_args(corpus["manifest"], out, tmp_path / "empty_model"))
    assert code == 2 and "config.json" in log and not out.exists()
    (tmp_path / "empty_adapter").mkdir()
    code, log = run_cli(base_args(corpus["manifest"], out, tiny_model, tmp_path / "empty_adapter"))
    assert code == 2 and "adapter_config.json" in log and not out.exists()


def test_flags_come_from_environment_variables(corpus, tiny_model, tmp_path):
    out = tmp_path / "out"
    env = {f"{ENV_PREFIX}_MANIFEST": str(corpus["manifest"]), f"{ENV_PREFIX}_OUTPUT": str(out), f"{ENV_PREFIX}_MODEL": str(tiny_model),
           f"{ENV_PREFIX}_ID_COLUMN": "id", f"{ENV_PREFIX}_PART_ROWS": "1", f"{ENV_PREFIX}_DECODE_WORKERS": "0"}
    result = CliRunner().invoke(extract, [], env=env, auto_envvar_prefix=ENV_PREFIX, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert len(parts(out)) == 6  # one row per part


# -- subprocess tests: a real process to kill, a real lock to hold -----------------------------








@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("big")
    _, paths, _ = make_corpus(root / "audio", n=12, seed=1)
    m = write_manifest(root / "m.parquet", [{"id": f"r{i:02d}", "path": str(p)} for i, p in enumerate(paths)])
    return m


def test_kill_after_first_part_then_rerun_is_exactly_once(big_corpus, tiny_model, tiny_adapter, tmp_path):
    extra = ["--adapter", str(tiny_adapter), "--id-column", "id", "--part-rows", "3", "--decode-workers", "1"]
    clean = tmp_path / "clean"
    subprocess.run(job_cmd(big_corpus, clean, tiny_model, *extra), env=job_env(), check=True, capture_output=True, cwd=REPO)
    out, flags = tmp_path / "killed", tmp_path / "flags"
    flags.mkdir()
    # The run stops right after its first commit (a hook, not a race), and is SIGKILLed there.
    env = job_env(EXTRACTOR_TEST_HOOK="tests.hooks:stop_after_first_commit", HOOK_DIR=str(flags))
    proc = subprocess.Popen(job_cmd(big_corpus, out, tiny_model, *extra), env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=REPO)
    wait_for(lambda: any(flags.glob("committed-*")), 120, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed = read_output(out)
    assert committed.height == 3 and not (out / "_SUCCESS").exists()
    assert ds.dataset(out / "embeddings").to_table().num_rows == committed.height  # readers see only complete parts
    rerun = subprocess.run(job_cmd(big_corpus, out, tiny_model, *extra), env=job_env(), capture_output=True, text=True, cwd=REPO)
    assert rerun.returncode == 0, rerun.stderr
    assert "taking over the lock" in rerun.stderr and "left by a run that died" in rerun.stderr
    a, b = read_output(clean), read_output(out)
    assert b["id"].to_list() == [f"r{i:02d}" for i in range(12)]  # exactly once
    assert np.array_equal(np.stack(a["embedding"].to_numpy()), np.stack(b["embedding"].to_numpy()))  # bit-identical
    assert (out / "_SUCCESS").exists() and not list((out / "_tmp").iterdir())
    assert not list((out / "_shards").glob("*.lock"))  # the finished rerun let its lock go


HOLD_LOCK = """
import fcntl, json, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, json.dumps({"host": "here", "pid": os.getpid()}).encode())
print("held", flush=True)
time.sleep(120)
"""


def test_second_concurrent_run_is_refused(big_corpus, tiny_model, tmp_path):
    """A live holder of the shard's lock (a real process) makes the next run exit 75 (busy: retry
    later), writing nothing."""
    out = tmp_path / "out"
    (out / "_shards").mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out / "_shards" / "00000.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(out)
        second = subprocess.run(job_cmd(big_corpus, out, tiny_model, "--id-column", "id"), env=job_env(), capture_output=True, text=True, cwd=REPO)
        assert second.returncode == 75, second.stderr
        assert "another run holds" in second.stderr and str(holder.pid) in second.stderr
        assert snapshot(out) == before and not (out / "_run.json").exists()
    finally:
        holder.kill()
        holder.wait()


def test_progress_lines_and_summary_when_not_a_terminal(corpus, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr("extractor.progress.LOG_EVERY_S", 0.0)
    out = tmp_path / "out"
    code, log = run_cli(base_args(corpus["manifest"], out, tiny_model, None, "--id-column", "id", "--part-rows", "2", "--summary-json", str(tmp_path / "s.json")))
    assert code == 0
    assert "progress: " in log and "audio-s/s" in log and "ETA" in log
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["embedded"] == 6 and summary["failed"] == 0 and summary["audio_seconds"] > 0
