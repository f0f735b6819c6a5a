"""Adapter layouts, merging through PEFT, and the refusals (issue 2, --adapter)."""

from __future__ import annotations

import json
import logging
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from builders import build_adapter
from extractor.lora import AdapterError, read_adapter
from extractor.model import load_model


@pytest.mark.parametrize("layout", ["tf5_full", "tf4_full", "tower"])
def test_layouts_map_to_the_same_tower_tensors(adapter_factory, layout):
    _, reference, _ = read_adapter(adapter_factory("tf5_full"))
    _, state, ignored = read_adapter(adapter_factory(layout))
    assert ignored == 0
    assert state.keys() == reference.keys() and len(state) == 12  # 2 layers × q/k/v × A/B
    assert all(torch.equal(state[k], reference[k]) for k in state)


def test_merge_is_logged_with_counts(tiny_model, tiny_adapter, caplog):
    with caplog.at_level(logging.INFO, logger="extractor.lora"):
        model = load_model(tiny_model, tiny_adapter, torch.device("cpu"), torch.float32)
    assert "LoRA: 6 modules (q/k/v_proj × 2 layers), 3,072 parameters" in caplog.text  # r=4: 4·64·2 per module
    assert model.adapter.parameters == 3072


def test_language_model_modules_are_ignored_with_a_warning(tmp_path, tiny_model, caplog):
    adapter = build_adapter(tmp_path / "a", tiny_model, layout="tf5_full", include_language_model=True)
    with caplog.at_level(logging.WARNING, logger="extractor.lora"):
        model = load_model(tiny_model, adapter, torch.device("cpu"), torch.float32)
    assert model.adapter.modules == 6 and model.adapter.ignored_modules == 3  # LM: 1 layer × q/k/v
    assert "ignoring 3 modules outside the audio tower" in caplog.text


def test_adapter_matching_nothing_is_an_error(tmp_path, tiny_model):
    adapter = build_adapter(tmp_path / "a", tiny_model, layout="tf5_full", include_language_model=True)
    path = adapter / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(path).items() if "audio_tower" not in k}, path)
    with pytest.raises(AdapterError, match="no LoRA module matches the audio tower"):
        load_model(tiny_model, adapter, torch.device("cpu"), torch.float32)


def test_adapter_for_another_shape_is_an_error(tmp_path, tiny_model, checkpoint_factory):
    wide = checkpoint_factory(d_model=96, heads=6, ffn_dim=192)
    adapter = build_adapter(tmp_path / "a", wide, layout="tower")
    with pytest.raises(AdapterError, match="do not fit"):
        load_model(tiny_model, adapter, torch.device("cpu"), torch.float32)


def test_bin_adapter_loads_with_weights_only(tmp_path, tiny_model, tiny_adapter, adapter_factory):
    adapter = build_adapter(tmp_path / "bin", tiny_model, layout="tf5_full", bin_format=True)
    assert (adapter / "adapter_model.bin").exists() and not (adapter / "adapter_model.safetensors").exists()
    a = load_model(tiny_model, adapter, torch.device("cpu"), torch.float32)
    b = load_model(tiny_model, tiny_adapter, torch.device("cpu"), torch.float32)
    assert a.adapter.fingerprint == b.adapter.fingerprint


class Boom:
    def __reduce__(self):
        return (exec, ("raise SystemExit('unpickled!')",))


def test_pickle_with_code_is_refused(tmp_path, tiny_model, tiny_adapter):
    adapter = tmp_path / "evil"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text((tiny_adapter / "adapter_config.json").read_text())
    with open(adapter / "adapter_model.bin", "wb") as f:
        pickle.dump({"base_model.model.layers.0.self_attn.q_proj.lora_A.weight": Boom()}, f)
    with pytest.raises(AdapterError, match="weights_only"):
        load_model(tiny_model, adapter, torch.device("cpu"), torch.float32)


def test_non_lora_adapter_is_refused(tmp_path, tiny_model, tiny_adapter):
    adapter = tmp_path / "ia3"
    adapter.mkdir()
    cfg = json.loads((tiny_adapter / "adapter_config.json").read_text())
    cfg["peft_type"] = "IA3"
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="expected 'LORA'"):
        load_model(tiny_model, adapter, torch.device("cpu"), torch.float32)


def test_merging_changes_the_weights_by_peft_scaling(tiny_model, tiny_adapter):
    """W' = W + (alpha / r) · B @ A, as PEFT defines it; q also carries the 1/sqrt(head_dim) fold."""
    base = load_model(tiny_model, None, torch.device("cpu"), torch.float32)
    merged = load_model(tiny_model, tiny_adapter, torch.device("cpu"), torch.float32)
    _, state, _ = read_adapter(tiny_adapter)
    cfg = json.loads((tiny_adapter / "adapter_config.json").read_text())
    scaling = cfg["lora_alpha"] / cfg["r"]
    A = state["base_model.model.layers.1.self_attn.v_proj.lora_A.weight"]
    B = state["base_model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    d = base.cfg.d_model
    delta = merged.encoder.layers[1].self_attn.qkv_weight[2 * d :] - base.encoder.layers[1].self_attn.qkv_weight[2 * d :]
    torch.testing.assert_close(delta, scaling * B @ A, rtol=1e-4, atol=1e-6)
