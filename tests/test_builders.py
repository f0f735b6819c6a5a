"""Tests of the test-support code: builders, canonical reference, fixtures."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors import safe_open

from builders import (
    AUDIO_TOKEN_ID,
    build_checkpoint,
    corrupt_language_model_shards,
    load_adapter_tensors,
    shard_contents,
    speak,
    speechlike,
    write_audio,
)
from canonical import WINDOW_SAMPLES, canonical_embedding, canonical_frames, cosine, load_canonical

LAYERS = 2
QKV = ("q_proj", "k_proj", "v_proj")

# Per tower layer: q (w,b), k (w), v (w,b), out_proj (w,b), 2 LayerNorms (w,b), fc1/fc2 (w,b).
TOWER_KEYS_PER_LAYER = 15
# conv1/conv2 (w,b), embed_positions, final layer_norm (w,b).
TOWER_KEYS_OUTSIDE_LAYERS = 7

ADAPTER_PREFIX = {
    "tf5_full": "base_model.model.model.audio_tower.layers.",
    "tf4_full": "base_model.model.audio_tower.layers.",
    "tower": "base_model.model.layers.",
}


def _index(model_dir):
    return json.loads((model_dir / "model.safetensors.index.json").read_text())


def _canonical_lora_key(key: str) -> str:
    """`layers.0.self_attn.q_proj.lora_A.weight` from any layout's tower key."""
    for prefix in ADAPTER_PREFIX.values():
        if key.startswith(prefix):
            return "layers." + key[len(prefix):]
    raise AssertionError(f"not a tower LoRA key: {key}")


# ---------------------------------------------------------------- checkpoints


def test_checkpoint_key_layout(tiny_model):
    keys = set(_index(tiny_model)["weight_map"])
    tower = {k for k in keys if k.startswith("audio_tower.")}
    projector = {k for k in keys if k.startswith("multi_modal_projector.")}
    lm = {k for k in keys if k.startswith("language_model.")}
    assert tower | projector | lm == keys
    assert len(tower) == TOWER_KEYS_OUTSIDE_LAYERS + LAYERS * TOWER_KEYS_PER_LAYER
    assert projector == {"multi_modal_projector.linear.weight", "multi_modal_projector.linear.bias"}
    assert all(k.startswith(("language_model.model.", "language_model.lm_head.")) for k in lm)
    assert "language_model.lm_head.weight" in lm
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in lm
    for name in ("conv1.weight", "conv2.bias", "embed_positions.weight", "layer_norm.weight",
                 "layers.1.self_attn.k_proj.weight", "layers.1.self_attn.out_proj.bias", "layers.0.fc2.weight"):
        assert "audio_tower." + name in tower
    assert "audio_tower.layers.0.self_attn.k_proj.bias" not in tower  # Whisper's k_proj has no bias


def test_checkpoint_index_matches_shards_and_weights_are_not_degenerate(tiny_model):
    weight_map = _index(tiny_model)["weight_map"]
    contents = shard_contents(tiny_model)
    from_headers = {k: f.name for f, keys in contents.items() for k in keys}
    assert from_headers == weight_map
    for f, keys in contents.items():
        with safe_open(str(f), framework="pt") as fh:
            for k in keys:
                t = fh.get_tensor(k)
                assert t.dtype == torch.float32
                assert t.std() > 0.01, k
                if k.endswith("bias"):
                    assert t.abs().max() > 0, k


def test_sharding_separates_language_model(tiny_model):
    contents = shard_contents(tiny_model)
    assert len(contents) >= 2
    lm_only = [f for f, keys in contents.items() if all(k.startswith("language_model.") for k in keys)]
    assert lm_only
    for f, keys in contents.items():
        has_lm = any(k.startswith("language_model.") for k in keys)
        assert not has_lm or f in lm_only, f"{f.name} mixes LM and tower/projector tensors"


