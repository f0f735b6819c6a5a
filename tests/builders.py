"""Deterministic builders for tests: tiny Qwen2-Audio checkpoints, PEFT LoRA adapters, audio.

Nothing here imports `extractor/`: these are the independent fixtures the extractor is tested against.
Every builder is seeded, so the same arguments always give the same bytes-level tensors.

Key layouts written (transformers 5.24, peft 0.21.2; see shared/QWEN2_AUDIO.md):
- checkpoint: `audio_tower.*`, `multi_modal_projector.*`, `language_model.model.*`,
  `language_model.lm_head.*` (transformers 5 renames its in-memory `model.audio_tower.*` etc. back
  to the hub layout on save).
- adapter "tf5_full":  `base_model.model.model.audio_tower.layers.N.self_attn.q_proj.lora_A.weight`
- adapter "tf4_full":  `base_model.model.audio_tower.layers.N.self_attn.q_proj.lora_A.weight`
- adapter "tower":     `base_model.model.layers.N.self_attn.q_proj.lora_A.weight`
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import zlib
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

TOWER_PREFIX = "audio_tower."
PROJECTOR_PREFIX = "multi_modal_projector."
LM_PREFIX = "language_model."

ADAPTER_LAYOUTS = ("tf5_full", "tf4_full", "tower")
AUDIO_TOKEN_ID = 7
LORA_TARGETS = ["q_proj", "k_proj", "v_proj"]
# Matches the tower's q/k/v under both transformers-4 and -5 module paths, and nothing in the LM.
TOWER_ONLY_TARGETS = r".*audio_tower.*\.(q_proj|k_proj|v_proj)"

# PEFT module-path prefixes of the tower / LM for the full-model layouts, per transformers major version.
_TF5_TOWER = "base_model.model.model.audio_tower."
_TF4_TOWER = "base_model.model.audio_tower."
_TF5_LM = "base_model.model.model.language_model."
# transformers 4 held the LM as a Qwen2ForCausalLM, so its decoder lived one level down, at `.model`.
_TF4_LM = "base_model.model.language_model.model."


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def tiny_config(*, d_model=64, encoder_layers=2, heads=4, ffn_dim=128):
    """The `Qwen2AudioConfig` used by `build_checkpoint`: a real-shaped audio front end
    (128 mel bins, 1500 positions) with the given width/depth, and a tiny Qwen2 text model."""
    from transformers import Qwen2AudioConfig

    return Qwen2AudioConfig(
        # Inside the tiny vocabulary, so the full model's forward (used to cross-check the
        # reference) can embed audio placeholder tokens; the real id 151646 would be out of range.
        audio_token_id=AUDIO_TOKEN_ID,
        audio_config=dict(
            model_type="qwen2_audio_encoder",
            num_mel_bins=128,
            max_source_positions=1500,
            d_model=d_model,
            encoder_layers=encoder_layers,
            encoder_attention_heads=heads,
            encoder_ffn_dim=ffn_dim,
        ),
        text_config=dict(
            model_type="qwen2",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            vocab_size=128,
        ),
    )


@torch.no_grad()
def _redraw_weights(model: torch.nn.Module, seed: int) -> None:
    """Replace every parameter with a seeded, non-degenerate draw.

    The default init zeroes biases and sets norms to exactly 1, which would hide bugs such as a
    dropped bias or a skipped LayerNorm. Linear/conv stds are 1/sqrt(fan_in) clamped to
    [0.02, 0.1], so activations stay O(1) at both d_model=64 and d_model=1280.
    """
    gen = torch.Generator().manual_seed(seed)

    def normal(shape, std, mean=0.0):
        return torch.randn(shape, generator=gen, dtype=torch.float32) * std + mean

    for mod_name, module in sorted(model.named_modules(), key=lambda kv: kv[0]):
        is_norm = isinstance(module, torch.nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")
        for p_name, param in sorted(module.named_parameters(recurse=False), key=lambda kv: kv[0]):
            full = f"{mod_name}.{p_name}"
            if is_norm and p_name == "weight":
                new = normal(param.shape, 0.1, mean=1.0)
            elif p_name == "bias":
                new = normal(param.shape, 0.05)
            elif full.endswith("embed_positions.weight"):
                new = normal(param.shape, 0.2)
            elif isinstance(module, torch.nn.Embedding):
                new = normal(param.shape, 0.05)
            else:
                fan_in = param[0].numel()
                new = normal(param.shape, min(0.1, max(0.02, 1.0 / math.sqrt(fan_in))))
            param.copy_(new)


def _shard_groups(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    """Greedy size-limited groups, never mixing language-model tensors with tower/projector ones,
    so the tower is readable without touching any LM shard (as in the real 7B checkpoint)."""
    tower_side = sorted(k for k in tensors if not k.startswith(LM_PREFIX))
    lm_side = sorted(k for k in tensors if k.startswith(LM_PREFIX))
    groups: list[list[str]] = []
    for keys in (tower_side, lm_side):
        current: list[str] = []
        size = 0
        for k in keys:
            nbytes = tensors[k].numel() * tensors[k].element_size()
            if current and size + nbytes > max_bytes:
                groups.append(current)
                current, size = [], 0
            current.append(k)
            size += nbytes
        if current:
            groups.append(current)
    return groups


def _reshard(path: Path, max_shard_size) -> None:
    """Rewrite the safetensors shards of `path` so every shard is tower/projector-only or LM-only.

    transformers' save_pretrained packs tensors by size only, and with the tiny LM it puts
    `language_model.*` next to `audio_tower.*` (observed in 5.24), so we cannot rely on it.
    """
    from transformers.utils.hub import convert_file_size_to_int

    index_path = path / "model.safetensors.index.json"
    if index_path.exists():
        old_index = json.loads(index_path.read_text())
        old_files = sorted(set(old_index["weight_map"].values()))
    else:
        old_index = {"metadata": {}}
        old_files = ["model.safetensors"]

    tensors: dict[str, torch.Tensor] = {}
    for name in old_files:
        tensors.update(load_file(str(path / name)))
    for name in old_files:
        (path / name).unlink()

    groups = _shard_groups(tensors, convert_file_size_to_int(max_shard_size))
    weight_map = {}
    for i, keys in enumerate(groups, start=1):
        fname = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: tensors[k].contiguous() for k in keys}, str(path / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in keys})

    metadata = dict(old_index.get("metadata", {}))
    metadata["total_size"] = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}
    index_path.write_text(json.dumps(index, indent=2) + "\n")


def shard_contents(path) -> dict[Path, list[str]]:
    """{shard file: [tensor names]} read from the shards' own headers (not the index)."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            out[f] = sorted(fh.keys())
    return out


