"""Log-mel spectrogram identical to WhisperFeatureExtractor(feature_size=128), batched in torch.

Runs wherever the waveforms are (CPU or GPU). Each row of the batch is one window's samples
zero-padded to the batch's length; `keep_frames` says how many frames each window uses. The
window's maximum (for the 8-decade floor) is taken over those frames only, which equals the
canonical maximum over the full 30 s window: the frames we skip hold only zero padding, whose
log-mel is the floor value -10 and can never be the maximum of a window that also has audio.

The STFT is torch.stft's own arithmetic (reflect padding, Hann window, one real FFT per frame), but
its FFTs always run in chunks of FFT_FRAMES frames. cuFFT makes a plan for every new batch shape,
and making one waits for everything queued on the GPU: ~30 ms on an H100, in which the device
loop's thread holds the interpreter, the GPU's queue runs dry and no other thread of the job runs.
Every batch of the job has its own shape, so torch.stft paid that on every batch; with one chunk
shape there is one plan, made once. The result is bit-identical to torch.stft (tests/model).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from ..constants import HOP_LENGTH, LOG_MEL_DYNAMIC_RANGE, MEL_FLOOR, N_FFT, SAMPLE_RATE

FFT_FRAMES = 16_384  # frames per FFT call: one plan for every batch (26 MB of windowed frames)


def _slaney_mel(hz: np.ndarray) -> np.ndarray:
    mel = 3.0 * hz / 200.0
    log = hz >= 1000.0
    mel[log] = 15.0 + np.log(hz[log] / 1000.0) * (27.0 / np.log(6.4))
    return mel


def _slaney_hz(mel: np.ndarray) -> np.ndarray:
    hz = 200.0 * mel / 3.0
    log = mel >= 15.0
    hz[log] = 1000.0 * np.exp(np.log(6.4) / 27.0 * (mel[log] - 15.0))
    return hz


@functools.lru_cache(maxsize=None)
def _mel_filters_np(n_mels: int) -> np.ndarray:
    """The Slaney-normalised, Slaney-scale filter bank WhisperFeatureExtractor builds (with
    transformers.audio_utils.mel_filter_bank, float64, then float32 here), operation for operation:
    tests/test_encoder.py checks it equals that function's output exactly. Not imported from
    transformers: that import takes seconds, on the job's start-up path."""
    n_freq = 1 + N_FFT // 2
    edges = _slaney_hz(np.linspace(_slaney_mel(np.array([0.0]))[0], _slaney_mel(np.array([SAMPLE_RATE / 2]))[0], n_mels + 2))
    fft_freqs = np.linspace(0, SAMPLE_RATE // 2, n_freq)
    slopes = edges[None, :] - fft_freqs[:, None]
    diff = np.diff(edges)
    filters = np.maximum(np.zeros(1), np.minimum(-slopes[:, :-2] / diff[:-1], slopes[:, 2:] / diff[1:]))
    filters *= (2.0 / (edges[2 : n_mels + 2] - edges[:n_mels]))[None, :]
    return filters.astype(np.float32)  # (n_freq, n_mels)


class LogMel(torch.nn.Module):
    def __init__(self, n_mels: int, device: torch.device | str = "cpu"):
        super().__init__()
        self.register_buffer("filters", torch.from_numpy(_mel_filters_np(n_mels)).T.contiguous().to(device))
        self.register_buffer("window", torch.hann_window(N_FFT, device=device))  # periodic, as the extractor's

    @torch.no_grad()
    def forward(self, waves: torch.Tensor, keep_frames: torch.Tensor) -> torch.Tensor:
        """waves: (B, N) float32 → (B, n_mels, N // HOP_LENGTH) float32.

        keep_frames: (B,) int; frames at or past it are set to 0, which is what the encoder's
        conv1 sees as padding past the canonical 3000-frame window.
        """
        stft = self.stft(waves)  # (B, N_FFT // 2 + 1, N // HOP_LENGTH + 1) complex
        power = stft[..., :-1].abs() ** 2  # the extractor drops the last frame
        log_spec = torch.clamp(self.filters @ power, min=MEL_FLOOR).log10()  # (B, n_mels, F)
        frame = torch.arange(log_spec.shape[-1], device=log_spec.device)
        keep = frame[None, :] < keep_frames[:, None]  # (B, F)
        peak = log_spec.masked_fill(~keep[:, None, :], -torch.inf).amax(dim=(1, 2), keepdim=True)
        log_spec = torch.maximum(log_spec, peak - LOG_MEL_DYNAMIC_RANGE)
        log_spec = (log_spec + 4.0) / 4.0
        return log_spec.masked_fill(~keep[:, None, :], 0.0)

    def stft(self, waves: torch.Tensor, frames_per_fft: int | None = None) -> torch.Tensor:
        """torch.stft(waves, N_FFT, HOP_LENGTH, window, center=True, pad_mode="reflect"), with its
        FFTs in fixed chunks of `frames_per_fft` frames (default: FFT_FRAMES on CUDA; on the CPU,
        where plans cost nothing, all frames in one call): (B, N) → (B, N_FFT // 2 + 1, N // HOP_LENGTH + 1)."""
        B = waves.shape[0]
        padded = torch.nn.functional.pad(waves[:, None], (N_FFT // 2, N_FFT // 2), mode="reflect")[:, 0]
        frames = padded.unfold(-1, N_FFT, HOP_LENGTH)  # (B, F, N_FFT), a view
        F = frames.shape[1]
        M = B * F
        size = frames_per_fft or (FFT_FRAMES if waves.is_cuda else M)
        chunks = -(-M // size)
        windowed = torch.empty(chunks * size, N_FFT, dtype=waves.dtype, device=waves.device)
        torch.mul(frames, self.window, out=windowed[:M].view(B, F, N_FFT))
        windowed[M:].zero_()  # the last chunk's unused frames: transformed, never read
        out = torch.empty(chunks * size, N_FFT // 2 + 1, dtype=torch.complex64, device=waves.device)
        for a in range(0, chunks * size, size):
            torch.fft.rfft(windowed[a : a + size], out=out[a : a + size])
        return out[:M].view(B, F, N_FFT // 2 + 1).transpose(1, 2)
