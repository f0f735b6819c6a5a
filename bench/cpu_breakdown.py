"""Issue 10's CPU budget: CPU cost per audio-second, per stage of the job's host side, per corpus shape.

    python bench/cpu_breakdown.py                    # 20 min of audio per shape, ~1 min
    python bench/cpu_breakdown.py --audio-s 1800 --json bench/results/cpu_breakdown.json
    python bench/cpu_breakdown.py --opus-candidates  # Opus decoders on 40 espeak-ng clips, ~1 min

Measured on one core (the process is pinned to one CPU, torch to one thread), as CPU time
(thread or process CPU clocks, not wall time), so a busy machine inflates the figures less. For
each shape (bench/shapes.py) a few files of its corpus are generated first, with its own
generator and seed, then:

  decode worker    container decode (libsndfile; Opus: libopus through PyAV, its downmix
                   included), downmix (with its finite/peak checks), soxr HQ resampling to 16 kHz:
                   the same calls, block by block, as extractor.audio.decode;
                   then `decode_request` whole in this process, whose excess over those three is
                   the cutting into windows and the WindowBlock messages;
  hand-off         the decoded WindowBlocks through the pool's own wire functions over a pipe, the
                   sending and the receiving side each on a thread (their CPU clocks); and, as a
                   cross-check, the same requests through `DecodePool` with one worker process:
                   its CPU over the in-process decode, and this process's CPU (receiving,
                   unpickling and the pool's loop);
  main process     the received blocks through the job's per-window and per-row code: into the
                   window pool (as pipeline.Producer._receive does), packed into batches
                   (batching.packing, as Producer._emit), staged (batching.device.stage: index
                   arrays and the copy into a slot), pooled into rows (batching.pooling.RowPooling,
                   sums of the full model's width), and written (a Parquet part as the writer
                   builds it, zstd).

The table gives ms of CPU per audio-second, its multiple of realtime, and the cores needed to
feed --target audio-s/s (issue 10: 6,800 on one H100). Decode workers parallelise over cores; the
main process's stages share one interpreter (the GIL), so their sum must stay well under one core.

--opus-candidates times, on the same core, each way of turning Ogg Opus into 16 kHz samples, one
clip after another in turn (so a busy machine slows them alike): libsndfile read in the job's
blocks then soxr HQ (the job before decode.OPUS_DECODER), FFmpeg's own Opus decoder in the job's
code then soxr HQ, libopus through PyAV then soxr HQ (the job's path, its own code), and libopus decoding straight to
16 kHz (through ctypes, speed and fidelity only). The clips are espeak-ng speech encoded at three
bitrates by synth_corpus.write_opus; each candidate's waveform is compared, as it would be embedded
(no realignment), with libsndfile's decode of the whole file at once, then soxr HQ.

Only the standard library, numpy and shapes.py (which holds to the same) at module level:
DecodePool's fork server imports this file.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for _p in (str(HERE), str(REPO)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from shapes import descendants_cpu_s, requests_of  # noqa: E402  (after sys.path has bench/)

TARGET_AUDIO_S_PER_S = 6_800.0  # issue 10: what 16 cores must feed one H100 at MFU 0.6
OPUS_CLIPS = 40
OPUS_BITRATES = (12_000, 24_000, 64_000)  # SILK, SILK/hybrid and CELT frames on speech

WORKER_STAGES = ("decode", "downmix", "resample", "cut")
MAIN_STAGES = ("receive", "pool_windows", "pack", "stage", "rows", "write")
LABELS = {
    "decode": "container decode (libsndfile; Opus: PyAV)",
    "downmix": "downmix + finite/peak checks",
    "resample": "resample to 16 kHz (soxr HQ)",
    "cut": "windows + messages (rest of decode_request)",
    "worker_inprocess": "= decode_request, in-process",
    "send": "hand-off, worker side (pickle, pipe)",
    "worker": "= decode worker per audio-s",
    "receive": "hand-off, main side (receive, unpickle)",
    "pool_worker_excess": "DecodePool(1): worker CPU - in-process",
    "pool_main": "DecodePool(1): main process CPU",
    "pool_windows": "windows into the pool (split, shapes)",
    "pack": "packing batches (sort, plan, Batch)",
    "stage": "staging (indices, copy into slot)",
    "rows": "pooling rows (RowPooling add/done)",
    "write": "writing Parquet (zstd)",
    "main": "= main process per audio-s",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--audio-s", type=float, default=1200.0, help="audio per shape (at least one file; a podcast file is 10-14 min)")
    p.add_argument("--only", help="comma-separated shape names (default: all four)")
    p.add_argument("--work-dir", default="/tmp/qwen2-audio-bench/cpu-breakdown")
    p.add_argument("--cpu", type=int, help="the CPU to pin to (default: the first this process may use)")
    p.add_argument("--repeats", type=int, default=2, help="each measurement this many times; the least CPU counts")
    p.add_argument("--target", type=float, default=TARGET_AUDIO_S_PER_S, help="audio-s/s the cores must feed")
    p.add_argument("--json", help="also write the figures here")
    p.add_argument("--opus-candidates", action="store_true", help="time the Opus decoders instead of the shapes' stages")
    p.add_argument("--opus-clips", type=int, default=OPUS_CLIPS, help="espeak-ng clips per bitrate for --opus-candidates")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------


def stages_of_decode(paths: list[str]) -> dict[str, float]:
    """CPU seconds of decode / downmix / resample, block by block as extractor.audio.decode does."""
    import soundfile as sf
    import soxr

    from extractor.audio.decode import BLOCK_SECONDS, RESAMPLE_QUALITY
    from extractor.audio.pcm import downmix  # the job's own
    from extractor.constants import SAMPLE_RATE

    cpu = dict.fromkeys(("decode", "downmix", "resample"), 0.0)
    clock = time.thread_time
    for path in paths:
        if _is_opus(path):
            _, seconds = _job_opus(path)
            cpu["decode"] += seconds["decode"]
            cpu["resample"] += seconds["resample"]
            continue
        t = clock()
        f = sf.SoundFile(path)
        rate, channels = f.samplerate, f.channels
        resampler = None if rate == SAMPLE_RATE else soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32", quality=RESAMPLE_QUALITY)
        cpu["decode"] += clock() - t
        block = int(rate * BLOCK_SECONDS)
        pos = 0
        while True:
            t0 = clock()
            data = f.read(block, dtype="float32", always_2d=True)
            t1 = clock()
            cpu["decode"] += t1 - t0
            if len(data) == 0:
                break
            mono = downmix(data, path, pos, rate)
            t2 = clock()
            cpu["downmix"] += t2 - t1
            pos += len(data)
            if resampler is not None:
                resampler.resample_chunk(mono)
                cpu["resample"] += clock() - t2
        if resampler is not None:
            t = clock()
            resampler.resample_chunk(np.zeros(0, np.float32), last=True)
            cpu["resample"] += clock() - t
        f.close()
    return cpu


def _is_opus(path: str) -> bool:
    from extractor.audio.decode import _OGG_OPUS_SNIFF_BYTES, _is_ogg_opus

    with open(path, "rb") as f:
        return _is_ogg_opus(f.read(_OGG_OPUS_SNIFF_BYTES))


def _resample(blocks, rate: int, seconds: dict) -> np.ndarray:
    """soxr HQ to 16 kHz, streamed block by block as the job does; its CPU into seconds["resample"]."""
    import soxr

    from extractor.audio.decode import RESAMPLE_QUALITY
    from extractor.constants import SAMPLE_RATE

    clock = time.thread_time
    stream = soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32", quality=RESAMPLE_QUALITY)
    out = []
    blocks = iter(blocks)
    while True:
        t0 = clock()
        block = next(blocks, None)
        t1 = clock()
        seconds["decode"] += t1 - t0
        out.append(stream.resample_chunk(np.zeros(0, np.float32) if block is None else block, last=block is None))
        seconds["resample"] += clock() - t1
        if block is None:
            return np.concatenate(out)


def _job_opus(path: str) -> tuple[np.ndarray, dict]:
    """The job's path (decode._open: libopus through PyAV), its downmix included."""
    from extractor.audio.decode import _open
    from extractor.audio.sources import open_source

    seconds = {"decode": 0.0, "resample": 0.0}
    t = time.thread_time()
    src = open_source(path, max_duration_s=math.inf)
    source = _open(src)
    seconds["decode"] += time.thread_time() - t
    out = _resample(source.blocks(0), source.rate, seconds)
    source.close()
    src.close()
    return out, seconds


