"""Nightly runs over a manifest that pyarrow and polars take turns rewriting (issue 12): every run
completes, every rerun is a no-op, every part has one schema, and the output reads back whole.
An output written before ids had one type resumes after its migration."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from click.testing import CliRunner

from extractor.tools.migrate import main as migrate

from .runs import embeddings, run_job, snapshot

KEEP = "n,speaker,tags,meta"


def _rows(clips, count: int) -> dict[str, list]:
    return {
        "id": [f"utt{i}" for i in range(count)],
        "path": [str(p) for p in clips[:count]],
        "n": list(range(count)),
        "speaker": [f"spk{i % 2}" for i in range(count)],
        "tags": [[f"t{j}" for j in range(i % 3)] for i in range(count)],
        "meta": [{"take": i, "room": "a" if i % 2 else None} for i in range(count)],
    }


def write_with_pyarrow(path: Path, rows: dict) -> Path:
    """string ids and paths, int32 numbers: what pyarrow writes for a table typed this way."""
    pq.write_table(pa.table({
        "id": pa.array(rows["id"], pa.string()), "path": pa.array(rows["path"], pa.string()), "n": pa.array(rows["n"], pa.int32()),
        "speaker": pa.array(rows["speaker"]).dictionary_encode(), "tags": pa.array(rows["tags"], pa.list_(pa.string())),
        "meta": pa.array(rows["meta"], pa.struct([("take", pa.int32()), ("room", pa.string())])),
    }), path)
    assert pq.read_schema(path).field("id").type == pa.string()
    return path


def write_with_polars(path: Path, rows: dict) -> Path:
    """large_string ids and paths, int64 numbers: what polars writes."""
    pl.DataFrame(rows).write_parquet(path)
    schema = pq.read_schema(path)
    assert schema.field("id").type == pa.large_string() and schema.field("n").type == pa.int64()
    return path


def assert_reads_back(out: Path, rows: dict) -> None:
    table = embeddings(out)
    assert table.column("id").to_pylist() == sorted(rows["id"])  # each row exactly once
    by_id = {r["id"]: r for r in table.select(["id", "n", "speaker", "tags", "meta"]).to_pylist()}
    for i, uid in enumerate(rows["id"]):
        assert by_id[uid] == {"id": uid, "n": rows["n"][i], "speaker": rows["speaker"][i], "tags": rows["tags"][i], "meta": rows["meta"][i]}


def test_three_nights_of_pyarrow_and_polars_manifests_keep_one_schema(clips, model, tmp_path):
    out = tmp_path / "out"
    nights = [(write_with_pyarrow, 2), (write_with_polars, 4), (write_with_pyarrow, 6)]
    for night, (write, count) in enumerate(nights, 1):
        rows = _rows(clips, count)
        manifest = write(tmp_path / f"night{night}.parquet", rows)
        code, log = run_job(manifest, out, model, "--id-column", "id", "--keep-columns", KEEP)
        assert code == 0, log
        assert f"{count - (nights[night - 2][1] if night > 1 else 0)} embedded, 0 failed" in log
        before = snapshot(out)
        code, log = run_job(manifest, out, model, "--id-column", "id", "--keep-columns", KEEP)
        assert code == 0 and "0 embedded" in log, log
        assert snapshot(out) == before, f"night {night}: the rerun wrote something"

        parts = sorted((out / "embeddings").glob("*.parquet"))
        assert len(parts) == night
        schemas = {p.name: pq.read_schema(p).remove_metadata() for p in parts}
        first = schemas[parts[0].name]
        assert all(s == first for s in schemas.values()), schemas
        assert first.field("id").type == pa.large_string() and first.field("n").type == pa.int64()
        assert_reads_back(out, rows)


def _old_layout(real: Path, old: Path) -> None:
    """An output as version 0.1 left it: parts at the top with `string` ids, `_failures/`, and a
    `_run.json` holding the recipe only (no shard layout)."""
    old.mkdir()
    (old / "_failures").mkdir()
    for folder, dest in (("embeddings", old), ("_failures", old / "_failures")):
        for p in sorted((real / folder).glob("part-*.parquet")):
            t = pq.read_table(p)
            t = t.set_column(t.schema.get_field_index("id"), "id", t.column("id").cast(pa.string()))
            if "path" in t.column_names:
                t = t.set_column(t.schema.get_field_index("path"), "path", t.column("path").cast(pa.string()))
            pq.write_table(t, dest / p.name)
    recipe = json.loads((real / "_run.json").read_text())["recipe"]
    (old / "_run.json").write_text(json.dumps({"recipe": recipe}))
    (old / "_SUCCESS-00000-of-00001").write_text("")


def test_an_output_of_the_old_layout_is_refused_then_migrated_and_resumes_with_both_string_types(clips, model, tmp_path):
    rows = _rows(clips, 3)
    rows_missing = {k: v + ([str(tmp_path / "gone.flac")] if k == "path" else ["lost"] if k == "id" else v[:1]) for k, v in rows.items()}
    real = tmp_path / "real"
    code, log = run_job(write_with_pyarrow(tmp_path / "m1.parquet", rows_missing), real, model,
                        "--id-column", "id", "--keep-columns", KEEP, "--max-failure-rate", "1")
    assert code == 0 and "3 embedded, 1 failed" in log, log
    out = tmp_path / "old"
    _old_layout(real, out)

    night2 = _rows(clips, 5)
    night2 = {k: v + ([str(tmp_path / "gone.flac")] if k == "path" else ["lost"] if k == "id" else v[:1]) for k, v in night2.items()}
    manifest = write_with_polars(tmp_path / "m2.parquet", night2)
    code, log = run_job(manifest, out, model, "--id-column", "id", "--keep-columns", KEEP)
    assert code == 2 and "python -m extractor.tools.migrate" in log, log
    assert not (out / "embeddings").exists()

    result = CliRunner().invoke(migrate, [str(out)])
    assert result.exit_code == 0, result.output
    assert "2 rewritten to canonical types" in result.output  # the part and the failure file had string ids
    code, log = run_job(manifest, out, model, "--id-column", "id", "--keep-columns", KEEP)
    assert code == 0 and "2 embedded, 0 failed, 4 skipped" in log, log  # the failed row is not retried
    id_types = sorted(str(pq.read_schema(p).field("id").type) for p in (out / "embeddings").glob("*.parquet"))
    assert id_types == ["large_string", "large_string"]  # one schema for every reader (test_readers: polars)
    before = snapshot(out)
    code, log = run_job(manifest, out, model, "--id-column", "id", "--keep-columns", KEEP)
    assert code == 0 and snapshot(out) == before, log

    table = embeddings(out)
    assert table.column("id").to_pylist() == sorted(night2["id"][:5])  # exactly once, the lost row not among them
    assert pl.read_parquet(out / "_failures").get_column("id").to_list() == ["lost"]
    # The migrated part is the real run's, byte for byte in its vectors.
    real_vectors = embeddings(real).filter(pa.compute.is_in(embeddings(real).column("id"), table.column("id")))
    assert table.filter(pa.compute.is_in(table.column("id"), real_vectors.column("id"))).column("embedding").equals(real_vectors.column("embedding"))
