"""Issue 6 acceptance: segments, frame-level output and float16 output of the real job, on CPU.

Each configuration runs the job once (module-scoped fixtures); tests read its output and compare
it with the canonical HF+PEFT recipe (tests/canonical.py) applied to the cut 16 kHz audio.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import soxr
from click.testing import CliRunner

from builders import speechlike, write_audio
from canonical import WINDOW_SAMPLES, canonical_frames, cosine

from extractor.options import ManifestSpec
from extractor.options import JobOptions
from extractor.engines.local import run_shard
from extractor.recipe import METADATA_KEY

SR = 16_000
WINDOW_S = 30
LONG_S = 45.0  # two windows: 30 s + 15 s
MIN_COSINE = 0.9999  # the bar for 16 kHz sources
MAX_REL_ERR = 1e-4  # max |job - canonical| / max |canonical|: fp32 on CPU measures 1e-7 to 6e-7


def cut(x: np.ndarray, start_s: float, end_s: float | None) -> np.ndarray:
    """The segment the job must embed: cut at round(t * 16000) of the 16 kHz signal."""
    return x[round(start_s * SR) : None if end_s is None else round(end_s * SR)]


class CachedReference:
    """`canonical_frames` / `canonical_embedding`, memoised per 30 s window.

    The HF reference computes a full 30 s window whatever the audio (~2 s each on this CPU), and
    the tests below share many windows. canonical_frames feeds consecutive 30 s windows from t=0
    to the tower separately and concatenates their frames, so doing that split here and caching
    each window's frames gives exactly its result.
    """

    def __init__(self, ref):
        self.ref = ref
        self._windows: dict[str, np.ndarray] = {}

    def frames(self, x: np.ndarray) -> np.ndarray:
        parts = []
        for start in range(0, len(x), WINDOW_SAMPLES):
            window = np.ascontiguousarray(x[start : start + WINDOW_SAMPLES])
            key = hashlib.sha1(window.tobytes()).hexdigest()
            if key not in self._windows:
                self._windows[key] = canonical_frames(self.ref, window)
            parts.append(self._windows[key])
        return np.concatenate(parts)

    def embedding(self, x: np.ndarray) -> np.ndarray:
        return self.frames(x).astype(np.float64).mean(axis=0).astype(np.float32)


@pytest.fixture(scope="module")
def reference(tiny_ref_adapted):
    return CachedReference(tiny_ref_adapted)


@contextmanager
def root_logging_restored():
    """jobs.extract calls logging.basicConfig, which would leave a handler on CliRunner's closed stream."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def run(manifest: Path, output: Path, model: Path, adapter: Path, **kw):
    spec = ManifestSpec(str(manifest), id_column="id", start_column="start", end_column="end", keep_columns=kw.pop("keep", ()))
    opts = JobOptions(manifest=spec, output=str(output), model=str(model), adapter=str(adapter), decode_workers=0, progress=False, max_failure_rate=1.0, **kw)
    return run_shard(opts)


def rows_by_id(output: Path, columns=None) -> dict[str, dict]:
    table = ds.dataset(output / "embeddings", format="parquet").to_table(columns=columns)
    return {r["id"]: r for r in table.to_pylist()}


def failures_by_id(output: Path) -> dict[str, str]:
    files = sorted((output / "_failures").glob("part-*.parquet"))
    if not files:
        return {}
    table = pa.concat_tables(pq.read_table(f) for f in files)
    return dict(zip(table["id"].to_pylist(), table["error"].to_pylist()))


# --- corpus -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A 45 s 16 kHz file, a 1.3 s 16 kHz file and a 20 s 44.1 kHz file, with their 16 kHz signals."""
    d = tmp_path_factory.mktemp("seg_audio")
    long = write_audio(d / "long.wav", speechlike(LONG_S, seed=1), SR)
    short = write_audio(d / "short.flac", speechlike(1.3, seed=2), SR)
    hi_rate = write_audio(d / "hi.wav", speechlike(20.0, sr=44_100, seed=3), 44_100, subtype="FLOAT")
    hi_src, _ = sf.read(hi_rate, dtype="float32")
    return {
        "long": (str(long), sf.read(long, dtype="float32")[0]),  # what libsndfile gives: the job's input, bit for bit
        "short": (str(short), sf.read(short, dtype="float32")[0]),
        # An independent one-shot resample of the whole file; the job cuts its own streamed resample.
        "hi": (str(hi_rate), soxr.resample(hi_src, 44_100, SR, quality="HQ").astype(np.float32)),
    }


