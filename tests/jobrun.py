"""Helpers for tests that run the job: corpora, manifests, the CLI in-process or as a process, and
reading what it wrote (OUT/embeddings/, OUT/_failures/)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from click.testing import CliRunner

from builders import speechlike, write_audio

REPO = Path(__file__).resolve().parents[1]
SR = 16_000


def make_corpus(root: Path, n: int = 6, seed: int = 0) -> tuple[Path, list[Path], list[np.ndarray]]:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths, waves = [], []
    for i in range(n):
        x = speechlike(float(rng.uniform(0.3, 4.0)), SR, seed=seed * 1000 + i)
        paths.append(write_audio(root / f"clip{i:03d}.flac", x, SR))
        waves.append(x)
    return root, paths, waves


def write_manifest(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def run_cli(args: list[str], env: dict | None = None):
    from jobs.extract import extract

    result = CliRunner().invoke(extract, args, env=env, catch_exceptions=False)
    return result.exit_code, result.output


def base_args(manifest, out, model, adapter=None, *extra):
    args = ["--manifest", str(manifest), "--output", str(out), "--model", str(model), "--decode-workers", "0"]
    if adapter:
        args += ["--adapter", str(adapter)]
    return args + list(extra)


def parts(out: Path) -> list[Path]:
    return sorted((Path(out) / "embeddings").glob("part-*.parquet"))


def failure_parts(out: Path) -> list[Path]:
    return sorted((Path(out) / "_failures").glob("part-*.parquet"))


def read_output(out: Path) -> pl.DataFrame:
    return pl.read_parquet(parts(out)).sort("id")


def read_failures(out: Path) -> pl.DataFrame:
    files = failure_parts(out)
    return pl.read_parquet(files).sort("id") if files else pl.DataFrame({"id": [], "path": [], "error": []})


def snapshot(out: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(out)): (p.stat().st_mtime_ns, p.stat().st_size) for p in Path(out).rglob("*") if p.is_file()}


def job_cmd(manifest, out, model, *extra) -> list[str]:
    return [sys.executable, "-m", "jobs.extract", "--manifest", str(manifest), "--output", str(out), "--model", str(model), *extra]


def job_env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **extra}


def wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"job exited ({proc.returncode}) before the condition held: {proc.stderr.read() if proc.stderr else ''}")
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
