"""Attention on a GPU, measured for the encoder's shapes: first-call costs of each entry point in a
fresh process, and throughput of the backends on windows of 1500 tokens (20 heads of 64).

    python bench/attention_probe.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

FIRST = r'''
import sys, time, torch
dev = torch.device("cuda"); torch.zeros(1, device=dev); torch.cuda.synchronize()
q = torch.randn(4096, 20, 64, device=dev, dtype=torch.bfloat16)
cu = torch.tensor([0, 1500, 3000, 4096], device=dev, dtype=torch.int32)
t = time.perf_counter()
if sys.argv[1] == "varlen_attn":
    from torch.nn.attention.varlen import varlen_attn
    varlen_attn(q, q, q, cu, cu, 1500, 1500, scale=1.0)
else:
    torch.ops.aten._flash_attention_forward(q, q, q, cu, cu, 1500, 1500, 0.0, False, False, scale=1.0)
torch.cuda.synchronize()
print(time.perf_counter() - t)
'''


def first_call(kind: str) -> float:
    r = subprocess.run([sys.executable, "-c", FIRST, kind], check=True, capture_output=True, text=True)
    return round(float(r.stdout.strip().splitlines()[-1]), 3)


def main() -> None:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = {"first varlen_attn": first_call("varlen_attn"), "first aten._flash_attention_forward": first_call("aten")}
    dev = torch.device("cuda")
    S, H, hd = 1500, 20, 64
    for B in (4, 17, 21):
        flops = 4 * B * S * S * H * hd
        q = torch.randn(B, H, S, hd, device=dev, dtype=torch.bfloat16)
        packed = q.transpose(1, 2).reshape(B * S, H, hd).contiguous()
        cu = torch.arange(0, (B + 1) * S, S, device=dev, dtype=torch.int32)

        def bench(fn, n=20):
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(n):
                fn()
            torch.cuda.synchronize()
            return round(flops * n / (time.perf_counter() - t) / 1e12, 1)

        row = {"varlen flash (aten)": bench(lambda: torch.ops.aten._flash_attention_forward(packed, packed, packed, cu, cu, S, S, 0.0, False, False, scale=1.0))}
        for name, backend in (("sdpa flash", SDPBackend.FLASH_ATTENTION), ("sdpa cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa efficient", SDPBackend.EFFICIENT_ATTENTION)):
            try:
                with sdpa_kernel(backend):
                    t0 = time.perf_counter()
                    F.scaled_dot_product_attention(q, q, q, scale=1.0)
                    torch.cuda.synchronize()
                    first = time.perf_counter() - t0
                    row[name] = bench(lambda: F.scaled_dot_product_attention(q, q, q, scale=1.0))
                    row[name + " first s"] = round(first, 3)
            except Exception as e:  # a backend this build or shape does not take
                row[name] = f"unavailable: {type(e).__name__}: {str(e)[:80]}"
        out[f"TFLOP/s, {B} windows of {S}"] = row
        print(json.dumps({B: row}), flush=True)
    print(json.dumps(out, indent=1), flush=True)


if __name__ == "__main__":
    main()
