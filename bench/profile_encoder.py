"""Device-only measurement of the encoder stage (no decoding, no Parquet): where does GPU time go?

    python bench/profile_encoder.py [--layers 32] [--budgets 16384,32768,65536]

Prints, per variant, audio-seconds/s and MFU over the cost formula of shared/QWEN2_AUDIO.md,
with the bf16 matmul peak measured in the same run. Material for tuning, not the benchmark.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from extractor.batching import make_batch, plan_batches, split_windows
from extractor.checkpoint import EncoderConfig
from extractor.embed import encode_batch, to_device
from extractor.encoder import AudioEncoder
from extractor.logmel import LogMel
from extractor.model import LoadedModel
from extractor.runner import window_flops
from extractor.constants import encoder_tokens, mel_frames


def peak_tflops(dev) -> float:
    n = 8192
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(3):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(10):
            a @ b
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return 2 * n**3 * 10 / float(np.median(times)) / 1e12


def build(cfg: EncoderConfig, dev, dtype) -> LoadedModel:
    torch.manual_seed(0)
    enc = AudioEncoder(cfg)
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if "layer_norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02)
    enc = enc.to(dev, dtype)
    enc.prepare_for_inference()
    return LoadedModel(enc, LogMel(cfg.num_mel_bins, dev), cfg, dev, dtype, "random", None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--clips", type=int, default=1500)
    ap.add_argument("--budgets", default="16384,32768,65536")

    args = ap.parse_args()
    dev = torch.device("cuda")
    print(json.dumps({"torch": torch.__version__, "gpu": torch.cuda.get_device_name()}), flush=True)
    from torch.nn.attention import varlen

    print("varlen_attn:", varlen.varlen_attn.__doc__.splitlines()[0] if varlen.varlen_attn.__doc__ else "present", flush=True)
    peak = peak_tflops(dev)
    print(f"peak bf16 {peak:.0f} TFLOP/s", flush=True)

    cfg = EncoderConfig.from_dict({"encoder_layers": args.layers})
    rng = np.random.default_rng(0)
    durs = rng.uniform(2, 20, args.clips)
    clips = [(0.1 * rng.standard_normal(int(d * 16000))).astype(np.float32) for d in durs]
    audio_s = float(durs.sum())
    windows = [w for i, c in enumerate(clips) for w in split_windows(i, c, padding_mask=True)]
    flops = sum(window_flops(mel_frames(len(w.samples)), encoder_tokens(mel_frames(len(w.samples))), cfg) for w in windows)
    print(f"{len(clips)} clips, {audio_s:.0f} audio-s, {flops / 1e12:.0f} TFLOP useful; limit {audio_s / (flops / (peak * 1e12)):.0f} audio-s/s", flush=True)

    model = build(cfg, dev, torch.bfloat16)
    # The fc1 GELU in cuBLASLt's epilogue (tanh form) against the separate exact GELU.
    b0 = make_batch(plan_batches(windows, token_budget=32768, max_windows=4096)[5])
    outs = {}
    for fused in (False, True):
        model.encoder.fused_gelu = fused
        with torch.inference_mode():
            outs[fused] = encode_batch(model, b0, to_device(b0, dev), keep_frames=False)[0].float()
    cos = torch.nn.functional.cosine_similarity(outs[False], outs[True]).min().item()
    print(f"fused vs exact GELU: min cosine {cos:.6f}", flush=True)
    for fused in (False, True):
        model.encoder.fused_gelu = fused
        for budget in [int(b) for b in args.budgets.split(",")]:
            batches = [make_batch(g) for g in plan_batches(windows, token_budget=budget, max_windows=4096)]
            tokens = sum(b.num_tokens for b in batches)
            padded = sum(b.waves.shape[0] * b.waves.shape[1] for b in batches) / 320
            with torch.inference_mode():
                for b in batches[:3]:  # warm-up (and compilation)
                    encode_batch(model, b, to_device(b, dev), keep_frames=False)
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                t = time.perf_counter()
                for b in batches:
                    sums, _ = encode_batch(model, b, to_device(b, dev), keep_frames=False)
                    sums.to("cpu", non_blocking=True)
                torch.cuda.synchronize()
                el = time.perf_counter() - t
            r = {"fused_gelu": fused, "budget": budget, "batches": len(batches), "audio_s_per_s": audio_s / el,
                 "mfu": flops / el / (peak * 1e12), "useful_tflops": flops / el / 1e12, "token_fill": tokens / (len(batches) * budget),
                 "conv_padding": padded / tokens - 1, "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9}
            print(json.dumps(r), flush=True)

    # Profile one steady batch of the last variant: top kernels by CUDA time.
    b = batches[len(batches) // 2]
    with torch.inference_mode(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            encode_batch(model, b, to_device(b, dev), keep_frames=False)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=70), flush=True)


if __name__ == "__main__":
    main()
