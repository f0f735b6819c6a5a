"""extractor.output.layout without running the job: which layout an output is in, the empty failure
part a complete shard commits, and the count of committed ids whose path changed.

Outputs are built here with the layout's own calls (create_run, commit_table), on tiny tables; the
job end to end is in tests/integration/test_readers.py and tests/tools/test_migrate.py.
"""

from __future__ import annotations

import json

import datasets
import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from extractor.ledger import Failure
from extractor.manifest.read import read_manifest
from extractor.options import ManifestSpec, Shard
from extractor.output.layout import (
    FAILURES_DIR, LAYOUT_VERSION, MIGRATE, RUN_FILE, OutputDir, OutputError, RunInfo, failure_table, part_name,
)
from extractor.recipe import METADATA_KEY, Recipe

RECIPE = Recipe(model_fingerprint="m" * 64, adapter_fingerprint=None, d_model=4, padding_mask=True, dtype="float32")
SOURCES = {"model": "tiny", "model_revision": None, "adapter": None, "adapter_revision": None}


def manifest_of(tmp_path, rows: list[dict], **spec):
    """A Manifest read as the job reads it (its canonical types); the paths need not exist."""
    path = tmp_path / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return read_manifest(ManifestSpec(str(path), id_column="id", **spec))


def new_output(tmp_path, *, path_column: bool = True) -> OutputDir:
    out = OutputDir(tmp_path / "out")
    out.storage.makedirs()
    out.create_run(RunInfo(RECIPE, 2, SOURCES, path_column))
    out.prepare_writes(Shard(0, 2))
    return out


