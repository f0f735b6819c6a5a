"""A small in-process API for notebooks, over the same stages as the job.

    from extractor import Embedder
    emb = Embedder("ckpt/", adapter="lora/")
    vectors = emb.embed(["a.wav", "b.flac"])  # (2, d_model) float32
    vectors = emb.embed([waveform_16k])        # numpy float32 arrays at 16 kHz work too
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .audio.decode import load_audio
from .batching.device import run_batch
from .batching.packing import Batch, plan_batches, split_windows, window_shapes
from .batching.rows import RowPooling
from .batching.staging import default_max_windows, default_token_budget
from .constants import SAMPLE_RATE
from .model.load import load_model, resolve_device, resolve_dtype
from .options import DEFAULT_MAX_DURATION_S
from .pooling import POOLINGS


class Embedder:
    def __init__(self, model: str | Path, adapter: str | Path | None = None, *, device: str = "auto", dtype: str = "auto",
                 padding_mask: bool = True, max_duration_s: float = DEFAULT_MAX_DURATION_S):
        dev = resolve_device(device)
        self.model = load_model(Path(model), Path(adapter) if adapter else None, dev, resolve_dtype(dtype, dev))
        self.padding_mask = padding_mask
        self.max_duration_s = max_duration_s

    @property
    def d_model(self) -> int:
        return self.model.cfg.d_model

    def embed(self, inputs: list, *, sample_rate: int = SAMPLE_RATE, token_budget: int | None = None) -> np.ndarray:
        """(N, d_model) float32: the mean of valid output frames of each input (paths or waveforms).

        Waveforms must be mono float32 at `sample_rate` (only 16 kHz is accepted: resample first).
        Raises ValueError naming the input that is too short for one output frame.
        """
        if sample_rate != SAMPLE_RATE:
            raise ValueError(f"waveforms must be {SAMPLE_RATE} Hz, got {sample_rate}; decode paths with load_audio to resample")
        items, index, windows, done = [], [], [], []
        for i, x in enumerate(inputs):
            if isinstance(x, (str, Path)):
                samples = load_audio(str(x), max_duration_s=self.max_duration_s).samples
            else:
                samples = np.ascontiguousarray(x, dtype=np.float32)
            if samples.ndim != 1:
                raise ValueError(f"input {i}: expected a mono waveform, got shape {samples.shape}")
            ws = split_windows(samples)
            if not ws:
                raise ValueError(f"input {i} is too short for one output frame ({len(samples)} samples)")
            items += [i] * len(ws)
            index += range(len(ws))
            windows += ws
            done.append((i, len(ws), len(samples) / SAMPLE_RATE))
        out = np.empty((len(inputs), self.d_model), dtype=np.float32)

        def emit(rows) -> None:
            out[rows.items] = rows.embeddings

        mean = POOLINGS["mean"]
        pooling = RowPooling(mean, emit, lambda items, errors: None)
        pooling.decoded(done)
        items_a, index_a = np.array(items, dtype=np.int64), np.array(index, dtype=np.int64)
        tokens, outs = window_shapes(np.array([len(w) for w in windows]), padding_mask=self.padding_mask)
        device = self.model.device
        budget = token_budget or default_token_budget(device)
        for sel in plan_batches(tokens, (items_a, index_a), token_budget=budget, max_windows=default_max_windows(device)):
            batch = Batch(items_a[sel], index_a[sel], tokens[sel], outs[sel], [windows[k] for k in sel])
            sums, _ = run_batch(self.model, batch, mean)
            pooling.add(batch, sums, None)
        return out