def build_checkpoint(
    path,
    *,
    d_model=64,
    encoder_layers=2,
    heads=4,
    ffn_dim=128,
    seed=0,
    max_shard_size="200KB",
    single_file=False,
) -> Path:
    """Write a tiny random-weight Qwen2AudioForConditionalGeneration (float32) to `path`.

    Sharded safetensors with `model.safetensors.index.json`; tower+projector tensors and
    `language_model.*` tensors never share a shard, so at least one shard is LM-only.
    `single_file=True` writes one `model.safetensors` and no index instead.
    d_model=1280/heads=20/ffn_dim=5120/encoder_layers=2 (Qwen2-Audio's real width) takes a few seconds.
    """
    from transformers import Qwen2AudioForConditionalGeneration

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = tiny_config(d_model=d_model, encoder_layers=encoder_layers, heads=heads, ffn_dim=ffn_dim)
    torch.manual_seed(seed)  # the default init is overwritten, but keep construction deterministic too
    model = Qwen2AudioForConditionalGeneration(config).to(torch.float32).eval()
    _redraw_weights(model, seed)

    if single_file:
        # A shard limit above the model size makes save_pretrained write one unindexed file.
        model.save_pretrained(path, max_shard_size="100GB")
        assert (path / "model.safetensors").exists() and not (path / "model.safetensors.index.json").exists()
    else:
        model.save_pretrained(path, max_shard_size=max_shard_size)
        _reshard(path, max_shard_size)
        lm_only = [f for f, keys in shard_contents(path).items() if all(k.startswith(LM_PREFIX) for k in keys)]
        assert lm_only, "resharding must leave at least one language-model-only shard"
    return path


