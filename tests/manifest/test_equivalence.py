"""The same audio given five ways gives bit-identical embeddings on CPU (issue 12's acceptance)."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from .runs import embeddings, run_job, vectors


def test_paths_csv_jsonl_gz_hf_audio_bytes_and_lhotse_cuts_embed_bit_identically(clips, model, tmp_path):
    lhotse = pytest.importorskip("lhotse")
    paths = [str(p) for p in clips[:4]]
    given = {}
    pq.write_table(pa.table({"path": paths}), given.setdefault("parquet paths", tmp_path / "paths.parquet"))
    (tmp_path / "paths.csv").write_text("path\n" + "".join(f"{p}\n" for p in paths))
    given["csv"] = tmp_path / "paths.csv"
    with gzip.open(given.setdefault("jsonl.gz", tmp_path / "paths.jsonl.gz"), "wt") as f:
        f.writelines(json.dumps({"path": p}) + "\n" for p in paths)
    audio = pa.array([{"bytes": open(p, "rb").read(), "path": p} for p in paths], pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"audio": audio}), given.setdefault("hf audio bytes", tmp_path / "hf.parquet"), row_group_size=2)
    cuts = lhotse.CutSet.from_cuts(lhotse.Recording.from_file(p, recording_id=p).to_cut() for p in paths)
    cuts.to_file(given.setdefault("lhotse cuts", tmp_path / "cuts.jsonl.gz"))

    results = {}
    for how, manifest in given.items():
        out = tmp_path / how.replace(" ", "_")
        code, log = run_job(manifest, out, model, *(["--audio-column", "audio"] if how == "hf audio bytes" else []))
        assert code == 0 and "4 embedded, 0 failed" in log, (how, log)
        results[how] = embeddings(out)

    reference = results["parquet paths"]
    assert reference.column("id").to_pylist() == sorted(paths)
    for how, table in results.items():
        assert table.column("id").to_pylist() == reference.column("id").to_pylist(), how
        assert table.column("embedding").equals(reference.column("embedding")), how
        assert table.column("duration_s").equals(reference.column("duration_s")), how
    assert len(np.unique(vectors(reference), axis=0)) == len(paths)  # four clips, four different vectors
