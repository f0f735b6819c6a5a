"""Audio stored in a Parquet manifest (`--audio-column`): Hugging Face `Audio` structs and plain
binary columns, read lazily row group by row group, sent to the decoders in the requests."""

from __future__ import annotations

import os

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from extractor.manifest import ManifestError, ManifestSpec, read_manifest
from extractor.manifest.embedded import BINARY, STRUCT, EmbeddedAudio

from .runs import embeddings, run_job, snapshot

HF_AUDIO = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # datasets.Audio's storage type


def hf_manifest(path, items: list[dict], **columns) -> str:
    pq.write_table(pa.table({"audio": pa.array(items, HF_AUDIO), **columns}), path)
    return str(path)


def test_hf_audio_structs_embed_with_their_paths_as_ids_and_name_failures(clips, model, tmp_path):
    items = [{"bytes": clips[0].read_bytes(), "path": "a/clip0.flac"},
             {"bytes": b"RIFF not really audio", "path": "a/junk.wav"},
             {"bytes": None, "path": str(clips[1])},  # no bytes: read from its path, as datasets does
             {"bytes": b"", "path": "a/empty.wav"}]
    manifest = hf_manifest(tmp_path / "hf.parquet", items, speaker=["s0", "s1", "s2", "s3"])
    out = tmp_path / "out"
    code, log = run_job(manifest, out, model, "--audio-column", "audio", "--keep-columns", "speaker", "--max-failure-rate", "1")
    assert code == 0 and "2 embedded, 2 failed" in log, log
    rows = {r["id"]: r["speaker"] for r in embeddings(out).select(["id", "speaker"]).to_pylist()}
    assert rows == {"a/clip0.flac": "s0", str(clips[1]): "s2"}
    failures = pl.read_parquet(out / "_failures").sort("id")
    assert failures["id"].to_list() == ["a/empty.wav", "a/junk.wav"] and failures["path"].to_list() == ["a/empty.wav", "a/junk.wav"]
    assert "empty audio (0 bytes)" in failures["error"][0] and "a/junk.wav" in failures["error"][1]
    before = snapshot(out)
    code, log = run_job(manifest, out, model, "--audio-column", "audio", "--keep-columns", "speaker", "--max-failure-rate", "1")
    assert code == 0 and snapshot(out) == before, log


def test_plain_bytes_go_to_a_decode_worker_in_the_request(clips, model, tmp_path):
    # The rows' names (manifest#row=N) are no files: an embedding proves the bytes travelled in
    # the request to the worker process, with no temporary file.
    manifest = tmp_path / "bin.parquet"
    pq.write_table(pa.table({"uid": [10, 11, 12], "wav": pa.array([clips[2].read_bytes(), b"junk", clips[3].read_bytes()], pa.large_binary())}),
                   manifest, row_group_size=2)
    out = tmp_path / "out"
    code, log = run_job(manifest, out, model, "--audio-column", "wav", "--id-column", "uid", "--decode-workers", "1", "--max-failure-rate", "1")
    assert code == 0 and "2 embedded, 1 failed" in log, log
    assert embeddings(out).column("id").to_pylist() == [10, 12]
    failure = pl.read_parquet(out / "_failures").row(0, named=True)
    assert failure["id"] == 11 and failure["path"] == f"{manifest}#row=1" and f"{manifest}#row=1" in failure["error"]


@pytest.mark.parametrize("problem", ["bytes_only", "duplicate_paths", "missing_paths", "no_audio", "no_audio_unstatted",
                                     "not_audio_type", "csv", "kept"])
def test_embedded_audio_refusals_exit_2_with_nothing_written(problem, model, tmp_path):
    manifest, extra = tmp_path / "m.parquet", []
    if problem == "bytes_only":
        pq.write_table(pa.table({"audio": pa.array([b"x", b"y"])}), manifest)
        says = "'audio' holds bytes only: give --id-column"
    elif problem == "duplicate_paths":
        hf_manifest(manifest, [{"bytes": b"x", "path": "a.wav"}, {"bytes": b"y", "path": "a.wav"}])
        says = "its paths repeat ('a.wav'), so they cannot be the ids: give --id-column"
    elif problem == "missing_paths":
        hf_manifest(manifest, [{"bytes": b"x", "path": "a.wav"}, {"bytes": b"y", "path": None}])
        says = "has no path at 1 row(s) (rows 1)"
    elif problem in ("no_audio", "no_audio_unstatted"):
        table = pa.table({"audio": pa.array([{"bytes": b"x", "path": "a.wav"}, None, {"bytes": None, "path": None}], HF_AUDIO),
                          "id": [1, 2, 3]})
        pq.write_table(table, manifest, write_statistics=problem == "no_audio")
        extra, says = ["--id-column", "id"], "2 row(s) with no audio in 'audio' (null bytes and no path), at rows 1, 2"
    elif problem == "not_audio_type":
        pq.write_table(pa.table({"audio": ["a.wav"]}), manifest)
        says = "--audio-column 'audio' of %s is string: expected binary audio, or a struct" % manifest
    elif problem == "csv":
        manifest = tmp_path / "m.csv"
        manifest.write_text("id,audio\n1,xx\n")
        says = "audio stored in the manifest is read from Parquet only"
    else:
        hf_manifest(manifest, [{"bytes": b"x", "path": "a.wav"}])
        extra, says = ["--keep-columns", "audio"], "cannot also be kept"
    out = tmp_path / "out"
    code, log = run_job(manifest, out, model, "--audio-column", "audio", *extra)
    assert code == 2 and says in log, log
    assert not out.exists()


