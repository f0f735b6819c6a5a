"""Merge a PEFT LoRA adapter into the audio tower at load time, so inference pays nothing for it.

Three adapter key layouts exist in practice (shared/QWEN2_AUDIO.md):
    base_model.model.audio_tower.layers.N...        PeftModel over the full model, transformers 4
    base_model.model.model.audio_tower.layers.N...  PeftModel over the full model, transformers 5
    base_model.model.layers.N...                    PeftModel over the bare tower
They are mapped explicitly onto the bare tower's names. Keys outside the tower (the language
model's q/k/v) are dropped with a warning.

One merge path: every LoRA on Linear layers merges as W + scaling · B @ A, with PEFT's scaling
rules (alpha / r, alpha / sqrt(r) with rsLoRA, r and alpha per module from rank_pattern and
alpha_pattern, matched against the module's name in the model the adapter was trained on), in
this process, without importing peft. That this equals PEFT's own merge is the tests' job
(tests/model/test_lora.py, every adapter kind in every key layout, against the canonical unmerged
PeftModel). DoRA and LoRA biases are not W + scaling · B @ A: PEFT merges those, imported then.
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

from .checkpoint import check_finite, fingerprint
from .config import PEFT_PREFIX, AdapterConfig, AdapterError, adapter_weights_file, read_adapter_config

logger = logging.getLogger(__name__)

# Where the tower sits under PEFT_PREFIX in each layout, most specific first.
TOWER_PATHS = ("model.audio_tower.", "audio_tower.", "")
_LAYER_RE = re.compile(r"^layers\.(\d+)\.")


@dataclass(frozen=True)
class MergeReport:
    modules: int
    parameters: int
    ignored_modules: int
    fingerprint: str
    description: str


@dataclass
class Adapter:
    """An adapter read and checked against a tower, before any merge."""

    config: AdapterConfig
    state: dict[str, torch.Tensor]  # PEFT_PREFIX + tower key → tensor (PEFT's names on the bare tower)
    modules: dict[str, str]  # tower module → its name in the model the adapter was trained on
    report: MergeReport

    @property
    def path(self) -> Path:
        return self.config.path


def _read_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    path = adapter_weights_file(adapter_dir)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as e:
            raise AdapterError(f"cannot read {path}: {e}") from e
    # Never unpickle freely: weights_only refuses anything but tensors and plain containers.
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise AdapterError(f"refusing {path}: not loadable with torch.load(weights_only=True): {e}") from e


def _split_key(key: str) -> tuple[str, str] | None:
    """(the module's name in the trained model, its name in the bare tower); None outside the tower."""
    if not key.startswith(PEFT_PREFIX):
        raise AdapterError(f"adapter key {key!r} does not start with {PEFT_PREFIX!r}: not a PEFT adapter file")
    module = key[len(PEFT_PREFIX):].split(".lora_")[0]
    for path in TOWER_PATHS:
        if module.startswith(path) and _LAYER_RE.match(module[len(path):]):
            return module, module[len(path):]
    return None


def _strip_pattern(pattern: str) -> str:
    for path in TOWER_PATHS[:-1]:
        if pattern.startswith(path):
            return pattern[len(path):]
    return pattern


def read_adapter(adapter_dir: Path, encoder: nn.Module) -> Adapter:
    """Read the adapter, check it against `encoder`'s Linear layers and log what will be merged."""
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    state, modules, ignored = {}, {}, set()
    tensors = _read_tensors(adapter_dir)
    check_finite(tensors, str(adapter_weights_file(adapter_dir)), AdapterError)
    for key, tensor in tensors.items():
        names = _split_key(key)
        if names is None:
            ignored.add(key[len(PEFT_PREFIX):].split(".lora_")[0])
            continue
        trained, tower = names
        modules[tower] = trained
        state[PEFT_PREFIX + tower + key[len(PEFT_PREFIX) + len(trained):]] = tensor
    if ignored:
        logger.warning("LoRA: ignoring %d modules outside the audio tower (e.g. the language model's)", len(ignored))
    if not state:
        raise AdapterError(f"{adapter_dir}: no LoRA module matches the audio tower (keys checked against {TOWER_PATHS})")
    known = dict(encoder.named_modules())
    unknown = [m for m in sorted(modules) if not isinstance(known.get(m), nn.Linear)]
    if unknown:
        raise AdapterError(f"{adapter_dir}: LoRA targets modules the tower does not have as Linear layers: {unknown[:5]}")

    report = _report(config, state, modules, ignored, list(known))
    logger.info("LoRA: %s", report.description)
    return Adapter(config, state, dict(sorted(modules.items())), report)


def _fingerprint(config: AdapterConfig, state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(fingerprint(state).encode())
    for key in ("r", "lora_alpha", "use_rslora", "use_dora", "fan_in_fan_out", "rank_pattern", "alpha_pattern"):
        h.update(f"{key}={json.dumps(config.raw.get(key), sort_keys=True)};".encode())
    return h.hexdigest()


def adapter_fingerprint(adapter_dir: Path) -> str:
    """The adapter's fingerprint as the recipe records it, without a tower to merge into."""
    config = read_adapter_config(Path(adapter_dir))
    state = {}
    for key, tensor in _read_tensors(Path(adapter_dir)).items():
        names = _split_key(key)
        if names is not None:
            trained, tower = names
            state[PEFT_PREFIX + tower + key[len(PEFT_PREFIX) + len(trained):]] = tensor
    return _fingerprint(config, state)


def _report(config: AdapterConfig, state: dict, modules: dict[str, str], ignored: set, order: list[str]) -> MergeReport:
    parameters = sum(t.numel() for t in state.values())
    kinds = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in order if n in modules))  # model order: q, k, v
    layers = len({_LAYER_RE.match(m).group(1) for m in modules})
    names = "/".join(k.removesuffix("_proj") for k in kinds) + "_proj" if all(k.endswith("_proj") for k in kinds) else "/".join(kinds)
    description = f"{len(modules)} modules ({names} × {layers} layers), {parameters:,} parameters"
    return MergeReport(len(modules), parameters, len(ignored), _fingerprint(config, state), description)


