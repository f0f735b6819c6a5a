"""What becomes of a row, in the types every stage shares: embedded rows, and failure records.

A row of a run is named by its item: its position in the run's pending rows. The stages hand
rows on in these types (the decode workers' failures, the pooled vectors, the writer's input),
so no stage imports another for a type they both use. Nothing here imports a stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Failure:
    """Why a row could not be embedded: a kind (the exception's name, or DecoderCrashed,
    DecodeTimeout, DecoderKilled, NonFiniteEmbedding, ...) and a message naming the file and the
    problem. Failure records keep both, as `error_kind` and as `error` ("Kind: message")."""

    kind: str
    message: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"

    @classmethod
    def of(cls, error: BaseException) -> Failure:
        return cls(type(error).__name__, str(error))


@dataclass
class Rows:
    """Finished rows: item k is row k of the run's pending rows. `embeddings` is (n, D) float32;
    `columns` holds what the pooling adds per row (frames, their rate), each of length n."""

    items: Any  # (n,) int64
    embeddings: Any  # (n, D) float32
    durations: Any  # (n,) float64, seconds of audio used
    columns: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.items)

    def select(self, keep) -> Rows:
        """The rows where the boolean mask `keep` holds."""
        cols = {k: ([v for v, k2 in zip(col, keep) if k2] if isinstance(col, list) else col[keep]) for k, col in self.columns.items()}
        return Rows(self.items[keep], self.embeddings[keep], self.durations[keep], cols)


@dataclass
class FailedRows:
    """Rows that could not be embedded, each with its Failure."""

    items: Any  # (n,) int64
    failures: list[Failure]

    def __len__(self) -> int:
        return len(self.items)


@dataclass
class Decoded:
    """Rows whose decode finished: (item, windows, duration_s) each. A row is finished once its
    windows are back and its entry here says how many it has."""

    entries: list[tuple[int, int, float]]


@dataclass
class Retrying:
    """Rows decoded again from their start (their worker was killed mid-file): what came of
    their earlier windows is void."""

    items: list[int]
