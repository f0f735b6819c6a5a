"""Parquet, CSV, JSONL and JSONL.gz manifests, local or fsspec URLs: the format from the name or the
flag, the same refusals for each, and types that do not depend on the night's values."""

from __future__ import annotations

import gzip
import io
import json
import os
import socket
import subprocess
import sys
import threading
import uuid
from collections import Counter
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import fsspec
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from extractor.errors import ConfigError
from extractor.manifest import ManifestError, ManifestSpec, read_manifest
from extractor.manifest.formats import FORMATS as REGISTRY, Format, manifest_format, open_binary
from extractor.options import manifest_formats

from jobrun import REPO, job_cmd, job_env

from .runs import run_job


@pytest.mark.parametrize("name,expected", [
    ("m.parquet", "parquet"), ("m.pq", "parquet"), ("M.PARQUET", "parquet"), ("manifest", "parquet"),
    ("s3://bucket/key?versionId=3", "parquet"), ("m.csv", "csv"), ("m.csv.gz", "csv"), ("m.jsonl", "jsonl"),
    ("m.jsonl.gz", "jsonl"), ("m.ndjson", "jsonl"), ("gs://b/discuts.jsonl.gz", "jsonl"), ("cuts.jsonl.gz", "lhotse"),
    ("librispeech_cuts_dev-clean.jsonl.gz", "lhotse"), ("s3://b/train/cuts.000001.jsonl", "lhotse"),
])
def test_format_from_the_name(name, expected):
    assert manifest_format(ManifestSpec(name)) == expected


def test_the_flag_overrides_the_name():
    assert manifest_format(ManifestSpec("cuts.jsonl.gz", format="jsonl")) == "jsonl"
    assert manifest_format(ManifestSpec("rows.txt", format="csv")) == "csv"
    with pytest.raises(ConfigError, match="--manifest-format 'tsv': expected one of parquet, csv, lhotse, jsonl"):
        ManifestSpec("m.tsv", format="tsv")


def test_the_flag_offers_the_registry_s_formats():
    assert manifest_formats() == tuple(REGISTRY) == ("parquet", "csv", "lhotse", "jsonl")


def test_a_new_format_is_one_reader_and_one_registry_line(tmp_path, monkeypatch):
    """What adding a format takes: a reader, and its line in FORMATS. The flag's choices, the
    name recognition, the checks and the refusals follow."""
    def read_tsv(path, storage_options, columns):
        with open_binary(path, storage_options) as f:
            return pl.read_csv(f.read(), separator="\t", infer_schema=False).to_arrow()

    monkeypatch.setitem(REGISTRY, "tsv", Format("tsv", "TSV", read_tsv, (".tsv",)))
    manifest = tmp_path / "m.tsv.gz"
    manifest.write_bytes(gzip.compress(b"id\tpath\nu1\t/a.wav\nu2\t/b.wav\n"))
    assert manifest_format(ManifestSpec(str(manifest))) == "tsv"
    assert read_manifest(ManifestSpec(str(manifest), id_column="id")).rows["path"].to_list() == ["/a.wav", "/b.wav"]
    unnamed = tmp_path / "rows.txt"
    unnamed.write_bytes(b"path\n/c.wav\n")
    assert read_manifest(ManifestSpec(str(unnamed), format="tsv")).rows["path"].to_list() == ["/c.wav"]
    manifest.write_bytes(gzip.compress(b"id\tpath\nu1\t/a.wav\nu1\t/b.wav\n"))
    with pytest.raises(ManifestError, match="duplicate id"):
        read_manifest(ManifestSpec(str(manifest), id_column="id"))


def write(path: Path, rows: list[dict]) -> Path:
    """`rows` in the format of `path`'s name (None: an empty field, or a JSON null)."""
    name = path.name
    if name.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(rows), path)
        return path
    if ".csv" in name:
        cols = list(dict.fromkeys(k for r in rows for k in r))
        text = ",".join(cols) + "\n" + "".join(",".join("" if r.get(c) is None else str(r[c]) for c in cols) + "\n" for r in rows)
    else:
        text = "".join(json.dumps(r) + "\n" for r in rows)
    data = text.encode()
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    return path


