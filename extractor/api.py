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
        for i, x in enumerate(inputs):
            samples = load_audio(str(x)).samples if isinstance(x, (str, Path)) else np.ascontiguousarray(x, dtype=np.float32)
            if samples.ndim != 1:
                raise ValueError(f"input {i}: expected a mono waveform, got shape {samples.shape}")
            ws = split_windows(i, samples, padding_mask=self.padding_mask)
            if not ws:
                raise ValueError(f"input {i} is too short for one output frame ({len(samples)} samples)")
            windows.extend(ws)
        cpu = self.model.device.type == "cpu"
        budget = token_budget or (1_500 if cpu else 32_768)
        sums = np.zeros((len(inputs), self.d_model), dtype=np.float64)
        frames = np.zeros(len(inputs), dtype=np.int64)
        for group in plan_batches(windows, token_budget=budget, max_windows=1 if cpu else 4096):
            out = run_batch(self.model, make_batch(group))
            for j, w in enumerate(group):
                sums[w.item] += out.sums[j]
                frames[w.item] += w.out
        return (sums / frames[:, None]).astype(np.float32)