def test_corruption_breaks_transformers_but_not_tower_shards(tmp_path):
    from transformers import Qwen2AudioForConditionalGeneration

    model_dir = build_checkpoint(tmp_path / "m")
    before = shard_contents(model_dir)
    tower_files = {f for f, keys in before.items() if any(k.startswith("audio_tower.") for k in keys)}
    corrupted = corrupt_language_model_shards(model_dir)
    assert corrupted and set(corrupted) == set(before) - tower_files
    for f in tower_files:  # still readable
        with safe_open(str(f), framework="pt") as fh:
            assert list(fh.keys()) == before[f]
    with pytest.raises(Exception):
        Qwen2AudioForConditionalGeneration.from_pretrained(model_dir)


def test_single_file_checkpoint(checkpoint_factory, tiny_model):
    model_dir = checkpoint_factory(single_file=True)
    assert (model_dir / "model.safetensors").exists()
    assert not (model_dir / "model.safetensors.index.json").exists()
    assert corrupt_language_model_shards(model_dir) == []
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as fh:
        single = {k: fh.get_tensor(k) for k in fh.keys()}
    assert set(single) == set(_index(tiny_model)["weight_map"])
    # Same seed, same weights, whatever the file layout.
    with safe_open(str(next(f for f, k in shard_contents(tiny_model).items() if "audio_tower.conv1.weight" in k)),
                   framework="pt") as fh:
        assert torch.equal(fh.get_tensor("audio_tower.conv1.weight"), single["audio_tower.conv1.weight"])


def test_full_width_checkpoint_builds_fast(tmp_path):
    start = time.perf_counter()
    model_dir = build_checkpoint(tmp_path / "wide", d_model=1280, heads=20, ffn_dim=5120, encoder_layers=2)
    elapsed = time.perf_counter() - start
    assert elapsed < 20, f"building the 1280-wide checkpoint took {elapsed:.1f}s"
    config = json.loads((model_dir / "config.json").read_text())["audio_config"]
    assert (config["d_model"], config["encoder_attention_heads"], config["encoder_ffn_dim"]) == (1280, 20, 5120)
    contents = shard_contents(model_dir)
    assert any(all(k.startswith("language_model.") for k in keys) for keys in contents.values())
    with safe_open(str(next(f for f, k in contents.items() if "audio_tower.layers.1.fc1.weight" in k)),
                   framework="pt") as fh:
        assert fh.get_slice("audio_tower.layers.1.fc1.weight").get_shape() == [5120, 1280]


# ---------------------------------------------------------------- adapters


@pytest.mark.parametrize("layout", ["tf5_full", "tf4_full", "tower"])
def test_adapter_key_layout(adapter_factory, layout):
    adapter_dir = adapter_factory(layout)
    tensors = load_adapter_tensors(adapter_dir)
    prefix = ADAPTER_PREFIX[layout]
    expected = {
        f"{prefix}{layer}.self_attn.{proj}.lora_{ab}.weight"
        for layer in range(LAYERS) for proj in QKV for ab in "AB"
    }
    assert set(tensors) == expected  # 6 LoRA modules, 12 tensors
    assert len({k.rsplit(".lora_", 1)[0] for k in tensors}) == 6
    for k, t in tensors.items():
        assert t.shape == ((4, 64) if ".lora_A." in k else (64, 4))
        assert t.abs().max() > 0, k  # lora_B is drawn non-zero
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8)


def test_adapter_with_language_model(adapter_factory):
    tf5 = load_adapter_tensors(adapter_factory("tf5_full", include_language_model=True))
    tf4 = load_adapter_tensors(adapter_factory("tf4_full", include_language_model=True))
    assert len(tf5) == len(tf4) == 12 + 6  # + the LM's 1 layer x q/k/v x A/B
    assert "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight" in tf5
    assert "base_model.model.language_model.model.layers.0.self_attn.q_proj.lora_A.weight" in tf4
    tower5 = {k for k in tf5 if "audio_tower" in k}
    assert tower5 == set(load_adapter_tensors(adapter_factory("tf5_full")))
    with pytest.raises(ValueError):
        adapter_factory("tower", include_language_model=True)


