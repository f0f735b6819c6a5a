"""Seeded speech-like corpora (FLAC, WAV, MP3 or Ogg Opus; any rate; mono or stereo) and their
Parquet manifests (columns id, path).

Cheap on purpose: every process builds the same small bank of voiced "syllables" (a gliding
harmonic source with a vowel-like spectral peak under a smooth envelope) once per sample rate, and
a clip is syllables and pauses drawn from that bank plus a faint noise floor. So generating a clip
costs less than encoding it, and the files stay speech-sized (~15 KB per second of 16 kHz FLAC);
white noise at full scale would make them several times larger and slower to decode, and codecs
would not behave as they do on speech.

The bank is drawn from the same seeded stream at every rate, so a 48 kHz corpus has the same
"voice" as a 16 kHz one; at 16 kHz mono FLAC the signal is bit for bit the one the benchmark of
issue 3 used (FORMAT_VERSION 1).

Only numpy, soundfile and pyarrow are imported here (PyAV lazily, for MP3 and Opus): the pool's
worker processes are spawned and must not pay for torch.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

SR = 16_000  # Hz: the encoder's rate, and the default corpus's
BANK_SEED = 1234
BANK_SIZE = 64
NOISE_FLOOR = 0.0005  # ~-66 dBFS: pauses are not digital silence, and FLAC still compresses well
FORMAT_VERSION = 2  # bump when the signal recipe or the file layout changes, so a cached corpus is regenerated
TASK_AUDIO_S = 240.0  # audio per pool task: short clips go in dozens, a podcast alone
# MP3 as Common Voice ships it: 48 kHz mono at 64 kbit/s CBR, with a LAME/Info header (gapless
# length). LAME's algorithm quality 7 encodes ~3x faster than libsndfile's default (measured 116x
# vs 39x realtime for 6 s at 48 kHz); the decoder's cost does not depend on it.
MP3_BITRATE = 64_000
MP3_LAME_QUALITY = 7
# Opus as voice notes and WebRTC recordings carry it: Ogg, 48 kHz, 24 kbit/s (SILK and hybrid
# frames on speech), FFmpeg's libopus at its default complexity.
OPUS_BITRATE = 24_000
OPUS_ENCODER = f"pyav-libopus-{OPUS_BITRATE // 1000}k"
CONTAINERS = ("flac", "wav", "mp3", "opus")

_banks: dict[int, list[np.ndarray]] = {}


@dataclass(frozen=True)
class CorpusSpec:
    """What a corpus is: its files' count, durations, rate, channels and container, and its seed."""

    clips: int
    seed: int
    min_s: float
    max_s: float
    sample_rate: int = SR
    channels: int = 1
    container: str = "flac"

    def __post_init__(self):
        if self.container not in CONTAINERS:
            raise ValueError(f"container {self.container!r}: expected one of {CONTAINERS}")
        if self.channels not in (1, 2):
            raise ValueError(f"channels {self.channels}: the generator writes mono or stereo")
        if not (0 < self.min_s <= self.max_s) or self.clips < 1:
            raise ValueError(f"need clips >= 1 and 0 < min_s <= max_s, got {self}")


def _syllable_bank(sample_rate: int) -> list[np.ndarray]:
    rng = np.random.default_rng(BANK_SEED)
    bank = []
    for _ in range(BANK_SIZE):
        n = int(rng.uniform(0.15, 0.6) * sample_rate)
        t = np.arange(n) / sample_rate
        f0 = rng.uniform(90, 220) * (1 + rng.uniform(-0.2, 0.2) * t / t[-1])  # gliding pitch
        f0 = f0 * (1 + 0.05 * np.sin(2 * np.pi * rng.uniform(3, 7) * t))  # and a little vibrato
        phase = 2 * np.pi * np.cumsum(f0) / sample_rate
        formant = rng.uniform(400, 1200)
        voiced = np.zeros(n)
        for k in range(1, 13):
            gain = (1.0 / k) * (1.0 + 2.0 * np.exp(-(((k * f0.mean()) - formant) / 300.0) ** 2))
            voiced += gain * np.sin(k * phase)
        voiced *= np.sin(np.pi * np.arange(n) / n) ** 0.7  # envelope
        bank.append((voiced / np.abs(voiced).max()).astype(np.float32))
    return bank


def speechlike(index: int, num_samples: int, seed: int, sample_rate: int = SR) -> np.ndarray:
    """Clip `index` of corpus `seed`, mono: deterministic whatever process or order generates it."""
    bank = _banks.get(sample_rate)
    if bank is None:
        bank = _banks[sample_rate] = _syllable_bank(sample_rate)
    rng = np.random.default_rng([seed, index])
    out = np.zeros(num_samples, dtype=np.float32)
    pos = int(rng.uniform(0.0, 0.1) * sample_rate)
    while pos < num_samples:
        syl = bank[rng.integers(len(bank))]
        m = min(len(syl), num_samples - pos)
        out[pos:pos + m] = syl[:m] * rng.uniform(0.1, 0.3)
        pos += m + int(rng.uniform(0.05, 0.3) * sample_rate)  # pause
    out += NOISE_FLOOR * rng.standard_normal(num_samples, dtype=np.float32)
    return out