def _libsndfile_opus(path: str) -> tuple[np.ndarray, dict]:
    """The job before OPUS_DECODER: libsndfile (its own libopus) read in the job's blocks, soxr HQ."""
    import soundfile as sf

    from extractor.audio.decode import BLOCK_SECONDS

    seconds = {"decode": 0.0, "resample": 0.0}
    t = time.thread_time()
    with sf.SoundFile(path) as f:
        seconds["decode"] += time.thread_time() - t
        n = int(f.samplerate * BLOCK_SECONDS)
        out = _resample(_read_blocks(f, n), f.samplerate, seconds)
    return out, seconds


def _read_blocks(f, n: int):
    while len(block := f.read(n, dtype="float32")):
        yield block


def _ffmpeg_opus(path: str) -> tuple[np.ndarray, dict]:
    """FFmpeg's own Opus decoder (PyAV's default for Opus) in the job's code around it, soxr HQ."""
    from extractor.audio.decode import _AvSource
    from extractor.audio.sources import open_source

    class FFmpegOpus(_AvSource):
        def _decoded(self, stream):
            return self._container.decode(stream)

    seconds = {"decode": 0.0, "resample": 0.0}
    t = time.thread_time()
    src = open_source(path, max_duration_s=math.inf)
    source = FFmpegOpus(src)
    seconds["decode"] += time.thread_time() - t
    out = _resample(source.blocks(0), source.rate, seconds)
    source.close()
    src.close()
    return out, seconds


