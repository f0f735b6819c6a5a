"""Audio stored in the manifest at the sizes users have: clips of 0.5-2 MB and one of 50 MB, in one
row group of 130 MB (pyarrow's default) and in `datasets`' own Parquet, through 1 and 4 decode
workers. Every row comes out equal to the same audio given as paths, within a deadline.

Messages this size do not fit a pipe's buffer: a request carrying 1-50 MB of audio is written
while its worker sends back a result as large. On one duplex pipe both writes blocked for good
(the job hung, silent); the pool's wire never waits on a write (extractor/audio/pool.py).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from jobrun import job_cmd, job_env

from .runs import embeddings

pytestmark = pytest.mark.timeout(600)

CLIPS = 64
RATE, CHANNELS = 48_000, 2  # 192 KB per second of 16-bit PCM: MB-size clips of a few seconds
BIG_BYTES = 50 << 20
DEADLINE_S = 240  # a run of these takes seconds; a wedged wire never ends
JOB_RSS_BOUND = 1.5e9  # bytes: the job process (torch, the tiny model, one row group, requests in flight)


def _wav(path, seconds: float, seed: int):
    rng = np.random.default_rng(seed)
    n = int(seconds * RATE)
    t = np.arange(n) / RATE
    tone = 0.2 * np.sin(2 * np.pi * (180 + 40 * seed % 300) * t)
    x = (tone[:, None] + 0.05 * rng.standard_normal((n, CHANNELS))).astype(np.float32)
    sf.write(path, x, RATE, subtype="PCM_16")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """64 WAVs of 0.5-2 MB and one of 50 MB, their path manifest, and the same audio embedded in a
    Parquet manifest by pyarrow (one row group) and by `datasets` (Audio feature, to_parquet)."""
    root = tmp_path_factory.mktemp("sizes")
    rng = np.random.default_rng(7)
    sizes = list(rng.uniform(0.5, 2.0, CLIPS) * (1 << 20)) + [BIG_BYTES]
    paths = [_wav(root / f"c{i:03d}.wav", size / (RATE * CHANNELS * 2), seed=i) for i, size in enumerate(sizes)]
    ids = [f"clip-{i:03d}" for i in range(len(paths))]
    assert 0.5 * (1 << 20) < min(p.stat().st_size for p in paths[:-1]) and paths[-1].stat().st_size >= BIG_BYTES - (1 << 20)
    by_path = root / "paths.parquet"
    pq.write_table(pa.table({"id": ids, "path": [str(p) for p in paths]}), by_path)
    hf_audio = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    by_pyarrow = root / "pyarrow.parquet"
    structs = [{"bytes": p.read_bytes(), "path": p.name} for p in paths]
    pq.write_table(pa.table({"id": ids, "audio": pa.array(structs, hf_audio)}), by_pyarrow)  # one row group
    assert pq.ParquetFile(by_pyarrow).metadata.num_row_groups == 1
    del structs
    datasets = pytest.importorskip("datasets")
    from datasets.table import embed_table_storage

    ds = datasets.Dataset.from_dict({"id": ids, "audio": [str(p) for p in paths]}).cast_column("audio", datasets.Audio())
    by_datasets = root / "datasets.parquet"
    ds.with_format("arrow").map(embed_table_storage, batched=True).to_parquet(by_datasets)
    return {"root": root, "paths": by_path, "pyarrow": by_pyarrow, "datasets": by_datasets}


def _run(manifest, out, model, *extra) -> tuple[subprocess.CompletedProcess, int]:
    """The job as a process, under the deadline: (its result, its peak RSS in bytes)."""
    cmd = job_cmd(manifest, out, model, "--id-column", "id", "--device", "cpu", *extra)
    # A parent of its own, so that RUSAGE_CHILDREN is the job's peak alone.
    wrapper = textwrap.dedent(f"""
        import resource, subprocess, sys
        done = subprocess.run({cmd!r}, capture_output=True, text=True, timeout={DEADLINE_S})
        sys.stderr.write(done.stderr)
        print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
    """)
    result = subprocess.run([sys.executable, "-c", wrapper], env=job_env(), capture_output=True, text=True, timeout=DEADLINE_S + 30)
    assert result.returncode == 0, result.stderr[-3000:]  # the wrapper itself: a TimeoutExpired means the job hung
    code, rss = (int(x) for x in result.stdout.split())
    result.returncode = code
    return result, rss


@pytest.fixture(scope="module")
def reference(corpus, tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    result, _ = _run(corpus["paths"], out, tiny_model, "--decode-workers", "2")
    assert result.returncode == 0 and f"{CLIPS + 1} embedded, 0 failed" in result.stderr, result.stderr[-3000:]
    return embeddings(out)


@pytest.mark.parametrize("writer", ["pyarrow", "datasets"])
@pytest.mark.parametrize("workers", [1, 4])
def test_embedded_audio_of_real_sizes_equals_the_same_audio_by_path(corpus, reference, tiny_model, tmp_path, writer, workers):
    out = tmp_path / "out"
    result, rss = _run(corpus[writer], out, tiny_model, "--audio-column", "audio", "--decode-workers", str(workers))
    assert result.returncode == 0 and f"{CLIPS + 1} embedded, 0 failed" in result.stderr, result.stderr[-3000:]
    got = embeddings(out)
    assert got.column("id").equals(reference.column("id"))
    assert got.column("embedding").equals(reference.column("embedding"))  # bit for bit, as on paths
    assert got.column("duration_s").equals(reference.column("duration_s"))
    assert rss < JOB_RSS_BOUND, f"the job peaked at {rss / 1e9:.2f} GB"
