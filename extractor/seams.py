"""Where a caller may watch or replace part of a run: named events, and the decoder.

The command line hands these in (jobs/extract.py reads them from the environment for tests that
run it as a process); a test in-process builds them itself. The library reads no environment
variable to let tests in.

Events, each called as `on_event(name, **info)` on the thread that reaches it:
  "checking"   the run starts reading its configuration, model JSON and manifest
  "prepared"   configuration, manifest and output read and checked; no lock yet
  "locked"     the shard's lock is held, nothing planned yet
  "planned"    pending rows known (info: pending)
  "weights"    the model's tensors are about to be read onto the device
  "building"   the model's module is about to be made, its adapter merged
  "loaded"     the model is loaded, nothing written yet
  "first-batch" the first batch is about to go to the device
  "committed"  a part or failure file is durable (info: seq, rows, failures)
  "marked"     the shard's markers are written
A test uses them to hold a run at exactly one point (and signal or race it there) instead of
sleeping and hoping.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Seams:
    """Both are top-level functions (or None), so a run that starts processes can pass them on."""

    on_event: Callable[..., None] | None = None
    decode_fn: Callable[[Any], Any] | None = None  # runs in the decode workers instead of the decoder

    def event(self, name: str, **info) -> None:
        if self.on_event is not None:
            self.on_event(name, **info)


NONE = Seams()
