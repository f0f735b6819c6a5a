"""Which model and adapter a run uses, as far as it can tell at each price.

  signature()           a Hub snapshot's commit, else the files' stat signature: free, and
                        enough for a marker to say "these inputs, done" (a changed file changes it)
  known_fingerprints()  the recipe's tensor fingerprints, where an earlier run hashed these very
                        files (a cache keyed by their stat signature): free, checked before a load
  fingerprints()        the recipe's fingerprints, hashing what is not cached: reads the tensors
                        (no model is built), for a rerun with nothing to embed whose inputs changed
  sources()             readable names for _run.json and the parts' metadata (not compared)

The fingerprints are what the recipe compares; the rest only decide how soon a run can tell.
Nothing here imports torch unless fingerprints() must hash.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from .config import adapter_weights_file, cached_fingerprint, stat_signature, tower_files
from .hub import readable_source


def _files_signature(folder: str, files: list[Path]) -> str:
    """A Hub snapshot's commit (its files never change; the same on every host, each of which may
    hold its own copy, as a Ray task's node does), else the files' stat signature."""
    repo, commit = readable_source(folder)
    if commit:
        return f"{repo}@{commit}"
    # Racy files are fine here: a marker only spares a rerun the planning, never decides what is done.
    return stat_signature(files, racy_ok=True) or f"missing-{time.time_ns()}"


@dataclass(frozen=True)
class Identity:
    """The model directory and the adapter directory (or None) of a run, resolved to local paths."""

    model: str
    adapter: str | None = None

    def _model_files(self) -> list[Path]:
        return [Path(self.model) / "config.json", *tower_files(Path(self.model))]

    def _adapter_files(self) -> list[Path]:
        adapter = Path(self.adapter)
        return [adapter / "adapter_config.json", adapter_weights_file(adapter)]

    def signature(self) -> str:
        signature = _files_signature(self.model, self._model_files())
        if self.adapter:
            signature += "|" + _files_signature(self.adapter, self._adapter_files())
        return signature

    def known_fingerprints(self) -> dict:
        """The fingerprints that are free to know now: the model's, when cached."""
        fp = cached_fingerprint(tower_files(Path(self.model)))
        return {} if fp is None else {"model_fingerprint": fp}

    def fingerprints(self) -> dict:
        """The recipe's model_fingerprint and adapter_fingerprint, hashing what is not cached."""
        from .checkpoint import model_fingerprint
        from .lora import adapter_fingerprint

        return {"model_fingerprint": model_fingerprint(Path(self.model)),
                "adapter_fingerprint": adapter_fingerprint(Path(self.adapter)) if self.adapter else None}

    def sources(self) -> dict:
        """Repo id and commit for a Hub snapshot, else the path (not compared on resume: the same
        weights may move)."""
        model, model_revision = readable_source(self.model)
        adapter, adapter_revision = readable_source(self.adapter)
        return {"model": model, "model_revision": model_revision, "adapter": adapter, "adapter_revision": adapter_revision}