def stereo(mono: np.ndarray, index: int, seed: int, sample_rate: int) -> np.ndarray:
    """(n, 2): two microphones on one talker, the right one a little later and quieter; so a
    downmix is real work, and FLAC's mid/side finds no identical channels."""
    rng = np.random.default_rng([seed, index, 2])
    delay = max(1, int(rng.uniform(0.0002, 0.001) * sample_rate))
    out = np.empty((len(mono), 2), dtype=np.float32)
    np.multiply(mono, np.float32(rng.uniform(0.8, 1.0)), out=out[:, 0])
    out[:delay, 1] = 0.0
    np.multiply(mono[:-delay], np.float32(rng.uniform(0.6, 0.9)), out=out[delay:, 1])
    return out


def clip_path(root: Path, index: int, container: str = "flac") -> Path:
    # 1000 files per folder: directory listings stay fast on any filesystem.
    return root / f"{index // 1000:03d}" / f"c{index:06d}.{container}"


def mp3_encoder() -> str:
    """Which MP3 encoder this machine has: PyAV's libmp3lame (fast) or libsndfile's LAME."""
    try:
        import av

        if "libmp3lame" in av.codecs_available:
            return f"pyav-libmp3lame-q{MP3_LAME_QUALITY}-{MP3_BITRATE // 1000}k"
    except ImportError:
        pass
    return "libsndfile-lame"


def _write_mp3_pyav(path: Path, x: np.ndarray, sample_rate: int) -> None:
    import av

    planar = np.ascontiguousarray(x.reshape(len(x), -1).T)  # (channels, n)
    layout = "mono" if planar.shape[0] == 1 else "stereo"
    with av.open(str(path), "w", format="mp3") as container:
        stream = container.add_stream("libmp3lame", rate=sample_rate, layout=layout)
        stream.bit_rate = MP3_BITRATE
        stream.codec_context.options = {"compression_level": str(MP3_LAME_QUALITY)}
        frame = av.AudioFrame.from_ndarray(planar, format="fltp", layout=layout)
        frame.sample_rate = sample_rate
        for packet in stream.encode(frame):  # PyAV cuts the signal into LAME's 1152-sample frames
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def write_opus(path: Path, x: np.ndarray, sample_rate: int, bitrate: int = OPUS_BITRATE) -> None:
    """Ogg Opus through PyAV's libopus; `x` at 48 kHz (the rate Opus streams declare)."""
    import av

    planar = np.ascontiguousarray(x.reshape(len(x), -1).T, dtype=np.float32)  # (channels, n)
    layout = "mono" if planar.shape[0] == 1 else "stereo"
    with av.open(str(path), "w", format="ogg") as container:
        stream = container.add_stream("libopus", rate=sample_rate, layout=layout)
        stream.bit_rate = bitrate
        frame = av.AudioFrame.from_ndarray(planar, format="fltp", layout=layout)
        frame.sample_rate = sample_rate
        for packet in stream.encode(frame):  # PyAV cuts the signal into Opus's 20 ms frames
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def write_audio(path: Path, x: np.ndarray, sample_rate: int, container: str, encoder: str | None = None) -> None:
    import soundfile as sf

    if container == "flac":
        sf.write(str(path), x, sample_rate, format="FLAC", subtype="PCM_16")
    elif container == "wav":
        sf.write(str(path), x, sample_rate, format="WAV", subtype="PCM_16")
    elif container == "opus":
        write_opus(path, x, sample_rate)
    elif (encoder or mp3_encoder()).startswith("pyav"):
        _write_mp3_pyav(path, x, sample_rate)
    else:
        sf.write(str(path), x, sample_rate, format="MP3")


def _write_task(task: tuple) -> tuple[str, int, float]:
    """One pool task: write some clips of one corpus; (its root, bytes written, CPU seconds)."""
    root, spec_dict, encoder, items = task
    spec = CorpusSpec(**spec_dict)
    cpu = time.process_time()
    written = 0
    for index, n in items:
        path = clip_path(Path(root), index, spec.container)
        path.parent.mkdir(parents=True, exist_ok=True)
        x = speechlike(index, n, spec.seed, spec.sample_rate)
        if spec.channels == 2:
            x = stereo(x, index, spec.seed, spec.sample_rate)
        write_audio(path, x, spec.sample_rate, spec.container, encoder)
        written += path.stat().st_size
    return root, written, time.process_time() - cpu


def plan(clips: int, seed: int, min_s: float, max_s: float, sample_rate: int = SR) -> np.ndarray:
    """Sample counts of every clip, at the file's rate: durations uniform in [min_s, max_s]."""
    rng = np.random.default_rng(seed)
    return np.round(rng.uniform(min_s, max_s, clips) * sample_rate).astype(np.int64)


