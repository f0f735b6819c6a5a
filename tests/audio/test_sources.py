"""Sources (issue 12): every source is read with a byte cap, and every failure says what happened.

Real parts only: a loopback HTTP server (http.server in a thread) that serves ranges or not,
streams without end, stalls or 404s; a port with nothing listening; local special files; moto's
S3 server; and a decode worker (audio.pool) whose peak memory is read from /proc.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import numpy as np
import pytest

from builders import speechlike, write_audio
from extractor.audio.decode import DecodeRequest, FileJob, WindowBlock, decode_request, load_segments
from extractor.audio.errors import AudioError, TooLongError
from extractor.audio.pool import END, DecodePool, WorkerFailure
from extractor.audio.sources import HEADER_BYTES, MAX_BYTES_PER_S, SPOOL_MAX_BYTES, byte_cap, open_source

from .rss import decode_reporting_peak_rss

STALL_S = 0.5  # the read timeout of the tests that stall
# What a decode worker may add to its memory while it reads a stream far larger than this: the
# spool (SPOOL_MAX_BYTES), read buffers, FFmpeg's buffers. Before issue 12 it held the whole file.
WORKER_GROWTH_BOUND = 100 << 20
ENDLESS_MAX_DURATION_S = 20.0  # its cap (~140 MB) is well above WORKER_GROWTH_BOUND
CHUNK = 64 << 10
BUCKET = "sources-test"

# A WAV whose first chunk never ends: FFmpeg reads (and drops) it looking for "fmt ", forever.
ENDLESS_WAV_HEAD = b"RIFF" + (0xFFFFFFFF).to_bytes(4, "little") + b"WAVE" + b"junk" + (0xFFFFFFF0).to_bytes(4, "little")


# --- a loopback web site ----------------------------------------------------------------------


class Site:
    """What the loopback server serves, and what it saw."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.sent: dict[str, int] = {}  # bytes written per path
        self.stop = threading.Event()  # releases handlers that stall or stream forever
        self.url = ""

    def count(self, path: str) -> int:
        return sum(1 for p, _ in self.requests if p == path)


def _handler(site: Site):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # one line per request otherwise
            pass

        def do_GET(self):
            site.requests.append((self.path, self.headers.get("Range")))
            kind, _, name = self.path.lstrip("/").partition("/")
            try:
                getattr(self, f"_{kind}")(name)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client stopped reading: what the tests want

        def _ranged(self, name):  # a static file server: 206 for a Range request
            data = site.files[name]
            start = 0
            if self.headers.get("Range"):
                start = int(self.headers["Range"].removeprefix("bytes=").partition("-")[0])
            if start >= len(data):
                self.send_error(416)
                return
            self.send_response(206 if self.headers.get("Range") else 200)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(data) - start))
            self.end_headers()
            self._write(data[start:])

        def _plain(self, name):  # no ranges, but a length
            data = site.files[name]
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self._write(data)

        def _unsized(self, name):  # no ranges, no length: the body ends when the connection does
            self.send_response(200)
            self.end_headers()
            self._write(site.files[name])

        def _endless(self, name):
            self.send_response(200)
            self.end_headers()
            self._write(ENDLESS_WAV_HEAD)
            zeros = bytes(CHUNK)
            while not site.stop.is_set():
                self._write(zeros)

        def _stall(self, name):  # headers, then nothing
            self.send_response(200)
            self.send_header("Content-Length", "1000000")
            self.end_headers()
            self.wfile.flush()
            site.stop.wait(30)

        def _stall_ranged(self, name):  # a ranged file whose body stops after its first bytes
            data = site.files[name]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes 0-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self._write(data[:1000])
            self.wfile.flush()
            site.stop.wait(30)

        def _cut_off(self, name):  # declares the whole file, sends half, hangs up
            data = site.files[name]
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self._write(data[: len(data) // 2])

        def _missing(self, name):
            self.send_error(404)

        def _forbidden(self, name):
            self.send_error(403)

        def _write(self, data: bytes):
            self.wfile.write(data)
            site.sent[self.path] = site.sent.get(self.path, 0) + len(data)

    return Handler


@pytest.fixture(scope="module")
def site():
    s = Site()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(s))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="test-http", daemon=True)
    thread.start()
    s.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield s
    s.stop.set()
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture(scope="module")
def audio(tmp_path_factory):
    """A FLAC and an MP3 (with its Xing header) of the same 6 s, as files."""
    root = tmp_path_factory.mktemp("sources")
    x = speechlike(6.0, sr=44100, seed=3)
    return SimpleNamespace(flac=write_audio(root / "a.flac", x, 44100), mp3=write_audio(root / "a.mp3", x, 44100), root=root)