def commit_part(out: OutputDir, shard: Shard, seq: int, ids: list[str], paths: list[str] | None) -> None:
    cols = {"id": pa.array(ids, pa.large_string())}
    if paths is not None:
        cols["path"] = pa.array(paths, pa.large_string())
    cols["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array([0.5] * (4 * len(ids)), pa.float32()), 4)
    with out.lock(shard) as lock:
        out.commit_table(pa.table(cols), part_name(shard, seq), failures=False, lock=lock)


def commit_failures(out: OutputDir, shard: Shard, seq: int, manifest, ids: list[str]) -> None:
    rows = manifest.rows.filter(pl.col("id").is_in(ids))
    with out.lock(shard) as lock:
        out.commit_table(failure_table(manifest.arrow_types, rows["id"], rows["path"],
                                       [Failure("DecodeError", f"cannot decode {p}") for p in rows["path"]], {}),
                         part_name(shard, seq), failures=True, lock=lock)


# --- which layout ------------------------------------------------------------------------------


def test_run_json_records_the_layout_and_the_path_column_and_create_run_returns_the_outputs(tmp_path):
    out = new_output(tmp_path, path_column=False)
    run = json.loads((out.root / RUN_FILE).read_text())
    assert (run["layout_version"], run["num_shards"], run["path_column"]) == (LAYOUT_VERSION, 2, False)
    assert out.layout_version() == LAYOUT_VERSION and out.check() == out.read_run()
    # A run's RunInfo says True (new outputs get the column); the output's own answer wins.
    assert out.create_run(RunInfo(RECIPE, 2, SOURCES)).path_column is False
    (tmp_path / "fresh").mkdir()
    assert OutputDir(tmp_path / "fresh").create_run(RunInfo(RECIPE, 1, SOURCES)).path_column is True


@pytest.mark.parametrize("version", [1, 2])
def test_older_layouts_are_refused_naming_the_migration(tmp_path, version):
    out = new_output(tmp_path)
    run = json.loads((out.root / RUN_FILE).read_text())
    del run["path_column"]
    if version == 1:  # 0.1's _run.json: the recipe alone; its _failures/ is where today's is
        run = {"recipe": run["recipe"], "created": run["created"]}
    else:
        run["layout_version"] = 2
        (out.root / FAILURES_DIR).rename(out.root / "failures")
    (out.root / RUN_FILE).write_text(json.dumps(run))
    assert out.layout_version() == version
    with pytest.raises(OutputError, match=f"{MIGRATE} {out.root}"):
        out.check()
    with pytest.raises(OutputError, match=MIGRATE):
        out.read_run()


def test_parts_at_the_top_are_layout_1_whatever_run_json_says(tmp_path):
    out = new_output(tmp_path)
    pq.write_table(pa.table({"id": ["a"]}), out.root / "part-00000-000000.parquet")
    assert out.layout_version() == 1
    with pytest.raises(OutputError, match="version 0.1"):
        out.check()


@pytest.mark.parametrize("layout_version, message", [(LAYOUT_VERSION + 1, "newer version"), ("3", "not a layout of this job")])
def test_a_newer_or_unreadable_layout_is_refused(tmp_path, layout_version, message):
    out = new_output(tmp_path)
    run = json.loads((out.root / RUN_FILE).read_text())
    (out.root / RUN_FILE).write_text(json.dumps({**run, "layout_version": layout_version}))
    with pytest.raises(OutputError, match=message):
        out.check()


def test_a_failures_folder_in_todays_layout_is_in_the_readers_way(tmp_path):
    """pyarrow and pandas read every folder of the top without `_`: 0.2's failures/ would pose as embeddings."""
    out = new_output(tmp_path)
    (out.root / "failures").mkdir()
    pq.write_table(pa.table({"id": ["a"]}), out.root / "failures" / "part-00000-000000.parquet")
    with pytest.raises(OutputError, match="would take it for embeddings"):
        out.check()


# --- a clean shard's empty failure part ---------------------------------------------------------


def test_a_shard_without_failures_commits_one_empty_failure_part_readable_as_zero_rows(tmp_path):
    manifest = manifest_of(tmp_path, [{"id": "a", "path": "/x/a.wav"}, {"id": "b", "path": "/x/b.wav"}])
    out = new_output(tmp_path)
    shard = Shard(0, 2)
    commit_part(out, shard, 0, ["a"], ["/x/a.wav"])
    with out.lock(shard) as lock:
        assert out.ensure_failures_readable(shard, lock, manifest.arrow_types) == 1
        assert out.ensure_failures_readable(shard, lock, manifest.arrow_types) is None  # once: it is the shard's failure file now
    [empty] = out.failure_files()
    assert empty.name == part_name(shard, 1)  # the next number of the shard, as any commit
    meta = pq.ParquetFile(empty).metadata
    assert (meta.num_rows, meta.num_row_groups) == (0, 0)  # no row group: HF datasets skips such a file beside others
    # Exactly the schema of the writer's failure records, and the recipe of _run.json.
    full = failure_table(manifest.arrow_types, manifest.rows["id"], manifest.rows["path"], [Failure("X", "y")] * 2, {})
    schema = pq.read_schema(empty)
    assert schema.remove_metadata().equals(full.schema.remove_metadata())
    assert Recipe.from_dict(json.loads(schema.metadata[METADATA_KEY])) == RECIPE

    folder = out.root / FAILURES_DIR
    assert pl.read_parquet(folder).shape == (0, 4)
    assert duckdb.sql(f"SELECT count(*) FROM '{folder}/*.parquet'").fetchall() == [(0,)]
    assert pq.read_table(folder).column_names == ["id", "path", "error", "error_kind"]
    # datasets builds no split of zero rows; streaming reads it as zero rows with its features.
    stream = datasets.load_dataset("parquet", data_dir=str(folder), streaming=True, cache_dir=str(tmp_path / "hf"))["train"]
    assert list(stream) == [] and list(stream.features) == ["id", "path", "error", "error_kind"]

    # Beside a shard with failures, every reader reads the folder (datasets included).
    commit_failures(out, Shard(1, 2), 0, manifest, ["b"])
    assert pl.read_parquet(folder)["id"].to_list() == ["b"]
    got = datasets.load_dataset("parquet", data_dir=str(folder), cache_dir=str(tmp_path / "hf"))["train"]
    assert got["id"] == ["b"]


def test_a_shard_with_failures_or_an_output_without_recipe_gets_no_empty_part(tmp_path):
    manifest = manifest_of(tmp_path, [{"id": "a", "path": "/x/a.wav"}])
    out = new_output(tmp_path)
    commit_failures(out, Shard(0, 2), 0, manifest, ["a"])
    with out.lock(Shard(0, 2)) as lock:
        assert None is out.ensure_failures_readable(Shard(0, 2), lock, manifest.arrow_types)
    assert len(out.failure_files()) == 1

    bare = OutputDir(tmp_path / "bare")  # a shard whose run had nothing to embed never wrote _run.json
    with bare.lock(Shard()) as lock:
        assert None is bare.ensure_failures_readable(Shard(), lock, manifest.arrow_types)
    assert not (bare.root / FAILURES_DIR).exists()


# --- changed paths -----------------------------------------------------------------------------


def test_changed_paths_counts_committed_ids_whose_path_differs(tmp_path):
    manifest = manifest_of(tmp_path, [{"id": f"r{i}", "path": f"/old/{i}.wav"} for i in range(6)])
    out = new_output(tmp_path)
    commit_part(out, Shard(0, 2), 0, ["r0", "r1", "r2"], [f"/old/{i}.wav" for i in range(3)])
    commit_part(out, Shard(1, 2), 0, ["r3"], ["/old/3.wav"])
    commit_failures(out, Shard(0, 2), 1, manifest, ["r4"])
    tonight = pl.DataFrame({"id": ["r0", "r1", "r2", "r3", "r4", "r9"],
                            "path": ["/old/0.wav", "/new/1.wav", "/new/2.wav", "/old/3.wav", "/new/4.wav", "/new/9.wav"]})
    info = out.read_run()
    changes = out.changed_paths(info, tonight, manifest.id_type, examples=2)
    assert changes.count == 3  # r1 and r2 embedded, r4 failed; r9 is not committed
    assert changes.examples == (("r1", "/old/1.wav", "/new/1.wav"), ("r2", "/old/2.wav", "/new/2.wav"))
    assert out.changed_paths(info, tonight.filter(pl.col("id") == "r0"), manifest.id_type).count == 0
    assert out.changed_paths(None, tonight, manifest.id_type).count == 0  # a new output: nothing committed


def test_changed_paths_reads_only_id_and_path_and_failures_alone_when_parts_have_no_path(tmp_path, monkeypatch):
    """An output moved from layout 2 has parts without `path`: only its failure records can tell.
    Integer ids written as int32 are compared with the manifest's int64."""
    out = new_output(tmp_path, path_column=False)
    manifest = manifest_of(tmp_path, [{"id": 1, "path": "/a.wav"}, {"id": 2, "path": "/b.wav"}])
    with out.lock(Shard(0, 2)) as lock:
        out.commit_table(pa.table({"id": pa.array([1], pa.int32()), "embedding": pa.array([[0.0]], pa.list_(pa.float32(), 1))}),
                         part_name(Shard(0, 2), 0), failures=False, lock=lock)
    commit_failures(out, Shard(0, 2), 1, manifest, [2])
    asked = []
    read_tables = out.storage.read_tables
    monkeypatch.setattr(out.storage, "read_tables", lambda files, columns: asked.append((files, columns)) or read_tables(files, columns))
    tonight = pl.DataFrame({"id": [1, 2], "path": ["/moved/a.wav", "/moved/b.wav"]})
    changes = out.changed_paths(out.read_run(), tonight, manifest.id_type)
    assert (changes.count, changes.examples) == (1, ((2, "/b.wav", "/moved/b.wav"),))
    assert asked == [(out.failure_files(), ["id", "path"])]
