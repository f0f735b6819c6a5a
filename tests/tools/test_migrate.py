"""`python -m extractor.tools.migrate OUT` on outputs of layouts 1 and 2, made from a real run of today's.

The job runs once (a module fixture): three clips and one file that is not audio. Each test copies
its output and turns it into what version 0.1 or 0.2 left (as_v1, as_v2). The lock tests use real
runs: one held by a hook at "planned" (its shard's lock taken), one started while the migration
holds every lock.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from builders import speechlike, write_audio
from jobrun import REPO, job_cmd, job_env, snapshot, wait_for

import extractor.tools.migrate as migrate_module
from extractor.output.layout import EMBEDDINGS_DIR, FAILURES_DIR, LAYOUT_VERSION, RUN_FILE, SHARDS_DIR, SUCCESS_FILE, OutputDir
from extractor.tools.migrate import MigrateError, main, migrate

SR = 16_000
FLAGS = ["--id-column", "id", "--decode-workers", "0", "--device", "cpu", "--max-failure-rate", "1"]


@pytest.fixture(scope="module")
def current(tmp_path_factory, tiny_model):
    """An output of today's layout: three parts' rows, one failure record; and a manifest with one row more."""
    tmp = tmp_path_factory.mktemp("migrate")
    rows = [{"id": f"c{i}", "path": str(write_audio(tmp / f"c{i}.flac", speechlike(0.4 + 0.3 * i, SR, seed=i), SR))} for i in range(4)]
    (tmp / "broken.wav").write_bytes(b"RIFF, and nothing more")
    rows.append({"id": "broken", "path": str(tmp / "broken.wav")})
    pq.write_table(pa.Table.from_pylist(rows[:3] + rows[4:]), tmp / "night1.parquet")
    pq.write_table(pa.Table.from_pylist(rows), tmp / "night2.parquet")
    out = tmp / "out"
    proc = subprocess.run(job_cmd(tmp / "night1.parquet", out, tiny_model, *FLAGS), env=job_env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"out": out, "night2": tmp / "night2.parquet", "model": tiny_model}


def rewrite(part: Path, drop: list[str]) -> None:
    table = pq.read_table(part)
    pq.write_table(table.drop_columns([c for c in drop if c in table.column_names]), part)


def as_v2(out: Path) -> None:
    """In place: what 0.2 wrote. Parts without `path`, failures/ beside embeddings/, failure
    records without error_kind (as before it existed), _run.json of layout 2."""
    for part in out.glob(f"{EMBEDDINGS_DIR}/part-*.parquet"):
        rewrite(part, ["path"])
    for part in out.glob(f"{FAILURES_DIR}/part-*.parquet"):
        rewrite(part, ["error_kind"])
    (out / FAILURES_DIR).rename(out / "failures")
    run = json.loads((out / RUN_FILE).read_text())
    del run["path_column"]
    (out / RUN_FILE).write_text(json.dumps({**run, "layout_version": 2}))


def as_v1(out: Path) -> None:
    """In place: what 0.1 wrote. Parts at the top, _failures/, a _run.json of the recipe alone,
    markers named by shard count, no _shards/."""
    as_v2(out)
    for part in out.glob(f"{EMBEDDINGS_DIR}/part-*.parquet"):
        part.rename(out / part.name)
    (out / EMBEDDINGS_DIR).rmdir()
    (out / "failures").rename(out / FAILURES_DIR)
    shutil.rmtree(out / SHARDS_DIR)
    (out / SUCCESS_FILE).unlink()
    (out / "_SUCCESS-00000-of-00001").write_text("")
    run = json.loads((out / RUN_FILE).read_text())
    (out / RUN_FILE).write_text(json.dumps({"recipe": run["recipe"], "created": run["created"]}))


def copy_of(current, tmp_path: Path, make=None) -> Path:
    out = tmp_path / "out"
    shutil.copytree(current["out"], out)
    if make:
        make(out)
    return out


def failures_of(out: Path) -> list[dict]:
    return pq.read_table(out / FAILURES_DIR).to_pylist()


def assert_current(out: Path, *, path_column: bool) -> None:
    run = json.loads((out / RUN_FILE).read_text())
    assert (run["layout_version"], run["num_shards"], run["path_column"]) == (LAYOUT_VERSION, 1, path_column)
    assert OutputDir(out).check() is not None
    assert not list((out / SHARDS_DIR).glob("*"))  # its locks released (and gone), the markers gone
    # Read at the top, the output gives pyarrow the embeddings alone.
    top = ds.dataset(out).to_table()
    assert top.num_rows == 3 and top.column("embedding").null_count == 0


# --- moves -----------------------------------------------------------------------------------


def test_a_v2_output_moves_by_renames_and_the_next_run_keeps_its_parts_schema(current, tmp_path):
    out = copy_of(current, tmp_path, as_v2)
    parts_before = {p.name: p.read_bytes() for p in (out / EMBEDDINGS_DIR).glob("*.parquet")}
    result = CliRunner().invoke(main, [str(out)])
    assert result.exit_code == 0, result.output
    assert "layout 2 → 3: moved 0 part(s) into embeddings/ and 1 failure file(s) into _failures/" in result.output
    assert not (out / "failures").exists()
    assert {p.name: p.read_bytes() for p in (out / EMBEDDINGS_DIR).glob("*.parquet")} == parts_before  # untouched
    assert failures_of(out) == failures_of(current["out"])  # error_kind taken back from each "Kind: message"
    assert (out / SUCCESS_FILE).exists()  # 0.2's _SUCCESS names its manifest: it stays
    assert_current(out, path_column=False)

    # The next night: one new row, written without `path` like every other part of this output.
    proc = subprocess.run(job_cmd(current["night2"], out, current["model"], *FLAGS), env=job_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "1 embedded, 0 failed" in proc.stderr, proc.stderr[-3000:]
    schemas = {pq.read_schema(p).remove_metadata() for p in (out / EMBEDDINGS_DIR).glob("*.parquet")}
    assert len(schemas) == 1 and "path" not in schemas.pop().names
    assert sorted(pl.read_parquet(out / EMBEDDINGS_DIR)["id"].to_list()) == ["c0", "c1", "c2", "c3"]


def test_a_v1_output_moves_its_parts_and_its_failures_stay_where_they_are(current, tmp_path):
    out = copy_of(current, tmp_path, as_v1)
    failure_names = sorted(p.name for p in (out / FAILURES_DIR).iterdir())
    done = migrate(out)
    assert (done["from_layout"], done["parts"], done["failure_files"], done["num_shards"]) == (1, 1, 0, 1)
    assert not list(out.glob("part-*.parquet")) and len(list((out / EMBEDDINGS_DIR).glob("part-*.parquet"))) == 1
    assert sorted(p.name for p in (out / FAILURES_DIR).iterdir()) == failure_names
    assert failures_of(out) == failures_of(current["out"])
    assert not list(out.glob("_SUCCESS*"))  # 0.1's markers name no manifest
    assert_current(out, path_column=False)


def test_a_current_output_is_refused_untouched(current, tmp_path):
    out = copy_of(current, tmp_path)
    before = snapshot(out)
    result = CliRunner().invoke(main, [str(out)])
    assert result.exit_code == 2 and "already in today's layout" in result.output
    assert snapshot(out) == before and (out / SUCCESS_FILE).exists()


# --- the locks ---------------------------------------------------------------------------------


def test_migration_is_refused_while_a_run_holds_a_shard_lock(current, tmp_path):
    """A run of 0.2 holding its shard on a 0.2 output: a run of today held at "planned" (its lock
    taken, nothing written yet), with the output turned into 0.2's under it."""
    out, flags = copy_of(current, tmp_path), tmp_path / "flags"
    flags.mkdir()
    env = job_env(EXTRACTOR_TEST_HOOK="tests.hooks:pause_at", HOOK_PAUSE="planned", HOOK_DIR=str(flags))
    proc = subprocess.Popen(job_cmd(current["night2"], out, current["model"], *FLAGS), env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: any(flags.glob("at-planned-*")), 120, proc)
        as_v2(out)
        before = snapshot(out)
        with pytest.raises(MigrateError, match=rf"{SHARDS_DIR}/00000\.lock .*nothing was moved"):
            migrate(out)
        assert snapshot(out) == before
    finally:
        proc.kill()
        proc.wait()
    done = migrate(out)  # the killed run's lock file is taken over, as a run takes it over
    assert done["failure_files"] == 1
    assert_current(out, path_column=False)


def test_a_run_is_refused_while_the_migration_holds_the_locks(current, tmp_path, monkeypatch):
    """The migration held once it has written _run.json, just before it lets its locks go: the
    output is in today's layout, so the run gets as far as the lock, and is refused (exit 75)."""
    out = copy_of(current, tmp_path, as_v1)
    written, release = threading.Event(), threading.Event()

    def write_then_hold(path, data):
        migrate_module.write_atomic.__wrapped__(path, data)
        written.set()
        assert release.wait(120)

    write_then_hold.__wrapped__ = migrate_module.write_atomic
    monkeypatch.setattr(migrate_module, "write_atomic", write_then_hold)
    result = {}
    thread = threading.Thread(target=lambda: result.update(migrate(out)))
    thread.start()
    try:
        assert written.wait(60)
        before = snapshot(out)
        proc = subprocess.run(job_cmd(current["night2"], out, current["model"], *FLAGS), env=job_env(), cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 75, proc.stderr[-3000:]
        assert f"{SHARDS_DIR}/00000.lock" in proc.stderr
        assert snapshot(out) == before
    finally:
        release.set()
        thread.join()
    assert result["from_layout"] == 1
    assert_current(out, path_column=False)