def test_the_audio_column_is_read_one_row_group_at_a_time(tmp_path):
    group_bytes, groups, per_group = 1 << 20, 16, 8
    blobs = [os.urandom(group_bytes // per_group) for _ in range(groups * per_group)]
    path = tmp_path / "big.parquet"
    pq.write_table(pa.table({"audio": pa.array([{"bytes": b, "path": f"{i}.wav"} for i, b in enumerate(blobs)], HF_AUDIO)}),
                   path, row_group_size=per_group)
    manifest = read_manifest(ManifestSpec(str(path), audio_column="audio"))
    assert manifest.audio == EmbeddedAudio(str(path), "audio", STRUCT, None)
    assert "bytes" not in str(manifest.rows.schema) and manifest.rows.estimated_size() < group_bytes  # no audio in the rows

    rows = list(range(1, groups * per_group, 3))  # what a resume leaves: a sparse subset, in manifest order
    base, peak = pa.total_allocated_bytes(), 0
    for row, data in zip(rows, manifest.audio.blobs(rows), strict=True):
        assert data == blobs[row]
        peak = max(peak, pa.total_allocated_bytes() - base)
    # pyarrow holds a row group's column chunk while it is read (about 3x it, measured): far from
    # the 16 MB of the whole column.
    assert peak < 5 * group_bytes, f"{peak / group_bytes:.1f} row groups of audio held at once"
    with pytest.raises(ValueError, match="manifest order"):
        list(manifest.audio.blobs([5, 2]))


def test_plain_binary_audio_reads_bytes_and_nulls(tmp_path):
    path = tmp_path / "b.parquet"
    pq.write_table(pa.table({"uid": [1, 2, 3], "wav": pa.array([b"a", b"bb", b"ccc"], pa.binary())}), path, row_group_size=1)
    m = read_manifest(ManifestSpec(str(path), audio_column="wav", id_column="uid"))
    assert m.audio.kind == BINARY and m.rows["path"].to_list() == [f"{path}#row={i}" for i in range(3)]
    assert list(m.audio.blobs([0, 2])) == [b"a", b"ccc"]
    with pytest.raises(ManifestError, match="lacks the --audio-column 'audio'"):
        read_manifest(ManifestSpec(str(path), audio_column="audio", id_column="uid"))


def test_parquet_written_by_hf_datasets_with_and_without_embedded_bytes(clips, model, tmp_path):
    datasets = pytest.importorskip("datasets")
    from datasets.table import embed_table_storage

    ds = datasets.Dataset.from_dict({"audio": [str(p) for p in clips[:2]], "text": ["one", "two"]}).cast_column("audio", datasets.Audio())
    ds.to_parquet(tmp_path / "by_path.parquet")  # datasets keeps the paths, bytes null: read from the paths
    ds.with_format("arrow").map(embed_table_storage, batched=True).to_parquet(tmp_path / "embedded.parquet")  # push_to_hub's form
    got = {}
    for name in ("by_path", "embedded"):
        out = tmp_path / name
        code, log = run_job(tmp_path / f"{name}.parquet", out, model, "--audio-column", "audio", "--keep-columns", "text")
        assert code == 0 and "2 embedded, 0 failed" in log, (name, log)
        got[name] = embeddings(out).sort_by("text")
    assert got["embedded"].column("id").to_pylist() == [clips[0].name, clips[1].name]  # datasets keeps the file's name
    assert got["by_path"].column("id").to_pylist() == [str(clips[0]), str(clips[1])]
    assert got["embedded"].column("embedding").equals(got["by_path"].column("embedding"))
