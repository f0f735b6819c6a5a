"""Log-mel spectrogram identical to WhisperFeatureExtractor(feature_size=128), batched in torch.

Runs wherever the waveforms are (CPU or GPU). Each row of the batch is one window's samples
zero-padded to the batch's length; `keep_frames` says how many frames each window uses. The
window's maximum (for the 8-decade floor) is taken over those frames only, which equals the
canonical maximum over the full 30 s window: the frames we skip hold only zero padding, whose
log-mel is the floor value -10 and can never be the maximum of a window that also has audio.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from .constants import HOP_LENGTH, LOG_MEL_DYNAMIC_RANGE, MEL_FLOOR, N_FFT, SAMPLE_RATE


@functools.lru_cache(maxsize=None)
def _mel_filters_np(n_mels: int) -> np.ndarray:
    # The same Slaney filter bank the feature extractor builds, from the same function.
    from transformers.audio_utils import mel_filter_bank

    return mel_filter_bank(
        num_frequency_bins=1 + N_FFT // 2,
        num_mel_filters=n_mels,
        min_frequency=0.0,
        max_frequency=SAMPLE_RATE / 2,
        sampling_rate=SAMPLE_RATE,
        norm="slaney",
        mel_scale="slaney",
    ).astype(np.float32)  # (n_freq, n_mels)


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
        stft = torch.stft(waves, N_FFT, HOP_LENGTH, window=self.window, center=True, pad_mode="reflect", return_complex=True)
        power = stft[..., :-1].abs() ** 2  # the extractor drops the last frame
        log_spec = torch.clamp(self.filters @ power, min=MEL_FLOOR).log10()  # (B, n_mels, F)
        frame = torch.arange(log_spec.shape[-1], device=log_spec.device)
        keep = frame[None, :] < keep_frames[:, None]  # (B, F)
        peak = log_spec.masked_fill(~keep[:, None, :], -torch.inf).amax(dim=(1, 2), keepdim=True)
        log_spec = torch.maximum(log_spec, peak - LOG_MEL_DYNAMIC_RANGE)
        log_spec = (log_spec + 4.0) / 4.0
        return log_spec.masked_fill(~keep[:, None, :], 0.0)
