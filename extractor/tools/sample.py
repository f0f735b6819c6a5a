"""A built-in sample: a tiny random-weight Qwen2-Audio checkpoint, a LoRA adapter and generated audio.

It lets the real job run end to end on a CPU in seconds. Its vectors are meaningless: the weights
are random. Only the shapes, the file layouts and the code path are real.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf
import torch

logger = logging.getLogger(__name__)

# (name, seconds, sample rate, channels): short and long clips, several rates, a stereo file.
SAMPLE_CLIPS = [
    ("short_0.4s.wav", 0.4, 16_000, 1),
    ("speech_2s.flac", 2.0, 16_000, 1),
    ("speech_5s_44k_stereo.wav", 5.0, 44_100, 2),
    ("speech_8s_8k.flac", 8.0, 8_000, 1),
    ("speech_12s.ogg", 12.0, 48_000, 1),
    ("speech_20s.flac", 20.0, 16_000, 1),
    ("long_41s.flac", 41.0, 16_000, 1),  # two 30 s windows
]


def speechlike(seconds: float, sr: int, seed: int) -> np.ndarray:
    """Voiced bursts with a gliding pitch and pauses: enough structure for log-mel to be non-trivial."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    f0 = 110 + 60 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 6))
    phase = 2 * np.pi * np.cumsum(f0) / sr
    voiced = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = np.clip(np.sin(2 * np.pi * 1.9 * t + rng.uniform(0, 6)), 0, None) ** 2
    x = 0.25 * envelope * voiced + 0.01 * rng.standard_normal(len(t))
    return x.astype(np.float32)


def build_tiny_checkpoint(path: Path, seed: int = 0) -> None:
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration

    torch.manual_seed(seed)
    config = Qwen2AudioConfig(
        audio_config=dict(model_type="qwen2_audio_encoder", d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128),
        text_config=dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, vocab_size=128),
        audio_token_id=7,
    )
    model = Qwen2AudioForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name or "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p)) if name.endswith("weight") else p.normal_(0, 0.05)
            else:
                p.normal_(0, 0.08)
    model.save_pretrained(path, max_shard_size="200KB")


def build_tiny_adapter(model_dir: Path, path: Path, seed: int = 0) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2AudioForConditionalGeneration

    model = Qwen2AudioForConditionalGeneration.from_pretrained(model_dir)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=r".*audio_tower.*\.(q_proj|k_proj|v_proj)")
    peft_model = get_peft_model(model, lora)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    peft_model.save_pretrained(path)


def build_sample(root: Path) -> dict[str, Path]:
    root = Path(root)
    audio = root / "audio"
    audio.mkdir(parents=True, exist_ok=True)
    paths = {"model": root / "model", "adapter": root / "adapter", "manifest": root / "manifest.parquet", "audio": audio}
    build_tiny_checkpoint(paths["model"])
    build_tiny_adapter(paths["model"], paths["adapter"])
    rows = []
    for i, (name, seconds, sr, channels) in enumerate(SAMPLE_CLIPS):
        x = speechlike(seconds, sr, seed=i)
        data = np.stack([x, 0.5 * x], axis=1) if channels == 2 else x
        sf.write(audio / name, data, sr)
        rows.append({"id": f"clip-{i:03d}", "path": str(audio / name), "source": name.split(".")[-1]})
    pq.write_table(pa.Table.from_pylist(rows), paths["manifest"])
    logger.info("sample written to %s (%d clips)", root, len(rows))
    return paths
