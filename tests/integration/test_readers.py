"""Every reader call the README gives returns exactly the embedded rows, or a clear error.

The job runs twice (module fixtures): seven clips, one of them not audio, with kept columns; and
a clean run of three clips. Each reader's usual call on OUT/embeddings (and OUT/_failures) must
give the ids of the committed parts and the vectors as pyarrow reads them from the part files,
bit for bit; on OUT itself, the embeddings alone or an error, never failure records posing as
rows with a null embedding; on a clean run's OUT/_failures, zero rows. Then the same for an
output of two nights: a first night's parts written before ids had one canonical type (`string`,
as pyarrow manifests gave them) and a second night's from a polars manifest (`large_string`).

What each reader gives on each folder is pinned here and tabled in the README's Output section.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from builders import speechlike, write_audio

from extractor.manifest.read import read_manifest
from extractor.options import ManifestSpec, Shard
from extractor.output.layout import FAILURES_DIR, OutputDir

duckdb = pytest.importorskip("duckdb")
datasets = pytest.importorskip("datasets")

REPO = Path(__file__).resolve().parents[2]
SR = 16_000
FAILING = "clip-broken"


def run_job(manifest: Path, out: Path, model: Path, tmp: Path) -> None:
    cmd = [sys.executable, "-m", "jobs.extract", "--manifest", str(manifest), "--output", str(out), "--model", str(model),
           "--id-column", "id", "--keep-columns", "speaker,take", "--decode-workers", "0", "--device", "cpu",
           "--max-failure-rate", "0.5"]
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp / "xdg"))
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


def clips(root: Path, first: int, n: int) -> list[dict]:
    return [{"id": f"clip-{i}", "path": str(write_audio(root / f"clip-{i}.flac", speechlike(0.3 + 0.2 * i, SR, seed=i), SR)),
             "speaker": f"s{i % 3}", "take": i} for i in range(first, first + n)]


@pytest.fixture(scope="module")
def night1(tiny_model, tmp_path_factory):
    """One run: six clips embedded, one failure record; the manifest written by pyarrow (string, int32)."""
    tmp = tmp_path_factory.mktemp("readers")
    rows = clips(tmp / "audio", 0, 6)
    broken = tmp / "audio" / f"{FAILING}.wav"
    broken.write_bytes(b"RIFF, but not audio at all")
    rows.append({"id": FAILING, "path": str(broken), "speaker": "s0", "take": 99})
    schema = pa.schema([("id", pa.string()), ("path", pa.string()), ("speaker", pa.string()), ("take", pa.int32())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp / "night1.parquet")
    out = tmp / "out"
    run_job(tmp / "night1.parquet", out, tiny_model, tmp)
    return {"tmp": tmp, "out": out, "rows": rows}


@pytest.fixture(scope="module")
def clean(night1, tiny_model):
    """A run in which every row is embedded: no failure record to write."""
    tmp = night1["tmp"]
    pq.write_table(pa.Table.from_pylist(night1["rows"][:3]), tmp / "clean.parquet")
    out = tmp / "clean"
    run_job(tmp / "clean.parquet", out, tiny_model, tmp)
    return {"out": out, "manifest": tmp / "clean.parquet"}


@pytest.fixture(scope="module")
def two_nights(night1, tiny_model):
    """night1's output with its parts as an older version wrote them (ids `string`), then a second
    night from a polars manifest (`large_string`, int64) with two new rows."""
    tmp = night1["tmp"]
    out = tmp / "two_nights"
    shutil.copytree(night1["out"], out)
    for part in sorted(out.glob("embeddings/*.parquet")) + sorted(out.glob("_failures/*.parquet")):
        table = pq.read_table(part)
        old = pa.schema([f.with_type(pa.string()) if f.name == "id" else f for f in table.schema], metadata=table.schema.metadata)
        pq.write_table(table.cast(old), part)
    rows = night1["rows"] + clips(tmp / "audio", 6, 2)
    pl.DataFrame(rows).write_parquet(tmp / "night2.parquet")
    assert pq.read_schema(tmp / "night2.parquet").field("id").type == pa.large_string()
    run_job(tmp / "night2.parquet", out, tiny_model, tmp)
    parts = sorted(out.glob("embeddings/*.parquet"))
    assert [pq.read_schema(p).field("id").type for p in parts] == [pa.string(), pa.large_string()]
    return {"out": out, "rows": rows}


def expected(folder: Path) -> pa.Table:
    """The rows as pyarrow reads them from each part file, ids as one type, sorted by id."""
    tables = [pq.read_table(p) for p in sorted(folder.glob("part-*.parquet"))]
    tables = [t.set_column(0, "id", t.column("id").cast(pa.large_string())) for t in tables]
    return pa.concat_tables(tables, promote_options="permissive").sort_by("id")


# -- the reader calls, as the README gives them -----------------------------------------------

def _datasets_cache(folder: Path) -> str:
    return str(folder.parent.parent / "hf_datasets_cache")


READERS = {
    "polars read_parquet(dir)": lambda d: pl.read_parquet(d).to_arrow(),
    "polars scan_parquet(dir)": lambda d: pl.scan_parquet(d).collect().to_arrow(),
    "polars glob *.parquet": lambda d: pl.read_parquet(f"{d}/*.parquet").to_arrow(),
    "polars glob **/*.parquet": lambda d: pl.read_parquet(f"{d}/**/*.parquet").to_arrow(),
    "pyarrow dataset(dir)": lambda d: ds.dataset(d).to_table(),
    "pyarrow read_table(dir)": lambda d: pq.read_table(d),
    "pandas read_parquet(dir)": lambda d: pa.Table.from_pandas(pd.read_parquet(d), preserve_index=False),
    "duckdb 'dir/*.parquet'": lambda d: duckdb.sql(f"SELECT * FROM '{d}/*.parquet'").to_arrow_table(),
    "duckdb read_parquet('dir/**/*.parquet')": lambda d: duckdb.sql(f"SELECT * FROM read_parquet('{d}/**/*.parquet')").to_arrow_table(),
    # cache_dir: the test's own (HF_DATASETS_CACHE is read when datasets is imported, before any fixture);
    # the README's call leaves it out. A local folder is read without asking the Hub anything.
    "datasets load_dataset('parquet', data_dir=dir)":
        lambda d: datasets.load_dataset("parquet", data_dir=str(d), cache_dir=_datasets_cache(d))["train"].data.table,
    "datasets load_dataset(dir)": lambda d: datasets.load_dataset(str(d), cache_dir=_datasets_cache(d))["train"].data.table,
}


def assert_same_rows(got: pa.Table, want: pa.Table, reader: str) -> None:
    assert set(got.column_names) == set(want.column_names), reader
    got = got.set_column(got.column_names.index("id"), "id", got.column("id").cast(pa.large_string())).sort_by("id")
    assert got.column("id").to_pylist() == want.column("id").to_pylist(), reader
    for name in want.column_names:
        if name == "embedding":
            vectors = got.column(name).type
            assert pa.types.is_float32(vectors.value_type), f"{reader}: {vectors}"
            d = want.column(name).type.list_size
            got_m = np.array(got.column(name).to_pylist(), dtype=np.float32)
            assert got_m.shape == (want.num_rows, d), reader
            assert np.array_equal(got_m, np.array(want.column(name).to_pylist(), dtype=np.float32)), reader
        else:
            assert got.column(name).to_pylist() == want.column(name).to_pylist(), f"{reader}: {name}"


@pytest.mark.parametrize("reader", READERS)
def test_every_reader_reads_the_embeddings(night1, reader):
    folder = night1["out"] / "embeddings"
    want = expected(folder)
    assert want.num_rows == 6 and FAILING not in want.column("id").to_pylist()
    assert pa.types.is_fixed_size_list(want.column("embedding").type)
    assert_same_rows(READERS[reader](folder), want, reader)


@pytest.mark.parametrize("reader", READERS)
def test_every_reader_reads_the_failures(night1, reader):
    folder = night1["out"] / FAILURES_DIR
    want = expected(folder)
    assert want.column("id").to_pylist() == [FAILING] and want.column_names == ["id", "path", "error", "error_kind"]
    assert_same_rows(READERS[reader](folder), want, reader)


def test_parts_and_failure_records_carry_the_manifests_path(night1):
    paths = {r["id"]: r["path"] for r in night1["rows"]}
    for folder in ("embeddings", FAILURES_DIR):
        table = expected(night1["out"] / folder)
        assert table.column_names[:2] == ["id", "path"], folder
        assert dict(zip(table.column("id").to_pylist(), table.column("path").to_pylist())) == {i: paths[i] for i in table.column("id").to_pylist()}


def test_failures_are_grouped_by_error_kind_with_polars_and_duckdb(night1):
    folder = night1["out"] / FAILURES_DIR
    by_polars = pl.read_parquet(folder).group_by("error_kind").len().rows()
    by_duckdb = duckdb.sql(f"SELECT error_kind, count(*) FROM '{folder}/*.parquet' GROUP BY error_kind").fetchall()
    assert by_polars == by_duckdb == [("DecodeError", 1)]
    [error] = pl.read_parquet(folder)["error"].to_list()
    assert error.startswith("DecodeError: ") and FAILING in error  # the text keeps "Kind: message"


# -- the top folder: the embeddings alone, or an error ----------------------------------------
# What each reader gives on OUT: pyarrow and pandas skip `_`-prefixed paths, so _failures/,
# _run.json and _SUCCESS are not read; the others see them and refuse, each with its own message.
EMBEDDINGS = "the embeddings"
ON_TOP = {
    "polars read_parquet(dir)": "different file extensions",  # _SUCCESS, _run.json beside the parts
    "polars scan_parquet(dir)": "different file extensions",
    "polars glob *.parquet": "expanded paths were empty",
    "polars glob **/*.parquet": "extra column",  # _failures/ first, then parts of another schema
    "pyarrow dataset(dir)": EMBEDDINGS,
    "pyarrow read_table(dir)": EMBEDDINGS,
    "pandas read_parquet(dir)": EMBEDDINGS,
    "duckdb 'dir/*.parquet'": "No files found",
    "duckdb read_parquet('dir/**/*.parquet')": "schema mismatch",
    "datasets load_dataset('parquet', data_dir=dir)": "magic bytes",  # _SUCCESS read as Parquet
    "datasets load_dataset(dir)": "generating the dataset",  # cannot cast parts and failures to one schema
}


@pytest.mark.parametrize("output", ["night1", "clean"])
@pytest.mark.parametrize("reader", READERS)
def test_reading_the_top_folder_gives_the_embeddings_alone_or_an_error(request, output, reader):
    out = request.getfixturevalue(output)["out"]
    want = expected(out / "embeddings")
    if ON_TOP[reader] == EMBEDDINGS:
        got = READERS[reader](out)
        assert got.column("embedding").null_count == 0, reader
        assert_same_rows(got, want, reader)
    else:
        with pytest.raises(Exception, match=ON_TOP[reader]):
            READERS[reader](out)


# -- a clean run's failures: zero rows ---------------------------------------------------------
# datasets builds no split of zero rows: load_dataset raises ValueError('Instruction "train"
# corresponds to no data!'); with streaming=True it reads zero rows with the failure features.
ZERO_ROWS_ERRORS = {"datasets load_dataset('parquet', data_dir=dir)": "corresponds to no data",
                    "datasets load_dataset(dir)": "corresponds to no data"}


def assert_zero_failure_rows(folder: Path, reader: str) -> None:
    if reader in ZERO_ROWS_ERRORS:
        with pytest.raises(ValueError, match=ZERO_ROWS_ERRORS[reader]):
            READERS[reader](folder)
        stream = datasets.load_dataset("parquet", data_dir=str(folder), streaming=True, cache_dir=_datasets_cache(folder))["train"]
        assert list(stream) == [] and list(stream.features) == ["id", "path", "error", "error_kind"]
        return
    got = READERS[reader](folder)
    assert got.num_rows == 0 and got.column_names == ["id", "path", "error", "error_kind"], reader


@pytest.mark.parametrize("reader", READERS)
def test_a_clean_run_leaves_its_failures_readable_as_zero_rows(clean, reader):
    """The run itself commits an empty failure part once the shard is complete without a failure
    (OutputDir.ensure_failures_readable, before its markers): an empty _failures/ folder is what
    polars, duckdb and datasets refuse."""
    assert_zero_failure_rows(clean["out"] / FAILURES_DIR, reader)


@pytest.mark.parametrize("reader", READERS)
def test_every_reader_reads_two_nights_of_ids_as_string_then_large_string(two_nights, reader):
    folder = two_nights["out"] / "embeddings"
    want = expected(folder)
    assert sorted(want.column("id").to_pylist()) == sorted(r["id"] for r in two_nights["rows"] if r["id"] != FAILING)
    assert_same_rows(READERS[reader](folder), want, reader)


def test_duckdb_cosine_needs_the_cast_to_a_fixed_size_array(night1):
    """duckdb reads the fixed-size vector from Parquet as FLOAT[]; array_cosine_similarity wants FLOAT[d]."""
    folder = night1["out"] / "embeddings"
    d = json.loads((night1["out"] / "_run.json").read_text())["recipe"]["d_model"]
    want = expected(folder)
    m = np.array(want.column("embedding").to_pylist(), dtype=np.float64)
    ids = want.column("id").to_pylist()
    with pytest.raises(duckdb.BinderException):
        duckdb.sql(f"SELECT array_cosine_similarity(embedding, embedding) FROM '{folder}/*.parquet'").fetchall()
    got = duckdb.sql(f"""
        SELECT a.id AS a, b.id AS b, array_cosine_similarity(a.embedding::FLOAT[{d}], b.embedding::FLOAT[{d}]) AS cos
        FROM '{folder}/*.parquet' a, '{folder}/*.parquet' b""").fetchall()
    unit = m / np.linalg.norm(m, axis=1, keepdims=True)
    cos = unit @ unit.T
    assert len(got) == len(ids) ** 2
    for a, b, c in got:
        assert c == pytest.approx(cos[ids.index(a), ids.index(b)], abs=1e-5)


def test_an_old_output_with_int32_and_string_columns_reads_as_one_schema_once_migrated(night1, tmp_path):
    """Version 0.1 kept the manifest's own types (here a string id and an int32 column, beside
    today's large_string and int64): polars refuses to mix those. The migration of an old output
    rewrites such parts to the canonical types, so every reader sees one schema."""
    from extractor.tools.migrate import migrate

    out = tmp_path / "old"
    out.mkdir()
    for i, part in enumerate(sorted((night1["out"] / "embeddings").glob("part-*.parquet"))):
        table = pq.read_table(part)
        if i == 0:  # as 0.1 wrote it from a pyarrow manifest
            table = table.set_column(0, "id", table.column("id").cast(pa.string()))
            table = table.set_column(table.column_names.index("take"), "take", table.column("take").cast(pa.int32()))
        pq.write_table(table.drop_columns(["path"]), out / part.name)  # 0.1's layout: parts at the top, no path column
    run = json.loads((night1["out"] / "_run.json").read_text())
    (out / "_run.json").write_text(json.dumps({"recipe": run["recipe"], "created": run["created"]}))
    old = pq.read_schema(sorted(out.glob("part-*.parquet"))[0])
    assert (old.field("id").type, old.field("take").type) == (pa.string(), pa.int32())  # as 0.1 left it
    done = migrate(out)
    assert done["rewritten"] == 1
    schemas = {pq.read_schema(p).remove_metadata() for p in (out / "embeddings").glob("part-*.parquet")}
    assert len(schemas) == 1 and all((s.field("id").type, s.field("take").type) == (pa.large_string(), pa.int64()) for s in schemas)
    assert pl.read_parquet(out / "embeddings").height == expected(night1["out"] / "embeddings").num_rows