FORMATS = ["m.parquet", "m.csv", "m.jsonl", "m.jsonl.gz"]
PROBLEMS = {
    # name: (rows, spec fields, what the message says)
    "missing_column": ([{"file": "/a.wav"}], {}, "lacks column(s) ['path']"),
    "missing_keep_column": ([{"path": "/a.wav"}], {"keep_columns": ("speaker",)}, "lacks column(s) ['speaker']"),
    "null_path": ([{"path": "/a.wav"}, {"path": None}], {}, "1 row(s) with a null or empty 'path', at rows 1"),
    "duplicate_paths": ([{"path": "/a.wav"}, {"path": "/a.wav"}], {}, "1 duplicate id(s) in 'path'"),
    "duplicate_ids": ([{"id": "u1", "path": "/a.wav"}, {"id": "u1", "path": "/b.wav"}], {"id_column": "id"}, "duplicate id(s) in 'id'"),
    "null_id": ([{"id": "u1", "path": "/a.wav"}, {"id": None, "path": "/b.wav"}], {"id_column": "id"}, "1 row(s) with a null id"),
    "text_start": ([{"path": "/a.wav", "start": "soon"}], {"start_column": "start"}, "'start'"),
}


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
@pytest.mark.parametrize("name", FORMATS)
def test_every_format_is_refused_for_the_same_problems(name, problem, tmp_path):
    rows, fields, message = PROBLEMS[problem]
    manifest = write(tmp_path / name, rows)
    with pytest.raises(ManifestError) as e:
        read_manifest(ManifestSpec(str(manifest), **fields))
    assert message in str(e.value) and str(manifest) in str(e.value)


@pytest.mark.parametrize("name", ["m.csv", "m.jsonl.gz", "m.parquet"])
def test_a_refused_manifest_exits_2_with_nothing_written(name, model, tmp_path):
    manifest = write(tmp_path / name, [{"id": "u1", "path": "/a.wav"}, {"id": "u1", "path": "/b.wav"}])
    out = tmp_path / "out"
    code, log = run_job(manifest, out, model, "--id-column", "id")
    assert code == 2 and "duplicate id" in log, log
    assert not out.exists()


@pytest.mark.parametrize("name,content,says", [
    ("m.csv", b"", "lacks column(s) ['path']; it has []"),
    ("m.csv", b'path\n"a.wav\n', "as CSV: invalid csv file"),
    ("m.jsonl", b"{not json\n", "as JSONL: JSON parse error"),
    ("m.parquet", b"path\na.wav\n", "as Parquet: Parquet magic bytes not found"),
    ("manifest.txt", b"path\na.wav\n", "read as Parquet for want of a known extension: give --manifest-format csv"),
])
def test_a_file_that_is_not_its_format_exits_2_naming_it(name, content, says, model, tmp_path):
    manifest = tmp_path / name
    manifest.write_bytes(content)
    code, log = run_job(manifest, tmp_path / "out", model)
    assert code == 2 and says in log and str(manifest) in log, log
    assert "infer_schema_length" not in log  # polars' advice does not apply: nothing is inferred


def test_csv_columns_are_strings_so_ids_never_change_type_or_value(tmp_path):
    # Night 1: every id looks like a number; night 2 one does not. Inferred types would give
    # int64 ids (and `007` → 7) then strings; read as text, both nights agree and `007` stays.
    night1 = write(tmp_path / "n1.csv", [{"id": "007", "path": "/a.wav", "start": "0.5", "n": "3"},
                                          {"id": "7", "path": "/b.wav", "start": " 1 ", "n": "4"}])
    night2 = write(tmp_path / "n2.csv", [{"id": "007", "path": "/a.wav", "start": "0.5", "n": "3"},
                                          {"id": "x8", "path": "/c.wav", "start": "2", "n": "x"}])
    spec = dict(id_column="id", start_column="start", keep_columns=("n",))
    m1, m2 = (read_manifest(ManifestSpec(str(p), **spec)) for p in (night1, night2))
    assert m1.arrow_types == m2.arrow_types == {"id": pa.large_string(), "path": pa.large_string(), "n": pa.large_string()}
    assert m1.rows["id"].to_list() == ["007", "7"] and m2.rows["id"].to_list() == ["007", "x8"]
    assert m1.rows["start_s"].to_list() == [0.5, 1.0]  # the segment bounds are the one thing parsed
    with pytest.raises(ManifestError, match=r"'start' holds 'soon', 'later' at rows 1, 2, expected seconds"):
        read_manifest(ManifestSpec(str(write(tmp_path / "bad.csv", [{"path": "/a", "start": "1"}, {"path": "/b", "start": "soon"},
                                                                      {"path": "/c", "start": "later"}])), start_column="start"))


