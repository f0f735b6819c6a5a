"""Merge a PEFT LoRA adapter into the audio tower at load time, so inference pays nothing for it.

Three adapter key layouts exist in practice (shared/QWEN2_AUDIO.md):
    base_model.model.audio_tower.layers.N...        PeftModel over the full model, transformers 4
    base_model.model.model.audio_tower.layers.N...  PeftModel over the full model, transformers 5
    base_model.model.layers.N...                    PeftModel over the bare tower
They are mapped explicitly onto the bare tower's names. Keys outside the tower (the language
model's q/k/v) are dropped with a warning. The merge itself is PEFT's, so its scaling rules
(alpha / r, rsLoRA, rank and alpha patterns, DoRA) are honoured.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint import fingerprint

logger = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."
# Where the tower sits under PEFT_PREFIX in each layout, most specific first.
TOWER_PATHS = ("model.audio_tower.", "audio_tower.", "")
SAFETENSORS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
_LAYER_RE = re.compile(r"^layers\.(\d+)\.")


class AdapterError(Exception):
    """The adapter cannot be merged into this tower."""


@dataclass(frozen=True)
class MergeReport:
    modules: int
    parameters: int
    ignored_modules: int
    fingerprint: str
    description: str


def _read_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    st = adapter_dir / SAFETENSORS_FILE
    if st.exists():
        from safetensors.torch import load_file

        try:
            return load_file(st)
        except Exception as e:
            raise AdapterError(f"cannot read {st}: {e}") from e
    pkl = adapter_dir / PICKLE_FILE
    if pkl.exists():
        # Never unpickle freely: weights_only refuses anything but tensors and plain containers.
        try:
            return torch.load(pkl, map_location="cpu", weights_only=True)
        except Exception as e:
            raise AdapterError(f"refusing {pkl}: not loadable with torch.load(weights_only=True): {e}") from e
    raise AdapterError(f"{adapter_dir} has neither {SAFETENSORS_FILE} nor {PICKLE_FILE}")


def _tower_key(key: str) -> str | None:
    """The key relative to the bare tower, or None if it is outside the tower."""
    if not key.startswith(PEFT_PREFIX):
        raise AdapterError(f"adapter key {key!r} does not start with {PEFT_PREFIX!r}: not a PEFT adapter file")
    rest = key[len(PEFT_PREFIX):]
    for path in TOWER_PATHS:
        if rest.startswith(path) and _LAYER_RE.match(rest[len(path):]):
            return rest[len(path):]
    return None


def _module_of(key: str) -> str:
    # "layers.3.self_attn.q_proj.lora_A.weight" → "layers.3.self_attn.q_proj"
    return key.split(".lora_")[0]


def _strip_pattern(pattern: str) -> str:
    for path in TOWER_PATHS[:-1]:
        if pattern.startswith(path):
            return pattern[len(path):]
    return pattern


def read_adapter(adapter_dir: Path) -> tuple[dict, dict[str, torch.Tensor], int]:
    """(adapter_config, tower tensors keyed for the bare tower with PEFT's prefix, ignored module count)."""
    adapter_dir = Path(adapter_dir)
    cfg_path = adapter_dir / "adapter_config.json"
    try:
        config = json.loads(cfg_path.read_text())
    except FileNotFoundError as e:
        raise AdapterError(f"{adapter_dir} has no adapter_config.json: not a PEFT adapter directory") from e
    except (OSError, ValueError) as e:
        raise AdapterError(f"cannot read {cfg_path}: {e}") from e
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{cfg_path}: peft_type is {config.get('peft_type')!r}, expected 'LORA'")
    tower, ignored = {}, set()
    for key, tensor in _read_tensors(adapter_dir).items():
        tk = _tower_key(key)
        if tk is None:
            ignored.add(_module_of(key))
        else:
            tower[PEFT_PREFIX + tk] = tensor
    return config, tower, len(ignored)


def merge_adapter(encoder: nn.Module, adapter_dir: Path) -> tuple[nn.Module, MergeReport]:
    """Merge the adapter into `encoder` (float32 weights expected) and return the plain module."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    config, state, ignored = read_adapter(adapter_dir)
    if ignored:
        logger.warning("LoRA: ignoring %d modules outside the audio tower (e.g. the language model's)", ignored)
    if not state:
        raise AdapterError(f"{adapter_dir}: no LoRA module matches the audio tower (keys checked against {TOWER_PATHS})")
    modules = sorted({_module_of(k[len(PEFT_PREFIX):]) for k in state})
    known = dict(encoder.named_modules())
    unknown = [m for m in modules if not isinstance(known.get(m), nn.Linear)]
    if unknown:
        raise AdapterError(f"{adapter_dir}: LoRA targets modules the tower does not have as Linear layers: {unknown[:5]}")

    lora_config = LoraConfig(
        **{k: v for k, v in config.items() if k in LoraConfig.__dataclass_fields__ and k not in ("target_modules", "modules_to_save", "layers_to_transform", "layers_pattern", "base_model_name_or_path", "task_type", "inference_mode", "peft_type", "rank_pattern", "alpha_pattern")},
        target_modules=modules,
        rank_pattern={_strip_pattern(k): v for k, v in (config.get("rank_pattern") or {}).items()},
        alpha_pattern={_strip_pattern(k): v for k, v in (config.get("alpha_pattern") or {}).items()},
    )
    peft_model = get_peft_model(encoder, lora_config)
    try:
        result = set_peft_model_state_dict(peft_model, state)
    except RuntimeError as e:  # size mismatch: an adapter trained on another tower shape
        raise AdapterError(f"{adapter_dir}: adapter tensors do not fit the tower: {e}") from e
    missing_lora = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing_lora:
        raise AdapterError(
            f"{adapter_dir}: adapter tensors do not fit the tower: unexpected {list(result.unexpected_keys)[:5]}, missing {missing_lora[:5]}"
        )
    merged = peft_model.merge_and_unload()

    parameters = sum(t.numel() for t in state.values())
    targeted = set(modules)
    kinds = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in known if n in targeted))  # model order: q, k, v
    layers = len({_LAYER_RE.match(m).group(1) for m in modules})
    if all(k.endswith("_proj") for k in kinds):
        names = "/".join(k.removesuffix("_proj") for k in kinds) + "_proj"
    else:
        names = "/".join(kinds)
    description = f"{len(modules)} modules ({names} × {layers} layers), {parameters:,} parameters"
    h = hashlib.sha256(fingerprint(state).encode())
    for key in ("r", "lora_alpha", "use_rslora", "use_dora", "fan_in_fan_out", "rank_pattern", "alpha_pattern"):
        h.update(f"{key}={json.dumps(config.get(key), sort_keys=True)};".encode())
    report = MergeReport(len(modules), parameters, ignored, h.hexdigest(), description)
    logger.info("LoRA: %s", description)
    return merged, report
