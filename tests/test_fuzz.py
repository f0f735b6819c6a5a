"""Generated junk against the audio path and the manifest reader (issue 4, "Fuzzing").

Audio: random bytes, truncated real files, NaN/Inf and huge samples, hand-made headers with zero
channels or sample rates of 1 Hz and 10 MHz, silence and DC. Each must end as a failure record
(an AudioError, or "too short") or a finite embedding: never another exception, a hang or a NaN.
Hypothesis drives the job's decode and embed stages in-process (a subprocess per example would
cost seconds); one real job then runs over a seeded batch of the same junk.

Manifests: wrong column types, nulls, duplicate ids of many types, empty tables, absurd start/end
values, non-Parquet bytes. Each is accepted or refused with ManifestError; an accepted one then
goes through the job, and a rerun finds every row done (exactly once, whatever the id's type).
"""

from __future__ import annotations

import io
import math
import os
import random
import struct
import subprocess
import sys
import uuid
from datetime import timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from extractor.api import Embedder
from extractor.audio.decode import DecodeRequest, FileJob
from extractor.audio.pool import END, DecodePool, WorkerFailure
from extractor.batching.packing import split_windows
from extractor.manifest.read import ManifestError, read_manifest
from extractor.model.load import load_model
from extractor.options import JobOptions, ManifestSpec
from extractor.ledger import Rows
from extractor.output.writer import nonfinite
from extractor.engines.local import run_shard
from jobrun import failure_parts, parts
from jobs.extract import extract

REPO = Path(__file__).resolve().parents[1]
SR = 16_000
MAX_DURATION_S = 60.0  # keeps a 1 Hz header from turning 4 kB into hours of audio to embed
AUDIO_SETTINGS = settings(
    max_examples=200,
    deadline=timedelta(seconds=20),  # an example that takes this long is a hang
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# ---------------------------------------------------------------------------------------------
# Junk audio: each maker returns (file bytes, whether it must embed)
# ---------------------------------------------------------------------------------------------


def wav_bytes(data: bytes, *, fmt_tag: int = 1, channels: int = 1, rate: int = SR, bits: int = 16, data_len: int | None = None) -> bytes:
    """A RIFF/WAVE file with a hand-made `fmt ` chunk: any channel count, rate or claimed length."""
    block = (channels * bits // 8) & 0xFFFF
    fmt = struct.pack("<HHIIHH", fmt_tag, channels & 0xFFFF, rate & 0xFFFFFFFF, (rate * block) & 0xFFFFFFFF, block, bits)
    n = len(data) if data_len is None else data_len
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", n & 0xFFFFFFFF) + data
    return b"RIFF" + struct.pack("<I", len(body) & 0xFFFFFFFF) + body


def encoded(samples: np.ndarray, rate: int, fmt: str, subtype: str) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


FORMATS = [("WAV", "PCM_16"), ("WAV", "FLOAT"), ("FLAC", "PCM_16"), ("OGG", "VORBIS")]
MAGICS = [b"", b"RIFF", b"RIFF\x24\x00\x00\x00WAVEfmt ", b"fLaC", b"OggS", b"ID3\x03\x00", b"\xff\xfb", b"FORM", b"\x1aE\xdf\xa3"]


def junk_random(magic: bytes, tail: bytes) -> tuple[bytes, bool]:
    return magic + tail, False


def junk_truncated(seconds: float, rate: int, channels: int, fmt: int, cut: float, seed: int) -> tuple[bytes, bool]:
    x = np.random.default_rng(seed).uniform(-0.5, 0.5, (max(1, int(seconds * rate)), channels)).astype(np.float32)
    data = encoded(x, rate, *FORMATS[fmt])
    return data[: max(4, int(len(data) * cut))], False


def junk_nonfinite(n: int, bad: list[tuple[float, float]], channels: int, double: bool) -> tuple[bytes, bool]:
    """A float WAV with NaN, Inf or huge-but-finite values (`bad`: (position 0..1, value))."""
    x = np.random.default_rng(n).uniform(-0.5, 0.5, (n, channels))
    for pos, value in bad:
        x[min(n - 1, int(pos * n)), 0] = value
    return encoded(x.astype(np.float64 if double else np.float32), SR, "WAV", "DOUBLE" if double else "FLOAT"), False


def junk_header(channels: int, rate: int, bits: int, fmt_tag: int, data: bytes, claim: int | None) -> tuple[bytes, bool]:
    return wav_bytes(data, fmt_tag=fmt_tag, channels=channels, rate=rate, bits=bits, data_len=claim), False


def junk_constant(value: float, seconds: float, rate: int, channels: int, pcm: bool) -> tuple[bytes, bool]:
    """Silence (0) or DC: must embed, finitely."""
    x = np.full((int(seconds * rate), channels), value, dtype=np.float32)
    return encoded(x, rate, "WAV", "PCM_16" if pcm else "FLOAT"), True


finite_or_not = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, 3.4e38, -3.4e38, 1e30, 1e10]),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
)

