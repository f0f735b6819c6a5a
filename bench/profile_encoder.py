"""Device-only ceiling of the encoder stage (no decoding, no copies, no Parquet): what MFU do the
job's batches reach on the GPU alone, per corpus shape, and where does GPU time go?

    python bench/profile_encoder.py [--layers 32] [--profile]

Random full-size weights; batches packed by the job's own code (batching.packing) and run through
its own forward (batching.device.forward), with every input already on the device. The gap between
this and the job's steady MFU is the pipeline's; the gap between this and 1.0 is the GPU code's.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from extractor.batching.device import forward
from extractor.pooling import POOLINGS

MEAN = POOLINGS["mean"]
from extractor.batching.packing import Batch, plan_batches, split_windows, window_flops, window_shapes
from extractor.model.config import EncoderConfig
from extractor.model.encoder import AudioEncoder
from extractor.model.load import LoadedModel
from extractor.model.logmel import LogMel

SHAPES = {"2-20s": (2.0, 20.0), "0.4-2s": (0.4, 2.0), "30s windows": (30.0, 30.0)}


def peak_tflops(dev) -> float:
    n = 8192
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(5):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(10):
            a @ b
        torch.cuda.synchronize()
        best = max(best, 2 * n**3 * 10 / (time.perf_counter() - t) / 1e12)
    return best


def build(cfg: EncoderConfig, dev, *, fused: bool = True) -> LoadedModel:
    torch.manual_seed(0)
    with torch.device(dev):
        enc = AudioEncoder(cfg)
    with torch.no_grad():
        for name, p in enc.named_parameters():
            p.fill_(1.0) if "layer_norm" in name and name.endswith("weight") else p.normal_(0, 0.02)
    enc = enc.to(dev, torch.bfloat16)
    enc.prepare_for_inference()
    if fused:
        enc.compile_kernels(wait=True)  # as the job's forward runs once its first batch is out
    return LoadedModel(enc, LogMel(cfg.num_mel_bins, dev), cfg, dev, torch.bfloat16, "random", None)


def batches_for(lo: float, hi: float, audio_s: float, budget: int, rng) -> tuple[list[Batch], float, float]:
    clips = []
    while sum(len(c) for c in clips) < audio_s * 16000:
        clips.append((0.1 * rng.standard_normal(int(rng.uniform(lo, hi) * 16000))).astype(np.float32))
    windows, items, index = [], [], []
    for i, c in enumerate(clips):
        ws = split_windows(c)
        windows += ws
        items += [i] * len(ws)
        index += range(len(ws))
    lengths = np.array([len(w) for w in windows])
    tokens, outs = window_shapes(lengths, padding_mask=True)
    items, index = np.array(items), np.array(index)
    n_mel = -(-lengths // 160)
    cfg = EncoderConfig.from_dict({})
    flops = float(window_flops(tokens, n_mel, cfg.d_model, cfg.encoder_layers, cfg.num_mel_bins).sum())
    out = [Batch(items[s], index[s], tokens[s], outs[s], [windows[k] for k in s])
           for s in plan_batches(tokens, (items, index), token_budget=budget, max_windows=4096)]
    return out, float(lengths.sum()) / 16000, flops


def on_device(b: Batch, dev):
    waves = torch.from_numpy(b.fill_waves(np.empty(b.size * b.padded_samples(), np.float32))).to(dev)
    ix = {k: torch.from_numpy(v).to(dev) for k, v in b.indices().items()}
    return waves, ix


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--audio-s", type=float, default=1500.0, help="audio per shape")
    ap.add_argument("--budget", type=int, default=32768)
    ap.add_argument("--profile", action="store_true", help="also print the top kernels of one shape")
    ap.add_argument("--eager", action="store_true", help="without the fused add + LayerNorm (model/kernels.py)")
    args = ap.parse_args()
    dev = torch.device("cuda")
    peak = peak_tflops(dev)
    cfg = EncoderConfig.from_dict({"encoder_layers": args.layers})
    model = build(cfg, dev, fused=not args.eager)
    rng = np.random.default_rng(0)
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "peak_tflops": round(peak, 1),
               "fused_add_layer_norm": model.encoder.fused_add_layer_norm}
    for name, (lo, hi) in SHAPES.items():
        batches, audio_s, flops = batches_for(lo, hi, args.audio_s, args.budget, rng)
        flops *= args.layers / 32 if args.layers != 32 else 1
        staged = [on_device(b, dev) for b in batches]
        with torch.inference_mode():
            for b, (w, ix) in list(zip(batches, staged))[:2]:
                forward(model, b, w, ix, MEAN)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for b, (w, ix) in zip(batches, staged):
                forward(model, b, w, ix, MEAN)
            torch.cuda.synchronize()
            el = time.perf_counter() - t
        results[name] = {"batches": len(batches), "windows/batch": round(np.mean([b.size for b in batches]), 1),
                         "audio_s_per_s": round(audio_s / el), "mfu": round(flops / el / (peak * 1e12), 4)}
        print(json.dumps({name: results[name]}), flush=True)
        if args.profile:
            b, (w, ix) = batches[len(batches) // 2], staged[len(batches) // 2]
            with torch.inference_mode(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    forward(model, b, w, ix, MEAN)
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60), flush=True)
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
