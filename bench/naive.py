"""The naive recipe, as a user writes it today with Hugging Face and PEFT: the speedup's baseline.

WhisperFeatureExtractor(feature_size=128) on the CPU with every clip padded to 30 s, PEFT's LoRA
left UNMERGED in a PeftModel over transformers' Qwen2AudioEncoder, SDPA, batch 8, one batch at a
time. The padding mask is built the way Qwen2AudioForConditionalGeneration builds it, and each
clip's embedding is the mean of its valid output frames, so the result is the same function the
job computes (run.py compares the two).
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path

import numpy as np
import torch

SR = 16_000


def load_tower_state(model_dir: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's `audio_tower.*` tensors, without the prefix; other shards are not opened."""
    from safetensors import safe_open

    weight_map = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]
    shards: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        if key.startswith("audio_tower."):
            shards.setdefault(shard, []).append(key)
    state = {}
    for shard, keys in sorted(shards.items()):
        with safe_open(str(model_dir / shard), framework="pt") as f:
            for key in keys:
                state[key[len("audio_tower."):]] = f.get_tensor(key)
    return state


def build_peft_encoder(model_dir: Path, adapter_dir: Path, device: torch.device, dtype: torch.dtype):
    """(PeftModel with the adapter loaded and unmerged, the bare encoder under it)."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import Qwen2AudioConfig
    from transformers.models.qwen2_audio.modeling_qwen2_audio import Qwen2AudioEncoder

    cfg = Qwen2AudioConfig.from_pretrained(str(model_dir)).audio_config
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):  # no random init: the checkpoint's tensors are assigned next
        encoder = Qwen2AudioEncoder(cfg)
    encoder.load_state_dict(load_tower_state(model_dir), strict=True, assign=True)
    leftover = [n for n, t in encoder.state_dict().items() if t.is_meta]
    if leftover:
        raise RuntimeError(f"encoder tensors not loaded from the checkpoint: {leftover[:5]}")

    lora_config = LoraConfig.from_pretrained(str(adapter_dir))
    # The saved target_modules name the full model's path (model.audio_tower...); over the bare
    # encoder the same modules are plainly q/k/v_proj.
    lora_config.target_modules = ["q_proj", "k_proj", "v_proj"]
    lora_config.inference_mode = True
    lora_config.base_model_name_or_path = None  # PEFT would warn that it renames it
    model = get_peft_model(encoder, lora_config)
    # Adapter keys are in the transformers-5 full-model layout; PeftModel over the bare encoder
    # wants `base_model.model.layers.N...`.
    state = {
        k.replace("base_model.model.model.audio_tower.", "base_model.model."): v
        for k, v in load_file(str(adapter_dir / "adapter_model.safetensors")).items()
    }
    result = set_peft_model_state_dict(model, state)
    missing_lora = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing_lora:
        raise RuntimeError(f"adapter does not fit the encoder: unexpected {list(result.unexpected_keys)[:5]}, missing {missing_lora[:5]}")
    return model.to(device=device, dtype=dtype).eval(), encoder


def _embed_batch(model, encoder, fe, batch: list[np.ndarray], device: torch.device, dtype: torch.dtype, padding_mask: bool = True) -> tuple[torch.Tensor, float]:
    """(mean of each clip's valid output frames, seconds spent in the feature extractor).

    padding_mask=False is the seed's and shared/reference/anchor_bench.py's call,
    `audio_tower(input_features)`: no mask, which lets SDPA take its fastest kernel (the 1,197
    audio-s/s of the shared notes was measured that way).
    """
    from transformers.masking_utils import create_bidirectional_mask

    t_fe = time.perf_counter()
    f = fe(batch, sampling_rate=SR, return_tensors="pt", padding="max_length", return_attention_mask=True)
    fe_seconds = time.perf_counter() - t_fe
    feats = f.input_features.to(device, dtype)
    feat_lens, out_lens = encoder._get_feat_extract_output_lengths(f.attention_mask.to(device).sum(-1))
    tokens = feats.shape[-1] // 2
    mask_2d = (torch.arange(tokens, device=device)[None, :] < feat_lens[:, None]).long()
    mask = create_bidirectional_mask(
        config=encoder.config, inputs_embeds=torch.zeros(len(batch), tokens, 1, device=device, dtype=dtype), attention_mask=mask_2d
    )
    h = model(feats, attention_mask=mask if padding_mask else None).last_hidden_state.float()
    valid = (torch.arange(h.shape[1], device=device)[None, :] < out_lens[:, None]).float()
    return ((h * valid[..., None]).sum(1) / out_lens[:, None]).cpu(), fe_seconds


def run_naive(model_dir: Path, adapter_dir: Path, paths: list[str], device: torch.device, dtype: torch.dtype,
              batch_size: int = 8, log=print, padding_mask: bool = True) -> dict:
    import soundfile as sf
    from transformers import WhisperFeatureExtractor

    # Decoding is kept out of the timed loop: the baseline is the feature extractor + model only.
    clips = [sf.read(p, dtype="float32")[0] for p in paths]
    audio_s = sum(len(c) for c in clips) / SR
    fe = WhisperFeatureExtractor(feature_size=128, sampling_rate=SR)
    t = time.perf_counter()
    model, encoder = build_peft_encoder(Path(model_dir), Path(adapter_dir), device, dtype)
    log(f"naive: PeftModel (unmerged LoRA) over Qwen2AudioEncoder on {device} in {str(dtype).removeprefix('torch.')} "
        f"built in {time.perf_counter() - t:.1f} s")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with torch.inference_mode():
        _embed_batch(model, encoder, fe, clips[:batch_size], device, dtype, padding_mask)  # warm-up: kernels chosen, memory pools grown
        sync()
        t = time.perf_counter()
        results = [_embed_batch(model, encoder, fe, clips[i:i + batch_size], device, dtype, padding_mask) for i in range(0, len(clips), batch_size)]
        sync()
        seconds = time.perf_counter() - t
    embeddings = torch.cat([emb for emb, _ in results]).numpy()

    del model, encoder  # the job runs next on the same GPU
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "clips": len(clips),
        "audio_seconds": audio_s,
        "seconds": seconds,
        "audio_seconds_per_second": audio_s / seconds,
        "feature_extractor_seconds": sum(fe_s for _, fe_s in results),
        "batch_size": batch_size,
        "padding_mask": padding_mask,
        "dtype": str(dtype).removeprefix("torch."),
        "embeddings": embeddings,
    }
