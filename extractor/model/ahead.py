"""Start-up work done ahead, on a thread, while the main thread checks the output and decoding starts.

The first batch waits for three things in a row: torch's import, the tower's bytes, and the GPU's
libraries (the context, then cuBLAS, cuFFT and cuDNN on their first calls: ~0.7 s on an H100
host, bench/startup.py). `start` runs them ahead on two daemon threads:

  1. the tower's tensors are read once into the page cache, so that a cold cache is read from
     disk while torch imports (1.3 GB: about 1 s from a cold disk, 0.05 s when cached). Only the
     tower's byte ranges, from the safetensors headers: a 7B checkpoint's language-model tensors
     are not read. These are plain reads into one small buffer, on a thread of their own:
     posix_fadvise(WILLNEED) was measured to do nothing on the lent GPU host and on CI;
  2. torch and the model's stages are imported, on a second thread;
  3. on a CUDA device, its context is made and each library's first call is done with a tiny
     input, while the main thread reads the weights and moves them.

Nothing waits for the threads and nothing they do is needed for correctness: whoever needs a module
imports it (Python's import lock makes it wait), and a failed step is logged at DEBUG and left to
the main thread, which meets the same problem and reports it. This module imports no torch.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
import time
from pathlib import Path

from .config import coalesce, tower_files, tower_layout

logger = logging.getLogger(__name__)

READ_CHUNK_BYTES = 8 << 20


def start(model: str | os.PathLike | None, device: str | None) -> list[threading.Thread]:
    """Start the threads; `device` as the job's --device (cpu, auto, cuda, cuda:N)."""
    threads = [threading.Thread(target=_import_and_warm, args=(device,), name="import-ahead", daemon=True)]
    if model is not None:
        threads.append(threading.Thread(target=_read, args=(model,), name="read-ahead", daemon=True))
    for thread in threads:
        thread.start()
    return threads


def _read(model) -> None:
    try:
        t = time.monotonic()
        n = read_tower(Path(model))
        logger.debug("start-up: %.2f GB of tower tensors read ahead in %.2f s", n / 1e9, time.monotonic() - t)
    except Exception as e:  # the load reports a bad checkpoint with its own message
        logger.debug("start-up: no read-ahead of %s (%s)", model, e)


def _import_and_warm(device) -> None:
    try:
        importlib.import_module("extractor.model.load")
    except Exception as e:
        logger.debug("start-up: import ahead failed (%s); the main thread will import", e)
        return
    if device is not None:
        try:
            warm_device(device)
        except Exception as e:
            logger.debug("start-up: no device warm-up on %s (%s)", device, e)


def read_tower(model_dir: Path) -> int:
    """Read the tower's tensors once, into one reused buffer (the page cache keeps them); returns
    the bytes read. The reads let go of the interpreter: nothing else waits for them."""
    buf = memoryview(bytearray(READ_CHUNK_BYTES))
    done = 0
    for path in tower_files(model_dir):
        layout = tower_layout(path)
        fd = os.open(path, os.O_RDONLY)
        try:
            for offset, end in coalesce([(a, b) for _, _, a, b in layout.values()]):
                while offset < end:
                    n = os.preadv(fd, [buf[: min(len(buf), end - offset)]], offset)
                    if n <= 0:
                        break  # a file shorter than its header says: the load reports it
                    offset += n
                    done += n
        finally:
            os.close(fd)
    return done


def warm_device(device: str) -> None:
    """Make the CUDA context of `device` and do the first call of each library the encoder uses
    (cuBLAS/cuBLASLt, cuFFT, cuDNN), each on a tiny input but cuFFT, which makes the one plan that
    LogMel.stft uses for every batch: the libraries load once per process."""
    import torch

    if not device.startswith(("cuda", "auto")) or not torch.cuda.is_available():
        return
    dev = torch.device("cuda") if device == "auto" else torch.device(device)
    index = dev.index if dev.index is not None else 0
    with torch.cuda.device(index):
        cuda = torch.device("cuda", index)
        x = torch.ones(8, 64, device=cuda, dtype=torch.bfloat16)
        w = torch.ones(64, 64, device=cuda, dtype=torch.bfloat16)
        x @ w  # cuBLAS
        torch._addmm_activation(w[0], x, w.t(), use_gelu=True)  # cuBLASLt, with the GELU epilogue
        # cuFFT, with the one plan LogMel.stft uses for every batch: made here, not on the first batch
        from ..constants import N_FFT
        from .logmel import FFT_FRAMES

        spectrum = torch.fft.rfft(torch.zeros(FFT_FRAMES, N_FFT, device=cuda))
        conv = torch.nn.functional.conv1d(torch.zeros(1, 8, 16, device=cuda, dtype=torch.bfloat16),
                                          torch.zeros(8, 8, 3, device=cuda, dtype=torch.bfloat16), padding=1)  # cuDNN
        torch.cuda.synchronize(index)
        del x, w, spectrum, conv
    logger.debug("start-up: %s warmed up", cuda)