def test_tower_lora_tensors_identical_across_layouts(adapter_factory):
    by_layout = {
        layout: {_canonical_lora_key(k): v for k, v in load_adapter_tensors(adapter_factory(layout)).items()}
        for layout in ("tf5_full", "tf4_full", "tower")
    }
    ref = by_layout["tf5_full"]
    for layout, tensors in by_layout.items():
        assert tensors.keys() == ref.keys()
        for k in ref:
            assert torch.equal(tensors[k], ref[k]), (layout, k)
    other_seed = load_adapter_tensors(adapter_factory("tf5_full", seed=1))
    assert not torch.equal(next(iter(other_seed.values())), next(iter(load_adapter_tensors(
        adapter_factory("tf5_full")).values())))


def test_bin_format_adapter(adapter_factory, tiny_model):
    adapter_dir = adapter_factory("tf5_full", bin_format=True)
    assert (adapter_dir / "adapter_model.bin").exists()
    assert not (adapter_dir / "adapter_model.safetensors").exists()
    bin_tensors = load_adapter_tensors(adapter_dir)
    st_tensors = load_adapter_tensors(adapter_factory("tf5_full"))
    assert bin_tensors.keys() == st_tensors.keys()
    assert all(torch.equal(bin_tensors[k], st_tensors[k]) for k in st_tensors)
    # PEFT reads .bin adapters too.
    ref = load_canonical(tiny_model, adapter_dir, "tf5_full")
    lora_b = [p for n, p in ref.tower.named_parameters() if "lora_B" in n]
    assert len(lora_b) == 6 and all(p.abs().max() > 0 for p in lora_b)


def test_tf4_adapter_is_a_silent_noop_in_peft_so_canonical_refuses_it(adapter_factory, tiny_model):
    """Documents why load_canonical refuses tf4_full: PEFT 0.21 + transformers 5 only warn about
    missing keys and leave lora_B at zero. If this starts failing, PEFT learned to remap keys."""
    from peft import PeftModel
    from transformers import Qwen2AudioForConditionalGeneration

    tf4 = adapter_factory("tf4_full")
    with pytest.raises(ValueError):
        load_canonical(tiny_model, tf4, "tf4_full")
    model = Qwen2AudioForConditionalGeneration.from_pretrained(tiny_model)
    with pytest.warns(UserWarning, match="missing adapter keys"):
        peft_model = PeftModel.from_pretrained(model, tf4)
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert len(lora_b) == 6 and all(p.abs().max() == 0 for p in lora_b)


# ---------------------------------------------------------------- canonical reference


def test_adapter_changes_embedding_and_layouts_agree(tiny_model, tiny_ref, tiny_ref_adapted, adapter_factory):
    audio = speechlike(4.0, seed=3)
    plain = canonical_embedding(tiny_ref, audio)
    adapted = canonical_embedding(tiny_ref_adapted, audio)
    assert cosine(plain, adapted) < 0.9999
    # The bare-tower adapter with the same seed is the same function.
    tower_ref = load_canonical(tiny_model, adapter_factory("tower"), "tower")
    np.testing.assert_allclose(canonical_embedding(tower_ref, audio), adapted, rtol=1e-5, atol=1e-6)


def test_padding_mask_changes_short_clip(tiny_ref):
    audio = speechlike(2.0, seed=4)
    masked = canonical_frames(tiny_ref, audio)
    unmasked = canonical_frames(tiny_ref, audio, padding_mask=False)
    assert masked.shape == unmasked.shape == (50, 64)
    assert cosine(masked.mean(0), unmasked.mean(0)) < 0.99


