"""A small in-process API for notebooks, over the same stages as the job.

    from extractor import Embedder
    emb = Embedder("ckpt/", adapter="lora/")
    vectors = emb.embed(["a.wav", "b.flac"])  # (2, d_model) float32
    vectors = emb.embed([waveform_16k])        # numpy float32 arrays at 16 kHz work too
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .batching import make_batch, plan_batches, split_windows
from .constants import SAMPLE_RATE
from .decode import load_audio
from .embed import run_batch
from .model import load_model, resolve_device, resolve_dtype
from .runner import RowResults, default_max_windows, default_token_budget


class Embedder:
    def __init__(self, model: str | Path, adapter: str | Path | None = None, *, device: str = "auto", dtype: str = "auto", padding_mask: bool = True):
        dev = resolve_device(device)
        self.model = load_model(Path(model), Path(adapter) if adapter else None, dev, resolve_dtype(dtype, dev))
        self.padding_mask = padding_mask

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
        windows = []
        results = RowResults(self.d_model, keep_frames=False)
        for i, x in enumerate(inputs):
            samples = load_audio(str(x)).samples if isinstance(x, (str, Path)) else np.ascontiguousarray(x, dtype=np.float32)
            if samples.ndim != 1:
                raise ValueError(f"input {i}: expected a mono waveform, got shape {samples.shape}")
            ws = split_windows(i, samples, padding_mask=self.padding_mask)
            if not ws:
                raise ValueError(f"input {i} is too short for one output frame ({len(samples)} samples)")
            results.register(i, len(ws), len(samples) / SAMPLE_RATE)
            windows.extend(ws)
        device = self.model.device
        out = np.empty((len(inputs), self.d_model), dtype=np.float32)
        budget = token_budget or default_token_budget(device)
        for group in plan_batches(windows, token_budget=budget, max_windows=default_max_windows(device)):
            sums = run_batch(self.model, make_batch(group)).sums
            for j, w in enumerate(group):
                done = results.add(w, sums[j], None)
                if done is not None:
                    out[done[0]] = done[1]
        return out
