"""The canonical reference: Qwen2-Audio's audio tower run exactly as transformers + PEFT run it.

Never imports `extractor/`. The masking follows `Qwen2AudioModel.forward` in transformers 5.24
(transformers/models/qwen2_audio/modeling_qwen2_audio.py): per 30 s window, the feature
extractor's mel mask gives the mel length, `_get_feat_extract_output_lengths` gives the token and
output lengths, `create_bidirectional_mask` masks keys at token positions >= feat length, and only
the first `out` output frames are kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers.masking_utils import create_bidirectional_mask

SAMPLE_RATE = 16000
WINDOW_SAMPLES = 30 * SAMPLE_RATE

# Eager attention is the literal reference implementation (scores + additive mask, softmax). On the
# tiny model in float32 on CPU, eager was within 3.3e-7 (max abs / max) of a float64 run and SDPA
# within 4.1e-7, so eager is the closer of the two.
ATTN_IMPLEMENTATION = "eager"


@dataclass
class CanonicalRef:
    """A loaded reference. `tower` is the Qwen2AudioEncoder with any LoRA injected (unmerged)."""

    model: torch.nn.Module  # Qwen2AudioForConditionalGeneration
    tower: torch.nn.Module
    peft_model: torch.nn.Module | None
    feature_extractor: object  # WhisperFeatureExtractor(feature_size=128)

    @property
    def d_model(self) -> int:
        return self.tower.config.d_model


def load_canonical(model_dir, adapter_dir=None, adapter_layout=None) -> CanonicalRef:
    """Load the full model in float32/eval and, optionally, a PEFT LoRA adapter left unmerged.

    adapter_layout:
      "tf5_full": PeftModel over the full model (keys `base_model.model.model.audio_tower...`).
      "tower":    PeftModel over the bare audio tower (keys `base_model.model.layers...`).
      "tf4_full": refused. Its keys (`base_model.model.audio_tower...`) do not match transformers 5
                  module paths; PEFT 0.21 then loads *nothing* and only warns about missing keys,
                  leaving lora_B at zero (a silent no-op). Callers testing a tf4_full adapter use
                  the tf5_full adapter built with the same seed as the reference: `build_adapter`
                  makes their tensors identical.
    """
    from peft import PeftModel
    from transformers import Qwen2AudioForConditionalGeneration, WhisperFeatureExtractor

    model = Qwen2AudioForConditionalGeneration.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation=ATTN_IMPLEMENTATION
    ).eval()
    peft_model = None
    if adapter_dir is not None:
        if adapter_layout == "tf5_full":
            peft_model = PeftModel.from_pretrained(model, adapter_dir)
        elif adapter_layout == "tower":
            peft_model = PeftModel.from_pretrained(model.model.audio_tower, adapter_dir)
        elif adapter_layout == "tf4_full":
            raise ValueError(
                "tf4_full adapters do not load into transformers 5 module paths (PEFT silently loads "
                "nothing); use the tf5_full adapter built with the same seed as the reference"
            )
        else:
            raise ValueError(f"unknown adapter_layout {adapter_layout!r}")
        peft_model.eval()
    # PEFT injects LoRA layers in place, so the model's own tower now carries the adapter.
    tower = model.model.audio_tower
    if adapter_dir is not None:
        n_lora = sum("lora_B" in n for n, _ in tower.named_parameters())
        assert n_lora > 0, "adapter did not inject any LoRA layer into the audio tower"
    return CanonicalRef(model, tower, peft_model, WhisperFeatureExtractor(feature_size=128))


def output_lengths(ref: CanonicalRef, n_mel: int) -> tuple[int, int]:
    """(encoder tokens, output frames) for `n_mel` valid mel frames, from the tower's own formula."""
    feat, out = ref.tower._get_feat_extract_output_lengths(torch.tensor([n_mel]))
    return int(feat[0]), int(out[0])


@torch.no_grad()
def _window_frames(ref: CanonicalRef, window: np.ndarray, padding_mask: bool) -> np.ndarray:
    feats = ref.feature_extractor(
        window,
        sampling_rate=SAMPLE_RATE,
        padding="max_length",
        return_attention_mask=True,
        return_tensors="pt",
    )
    input_features = feats["input_features"].to(torch.float32)  # [1, 128, 3000]
    feature_attention_mask = feats["attention_mask"]  # [1, 3000], 1 on valid mel frames

    # As in Qwen2AudioModel.forward:
    audio_feat_lengths, audio_output_lengths = ref.tower._get_feat_extract_output_lengths(
        feature_attention_mask.sum(-1)
    )
    if padding_mask:
        batch_size, _, max_mel_seq_len = input_features.shape
        max_seq_len = (max_mel_seq_len - 2) // 2 + 1
        seq_range = (
            torch.arange(0, max_seq_len, dtype=audio_feat_lengths.dtype)
            .unsqueeze(0)
            .expand(batch_size, max_seq_len)
        )
        lengths_expand = audio_feat_lengths.unsqueeze(1).expand(batch_size, max_seq_len)
        audio_attention_mask_2d = (~(seq_range >= lengths_expand)).to(dtype=torch.long)
        dummy_embeds = torch.zeros((batch_size, max_seq_len, 1), dtype=torch.float32)
        audio_attention_mask = create_bidirectional_mask(
            config=ref.tower.config,
            inputs_embeds=dummy_embeds,
            attention_mask=audio_attention_mask_2d,
        )
        hidden = ref.tower(input_features, attention_mask=audio_attention_mask).last_hidden_state
    else:
        hidden = ref.tower(input_features).last_hidden_state
    out = int(audio_output_lengths[0])
    return hidden[0, :out].numpy()


def canonical_frames(ref: CanonicalRef, waveform_16k: np.ndarray, *, padding_mask=True) -> np.ndarray:
    """Valid output frames [n_frames, d_model] of a 16 kHz mono waveform.

    Consecutive non-overlapping 30 s windows from t=0; each is fed to the tower separately and
    contributes its first `out` frames (a window too short for any frame contributes nothing).
    padding_mask=False calls `audio_tower(input_features)` with no mask, as the seed's training
    code did: every frame then attends to the window's padding.
    """
    waveform = np.asarray(waveform_16k, dtype=np.float32)
    assert waveform.ndim == 1, "expects mono audio"
    chunks = [
        _window_frames(ref, waveform[start:start + WINDOW_SAMPLES], padding_mask)
        for start in range(0, len(waveform), WINDOW_SAMPLES)
    ]
    chunks = [c for c in chunks if len(c)]
    if not chunks:
        return np.zeros((0, ref.d_model), dtype=np.float32)
    return np.concatenate(chunks, axis=0)


def canonical_embedding(ref: CanonicalRef, waveform_16k: np.ndarray, *, padding_mask=True) -> np.ndarray:
    """Mean of `canonical_frames` over all valid frames of all windows: [d_model]."""
    frames = canonical_frames(ref, waveform_16k, padding_mask=padding_mask)
    if len(frames) == 0:
        raise ValueError("audio too short for any output frame")
    return frames.astype(np.float64).mean(axis=0).astype(np.float32)


def cosine(a, b) -> float:
    """Cosine similarity of two vectors (computed in float64)."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