# (id, file, start_s, end_s): good segments, several of one file, consecutive in the manifest so
# they share one decode request; bad ones in between must not take the good ones down.
GOOD_SEGMENTS = [
    ("head", "long", 0.0, 2.5),
    ("odd", "long", 3.2171, 7.90033),  # not on a sample: round(t * 16000) decides
    ("cross", "long", 5.0, 40.0),  # crosses the file's 30 s mark: windows 5-35 s and 35-40 s
    ("tail_clipped", "long", 42.0, 50.0),  # end past EOF: clipped to 3 s
    ("open_end", "long", 42.0, None),  # null end: to the end of the file (the same audio as tail_clipped)
    ("whole_short", "short", None, None),
    ("hi_rate", "hi", 2.3, 9.1),
]
BAD_SEGMENTS = [
    ("past_eof", "long", 46.0, 48.0),
    ("at_eof", "long", LONG_S, 47.0),
    ("empty", "long", 5.0, 5.0),
    ("reversed", "long", 6.0, 4.0),
    ("negative", "long", -1.0, 2.0),
    ("nan_start", "long", math.nan, 2.0),
    ("nan_end", "long", 1.0, math.nan),
    ("far_past_eof", "long", 100.0, 101.0),  # last in the manifest, after other files: a request of its own
]


@pytest.fixture(scope="module")
def segments_out(tmp_path_factory, corpus, tiny_model, tiny_adapter):
    d = tmp_path_factory.mktemp("segments")
    order = [GOOD_SEGMENTS[0], BAD_SEGMENTS[0], GOOD_SEGMENTS[1], *BAD_SEGMENTS[1:4], *GOOD_SEGMENTS[2:5], *BAD_SEGMENTS[4:7], *GOOD_SEGMENTS[5:], BAD_SEGMENTS[7]]
    pl.DataFrame(
        {
            "id": [r[0] for r in order],
            "path": [corpus[r[1]][0] for r in order],
            "start": [r[2] for r in order],
            "end": [r[3] for r in order],
        },
        schema={"id": pl.String, "path": pl.String, "start": pl.Float64, "end": pl.Float64},
    ).write_parquet(d / "manifest.parquet")
    summary = run(d / "manifest.parquet", d / "out", tiny_model, tiny_adapter)
    return d / "out", summary


def test_segments_match_canonical_on_cut_audio(segments_out, corpus, reference):
    out, _ = segments_out
    rows = rows_by_id(out)
    for seg_id, name, start, end in GOOD_SEGMENTS:
        expected = reference.embedding(cut(corpus[name][1], start or 0.0, end))
        got = np.asarray(rows[seg_id]["embedding"], dtype=np.float32)
        assert cosine(got, expected) >= MIN_COSINE, f"{seg_id}: cosine {cosine(got, expected):.6f}"
        if name != "hi":
            # Cosine cannot see a cut one sample off (measured: 0.999997), the values can (2e-3).
            rel = np.abs(got - expected).max() / np.abs(expected).max()
            assert rel < MAX_REL_ERR, f"{seg_id}: max relative error {rel:.2e}"


def test_segment_durations_say_what_was_used(segments_out, corpus):
    out, _ = segments_out
    rows = rows_by_id(out, columns=["id", "duration_s"])
    for seg_id, name, start, end in GOOD_SEGMENTS:
        n = len(cut(corpus[name][1], start or 0.0, end))
        if name != "hi":  # a resampled file's length may differ by a sample between resamplers
            assert rows[seg_id]["duration_s"] == n / SR, seg_id
    assert rows["tail_clipped"]["duration_s"] == LONG_S - 42.0  # 42-50 s of a 45 s file
    assert rows["open_end"]["duration_s"] == LONG_S - 42.0
    assert rows["odd"]["duration_s"] == (round(7.90033 * SR) - round(3.2171 * SR)) / SR


