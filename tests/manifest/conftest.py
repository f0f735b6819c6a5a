"""Fixtures of the manifest tests: a few short clips."""

from __future__ import annotations

from pathlib import Path

import pytest

from builders import speechlike, write_audio

SR = 16_000


@pytest.fixture(scope="session")
def clips(tmp_path_factory) -> list[Path]:
    """Six short FLAC clips (0.4 to 1.4 s): enough rows for three nights, quick to embed."""
    root = tmp_path_factory.mktemp("clips")
    return [write_audio(root / f"clip{i}.flac", speechlike(0.4 + 0.2 * i, SR, seed=i), SR) for i in range(6)]
