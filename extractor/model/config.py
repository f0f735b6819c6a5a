"""What a run can know about the model and the adapter from their JSON files alone: no torch.

So a bad configuration is refused before any weight is read (exit 2), a rerun with nothing to do
never imports torch, and the command's `--help` stays fast.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from ..constants import MAX_TOKENS
from ..errors import ConfigError

_log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SAFETENSORS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"
TOWER_PREFIX = "audio_tower."
PEFT_PREFIX = "base_model.model."


class CheckpointError(ConfigError):
    """The checkpoint cannot give us an audio tower (exit 2)."""


class AdapterError(ConfigError):
    """The adapter cannot be merged into this tower (exit 2)."""


@dataclass(frozen=True)
class EncoderConfig:
    """The tower's shape, from config.json's `audio_config`."""

    d_model: int
    encoder_layers: int
    encoder_attention_heads: int
    encoder_ffn_dim: int
    num_mel_bins: int
    max_source_positions: int

    @property
    def head_dim(self) -> int:
        return self.d_model // self.encoder_attention_heads

    @classmethod
    def from_dict(cls, audio_config: dict, where: str = "audio_config") -> EncoderConfig:
        """Qwen2AudioEncoderConfig's defaults for what a hub config omits; every size checked."""
        defaults = dict(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
                        num_mel_bins=128, max_source_positions=1500)
        sizes = {}
        for name, default in defaults.items():
            value = audio_config.get(name, default)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise CheckpointError(f"{where}: {name} is {value!r}, expected a positive integer")
            sizes[name] = value
        if sizes["d_model"] % sizes["encoder_attention_heads"]:
            raise CheckpointError(f"{where}: d_model {sizes['d_model']} is not divisible by encoder_attention_heads {sizes['encoder_attention_heads']}")
        if sizes["max_source_positions"] < MAX_TOKENS:
            raise CheckpointError(f"{where}: max_source_positions {sizes['max_source_positions']} is below the {MAX_TOKENS} "
                                  "positions a 30 s window needs")
        activation = audio_config.get("activation_function", "gelu")
        if activation != "gelu":
            raise CheckpointError(f"{where}: unsupported activation_function {activation!r} (only 'gelu')")
        return cls(**sizes)  # scale_embedding is not read: Qwen2AudioEncoder.forward never applies it


def read_json(path: Path, error: type[ConfigError], what: str) -> dict:
    try:
        d = json.loads(Path(path).read_text())
    except FileNotFoundError as e:
        raise error(f"{path.parent} has no {path.name}: {what}") from e
    except (OSError, ValueError) as e:
        raise error(f"cannot read {path}: {e}") from e
    if not isinstance(d, dict):
        raise error(f"{path} is not a JSON object")
    return d


def read_config(model_dir: Path) -> EncoderConfig:
    path = Path(model_dir) / CONFIG_FILE
    config = read_json(path, CheckpointError, "not a Hugging Face checkpoint directory")
    if not isinstance(config.get("audio_config"), dict):
        raise CheckpointError(f"{path} has no audio_config: not a Qwen2-Audio checkpoint (model_type={config.get('model_type')!r})")
    return EncoderConfig.from_dict(config["audio_config"], f"{path} audio_config")


