"""The job's numbers equal the canonical HF + PEFT path computed in the test (issue 2, acceptance 1).

The reference (tests/canonical.py) runs Qwen2AudioForConditionalGeneration's tower with the
PEFT adapter *unmerged*, the HF feature extractor on 30 s padded windows and the padding mask
built as Qwen2AudioModel.forward builds it. Ours merges the adapter, trims every window to its
length and packs windows together.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from builders import speechlike
from canonical import canonical_embedding, canonical_frames, cosine, load_canonical
from extractor.model.load import load_model

from embedding import DURATIONS, SR, clips, ours


@pytest.fixture(scope="module")
def merged(tiny_model, tiny_adapter):
    return load_model(tiny_model, tiny_adapter, torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("padding_mask", [True, False], ids=["masked", "no-padding-mask"])
def test_embeddings_equal_canonical(merged, tiny_ref_adapted, padding_mask):
    for d, x, (emb, frames) in zip(DURATIONS, clips(), ours(merged, clips(), padding_mask=padding_mask)):
        ref_frames = canonical_frames(tiny_ref_adapted, x, padding_mask=padding_mask)
        assert frames.shape == ref_frames.shape, f"{d} s: frame count"
        assert cosine(emb, canonical_embedding(tiny_ref_adapted, x, padding_mask=padding_mask)) >= 0.9999, f"{d} s"
        rel = np.abs(frames - ref_frames).max() / np.abs(ref_frames).max()
        assert rel < 1e-4, f"{d} s: frames differ by {rel:.2e}"


def test_no_padding_mask_is_a_different_function(merged, tiny_ref_adapted):
    """Guards against a test that passes because both modes compute the same thing."""
    x = clips()[3]
    masked = ours(merged, [x])[0][0]
    unmasked = ours(merged, [x], padding_mask=False)[0][0]
    assert cosine(masked, unmasked) < 0.999


def test_packing_many_windows_matches_one_at_a_time(merged):
    """The GPU path packs windows into one sequence; on CPU the same code must agree with batch size 1."""
    waves = clips()
    single = ours(merged, waves)
    packed = ours(merged, waves, token_budget=20_000, max_windows=64)
    for (a, _), (b, _) in zip(single, packed):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_without_adapter_equals_canonical(tiny_model, tiny_ref):
    model = load_model(tiny_model, None, torch.device("cpu"), torch.float32)
    x = clips()[4]
    assert cosine(ours(model, [x])[0][0], canonical_embedding(tiny_ref, x)) >= 0.9999


def test_full_width_model_equals_canonical(checkpoint_factory, adapter_factory):
    """d_model 1280 / 20 heads / head_dim 64, the real width, where q scaling folds exactly into the weights."""
    ckpt = checkpoint_factory(d_model=1280, heads=20, ffn_dim=5120, encoder_layers=2)
    adapter = adapter_factory("tower", model_dir=ckpt, r=16, alpha=32)
    ref = load_canonical(ckpt, adapter, "tower")
    model = load_model(ckpt, adapter, torch.device("cpu"), torch.float32)
    assert model.cfg.d_model == 1280 and model.cfg.head_dim == 64
    waves = [speechlike(3.2, SR, seed=11), speechlike(0.5, SR, seed=12)]
    for x, (emb, _) in zip(waves, ours(model, waves)):
        assert cosine(emb, canonical_embedding(ref, x)) >= 0.9999


@pytest.mark.parametrize("n_mels", [80, 128])
def test_mel_filter_bank_equals_the_feature_extractors(n_mels):
    """extractor.logmel builds the filter bank itself (importing transformers costs start-up
    seconds); it must be WhisperFeatureExtractor's, bit for bit."""
    from transformers import WhisperFeatureExtractor
    from extractor.model.logmel import _mel_filters_np

    reference = WhisperFeatureExtractor(feature_size=n_mels).mel_filters.astype(np.float32)
    assert np.array_equal(_mel_filters_np(n_mels), reference)


def test_the_fused_add_layer_norm_serves_cuda_bfloat16_only_and_a_failed_compile_stays_eager(merged, caplog):
    """model/kernels.py: the Triton kernel is for bfloat16 on CUDA (float16 keeps HF's clamps, the
    CPU has no Triton). A compile that cannot run is logged, and the encoder stays eager."""
    from extractor.model import kernels

    assert kernels.usable(torch.device("cuda", 0), torch.bfloat16)
    assert not kernels.usable(torch.device("cuda", 0), torch.float16)
    assert not kernels.usable(torch.device("cpu"), torch.bfloat16)
    merged.encoder.compile_kernels(wait=True)  # float32 on the CPU: nothing to compile
    assert not merged.encoder.fused_add_layer_norm
    assert not kernels._state.get((torch.device("cpu"), torch.float32, merged.cfg.d_model))

    nowhere = torch.device("cuda", 63)  # no such device, here or on a GPU machine
    with caplog.at_level("DEBUG", logger="extractor.model.kernels"):
        kernels.prepare(nowhere, torch.bfloat16, 64, wait=True)
        kernels.prepare(nowhere, torch.bfloat16, 64, wait=True)  # asked again: not tried again
    assert not kernels.ready(nowhere, torch.bfloat16, 64) and kernels._state[(nowhere, torch.bfloat16, 64)] == "failed"
    assert caplog.text.count("fused add + LayerNorm not used on cuda:63") == 1
    assert "the encoder stays eager" in caplog.text


@pytest.mark.parametrize("frames_per_fft", [None, 1000, 7], ids=["one-call", "chunks-of-1000", "chunks-of-7"])
def test_the_log_mel_stft_in_fixed_chunks_is_torch_stft_bit_for_bit(frames_per_fft):
    """LogMel.stft runs its FFTs in chunks of one size (on CUDA, so that cuFFT makes one plan, not
    one per batch shape, each of which waited for the GPU's queue): the same numbers as torch.stft,
    whatever the chunk, including a last chunk padded with unused frames."""
    from extractor.model.logmel import LogMel

    lm = LogMel(128)
    gen = torch.Generator().manual_seed(0)
    for rows, samples in [(1, 480_000), (3, 16_000), (7, 99_999), (2, 401), (1, 1_600)]:
        waves = 0.3 * torch.randn(rows, samples, generator=gen)
        want = torch.stft(waves, 400, 160, window=lm.window, center=True, pad_mode="reflect", return_complex=True)
        assert torch.equal(lm.stft(waves, frames_per_fft), want), (rows, samples, frames_per_fft)
