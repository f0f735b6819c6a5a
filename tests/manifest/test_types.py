"""One canonical Arrow type per logical type: the same manifest written by pyarrow, polars or
pandas gives the same types, and the writer's round trip through polars keeps them."""

from __future__ import annotations

import datetime as dt

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from extractor.manifest import ManifestError, ManifestSpec, read_manifest
from extractor.manifest.types import canonical_type, to_canonical

CANONICAL = [
    (pa.string(), pa.large_string()),
    (pa.large_string(), pa.large_string()),
    (pa.string_view(), pa.large_string()),
    (pa.dictionary(pa.int8(), pa.string()), pa.large_string()),
    (pa.dictionary(pa.uint32(), pa.large_string()), pa.large_string()),
    (pa.binary(), pa.large_binary()),
    (pa.binary(4), pa.large_binary()),
    (pa.int8(), pa.int64()),
    (pa.int32(), pa.int64()),
    (pa.uint32(), pa.int64()),
    (pa.uint64(), pa.uint64()),
    (pa.float16(), pa.float64()),
    (pa.float32(), pa.float64()),
    (pa.bool_(), pa.bool_()),
    (pa.date64(), pa.date32()),
    (pa.timestamp("ns"), pa.timestamp("us")),
    (pa.timestamp("s", "UTC"), pa.timestamp("us", "UTC")),
    (pa.time32("ms"), pa.time64("us")),
    (pa.duration("ns"), pa.duration("us")),
    (pa.decimal128(9, 2), pa.decimal128(9, 2)),
    (pa.null(), pa.large_string()),
    (pa.list_(pa.int32()), pa.large_list(pa.int64())),
    (pa.large_list(pa.field("element", pa.large_string())), pa.large_list(pa.large_string())),
    (pa.list_(pa.float32(), 3), pa.list_(pa.float64(), 3)),
    (pa.struct([("a", pa.int32()), ("b", pa.string())]), pa.struct([("a", pa.int64()), ("b", pa.large_string())])),
    (pa.map_(pa.string(), pa.int16()), pa.map_(pa.large_string(), pa.int64())),
]


@pytest.mark.parametrize("given,expected", CANONICAL, ids=[str(t) for t, _ in CANONICAL])
def test_canonical_type(given, expected):
    assert canonical_type(given) == expected
    assert canonical_type(expected) == expected  # a fixed point: parts written from parts agree


def _columns() -> dict[str, pa.Array]:
    """The same values as pyarrow writes them by default (string, int32, list, dictionary, ...)."""
    return {
        "path": pa.array(["/a.wav", "/b.wav", "/c.wav"], pa.string()),
        "uid": pa.array([7, 8, 9], pa.int32()),
        "speaker": pa.array(["x", "y", "x"]).dictionary_encode(),
        "tags": pa.array([["a"], [], ["b", "c"]], pa.list_(pa.string())),
        "meta": pa.array([{"n": 1, "s": "p"}, {"n": 2, "s": None}, None], pa.struct([("n", pa.int32()), ("s", pa.string())])),
        "day": pa.array([dt.date(2024, 1, 1), None, dt.date(2024, 3, 1)], pa.date32()),
        "ok": pa.array([True, False, None]),
        "snr": pa.array([1.5, 2.25, None], pa.float32()),
        "at": pa.array([dt.datetime(2024, 1, 1, 12), None, dt.datetime(2024, 1, 2)], pa.timestamp("ns")),
    }


KEEP = ("speaker", "tags", "meta", "day", "ok", "snr", "at")


def test_pyarrow_polars_and_pandas_manifests_get_the_same_types(tmp_path):
    table = pa.table(_columns())
    pq.write_table(table, tmp_path / "pa.parquet")
    pl.from_arrow(table).with_columns(pl.col("uid").cast(pl.Int64)).write_parquet(tmp_path / "pl.parquet")
    table.to_pandas().to_parquet(tmp_path / "pd.parquet")
    schemas = {name: pq.read_schema(tmp_path / f"{name}.parquet") for name in ("pa", "pl", "pd")}
    assert schemas["pa"].field("path").type != schemas["pl"].field("path").type  # the drift this is about
    assert schemas["pa"].field("uid").type != schemas["pl"].field("uid").type

    manifests = {name: read_manifest(ManifestSpec(str(tmp_path / f"{name}.parquet"), id_column="uid", keep_columns=KEEP))
                 for name in schemas}
    ref = manifests["pa"]
    assert ref.arrow_types["id"] == pa.int64()
    assert ref.arrow_types["speaker"] == pa.large_string() and ref.arrow_types["tags"] == pa.large_list(pa.large_string())
    assert ref.arrow_types["meta"] == pa.struct([("n", pa.int64()), ("s", pa.large_string())])
    assert ref.arrow_types["at"] == pa.timestamp("us") and ref.arrow_types["snr"] == pa.float64()
    for name, m in manifests.items():
        assert m.arrow_types == ref.arrow_types, name
        assert m.rows.equals(ref.rows), name
        # The writer's path: rows (polars) back to Arrow, as every part stores them.
        for c in ("id", "path", *KEEP):
            arr = m.to_arrow(c, m.rows[c])
            assert arr.type == ref.arrow_types[c], (name, c)
            assert arr.to_pylist() == to_canonical(table.column("uid" if c == "id" else c), ref.arrow_types[c]).to_pylist(), (name, c)


def test_string_and_integer_ids_of_any_width_read_as_one_type(tmp_path):
    for i, (ids, expected) in enumerate([(pa.array(["a", "b"], pa.string()), pa.large_string()),
                                         (pa.array(["a", "b"], pa.large_string()), pa.large_string()),
                                         (pa.array(["a", "b"]).dictionary_encode(), pa.large_string()),
                                         (pa.array([1, 2], pa.int32()), pa.int64()),
                                         (pa.array([1, 2], pa.uint16()), pa.int64()),
                                         (pa.array([1, 2], pa.int64()), pa.int64())]):
        path = tmp_path / f"m{i}.parquet"
        pq.write_table(pa.table({"path": ["/a.wav", "/b.wav"], "id": ids}), path)
        m = read_manifest(ManifestSpec(str(path), id_column="id"))
        assert m.id_type == expected and m.to_arrow("id", m.rows["id"]).type == expected


def test_a_cast_that_would_lose_data_is_refused_naming_the_column(tmp_path):
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"path": ["/a.wav"], "at": pa.array([1_000_000_001], pa.timestamp("ns"))}), path)
    with pytest.raises(ManifestError, match=r"'at'.*timestamp\[us\]"):
        read_manifest(ManifestSpec(str(path), keep_columns=("at",)))