def test_jsonl_keeps_json_types_and_refuses_a_column_that_changes_type(tmp_path):
    m = read_manifest(ManifestSpec(str(write(tmp_path / "m.jsonl", [{"id": 1, "path": "/a.wav", "day": "2024-01-01"},
                                                                    {"id": 2, "path": "/b.wav", "day": "2024-01-02"}])),
                                   id_column="id", keep_columns=("day",)))
    assert m.id_type == pa.int64() and m.arrow_types["day"] == pa.large_string()  # not a guessed timestamp
    assert m.rows["day"].to_list() == ["2024-01-01", "2024-01-02"]
    dated = read_manifest(ManifestSpec(str(write(tmp_path / "d.jsonl", [{"id": "2024-01-01", "path": "/a.wav"}])), id_column="id"))
    assert dated.id_type == pa.large_string() and dated.rows["id"].to_list() == ["2024-01-01"]
    with pytest.raises(ManifestError, match="as JSONL.*changed from number to string"):
        read_manifest(ManifestSpec(str(write(tmp_path / "x.jsonl", [{"id": 1, "path": "/a.wav"}, {"id": "b", "path": "/b.wav"}])),
                                   id_column="id"))


def test_gzip_is_read_by_its_content_and_lhotse_cuts_read_as_jsonl_get_a_hint(tmp_path):
    plain_name = tmp_path / "m.jsonl"
    plain_name.write_bytes(gzip.compress(b'{"path": "/a.wav"}\n'))
    assert read_manifest(ManifestSpec(str(plain_name))).rows["path"].to_list() == ["/a.wav"]
    cut = {"id": "c", "start": 0, "duration": 1, "recording": {"id": "r", "sources": [{"type": "file", "channels": [0], "source": "/a.wav"}]}}
    with pytest.raises(ManifestError, match="--manifest-format lhotse"):
        read_manifest(ManifestSpec(str(write(tmp_path / "rows.jsonl", [cut]))))


@pytest.mark.parametrize("name", ["m.parquet", "m.csv", "m.jsonl.gz", "cuts.jsonl.gz"])
def test_fsspec_urls(name, tmp_path):
    if name.startswith("cuts"):
        rows = [{"id": "c1", "start": 0.5, "duration": 1.0, "channel": 0, "type": "MonoCut",
                 "recording": {"id": "r", "sources": [{"type": "file", "channels": [0], "source": "/a.wav"}],
                               "sampling_rate": 16000, "num_samples": 32000, "duration": 2.0}}]
    else:
        rows = [{"id": "u1", "path": "/a.wav"}, {"id": "u2", "path": "/b.wav"}]
    local = write(tmp_path / name, rows)
    url = f"memory://{uuid.uuid4().hex}/{name}"
    with fsspec.open(url, "wb") as f:
        f.write(local.read_bytes())
    for where in (url, f"file://{local}"):
        m = read_manifest(ManifestSpec(where, id_column=None if name.startswith("cuts") else "id"))
        assert m.rows["id"].to_list() == [r["id"] for r in rows], where
        assert m.rows["path"].to_list() == (["/a.wav"] if name.startswith("cuts") else ["/a.wav", "/b.wav"])


