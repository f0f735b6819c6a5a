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


# ---------------------------------------------------------------------------------------------
# Plain LoRA is merged without waiting for peft's import, and PEFT's own merge checks it
# ---------------------------------------------------------------------------------------------

ADAPTER_KINDS = {
    "plain": {},
    "rslora": {"use_rslora": True},  # plain: scaling alpha / sqrt(r)
    "rank-alpha-patterns": {"rank_pattern": {"k_proj": 2}, "alpha_pattern": {"v_proj": 3}},  # merged by PEFT
    "dora": {"use_dora": True},  # merged by PEFT
}


@pytest.mark.parametrize("kind", ADAPTER_KINDS)
def test_each_kind_of_lora_config_equals_canonical_peft(tmp_path, tiny_model, kind):
    """Whichever way the adapter is merged (W + scaling · B @ A, or PEFT's merge for DoRA and
    patterns), the embeddings equal the canonical unmerged PeftModel's."""
    from canonical import canonical_embedding, cosine, load_canonical
    from test_encoder import clips, ours

    adapter = build_adapter(tmp_path / kind, tiny_model, layout="tower", lora_config=ADAPTER_KINDS[kind])
    model = load_model(tiny_model, adapter, torch.device("cpu"), torch.float32)
    ref = load_canonical(tiny_model, adapter, "tower")
    base = load_model(tiny_model, None, torch.device("cpu"), torch.float32)
    waves = clips()[2:5]
    for x, (emb, _), (plain_emb, _) in zip(waves, ours(model, waves), ours(base, waves)):
        expected = canonical_embedding(ref, x)
        assert cosine(emb, expected) >= 0.9999
        assert cosine(plain_emb, expected) < 0.9999  # the adapter matters at this tolerance


def test_which_adapters_merge_without_peft(tmp_path, tiny_model):
    from extractor.checkpoint import read_config
    from extractor.encoder import AudioEncoder
    from extractor.lora import plain_scaling, read_for

    with torch.device("meta"):
        encoder = AudioEncoder(read_config(tiny_model))  # unfused q/k/v, as the merge sees them
    scalings = {kind: plain_scaling(read_for(encoder, build_adapter(tmp_path / kind, tiny_model, layout="tower", lora_config=cfg)))
                for kind, cfg in ADAPTER_KINDS.items()}
    assert scalings == {"plain": 8 / 4, "rslora": 8 / 2, "rank-alpha-patterns": None, "dora": None}


def _job(tiny_model, tiny_adapter, manifest_dir, out):
    from builders import speechlike, write_audio
    import polars as pl
    from extractor.manifest import ManifestSpec
    from extractor.pipeline import JobOptions

    paths = [str(write_audio(manifest_dir / f"{i}.wav", speechlike(0.5 + i / 3, 16_000, seed=i), 16_000)) for i in range(6)]
    pl.DataFrame({"id": [f"r{i}" for i in range(6)], "path": paths}).write_parquet(manifest_dir / "m.parquet")
    return JobOptions(manifest=ManifestSpec(str(manifest_dir / "m.parquet"), id_column="id"), output=str(out), model=str(tiny_model),
                      adapter=str(tiny_adapter), device="cpu", decode_workers=0, progress=False, part_rows=2)


def test_deferred_peft_check_gives_the_same_output(tmp_path, tiny_model, tiny_adapter):
    """The GPU start-up path (model loaded with defer_check: the writer awaits PEFT's check)
    writes what the synchronous path writes, bit for bit."""
    import pyarrow.parquet as pq
    from extractor.pipeline import run_job

    (tmp_path / "audio").mkdir()
    outputs = {}
    for defer in (False, True):
        out = tmp_path / f"out-{defer}"
        model = load_model(tiny_model, tiny_adapter, torch.device("cpu"), torch.float32, defer_check=defer)
        assert (model.adapter_check is not None) == defer
        summary = run_job(_job(tiny_model, tiny_adapter, tmp_path / "audio", out), model=model)
        assert summary.embedded == 6 and summary.complete
        outputs[defer] = pq.read_table(sorted(out.glob("part-*.parquet"))).to_pydict()
    assert outputs[True] == outputs[False]


def test_a_merge_peft_disagrees_with_writes_nothing(tmp_path, tiny_model, tiny_adapter, monkeypatch):
    """If W + scaling · B @ A is not what PEFT makes of the adapter, the run stops before its
    first commit with an error naming the module, and the output holds no part."""
    import extractor.lora as lora
    from extractor.pipeline import run_job

    real = lora.plain_scaling
    monkeypatch.setattr(lora, "plain_scaling", lambda adapter: 1.5 * real(adapter))  # a wrong rule
    model = load_model(tiny_model, tiny_adapter, torch.device("cpu"), torch.float32, defer_check=True)
    (tmp_path / "audio").mkdir()
    out = tmp_path / "out"
    with pytest.raises(RuntimeError) as info:
        run_job(_job(tiny_model, tiny_adapter, tmp_path / "audio", out), model=model)
    cause = info.value.__cause__
    assert isinstance(cause, AdapterError) and "PEFT merges layers.0.self_attn.k_proj differently" in str(cause)
    assert not list(out.glob("part-*.parquet")) and not list(out.glob("_failures/part-*.parquet"))
    assert not (out / "_SUCCESS").exists()
    with pytest.raises(AdapterError, match="differently"):  # and a synchronous load refuses it outright
        load_model(tiny_model, tiny_adapter, torch.device("cpu"), torch.float32)


def test_a_check_child_that_cannot_run_falls_back_to_checking_in_process(tmp_path, tiny_model, tiny_adapter, monkeypatch, caplog):
    """The child process is only a way to keep peft's import off the job's start-up: if it cannot
    run at all, the check runs in the job's process, and the output is the same."""
    import sys
    import pyarrow.parquet as pq
    from extractor.pipeline import run_job

    monkeypatch.setattr(sys, "executable", "/bin/false")
    model = load_model(tiny_model, tiny_adapter, torch.device("cpu"), torch.float32, defer_check=True)
    (tmp_path / "audio").mkdir()
    with caplog.at_level(logging.WARNING, logger="extractor.lora"):
        summary = run_job(_job(tiny_model, tiny_adapter, tmp_path / "audio", tmp_path / "out"), model=model)
    assert "the child process checking the merge failed (exit 1" in caplog.text
    assert summary.embedded == 6 and summary.complete
    assert pq.read_table(sorted((tmp_path / "out").glob("part-*.parquet"))).num_rows == 6


def test_a_stopped_check_still_runs_if_the_model_is_used_again(tiny_model, tiny_adapter, monkeypatch):
    """run_job stops a check it did not need (nothing written); a caller that runs the same model
    again still gets the check, here a failing one."""
    import extractor.lora as lora

    real = lora.plain_scaling
    monkeypatch.setattr(lora, "plain_scaling", lambda adapter: 1.5 * real(adapter))
    model = load_model(tiny_model, tiny_adapter, torch.device("cpu"), torch.float32, defer_check=True)
    model.adapter_check.close()
    with pytest.raises(AdapterError, match="differently"):
        model.adapter_check.wait()
