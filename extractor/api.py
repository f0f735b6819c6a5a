"""A small in-process API for notebooks and `datasets`, over the same stages as the job.

    from extractor import Embedder
    emb = Embedder("ckpt/", adapter="lora/")
    emb.embed("a.wav")                                  # (d_model,) float32
    emb.embed(["a.wav", "b.flac"])                      # (2, d_model)
    emb.embed(waveform, sample_rate=8000)               # an array, at the rate it was recorded
    emb.embed({"array": x, "sampling_rate": 44100})     # as `datasets` gives audio
    ds = ds.map(emb.map_batch, batched=True)            # adds an "embedding" column

Every input becomes what the job's decode makes of a file: paths (and URLs) are decoded by the
job's decoder; arrays go through the same blocks, integer scaling, channel-mean downmix, checks
and streaming soxr resampler (audio.decode.load_array), so an array embeds bit for bit like the
same samples written to a float WAV. What the job refuses is refused here, as the job's error
naming the input: non-finite or absurd samples (DecodeError), too long (TooLongError), too short
for one output frame (TooShort). An array carries no rate, so one is required: `sample_rate=` for
bare arrays, or a dict's own `sampling_rate`; 16 kHz is never assumed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from .audio.decode import has_output_frame, load_array, load_segments, too_short
from .audio.errors import AudioError
from .batching.device import run_batch
from .batching.packing import split_windows
from .batching.policy import BatchPolicy
from .batching.rows import RowPooling
from .batching.staging import default_max_windows, default_token_budget
from .constants import SAMPLE_RATE
from .model.load import load_model, resolve_device, resolve_dtype
from .options import DEFAULT_MAX_DURATION_S
from .pooling import POOLINGS

__all__ = ["Embedder"]

# The integer sample types decoders give (libsndfile, FFmpeg), scaled by 2^(bits-1) as they are.
PCM_DTYPES = (np.dtype(np.int8), np.dtype(np.uint8), np.dtype(np.int16), np.dtype(np.int32))


class Embedder:
    def __init__(self, model: str | Path, adapter: str | Path | None = None, *, device: str = "auto", dtype: str = "auto",
                 padding_mask: bool = True, max_duration_s: float = DEFAULT_MAX_DURATION_S):
        dev = resolve_device(device)
        self.model = load_model(Path(model), Path(adapter) if adapter else None, dev, resolve_dtype(dtype, dev))
        self.padding_mask = padding_mask
        self.max_duration_s = max_duration_s
        self._args = (str(model), str(adapter) if adapter else None, device, dtype, padding_mask, max_duration_s)

    def __reduce__(self):
        # datasets.map pickles its function (a bound method of this) to fingerprint the result for
        # its cache, and to send it to num_proc workers: where the weights come from and their
        # fingerprints stand for the tensors (a 7B checkpoint's tower is 1.3 GB), and a worker
        # loads them again.
        fingerprints = (self.model.model_fingerprint, self.model.adapter.fingerprint if self.model.adapter else None)
        return _reload, (self._args, fingerprints)

    @property
    def d_model(self) -> int:
        return self.model.cfg.d_model

    def embed(self, inputs, *, sample_rate: int | None = None, token_budget: int | None = None) -> np.ndarray:
        """The mean of the valid output frames of each input, as the job computes it.

        `inputs` is one input, giving a (d_model,) float32 vector, or a list or tuple of them,
        giving (N, d_model); each is a path or URL, a numpy array (samples,) or (samples,
        channels), integer PCM or float, at `sample_rate`, or a dict as `datasets` gives audio:
        {"array", "sampling_rate"} (decoded) or {"bytes", "path"} (an `Audio(decode=False)` column,
        decoded here by the job's decoder). Raises the job's AudioError for an input it would
        record as a failure, and ValueError or TypeError for one it cannot read, naming it.
        """
        single = _is_one_input(inputs)
        items = [inputs] if single else list(inputs)
        waveforms = [self._waveform(x, i, sample_rate) for i, x in enumerate(items)]
        if not waveforms:
            return np.zeros((0, self.d_model), np.float32)
        vectors = _embed_waveforms(self.model, waveforms, padding_mask=self.padding_mask, token_budget=token_budget)
        return vectors[0] if single else vectors

    def map_batch(self, batch: Mapping[str, Sequence], *, audio_column: str = "audio", sample_rate: int | None = None,
                  output_column: str = "embedding") -> dict[str, list[np.ndarray]]:
        """For `datasets.Dataset.map(embedder.map_batch, batched=True)`: the batch's `audio_column`
        (any input `embed` takes, one per row) embedded, as {output_column: one (d_model,) float32
        vector per row}. Other columns and names through `fn_kwargs`."""
        if audio_column not in batch:
            raise KeyError(f"the batch has no column {audio_column!r} (it has {sorted(batch)}); "
                           f"name the audio with fn_kwargs={{'audio_column': ...}}")
        return {output_column: list(self.embed(list(batch[audio_column]), sample_rate=sample_rate))}

    def _waveform(self, x, i: int, sample_rate: int | None) -> np.ndarray:
        """Input `i` as the job's decode gives it: mono float32 at SAMPLE_RATE, long enough."""
        if isinstance(x, (str, os.PathLike)):
            name = os.fspath(x)
            samples = _decoded(load_segments(name, [(None, None)], max_duration_s=self.max_duration_s))
        elif isinstance(x, Mapping):
            name, samples = self._from_dict(x, i)
        elif hasattr(x, "get_all_samples"):
            raise TypeError(f"input {i} was decoded by datasets (torchcodec), not by the job's decoder: cast the column "
                            f"with datasets.Audio(decode=False) and its files are decoded here as the job decodes them")
        else:
            name = f"input {i}"
            if sample_rate is None:
                raise ValueError(f"{name}: an array needs its sample rate: pass sample_rate=, or give "
                                 f"{{'array': ..., 'sampling_rate': ...}} (16 kHz is not assumed)")
            samples = load_array(_samples(x, name), _rate(sample_rate, name), name=name, max_duration_s=self.max_duration_s).samples
        if not has_output_frame(len(samples)):
            raise too_short(name, len(samples))
        return samples

    def _from_dict(self, x: Mapping, i: int) -> tuple[str, np.ndarray]:
        if "array" in x:
            name = f"input {i}" + (f" ({x['path']})" if x.get("path") else "")
            if x.get("sampling_rate") is None:
                raise ValueError(f"{name}: a dict with an 'array' needs its 'sampling_rate'")
            rate = _rate(x["sampling_rate"], name)
            return name, load_array(_samples(x["array"], name), rate, name=name, max_duration_s=self.max_duration_s).samples
        if x.get("bytes") is not None or x.get("path") is not None:  # datasets' Audio(decode=False)
            data = x.get("bytes")
            name = x.get("path") or f"input {i}"
            decoded = load_segments(name, [(None, None)], max_duration_s=self.max_duration_s, data=bytes(data) if data is not None else None)
            return name, _decoded(decoded)
        raise ValueError(f"input {i}: a dict must hold 'array' and 'sampling_rate', or 'bytes' or 'path'; it has {sorted(x)}")


def _reload(args: tuple, fingerprints: tuple) -> Embedder:
    """An Embedder unpickled; `fingerprints` are pickled only for what datasets hashes."""
    model, adapter, device, dtype, padding_mask, max_duration_s = args
    return Embedder(model, adapter, device=device, dtype=dtype, padding_mask=padding_mask, max_duration_s=max_duration_s)


def _is_one_input(inputs) -> bool:
    """One input (a path, an array, a dict), or several (a list, a tuple, any other iterable)."""
    one = (str, bytes, os.PathLike, Mapping, np.ndarray)
    return isinstance(inputs, one) or hasattr(inputs, "__array__") or not isinstance(inputs, Iterable)


def _decoded(results: list) -> np.ndarray:
    (result,) = results
    if isinstance(result, AudioError):
        raise result
    return result.samples


def _samples(x, name: str) -> np.ndarray:
    """An array (or a list, as datasets gives a plain column) of samples: (samples,) or
    (samples, channels), integer PCM or float."""
    a = np.asarray(x)
    if a.dtype.kind not in "iuf" or (a.dtype.kind in "iu" and a.dtype not in PCM_DTYPES):
        # int64 is not PCM: it is what a Python list of ints becomes, whatever it held.
        raise TypeError(f"{name}: expected float samples or integer PCM ({', '.join(map(str, PCM_DTYPES))}), "
                        f"got an array of {a.dtype}")
    if a.dtype.kind == "f" and a.dtype != np.float32:
        a = a.astype(np.float32)  # as a float WAV holds them
    if a.ndim not in (1, 2) or (a.ndim == 2 and a.shape[1] > a.shape[0]):
        raise ValueError(f"{name}: expected (samples,) or (samples, channels), as soundfile reads audio; got shape "
                         f"{a.shape}" + (" (transpose a (channels, samples) array)" if a.ndim == 2 else ""))
    return a


def _rate(rate, name: str) -> int:
    """A whole number of Hz; whether it is plausible is the decoder's to say, as for a file."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float, np.integer, np.floating)) \
            or not math.isfinite(rate) or rate != int(rate):
        raise ValueError(f"{name}: sample rate {rate!r} is not a whole number of Hz")
    return int(rate)


def _embed_waveforms(model, waveforms: list[np.ndarray], *, padding_mask: bool, token_budget: int | None) -> np.ndarray:
    """(N, d_model) float32: each 16 kHz waveform's mean of valid output frames, through the job's
    own batching stage: its windows, its batching policy, a batch on the device, its rows."""
    mean = POOLINGS["mean"]
    out = np.empty((len(waveforms), model.cfg.d_model), dtype=np.float32)

    def emit(rows) -> None:
        out[rows.items] = rows.embeddings

    rows = RowPooling(mean, emit, lambda items, failures: None)
    policy = BatchPolicy((model.cfg.d_model, model.cfg.encoder_layers, model.cfg.num_mel_bins), padding_mask=padding_mask)
    decoded = []
    for i, samples in enumerate(waveforms):
        ws = split_windows(samples)
        policy.add(np.full(len(ws), i, dtype=np.int64), np.arange(len(ws), dtype=np.int64), np.array([len(w) for w in ws]), ws)
        decoded.append((i, len(ws), len(samples) / SAMPLE_RATE))
    rows.decoded(decoded)
    device = model.device
    for batch in policy.take(token_budget or default_token_budget(device), default_max_windows(device)):
        values, _ = run_batch(model, batch, mean)
        rows.add(batch, values, None)
    return out
