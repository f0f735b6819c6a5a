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


# --- refused from the headers, before any model is built -------------------------------------


def _job_rss(tmp_path, model, adapter=None, *extra):
    """The job as a process on a one-row manifest: (exit code, log, its peak RSS in bytes)."""
    import subprocess
    import sys
    import textwrap

    import numpy as np
    import soundfile as sf

    from jobrun import job_cmd, job_env, write_manifest

    clip = tmp_path / "a.wav"
    sf.write(clip, np.zeros(16000, np.float32), 16000)
    manifest = write_manifest(tmp_path / "m.parquet", [{"path": str(clip)}])
    cmd = job_cmd(manifest, tmp_path / "out", model, "--device", "cpu", *(["--adapter", str(adapter)] if adapter else []), *extra)
    wrapper = textwrap.dedent(f"""
        import resource, subprocess, sys
        done = subprocess.run({cmd!r}, capture_output=True, text=True, timeout=120)
        sys.stderr.write(done.stderr)
        print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
    """)
    result = subprocess.run([sys.executable, "-c", wrapper], env=job_env(), capture_output=True, text=True, timeout=180)
    code, rss = (int(x) for x in result.stdout.split())
    return code, result.stderr, rss


def _retype(ckpt, key: str, dtype) -> None:
    """Rewrite the shard holding `key` with that tensor stored as `dtype` (a quantized checkpoint)."""
    from safetensors.torch import load_file, save_file

    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    shard = ckpt / index[key]
    tensors = load_file(shard)
    tensors[key] = tensors[key].to(dtype)
    save_file(tensors, shard, metadata={"format": "pt"})


@pytest.mark.parametrize("problem", ["layers", "width", "int32"])
def test_a_config_or_tensor_the_checkpoint_does_not_hold_is_refused_before_the_model_is_built(problem, tmp_path):
    """A config the checkpoint's own index contradicts (a billion layers grew memory without end
    while the model was built) or a tower tensor that is not floating point: exit 2, naming the
    field or tensor, before any model is built, in well under 1 GB."""
    ckpt = build_checkpoint(tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    if problem == "layers":
        config["audio_config"]["encoder_layers"] = 1_000_000_000
        says = "encoder_layers is 1000000000, but the checkpoint holds 2 layers"
    elif problem == "width":
        config["audio_config"]["encoder_ffn_dim"] = 256
        says = "says audio_tower.layers.0.fc1.weight is (256, 64), the checkpoint holds (128, 64)"
    else:
        _retype(ckpt, "audio_tower.layers.1.fc2.weight", torch.int32)
        says = "audio_tower.layers.1.fc2.weight is stored as I32, not floating point"
    (ckpt / "config.json").write_text(json.dumps(config))
    code, log, rss = _job_rss(tmp_path, ckpt)
    assert code == 2 and says in log, log
    assert "model loaded" not in log and not (tmp_path / "out").exists()
    assert rss < 1e9, rss


@pytest.mark.parametrize("field, value, says", [("lora_dropout", "abc", "lora_dropout is 'abc', expected a number in [0, 1)"),
                                                ("init_lora_weights", "loftq", "init_lora_weights is 'loftq' but loftq_config is empty")])
def test_a_damaged_peft_adapter_config_is_refused_before_the_model_loads(field, value, says, tmp_path, tiny_model):
    from builders import build_adapter

    adapter = build_adapter(tmp_path / "adapter", tiny_model, layout="tf5_full", lora_config={"use_dora": True})
    config = json.loads((adapter / "adapter_config.json").read_text())
    config[field] = value
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    code, log, rss = _job_rss(tmp_path, tiny_model, adapter)
    assert code == 2 and says in log, log
    assert "model loaded" not in log and not (tmp_path / "out").exists() and rss < 1e9


@pytest.mark.parametrize("layers", [1, 3])
def test_the_shapes_a_config_gives_are_the_encoders_own(layers):
    from extractor.model.config import EncoderConfig, tower_shapes
    from extractor.model.encoder import AudioEncoder

    cfg = EncoderConfig.from_dict({"d_model": 96, "encoder_layers": layers, "encoder_attention_heads": 6, "encoder_ffn_dim": 160})
    with torch.device("meta"):
        module = AudioEncoder(cfg)
    assert tower_shapes(cfg) == {k: tuple(v.shape) for k, v in module.state_dict().items()}
