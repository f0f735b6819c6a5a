"""GPU path: packed varlen attention in bf16/fp32 against the canonical fp32 path, and OOM back-off.

Run on a CUDA machine: `pytest -m gpu tests/test_gpu.py`. Skipped elsewhere (conftest).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import json
import subprocess

from builders import speak, speechlike, write_audio
from canonical import canonical_embedding, cosine, load_canonical
from embedding import ours
from extractor.model.load import load_model
from extractor.options import JobOptions, ManifestSpec
from extractor.engines.local import run_shard

pytestmark = pytest.mark.gpu
SR = 16_000
DURATIONS = [0.3, 1.7, 6.1, 12.0, 19.5, 29.99, 30.0, 44.0, 75.3]


def speech(tmp_path):
    """Real speech when espeak-ng is there, speech-like signals otherwise."""
    waves = []
    for i, d in enumerate(DURATIONS):
        spoken = speak(tmp_path / f"s{i}.wav", "the quick brown fox jumps over the lazy dog " * max(1, int(d // 2)))
        if spoken is not None:
            import soundfile as sf
            import soxr

            x, sr = sf.read(spoken, dtype="float32")
            x = soxr.resample(x, sr, SR, quality="HQ").astype(np.float32)[: int(d * SR)]
        else:
            x = speechlike(d, SR, seed=i)
        waves.append(x)
    return waves


def embed_packed(model, waves):
    """Every clip packed into one or two batches, as the job packs them on a GPU."""
    return [emb for emb, _ in ours(model, waves, token_budget=32_768, max_windows=4096)]


@pytest.fixture(scope="module")
def wide(checkpoint_factory, adapter_factory):
    ckpt = checkpoint_factory(d_model=1280, heads=20, ffn_dim=5120, encoder_layers=4)
    adapter = adapter_factory("tf5_full", model_dir=ckpt, r=16, alpha=32)
    return ckpt, adapter, load_canonical(ckpt, adapter, "tf5_full")


@pytest.mark.parametrize("dtype,threshold", [(torch.bfloat16, 0.999), (torch.float32, 0.9999)])
def test_gpu_embeddings_match_canonical(wide, tmp_path, dtype, threshold):
    ckpt, adapter, ref = wide
    waves = speech(tmp_path)
    model = load_model(ckpt, adapter, torch.device("cuda"), dtype)
    ours = embed_packed(model, waves)  # every clip packed into one or two batches
    for d, x, e in zip(DURATIONS, waves, ours):
        c = cosine(e, canonical_embedding(ref, x))
        assert c >= threshold, f"{d} s in {dtype}: cosine {c:.6f}"


def test_gpu_full_windows_take_dense_attention_and_match_canonical(wide):
    """A batch of full 30 s windows only goes through one dense cuDNN attention call (encoder.attend)."""
    ckpt, adapter, ref = wide
    waves = [speechlike(d, SR, seed=20 + i) for i, d in enumerate((30.0, 60.0, 90.0))]  # 6 full windows
    model = load_model(ckpt, adapter, torch.device("cuda"), torch.bfloat16)
    import extractor.model.encoder as encoder

    dense = []
    real = encoder.F.scaled_dot_product_attention
    encoder.F.scaled_dot_product_attention = lambda *a, **k: dense.append(a[0].shape) or real(*a, **k)
    try:
        ours_ = embed_packed(model, waves)
    finally:
        encoder.F.scaled_dot_product_attention = real
    assert dense and dense[0][0] == 6  # (B, H, S, hd): the six windows at once
    for x, e in zip(waves, ours_):
        assert cosine(e, canonical_embedding(ref, x)) >= 0.999


def test_out_of_memory_retry_loses_no_row(tiny_model, tiny_adapter, tmp_path, monkeypatch):
    rows = []
    for i in range(12):
        p = write_audio(tmp_path / f"c{i}.flac", speechlike(1 + i, SR, seed=i), SR)
        rows.append({"id": i, "path": str(p)})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")

    import extractor.batching.device as device

    real = device.forward
    calls = {"oom": 0}

    def flaky(model, batch, *args):
        if batch.size > 2:  # anything bigger than two windows "does not fit"
            calls["oom"] += 1
            raise torch.cuda.OutOfMemoryError("simulated: CUDA out of memory")
        return real(model, batch, *args)

    monkeypatch.setattr(device, "forward", flaky)
    opts = JobOptions(manifest=ManifestSpec(str(tmp_path / "m.parquet"), id_column="id"), output=str(tmp_path / "out"),
                      model=str(tiny_model), adapter=str(tiny_adapter), device="cuda", decode_workers=1, progress=False)
    summary = run_shard(opts)
    assert calls["oom"] > 0 and summary.stats.oom_retries > 0
    assert summary.embedded == 12 and summary.failed == 0 and summary.complete
    out = pq.read_table(sorted((tmp_path / "out" / "embeddings").glob("part-*.parquet"))).to_pydict()
    assert sorted(out["id"]) == list(range(12))
    assert all(np.isfinite(np.asarray(e)).all() for e in out["embedding"])


def test_gpu_job_with_a_plain_adapter_never_imports_peft_or_transformers(tiny_model, tiny_adapter, tmp_path):
    from jobrun import REPO, job_cmd, job_env, write_manifest

    paths = [write_audio(tmp_path / f"c{i}.wav", speechlike(0.5 + i, SR, seed=i), SR) for i in range(3)]
    manifest = write_manifest(tmp_path / "m.parquet", [{"path": str(p)} for p in paths])
    env = job_env(EXTRACTOR_TEST_HOOK="tests.hooks:record_modules", HOOK_DIR=str(tmp_path))
    run = subprocess.run(job_cmd(manifest, tmp_path / "out", tiny_model, "--adapter", str(tiny_adapter), "--device", "cuda"),
                         env=env, capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr
    modules = set(json.loads((tmp_path / "modules.json").read_text()))
    assert "torch" in modules and "extractor.model.lora" in modules
    assert not {m.split(".")[0] for m in modules} & {"peft", "transformers"}


def test_gpu_warm_up_ahead_makes_the_context_and_loads_each_library():
    """model/ahead.py's warm-up, on its own thread as the job runs it: the context of the named
    device exists afterwards and each library call ran (a failure would be logged, not raised:
    the call is made here directly so that it raises)."""
    from extractor.model import ahead

    index = torch.cuda.device_count() - 1  # the last GPU: not the default device
    before = torch.cuda.memory_allocated(index) if torch.cuda.is_initialized() else 0
    ahead.warm_device(f"cuda:{index}")
    assert torch.cuda.is_initialized()
    assert torch.cuda.memory_allocated(index) == before  # its tensors are freed
    (thread,) = ahead.start(None, "auto")
    thread.join(120)
    assert not thread.is_alive()


def test_gpu_upload_through_pinned_buffers_equals_safetensors(tiny_model, monkeypatch):
    """The CUDA path of checkpoint.upload_tower, with buffers small enough that every range goes
    through both of them many times."""
    from extractor.model import checkpoint

    monkeypatch.setattr(checkpoint, "STAGE_BYTES", 4096)
    got = checkpoint.upload_tower(tiny_model, torch.device("cuda"))
    want = checkpoint.read_tower_tensors(tiny_model)
    assert sorted(got) == sorted(want)
    assert all(got[k].is_cuda and got[k].dtype == want[k].dtype and torch.equal(got[k].cpu(), want[k]) for k in want)


def test_gpu_fused_add_layer_norm_equals_the_eager_layers_and_canonical(wide, tmp_path):
    """model/kernels.py: once compiled, the layers with each residual add and LayerNorm fused give
    the eager layers' numbers within bf16 rounding, leave their input alone, and the embeddings
    still match the canonical fp32 path."""
    from extractor.model.encoder import PackedSeqs

    ckpt, adapter, ref = wide
    model = load_model(ckpt, adapter, torch.device("cuda"), torch.bfloat16)
    enc = model.encoder
    lengths = [7, 150, 1500, 33, 1]
    cu = torch.tensor(np.cumsum([0, *lengths]), dtype=torch.int32, device="cuda")
    seqs = PackedSeqs(cu, lengths, max(lengths))
    gen = torch.Generator(device="cuda").manual_seed(0)
    tokens = (0.5 * torch.randn(sum(lengths), 1280, device="cuda", generator=gen)).to(torch.bfloat16)
    before = tokens.clone()
    with torch.inference_mode():
        eager = tokens
        for layer in enc.layers:
            eager = layer(eager, seqs)
        enc.compile_kernels(wait=True)
        assert enc.fused_add_layer_norm
        fused = enc._layers_fused(tokens, seqs)
    assert torch.equal(tokens, before)
    rows = torch.nn.functional.cosine_similarity(eager.float(), fused.float(), dim=1)
    assert rows.min().item() >= 0.9999, rows.min().item()
    waves = speech(tmp_path)
    for d, x, e in zip(DURATIONS, waves, embed_packed(model, waves)):  # forward() now takes the fused path
        c = cosine(e, canonical_embedding(ref, x))
        assert c >= 0.999, f"{d} s, fused: cosine {c:.6f}"


def test_gpu_log_mel_makes_one_cufft_plan_for_every_batch_shape():
    """model/logmel.py: a cuFFT plan made for a new shape waited for the GPU's whole queue (~30 ms
    per batch on an H100, with the interpreter held). The FFTs now run in fixed chunks, so batches
    of any shape add no plan after the first, and the spectrum is still torch.stft's."""
    from extractor.model.logmel import LogMel

    lm = LogMel(128, "cuda")
    lm(torch.zeros(1, 1_600, device="cuda"), torch.tensor([10], device="cuda"))  # makes the one plan
    cache = torch.backends.cuda.cufft_plan_cache[torch.cuda.current_device()]
    before = cache.size
    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(48, 320_000), (51, 310_400), (111, 160_000), (3, 480_000)]
    waves = [0.3 * torch.randn(rows, samples, device="cuda", generator=gen) for rows, samples in shapes]
    spectra = [lm.stft(w) for w in waves]
    for w in waves:
        lm(w, torch.full((w.shape[0],), w.shape[1] // 160, device="cuda"))
    assert cache.size == before
    for w, got in zip(waves, spectra):
        assert torch.equal(got, torch.stft(w, 400, 160, window=lm.window, center=True, pad_mode="reflect", return_complex=True))
