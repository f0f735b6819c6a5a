"""Fixtures of the manifest tests: a few short clips."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from builders import speechlike, write_audio

SR = 16_000


@pytest.fixture(scope="session")
def clips(tmp_path_factory) -> list[Path]:
    """Six short FLAC clips (0.4 to 1.4 s): enough rows for three nights, quick to embed."""
    root = tmp_path_factory.mktemp("clips")
    return [write_audio(root / f"clip{i}.flac", speechlike(0.4 + 0.2 * i, SR, seed=i), SR) for i in range(6)]


@pytest.fixture(scope="session")
def model(tiny_model, tmp_path_factory) -> Path:
    """A copy of `tiny_model` whose files are a minute old. A file written within RACY_S (2 s) is
    not trusted by its stat signature, so a rerun over a model built a moment ago plans under the
    lock instead of exiting as a no-op (by design, model.config.stat_signature); the no-op checks
    here need a model that has settled, whichever test the session runs first."""
    copy = tmp_path_factory.mktemp("model") / "tiny"
    shutil.copytree(tiny_model, copy)
    past = time.time() - 60
    for p in copy.rglob("*"):
        os.utime(p, (past, past))
    return copy
