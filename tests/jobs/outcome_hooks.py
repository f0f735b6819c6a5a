"""Run hooks for tests/jobs/test_outcomes.py: EXTRACTOR_TEST_HOOK=tests.jobs.outcome_hooks:<name>.

Each acts only when its variable is set, so a hook left behind in a process does nothing elsewhere.
"""

from __future__ import annotations

import gzip
import os
import shutil

GONE = "HOOK_REMOVE_AT_MARKED"  # a folder to remove once the run's markers are written
TRUNCATED_GZIP = "HOOK_PANIC_AT_PREPARED"  # a truncated gzip file for polars to panic on


def remove_folder_when_marked(point: str, **info) -> None:
    """The run is done and its summary not yet written: its folder goes away."""
    if point == "marked" and os.environ.get(GONE):
        shutil.rmtree(os.environ[GONE])


def panic_when_prepared(point: str, **info) -> None:
    """A real Rust panic from a native library (polars reading a file object whose read fails)."""
    if point == "prepared" and os.environ.get(TRUNCATED_GZIP):
        import polars as pl

        with gzip.open(os.environ[TRUNCATED_GZIP]) as f:
            pl.read_csv(f)
