"""A random-weight Qwen2-Audio checkpoint in the hub layout, and a LoRA adapter for its tower.

The checkpoint is what the job reads in production, minus the 7B language model: a full-size
audio tower (or a tiny one for smoke runs), the projector and a tiny Qwen2 text model, in sharded
bfloat16 safetensors with model.safetensors.index.json, keys `audio_tower.*`,
`multi_modal_projector.*`, `language_model.model.*`, `language_model.lm_head.*` (what
transformers 5's save_pretrained writes; see shared/QWEN2_AUDIO.md).

We never run transformers' random init (minutes on CPU at full size): the model is built on the
meta device only to learn its tensor names and shapes, and the tensors are drawn directly, on
the GPU when there is one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

FULL_AUDIO = {"d_model": 1280, "encoder_layers": 32, "encoder_attention_heads": 20, "encoder_ffn_dim": 5120}
TINY_AUDIO = {"d_model": 64, "encoder_layers": 2, "encoder_attention_heads": 4, "encoder_ffn_dim": 256}
# The language model is never used for embeddings; a tiny one keeps the checkpoint small while
# the file still has language-model shards the job must skip.
TINY_TEXT = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
             "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 256}
WEIGHT_STD = 0.02  # every matrix, embedding and bias; norm weights are 1 + this
VERSION = 1  # bump when the recipe changes, so a cached checkpoint is rebuilt

# transformers 5 in-memory names → hub names (checked against save_pretrained of 5.24).
_TO_HUB = (
    ("model.audio_tower.", "audio_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
)
TOWER_QKV = ("q_proj", "k_proj", "v_proj")
# What PEFT records for a tower-only adapter trained over the full model (it would also hit the
# language model's q/k/v with a plain list).
TOWER_QKV_REGEX = r".*audio_tower.*\.(q_proj|k_proj|v_proj)"


def make_config(audio: dict):
    from transformers import Qwen2AudioConfig

    config = Qwen2AudioConfig(
        audio_config={"model_type": "qwen2_audio_encoder", "num_mel_bins": 128, "max_source_positions": 1500, **audio},
        text_config=TINY_TEXT,
    )
    config.architectures = ["Qwen2AudioForConditionalGeneration"]
    config.dtype = torch.bfloat16
    return config


def _hub_name(name: str) -> str:
    for prefix, hub in _TO_HUB:
        if name.startswith(prefix):
            return hub + name[len(prefix):]
    raise RuntimeError(f"don't know the hub name of {name!r}: has transformers changed its module layout?")


def _is_norm(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")


def _stamp_matches(path: Path, params: dict) -> bool:
    stamp = path / "_bench.json"
    return stamp.exists() and json.loads(stamp.read_text()) == params


def _write_stamp(path: Path, params: dict) -> None:
    (path / "_bench.json").write_text(json.dumps(params, indent=2))


def build_checkpoint(path: Path, audio: dict, *, seed: int = 0, max_shard_bytes: int = 1 << 30, device: str = "cpu") -> dict:
    """Write the checkpoint to `path` (reused when an identical one is there); return its stats."""
    path = Path(path)
    # The device is part of the recipe: CPU and CUDA generators draw different numbers.
    params = {"audio": audio, "text": TINY_TEXT, "seed": seed, "max_shard_bytes": max_shard_bytes, "device": torch.device(device).type, "version": VERSION}
    if _stamp_matches(path, params):
        return {"path": str(path), "reused": True, **json.loads((path / "_stats.json").read_text())}
    path.mkdir(parents=True, exist_ok=True)
    for old in path.glob("*.safetensors"):
        old.unlink()
    from transformers import Qwen2AudioForConditionalGeneration  # seconds: only when building

    config = make_config(audio)
    with torch.device("meta"):
        model = Qwen2AudioForConditionalGeneration(config)
    modules = dict(model.named_modules())

    # Draw every tensor in name order from one seeded generator: same seed and device, same weights.
    gen = torch.Generator(device).manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, meta in sorted(model.state_dict().items()):
        module = modules[name.rsplit(".", 1)[0]]
        mean = 1.0 if _is_norm(module) and name.endswith(".weight") else 0.0
        t = torch.randn(meta.shape, generator=gen, device=device) * WEIGHT_STD + mean
        tensors[_hub_name(name)] = t.to(torch.bfloat16).cpu()
    del model

    # Shards never mix the language model with the tower/projector, as in the real checkpoint:
    # the job must be able to read the tower without touching a language-model shard.
    groups: list[list[str]] = []
    for side in (sorted(k for k in tensors if not k.startswith("language_model.")),
                 sorted(k for k in tensors if k.startswith("language_model."))):
        current, size = [], 0
        for key in side:
            nbytes = tensors[key].numel() * tensors[key].element_size()
            if current and size + nbytes > max_shard_bytes:
                groups.append(current)
                current, size = [], 0
            current.append(key)
            size += nbytes
        groups.append(current)
    weight_map = {}
    for i, keys in enumerate(groups, start=1):
        fname = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: tensors[k] for k in keys}, str(path / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in keys})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config.save_pretrained(path)

    stats = {
        "tower_parameters": sum(t.numel() for k, t in tensors.items() if k.startswith("audio_tower.")),
        "total_parameters": sum(t.numel() for t in tensors.values()),
        "shards": len(groups),
        "bytes": total,
        **{f"audio_{k}": v for k, v in audio.items()},
    }
    (path / "_stats.json").write_text(json.dumps(stats, indent=2))
    _write_stamp(path, params)
    return {"path": str(path), "reused": False, **stats}


def build_adapter(path: Path, model_dir: Path, audio: dict, *, r: int = 16, alpha: int = 32, seed: int = 1) -> dict:
    """A tower-only LoRA on q/k/v in the transformers-5 full-model layout
    (`base_model.model.model.audio_tower.layers.N.self_attn.q_proj.lora_A.weight`)."""
    from peft import LoraConfig

    path = Path(path)
    params = {"audio": audio, "r": r, "alpha": alpha, "seed": seed, "version": VERSION}
    if _stamp_matches(path, params):
        return {"path": str(path), "reused": True, **json.loads((path / "_stats.json").read_text())}
    path.mkdir(parents=True, exist_ok=True)

    d, layers = audio["d_model"], audio["encoder_layers"]
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for layer in range(layers):
        for proj in TOWER_QKV:
            base = f"base_model.model.model.audio_tower.layers.{layer}.self_attn.{proj}"
            # A like PEFT's init; B non-zero (PEFT zeroes it, which would make the adapter a
            # no-op): scale * B @ A then changes q/k/v by ~10% at full size.
            state[f"{base}.lora_A.weight"] = torch.randn(r, d, generator=gen) / math.sqrt(d)
            state[f"{base}.lora_B.weight"] = torch.randn(d, r, generator=gen) * 0.01
    save_file(state, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=0.0, bias="none", target_modules=TOWER_QKV_REGEX,
        base_model_name_or_path=str(model_dir),
    ).save_pretrained(str(path))

    stats = {"modules": layers * len(TOWER_QKV), "tensors": len(state), "parameters": sum(t.numel() for t in state.values()), "r": r, "lora_alpha": alpha}
    (path / "_stats.json").write_text(json.dumps(stats, indent=2))
    _write_stamp(path, params)
    return {"path": str(path), "reused": False, **stats}