def closed_port() -> int:
    """A loopback port with nothing listening: connecting is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def socket_buffers_max() -> int:
    """The most a TCP connection can hold in flight between a writer and a reader, in bytes."""
    with open("/proc/sys/net/ipv4/tcp_rmem") as r, open("/proc/sys/net/ipv4/tcp_wmem") as w:
        return int(r.read().split()[2]) + int(w.read().split()[2])


def failures(names, *, max_duration_s=60.0, read_timeout_s=5.0, storage_options=None, pool=None):
    """Decode whole files as the pipeline does: ({name: failure record}, {name: duration_s}, extra
    messages); in a DecodePool when `pool` is given."""
    request = DecodeRequest(tuple(FileJob(n, (i,), ((None, None),)) for i, n in enumerate(names)), max_duration_s,
                            storage_options, read_timeout_s)
    if pool is None:
        messages = list(decode_request(request))
    else:
        messages = [m for _, m in pool.stream([(0, request)])]
        assert messages[-1] is END and not any(isinstance(m, WorkerFailure) for m in messages), messages
    failed, done, other = {}, {}, []
    for m in messages:
        if isinstance(m, WindowBlock):
            failed.update({names[i]: str(e) for i, e in m.failed})
            done.update({names[i]: d for i, _, d in m.done})
        elif m is not END:
            other.append(m)
    return failed, done, other


def assert_same_decode(url, path, segments=((None, None), (2.0, 4.5)), **kw):
    got = load_segments(url, list(segments), **kw)
    want = load_segments(path, list(segments))
    for g, w in zip(got, want):
        assert not isinstance(g, AudioError), g
        assert g.samples.dtype == w.samples.dtype and np.array_equal(g.samples, w.samples)


# --- good sources -----------------------------------------------------------------------------


def test_libsndfile_reads_a_local_file_itself_only_when_it_cannot_pass_its_cap(site, audio, tmp_path):
    """A local regular file within its cap goes to libsndfile as a descriptor (no Python call per
    read); one larger than its cap, bytes from the manifest and URLs go through the counting stream."""
    local = open_source(str(audio.flac), max_duration_s=60.0)
    try:
        fd = local.descriptor()
        assert fd is not None and os.path.samefile(f"/proc/self/fd/{fd}", audio.flac)
        assert os.lseek(fd, 0, os.SEEK_CUR) == 0  # libsndfile takes the descriptor's offset as the file's start
    finally:
        local.close()
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(int(byte_cap(0.01)) + 1))
    site.files[audio.flac.name] = audio.flac.read_bytes()
    others = [open_source(str(big), max_duration_s=0.01), open_source("row 3", data=audio.flac.read_bytes(), max_duration_s=60.0),
              open_source(f"{site.url}/ranged/{audio.flac.name}", max_duration_s=60.0)]
    try:
        assert [s.descriptor() for s in others] == [None, None, None]
    finally:
        for s in others:
            s.close()


@pytest.mark.parametrize("fmt", ["flac", "mp3"])
def test_a_server_with_ranges_gives_the_local_decode_bit_for_bit(site, audio, fmt):
    path = getattr(audio, fmt)
    site.files[path.name] = path.read_bytes()
    url = f"{site.url}/ranged/{path.name}"
    before = site.count(f"/ranged/{path.name}")
    assert_same_decode(url, path)
    # One request: soundfile seeks back after every read, and the MP3 header is read at offset 0;
    # both are served from the bytes just read (sources.HTTP_BACK_BYTES), not by new requests.
    assert site.count(f"/ranged/{path.name}") - before == 1


@pytest.mark.parametrize("route", ["plain", "unsized"])
def test_a_server_without_ranges_is_spooled_and_decodes_the_same(site, audio, route):
    # No Range support: a file this small is held in memory, then read as if local (libsndfile).
    path = audio.mp3
    site.files[path.name] = path.read_bytes()
    assert len(site.files[path.name]) <= SPOOL_MAX_BYTES
    before = site.count(f"/{route}/{path.name}")
    assert_same_decode(f"{site.url}/{route}/{path.name}", path)
    assert site.count(f"/{route}/{path.name}") - before == 1  # one request, however many segments


def test_a_late_segment_of_a_long_stream_is_within_the_cap(site, tmp_path):
    # The cap follows how far the rows reach: a segment at 55 s of a 60 s file may read 55 s of
    # bytes even when max_duration_s is 0.5 (the segment itself is 0.4 s).
    x = np.stack([speechlike(60.0, sr=48000, seed=4), speechlike(60.0, sr=48000, seed=5)], 1)
    path = write_audio(tmp_path / "long.wav", x, 48000, subtype="FLOAT")
    site.files["long.wav"] = path.read_bytes()
    assert len(site.files["long.wav"]) > byte_cap(0.5)
    assert_same_decode(f"{site.url}/unsized/long.wav", path, segments=[(55.0, 55.4)], max_duration_s=0.5)


# --- bad sources ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dev_zero", "file_url", "fifo", "directory"])
def test_what_is_not_a_regular_file_fails_at_once(tmp_path, kind):
    if kind == "fifo":
        os.mkfifo(tmp_path / "pipe.wav")  # opening it for reading would wait for a writer forever
    name, what = {"dev_zero": ("/dev/zero", "a character device"), "file_url": ("file:///dev/zero", "a character device"),
                  "fifo": (str(tmp_path / "pipe.wav"), "a FIFO"), "directory": (str(tmp_path), "a directory")}[kind]
    t0 = time.monotonic()
    failed, done, _ = failures([name])
    assert time.monotonic() - t0 < 1.0
    assert failed == {name: f"AudioError: cannot read {name}: not a regular file ({what})"}


def test_http_failures_say_what_happened(site, audio):
    site.files[audio.flac.name] = audio.flac.read_bytes()
    refused = f"http://127.0.0.1:{closed_port()}/a.flac"
    missing = f"{site.url}/missing/a.flac"
    forbidden = f"{site.url}/forbidden/a.flac"
    stalled = f"{site.url}/stall/a.flac"
    stalled_mid_file = f"{site.url}/stall_ranged/{audio.flac.name}"
    cut_off = f"{site.url}/cut_off/{audio.flac.name}"
    t0 = time.monotonic()
    failed, done, _ = failures([refused, missing, forbidden, stalled, stalled_mid_file, cut_off], read_timeout_s=STALL_S)
    assert time.monotonic() - t0 < 2 * STALL_S + 2.0
    assert failed[refused] == f"AudioError: cannot read {refused}: refused (connection refused)"
    assert failed[missing] == f"AudioError: cannot read {missing}: not found (HTTP 404 Not Found)"
    assert failed[forbidden] == f"AudioError: cannot read {forbidden}: permission denied (HTTP 403 Forbidden)"
    assert failed[stalled] == f"AudioError: cannot read {stalled}: timed out (no data for {STALL_S:g} s)"
    # Stalled while libsndfile read its header: the read error, not "not a format libsndfile reads".
    assert failed[stalled_mid_file] == f"AudioError: cannot read {stalled_mid_file}: timed out (no data for {STALL_S:g} s)"
    # http.client takes a body that ends early for the end of the file; a decoder would embed half.
    size = len(site.files[audio.flac.name])
    assert failed[cut_off] == f"AudioError: cannot read {cut_off}: cut off: the connection closed {size - size // 2:,} bytes before the end"
    assert not done


@pytest.mark.parametrize("kind", ["local", "bytes", "ranged", "unsized", "s3"])
def test_every_kind_of_source_stops_one_byte_past_its_cap(site, tmp_path, request, kind):
    max_duration_s = 0.01
    cap = byte_cap(max_duration_s)
    assert cap == HEADER_BYTES + math.ceil(max_duration_s * MAX_BYTES_PER_S)
    data = bytes(int(cap) + 5 * CHUNK)
    name, options = {"local": str(tmp_path / "big.bin"), "bytes": "row 7 of manifest.parquet", "ranged": f"{site.url}/ranged/big.bin",
                     "unsized": f"{site.url}/unsized/big.bin", "s3": f"s3://{BUCKET}/big.bin"}[kind], None
    if kind == "local":
        (tmp_path / "big.bin").write_bytes(data)
    elif kind == "s3":
        s3 = request.getfixturevalue("s3")
        s3.fs.pipe_file(f"{BUCKET}/big.bin", data)
        options = s3.options
    else:
        site.files["big.bin"] = data
    with pytest.raises(TooLongError) as e:
        src = open_source(name, data=data if kind == "bytes" else None, max_duration_s=max_duration_s, storage_options=options)
        try:
            f = src.fileobj()
            while f.read(CHUNK):
                pass
            assert src.stream.bytes_read == cap + 1  # the read that passed it was cut to one byte
            src.check()
        finally:
            src.close()
    assert str(e.value).startswith(f"cannot read {name}: too large: more than {cap:,} bytes")
    assert f"max_duration_s={max_duration_s:g}" in str(e.value)


# --- in a decode worker: failure records and bounded memory ------------------------------------


def test_a_worker_reading_bad_sources_records_each_and_stays_small(site):
    endless = f"{site.url}/endless/a.wav"
    refused = f"http://127.0.0.1:{closed_port()}/b.wav"
    missing = f"{site.url}/missing/c.wav"
    stalled = f"{site.url}/stall/d.wav"
    names = [endless, refused, missing, stalled, "file:///dev/zero"]
    cap = byte_cap(ENDLESS_MAX_DURATION_S)
    assert cap > WORKER_GROWTH_BOUND + SPOOL_MAX_BYTES
    with DecodePool(1, timeout_s=60, decode_fn=decode_reporting_peak_rss) as pool:
        failed, done, (rss,) = failures(names, max_duration_s=ENDLESS_MAX_DURATION_S, read_timeout_s=STALL_S, pool=pool)
    assert not done
    assert failed[endless].startswith(f"TooLongError: cannot read {endless}: too large: more than {cap:,} bytes"), failed[endless]
    assert failed[refused] == f"AudioError: cannot read {refused}: refused (connection refused)"
    assert failed[missing] == f"AudioError: cannot read {missing}: not found (HTTP 404 Not Found)"
    assert failed[stalled] == f"AudioError: cannot read {stalled}: timed out (no data for {STALL_S:g} s)"
    assert failed["file:///dev/zero"] == "AudioError: cannot read file:///dev/zero: not a regular file (a character device)"
    # The worker stopped reading at the cap; the server got ahead of it by the kernel's socket
    # buffers at most (on loopback they grow to tcp_rmem's and tcp_wmem's maximum) ...
    sent = site.sent["/endless/a.wav"]
    assert cap <= sent <= cap + socket_buffers_max(), (sent, cap)
    # ... and never held more than a bounded part of the ~140 MB it read.
    growth = rss["peak_rss"] - rss["base_rss"]
    assert growth < WORKER_GROWTH_BOUND, f"the worker grew by {growth / 2**20:.0f} MiB"


# --- s3:// through moto's server ----------------------------------------------------------------


@pytest.fixture(scope="module")
def s3(audio):
    from moto.server import ThreadedMotoServer
    import s3fs

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": f"http://{host}:{port}"}}
    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    fs.mkdir(BUCKET)
    fs.put_file(str(audio.flac), f"{BUCKET}/a.flac")
    yield SimpleNamespace(options=options, fs=fs)
    server.stop()


def test_s3_reads_the_object_and_names_a_missing_key(s3, audio):
    assert_same_decode(f"s3://{BUCKET}/a.flac", audio.flac, storage_options=s3.options)
    missing = f"s3://{BUCKET}/missing.flac"
    failed, _, _ = failures([missing], storage_options=s3.options)
    assert failed[missing] == f"AudioError: cannot read {missing}: not found (no such file)"


# --- schemes without a timeout of their own: a server that accepts and never answers -----------


@pytest.fixture
def mute_server():
    """A TCP port on 127.0.0.1 that accepts every connection and never sends a byte (a hung FTP
    or web server): its URL prefix host:port."""
    listener = socket.create_server(("127.0.0.1", 0))
    held, stop = [], threading.Event()

    def accept():
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    listener.close()


@pytest.mark.parametrize("scheme", [
    "ftp",  # fsspec's ftplib, given the read timeout
    "webhdfs",  # fsspec's requests session, which has none: the deadline on each call
])
def test_a_stalled_server_of_any_scheme_fails_within_the_read_timeout(mute_server, scheme):
    url = f"{scheme}://{mute_server}/a.wav"
    t0 = time.perf_counter()
    failed, done, _ = failures([url], read_timeout_s=STALL_S)
    elapsed = time.perf_counter() - t0
    assert not done and failed[url] == f"AudioError: cannot read {url}: timed out (no data for {STALL_S:g} s)"
    assert elapsed < STALL_S + 1.5, elapsed