def corrupt_language_model_shards(path) -> list[Path]:
    """Overwrite with garbage every shard that holds no `audio_tower.` tensor; return those files.

    A job that reads only the tower must still work afterwards; transformers' full load must not.
    An unsharded checkpoint has no such shard, so nothing is touched and [] is returned.
    """
    path = Path(path)
    index_path = path / "model.safetensors.index.json"
    if not index_path.exists():
        return []
    by_file: dict[str, list[str]] = {}
    for key, fname in json.loads(index_path.read_text())["weight_map"].items():
        by_file.setdefault(fname, []).append(key)
    corrupted = []
    for fname, keys in sorted(by_file.items()):
        if any(k.startswith(TOWER_PREFIX) for k in keys):
            continue
        f = path / fname
        size = max(f.stat().st_size, 64)
        # An 8-byte little-endian header length of 0xDEADBEEF... is far past the file end.
        f.write_bytes((b"\xde\xad\xbe\xef" * (size // 4 + 1))[:size])
        corrupted.append(f)
    return corrupted


# --------------------------------------------------------------------------------------------
# LoRA adapters
# --------------------------------------------------------------------------------------------


def _canonical_module_name(peft_module_name: str) -> str:
    """Layout-independent name of a LoRA'd module: tower-relative for tower modules
    (`layers.0.self_attn.q_proj`), `language_model.`-prefixed for LM ones."""
    if "audio_tower." in peft_module_name:
        return peft_module_name.split("audio_tower.", 1)[1]
    if "language_model." in peft_module_name:
        return "language_model." + peft_module_name.split("language_model.", 1)[1]
    return peft_module_name.removeprefix("base_model.model.")


def lora_draw(name: str, in_features: int, out_features: int, r: int, seed: int):
    """Seeded (lora_A [r, in], lora_B [out, r]) for the module with canonical `name`.

    Seeding by module name makes the draw independent of module order and of the PEFT wrapping,
    so all three layouts hold identical tower tensors. lora_B is non-zero (PEFT's init zeroes it,
    which would make the adapter a no-op) and sized so that scale * B @ A changes q/k/v by ~25%.
    """
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    lora_a = torch.randn(r, in_features, generator=gen) / math.sqrt(in_features)
    lora_b = torch.randn(out_features, r, generator=gen) * 0.05
    return lora_a, lora_b


def _tf5_to_tf4_key(key: str) -> str:
    if key.startswith(_TF5_TOWER):
        return _TF4_TOWER + key[len(_TF5_TOWER):]
    if key.startswith(_TF5_LM):
        return _TF4_LM + key[len(_TF5_LM):]
    raise ValueError(f"unexpected adapter key {key!r}")


def build_adapter(
    path,
    model_dir,
    *,
    layout,
    r=4,
    alpha=8,
    seed=0,
    include_language_model=False,
    bin_format=False,
    lora_config=None,
) -> Path:
    """Write a PEFT LoRA adapter (q_proj/k_proj/v_proj) for the checkpoint in `model_dir` to `path`.

    layout:
      "tf5_full": get_peft_model over the full Qwen2AudioForConditionalGeneration;
                  keys `base_model.model.model.audio_tower.layers.N...`.
      "tf4_full": the tf5_full tensors renamed to transformers 4's layout,
                  `base_model.model.audio_tower.layers.N...` (LM: `base_model.model.language_model.model...`).
      "tower":    get_peft_model over the bare audio tower; keys `base_model.model.layers.N...`.
    Tower modules only, unless include_language_model=True (full layouts only) also LoRAs the LM's q/k/v.
    With the same seed/r the tower tensors are identical across layouts (see `lora_draw`).
    bin_format=True writes `adapter_model.bin` (torch.save of the state dict) instead of safetensors.
    lora_config: more LoraConfig arguments (use_rslora, rank_pattern, use_dora, ...).
    """
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import Qwen2AudioForConditionalGeneration

    if layout not in ADAPTER_LAYOUTS:
        raise ValueError(f"layout must be one of {ADAPTER_LAYOUTS}, got {layout!r}")
    if layout == "tower" and include_language_model:
        raise ValueError("a tower-layout adapter cannot include language-model modules")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)

    model = Qwen2AudioForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    target = LORA_TARGETS if include_language_model else TOWER_ONLY_TARGETS
    if layout == "tower":
        base, target = model.model.audio_tower, LORA_TARGETS
    else:
        base = model
    peft_model = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=target, **(lora_config or {})))

    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if isinstance(module, LoraLayer):
                base_layer = module.get_base_layer()
                a, b = lora_draw(_canonical_module_name(name), base_layer.in_features, base_layer.out_features, module.r["default"], seed)
                module.lora_A["default"].weight.copy_(a)
                module.lora_B["default"].weight.copy_(b)

    peft_model.save_pretrained(path)
    st_path = path / "adapter_model.safetensors"
    state = load_file(str(st_path))
    if layout == "tf4_full":
        state = {_tf5_to_tf4_key(k): v for k, v in state.items()}
        save_file(state, str(st_path), metadata={"format": "pt"})
    if bin_format:
        torch.save(state, path / "adapter_model.bin")
        st_path.unlink()
    return path


