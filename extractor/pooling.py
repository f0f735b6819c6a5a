"""How a row's output frames become its embedding: one strategy per `--pooling`, chosen once.

A strategy owns the three places pooling touches: the device reduction of each window's valid
frames to one vector, the host combine of a row's windows (a long file has several), and the
columns it adds to the output. A new pooling is one class here and one line in POOLINGS.

Frames are the encoder's output frames (25 per second); a window's valid ones are those its
audio reaches (batching.packing). Every reduction is over valid frames only, so padding never
counts, and over all of a row's windows together: a 5 s tail window counts for its 125 frames.

numpy is imported where used, and torch never: the device side uses tensor methods alone, and
`extract-embeddings --help` lists these names without loading either.
"""

from __future__ import annotations

from typing import Any

from .constants import OUTPUT_FRAME_RATE_HZ


class Mean:
    """The mean of the valid output frames over all the row's windows: the canonical embedding.
    Window sums are kept in float64 on the host and divided once, so a row's vector does not
    depend on how its windows were batched."""

    name = "mean"
    keeps_frames = False  # whether the device loop sends each window's frames back
    recipe = "mean-of-valid-frames-over-all-windows"  # the recipe's frame_pooling

    def reduce(self, frames, frame_window, windows: int):
        """(N, D) frames of a batch on the device, (N,) the window of each → (windows, D) float32 sums."""
        out = frames.new_zeros((windows, frames.shape[1]), dtype=frames.dtype)
        return out.index_add_(0, frame_window, frames)

    def combine(self, acc, value, frames: int):
        """The running value of a row (None at first) with one more window's reduction."""
        import numpy as np

        return value.astype(np.float64) if acc is None else acc + value

    def finish(self, acc, frames: int):
        """A row's embedding from its combined windows and its count of valid frames."""
        import numpy as np

        return (acc / frames).astype(np.float32)

    def finish_single(self, values, frames):
        """Rows of one window each, vectorised: (k, D) reductions, (k,) frame counts → (k, D)."""
        import numpy as np

        return (values.astype(np.float64) / frames[:, None]).astype(np.float32)

    def columns(self, rows: int, frames: list | None) -> dict[str, Any]:
        """Output columns besides id, embedding and duration_s, for `rows` finished rows."""
        return {}


class Frames(Mean):
    """`none`: the mean embedding, and every valid 40 ms output frame of the row in order."""

    name = "none"
    keeps_frames = True

    def columns(self, rows: int, frames: list | None) -> dict[str, Any]:
        import numpy as np

        return {"frames": frames, "frame_rate_hz": np.full(rows, OUTPUT_FRAME_RATE_HZ)}


class Max:
    """The element-wise maximum over the row's valid output frames: a common baseline for retrieval."""

    name = "max"
    keeps_frames = False
    recipe = "max-of-valid-frames-over-all-windows"

    def reduce(self, frames, frame_window, windows: int):
        out = frames.new_full((windows, frames.shape[1]), float("-inf"))
        return out.scatter_reduce_(0, frame_window[:, None].expand_as(frames), frames, reduce="amax")

    def combine(self, acc, value, frames: int):
        import numpy as np

        return value.copy() if acc is None else np.maximum(acc, value)

    def finish(self, acc, frames: int):
        import numpy as np

        return acc.astype(np.float32)

    def finish_single(self, values, frames):
        import numpy as np

        return values.astype(np.float32)

    def columns(self, rows: int, frames: list | None) -> dict[str, Any]:
        return {}


POOLINGS: dict[str, Mean | Max] = {p.name: p for p in (Mean(), Frames(), Max())}


def pooling_named(name: str):
    """The strategy of `--pooling name`; ValueError naming the choices otherwise."""
    try:
        return POOLINGS[name]
    except KeyError:
        raise ValueError(f"--pooling {name!r}: expected one of {', '.join(POOLINGS)}") from None
