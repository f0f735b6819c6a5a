"""Adapter layouts, merging through PEFT, and the refusals (issue 2, --adapter)."""

from __future__ import annotations

import json
import logging
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from builders import build_adapter
from extractor.model.config import AdapterError
from extractor.model.encoder import AudioEncoder
from extractor.model.load import load_model
from extractor.model.lora import read_adapter


@pytest.mark.parametrize("layout", ["tf5_full", "tf4_full", "tower"])
def test_layouts_map_to_the_same_tower_tensors(adapter_factory, tiny_model, layout):
    from extractor.model.config import read_config

    with torch.device("meta"):
        encoder = AudioEncoder(read_config(tiny_model))
    reference = read_adapter(adapter_factory("tf5_full"), encoder)
    adapter = read_adapter(adapter_factory(layout), encoder)
    assert adapter.report.ignored_modules == 0
    assert adapter.state.keys() == reference.state.keys() and len(adapter.state) == 12  # 2 layers × q/k/v × A/B
    assert all(torch.equal(adapter.state[k], reference.state[k]) for k in adapter.state)
    assert adapter.report.fingerprint == reference.report.fingerprint


def test_merge_is_logged_with_counts(tiny_model, tiny_adapter, caplog):
    with caplog.at_level(logging.INFO, logger="extractor.model.lora"):
        model = load_model(tiny_model, tiny_adapter, torch.device("cpu"), torch.float32)
    assert "LoRA: 6 modules (q/k/v_proj × 2 layers), 3,072 parameters" in caplog.text  # r=4: 4·64·2 per module
    assert model.adapter.parameters == 3072


def test_language_model_modules_are_ignored_with_a_warning(tmp_path, tiny_model, caplog):
    adapter = build_adapter(tmp_path / "a", tiny_model, layout="tf5_full", include_language_model=True)
    with caplog.at_level(logging.WARNING, logger="extractor.model.lora"):
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
    state = load_file(tiny_adapter / "adapter_model.safetensors")
    cfg = json.loads((tiny_adapter / "adapter_config.json").read_text())
    scaling = cfg["lora_alpha"] / cfg["r"]
    A = state["base_model.model.model.audio_tower.layers.1.self_attn.v_proj.lora_A.weight"]
    B = state["base_model.model.model.audio_tower.layers.1.self_attn.v_proj.lora_B.weight"]
    d = base.cfg.d_model
    delta = merged.encoder.layers[1].self_attn.qkv_weight[2 * d :] - base.encoder.layers[1].self_attn.qkv_weight[2 * d :]
    torch.testing.assert_close(delta, scaling * B @ A, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# One merge path: W + scaling · B @ A with PEFT's scaling rules; DoRA through PEFT itself
# ---------------------------------------------------------------------------------------------

ADAPTER_KINDS = {
    "plain": {},
    "rslora": {"use_rslora": True},  # scaling alpha / sqrt(r)
    # r and alpha per module, matched as PEFT does: a bare name, and a path that needs its prefix rule
    "rank-alpha-patterns": {"rank_pattern": {"k_proj": 2}, "alpha_pattern": {"layers.1.self_attn.v_proj": 3}},
    "rslora-patterns": {"use_rslora": True, "rank_pattern": {"q_proj": 8}, "alpha_pattern": {"k_proj": 5}},
    "dora": {"use_dora": True},  # not W + scaling · B @ A: merged by PEFT
}


@pytest.mark.parametrize("layout", ["tf5_full", "tf4_full", "tower"])
@pytest.mark.parametrize("kind", ADAPTER_KINDS)
def test_each_kind_of_lora_in_each_layout_equals_canonical_peft(tmp_path, tiny_model, kind, layout):
    """The merged tower's embeddings equal the canonical unmerged PeftModel's, for every adapter
    kind in every key layout (a tf4_full adapter's reference is the tf5_full one with the same
    tensors: PEFT cannot load tf4 keys into transformers 5, see canonical.load_canonical)."""
    from canonical import canonical_embedding, cosine, load_canonical
    from embedding import clips, ours

    adapter = build_adapter(tmp_path / kind, tiny_model, layout=layout, lora_config=ADAPTER_KINDS[kind])
    reference = adapter if layout != "tf4_full" else build_adapter(tmp_path / f"{kind}-ref", tiny_model, layout="tf5_full",
                                                                    lora_config=ADAPTER_KINDS[kind])
    model = load_model(tiny_model, adapter, torch.device("cpu"), torch.float32)
    ref = load_canonical(tiny_model, reference, "tower" if layout == "tower" else "tf5_full")
    base = load_model(tiny_model, None, torch.device("cpu"), torch.float32)
    waves = clips()[2:4]
    for x, (emb, _), (plain_emb, _) in zip(waves, ours(model, waves), ours(base, waves)):
        expected = canonical_embedding(ref, x)
        assert cosine(emb, expected) >= 0.9999
        assert cosine(plain_emb, expected) < 0.9999  # the adapter matters at this tolerance


def test_patterns_give_each_module_its_own_scaling(tmp_path, tiny_model):
    """The rule itself, without the encoder: r and alpha per module from the patterns."""
    from extractor.model.config import read_adapter_config

    adapter = build_adapter(tmp_path / "p", tiny_model, layout="tf5_full", lora_config=ADAPTER_KINDS["rank-alpha-patterns"])
    cfg = read_adapter_config(adapter)
    name = "model.audio_tower.layers.{}.self_attn.{}"
    assert cfg.scaling(name.format(0, "q_proj")) == 8 / 4
    assert cfg.scaling(name.format(0, "k_proj")) == 8 / 2  # rank_pattern k_proj: r=2
    assert cfg.scaling(name.format(1, "v_proj")) == 3 / 4 and cfg.scaling(name.format(0, "v_proj")) == 8 / 4


@pytest.mark.parametrize("bad", ["nan", "inf", "huge", "tensor"])
def test_non_finite_adapters_are_refused_at_load(tmp_path, tiny_model, tiny_adapter, bad):
    """NaN or Inf would make every embedding NaN and be blamed on the audio (issue 11)."""
    adapter = tmp_path / bad
    adapter.mkdir()
    cfg = json.loads((tiny_adapter / "adapter_config.json").read_text())
    state = load_file(tiny_adapter / "adapter_model.safetensors")
    if bad == "tensor":
        key = sorted(state)[3]
        state[key] = state[key].clone()
        state[key][0, 0] = float("nan")
    else:
        cfg["lora_alpha"] = {"nan": float("nan"), "inf": float("inf"), "huge": 1e38}[bad]
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(state, adapter / "adapter_model.safetensors")
    with pytest.raises(AdapterError) as info:
        load_model(tiny_model, adapter, torch.device("cpu"), torch.float32)
    message = str(info.value)
    if bad == "tensor":
        assert "NaN or Inf" in message and key in message  # the file's own key
    elif bad == "huge":
        assert "gives NaN or Inf on a test signal" in message  # 1e38 is finite, and so are its merged weights
    else:
        assert "lora_alpha" in message and "finite" in message