def tower_files(model_dir: Path) -> list[Path]:
    """The checkpoint files that hold the tower (by the index, without opening any shard)."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_FILE
    if index.exists():
        weight_map = read_json(index, CheckpointError, "").get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no weight_map")
        shards = sorted({f for k, f in weight_map.items() if k.startswith(TOWER_PREFIX)})
        if not shards:
            raise CheckpointError(f"{model_dir} holds no {TOWER_PREFIX}* tensors (by {INDEX_FILE})")
        return [model_dir / f for f in shards]
    if (model_dir / SINGLE_FILE).exists():
        return [model_dir / SINGLE_FILE]
    raise CheckpointError(f"{model_dir} has neither {INDEX_FILE} nor {SINGLE_FILE}")


# --- the tower's byte ranges in a safetensors file, read without torch or safetensors -----------

HEADER_MAX_BYTES = 100 << 20  # safetensors' own limit
COALESCE_BYTES = 1 << 20  # tower tensors closer than this are read as one range (the gap is read too)
# Bytes per element of the safetensors dtypes this job reads without safetensors (checkpoint.upload_tower).
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def tower_layout(path: Path) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    """The tower's tensors in one safetensors file, {key: (dtype, shape, begin, end)} with absolute
    byte offsets checked against the file's size; ValueError for a header this reader does not trust (the
    caller then reads through safetensors, which reports what is wrong)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError("no safetensors header")
        (n,) = struct.unpack("<Q", head)
        if not 0 < n <= min(HEADER_MAX_BYTES, size - 8):
            raise ValueError(f"implausible header size {n}")
        header = json.loads(f.read(n))
    base = 8 + n
    layout = {}
    for key, v in header.items():
        if not key.startswith(TOWER_PREFIX):
            continue
        dtype, shape, (lo, hi) = v["dtype"], tuple(int(d) for d in v["shape"]), v["data_offsets"]
        itemsize = ITEMSIZE.get(dtype)
        if itemsize is None or not 0 <= lo <= hi <= size - base or hi - lo != math.prod(shape) * itemsize:
            raise ValueError(f"{key}: {dtype} {shape} at [{lo}, {hi}) does not fit the file")
        layout[key] = (dtype, shape, base + lo, base + hi)
    return layout


FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # what a tower's tensors may be stored as
_LAYER = re.compile(r"^layers\.(\d+)\.")


def tower_shapes(cfg: EncoderConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of Qwen2AudioEncoder's state dict (without `audio_tower.`) and the shape its
    config gives it; tests/model keep it equal to the encoder module's own."""
    d, f, mels = cfg.d_model, cfg.encoder_ffn_dim, cfg.num_mel_bins
    shapes = {"conv1.weight": (d, mels, 3), "conv1.bias": (d,), "conv2.weight": (d, d, 3), "conv2.bias": (d,),
              "embed_positions.weight": (cfg.max_source_positions, d), "layer_norm.weight": (d,), "layer_norm.bias": (d,)}
    for i in range(cfg.encoder_layers):
        p = f"layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (d, d), p + "self_attn.q_proj.bias": (d,), p + "self_attn.k_proj.weight": (d, d),
                       p + "self_attn.v_proj.weight": (d, d), p + "self_attn.v_proj.bias": (d,), p + "self_attn.out_proj.weight": (d, d),
                       p + "self_attn.out_proj.bias": (d,), p + "self_attn_layer_norm.weight": (d,), p + "self_attn_layer_norm.bias": (d,),
                       p + "fc1.weight": (f, d), p + "fc1.bias": (f,), p + "fc2.weight": (d, f), p + "fc2.bias": (d,),
                       p + "final_layer_norm.weight": (d,), p + "final_layer_norm.bias": (d,)})
    return shapes


def check_tower(model_dir: Path, cfg: EncoderConfig) -> None:
    """Refuse, from the safetensors headers alone (no tensor is read), a config that the checkpoint
    does not hold (its layers, its widths) or a tower whose tensors are not floating point (a
    quantized checkpoint): the model is built from the config, and an absurd one (a billion
    layers) would grow memory without end before any weight is compared with it. A header this
    reader does not trust is left to the load, which reads through safetensors and says why."""
    found: dict[str, tuple[str, tuple[int, ...]]] = {}
    for path in tower_files(Path(model_dir)):
        try:
            layout = tower_layout(path)
        except (OSError, ValueError, KeyError, TypeError):
            return
        found.update({k[len(TOWER_PREFIX):]: (dtype, shape) for k, (dtype, shape, _, _) in layout.items()})
    where = f"{model_dir}: audio_config"
    layers = {int(m.group(1)) for k in found if (m := _LAYER.match(k))}
    if len(layers) != cfg.encoder_layers:
        raise CheckpointError(f"{where}.encoder_layers is {cfg.encoder_layers}, but the checkpoint holds {len(layers)} layers of the "
                              "audio tower")
    expected = tower_shapes(cfg)
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{where} does not match the tower's tensors: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, shape in expected.items():
        dtype, got = found[key]
        if dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{model_dir}: {TOWER_PREFIX}{key} is stored as {dtype}, not floating point (a quantized "
                                  f"checkpoint?); the tower is read as {', '.join(FLOAT_DTYPES)}")
        if got != shape:
            raise CheckpointError(f"{where} says {TOWER_PREFIX}{key} is {shape}, the checkpoint holds {got}")