class _Libopus16k:
    """libopus decoding straight to 16 kHz through ctypes (the library PyAV ships), packets from
    PyAV's demuxer; the pre-skip and the end trimming applied by hand, at 16 kHz."""

    MAX_FRAME = 5760  # 120 ms at 48 kHz, the longest Opus packet

    def __init__(self):
        import ctypes
        import ctypes.util

        import av

        found = sorted((Path(av.__file__).resolve().parent.parent / "av.libs").glob("libopus*.so*"))
        name = str(found[0]) if found else ctypes.util.find_library("opus")
        if name is None:
            raise OSError("no libopus to load")
        lib = ctypes.CDLL(name)
        lib.opus_decoder_create.restype = ctypes.c_void_p
        lib.opus_decoder_create.argtypes = [ctypes.c_int32, ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
        lib.opus_decode_float.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int32, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        lib.opus_decoder_destroy.argtypes = [ctypes.c_void_p]
        lib.opus_get_version_string.restype = ctypes.c_char_p
        self.lib, self.ctypes, self.av = lib, ctypes, av
        self.version = lib.opus_get_version_string().decode()

    def __call__(self, path: str) -> tuple[np.ndarray, dict]:
        import struct

        from extractor.constants import SAMPLE_RATE

        lib, ctypes = self.lib, self.ctypes
        t = time.thread_time()
        error = ctypes.c_int()
        decoder = lib.opus_decoder_create(SAMPLE_RATE, 1, ctypes.byref(error))
        buf = np.empty(self.MAX_FRAME, np.float32)
        out = []
        with self.av.open(path) as container:
            stream = container.streams.audio[0]
            pre_skip = struct.unpack_from("<H", bytes(stream.codec_context.extradata), 10)[0]  # OpusHead, at 48 kHz
            # FFmpeg's duration is the last Ogg granule (48 kHz), its start time the granules' offset.
            total = stream.duration - (stream.start_time or 0) - pre_skip
            for packet in container.demux(stream):
                if packet.size:
                    data = bytes(packet)
                    n = lib.opus_decode_float(decoder, data, len(data), buf.ctypes.data, self.MAX_FRAME, 0)
                    out.append(buf[:max(n, 0)].copy())
        lib.opus_decoder_destroy(decoder)
        ratio = 48_000 // SAMPLE_RATE
        x = np.concatenate(out)[pre_skip // ratio:][: -(-total // ratio)]
        return x, {"decode": time.thread_time() - t, "resample": 0.0}


def espeak_opus_clips(root: Path, clips: int, bitrates=OPUS_BITRATES) -> dict[int, list[str]]:
    """{bitrate: paths}: `clips` espeak-ng sentences of about 1-9 s, at 48 kHz, as Ogg Opus
    (synth_corpus.write_opus). Reused when present."""
    import shutil
    import subprocess

    import soundfile as sf
    import soxr

    from synth_corpus import write_opus

    if shutil.which("espeak-ng") is None:
        raise SystemExit("--opus-candidates needs espeak-ng")
    words = ("the quick brown fox jumps over a lazy dog while seven people read their morning papers "
             "quietly in the garden near old stone houses and a river").split()
    rng = np.random.default_rng(21)
    out: dict[int, list[str]] = {rate: [] for rate in bitrates}
    for i in range(clips):
        target_s = rng.uniform(1.0, 9.0)
        text = list(rng.choice(words, size=max(3, round(target_s * 3.2))))  # espeak-ng says ~3.2 of these a second
        paths = {rate: root / f"{rate // 1000}k" / f"s{i:03d}.opus" for rate in bitrates}
        if not all(p.exists() for p in paths.values()):
            wav = root / "wav" / f"s{i:03d}.wav"
            wav.parent.mkdir(parents=True, exist_ok=True)
            while True:  # a word more or less until the clip is 1-9 s
                subprocess.run(["espeak-ng", "-w", str(wav), " ".join(text)], check=True, capture_output=True)
                seconds = sf.info(str(wav)).duration
                if seconds < 1.0:
                    text.append(words[len(text) % len(words)])
                elif seconds > 9.0:
                    text.pop()
                else:
                    break
            x, rate = sf.read(str(wav), dtype="float32")
            x48 = soxr.resample(x, rate, 48_000, quality="HQ")
            for bitrate, path in paths.items():
                path.parent.mkdir(parents=True, exist_ok=True)
                write_opus(path, x48, 48_000, bitrate)
        for bitrate, path in paths.items():
            out[bitrate].append(str(path))
    return out


def _reference(path: str) -> np.ndarray:
    """libsndfile's decode of the whole file in one read (it trims the pre-skip then), soxr HQ."""
    import soundfile as sf
    import soxr

    x, rate = sf.read(path, dtype="float32")
    return soxr.resample(x, rate, 16_000, quality="HQ")


def opus_candidates(clips: dict[int, list[str]], repeats: int) -> dict:
    """Per bitrate and candidate: x realtime per core (CPU of decode and resampling, the least of
    `repeats` passes) and the lowest waveform cosine with `_reference` over the clips."""
    candidates = {"libsndfile in 2 s blocks + soxr HQ (the job before)": _libsndfile_opus,
                  "FFmpeg's own Opus decoder + soxr HQ": _ffmpeg_opus,
                  "libopus via PyAV + soxr HQ (the job now, its code)": _job_opus}
    try:
        direct = _Libopus16k()
        candidates[f"{direct.version} straight to 16 kHz (ctypes)"] = direct
    except OSError as e:
        print(f"libopus straight to 16 kHz: not measured ({e})", flush=True)
    results: dict = {}
    for bitrate, paths in clips.items():
        cpu = {name: [0.0] * repeats for name in candidates}
        worst = dict.fromkeys(candidates, 1.0)
        audio_s = 0.0
        for r in range(repeats):
            for path in paths:
                reference = _reference(path)
                audio_s += len(reference) / 16_000 if r == 0 else 0.0
                for name, decode in candidates.items():  # in turn, clip by clip: load slows all alike
                    x, seconds = decode(path)
                    cpu[name][r] += seconds["decode"] + seconds["resample"]
                    n = min(len(x), len(reference))
                    a, b = x[:n].astype(np.float64), reference[:n].astype(np.float64)
                    worst[name] = min(worst[name], float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
        results[bitrate] = {name: {"realtime_per_core": audio_s / min(cpu[name]), "cpu_s": min(cpu[name]), "min_cosine": worst[name]}
                            for name in candidates}
        results[bitrate]["audio_s"] = audio_s
        results[bitrate]["clip_s"] = [min(sf_len(p) for p in paths), max(sf_len(p) for p in paths)]
    return results


def sf_len(path: str) -> float:
    import soundfile as sf

    return sf.info(path).duration


def opus_table(results: dict, where: str) -> str:
    rates = list(results)
    names = [n for n in results[rates[0]] if n not in ("audio_s", "clip_s")]
    lines = [f"Ogg Opus to 16 kHz, one core of {where}: x realtime per core (lowest waveform cosine with libsndfile's "
             "decode of the whole file, then soxr HQ)", "",
             "| decoder | " + " | ".join(f"{r // 1000} kbit/s" for r in rates) + " |", "|---|" + "---|" * len(rates)]
    for name in names:
        cells = [f"{results[r][name]['realtime_per_core']:,.0f}x ({results[r][name]['min_cosine']:.7f})" for r in rates]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    first = results[rates[0]]
    lines += ["", f"{len(rates)} x {first['audio_s']:.1f} s of audio (clips of {first['clip_s'][0]:.2f}-{first['clip_s'][1]:.2f} s)"]
    return "\n".join(lines)


def decode_in_process(requests) -> tuple[float, list]:
    from extractor.audio.decode import decode_request

    t = time.thread_time()
    blocks = [b for r in requests for b in decode_request(r)]
    return time.thread_time() - t, blocks


def decode_through_pool(requests) -> tuple[float, float, int]:
    """(CPU s of the worker side, CPU s of this process, messages) with one DecodePool worker."""
    from extractor.audio.pool import END, DecodePool, WorkerFailure

    with DecodePool(1) as pool:
        for _ in pool.stream([(0, requests[0])]):  # the worker started and warm: not measured
            pass
        me = os.getpid()
        child0, t0 = descendants_cpu_s(me), time.process_time()
        messages = 0
        for _, message in pool.stream(enumerate(requests)):
            if isinstance(message, WorkerFailure):
                raise RuntimeError(f"decode failed in the pool: {message.error}")
            messages += message is not END
        parent, child = time.process_time() - t0, descendants_cpu_s(me) - child0
    return child, parent, messages


def handoff_direct(blocks: list) -> tuple[float, float]:
    """(CPU s sending, CPU s receiving) the blocks over a pipe with the pool's own wire functions,
    each side on its own thread of this process: the hand-off's cost without the noise of
    comparing two processes' decode times. Time blocked on the pipe is not CPU and not counted."""
    import multiprocessing as mp
    import threading

    from extractor.audio.pool import Reader, decode, encode, write_all  # the wire DecodePool uses

    receiver, sender = mp.Pipe(duplex=False)
    received: list[float] = []

    def read() -> None:
        t = time.thread_time()
        wire = Reader(receiver.fileno())
        for _ in blocks:
            decode(*wire.read_one())
        received.append(time.thread_time() - t)

    reader = threading.Thread(target=read, name="receiver")
    reader.start()
    t = time.thread_time()
    for block in blocks:
        write_all(sender.fileno(), encode(block))
    send = time.thread_time() - t
    reader.join()
    sender.close()
    receiver.close()
    return send, received[0]


def main_process_stages(blocks: list, d_model: int, layers: int, staging) -> tuple[dict[str, float], int, int]:
    """CPU seconds of the main process's per-window and per-row work on received blocks, through
    the job's functions in the order pipeline.Producer and the device loop call them."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import threading

    from extractor.batching.policy import BatchPolicy
    from extractor.batching.rows import RowPooling
    from extractor.batching.staging import GPU_MAX_WINDOWS, GPU_TOKEN_BUDGET, stage
    from extractor.output.layout import ROW_GROUP_BYTES
    from extractor.pooling import POOLINGS

    cpu = dict.fromkeys(MAIN_STAGES[1:], 0.0)
    clock = time.thread_time
    finished: list = []
    rows = RowPooling(POOLINGS["mean"], finished.append, lambda items, failures: None)
    policy = BatchPolicy((d_model, layers, 128), padding_mask=True)
    never = threading.Event()
    windows, batches = 0, 0
    budget = GPU_TOKEN_BUDGET  # the GPU's batches, as the job packs them on the device

    def emit() -> None:
        nonlocal batches
        t = clock()
        made = policy.take(budget, GPU_MAX_WINDOWS)
        cpu["pack"] += clock() - t
        for batch in made:
            t = clock()
            stage(batch, staging, never)
            staging.release(batch.staged.slot, None)
            t1 = clock()
            cpu["stage"] += t1 - t
            rows.add(batch, np.zeros((batch.size, d_model), np.float32), None)
            cpu["rows"] += clock() - t1
            batches += 1

    for block in blocks:
        t = clock()
        if len(block.items):
            policy.add(block.items, block.index, block.lengths, np.split(block.samples, np.cumsum(block.lengths)[:-1]))
            windows += len(block.items)
        cpu["pool_windows"] += clock() - t
        if policy.ready(budget):
            emit()
        t = clock()
        rows.decoded(block.done)  # the device loop hands "decoded" records to the rows stage
        cpu["rows"] += clock() - t
    emit()
    if len(rows):
        raise RuntimeError(f"{len(rows)} rows were not finished: the mirror of the pipeline is out of date")

    # The writer's part, as PartWriter._rows_table and OutputDir.commit_table build and write it.
    # A real model's embeddings are not zeros, which zstd would make light work of.
    items = np.concatenate([r.items for r in finished])
    emb = np.concatenate([r.embeddings for r in finished]) + np.random.default_rng(0).standard_normal((len(items), d_model), dtype=np.float32)
    t = clock()
    table = pa.table({
        "id": pa.array([f"c{i:06d}" for i in items]),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), type=pa.float32()), d_model),
        "duration_s": pa.array(np.concatenate([r.durations for r in finished]), type=pa.float64()),
    })
    pq.write_table(table, io.BytesIO(), row_group_size=max(1, ROW_GROUP_BYTES // max(1, table.nbytes // max(1, table.num_rows))),
                   compression="zstd")
    cpu["write"] += clock() - t
    return cpu, windows, batches


def measure_shape(corpus: dict, repeats: int, d_model: int, layers: int) -> dict:
    import pyarrow.parquet as pq
    import torch

    from extractor.batching.device import Staging

    manifest = pq.read_table(corpus["manifest"])
    paths = manifest.column("path").to_pylist()
    from synth_corpus import plan

    durations = (plan(corpus["clips"], corpus["seed"], corpus["min_s"], corpus["max_s"], corpus["sample_rate"]) / corpus["sample_rate"]).tolist()
    audio_s = sum(durations)
    requests = requests_of(paths, durations)

    # Each measurement `repeats` times; the run with the least CPU counts (others were disturbed).
    stages = min((stages_of_decode(paths) for _ in range(repeats)), key=lambda r: sum(r.values()))
    inprocess, blocks = min((decode_in_process(requests) for _ in range(repeats)), key=lambda r: r[0])
    worker, parent, messages = min((decode_through_pool(requests) for _ in range(repeats)), key=lambda r: r[0] + r[1])
    send, receive = min((handoff_direct(blocks) for _ in range(repeats)), key=lambda r: r[0] + r[1])
    # One staging slot, released at once and reused, as the job's slots are once the pipeline is
    # full: a fresh slot per batch would count first-touch page faults the job pays only once.
    staging = Staging(torch.device("cpu"), 1)
    main_process_stages(blocks, d_model, layers, staging)  # warm-up: the slot grows to its size
    main, windows, batches = min((main_process_stages(blocks, d_model, layers, staging) for _ in range(repeats)), key=lambda r: sum(r[0].values()))

    cpu = {**stages, "cut": inprocess - sum(stages.values()), "worker_inprocess": inprocess, "send": send,
           "worker": inprocess + send, "receive": receive, **main,
           # The same hand-off through DecodePool with one worker process: a cross-check (its worker
           # side is the difference of two processes' decode times, so it carries their noise).
           "pool_worker_excess": worker - inprocess, "pool_main": parent}
    cpu["main"] = receive + sum(main.values())
    return {
        "files": len(paths), "audio_s": audio_s, "windows": windows, "messages": messages, "batches": batches,
        "format": f"{corpus['container']} {corpus['sample_rate'] / 1000:g} kHz {'stereo' if corpus['channels'] == 2 else 'mono'}",
        "cpu_s": cpu,
        "ms_per_audio_s": {k: 1e3 * v / audio_s for k, v in cpu.items()},
    }


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def table(results: dict, target: float, where: str) -> str:
    names = list(results)
    rows: list[list[str]] = [["", *names], ["", *(results[n]["format"] for n in names)]]

    def ms_row(key: str, realtime: bool = False) -> list[str]:
        cells = []
        for n in names:
            ms = results[n]["ms_per_audio_s"][key]
            cells.append(f"{ms:.3f}" + (f" ({1e3 / ms:,.0f}x)" if realtime and ms > 0 else ""))
        return [LABELS[key], *cells]

    rows.append(["decode worker"])
    rows += [ms_row(k) for k in (*WORKER_STAGES, "worker_inprocess", "send")]
    rows.append(ms_row("worker", realtime=True))
    rows.append(["main process (one interpreter)"])
    rows += [ms_row(k) for k in MAIN_STAGES]
    rows.append(ms_row("main", realtime=True))
    rows.append(["hand-off cross-check"])
    rows += [ms_row(k) for k in ("pool_worker_excess", "pool_main")]
    workers = [results[n]["ms_per_audio_s"]["worker"] * target / 1e3 for n in names]
    main = [results[n]["ms_per_audio_s"]["main"] * target / 1e3 for n in names]
    rows.append([f"at {target:,.0f} audio-s/s"])
    rows.append(["decode worker cores", *(f"{w:.1f}" for w in workers)])
    rows.append(["main process, share of one core", *(f"{m:.0%}" for m in main)])
    rows.append(["cores in all", *(f"{w + m:.1f}" for w, m in zip(workers, main))])
    rows.append(["files / windows / batches", *(f"{results[n]['files']} / {results[n]['windows']} / {results[n]['batches']}" for n in names)])
    rows.append(["audio measured, s", *(f"{results[n]['audio_s']:,.0f}" for n in names)])
    widths = [max(len(r[i]) for r in rows if len(r) > i) for i in range(len(names) + 1)]
    lines = [f"CPU per audio-second on one core of {where}: ms of CPU per second of audio (x realtime)"]
    for r in rows:
        if len(r) == 1:
            lines.append(r[0])
        else:
            lines.append(f"  {r[0]:<{widths[0]}}" + "".join(f"  {c:>{w}}" for c, w in zip(r[1:], widths[1:])))
    return "\n".join(lines)


def main_opus(args) -> int:
    t = time.perf_counter()
    clips = espeak_opus_clips(Path(args.work_dir) / "opus-candidates", args.opus_clips)
    print(f"{args.opus_clips} espeak-ng clips at {len(clips)} bitrates ready in {time.perf_counter() - t:.1f} s", flush=True)
    allowed = sorted(os.sched_getaffinity(0))
    cpu = args.cpu if args.cpu is not None else allowed[0]
    os.sched_setaffinity(0, {cpu})
    results = opus_candidates(clips, args.repeats)
    os.sched_setaffinity(0, allowed)
    where = f"{cpu_model()} (CPU {cpu} of {os.cpu_count()})"
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"cpu": where, "opus_candidates": {str(k): v for k, v in results.items()}}, indent=2) + "\n")
    print("\n" + opus_table(results, where), flush=True)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.opus_candidates:
        return main_opus(args)
    import shapes
    import synth_corpus
    from synth_model import FULL_AUDIO  # the full-size tower's width: the pooled sums and the Parquet rows

    names = [s.strip() for s in (args.only or ",".join(shapes.SHAPES)).split(",") if s.strip()]
    unknown = [n for n in names if n not in shapes.SHAPES]
    if unknown:
        raise SystemExit(f"--only: unknown {unknown}; expected names from {list(shapes.SHAPES)}")
    specs = {}
    for n in names:
        s = shapes.SHAPES[n].corpus
        clips = max(1, math.ceil(args.audio_s / ((s.min_s + s.max_s) / 2)))
        specs[n] = synth_corpus.CorpusSpec(clips, s.seed, s.min_s, s.max_s, s.sample_rate, s.channels, s.container)
    work = Path(args.work_dir)
    t = time.perf_counter()
    corpora = dict(zip(specs, synth_corpus.build_corpora([(work / f"{n}-n{s.clips}", s) for n, s in specs.items()])))
    print(f"corpora ready in {time.perf_counter() - t:.1f} s: " + ", ".join(f"{n} {c['clips']} files" for n, c in corpora.items()), flush=True)

    # One core, one thread: what the job's per-core budget is made of.
    allowed = sorted(os.sched_getaffinity(0))
    cpu = args.cpu if args.cpu is not None else allowed[0]
    os.sched_setaffinity(0, {cpu})
    import torch

    torch.set_num_threads(1)

    results = {}
    for n in names:
        t = time.perf_counter()
        results[n] = measure_shape(corpora[n], args.repeats, FULL_AUDIO["d_model"], FULL_AUDIO["encoder_layers"])
        print(f"{n}: {results[n]['audio_s']:.0f} audio-s measured in {time.perf_counter() - t:.1f} s", flush=True)
    os.sched_setaffinity(0, allowed)

    where = f"{cpu_model()} (CPU {cpu} of {os.cpu_count()})"
    text = table(results, args.target, where)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"cpu": where, "target_audio_s_per_s": args.target, "shapes": results}, indent=2) + "\n")
    print("\n" + text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
