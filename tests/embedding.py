"""The job's own embedding path for test clips, window by window: what equivalence tests compare
with the canonical HF + PEFT reference (tests/canonical.py)."""

from __future__ import annotations

import numpy as np

from builders import speechlike
from extractor.batching.device import run_batch
from extractor.batching.packing import Batch, plan_batches, split_windows, window_shapes
from extractor.pooling import POOLINGS

SR = 16_000
# Under a second, around one window, exactly 30 s, over 30 s (2 and 3 windows), and the
# shortest clip with one output frame (321 samples).
DURATIONS = [321 / SR, 0.25, 0.9, 7.3, 29.99, 30.0, 30.01, 47.5, 61.0]


def clips():
    return [speechlike(d, SR, seed=i) for i, d in enumerate(DURATIONS)]


def ours(model, waves, *, padding_mask=True, token_budget=1500, max_windows=1):
    """Per-clip (embedding, frames) through the job's own batching and encoder."""
    windows, items, index = [], [], []
    for i, x in enumerate(waves):
        ws = split_windows(x)
        windows += ws
        items += [i] * len(ws)
        index += range(len(ws))
    items, index = np.array(items), np.array(index)
    tokens, outs = window_shapes(np.array([len(w) for w in windows]), padding_mask=padding_mask)
    frames: dict[tuple[int, int], np.ndarray] = {}
    for sel in plan_batches(tokens, (items, index), token_budget=token_budget, max_windows=max_windows):
        batch = Batch(items[sel], index[sel], tokens[sel], outs[sel], [windows[k] for k in sel])
        _, out = run_batch(model, batch, POOLINGS["mean"])
        bounds = np.concatenate([[0], np.cumsum(batch.outs)])
        for j, k in enumerate(sel):
            frames[(int(items[k]), int(index[k]))] = out[bounds[j] : bounds[j + 1]]
    result = []
    for i in range(len(waves)):
        f = np.concatenate([frames[k] for k in sorted(frames) if k[0] == i])
        result.append((f.mean(0), f))
    return result


