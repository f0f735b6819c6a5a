"""The batching policy: decoded windows in, packed batches out. No threads: the producer runs it.

Modelled on lhotse's bucketing sampler. Windows are held in a pool of a few batches' worth of
tokens (POOL_BATCHES) and sorted by length there, so each batch holds windows of alike length
and the padded buffer the convolutions run on stays small; when the pool is full it is emptied
into batches under the device's token budget (packing.plan_batches). The first pool is one
batch, so that the device starts as soon as it can.
"""

from __future__ import annotations

import numpy as np

from ..constants import encoder_tokens, mel_frames
from .packing import Batch, plan_batches, window_flops, window_shapes

POOL_BATCHES = 4  # windows are sorted by length within a pool of this many batches' tokens


class BatchPolicy:
    """add() windows, ask ready(), take() batches; take() at the end flushes whatever is held.

    `dims`: (d_model, encoder_layers, num_mel_bins), for each batch's useful FLOPs (MFU)."""

    def __init__(self, dims: tuple[int, int, int], *, padding_mask: bool, pool_batches: int = POOL_BATCHES):
        self.dims, self.padding_mask, self.pool_batches = dims, padding_mask, pool_batches
        self._held: list[tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]] = []  # (items, index, lengths, samples)
        self.tokens = 0  # encoder tokens held
        self._first = True

    def add(self, items: np.ndarray, index: np.ndarray, lengths: np.ndarray, samples: list[np.ndarray]) -> None:
        """Windows: the row of each, its position in the row, its length in samples, its samples."""
        if not len(items):
            return
        self._held.append((items, index, lengths, samples))
        tokens, _ = window_shapes(lengths, padding_mask=self.padding_mask)
        self.tokens += int(tokens.sum())

    def drop(self, items: set[int]) -> None:
        """Forget the held windows of `items` (rows decoded again from their start)."""
        kept = []
        for it, ix, ln, sm in self._held:
            keep = ~np.isin(it, list(items))
            if keep.any():
                kept.append((it[keep], ix[keep], ln[keep], [s for s, k in zip(sm, keep) if k]))
        self._held = []
        self.tokens = 0
        for block in kept:
            self.add(*block)

    def ready(self, token_budget: int) -> bool:
        """Enough is held to be worth sorting: a pool of batches (the first: one batch)."""
        return self.tokens >= (1 if self._first else self.pool_batches) * token_budget

    def take(self, token_budget: int, max_windows: int) -> list[Batch]:
        """Every held window, packed: longest first (ties by row and position), greedily up to
        the budget. Leaves the pool empty."""
        if not self._held:
            return []
        items = np.concatenate([h[0] for h in self._held])
        index = np.concatenate([h[1] for h in self._held])
        lengths = np.concatenate([h[2] for h in self._held])
        samples = [s for h in self._held for s in h[3]]
        self._held, self.tokens, self._first = [], 0, False
        tokens, outs = window_shapes(lengths, padding_mask=self.padding_mask)
        d_model, layers, mel_bins = self.dims
        n_mel = mel_frames(lengths)
        flops = window_flops(encoder_tokens(n_mel), n_mel, d_model, layers, mel_bins)  # real audio only, mask or not
        return [Batch(items[sel], index[sel], tokens[sel], outs[sel], [samples[k] for k in sel],
                      audio_samples=int(lengths[sel].sum()), flops=float(flops[sel].sum()))
                for sel in plan_batches(tokens, (items, index), token_budget=token_budget, max_windows=max_windows)]