def test_segment_crossing_30s_follows_window_rule(segments_out, corpus, reference):
    """5-40 s of a 45 s file: windows of 30 s + 5 s from the segment's start, frame-weighted."""
    out, _ = segments_out
    x = corpus["long"][1]
    got = np.asarray(rows_by_id(out)["cross"]["embedding"], dtype=np.float32)

    first = reference.frames(cut(x, 5.0, 35.0))
    second = reference.frames(cut(x, 35.0, 40.0))
    assert (len(first), len(second)) == (750, 125)
    rule = np.concatenate([first, second]).astype(np.float64).mean(axis=0)
    assert cosine(got, rule) >= MIN_COSINE

    # The test can tell the rule apart from windows on the file's 30 s grid (5-30 s + 30-40 s).
    grid = np.concatenate([reference.frames(cut(x, 5.0, 30.0)), reference.frames(cut(x, 30.0, 40.0))])
    assert cosine(got, grid.mean(axis=0)) < cosine(got, rule)
    assert cosine(got, grid.mean(axis=0)) < MIN_COSINE


def test_each_bad_segment_is_a_failure_and_good_rows_succeed(segments_out):
    out, summary = segments_out
    failures = failures_by_id(out)
    assert set(failures) == {r[0] for r in BAD_SEGMENTS}
    assert set(rows_by_id(out, columns=["id"])) == {r[0] for r in GOOD_SEGMENTS}
    assert (summary.embedded, summary.failed) == (len(GOOD_SEGMENTS), len(BAD_SEGMENTS))
    for seg_id, error in failures.items():
        assert error.startswith("SegmentError: "), (seg_id, error)
        assert "long.wav" in error, (seg_id, error)  # the message names the file
    assert "past the end" in failures["past_eof"] and "past the end" in failures["at_eof"]
    assert "past the end" in failures["far_past_eof"]
    assert (out / "_SUCCESS").exists()


def test_past_eof_failure_names_the_file_length(segments_out):
    # A read group that starts past the end reads nothing; the message once gave the seek
    # position (100.000 s) as the file's length.
    failures = failures_by_id(segments_out[0])
    assert f"({LONG_S:.3f} s)" in failures["past_eof"]  # read together with other segments: right
    assert f"({LONG_S:.3f} s)" in failures["far_past_eof"], failures["far_past_eof"]


# --- frames -----------------------------------------------------------------------------------

# (id, file, start_s, end_s, canonical valid frames): frame counts by the window rule.
FRAME_ROWS = [
    ("cross", "long", 5.0, 40.0, 750 + 125),
    ("just_over_30", "long", 1.0, 31.01, 750),  # the 10 ms second window yields no frame
    ("over_30_by_30ms", "long", 1.0, 31.03, 751),  # 30 ms: 3 mel frames → 2 tokens → 1 frame
    ("short_seg", "long", 12.345, 13.0, 16),  # 10480 samples → 66 mel → 33 tokens → 16 frames
    ("whole_short", "short", None, None, 32),  # 1.3 s
]


@pytest.fixture(scope="module")
def frames_manifest(tmp_path_factory, corpus):
    d = tmp_path_factory.mktemp("frames_manifest")
    pl.DataFrame(
        {
            "id": [r[0] for r in FRAME_ROWS],
            "path": [corpus[r[1]][0] for r in FRAME_ROWS],
            "start": [r[2] for r in FRAME_ROWS],
            "end": [r[3] for r in FRAME_ROWS],
            "lang": ["en", "de", "de", "fr", "en"],
        },
        schema={"id": pl.String, "path": pl.String, "start": pl.Float64, "end": pl.Float64, "lang": pl.String},
    ).write_parquet(d / "manifest.parquet")
    return d / "manifest.parquet"


