"""inspect-embeddings on real outputs of the job: the printed summary and the PNG.

The job runs once per configuration (module-scoped fixtures) on a small generated corpus: clips
of different lengths, a kept column to colour by, and files that fail in three different ways.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.colors
import matplotlib.image
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from builders import speechlike, write_audio

from extractor.manifest.read import read_manifest
from extractor.tools.inspect import InspectError, plot, render, summarize
from extractor.options import ManifestSpec, Shard
from extractor.options import JobOptions
from extractor.engines.local import run_shard
from extractor.output.layout import FAILURES_DIR, MIGRATE, RUN_FILE, OutputDir
from jobs.inspect_embeddings import inspect_embeddings

REPO = Path(__file__).resolve().parents[2]
SR = 16_000
DURATIONS = [0.5, 0.9, 1.4, 2.0, 2.6, 3.1, 3.9, 4.4, 5.2, 6.0, 7.3, 31.0]  # the last takes two windows
SPEAKERS = ["ann", "bob", "cy", "ann", "bob", "cy", "ann", "bob", "cy", "ann", "dee", "ann"]
FAILURE_TYPES = {"DecodeError": 1, "TooShort": 1, "AudioError": 1}  # garbage, 20 ms, missing file
PNG_SHAPE = (480, 1600)  # FIGURE_SIZE_IN x FIGURE_DPI


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("inspect_corpus")
    rows = []
    for i, (seconds, speaker) in enumerate(zip(DURATIONS, SPEAKERS)):
        path = write_audio(d / f"clip{i:02d}.wav", speechlike(seconds, seed=10 + i), SR)
        rows.append({"id": f"clip{i:02d}", "path": str(path), "speaker": speaker, "snr_db": 5.0 + 2.5 * i})
    garbage = d / "garbage.wav"
    garbage.write_bytes(b"RIFF? no, just bytes " * 40)
    tiny = write_audio(d / "tiny.wav", speechlike(0.02, seed=99), SR)  # too short for one output frame
    for rid, path in (("garbage", garbage), ("tiny", tiny), ("missing", d / "missing.wav")):
        rows.append({"id": rid, "path": str(path), "speaker": "bad", "snr_db": None})
    manifest = d / "manifest.parquet"
    pl.DataFrame(rows).write_parquet(manifest)
    return manifest


def job(manifest: Path, output: Path, model: Path, adapter: Path, **kw) -> Path:
    """The job in-process (the CLI run is `mean_out`): cheaper for the extra configurations."""
    spec = ManifestSpec(str(manifest), id_column="id", keep_columns=("speaker", "snr_db"))
    run_shard(JobOptions(manifest=spec, output=str(output), model=str(model), adapter=str(adapter), decode_workers=0, progress=False, max_failure_rate=1.0, **kw))
    return output


@pytest.fixture(scope="module")
def mean_out(tmp_path_factory, corpus, tiny_model, tiny_adapter):
    """The real CLI, with a decode worker process, as a nightly run would call it."""
    out = tmp_path_factory.mktemp("inspect_mean") / "out"
    cmd = [
        sys.executable, "-m", "jobs.extract", "--manifest", str(corpus), "--output", str(out),
        "--model", str(tiny_model), "--adapter", str(tiny_adapter), "--id-column", "id",
        "--keep-columns", "speaker,snr_db", "--decode-workers", "1", "--max-failure-rate", "1",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def frames_f16_out(tmp_path_factory, corpus, tiny_model, tiny_adapter):
    return job(corpus, tmp_path_factory.mktemp("inspect_f16") / "out", tiny_model, tiny_adapter, pooling="none", output_dtype="float16")


@pytest.fixture(scope="module")
def failures_only_out(tmp_path_factory, tiny_model, tiny_adapter):
    d = tmp_path_factory.mktemp("inspect_failures_only")
    (d / "junk.flac").write_bytes(b"\x00" * 1000)
    pl.DataFrame({"id": ["junk", "gone"], "path": [str(d / "junk.flac"), str(d / "gone.wav")], "speaker": ["x", "y"], "snr_db": [1.0, 2.0]}).write_parquet(d / "m.parquet")
    return job(d / "m.parquet", d / "out", tiny_model, tiny_adapter)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.inspect_embeddings", *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def line(text: str, label: str) -> str:
    """The (first) line of the report with this label."""
    for ln in text.splitlines():
        if ln.startswith(label + " "):
            return ln
    raise AssertionError(f"no {label!r} line in:\n{text}")


def failure_counts(text: str) -> dict[str, int]:
    """{type: count} from the failures block: `failures  N  Type  e.g. ...` and its continuation lines."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("failures "))
    out = {}
    for ln in lines[start:]:
        if ln is not lines[start] and not ln.startswith(" "):
            break
        m = re.match(r"^(?:failures)?\s+([\d,]+)\s+(\S+)\s+e\.g\. ", ln)
        assert m, ln
        out[m.group(2)] = int(m.group(1).replace(",", ""))
    return out


