"""Loading reads only the tower (issue 2, acceptance 2)."""

from __future__ import annotations

import json

import pytest
import safetensors
import torch

from builders import build_checkpoint, corrupt_language_model_shards
from extractor.model.checkpoint import fingerprint, read_tower_tensors, upload_tower
from extractor.model.config import CheckpointError, read_config
from extractor.model.load import load_model


def test_garbage_language_model_shard_still_loads(tmp_path):
    ckpt = build_checkpoint(tmp_path / "ckpt")
    before = read_tower_tensors(ckpt)
    fp_before = fingerprint(before)
    corrupted = corrupt_language_model_shards(ckpt)
    assert corrupted, "the builder must produce a language-model-only shard"
    after = read_tower_tensors(ckpt)
    fp_after = fingerprint(after)
    assert fp_after == fp_before
    assert all(torch.equal(before[k], after[k]) for k in before)
    load_model(ckpt, None, torch.device("cpu"), torch.float32)  # the whole load path


def test_missing_language_model_shard_still_loads(tmp_path):
    ckpt = build_checkpoint(tmp_path / "ckpt")
    for shard in corrupt_language_model_shards(ckpt):
        shard.unlink()
    state = read_tower_tensors(ckpt)
    assert "layers.0.self_attn.q_proj.weight" in state


def test_only_tower_tensors_are_read(tmp_path, monkeypatch):
    ckpt = build_checkpoint(tmp_path / "ckpt")
    requested = []
    real_open = safetensors.safe_open

    class Spy:
        def __init__(self, *a, **kw):
            self._f = real_open(*a, **kw)

        def __enter__(self):
            self._f.__enter__()
            return self

        def __exit__(self, *exc):
            return self._f.__exit__(*exc)

        def keys(self):
            return self._f.keys()

        def get_tensor(self, key):
            requested.append(key)
            return self._f.get_tensor(key)

    monkeypatch.setattr("extractor.model.checkpoint.safe_open", Spy)
    state = read_tower_tensors(ckpt)
    assert requested and all(k.startswith("audio_tower.") for k in requested)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(requested) == sum(k.startswith("audio_tower.") for k in index) == len(state)


def test_single_file_checkpoint(tmp_path):
    ckpt = build_checkpoint(tmp_path / "ckpt", single_file=True)
    state = read_tower_tensors(ckpt)
    assert state and all(not k.startswith("audio_tower.") for k in state)


def test_shape_comes_from_config(checkpoint_factory):
    cfg = read_config(checkpoint_factory(d_model=96, heads=6, ffn_dim=192, encoder_layers=3))
    assert (cfg.d_model, cfg.encoder_layers, cfg.encoder_attention_heads, cfg.encoder_ffn_dim) == (96, 3, 6, 192)


def test_fingerprint_changes_with_weights(checkpoint_factory):
    a = fingerprint(read_tower_tensors(checkpoint_factory(seed=0)))
    b = fingerprint(read_tower_tensors(checkpoint_factory(seed=1)))
    assert a != b


@pytest.mark.parametrize("damage", ["no_config", "not_qwen2_audio", "no_weights", "config_mismatch"])
def test_bad_checkpoints_are_refused(tmp_path, damage):
    ckpt = build_checkpoint(tmp_path / "ckpt")
    cfg_path = ckpt / "config.json"
    if damage == "no_config":
        cfg_path.unlink()
    elif damage == "not_qwen2_audio":
        cfg_path.write_text(json.dumps({"model_type": "llama"}))
    elif damage == "no_weights":
        for f in ckpt.glob("*.safetensors*"):
            f.unlink()
    elif damage == "config_mismatch":
        cfg = json.loads(cfg_path.read_text())
        cfg["audio_config"]["encoder_layers"] = 3
        cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError):
        load_model(ckpt, None, torch.device("cpu"), torch.float32)


def _same_state(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


@pytest.mark.parametrize("single_file", [False, True])
def test_upload_reads_the_same_tensors_as_safetensors(tmp_path, single_file):
    """checkpoint.upload_tower reads the tower's byte ranges itself (on the CPU straight into
    place; on a GPU through pinned buffers, tests/test_gpu.py): the same tensors as safetensors."""
    ckpt = build_checkpoint(tmp_path / "ckpt", single_file=single_file)
    assert _same_state(upload_tower(ckpt, torch.device("cpu")), read_tower_tensors(ckpt))


def test_upload_of_a_bfloat16_checkpoint_with_unaligned_tensors(tmp_path):
    """bf16 tensors of odd sizes between float32 ones: views that cannot start at their offset are copied."""
    from safetensors.torch import save_file

    tensors = {"audio_tower.a": torch.randn(3, dtype=torch.bfloat16), "audio_tower.b": torch.randn(5, 7),
               "audio_tower.c": torch.randn(1, 3).to(torch.bfloat16), "audio_tower.d": torch.arange(3, dtype=torch.int64),
               "language_model.x": torch.randn(11)}
    (tmp_path / "ckpt").mkdir()
    save_file(tensors, tmp_path / "ckpt" / "model.safetensors")
    got = upload_tower(tmp_path / "ckpt", torch.device("cpu"))
    assert _same_state(got, {k.removeprefix("audio_tower."): v for k, v in tensors.items() if k.startswith("audio_tower.")})


@pytest.mark.parametrize("single_file", [False, True])
def test_a_truncated_tower_file_is_a_checkpoint_error_on_either_path(tmp_path, single_file):
    ckpt = build_checkpoint(tmp_path / "ckpt", single_file=single_file)
    (path, *_) = [f for f in sorted(ckpt.glob("*.safetensors")) if any(k.startswith("audio_tower.") for k in safetensors.safe_open(f, "pt").keys())]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    for read in (read_tower_tensors, lambda c: upload_tower(c, torch.device("cpu"))):
        with pytest.raises(CheckpointError, match=path.name):
            read(ckpt)
