"""Named points in a run where a test can pause, observe or break it deterministically.

`EXTRACTOR_TEST_HOOK=module:function` names a function called as `function(point, **info)` at
each point below; the tests use it to kill a run right after its first commit, or to hold one
run inside its lock while another starts, instead of sleeping and hoping (tests/hooks.py). Unset,
a point costs one attribute lookup.

Points: "prepared" (configuration read and checked, no lock yet), "locked" (the shard's lock is
held, nothing planned yet), "planned" (pending rows known),
"committed" (a part or failure file is durable; info: seq, rows, failures), "marked" (markers written).
"""

from __future__ import annotations

import importlib
import os

ENV = "EXTRACTOR_TEST_HOOK"
_hook = None
_loaded = False


def point(name: str, **info) -> None:
    global _hook, _loaded
    if not _loaded:
        spec = os.environ.get(ENV)
        if spec:
            module, _, attr = spec.partition(":")
            _hook = getattr(importlib.import_module(module), attr)
        _loaded = True
    if _hook is not None:
        _hook(name, **info)