def png_pixels(path: Path) -> np.ndarray:
    img = matplotlib.image.imread(path)
    assert img.dtype == np.float32 and img.ndim == 3
    return img[..., :3]


def non_background(rgb: np.ndarray) -> np.ndarray:
    return (np.abs(rgb - 1.0) > 0.02).any(axis=-1)  # the figure's background is white


# --- the text report --------------------------------------------------------------------------


def test_cli_prints_rows_failures_durations_and_vectors(mean_out):
    proc = cli(str(mean_out))
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    n_ok, n_failed = len(DURATIONS), sum(FAILURE_TYPES.values())
    assert f"{n_ok} embedded, {n_failed} failed" in line(text, "rows")
    assert f"of {n_ok + n_failed}" in line(text, "rows")
    assert "complete (_SUCCESS)" in line(text, "output")
    assert failure_counts(text) == FAILURE_TYPES
    assert "pooling mean" in text and "output float32" in text
    duration = line(text, "duration")
    assert f"in {n_ok} rows" in duration and "min 0.50 s" in duration and "max 31.0 s" in duration
    assert line(text, "vectors").startswith("vectors   ok: 0 NaN/Inf, 0 all-zero")
    assert len(text.splitlines()) <= 12  # compact: a screenful at most for a small run


def test_summary_numbers(mean_out):
    s = summarize(mean_out)
    assert (s["rows"], s["failed"]) == (len(DURATIONS), sum(FAILURE_TYPES.values()))
    assert {f["type"]: f["count"] for f in s["failures_by_type"]} == FAILURE_TYPES
    assert s["duration"]["count"] == len(DURATIONS)
    assert s["duration"]["min"] == pytest.approx(min(DURATIONS)) and s["duration"]["max"] == pytest.approx(max(DURATIONS))
    assert s["duration"]["p50"] == pytest.approx(np.percentile(DURATIONS, 50), abs=1e-6)
    assert s["duration"]["total_hours"] == pytest.approx(sum(DURATIONS) / 3600, rel=1e-6)
    assert s["norm"]["count"] == len(DURATIONS) and 0 < s["norm"]["min"] <= s["norm"]["p50"] <= s["norm"]["max"]
    assert (s["embedding_dtype"], s["d_model"], s["frames"]) == ("float32", 64, False)
    assert s["recipe"]["pooling"] == "mean" and s["complete"]
    by_type = {f["type"]: f for f in s["failures_by_type"]}
    assert by_type["TooShort"]["example_id"] == "tiny" and by_type["AudioError"]["example_id"] == "missing"
    json.dumps(s)  # --json output


