"""FP8 (e4m3) GEMMs in the encoder: how far do they move the embedding? On the CPU, no GPU needed.

Every linear layer of the tower (the fused q/k/v, out_proj, fc1, fc2) runs as an e4m3 GEMM
would: each activation row and each weight row (output channel) scaled by its own absolute
maximum to e4m3's 448, rounded to e4m3, multiplied in float32. That is the arithmetic of
`torch._scaled_mm` with rowwise scales and fp32 accumulation; only the speed needs a GPU. The
tower is full size (32 layers x 1280) with random weights as bench/synth_model.py draws them, and
the embeddings are compared with the same tower in float32, clip by clip (cosine).

    python bench/fp8_parity.py [--layers 32] [--seconds 0.3,1,3,10]

The issue's gate is a cosine of at least 0.999 for every clip; bench/RESULTS.md has the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from builders import speechlike  # noqa: E402
from extractor.constants import CONV_STRIDE, HOP_LENGTH, POOL_STRIDE, SAMPLE_RATE, encoder_tokens, mel_frames, output_frames  # noqa: E402
from extractor.model.config import EncoderConfig  # noqa: E402
from extractor.model.encoder import AudioEncoder, PackedSeqs  # noqa: E402
from extractor.model.logmel import LogMel  # noqa: E402

E4M3_MAX = 448.0


def e4m3(x: torch.Tensor) -> torch.Tensor:
    """x rounded as an e4m3 GEMM operand with one scale per row (its absolute maximum → 448)."""
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / E4M3_MAX
    return (x / scale).to(torch.float8_e4m3fn).to(torch.float32) * scale


def tower(layers: int, seed: int) -> AudioEncoder:
    torch.manual_seed(seed)
    enc = AudioEncoder(EncoderConfig.from_dict({"encoder_layers": layers}))
    with torch.no_grad():
        for name, p in enc.named_parameters():
            p.copy_(1 + 0.02 * torch.randn_like(p) if "layer_norm" in name and name.endswith("weight") else 0.02 * torch.randn_like(p))
    enc.prepare_for_inference()
    return enc


@torch.inference_mode()
def embedding(enc: AudioEncoder, logmel: LogMel, x: np.ndarray, fp8: bool) -> np.ndarray:
    n = len(x)
    tokens = encoder_tokens(mel_frames(n))
    padded = torch.zeros(1, HOP_LENGTH * (CONV_STRIDE * tokens + 3))
    padded[0, :n] = torch.from_numpy(x)
    mel = logmel(padded, torch.tensor([CONV_STRIDE * tokens + 1]))
    index = torch.arange(tokens)
    seqs = PackedSeqs(torch.tensor([0, tokens], dtype=torch.int32), [tokens], tokens)
    linear = F.linear
    if fp8:  # every F.linear of the layers (q/k/v, out_proj, fc1, fc2); the convolutions stay float32
        F.linear = lambda inp, w, b=None: linear(e4m3(inp), e4m3(w), b)
    try:
        h = enc.embed_tokens(mel, index, index)
        frames = enc(h, seqs, POOL_STRIDE * torch.arange(output_frames(tokens)))
    finally:
        F.linear = linear
    return frames.double().mean(0).numpy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--seconds", default="0.3,1,3,10")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    enc, logmel = tower(args.layers, args.seed), LogMel(128)
    rows = []
    for i, s in enumerate(float(v) for v in args.seconds.split(",")):
        x = speechlike(s, SAMPLE_RATE, seed=i)
        ref, got = embedding(enc, logmel, x, False), embedding(enc, logmel, x, True)
        rows.append({"seconds": s, "cosine": float(ref @ got / (np.linalg.norm(ref) * np.linalg.norm(got)))})
    print(json.dumps({"layers": args.layers, "clips": rows, "min_cosine": min(r["cosine"] for r in rows),
                      "mean_cosine": float(np.mean([r["cosine"] for r in rows]))}, indent=2))


if __name__ == "__main__":
    main()