def load_adapter_tensors(adapter_dir) -> dict[str, torch.Tensor]:
    """The adapter's saved state dict, from adapter_model.safetensors or adapter_model.bin."""
    adapter_dir = Path(adapter_dir)
    st = adapter_dir / "adapter_model.safetensors"
    if st.exists():
        return load_file(str(st))
    return torch.load(adapter_dir / "adapter_model.bin", map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------------------------
# Audio
# --------------------------------------------------------------------------------------------


def speechlike(seconds, sr=16000, seed=0) -> np.ndarray:
    """Deterministic speech-like float32 mono signal, peak ~0.3.

    Voiced segments (0.15-0.7 s) of a harmonic source with a gliding, wobbling pitch and a smooth
    envelope, separated by pauses (0.05-0.3 s); a little breath noise in segments and a faint
    noise floor everywhere so pauses are not digital silence.
    """
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sr))
    out = np.zeros(n, dtype=np.float64)
    pos = int(rng.uniform(0.0, 0.1) * sr)
    while pos < n:
        seg = min(int(rng.uniform(0.15, 0.7) * sr), n - pos)
        if seg > 0:
            t = np.arange(seg) / sr
            f0 = rng.uniform(90, 220) * (1 + rng.uniform(-0.25, 0.25) * t / max(t[-1], 1e-3))
            f0 = f0 * (1 + 0.06 * np.sin(2 * np.pi * rng.uniform(3, 7) * t + rng.uniform(0, 2 * np.pi)))
            phase = 2 * np.pi * np.cumsum(f0) / sr
            formant = rng.uniform(400, 1200)
            voiced = np.zeros(seg)
            for k in range(1, 16):
                # A soft spectral peak at `formant` makes the spectrum vowel-like instead of flat.
                gain = (1.0 / k) * (1.0 + 2.0 * np.exp(-(((k * f0.mean()) - formant) / 300.0) ** 2))
                voiced += gain * np.sin(k * phase)
            envelope = np.sin(np.pi * np.arange(seg) / seg) ** 0.7
            segment = envelope * (voiced + 0.05 * rng.standard_normal(seg) * voiced.std())
            out[pos:pos + seg] += segment / (np.abs(segment).max() + 1e-9) * rng.uniform(0.6, 1.0)
        pos += seg + int(rng.uniform(0.05, 0.3) * sr)
    peak = np.abs(out).max()
    if peak > 0:
        out *= 0.3 / peak
    out += 0.002 * rng.standard_normal(n)
    return out.astype(np.float32)


def write_audio(path, samples, sr, subtype=None) -> Path:
    """Write `samples` ((n,) or (n, channels)) with soundfile; the suffix (.wav/.flac/.ogg) picks the format."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.asarray(samples), sr, subtype=subtype)
    return path


def speak(path, text) -> Path | None:
    """Synthesize `text` to a wav at `path` with `espeak-ng -w`; None if espeak-ng is not installed."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([exe, "-w", str(path), text], check=True, capture_output=True)
    return path