junk_audio = st.one_of(
    st.builds(junk_random, st.sampled_from(MAGICS), st.binary(max_size=2048)),
    st.builds(junk_truncated, st.floats(0.01, 2.0), st.sampled_from([8000, 16000, 44100, 48000]), st.integers(1, 3),
              st.integers(0, len(FORMATS) - 1), st.floats(0.0, 1.0), st.integers(0, 1000)),
    st.builds(junk_nonfinite, st.integers(1, 20_000), st.lists(st.tuples(st.floats(0, 1), finite_or_not), min_size=1, max_size=3),
              st.integers(1, 2), st.booleans()),
    st.builds(junk_header, st.sampled_from([0, 1, 2, 7, 65535]), st.sampled_from([0, 1, 7, 16000, 96000, 10_000_000, 0xFFFFFFFF]),
              st.sampled_from([0, 8, 16, 24, 32, 64]), st.sampled_from([1, 3, 0xFFFE, 0, 0x55]), st.binary(min_size=0, max_size=4096),
              st.one_of(st.none(), st.sampled_from([0, 1, 0x7FFFFFFF, 0xFFFFFFFF]))),
    st.builds(junk_constant, st.one_of(st.just(0.0), st.floats(-1.0, 1.0)), st.floats(0.1, 4.0),
              st.sampled_from([8000, 16000, 22050, 96000]), st.integers(1, 3), st.booleans()),
)