def test_float16_frames_output_reads_without_frames(frames_f16_out, mean_out, monkeypatch):
    requested = []
    iter_batches = pq.ParquetFile.iter_batches

    def spy(self, *args, **kwargs):
        requested.append(kwargs.get("columns"))
        return iter_batches(self, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    monkeypatch.setattr(pq, "read_table", lambda *a, **k: pytest.fail("inspect must not read whole tables"))
    s = summarize(frames_f16_out)
    plot(frames_f16_out, frames_f16_out.parent / "f16.png", color_by="snr_db")
    assert requested and all(cols is not None and "frames" not in cols for cols in requested), requested

    assert (s["embedding_dtype"], s["frames"], s["rows"]) == ("float16", True, len(DURATIONS))
    assert s["recipe"]["output_dtype"] == "float16" and s["recipe"]["pooling"] == "none"
    assert s["nonfinite"]["count"] == 0 and s["zero"]["count"] == 0
    assert s["norm"]["p50"] == pytest.approx(summarize(mean_out)["norm"]["p50"], rel=1e-3)  # fp16 rounding of the same vectors
    text = render(s)
    assert "float16[64] + frames" in line(text, "rows") and "pooling none" in text


def test_nan_and_zero_vectors_are_counted_with_ids(frames_f16_out, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(frames_f16_out, out)
    part = next(out.glob("embeddings/part-*.parquet"))
    table = pq.read_table(part)
    emb = np.asarray(table["embedding"].combine_chunks().flatten().to_numpy(zero_copy_only=False)).reshape(table.num_rows, -1).copy()
    ids = table["id"].to_pylist()
    emb[0, 3] = np.nan
    emb[1, :] = np.inf
    emb[2, :] = 0.0
    col = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), type=pa.float16()), emb.shape[1])
    pq.write_table(table.set_column(table.schema.get_field_index("embedding"), "embedding", col), part)

    s = summarize(out)
    assert s["nonfinite"] == {"count": 2, "ids": ids[:2]}
    assert s["zero"] == {"count": 1, "ids": [ids[2]]}
    assert s["norm"]["count"] == len(DURATIONS) - 2  # norms of finite vectors only
    vectors = line(render(s), "vectors")
    assert vectors.startswith("vectors   CHECK: 2 NaN/Inf") and ids[0] in vectors and ids[2] in vectors