@pytest.fixture(scope="module")
def frames_out(tmp_path_factory, frames_manifest, tiny_model, tiny_adapter):
    out = tmp_path_factory.mktemp("frames") / "out"
    run(frames_manifest, out, tiny_model, tiny_adapter, pooling="none", keep=("lang",))
    return out


@pytest.fixture(scope="module")
def frames_f16_out(tmp_path_factory, frames_manifest, tiny_model, tiny_adapter):
    out = tmp_path_factory.mktemp("frames_f16") / "out"
    run(frames_manifest, out, tiny_model, tiny_adapter, pooling="none", output_dtype="float16", keep=("lang",))
    return out


def test_frames_schema_and_rate(frames_out):
    schema = pq.read_schema(next(frames_out.glob("embeddings/part-*.parquet")))
    assert schema.field("frames").type == pa.list_(pa.list_(pa.float32(), 64))
    assert schema.field("embedding").type == pa.list_(pa.float32(), 64)
    rows = rows_by_id(frames_out, columns=["id", "frame_rate_hz", "lang"])
    assert set(rows) == {r[0] for r in FRAME_ROWS}
    assert all(r["frame_rate_hz"] == 25.0 for r in rows.values())
    assert rows["short_seg"]["lang"] == "fr"  # kept columns travel with frame outputs too
    assert json.loads((frames_out / "_run.json").read_text())["recipe"]["pooling"] == "none"


def test_frame_counts_equal_canonical(frames_out, corpus, reference):
    rows = rows_by_id(frames_out, columns=["id", "frames", "duration_s"])
    for row_id, name, start, end, n_expected in FRAME_ROWS:
        assert len(reference.frames(cut(corpus[name][1], start or 0.0, end))) == n_expected, row_id  # the table above is the rule, checked on HF
        assert len(rows[row_id]["frames"]) == n_expected, row_id


def test_frames_equal_canonical_frames(frames_out, corpus, reference):
    rows = rows_by_id(frames_out, columns=["id", "frames"])
    for row_id, name, start, end, _ in FRAME_ROWS:
        expected = reference.frames(cut(corpus[name][1], start or 0.0, end)).astype(np.float64)
        got = np.asarray(rows[row_id]["frames"], dtype=np.float64)
        per_frame = (got * expected).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1))
        assert per_frame.min() >= MIN_COSINE, (row_id, per_frame.min(), int(per_frame.argmin()))
        rel = np.abs(got - expected).max() / np.abs(expected).max()
        assert rel < MAX_REL_ERR, (row_id, rel)


def test_mean_of_frames_is_the_embedding(frames_out, segments_out):
    rows = rows_by_id(frames_out, columns=["id", "frames", "embedding"])
    for row_id, row in rows.items():
        frames = np.asarray(row["frames"], dtype=np.float64)
        emb = np.asarray(row["embedding"], dtype=np.float64)
        np.testing.assert_allclose(frames.mean(axis=0), emb, rtol=1e-5, atol=1e-6, err_msg=row_id)
    # ... and the pooled output of a --pooling mean run of the same segment.
    pooled = rows_by_id(segments_out[0], columns=["id", "embedding"])
    np.testing.assert_allclose(np.asarray(rows["cross"]["embedding"]), np.asarray(pooled["cross"]["embedding"]), rtol=1e-5, atol=1e-6)


# --- float16 ----------------------------------------------------------------------------------


def test_float16_output_round_trips(frames_out, frames_f16_out):
    schema = pq.read_schema(next(frames_f16_out.glob("embeddings/part-*.parquet")))
    assert schema.field("embedding").type == pa.list_(pa.float16(), 64)
    assert schema.field("frames").type == pa.list_(pa.list_(pa.float16(), 64))

    f32 = rows_by_id(frames_out, columns=["id", "embedding", "frames"])
    f16 = rows_by_id(frames_f16_out, columns=["id", "embedding", "frames"])
    assert set(f16) == set(f32)
    for row_id in f32:
        for col in ("embedding", "frames"):
            ref = np.asarray(f32[row_id][col], dtype=np.float32)
            got = np.asarray(f16[row_id][col], dtype=np.float16)  # pyarrow gives halffloat as np.float16
            assert got.shape == ref.shape
            # The float32 result rounded to nearest fp16: at most half an fp16 ulp (2^-11 relative,
            # 2^-25 absolute for subnormals) from the float32 value.
            err = np.abs(got.astype(np.float32) - ref)
            assert (err <= np.abs(ref) * 2.0**-11 + 2.0**-25).all(), (row_id, col, err.max())
            np.testing.assert_array_equal(got, ref.astype(np.float16), err_msg=f"{row_id} {col}")


