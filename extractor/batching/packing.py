"""Pack windows into batches under a token budget, with every index the device needs.

A clip longer than 30 s is consecutive non-overlapping 30 s windows from t=0 (cut by the decode
workers, audio.decode); each window is one canonical encoder call. Windows are sorted by length
before packing, so the padded part of the convolution buffer stays small, and attention and GEMMs
run on the packed tokens with no padding at all.

Everything here is host-side numpy over arrays of windows, never a Python loop per window but for
one memcpy each: a batch of 0.4 s clips holds ~1000 windows, and the device loop's thread must
stay free to launch work (issue 10: per-window Python work starved the GPU on short clips).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..constants import CONV_STRIDE, HOP_LENGTH, MAX_TOKENS, N_FRAMES, N_SAMPLES, POOL_STRIDE, encoder_tokens, mel_frames, output_frames


@dataclass(frozen=True)
class Staged:
    """A batch in its staging slot (batching.staging): waves (B, S), then the index arrays, flat,
    each at its (offset, length)."""

    slot: object  # staging's _Slot
    waves_shape: tuple[int, int]  # (B, S)
    offsets: dict[str, tuple[int, int]]
    n_index: int


def window_shapes(lengths: np.ndarray, *, padding_mask: bool) -> tuple[np.ndarray, np.ndarray]:
    """(tokens computed, valid output frames) per window of `lengths` samples. Without the
    padding mask every window is the full 30 s the HF encoder sees, all 1500 tokens attending to
    each other, and only the valid output frames are kept."""
    tokens = encoder_tokens(mel_frames(np.asarray(lengths, dtype=np.int64)))
    outs = output_frames(tokens)
    if not padding_mask:
        tokens = np.full_like(tokens, MAX_TOKENS)
    return tokens, outs


def split_windows(samples: np.ndarray) -> list[np.ndarray]:
    """A clip's windows (views) that have at least one output frame; none when it is too short."""
    windows = [samples[s : s + N_SAMPLES] for s in range(0, max(len(samples), 1), N_SAMPLES)]
    _, outs = window_shapes(np.array([len(w) for w in windows]), padding_mask=True)
    return [w for w, o in zip(windows, outs) if o > 0]


@dataclass
class Batch:
    """One device call. Shapes: B windows, S samples per padded row, T packed tokens, N output frames."""

    items: np.ndarray  # (B,) int64: the row of each window
    index: np.ndarray  # (B,) int64: the window's position within its row
    tokens: np.ndarray  # (B,) int64: tokens computed per window
    outs: np.ndarray  # (B,) int64: valid output frames per window
    samples: list[np.ndarray]  # B arrays of each window's samples (views into received blocks)
    audio_samples: int = 0  # real samples in the batch (throughput)
    flops: float = 0.0  # useful FLOPs by the shared cost formula (MFU)
    staged: Staged | None = None  # where the producer copied it for the device (batching.staging)

    @property
    def size(self) -> int:
        return len(self.items)

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.sum())

    @property
    def max_tokens(self) -> int:
        return int(self.tokens.max())

    def padded_samples(self) -> int:
        """Waveform length per row so every frame a window uses is computed as in the 30 s window.

        Frame f (centred STFT) reads samples up to f·HOP + N_FFT/2; beyond the window's audio the
        canonical waveform is zeros until N_SAMPLES, where the STFT's reflect padding starts. Two
        extra hops of zeros cover the last needed frame; at N_SAMPLES we are the canonical window.
        """
        return min(N_SAMPLES, HOP_LENGTH * (int(mel_needed(self.tokens).max()) + 2))

    def fill_waves(self, out: np.ndarray) -> np.ndarray:
        """The (B, S) zero-padded waveforms, written into `out` (a staging buffer, flat)."""
        B, S = self.size, self.padded_samples()
        waves = out[: B * S].reshape(B, S)
        for b, s in enumerate(self.samples):
            # Zero only each row's tail: windows are sorted by length, so it is short, and a memset
            # of the whole (B, S) buffer cost more than the copies (measured).
            waves[b, : len(s)] = s
            waves[b, len(s) :] = 0.0
        return waves

    def indices(self) -> dict[str, np.ndarray]:
        """Every index array the device needs, from the (B,) shapes alone (vectorised)."""
        B, S = self.size, self.padded_samples()
        conv_len = encoder_tokens(S // HOP_LENGTH)  # conv2 output length (k3, s2, p1) over the padded rows
        T, N = int(self.tokens.sum()), int(self.outs.sum())
        starts = np.zeros(B + 1, dtype=np.int64)
        np.cumsum(self.tokens, out=starts[1:])
        position_index = np.arange(T, dtype=np.int64) - np.repeat(starts[:-1], self.tokens)
        token_index = np.repeat(np.arange(B, dtype=np.int64) * conv_len, self.tokens) + position_index
        frame_window = np.repeat(np.arange(B, dtype=np.int64), self.outs)
        out_starts = np.zeros(B + 1, dtype=np.int64)
        np.cumsum(self.outs, out=out_starts[1:])
        frame_in_window = np.arange(N, dtype=np.int64) - np.repeat(out_starts[:-1], self.outs)
        return {
            "keep_frames": mel_needed(self.tokens),  # (B,) mel frames each window uses
            "token_index": token_index,  # (T,) row into the flattened (B · conv2 length) conv output
            "position_index": position_index,  # (T,) each token's position in its window
            "cu_seqlens": starts,  # (B+1,) (int32 on the device)
            "pool_index": starts[frame_window] + POOL_STRIDE * frame_in_window,  # (N,) first token of each output pair
            "frame_window": frame_window,  # (N,) which window each output frame belongs to
        }


def mel_needed(tokens: np.ndarray) -> np.ndarray:
    """Mel frames the convolutions read to produce `tokens` tokens.

    conv2 token t reads conv1 outputs 2t-1..2t+1, which read mel frames 2t-2..2t+2, so the last
    token reaches frame 2·tokens; the canonical window stops at N_FRAMES (conv1 pads).
    """
    return np.minimum(CONV_STRIDE * np.asarray(tokens, dtype=np.int64) + 1, N_FRAMES)


def window_flops(tokens: np.ndarray, n_mel: np.ndarray, d_model: int, layers: int, mel_bins: int) -> np.ndarray:
    """Useful FLOPs per window by the shared cost formula (shared/QWEN2_AUDIO.md), real audio only."""
    S, D = tokens.astype(np.float64), float(d_model)
    return 2 * mel_bins * D * 3 * n_mel + 2 * D * D * 3 * S + layers * (24 * S * D * D + 4 * S * S * D)


def plan_batches(tokens: np.ndarray, keys: tuple[np.ndarray, ...], *, token_budget: int, max_windows: int) -> list[np.ndarray]:
    """Positions of each batch: longest first (ties by `keys`), greedily filled up to `token_budget`
    tokens and `max_windows` windows. The convolutions run on the padded (B, S) buffer, so the
    budget bounds B · longest, not only the packed tokens."""
    assert token_budget >= MAX_TOKENS, f"token budget {token_budget} is below one full window ({MAX_TOKENS})"
    order = np.lexsort(tuple(reversed(keys)) + (-tokens,))
    batches, i, n = [], 0, len(order)
    while i < n:
        take = min(max(1, token_budget // int(tokens[order[i]])), max_windows, n - i)
        batches.append(order[i : i + take])
        i += take
    return batches