def test_no_failures(mean_out, corpus, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(mean_out, out)
    shutil.rmtree(out / FAILURES_DIR)
    s = summarize(out)
    assert (s["rows"], s["failed"], s["failures_by_type"], s["failure_files"]) == (len(DURATIONS), 0, [], 0)
    assert line(render(s), "failures").split() == ["failures", "none"]
    plot(out, tmp_path / "p.png")
    assert non_background(png_pixels(tmp_path / "p.png")).mean() > 0.03
    # The empty failure part a complete shard without failures commits: a file, no rows.
    od = OutputDir(out)
    with od.lock(Shard()) as lock:
        assert od.ensure_failures_readable(Shard(), lock, read_manifest(ManifestSpec(str(corpus), id_column="id")).arrow_types) is not None
    s = summarize(out)
    assert (s["failed"], s["failures_by_type"], s["failure_files"]) == (0, [], 1)
    assert line(render(s), "failures").split() == ["failures", "none"]


def _rewrite_failures(out: Path, change) -> None:
    for f in (out / FAILURES_DIR).glob("part-*.parquet"):
        table = pq.read_table(f)
        pq.write_table(change(table), f)


def test_failures_are_grouped_by_error_kind_else_by_the_kind_their_error_names(mean_out, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(mean_out, out)
    # Messages without their "Kind: " prefix: only error_kind can group them.
    _rewrite_failures(out, lambda t: t.set_column(t.schema.get_field_index("error"), "error",
                                                  pa.array([e.partition(": ")[2] for e in t["error"].to_pylist()], pa.large_string())))
    assert {f["type"]: f["count"] for f in summarize(out)["failures_by_type"]} == FAILURE_TYPES
    # Records written before error_kind existed: the kind is read from "Kind: message".
    shutil.rmtree(out)
    shutil.copytree(mean_out, out)
    _rewrite_failures(out, lambda t: t.drop_columns(["error_kind"]))
    s = summarize(out)
    assert {f["type"]: f["count"] for f in s["failures_by_type"]} == FAILURE_TYPES
    assert failure_counts(render(s)) == FAILURE_TYPES


def test_an_output_of_an_older_layout_exits_2_naming_the_migration(mean_out, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(mean_out, out)
    (out / FAILURES_DIR).rename(out / "failures")  # 0.2's layout, as its _run.json says
    run = json.loads((out / RUN_FILE).read_text())
    (out / RUN_FILE).write_text(json.dumps({**run, "layout_version": 2}))
    result = CliRunner().invoke(inspect_embeddings, [str(out)])
    assert result.exit_code == 2 and f"{MIGRATE} {out}" in result.output, result.output


def test_only_failures(failures_only_out, tmp_path):
    result = CliRunner().invoke(inspect_embeddings, [str(failures_only_out), "--plot", str(tmp_path / "p.png")])
    assert result.exit_code == 0, result.output
    assert "0 embedded, 2 failed" in line(result.output, "rows")
    assert failure_counts(result.output) == {"DecodeError": 1, "AudioError": 1}
    assert line(result.output, "duration").split()[1:] == ["no", "embedded", "rows"]
    assert "vectors" not in result.output and "norm" not in result.output
    assert png_pixels(tmp_path / "p.png").shape[:2] == PNG_SHAPE


# --- the picture ------------------------------------------------------------------------------


def test_plot_writes_a_non_blank_png_coloured_by_category(mean_out, tmp_path):
    png = tmp_path / "nightly.png"
    proc = cli(str(mean_out), "--plot", str(png), "--color-by", "speaker", "--sample", "500")
    assert proc.returncode == 0, proc.stderr
    assert str(png) in line(proc.stdout, "plot")
    rgb = png_pixels(png)
    assert rgb.shape[:2] == PNG_SHAPE
    assert non_background(rgb).mean() > 0.05, "the PNG is (nearly) blank"
    # Each panel has drawn something: histogram bars, failure bars, scatter points.
    thirds = np.array_split(non_background(rgb), 3, axis=1)
    assert all(t.mean() > 0.03 for t in thirds), [float(t.mean()) for t in thirds]
    # The PCA panel (right of x=1050) shows the 4 speakers in 4 distinct hues.
    pca = rgb[:, 1050:].reshape(-1, 3)
    saturated = pca[pca.max(axis=1) - pca.min(axis=1) > 0.3]
    hues = np.histogram(matplotlib.colors.rgb_to_hsv(saturated)[:, 0], bins=12, range=(0, 1))[0]
    assert (hues > 20).sum() >= 4, hues


def test_plot_numeric_colour_gets_a_colorbar(mean_out, tmp_path):
    png = tmp_path / "snr.png"
    result = CliRunner().invoke(inspect_embeddings, [str(mean_out), "--plot", str(png), "--color-by", "snr_db"])
    assert result.exit_code == 0, result.output
    rgb = png_pixels(png)
    assert rgb.shape[:2] == PNG_SHAPE and non_background(rgb).mean() > 0.05
    # viridis' ends (dark purple, yellow) appear only in a colorbar or numeric points.
    flat = rgb.reshape(-1, 3)
    for end in ([0.267, 0.005, 0.329], [0.993, 0.906, 0.144]):
        assert (np.abs(flat - end).max(axis=1) < 0.03).sum() > 20


# --- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["missing", "empty", "not_output", "a_file"])
def test_not_an_output_directory_exits_2(tmp_path, case):
    target = tmp_path / case
    if case == "empty":
        target.mkdir()
    elif case == "not_output":
        target.mkdir()
        (target / "notes.txt").write_text("hello")
        (target / "data.parquet").write_bytes(b"PAR1")
    elif case == "a_file":
        target.write_text("x")
    result = CliRunner().invoke(inspect_embeddings, [str(target)])
    assert result.exit_code == 2, result.output
    assert f"inspect-embeddings: {target}" in result.output
    with pytest.raises(InspectError):
        summarize(target)


def test_bad_colour_column_exits_2_before_printing(mean_out, tmp_path):
    result = CliRunner().invoke(inspect_embeddings, [str(mean_out), "--plot", str(tmp_path / "p.png"), "--color-by", "nope"])
    assert result.exit_code == 2
    assert "nope" in result.output and "speaker" in result.output and "rows" not in result.output
    assert not (tmp_path / "p.png").exists()
    result = CliRunner().invoke(inspect_embeddings, [str(mean_out), "--color-by", "speaker"])
    assert result.exit_code == 2 and "--plot" in result.output


def test_damaged_part_exits_2_naming_it(mean_out, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(mean_out, out)
    part = next(out.glob("embeddings/part-*.parquet"))
    part.write_bytes(part.read_bytes()[:200])  # a truncated copy: no footer
    result = CliRunner().invoke(inspect_embeddings, [str(out)])
    assert result.exit_code == 2, result.output
    assert f"cannot read {part}" in result.output
