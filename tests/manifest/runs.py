"""The job through its CLI, and its output read back as readers read it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
from click.testing import CliRunner

from jobs.extract import extract


def run_job(manifest, out, model, *extra) -> tuple[int, str]:
    """`python -m jobs.extract` in-process: (exit code, what it logged)."""
    args = ["--manifest", str(manifest), "--output", str(out), "--model", str(model), "--decode-workers", "0", *map(str, extra)]
    result = CliRunner().invoke(extract, args, catch_exceptions=False)
    return result.exit_code, result.output


def embeddings(out) -> pa.Table:
    """Every embedded row, as a reader gets them (pyarrow.dataset on OUT/embeddings), by id."""
    return ds.dataset(Path(out) / "embeddings").to_table().sort_by("id")


def snapshot(out) -> dict[str, int]:
    """Every file of the output with its mtime: a no-op run changes none and adds none."""
    out = Path(out)
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in sorted(out.rglob("*")) if p.is_file()}


def vectors(table: pa.Table) -> np.ndarray:
    emb = table.column("embedding").combine_chunks()
    return emb.values.to_numpy(zero_copy_only=False).reshape(len(emb), -1)
