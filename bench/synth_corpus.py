"""A seeded corpus of speech-like 16 kHz mono FLAC files and its Parquet manifest (columns id, path).

Cheap on purpose: every process builds the same small bank of voiced "syllables" (a gliding
harmonic source with a vowel-like spectral peak under a smooth envelope) once, and a clip is
syllables and pauses drawn from that bank plus a faint noise floor. So generating a clip costs
about as much as encoding it, and the FLACs stay speech-sized (~15 KB per second of audio);
white noise at full scale would make them several times larger and slower to decode.

Only numpy, soundfile and pyarrow are imported here: the pool's worker processes are spawned and
must not pay for torch.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np

SR = 16_000
BANK_SEED = 1234
BANK_SIZE = 64
NOISE_FLOOR = 0.0005  # ~-66 dBFS: pauses are not digital silence, and FLAC still compresses well
FORMAT_VERSION = 1  # bump when the signal recipe changes, so a cached corpus is regenerated
CHUNK = 64  # clips per pool task

_bank: list[np.ndarray] | None = None


def _syllable_bank() -> list[np.ndarray]:
    rng = np.random.default_rng(BANK_SEED)
    bank = []
    for _ in range(BANK_SIZE):
        n = int(rng.uniform(0.15, 0.6) * SR)
        t = np.arange(n) / SR
        f0 = rng.uniform(90, 220) * (1 + rng.uniform(-0.2, 0.2) * t / t[-1])  # gliding pitch
        f0 = f0 * (1 + 0.05 * np.sin(2 * np.pi * rng.uniform(3, 7) * t))  # and a little vibrato
        phase = 2 * np.pi * np.cumsum(f0) / SR
        formant = rng.uniform(400, 1200)
        voiced = np.zeros(n)
        for k in range(1, 13):
            gain = (1.0 / k) * (1.0 + 2.0 * np.exp(-(((k * f0.mean()) - formant) / 300.0) ** 2))
            voiced += gain * np.sin(k * phase)
        voiced *= np.sin(np.pi * np.arange(n) / n) ** 0.7  # envelope
        bank.append((voiced / np.abs(voiced).max()).astype(np.float32))
    return bank


def speechlike(index: int, num_samples: int, seed: int) -> np.ndarray:
    """Clip `index` of corpus `seed`: deterministic whatever process or order generates it."""
    global _bank
    if _bank is None:
        _bank = _syllable_bank()
    rng = np.random.default_rng([seed, index])
    out = np.zeros(num_samples, dtype=np.float32)
    pos = int(rng.uniform(0.0, 0.1) * SR)
    while pos < num_samples:
        syl = _bank[rng.integers(len(_bank))]
        m = min(len(syl), num_samples - pos)
        out[pos:pos + m] = syl[:m] * rng.uniform(0.1, 0.3)
        pos += m + int(rng.uniform(0.05, 0.3) * SR)  # pause
    out += NOISE_FLOOR * rng.standard_normal(num_samples, dtype=np.float32)
    return out


def clip_path(root: Path, index: int) -> Path:
    # 1000 files per folder: directory listings stay fast on any filesystem.
    return root / f"{index // 1000:03d}" / f"c{index:06d}.flac"


def _write_chunk(args: tuple[str, int, list[tuple[int, int]]]) -> int:
    import soundfile as sf

    root, seed, items = args
    written = 0
    for index, n in items:
        path = clip_path(Path(root), index)
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(str(path), speechlike(index, n, seed), SR, format="FLAC", subtype="PCM_16")
        written += path.stat().st_size
    return written


def plan(clips: int, seed: int, min_s: float, max_s: float) -> np.ndarray:
    """Sample counts of every clip: durations uniform in [min_s, max_s]."""
    rng = np.random.default_rng(seed)
    return np.round(rng.uniform(min_s, max_s, clips) * SR).astype(np.int64)


def build_corpus(root: Path, clips: int, seed: int, min_s: float, max_s: float, workers: int | None = None) -> dict:
    """Write the corpus under `root` (reused if an identical one is already there); return its stats."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(root)
    stamp_path = root / "corpus.json"
    params = {"clips": clips, "seed": seed, "min_s": min_s, "max_s": max_s, "sample_rate": SR, "version": FORMAT_VERSION}
    if stamp_path.exists():
        stamp = json.loads(stamp_path.read_text())
        if stamp.get("params") == params:
            return {**stamp["stats"], "reused": True}

    t0 = time.perf_counter()
    samples = plan(clips, seed, min_s, max_s)
    items = list(enumerate(samples.tolist()))
    tasks = [(str(root), seed, items[i:i + CHUNK]) for i in range(0, len(items), CHUNK)]
    workers = workers or os.cpu_count() or 1
    root.mkdir(parents=True, exist_ok=True)
    # spawn, not fork: the parent may already hold a CUDA context and torch's thread pools.
    with mp.get_context("spawn").Pool(workers) as pool:
        total_bytes = sum(pool.imap_unordered(_write_chunk, tasks))

    manifest = root / "manifest.parquet"
    pq.write_table(
        pa.table({"id": [f"c{i:06d}" for i in range(clips)], "path": [str(clip_path(root, i)) for i in range(clips)]}),
        manifest,
    )
    durations = samples / SR
    stats = {
        "root": str(root),
        "manifest": str(manifest),
        "clips": clips,
        "seed": seed,
        "audio_seconds": float(durations.sum()),
        "audio_hours": float(durations.sum() / 3600),
        "min_s": float(durations.min()),
        "mean_s": float(durations.mean()),
        "max_s": float(durations.max()),
        "flac_bytes": int(total_bytes),
        "generated_in_s": round(time.perf_counter() - t0, 2),
        "workers": workers,
    }
    stamp_path.write_text(json.dumps({"params": params, "stats": stats}, indent=2))
    return {**stats, "reused": False}

