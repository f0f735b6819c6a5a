"""extractor.output.locks.flock_holder: the read-only look at a local lock that --dry-run and the
migration take."""

from __future__ import annotations

import json
import os

from extractor.output.locks import RunLock, flock_holder


def test_flock_holder_names_a_live_holder_and_ignores_a_dead_ones_file(tmp_path):
    path = tmp_path / "00000.lock"
    assert flock_holder(path) is None  # no file: nobody

    with RunLock(path):
        holder = flock_holder(path)
        assert holder is not None and json.loads(holder)["pid"] == os.getpid()
        assert flock_holder(path) == holder  # looking does not take it

    path.write_text('{"pid": 1, "host": "a killed run"}')  # a record left behind, with no flock on it
    assert flock_holder(path) is None
    with RunLock(path):  # and the look left nothing in the way of the next run
        pass
