"""Samples as the encoder's input wants them, whoever decoded them: integer PCM scaled to float32
as libsndfile scales it, channels averaged, and what is not audio (NaN, Inf, absurd values)
refused. The one code path of every decoder's blocks (decode.py) and of arrays given to the
Python API (api.py), so that an array embeds exactly as the same samples in a file do.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import DecodeError

__all__ = ["MAX_ABS_SAMPLE", "downmix", "to_float32"]

# Float WAV/FLAC samples are nominally within [-1, 1]. Far beyond it (1e20 was seen in fuzzing)
# the STFT power overflows float32 and the embedding becomes NaN; such a file is not audio.
MAX_ABS_SAMPLE = 1e4
# numpy's mean over 8 or more channels sums pairwise; below that it adds them in order, which the
# column loop in downmix reproduces bit for bit, 17 times faster for stereo (measured).
_ORDERED_MEAN_CHANNELS = 7


def to_float32(data: np.ndarray) -> np.ndarray:
    """Samples as float32: integer PCM divided by 2^(bits-1) as libsndfile divides it (unsigned PCM
    centred first), so 16-bit -32768..32767 becomes -1..1-2^-15; floats cast, never rescaled."""
    if data.dtype.kind in "iu":
        bits = np.iinfo(data.dtype).bits
        offset = 0 if data.dtype.kind == "i" else -(1 << (bits - 1))
        scale = np.float32(1.0 / (1 << (bits - 1)))
        return (data.astype(np.float32) + np.float32(offset)) * scale
    return data.astype(np.float32, copy=False)


def downmix(data: np.ndarray, name: str, pos: int, rate: int) -> np.ndarray:
    """(frames, channels) float32 -> mono float32 by the channels' mean; DecodeError naming `name`
    and the time (`pos` is the block's first frame) of the first NaN, Inf or absurd sample."""
    channels = data.shape[1]
    if channels == 1:
        mono = data[:, 0]  # a view: for a 16 kHz mono file the output is soundfile's read, bit for bit
    else:
        with np.errstate(over="ignore"):  # an overflowing sum is reported below, as a failure record
            if channels <= _ORDERED_MEAN_CHANNELS:
                mono = data[:, 0] + data[:, 1]  # == data.mean(axis=1, dtype=float32), bit for bit (tests/audio)
                for c in range(2, channels):
                    mono += data[:, c]
                mono /= np.float32(channels)
            else:
                mono = data.mean(axis=1, dtype=np.float32)
    # Two reductions and no temporaries: min and max are NaN when any sample is, and their
    # magnitudes give the peak (isfinite().all() and abs().max() took twice as long).
    lo, hi = (float(mono.min()), float(mono.max())) if len(mono) else (0.0, 0.0)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        bad = ~np.isfinite(data).all(axis=1)
        if bad.any():
            first = int(np.argmax(bad))
            kind = "NaN" if np.isnan(data[first]).any() else "Inf"
        else:  # finite but so large that the mean overflows float32
            first = int(np.argmax(~np.isfinite(mono)))
            kind = "overflowing"
        raise DecodeError(f"cannot decode {name}: {kind} samples (first at {(pos + first) / rate:.3f} s)")
    peak = max(-lo, hi)
    if peak > MAX_ABS_SAMPLE:
        first = int(np.argmax(np.abs(mono) > MAX_ABS_SAMPLE))
        raise DecodeError(f"cannot decode {name}: implausible sample value {peak:.3g} (first at {(pos + first) / rate:.3f} s; audio is within ±1)")
    return mono