def coalesce(spans, gap: int = COALESCE_BYTES) -> list[tuple[int, int]]:
    """[begin, end) byte spans merged where less than `gap` apart, in file order."""
    ranges: list[list[int]] = []
    for lo, hi in sorted(spans):
        if ranges and lo - ranges[-1][1] <= gap:
            ranges[-1][1] = max(ranges[-1][1], hi)
        else:
            ranges.append([lo, hi])
    return [(lo, hi) for lo, hi in ranges if hi > lo]


# ---------------------------------------------------------------------------------------------
# The adapter's config and PEFT's scaling rules
# ---------------------------------------------------------------------------------------------

# Config entries that make a merge something other than W + scaling · B @ A: PEFT merges those.
NEEDS_PEFT = ("use_dora", "lora_bias")
# Config entries this job does not merge at all (another kind of adapter, or modules outside q/k/v).
UNSUPPORTED = ("fan_in_fan_out", "layer_replication", "target_parameters", "use_qalora", "alora_invocation_tokens",
               "trainable_token_indices", "modules_to_save")


@dataclass(frozen=True)
class AdapterConfig:
    path: Path
    raw: dict
    r: int
    lora_alpha: float
    use_rslora: bool
    rank_pattern: dict
    alpha_pattern: dict

    @property
    def needs_peft(self) -> bool:
        """DoRA or LoRA biases: merged by PEFT itself (imported only then)."""
        return any(self.raw.get(k) for k in NEEDS_PEFT) or self.raw.get("bias", "none") != "none"

    def rank_and_alpha(self, module_key: str) -> tuple[int, float]:
        """PEFT's r and alpha for a module, by its name in the model the adapter was trained on
        (peft.tuners.lora.model._create_and_replace with peft.utils.other.get_pattern_key)."""
        r = self.rank_pattern.get(_pattern_key(self.rank_pattern, module_key), self.r)
        alpha = self.alpha_pattern.get(_pattern_key(self.alpha_pattern, module_key), self.lora_alpha)
        return r, alpha

    def scaling(self, module_key: str) -> float:
        """PEFT's scaling for a module: alpha / r, or alpha / sqrt(r) with rsLoRA (LoraLayer.update_layer)."""
        r, alpha = self.rank_and_alpha(module_key)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _pattern_key(patterns: dict, key: str) -> str:
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", key):
            return pattern
    return key


def _finite_number(value, name: str, where: Path) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise AdapterError(f"{where}: {name} is {value!r}, expected a finite number")
    return float(value)


def _positive_int(value, name: str, where: Path) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise AdapterError(f"{where}: {name} is {value!r}, expected a positive integer")
    return value


