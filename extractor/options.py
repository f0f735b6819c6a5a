"""A run's options, frozen, and every default in one place.

The command line (jobs/extract.py), the notebook API, the engines and the stages all read their
defaults from here, so that they cannot drift apart.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .pooling import POOLINGS  # noqa: F401  --pooling's choices: the strategies' names (imports no numpy)

DEFAULT_PART_ROWS = 10_000  # rows per committed part: at most what a kill loses
DEFAULT_PART_BYTES = 256 << 20  # a part is also committed once its vectors reach this size
DEFAULT_COMMIT_SECONDS = 60.0  # ... or once its oldest row has waited this long
DEFAULT_MAX_FAILURE_RATE = 0.01  # of the rows a run attempts
DEFAULT_MAX_DURATION_S = 2 * 3600.0  # longer audio is a failure record; decoding stops there
DEFAULT_DECODE_TIMEOUT_S = 120.0  # per file; the worker is killed and replaced
# Seconds a remote read may wait for a connection or for the next byte before its file fails as
# "timed out"; well under the decode timeout, so a stalled server is named as such.
DEFAULT_READ_TIMEOUT_S = 30.0
MAX_DECODE_WORKERS = 16  # per device: more do not feed one GPU faster, they only cost memory


def default_decode_workers(devices: int = 1) -> int:
    """Decoder processes per device: the host's cores, shared among the devices.

    Not one fewer for the job's own process: it takes 1.0-1.6 cores in the steady phase, so with
    cores - 1 decoders the host still had idle cores, and on 44.1 kHz stereo FLAC, where decoding
    bounds the job, one more decoder gave 6-11 % more audio per second (bench/RESULTS.md)."""
    cores = os.cpu_count() or 2
    return max(1, min(MAX_DECODE_WORKERS, cores // devices))


DTYPES = ("auto", "float32", "bfloat16", "float16")  # --dtype; auto: bfloat16 on CUDA, float32 on CPU
OUTPUT_DTYPES = ("float32", "float16")  # --output-dtype
MANIFEST_FORMATS = ("parquet", "csv", "jsonl", "lhotse")  # --manifest-format; None: by extension (manifest.formats)


@dataclass(frozen=True)
class ManifestSpec:
    """What the command line says about the manifest: where it is, its format, and which columns mean what."""

    path: str
    path_column: str = "path"
    id_column: str | None = None  # None: the path is the id (embedded audio: the struct's path)
    keep_columns: tuple[str, ...] = ()
    start_column: str | None = None
    end_column: str | None = None
    format: str | None = None  # one of MANIFEST_FORMATS; None: from the file's extension
    audio_column: str | None = None  # audio stored in the manifest (Parquet only); path_column is then unused


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count`: the rows whose id hashes to index (manifest.shard_of)."""

    index: int = 0
    count: int = 1

    def __post_init__(self):
        if not (self.count >= 1 and 0 <= self.index < self.count):
            raise ValueError(f"shard {self.index} of {self.count}: need 0 <= index < count")

    @property
    def tag(self) -> str:
        return f"{self.index:05d}"

    def __str__(self) -> str:
        return f"{self.index} of {self.count}"


@dataclass(frozen=True)
class JobOptions:
    manifest: ManifestSpec
    output: str
    model: str
    adapter: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    padding_mask: bool = True
    pooling: str = "mean"  # mean | none
    output_dtype: str = "float32"
    part_rows: int = DEFAULT_PART_ROWS
    part_bytes: int = DEFAULT_PART_BYTES
    commit_seconds: float = DEFAULT_COMMIT_SECONDS
    max_failure_rate: float = DEFAULT_MAX_FAILURE_RATE
    retry_failed: bool = False
    decode_workers: int | None = None  # None: default_decode_workers()
    decode_timeout_s: float = DEFAULT_DECODE_TIMEOUT_S
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S
    max_duration_s: float = DEFAULT_MAX_DURATION_S
    token_budget: int | None = None  # None: the device's default (batching.packing)
    shard: Shard = field(default_factory=Shard)
    progress: bool = True  # a bar on a terminal, periodic lines in a log
    # fsspec options (credentials, endpoint) for "://" manifest, audio and output; None: the
    # filesystem's defaults, e.g. AWS_* environment variables for s3://.
    storage_options: dict | None = None
