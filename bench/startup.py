"""Where does start-up time go? Each step timed in a fresh interpreter, then the first call of each
kind of CUDA work in one process (library loads, handles, kernel modules).

    python bench/startup.py                      # on a GPU machine; prints one JSON object
"""

from __future__ import annotations

import json
import subprocess
import sys
import time


def fresh(code: str, repeats: int = 2) -> float:
    """Best wall time of `python -c code` (an interpreter's start included)."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        best = min(best, time.perf_counter() - t)
    return round(best, 3)


FIRSTS = r'''
import json, time
t = time.perf_counter()
import torch
r = {"import torch": time.perf_counter() - t}
def step(name, fn):
    t = time.perf_counter(); fn(); torch.cuda.synchronize(); r[name] = time.perf_counter() - t
dev = torch.device("cuda")
step("cuda context", lambda: torch.zeros(1, device=dev))
w = torch.randn(8, 32000, device=dev)
step("first stft (cuFFT)", lambda: torch.stft(w, 400, 160, window=torch.hann_window(400, device=dev), return_complex=True))
x = torch.randn(8, 128, 200, device=dev, dtype=torch.bfloat16)
c = torch.nn.Conv1d(128, 1280, 3, padding=1).to(dev, torch.bfloat16)
step("first conv1d bf16 (cuDNN)", lambda: c(x))
a = torch.randn(4096, 1280, device=dev, dtype=torch.bfloat16); b = torch.randn(1280, 1280, device=dev, dtype=torch.bfloat16)
step("first matmul bf16 (cuBLAS)", lambda: a @ b)
bias = torch.randn(5120, device=dev, dtype=torch.bfloat16); w1 = torch.randn(5120, 1280, device=dev, dtype=torch.bfloat16)
step("first GEMM + GELU epilogue (cuBLASLt)", lambda: torch._addmm_activation(bias, a, w1.t(), use_gelu=True))
t = time.perf_counter()
from torch.nn.attention.varlen import varlen_attn
r["import varlen_attn"] = time.perf_counter() - t
q = torch.randn(4096, 20, 64, device=dev, dtype=torch.bfloat16)
cu = torch.tensor([0, 1500, 3000, 4096], device=dev, dtype=torch.int32)
step("first varlen_attn (FlashAttention)", lambda: varlen_attn(q, q, q, cu, cu, 1500, 1500, scale=1.0))
step("layer_norm", lambda: torch.nn.functional.layer_norm(a, (1280,)))
print(json.dumps({k: round(v, 3) for k, v in r.items()}))
'''


def main() -> None:
    out = {
        "python -c pass": fresh("pass"),
        "import torch": fresh("import torch"),
        "import torch + CUDA context": fresh("import torch; torch.zeros(1, device='cuda'); torch.cuda.synchronize()"),
        "import jobs.extract (the CLI)": fresh("import jobs.extract"),
        "import polars, pyarrow": fresh("import polars, pyarrow, pyarrow.parquet"),
        "import extractor.pipeline (no torch)": fresh("import extractor.pipeline"),
        "import extractor.model.load (torch)": fresh("import extractor.model.load"),
    }
    firsts = subprocess.run([sys.executable, "-c", FIRSTS], check=True, capture_output=True, text=True)
    out["firsts, one process"] = json.loads(firsts.stdout.strip().splitlines()[-1])
    print(json.dumps(out, indent=1), flush=True)


if __name__ == "__main__":
    main()