def encoder_of(spec: CorpusSpec, mp3: str | None) -> str | None:
    """The lossy encoder a corpus's files come from (None for FLAC and WAV)."""
    return {"mp3": mp3, "opus": OPUS_ENCODER}.get(spec.container)


def _params(spec: CorpusSpec, encoder: str | None) -> dict:
    return {**asdict(spec), "encoder": encoder_of(spec, encoder), "version": FORMAT_VERSION}


def _cached(root: Path, params: dict) -> dict | None:
    stamp_path = root / "corpus.json"
    if stamp_path.exists():
        stamp = json.loads(stamp_path.read_text())
        if stamp.get("params") == params and Path(stamp["stats"]["manifest"]).exists():
            return {**stamp["stats"], "reused": True}
    return None


def build_corpora(corpora: list[tuple[Path, CorpusSpec]], workers: int | None = None,
                  log: Callable[[str], None] | None = None) -> list[dict]:
    """Write every corpus under its root (each reused if an identical one is already there), in one
    pool over all of them so every core stays busy to the end; return their stats, in order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    encoder = mp3_encoder() if any(s.container == "mp3" for _, s in corpora) else None
    results: list[dict | None] = []
    todo: list[tuple[Path, CorpusSpec, np.ndarray]] = []
    for root, spec in corpora:
        cached = _cached(Path(root), _params(spec, encoder))
        results.append(cached)
        if cached is None:
            todo.append((Path(root), spec, plan(spec.clips, spec.seed, spec.min_s, spec.max_s, spec.sample_rate)))
    if not todo:
        return results  # type: ignore[return-value]

    t0 = time.perf_counter()
    tasks = []
    for root, spec, samples in todo:
        root.mkdir(parents=True, exist_ok=True)
        for old in root.glob("*/c*.*"):  # a corpus of other parameters; its manifest goes below
            old.unlink()
        per_task = max(1, int(TASK_AUDIO_S * spec.sample_rate // max(1, int(samples.mean()))))
        items = list(enumerate(samples.tolist()))
        cost = spec.channels * spec.sample_rate * {"mp3": 8, "opus": 8}.get(spec.container, 1)  # rough CPU per clip-second
        for i in range(0, len(items), per_task):
            chunk = items[i:i + per_task]
            tasks.append((cost * sum(n for _, n in chunk), (str(root), asdict(spec), encoder, chunk)))
    tasks.sort(key=lambda t: -t[0])  # the costliest first: the pool's tail stays short
    workers = max(1, min(workers or os.cpu_count() or 1, len(tasks)))
    written: dict[str, int] = {}
    cpu: dict[str, float] = {}
    # spawn, not fork: the parent may already hold a CUDA context and torch's thread pools.
    with mp.get_context("spawn").Pool(workers) as pool:
        for root, nbytes, seconds in pool.imap_unordered(_write_task, [t for _, t in tasks]):
            written[root] = written.get(root, 0) + nbytes
            cpu[root] = cpu.get(root, 0.0) + seconds
    seconds = time.perf_counter() - t0

    fresh = iter(todo)
    for k, (root, spec) in enumerate(corpora):
        if results[k] is not None:
            continue
        root, spec, samples = next(fresh)
        manifest = root / "manifest.parquet"
        pq.write_table(
            pa.table({"id": [f"c{i:06d}" for i in range(spec.clips)],
                      "path": [str(clip_path(root, i, spec.container)) for i in range(spec.clips)]}),
            manifest,
        )
        durations = samples / spec.sample_rate
        stats = {
            "root": str(root), "manifest": str(manifest), **asdict(spec),
            "encoder": encoder_of(spec, encoder),
            "audio_seconds": float(durations.sum()), "audio_hours": float(durations.sum() / 3600),
            "mean_s": float(durations.mean()), "shortest_s": float(durations.min()), "longest_s": float(durations.max()),
            "bytes": int(written.get(str(root), 0)),
            # CPU seconds of its workers: what it costs on any number of cores (wall time is shared).
            "cpu_s": round(cpu.get(str(root), 0.0), 3),
            # The pool is shared by every corpus built in this call: its time is theirs together.
            "generated_in_s": round(seconds, 2), "generated_together": len(todo), "workers": workers,
        }
        (root / "corpus.json").write_text(json.dumps({"params": _params(spec, encoder), "stats": stats}, indent=2))
        results[k] = {**stats, "reused": False}
        if log:
            log(f"corpus {root.name}: {spec.clips:,} {spec.container} files, {stats['audio_hours']:.2f} h, {stats['bytes'] / 1e9:.2f} GB")
    return results  # type: ignore[return-value]


def build_corpus(root: Path, clips: int, seed: int, min_s: float, max_s: float, workers: int | None = None) -> dict:
    """The benchmark's own corpus (issue 3): 16 kHz mono FLACs. Reused if already there."""
    stats = build_corpora([(Path(root), CorpusSpec(clips, seed, min_s, max_s))], workers)[0]
    return {**stats, "flac_bytes": stats["bytes"]}