# ---------------------------------------------------------------------------------------------
# The audio path in-process: decode (as a worker does) → windows → encoder
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedder(tiny_model, tiny_adapter):
    return Embedder(tiny_model, tiny_adapter, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def embed_like_the_job(embedder: Embedder, path: Path, segment=(None, None)) -> np.ndarray | str:
    """A finite embedding, or the failure the job would record. Anything else propagates.

    Decoding goes through DecodePool(0), the job's own in-process decode (`--decode-workers 0`),
    and is received as the job receives it: windows of the row, then its done or failed entry,
    then END (an exception that escapes the decoder becomes a WorkerFailure there, as in a worker).
    """
    request = DecodeRequest((FileJob(str(path), (0,), (segment,)),), MAX_DURATION_S)
    windows: dict[int, np.ndarray] = {}
    done, failed, ended = [], [], False
    with DecodePool(0) as pool:
        for _, message in pool.stream([(0, request)]):
            assert not ended, "a message after END"
            if message is END:
                ended = True
            elif isinstance(message, WorkerFailure):
                return message.error
            else:
                pos = 0
                for item, index, n in zip(message.items.tolist(), message.index.tolist(), message.lengths.tolist(), strict=True):
                    assert item == 0 and index not in windows
                    windows[index] = message.samples[pos : pos + n]
                    pos += n
                assert pos == len(message.samples)
                done += message.done
                failed += message.failed
    assert ended and len(done) + len(failed) == 1, (done, failed)  # every row reported exactly once
    if failed:
        return str(failed[0][1])
    ((_, count, duration),) = done
    assert sorted(windows) == list(range(count)), "a row's windows are 0..count-1"
    samples = np.concatenate([windows[i] for i in range(count)])
    assert samples.dtype == np.float32 and samples.ndim == 1 and len(samples) > 0
    assert np.isfinite(samples).all(), "the decoder let a non-finite sample through"
    assert split_windows(samples), "a row reported done has no window with an output frame (TooShort is a failure)"
    (emb,) = embedder.embed([samples], sample_rate=16_000)  # the job's decode gives 16 kHz
    # Finite but huge samples (1e20) overflow float32 in the STFT power: the job's writer records
    # such a row as a failure instead of writing NaNs; judge the outcome the same way.
    if nonfinite(Rows(np.zeros(1, np.int64), emb[None], np.array([duration]))).any():
        return f"NonFiniteEmbedding: {path}"
    return emb


@AUDIO_SETTINGS
@given(junk=junk_audio)
def test_junk_audio_gives_a_failure_record_or_a_finite_embedding(junk, embedder, scratch):
    data, must_embed = junk
    path = scratch / f"{uuid.uuid4().hex}.wav"
    path.write_bytes(data)
    try:
        outcome = embed_like_the_job(embedder, path)
    finally:
        path.unlink()
    if must_embed:
        assert isinstance(outcome, np.ndarray), f"silence/DC must embed, got {outcome}"


absurd_seconds = st.one_of(
    st.none(), st.sampled_from([math.nan, math.inf, -math.inf, -1.0, 0.0, 1e-9, 0.3, 1.0, 1e308, 2.0**63]),
    st.floats(allow_nan=True, allow_infinity=True),
)


@settings(max_examples=100, deadline=timedelta(seconds=20), suppress_health_check=[HealthCheck.too_slow])
@given(start=absurd_seconds, end=absurd_seconds)
def test_absurd_segment_bounds_give_a_failure_record_or_audio(start, end, embedder, scratch):
    path = scratch / "one-second.wav"
    if not path.exists():
        sf.write(str(path), np.random.default_rng(0).uniform(-0.3, 0.3, SR).astype(np.float32), SR)
    embed_like_the_job(embedder, path, (start, end))


def test_one_absurd_segment_fails_alone(cpu_model, tiny_model, tmp_path):
    """Rows are segments of one file, decoded in one request: an end_s of 1e308 must fail its own
    row (SegmentError), not its neighbours'."""
    clip = tmp_path / "clip.wav"
    sf.write(str(clip), np.random.default_rng(0).uniform(-0.3, 0.3, SR).astype(np.float32), SR)
    manifest = tmp_path / "m.parquet"
    pl.DataFrame({"id": ["absurd", "fine"], "path": [str(clip)] * 2, "start": [0.0, 0.0], "end": [1e308, 0.5]}).write_parquet(manifest)
    spec = ManifestSpec(str(manifest), id_column="id", start_column="start", end_column="end")
    out = tmp_path / "out"
    run_shard(JobOptions(manifest=spec, output=str(out), model=str(tiny_model), device="cpu", decode_workers=0, progress=False,
                       max_failure_rate=1.0), model=cpu_model)
    failures = pl.read_parquet(failure_parts(out))
    assert failures["id"].to_list() == ["absurd"] and failures["error"][0].startswith("SegmentError: ")
    assert pl.read_parquet(parts(out))["id"].to_list() == ["fine"]


# ---------------------------------------------------------------------------------------------
# One real job over a seeded batch of the same junk
# ---------------------------------------------------------------------------------------------


def seeded_junk(rng: random.Random) -> list[tuple[str, bytes, bool]]:
    """(name, bytes, must embed): a few of every kind, drawn from a seeded RNG."""
    out = []
    for i in range(6):
        out.append((f"random{i}", *junk_random(rng.choice(MAGICS), rng.randbytes(rng.randrange(0, 2048)))))
        out.append((f"truncated{i}", *junk_truncated(rng.uniform(0.05, 2), rng.choice([8000, 16000, 44100]), rng.randint(1, 2),
                                                       rng.randrange(len(FORMATS)), rng.uniform(0.05, 0.95), i)))
    for i, value in enumerate([math.nan, math.inf, -math.inf, 3.4e38, 1e20]):
        out.append((f"nonfinite{i}", *junk_nonfinite(8000, [(rng.random(), value)], 1, False)))
    for channels, rate in [(0, SR), (1, 1), (1, 10_000_000), (2, 0), (65535, SR)]:
        out.append((f"header-{channels}ch-{rate}hz", *junk_header(channels, rate, 16, 1, rng.randbytes(64), None)))
    for i, (value, rate, channels) in enumerate([(0.0, 16000, 1), (0.0, 44100, 2), (0.25, 16000, 1), (-1.0, 8000, 3)]):
        out.append((f"constant{i}", *junk_constant(value, 1.0, rate, channels, i % 2 == 0)))
    return out


@pytest.mark.timeout(300)
def test_job_over_a_batch_of_junk_records_every_file_once(tiny_model, tmp_path):
    rng = random.Random(1234)
    junk = seeded_junk(rng)
    rows = []
    for name, data, must in junk:
        p = tmp_path / "junk" / f"{name}.wav"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(data)
        rows.append({"id": name, "path": str(p), "must_embed": must})
    manifest = tmp_path / "m.parquet"
    pl.DataFrame(rows).write_parquet(manifest)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "jobs.extract", "--manifest", str(manifest), "--output", str(out), "--model", str(tiny_model),
         "--id-column", "id", "--decode-workers", "1", "--max-failure-rate", "1", "--part-rows", "8", "--decode-timeout-s", "60"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=240,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    embedded = pl.read_parquet(parts(out))
    failures = pl.read_parquet(failure_parts(out))
    ids = embedded["id"].to_list() + failures["id"].to_list()
    assert sorted(ids) == sorted(r["id"] for r in rows)  # each exactly once
    emb = np.stack(embedded["embedding"].to_numpy())
    assert np.isfinite(emb).all()
    assert {r["id"] for r in rows if r["must_embed"]} <= set(embedded["id"].to_list())
    errors = dict(zip(failures["id"].to_list(), failures["error"].to_list(), strict=True))
    # 3.4e38 and 1e20 are finite but not audio: refused at decode, before they could overflow the STFT.
    assert "implausible sample value" in errors["nonfinite3"] and "implausible sample value" in errors["nonfinite4"]
    # Every failure names its kind, as decoders' own errors or the job's: nothing unexpected.
    kinds = {e.split(":", 1)[0] for e in failures["error"].to_list()}
    assert kinds <= {"AudioError", "DecodeError", "TooLongError", "SegmentError", "TooShort", "NonFiniteEmbedding", "DecoderCrashed", "DecodeTimeout"}, kinds


# ---------------------------------------------------------------------------------------------
# Manifests
# ---------------------------------------------------------------------------------------------

MISSING = "/nonexistent-fuzz-dir"  # every generated path lies here, so no file is ever opened


def _values(kind: str, n: int) -> st.SearchStrategy:
    """n values of `kind` from small pools, so duplicates and nulls are common."""
    pools = {
        "int64": st.integers(-3, 3) | st.sampled_from([-(2**63), 2**63 - 1]),
        "int8": st.integers(-128, 127),
        "uint64": st.integers(0, 3) | st.just(2**64 - 1),
        "float64": st.sampled_from([0.0, -0.0, 1.5, math.nan, math.inf, -math.inf, 1e308]),
        "string": st.sampled_from(["a", "b", "", " ", "a\n", "é", "\x00"]),
        "large_string": st.sampled_from(["a", "b", "c"]),
        "binary": st.sampled_from([b"a", b"b", b"", b"\xff"]),
        "bool": st.booleans(),
        "date32": st.dates(),
        "timestamp": st.datetimes(),
        "decimal": st.decimals(min_value=-100, max_value=100, places=2, allow_nan=False),
        "list": st.lists(st.integers(0, 2), max_size=2),
        "struct": st.fixed_dictionaries({"a": st.integers(0, 2)}),
        "dictionary": st.sampled_from(["x", "y"]),
        "null": st.none(),
    }
    return st.lists(st.none() | pools[kind] if kind != "null" else st.none(), min_size=n, max_size=n)


def _array(kind: str, values: list) -> pa.Array:
    types = {
        "int64": pa.int64(), "int8": pa.int8(), "uint64": pa.uint64(), "float64": pa.float64(), "string": pa.string(),
        "large_string": pa.large_string(), "binary": pa.binary(), "bool": pa.bool_(), "date32": pa.date32(),
        "timestamp": pa.timestamp("us"), "decimal": pa.decimal128(9, 2), "list": pa.list_(pa.int64()),
        "struct": pa.struct([("a", pa.int64())]), "dictionary": pa.string(), "null": pa.null(),
    }
    arr = pa.array(values, type=types[kind])
    return arr.dictionary_encode() if kind == "dictionary" else arr


ID_KINDS = ["int64", "int8", "uint64", "float64", "string", "large_string", "binary", "bool", "date32", "timestamp",
            "decimal", "list", "struct", "dictionary", "null"]
PATH_KINDS = ["string", "string", "string", "large_string", "dictionary", "int64", "binary", "null"]
TIME_KINDS = ["float64", "float64", "int64", "int8", "uint64", "string", "bool", "decimal", "null"]


def _distinct(kind: str, n: int) -> st.SearchStrategy:
    """n distinct ids of `kind`, drawn from wide ranges: manifests that are accepted."""
    wide = {
        "int64": st.integers(-(2**63), 2**63 - 1), "int8": st.integers(-128, 127), "uint64": st.integers(0, 2**64 - 1),
        "float64": st.floats(), "string": st.text(max_size=8), "large_string": st.text(max_size=8), "binary": st.binary(max_size=8),
        "date32": st.dates(), "timestamp": st.datetimes(), "decimal": st.decimals(-(10**6), 10**6, places=2, allow_nan=False),
        "list": st.lists(st.integers(0, 9), max_size=3), "struct": st.fixed_dictionaries({"a": st.integers(-(2**63), 2**63 - 1)}),
        "dictionary": st.text(max_size=8),
    }
    if kind not in wide:  # bool, null: too few values to be distinct; mostly refused
        return _values(kind, n)
    return st.lists(wide[kind], min_size=n, max_size=n, unique_by=repr)


@st.composite
def manifests(draw):
    """(table or raw bytes, ManifestSpec fields). Half are meant to be valid: a fuzzer that only
    finds refusals never reaches the job."""
    if draw(st.integers(0, 9)) == 0:
        raw = draw(st.sampled_from([b"", b"PAR1", b"PAR1\x00\x00PAR1", b"not parquet\n"]) | st.binary(max_size=64))
        return raw, {}
    valid = draw(st.booleans())
    n = draw(st.integers(0, 6))
    cols = {}
    path_kind = "string" if valid else draw(st.sampled_from(PATH_KINDS))
    if path_kind in ("string", "large_string", "dictionary"):
        name = st.text(max_size=6).map(lambda v: f"{MISSING}/{v}")
        cols["path"] = _array(path_kind, draw(st.lists(name if valid else name | st.none() | st.just(""), min_size=n, max_size=n)))
    else:
        cols["path"] = _array(path_kind, draw(_values(path_kind, n)))
    id_kind = draw(st.sampled_from(ID_KINDS))
    cols["id"] = _array(id_kind, draw(_distinct(id_kind, n) if valid else _values(id_kind, n)))
    spec = {"path_column": "path", "id_column": draw(st.sampled_from([None, "id"]))}
    for name in ("start", "end"):
        if draw(st.booleans()):
            kind = draw(st.sampled_from(["float64"] if valid else TIME_KINDS))
            cols[name] = _array(kind, draw(_values(kind, n)))
            spec[f"{name}_column"] = name
    extra = draw(st.lists(st.sampled_from(["extra", "__row", "embedding", "start_s"]), max_size=2, unique=True))
    for name in extra:
        cols[name] = _array("int64", draw(_values("int64", n)))
    if "extra" in extra and draw(st.booleans()):
        spec["keep_columns"] = ("extra",)
    if not valid:
        odd = st.sampled_from(["extra", "path", "id", "__row", "start", "start_s", "embedding", "missing"])
        spec["keep_columns"] = tuple(draw(st.lists(odd, max_size=2)))
        spec["path_column"] = draw(st.sampled_from(["path", "id", "missing"]))
        spec["id_column"] = draw(st.sampled_from([None, "id", "path", "missing"]))
        spec["start_column"] = draw(st.sampled_from([spec.get("start_column"), "missing"]))
    return pa.table(cols), spec


@pytest.fixture(scope="module")
def cpu_model(tiny_model):
    return load_model(Path(tiny_model), None, torch.device("cpu"), torch.float32)


@settings(max_examples=300, deadline=timedelta(seconds=20), suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=manifests())
def test_manifest_is_accepted_or_refused_and_an_accepted_one_runs_exactly_once(case, cpu_model, tiny_model, scratch):
    content, fields = case
    case_dir = scratch / uuid.uuid4().hex
    case_dir.mkdir()
    path = case_dir / "manifest.parquet"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        pq.write_table(content, path)
    spec = ManifestSpec(path=str(path), **fields)
    try:
        manifest = read_manifest(spec)
    except ManifestError as e:
        event("refused: " + str(e).replace(str(path), "M")[:45])
        return
    event(f"accepted, {len(manifest.rows)} rows, id {manifest.arrow_types['id']}")
    rows = manifest.rows
    assert rows["id"].null_count() == 0 and rows["path"].dtype == pl.String
    assert rows.select(pl.col("id").is_duplicated().any()).item() is False
    if spec.path_column == "path":
        assert all(p.startswith(MISSING) for p in rows["path"].to_list())

    # Through the job: every row fails (no file exists) and is recorded once; a rerun finds
    # every id done, whatever its type, so a resume never redoes or duplicates a row.
    out = case_dir / "out"
    opts = JobOptions(manifest=spec, output=str(out), model=str(tiny_model), device="cpu", dtype="float32",
                      decode_workers=0, progress=False, max_failure_rate=1.0)
    first = run_shard(opts, model=cpu_model)
    assert first.embedded == 0 and first.failed == len(rows) and first.complete
    again = run_shard(opts, model=cpu_model)
    assert again.noop and again.failed == 0 and again.skipped == len(rows)
    # The markers only cache "nothing to do": without them the rerun plans from the committed ids,
    # which must match the manifest's whatever their type.
    for marker in (out / "_SUCCESS", out / "_shards" / "00000.done"):
        marker.unlink()
    planned = run_shard(opts, model=cpu_model)
    assert not planned.noop and planned.complete, planned
    assert planned.failed == 0 and planned.skipped == len(rows), "a rerun redid rows already recorded"
    if len(rows):
        assert pl.read_parquet(failure_parts(out)).height == len(rows)


REFUSED = {
    "not_parquet": lambda p: p.write_bytes(b"id,path\n1,a.wav\n"),
    "int_paths": lambda p: pq.write_table(pa.table({"path": [1, 2]}), p),
    "null_ids": lambda p: pq.write_table(pa.table({"path": ["/a.wav", "/b.wav"], "id": [1, None]}), p),
    "duplicate_float_ids": lambda p: pq.write_table(pa.table({"path": ["/a.wav", "/b.wav"], "id": [0.5, 0.5]}), p),
    "string_start": lambda p: pq.write_table(pa.table({"path": ["/a.wav"], "id": [1], "start": ["soon"]}), p),
}


@pytest.mark.parametrize("problem", sorted(REFUSED))
def test_bad_manifest_through_the_cli_exits_2_with_nothing_written(problem, tiny_model, tmp_path):
    manifest = tmp_path / "m.parquet"
    REFUSED[problem](manifest)
    out = tmp_path / "out"
    args = ["--manifest", str(manifest), "--output", str(out), "--model", str(tiny_model), "--decode-workers", "0", "--id-column", "id"]
    if problem == "int_paths":
        args = args[:-2]
    if problem == "string_start":
        args += ["--start-column", "start"]
    result = CliRunner().invoke(extract, args, catch_exceptions=False)
    assert result.exit_code == 2, result.output
    assert not out.exists()