def _truncated_gzip(path: Path, rows: int = 5000) -> Path:
    data = gzip.compress(("id,path\n" + "".join(f"u{i},/a{i}.wav\n" for i in range(rows))).encode())
    path.write_bytes(data[: len(data) // 2])
    return path


def test_a_truncated_gzip_exits_2_in_one_line_naming_the_file_with_its_summary(model, tmp_path):
    # polars used to read the file object itself and panic on the gzip error (a BaseException:
    # exit 1, a Rust backtrace, no summary).
    manifest = _truncated_gzip(tmp_path / "m.csv.gz")
    out, summary = tmp_path / "out", tmp_path / "summary.json"
    run = subprocess.run(job_cmd(manifest, out, model, "--summary-json", str(summary)), env=job_env(),
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert run.returncode == 2, run.stderr
    said = f"cannot read manifest {manifest} as CSV: Compressed file ended before the end-of-stream marker was reached"
    assert [line for line in run.stderr.splitlines() if "ERROR" in line] == [line for line in run.stderr.splitlines() if said in line]
    assert "panicked" not in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert json.loads(summary.read_text())["exit_code"] == 2 and said in json.loads(summary.read_text())["error"]
    assert not out.exists()


def test_a_reader_that_panics_is_refused_naming_the_file_and_an_interrupt_is_not_swallowed(tmp_path, monkeypatch):
    def panics(path, storage_options, columns):
        # polars reading a file object whose read fails: a real Rust panic (pyo3's PanicException)
        with gzip.open(path) as f:
            return pl.read_csv(f).to_arrow()

    def interrupted(path, storage_options, columns):
        raise KeyboardInterrupt

    monkeypatch.setitem(REGISTRY, "panics", Format("panics", "Panicky", panics, (".pnc",)))
    monkeypatch.setitem(REGISTRY, "interrupted", Format("interrupted", "Interrupted", interrupted, (".int",)))
    manifest = _truncated_gzip(tmp_path / "m.pnc")
    with pytest.raises(ManifestError) as e:
        read_manifest(ManifestSpec(str(manifest)))
    assert str(e.value).startswith(f"cannot read manifest {manifest} as Panicky: the reader panicked: ")
    assert "\n" not in str(e.value)
    with pytest.raises(KeyboardInterrupt):
        read_manifest(ManifestSpec(str(write(tmp_path / "m.int", []))))

# -- http(s) manifests: the standard library's reader, no aiohttp ----------------------------------


@pytest.fixture
def site(tmp_path):
    """A static file server on 127.0.0.1 serving tmp_path/www. /ranged/NAME answers Range requests
    as nginx or S3 do; /plain/NAME ignores them (http.server's own behaviour); /cut/NAME declares
    the whole file, sends half and hangs up. `sent` counts the bytes written per file."""
    root = tmp_path / "www"
    root.mkdir()
    sent: Counter = Counter()

    class Handler(SimpleHTTPRequestHandler):
        def setup(self):
            # A small send buffer: what `sent` counts is then what the reader asked for, not the
            # megabytes the kernel takes ahead of a reader that will close the response unread.
            self.request.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 16)
            super().setup()

        def log_message(self, *args):
            pass

        def send_head(self):
            route, _, name = self.path.lstrip("/").partition("/")
            if not (root / name).is_file() or route not in ("ranged", "plain", "cut"):
                self.send_error(404)
                return None
            data = (root / name).read_bytes()
            asked = self.headers.get("Range") if route == "ranged" else None
            start = int(asked.removeprefix("bytes=").partition("-")[0]) if asked else 0
            self.send_response(206 if asked else 200)
            if route == "ranged":
                self.send_header("Accept-Ranges", "bytes")
                if asked:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(data) - start))
            self.end_headers()
            body = data[start:]
            return io.BytesIO(body[: len(body) // 2] if route == "cut" else body)

        def copyfile(self, source, outputfile):
            while chunk := source.read(64 << 10):
                try:
                    outputfile.write(chunk)
                except (BrokenPipeError, ConnectionResetError):  # the reader had what it needed
                    return
                sent[self.path.rpartition("/")[2]] += len(chunk)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield SimpleNamespace(root=root, url=f"http://127.0.0.1:{server.server_address[1]}", sent=sent)
    server.shutdown()
    server.server_close()


def _http_manifests(root: Path, clips: list[Path]) -> dict[str, Path]:
    """The same rows as Parquet (a large column first, which the run never reads), CSV.gz and JSONL."""
    rows = [{"id": f"u{i}", "path": str(p)} for i, p in enumerate(clips)]
    padding = pa.array([os.urandom(1 << 20) for _ in rows], pa.binary())  # 1 MB a row, incompressible
    pq.write_table(pa.Table.from_pylist(rows).add_column(0, "blob", padding), root / "m.parquet")
    return {"parquet": root / "m.parquet", "csv.gz": write(root / "m.csv.gz", rows), "jsonl": write(root / "m.jsonl", rows)}


@pytest.mark.parametrize("route", ["ranged", "plain"])
def test_http_manifests_of_every_format_read_as_local_ones(site, clips, route):
    files = _http_manifests(site.root, clips)
    for fmt, local in files.items():
        remote = read_manifest(ManifestSpec(f"{site.url}/{route}/{local.name}", id_column="id"))
        assert remote.rows.equals(read_manifest(ManifestSpec(str(local), id_column="id")).rows), fmt
    size = files["parquet"].stat().st_size
    if route == "ranged":  # Parquet is read from its footer and by column: not the unused 6 MB column
        assert site.sent["m.parquet"] < size / 4, (site.sent, size)


def test_an_http_manifest_that_fails_is_refused_naming_the_url_and_the_problem(site, clips, monkeypatch):
    files = _http_manifests(site.root, clips)
    with pytest.raises(ManifestError, match=rf"cannot read manifest {site.url}/ranged/gone.csv: not found \(HTTP 404"):
        read_manifest(ManifestSpec(f"{site.url}/ranged/gone.csv"))
    # A body cut off half-way is an error, never a shorter manifest.
    with pytest.raises(ManifestError, match=rf"cannot read manifest {site.url}/cut/m.jsonl: cut off"):
        read_manifest(ManifestSpec(f"{site.url}/cut/m.jsonl", id_column="id"))
    # A server without ranges is held in memory up to a size (extractor.audio.sources), beyond
    # which Parquet cannot be read, being read from its end; CSV and JSONL are read from the start.
    monkeypatch.setattr("extractor.audio.sources.SPOOL_MAX_BYTES", 1 << 10)
    with pytest.raises(ManifestError, match="the server serves no byte ranges"):
        read_manifest(ManifestSpec(f"{site.url}/plain/m.parquet", id_column="id"))
    assert read_manifest(ManifestSpec(f"{site.url}/plain/{files['csv.gz'].name}", id_column="id")).rows.height == len(clips)


# aiohttp and requests made unimportable, as on the base install (fsspec's http filesystem needs both).
BASE_INSTALL_JOB = "import sys; sys.modules['aiohttp'] = sys.modules['requests'] = None; from jobs.extract import main; main()"


def test_the_job_reads_http_manifests_on_the_base_install(site, clips, model, tmp_path):
    files = _http_manifests(site.root, clips)
    out = tmp_path / "out"
    for fmt, local in files.items():  # the same rows: the first run embeds them, the others find nothing to do
        summary = tmp_path / f"{fmt}.json"
        args = ["--manifest", f"{site.url}/ranged/{local.name}", "--output", str(out), "--model", str(model), "--id-column", "id",
                "--decode-workers", "0", "--summary-json", str(summary)]
        run = subprocess.run([sys.executable, "-c", BASE_INSTALL_JOB, *args], env=job_env(), capture_output=True, text=True,
                             cwd=REPO, timeout=300)
        assert run.returncode == 0, run.stderr
        done = json.loads(summary.read_text())
        assert (done["embedded"], done["skipped"]) == ((len(clips), 0) if fmt == "parquet" else (0, len(clips))), (fmt, done)
    assert sorted(pq.read_table(out / "embeddings")["id"].to_pylist()) == [f"u{i}" for i in range(len(clips))]
