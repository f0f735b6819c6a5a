"""`--engine ray` on a local Ray instance equals the local engine: rows, numbers, failures, markers, resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

ray = pytest.importorskip("ray", reason="--engine ray needs the optional extra: pip install '.[ray]' (CI installs it with '.[test]')")

from builders import speechlike, write_audio

from extractor.manifest.spec import ManifestSpec
from extractor.options import JobOptions
from extractor.shard import run_shard
from extractor.ray_engine import run_job_ray
from jobs.extract import extract

SR = 16_000
RECIPE_KEY = b"qwen2_audio_embeddings.recipe"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A dozen rows: ten clips (one over 30 s: two windows), one that is not audio, one too short."""
    root = tmp_path_factory.mktemp("ray_corpus")
    rng = np.random.default_rng(5)
    seconds = [float(s) for s in rng.uniform(0.3, 3.0, size=9)] + [31.0]
    paths = [write_audio(root / f"clip{i:02d}.flac", speechlike(s, SR, seed=50 + i), SR) for i, s in enumerate(seconds)]
    bad = root / "notes.flac"
    bad.write_text("this is not audio\n" * 50)
    short = write_audio(root / "short.wav", speechlike(0.015, SR, seed=3), SR)  # no output frame
    rows = [{"id": 100 + i, "path": str(p), "speaker": f"s{i % 3}"} for i, p in enumerate([*paths, bad, short])]
    manifest = root / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    return {"manifest": manifest, "ids": [r["id"] for r in rows]}


def job(corpus, model, adapter, out: Path, **kw) -> JobOptions:
    spec = ManifestSpec(path=str(corpus["manifest"]), id_column="id", keep_columns=("speaker",))
    return JobOptions(manifest=spec, output=str(out), model=str(model), adapter=str(adapter), device="cpu",
                      part_rows=4, decode_workers=0, progress=False, max_failure_rate=0.5, **kw)


@pytest.fixture(scope="module")
def local_out(corpus, tiny_model, tiny_adapter, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "emb"
    assert run_shard(job(corpus, tiny_model, tiny_adapter, out)).complete
    return out


@pytest.fixture(scope="module")
def ray_cluster():
    # The runs below find Ray initialised and use it as it is; the CLI test starts its own.
    ray.init(address="local", num_cpus=2, object_store_memory=200 * 1024 * 1024, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_out(corpus, tiny_model, tiny_adapter, ray_cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("ray") / "emb"
    # Two actors, three rows per call: rows come back from both, in any order.
    summary = run_job_ray(job(corpus, tiny_model, tiny_adapter, out), actors=2, batch_rows=3)
    return out, summary


def rows(out: Path) -> pl.DataFrame:
    return pl.read_parquet(sorted(out.glob("part-*.parquet"))).sort("id")


def failures(out: Path) -> pl.DataFrame:
    return pl.read_parquet(sorted((out / "_failures").glob("part-*.parquet"))).sort("id")


def snapshot(out: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(out)): (p.stat().st_mtime_ns, p.stat().st_size) for p in out.rglob("*") if p.is_file()}


def assert_same_output(out: Path, reference: Path, ids: list[int]) -> None:
    got, want = rows(out), rows(reference)
    bad, want_bad = failures(out), failures(reference)
    # Exactly once: every manifest row in the parts or the failures, never both, never twice.
    assert got["id"].n_unique() == len(got) and bad["id"].n_unique() == len(bad)
    assert not set(got["id"]) & set(bad["id"])
    assert sorted(got["id"].to_list() + bad["id"].to_list()) == ids
    # The same rows, bit for bit: CPU batches hold one window, whichever actor ran them.
    assert got["id"].to_list() == want["id"].to_list()
    assert np.array_equal(np.stack(got["embedding"].to_numpy()), np.stack(want["embedding"].to_numpy()))
    assert got.drop("embedding").equals(want.drop("embedding"))
    assert bad.equals(want_bad)
    assert pq.read_schema(next(out.glob("part-*.parquet"))) == pq.read_schema(next(reference.glob("part-*.parquet")))
    assert (out / "_SUCCESS").exists()
    recipe = json.loads((out / "_run.json").read_text())["recipe"]
    assert recipe == json.loads((reference / "_run.json").read_text())["recipe"]
    assert json.loads(pq.read_schema(next(out.glob("part-*.parquet"))).metadata[RECIPE_KEY]) == recipe


def test_ray_engine_gives_the_local_engines_rows(ray_out, local_out, corpus):
    out, summary = ray_out
    assert_same_output(out, local_out, corpus["ids"])
    assert (summary.embedded, summary.failed, summary.skipped, summary.complete) == (10, 2, 0, True)
    errors = dict(zip(failures(out)["id"], failures(out)["error"]))
    assert errors[110].startswith("DecodeError:") and errors[111].startswith("TooShort:")
    assert len(list(out.glob("part-*.parquet"))) >= 2  # --part-rows 4: several commits
    assert not list((out / "_tmp").iterdir())


def test_rerun_is_a_noop(ray_out, corpus, tiny_model, tiny_adapter):
    out, _ = ray_out
    before = snapshot(out)
    summary = run_job_ray(job(corpus, tiny_model, tiny_adapter, out), actors=2)
    assert (summary.embedded, summary.failed, summary.skipped, summary.complete) == (0, 0, 12, True)
    assert snapshot(out) == before


def test_cli_resumes_after_a_lost_part(ray_out, local_out, corpus, tiny_model, tiny_adapter, tmp_path):
    """Delete a committed part, rerun through the CLI: only its rows are redone, exactly once.

    Ray is not initialised here, so the command starts (and stops) a local Ray of its own, and
    its one actor decodes in an isolated worker process (the default), not in-process.
    """
    out = tmp_path / "emb"
    shutil.copytree(ray_out[0], out)
    lost = min(out.glob("part-*.parquet"))
    lost_rows = pq.read_metadata(lost).num_rows
    lost.unlink()
    args = ["--manifest", str(corpus["manifest"]), "--output", str(out), "--model", str(tiny_model), "--adapter", str(tiny_adapter),
            "--id-column", "id", "--keep-columns", "speaker", "--device", "cpu", "--part-rows", "4", "--max-failure-rate", "0.5",
            "--engine", "ray"]
    ray.shutdown()  # the module's Ray; a test that needs it after this one gets a fresh local one
    result = CliRunner().invoke(extract, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert f"{lost_rows} embedded, 0 failed, {12 - lost_rows} skipped of 12 rows" in result.output
    assert_same_output(out, local_out, corpus["ids"])