def test_float16_is_in_the_recipe_and_resume_with_float32_is_refused(frames_f16_out, frames_manifest, tiny_model, tiny_adapter, caplog):
    recipe = json.loads((frames_f16_out / "_run.json").read_text())["recipe"]
    assert recipe["output_dtype"] == "float16"
    meta = pq.read_schema(next(frames_f16_out.glob("embeddings/part-*.parquet"))).metadata
    assert json.loads(meta[METADATA_KEY])["output_dtype"] == "float16"

    from jobs.extract import extract

    before = sorted(p.name for p in frames_f16_out.rglob("*") if p.is_file())
    args = [
        "--manifest", str(frames_manifest), "--output", str(frames_f16_out), "--model", str(tiny_model),
        "--adapter", str(tiny_adapter), "--id-column", "id", "--start-column", "start", "--end-column", "end",
        "--keep-columns", "lang", "--pooling", "none", "--decode-workers", "0",
    ]
    with root_logging_restored():
        refused = CliRunner().invoke(extract, [*args, "--output-dtype", "float32"])
    assert refused.exit_code == 2, refused.output
    # The log goes to the runner's stderr or to pytest's capture, depending on who configured logging first.
    assert "output_dtype: 'float16' (existing output) → 'float32' (this run)" in refused.output + caplog.text
    assert sorted(p.name for p in frames_f16_out.rglob("*") if p.is_file()) == before

    # The same recipe resumes: nothing left to do, exit 0.
    with root_logging_restored():
        resumed = CliRunner().invoke(extract, [*args, "--output-dtype", "float16"])
    assert resumed.exit_code == 0, resumed.output


# --- --pooling max ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def max_out(tmp_path_factory, frames_manifest, tiny_model, tiny_adapter):
    out = tmp_path_factory.mktemp("max") / "out"
    run(frames_manifest, out, tiny_model, tiny_adapter, pooling="max", keep=("lang",))
    return out


def test_max_pooling_is_the_elementwise_max_of_the_canonical_frames(max_out, corpus, reference):
    """The element-wise max over every valid output frame of a row, across its 30 s windows
    (`cross` spans two), against numpy's max over the canonical HF + PEFT frames."""
    rows = rows_by_id(max_out, columns=["id", "embedding", "lang"])
    assert set(rows) == {r[0] for r in FRAME_ROWS}
    for row_id, name, start, end, _ in FRAME_ROWS:
        expected = reference.frames(cut(corpus[name][1], start or 0.0, end)).astype(np.float64).max(axis=0)
        got = np.asarray(rows[row_id]["embedding"], dtype=np.float64)
        assert np.abs(got - expected).max() / np.abs(expected).max() < MAX_REL_ERR, row_id
    assert not pq.read_schema(next(max_out.glob("embeddings/part-*.parquet"))).get_field_index("frames") >= 0
    recipe = json.loads((max_out / "_run.json").read_text())["recipe"]
    assert recipe["pooling"] == "max" and recipe["frame_pooling"] == "max-of-valid-frames-over-all-windows"


def test_resume_with_another_pooling_is_refused(max_out, frames_manifest, tiny_model, tiny_adapter):
    from extractor.errors import ConfigError

    with pytest.raises(ConfigError, match="pooling: 'max' \\(existing output\\) → 'mean' \\(this run\\)"):
        run(frames_manifest, max_out, tiny_model, tiny_adapter, pooling="mean", keep=("lang",))