def test_31s_is_frame_weighted_mean_of_two_windows(tiny_ref):
    audio = speechlike(31.0, seed=5)
    first = canonical_frames(tiny_ref, audio[:WINDOW_SAMPLES])
    second = canonical_frames(tiny_ref, audio[WINDOW_SAMPLES:])
    assert (len(first), len(second)) == (750, 25)
    frames = canonical_frames(tiny_ref, audio)
    np.testing.assert_array_equal(frames, np.concatenate([first, second]))
    by_hand = (first.astype(np.float64).sum(0) + second.astype(np.float64).sum(0)) / (750 + 25)
    np.testing.assert_allclose(canonical_embedding(tiny_ref, audio), by_hand, rtol=1e-5, atol=1e-6)
    # Not the unweighted mean of the two window means.
    naive = (first.mean(0) + second.mean(0)) / 2
    assert not np.allclose(by_hand, naive, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize(
    "samples, frames",
    [(0, 0), (160, 0), (320, 0), (321, 1), (16000, 25), (WINDOW_SAMPLES, 750), (WINDOW_SAMPLES + 320, 750),
     (WINDOW_SAMPLES + 321, 751)],
)
def test_frame_counts(tiny_ref, samples, frames):
    audio = speechlike(samples / 16000 + 0.01, seed=6)[:samples]
    assert canonical_frames(tiny_ref, audio).shape == (frames, 64)


def test_canonical_matches_full_model_forward(tiny_ref_adapted):
    """Cross-check against Qwen2AudioModel.forward itself: run the PEFT-wrapped full model on a
    batch of two clips and capture what its audio tower returns."""
    ref = tiny_ref_adapted
    clips = [speechlike(1.3, seed=7), speechlike(5.0, seed=8)]
    inputs = ref.feature_extractor(clips, sampling_rate=16000, padding="max_length",
                                   return_attention_mask=True, return_tensors="pt")
    counts = [len(canonical_frames(ref, c)) for c in clips]
    n_tokens = max(counts)
    input_ids = torch.full((2, n_tokens), 1)
    attention_mask = torch.zeros((2, n_tokens), dtype=torch.long)
    for i, n in enumerate(counts):  # left padding, as the model defaults to
        input_ids[i, n_tokens - n:] = AUDIO_TOKEN_ID
        attention_mask[i, n_tokens - n:] = 1
    captured = {}

    def keep_output(module, args, output):  # must return None, or it would replace the output
        captured["h"] = output.last_hidden_state

    handle = ref.tower.register_forward_hook(keep_output)
    try:
        with torch.no_grad():
            ref.peft_model(input_ids=input_ids, attention_mask=attention_mask,
                           input_features=inputs["input_features"],
                           feature_attention_mask=inputs["attention_mask"])
    finally:
        handle.remove()
    for i, clip in enumerate(clips):
        np.testing.assert_allclose(captured["h"][i, :counts[i]].numpy(), canonical_frames(ref, clip),
                                   rtol=1e-5, atol=1e-5)


def test_cosine():
    assert cosine([1, 0], [1, 0]) == pytest.approx(1.0)
    assert cosine([1, 0], [0, 2]) == pytest.approx(0.0)
    assert cosine([1, 1], [-1, -1]) == pytest.approx(-1.0)


# ---------------------------------------------------------------- audio


def test_speechlike_is_deterministic_and_speechlike():
    a = speechlike(3.0, seed=0)
    assert a.dtype == np.float32 and a.shape == (48000,)
    np.testing.assert_array_equal(a, speechlike(3.0, seed=0))
    assert not np.array_equal(a, speechlike(3.0, seed=1))
    assert 0.25 < np.abs(a).max() < 0.35
    # Pauses: some 20 ms blocks are near the noise floor, others are loud.
    rms = np.sqrt((a[: len(a) // 320 * 320].reshape(-1, 320) ** 2).mean(1))
    assert (rms < 0.01).mean() > 0.1 and (rms > 0.05).mean() > 0.3


@pytest.mark.parametrize("suffix, tol", [(".wav", 1e-4), (".flac", 1e-4), (".ogg", 0.1)])
def test_write_audio_roundtrip(tmp_path, suffix, tol):
    mono = speechlike(1.0, seed=2)
    stereo = np.stack([mono, -mono], axis=1)
    for name, samples in (("mono", mono), ("stereo", stereo)):
        path = write_audio(tmp_path / f"{name}{suffix}", samples, 16000)
        data, sr = sf.read(str(path), dtype="float32")
        assert sr == 16000 and data.shape == samples.shape
        assert np.abs(data - samples).max() < tol
    pcm16 = write_audio(tmp_path / "x.wav", mono, 22050, subtype="PCM_16")
    assert sf.info(str(pcm16)).subtype == "PCM_16" and sf.info(str(pcm16)).samplerate == 22050


def test_speak(tmp_path):
    path = speak(tmp_path / "hello.wav", "hello world")
    if path is None:
        pytest.skip("espeak-ng not installed")
    data, sr = sf.read(str(path))
    assert len(data) > sr * 0.3