def read_adapter_config(adapter_dir: Path) -> AdapterConfig:
    """adapter_config.json, checked: a LoRA, finite alphas, positive ranks, nothing we cannot merge."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    raw = read_json(path, AdapterError, "not a PEFT adapter directory")
    if raw.get("peft_type") != "LORA":
        raise AdapterError(f"{path}: peft_type is {raw.get('peft_type')!r}, expected 'LORA'")
    unsupported = [k for k in UNSUPPORTED if raw.get(k)]
    if unsupported:
        raise AdapterError(f"{path}: {unsupported[0]}={raw[unsupported[0]]!r} is not supported (a LoRA on q/k/v-like Linear layers is)")
    rank_pattern, alpha_pattern = raw.get("rank_pattern") or {}, raw.get("alpha_pattern") or {}
    if not isinstance(rank_pattern, dict) or not isinstance(alpha_pattern, dict):
        raise AdapterError(f"{path}: rank_pattern and alpha_pattern must be objects")
    _check_training_fields(raw, path)
    cfg = AdapterConfig(
        path=Path(adapter_dir), raw=raw,
        r=_positive_int(raw.get("r"), "r", path),
        lora_alpha=_finite_number(raw.get("lora_alpha"), "lora_alpha", path),
        use_rslora=bool(raw.get("use_rslora", False)),
        rank_pattern={k: _positive_int(v, f"rank_pattern[{k!r}]", path) for k, v in rank_pattern.items()},
        alpha_pattern={k: _finite_number(v, f"alpha_pattern[{k!r}]", path) for k, v in alpha_pattern.items()},
    )
    return cfg


# PEFT's names for init_lora_weights (peft.tuners.lora.config.LoraConfig), beside True and False.
INIT_LORA_WEIGHTS = ("gaussian", "eva", "olora", "pissa", "corda", "loftq", "orthogonal")


def _check_training_fields(raw: dict, path: Path) -> None:
    """Fields that only training reads, checked as PEFT would check them: a merge does not use
    them, but PEFT builds its config from them (DoRA and biases are merged by PEFT), and a value
    PEFT cannot take is a damaged adapter_config.json, refused here rather than as a traceback
    after the model has loaded."""
    dropout = raw.get("lora_dropout", 0.0)
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0.0 <= dropout < 1.0:
        raise AdapterError(f"{path}: lora_dropout is {dropout!r}, expected a number in [0, 1)")
    init = raw.get("init_lora_weights", True)
    if not isinstance(init, bool) and not (isinstance(init, str) and (init in INIT_LORA_WEIGHTS or init.startswith("pissa_niter_"))):
        raise AdapterError(f"{path}: init_lora_weights is {init!r}, expected true, false or one of {', '.join(INIT_LORA_WEIGHTS)}")
    if init == "loftq" and not raw.get("loftq_config"):
        raise AdapterError(f"{path}: init_lora_weights is 'loftq' but loftq_config is empty (PEFT requires it)")


def adapter_weights_file(adapter_dir: Path) -> Path:
    for name in (ADAPTER_SAFETENSORS, ADAPTER_PICKLE):
        if (Path(adapter_dir) / name).exists():
            return Path(adapter_dir) / name
    raise AdapterError(f"{adapter_dir} has neither {ADAPTER_SAFETENSORS} nor {ADAPTER_PICKLE}")


# ---------------------------------------------------------------------------------------------
# Stat signatures: has a file changed since we last looked?
# ---------------------------------------------------------------------------------------------

# A file modified this recently may still change within its mtime's granularity ("racy git"):
# its signature is not trusted for caching.
RACY_S = 2.0
FINGERPRINT_CACHE = "fingerprints"  # under the cache directory: stat signature → fingerprint


def stat_signature(paths: list[Path], *, racy_ok: bool = False) -> str | None:
    """SHA-256 over (resolved path, size, mtime_ns, inode, device) of each file; None if any file
    is missing, or (unless racy_ok) was modified in the last RACY_S seconds. Like make, rsync and
    git's index, it assumes that a file rewritten in place gets a new mtime or size."""
    h = hashlib.sha256()
    now = time.time()
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            return None
        if not racy_ok and now - st.st_mtime < RACY_S:
            return None
        h.update(f"{os.path.realpath(p)}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}|{st.st_dev};".encode())
    return h.hexdigest()


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qwen2-audio-embeddings"


def cached_fingerprint(files: list[Path]) -> str | None:
    """The fingerprint computed earlier for these files, if none changed since (stat signature)."""
    sig = stat_signature(files)
    if sig is None:
        return None
    try:
        value = (cache_dir() / FINGERPRINT_CACHE / sig).read_text().strip()
    except OSError:
        return None
    return value if len(value) == 64 else None


def remember_fingerprint(files: list[Path], value: str) -> None:
    """Cache a fingerprint against the files' stat signature; a cache that cannot be written is skipped."""
    sig = stat_signature(files)
    if sig is None:
        return
    folder = cache_dir() / FINGERPRINT_CACHE
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{sig}.{os.getpid()}"
        tmp.write_text(value)
        os.replace(tmp, folder / sig)
    except OSError as e:
        _log.debug("cannot cache the fingerprint in %s: %s", folder, e)
