"""Where does start-up time go? Imports, tower read + fingerprint, LoRA merge, move to device.

    python bench/startup.py MODEL_DIR ADAPTER_DIR [--device cuda]
"""

import sys
import time

t0 = time.perf_counter()
import torch  # noqa: E402

t_torch = time.perf_counter()
import extractor.pipeline  # noqa: E402,F401

t_pipeline = time.perf_counter()
import peft  # noqa: E402,F401

t_peft = time.perf_counter()
print(f"import torch {t_torch - t0:.2f} s, extractor.pipeline {t_pipeline - t_torch:.2f} s, peft {t_peft - t_pipeline:.2f} s", flush=True)

import logging  # noqa: E402

logging.basicConfig(level="DEBUG", format="%(asctime)s %(name)s: %(message)s")
for noisy in ("urllib3", "filelock", "fsspec"):
    logging.getLogger(noisy).setLevel("WARNING")
from pathlib import Path  # noqa: E402

from extractor.model import load_model  # noqa: E402

device = torch.device(sys.argv[sys.argv.index("--device") + 1] if "--device" in sys.argv else "cuda")
t = time.perf_counter()
m = load_model(Path(sys.argv[1]), Path(sys.argv[2]), device, torch.bfloat16 if device.type == "cuda" else torch.float32)
if device.type == "cuda":
    torch.cuda.synchronize()
print(f"load_model {time.perf_counter() - t:.2f} s; total {time.perf_counter() - t0:.2f} s", flush=True)