def merge_adapter(encoder: nn.Module, adapter_dir: Path) -> tuple[nn.Module, MergeReport]:
    """Merge the adapter into `encoder` (float32 weights expected); the merged plain module."""
    adapter = read_adapter(adapter_dir, encoder)
    known = dict(encoder.named_modules())
    if adapter.config.needs_peft:
        logger.info("LoRA: DoRA or LoRA biases; merged by PEFT")
        encoder = merge_with_peft(encoder, adapter)
        merged = dict(encoder.named_modules())
        weights = {m: merged[m].weight for m in adapter.modules}
    else:
        weights = {}
        with torch.no_grad():
            for module, trained in adapter.modules.items():
                r, _ = adapter.config.rank_and_alpha(trained)
                a = adapter.state.get(f"{PEFT_PREFIX}{module}.lora_A.weight")
                b = adapter.state.get(f"{PEFT_PREFIX}{module}.lora_B.weight")
                w = known[module].weight
                if a is None or b is None or a.shape != (r, w.shape[1]) or b.shape != (w.shape[0], r):
                    got = (None if a is None else tuple(a.shape), None if b is None else tuple(b.shape))
                    raise AdapterError(f"{adapter.path}: adapter tensors do not fit the tower: {module} is {tuple(w.shape)} "
                                       f"with r={r}, its lora_A/lora_B are {got}")
                # PEFT's own operation sequence (peft.tuners.lora.layer.Linear.get_delta_weight, merge).
                w += (b.to(w.device, w.dtype) @ a.to(w.device, w.dtype)) * adapter.config.scaling(trained)
                weights[module] = w
        extra = set(adapter.state) - {f"{PEFT_PREFIX}{m}.lora_{x}.weight" for m in adapter.modules for x in "AB"}
        if extra:
            raise AdapterError(f"{adapter.path}: tensors other than lora_A/lora_B in a plain LoRA: {sorted(extra)[:3]}")
    # lora_alpha 1e38 is finite, its merge is not: such weights would make every embedding NaN.
    check_finite(weights, f"{adapter.path}: merging the adapter (lora_alpha {adapter.config.lora_alpha:g})", AdapterError)
    return encoder, adapter.report


def merge_with_peft(encoder: nn.Module, adapter: Adapter) -> nn.Module:
    """PEFT's get_peft_model + set_peft_model_state_dict + merge_and_unload on `encoder`."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    config = adapter.config.raw
    skip = ("target_modules", "modules_to_save", "layers_to_transform", "layers_pattern", "base_model_name_or_path",
            "task_type", "inference_mode", "peft_type", "rank_pattern", "alpha_pattern",
            "init_lora_weights", "loftq_config")  # how training initialises the weights: these are loaded, not made
    try:
        lora_config = LoraConfig(
            **{k: v for k, v in config.items() if k in LoraConfig.__dataclass_fields__ and k not in skip},
            target_modules=list(adapter.modules),
            init_lora_weights=False,  # the weights are loaded next: no initialisation to compute
            rank_pattern={_strip_pattern(k): v for k, v in (config.get("rank_pattern") or {}).items()},
            alpha_pattern={_strip_pattern(k): v for k, v in (config.get("alpha_pattern") or {}).items()},
        )
        peft_model = get_peft_model(encoder, lora_config)
    except (ValueError, TypeError, KeyError) as e:  # PEFT's own refusal of a field: the adapter's config, not the run
        raise AdapterError(f"{adapter.path}: PEFT cannot build this adapter's config: {type(e).__name__}: {e}") from e
    try:
        result = set_peft_model_state_dict(peft_model, adapter.state)
    except RuntimeError as e:  # size mismatch: an adapter trained on another tower shape
        raise AdapterError(f"{adapter.path}: adapter tensors do not fit the tower: {e}") from e
    missing_lora = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing_lora:
        raise AdapterError(
            f"{adapter.path}: adapter tensors do not fit the tower: unexpected {list(result.unexpected_keys)[:5]}, missing {missing_lora[:5]}"
        )
    return peft_model.merge_and_unload()
