"""Cut audio into encoder windows and pack windows into batches under a token budget.

A clip longer than 30 s becomes consecutive non-overlapping 30 s windows from t=0; each window is
one canonical encoder call. Windows are sorted by length before packing, so the padded part of
the convolution buffer stays small, and attention/GEMMs run on the packed tokens with no padding.
Everything here is host-side numpy: the batch carries all the index arrays the device needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .constants import CONV_STRIDE, HOP_LENGTH, MAX_TOKENS, N_FRAMES, N_SAMPLES, POOL_STRIDE, encoder_tokens, mel_frames, output_frames


@dataclass
class Window:
    item: int  # the work item (manifest row) this window belongs to
    index: int  # position of the window within its item
    samples: np.ndarray  # float32, at most N_SAMPLES
    tokens: int  # encoder tokens computed for this window
    out: int  # valid output frames (from the true length, also when tokens is the full 1500)

    @property
    def mel_needed(self) -> int:
        """Mel frames the convolutions read to produce `tokens` tokens.

        conv2 token t reads conv1 outputs 2t-1..2t+1, which read mel frames 2t-2..2t+2, so the
        last token reaches frame 2·tokens; the canonical window stops at N_FRAMES (conv1 pads).
        """
        return min(CONV_STRIDE * self.tokens + 1, N_FRAMES)


def split_windows(item: int, samples: np.ndarray, *, padding_mask: bool) -> list[Window]:
    """The windows of one clip that have at least one output frame (possibly none: too short).

    With the padding mask each window is computed at its own length. Without it
    (`--no-padding-mask`) every window is the full 30 s the HF encoder sees, all 1500 tokens
    attending to each other, and only the valid output frames are kept.
    """
    windows = []
    for index, start in enumerate(range(0, max(len(samples), 1), N_SAMPLES)):
        chunk = samples[start : start + N_SAMPLES]
        tokens = encoder_tokens(mel_frames(len(chunk)))
        out = output_frames(tokens)
        if out > 0:
            windows.append(Window(item, index, chunk, tokens if padding_mask else MAX_TOKENS, out))
    return windows


@dataclass
class Batch:
    """One device call. Shapes: B windows, T packed tokens, N output frames."""

    windows: list[Window]
    waves: np.ndarray  # (B, S) float32: each window's samples, zero-padded
    keep_frames: np.ndarray  # (B,) int64: mel frames each window uses
    token_index: np.ndarray  # (T,) int64: row into the flattened (B · conv2 length) conv output
    position_index: np.ndarray  # (T,) int64: each token's position in its window
    cu_seqlens: np.ndarray  # (B+1,) int32
    pool_index: np.ndarray  # (N,) int64: packed index of the first token of each output pair
    frame_window: np.ndarray  # (N,) int64: which window (0..B-1) each output frame belongs to
    max_tokens: int = field(default=0)

    @property
    def num_tokens(self) -> int:
        return int(self.cu_seqlens[-1])

    @property
    def num_frames(self) -> int:
        return len(self.pool_index)


def padded_samples(windows: list[Window]) -> int:
    """Waveform length per row so every frame a window uses is computed as in the 30 s window.

    Frame f (centred STFT) reads samples up to f·HOP + N_FFT/2; beyond the window's audio the
    canonical waveform is zeros until N_SAMPLES, where the STFT's reflect padding starts. Two
    extra hops of zeros cover the last needed frame; at N_SAMPLES we are the canonical window.
    """
    return min(N_SAMPLES, HOP_LENGTH * (max(w.mel_needed for w in windows) + 2))


def make_batch(windows: list[Window]) -> Batch:
    B = len(windows)
    S = padded_samples(windows)
    waves = np.zeros((B, S), dtype=np.float32)
    n_frames = S // HOP_LENGTH
    conv_len = (n_frames - 1) // CONV_STRIDE + 1  # conv2 output length (k3, s2, p1)
    tokens = np.array([w.tokens for w in windows], dtype=np.int64)
    outs = np.array([w.out for w in windows], dtype=np.int64)
    for b, w in enumerate(windows):
        waves[b, : len(w.samples)] = w.samples
    starts = np.concatenate([[0], np.cumsum(tokens)])
    position_index = np.concatenate([np.arange(t) for t in tokens])
    token_index = np.repeat(np.arange(B) * conv_len, tokens) + position_index
    frame_window = np.repeat(np.arange(B), outs)
    frame_in_window = np.concatenate([np.arange(o) for o in outs])
    pool_index = starts[frame_window] + POOL_STRIDE * frame_in_window
    return Batch(
        windows=windows,
        waves=waves,
        keep_frames=np.array([w.mel_needed for w in windows], dtype=np.int64),
        token_index=token_index,
        position_index=position_index,
        cu_seqlens=starts.astype(np.int32),
        pool_index=pool_index,
        frame_window=frame_window,
        max_tokens=int(tokens.max()),
    )


def plan_batches(windows: list[Window], *, token_budget: int, max_windows: int) -> list[list[Window]]:
    """Longest first, greedily filled up to `token_budget` tokens and `max_windows` windows.

    The convolutions run on the padded (B, S) buffer, so the budget also bounds B · longest.
    """
    assert token_budget >= MAX_TOKENS, f"token budget {token_budget} is below one full window ({MAX_TOKENS})"
    ordered = sorted(windows, key=lambda w: (-w.tokens, w.item, w.index))
    batches, current = [], []
    for w in ordered:
        longest = current[0].tokens if current else w.tokens
        if current and (len(current) >= max_windows or (len(current) + 1) * longest > token_budget):
            batches.append(current)
            current = []
        current.append(w)
    if current:
        batches.append(current)
    return batches
