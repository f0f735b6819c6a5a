"""A real S3 server on loopback for the tests: moto in server mode, which answers the S3 REST
protocol over HTTP, so the job's s3fs client really lists, PUTs, GETs and writes conditionally
against it, in the test's process and in subprocesses (they find it through AWS_ENDPOINT_URL)."""

from __future__ import annotations

import io
import logging
from contextlib import contextmanager
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest


@contextmanager
def s3_server(bucket: str):
    """The server, with `bucket` made and AWS_* set in os.environ while it runs.

    Yields fs (an s3fs client), endpoint (its URL) and env (the AWS_* a subprocess needs)."""
    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": endpoint}
    try:
        with pytest.MonkeyPatch.context() as mp:
            for k, v in env.items():
                mp.setenv(k, v)
            mp.delenv("AWS_PROFILE", raising=False)
            s3fs.S3FileSystem.clear_instance_cache()  # fsspec caches clients; this server is new
            fs = s3fs.S3FileSystem()
            fs.mkdir(bucket)
            yield SimpleNamespace(fs=fs, endpoint=endpoint, env=env)
            s3fs.S3FileSystem.clear_instance_cache()
    finally:
        server.stop()


def put_manifest(fs, bucket: str, key: str, rows: list[dict]) -> str:
    """A Parquet manifest of `rows` at s3://bucket/key; returns its URL."""
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    fs.pipe_file(f"{bucket}/{key}", buf.getvalue())
    return f"s3://{bucket}/{key}"
