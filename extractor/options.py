"""A run's options, frozen, each declared once: its default, its choices or bounds, its help.

A field that is also a flag of `extract-embeddings` carries its `Flag` in the field's metadata;
the command builds its click options from these declarations (jobs/flags.py), and the flag's
environment variable (EXTRACT_EMBEDDINGS_<FLAG>) with them. The options check themselves when
made, whoever makes them (the command, the notebook API, a test): a bad value is a ConfigError
(exit 2) naming the flag, before anything is read or written.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import MISSING, Field, dataclass, field, fields, is_dataclass
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

from .constants import MAX_TOKENS
from .errors import ConfigError
from .pooling import POOLINGS as _POOLING_STRATEGIES

DEFAULT_PART_ROWS = 10_000  # rows per committed part: at most what a kill loses
DEFAULT_PART_BYTES = 256 << 20  # a part is also committed once its vectors reach this size
DEFAULT_COMMIT_SECONDS = 60.0  # ... or once its oldest row has waited this long
DEFAULT_MAX_FAILURE_RATE = 0.01  # of the rows a run attempts
DEFAULT_MAX_DURATION_S = 2 * 3600.0  # longer audio is a failure record; decoding stops there
DEFAULT_DECODE_TIMEOUT_S = 120.0  # per file; the worker is killed and replaced
# Seconds a remote read may wait for a connection or for the next byte before its file fails as
# "timed out"; well under the decode timeout, so a stalled server is named as such.
DEFAULT_READ_TIMEOUT_S = 30.0
MAX_DECODE_WORKERS = 16  # per device, by default: more do not feed one GPU faster, they only cost memory
# The most --decode-workers a device may be given. Room for audio four times as costly to decode
# as the benchmark's worst corpus (bench/RESULTS.md: 16 decoders kept a GPU fed on 44.1 kHz stereo
# FLAC), and a bound on the memory and processes a typo (640 for 64) can take: each decoder is a
# process of its own. A fixed number, not the host's cores: a command that a scheduler may place
# on any node must be valid on all of them, since a refusal (exit 2) is never retried.
DECODE_WORKERS_LIMIT = 4 * MAX_DECODE_WORKERS


def default_decode_workers(devices: int = 1) -> int:
    """Decoder processes per device: the host's cores, shared among the devices.

    Not one fewer for the job's own process: it takes 1.0-1.6 cores in the steady phase, so with
    cores - 1 decoders the host still had idle cores, and on 44.1 kHz stereo FLAC, where decoding
    bounds the job, one more decoder gave 6-11 % more audio per second (bench/RESULTS.md)."""
    cores = os.cpu_count() or 2
    return max(1, min(MAX_DECODE_WORKERS, cores // devices))


POOLINGS = tuple(_POOLING_STRATEGIES)  # --pooling: the names of extractor.pooling's strategies
DTYPES = ("auto", "float32", "bfloat16", "float16")  # --dtype; auto: bfloat16 on CUDA, float32 on CPU
OUTPUT_DTYPES = ("float32", "float16")  # --output-dtype
ENGINES = ("local", "ray")  # --engine
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")  # --log-level
LOG_FORMATS = ("plain", "json")  # --log-format
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def manifest_formats() -> tuple[str, ...]:
    """--manifest-format: the names of the manifest readers' registry (extractor.manifest.formats).
    Read when asked, not at import: that module imports this one."""
    from .manifest.formats import FORMATS

    return tuple(FORMATS)


# --- declarations ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Flag:
    """How an option appears on the command line. Its type is the field's; its default the field's."""

    help: str
    name: str | None = None  # default: the field's name with dashes (--part-rows)
    # The allowed values, or a function that names them (a registry that cannot be imported here).
    choices: tuple[str, ...] | Callable[[], tuple[str, ...]] | None = None
    min: float | None = None
    max: float | None = None
    min_open: bool = False  # min itself is not allowed
    required: bool = False
    parse: Callable[[str], Any] | None = None  # text → value; ValueError saying why not
    negated: bool = False  # an on/off flag that turns the option off (--no-padding-mask)
    hidden: bool = False

    def flag_name(self, f: Field) -> str:
        return self.name or "--" + f.name.replace("_", "-")

    def allowed(self) -> tuple[str, ...] | None:
        return self.choices() if callable(self.choices) else self.choices


def flag(default: Any = MISSING, **declaration) -> Any:
    """A dataclass field that is also a flag of the command: `flag(default, help=..., ...)`."""
    return field(default=default, metadata={"flag": Flag(**declaration)})


def declared(cls) -> Iterator[tuple[Field, Flag | None, type]]:
    """(field, its Flag or None, its type without None) of a dataclass of options, in order."""
    hints = get_type_hints(cls)
    for f in fields(cls):
        yield f, f.metadata.get("flag"), value_type(hints[f.name])


def value_type(hint) -> type:
    """`int` for `int | None`: the type a flag's value has when it is given."""
    if get_origin(hint) in (Union, UnionType):
        (hint,) = [a for a in get_args(hint) if a is not type(None)]
    return get_origin(hint) or hint


_KINDS = {str: "text", bool: "true or false", dict: "a JSON object", tuple: "a tuple of names"}


def _check_declared(options) -> None:
    """Refuse a value outside what its flag declares (type, choices, bounds): ConfigError."""
    for f, decl, kind in declared(type(options)):
        value = getattr(options, f.name)
        if decl is None or value is None or is_dataclass(kind):
            continue
        name = decl.flag_name(f)
        if kind in (int, float):
            # bool is an int to Python, and NaN passes every comparison below
            number = isinstance(value, int) if kind is int else isinstance(value, (int, float)) and not math.isnan(value)
            if isinstance(value, bool) or not number:
                raise ConfigError(f"{name} {value!r}: expected {'an integer' if kind is int else 'a number'}{_range(decl)}")
        elif not isinstance(value, kind):
            raise ConfigError(f"{name} {value!r}: expected {_KINDS.get(kind, kind.__name__)}")
        allowed = decl.allowed()
        if allowed is not None and value not in allowed:
            raise ConfigError(f"{name} {value!r}: expected one of {', '.join(allowed)}")
        too_low = decl.min is not None and (value <= decl.min if decl.min_open else value < decl.min)
        too_high = decl.max is not None and value > decl.max
        if too_low or too_high:
            raise ConfigError(f"{name} {value!r}: expected {'an integer' if kind is int else 'a number'}{_range(decl)}")


def _range(decl: Flag) -> str:
    low = "" if decl.min is None else f"{'above' if decl.min_open else 'at least'} {decl.min:g}"
    high = "" if decl.max is None else f"at most {decl.max:g}"
    return " " + " and ".join(p for p in (low, high) if p) if low or high else ""


def comma_list(text: str) -> tuple[str, ...]:
    """'a, b,c' → ('a', 'b', 'c')."""
    return tuple(c.strip() for c in text.split(",") if c.strip())


def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise ValueError(f"not JSON: {e}") from e
    if not isinstance(value, dict):
        raise ValueError("must be a JSON object")
    return value


# --- the options ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ManifestSpec:
    """What the command line says about the manifest: where it is, its format, and which columns mean what."""

    path: str = flag(name="--manifest", required=True,
                     help="Manifest, one row per audio: Parquet, CSV, JSONL (.gz) or lhotse cuts; a path, an http(s) URL or "
                          "an fsspec URL (s3://, ...). The format from the extension (see --manifest-format).")
    path_column: str = flag("path", help="Column holding the audio's path or URL.")
    # None: the path is the id (embedded audio: the struct's path)
    id_column: str | None = flag(None, help="Unique key column; default: the path is the id.")
    keep_columns: tuple[str, ...] = flag((), parse=comma_list, help="Comma-separated manifest columns copied to the output.")
    start_column: str | None = flag(None, help="Segment start in seconds (float); embeds a region of the file.")
    end_column: str | None = flag(None, help="Segment end in seconds (float).")
    # None: from the file's name (manifest.formats)
    format: str | None = flag(None, name="--manifest-format", choices=manifest_formats,
                              help="Read the manifest as this format whatever its name; default: .parquet, .csv(.gz), "
                                   ".jsonl(.gz), *cuts*.jsonl(.gz) for lhotse, else Parquet. CSV columns are read as strings.")
    # audio stored in the manifest (Parquet only); path_column is then unused
    audio_column: str | None = flag(None, help="Audio stored in a Parquet manifest: a binary column, or a struct of bytes and "
                                               "path (Hugging Face Audio); replaces --path-column. The id defaults to the struct's path.")

    def __post_init__(self):
        if isinstance(self.keep_columns, list):  # a natural way to write it in Python
            object.__setattr__(self, "keep_columns", tuple(self.keep_columns))
        _check_declared(self)
        if not self.path:
            raise ConfigError("--manifest is empty: expected a path or URL")


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count`: the rows whose id hashes to index (manifest.shard_of)."""

    index: int = flag(0, name="--shard-index", min=0, help="This run's shard of the manifest (see --num-shards).")
    count: int = flag(1, name="--num-shards", min=1, help="Shards the manifest is split into; the same for every run into one output.")

    def __post_init__(self):
        _check_declared(self)
        if not self.index < self.count:
            raise ConfigError(f"--shard-index {self.index} must be below --num-shards {self.count}")

    @property
    def tag(self) -> str:
        return f"{self.index:05d}"

    def __str__(self) -> str:
        return f"{self.index} of {self.count}"


@dataclass(frozen=True)
class JobOptions:
    manifest: ManifestSpec
    output: str = flag(required=True, help="Output directory or URL (created if missing); readers read OUTPUT/embeddings.")
    model: str = flag(required=True, help="Qwen2-Audio checkpoint: a directory in the Hugging Face layout, or a Hub repo id ORG/NAME[@REV].")
    adapter: str | None = flag(None, help="PEFT LoRA adapter (a directory or a Hub repo id), merged at load.")
    device: str = flag("auto", help="auto | cpu | cuda | cuda:N")
    dtype: str = flag("auto", choices=DTYPES, help="Compute dtype; auto is bfloat16 on CUDA, float32 on CPU.")
    padding_mask: bool = flag(True, name="--no-padding-mask", negated=True,
                              help="Reproduce audio_tower(input_features) on 30 s padded windows with no mask.")
    pooling: str = flag("mean", choices=POOLINGS,
                        help="mean: one vector per row; none: also a `frames` column with every 40 ms frame; "
                             "max: the element-wise maximum over the row's frames.")
    output_dtype: str = flag("float32", choices=OUTPUT_DTYPES, help="The stored vectors' dtype.")
    part_rows: int = flag(DEFAULT_PART_ROWS, min=1, help="Rows per committed part (a part is also committed at least every 60 s).")
    part_bytes: int = DEFAULT_PART_BYTES
    commit_seconds: float = DEFAULT_COMMIT_SECONDS
    max_failure_rate: float = flag(DEFAULT_MAX_FAILURE_RATE, min=0, max=1,
                                   help="Exit 3 when the fraction of this run's rows that failed is above this.")
    retry_failed: bool = flag(False, help="Retry rows that failed in earlier runs.")
    # None: default_decode_workers()
    decode_workers: int | None = flag(None, min=0, max=DECODE_WORKERS_LIMIT,
                                      help=f"Decoder processes per device; default: the cores (at most {MAX_DECODE_WORKERS}); "
                                           f"0 decodes in-process; at most {DECODE_WORKERS_LIMIT}, as each one is a process.")
    decode_timeout_s: float = flag(DEFAULT_DECODE_TIMEOUT_S, min=0, min_open=True,
                                   help="A decode that makes no progress for this long is killed; its file gets a failure record.")
    read_timeout_s: float = flag(DEFAULT_READ_TIMEOUT_S, min=0, min_open=True,
                                 help="A remote read (http, s3, ...) that waits this long for a byte fails as timed out.")
    max_duration_s: float = flag(DEFAULT_MAX_DURATION_S, min=0, min_open=True,
                                 help="Longer audio becomes a failure record (memory stays bounded).")
    # None: the device's default (batching.staging)
    token_budget: int | None = flag(None, min=MAX_TOKENS, help="Encoder tokens per batch (default: 32768 on GPU).")
    shard: Shard = field(default_factory=Shard)
    progress: bool = True  # a bar on a terminal, periodic lines in a log
    # fsspec options (credentials, endpoint) for "://" manifest, audio and output; None: the
    # filesystem's defaults, e.g. AWS_* environment variables for s3://.
    storage_options: dict | None = flag(None, parse=json_object,
                                        help='JSON object of fsspec options for s3://, gs://, ... paths, e.g. '
                                             '\'{"client_kwargs": {"endpoint_url": "http://minio:9000"}}\'; '
                                             "default: the environment (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ...).")

    def __post_init__(self):
        _check_declared(self)
        for name in ("output", "model"):
            if not getattr(self, name):
                raise ConfigError(f"--{name} is empty: expected a path or URL")
        if not _DEVICE.fullmatch(self.device):
            raise ConfigError(f"--device {self.device!r}: expected auto, cpu, cuda or cuda:N")
        if not isinstance(self.manifest, ManifestSpec) or not isinstance(self.shard, Shard):
            raise ConfigError("JobOptions: manifest must be a ManifestSpec and shard a Shard")


@dataclass(frozen=True)
class CommandOptions:
    """How the command runs the job and reports on it; not part of what a run computes."""

    devices: str | None = flag(None, help="One worker process per device, one output and one progress bar: "
                                          "cuda:0,cuda:1,... or all; overrides --device.")
    engine: str = flag("local",
                       help="local: this host; ray: every shard as a task on a Ray cluster at RAY_ADDRESS, or a local Ray "
                            "(pip install '.[ray]'); or module:function, an engine of your own (extractor.engines).")
    summary_json: str | None = flag(None, help="Write the run's summary here, whatever the outcome (for XCom and dashboards); "
                                               "its folder must exist and be writable.")
    dry_run: bool = flag(False, help="Print what a run would do (pending rows, audio hours, recipe) or why it would be refused; "
                                     "write nothing.")
    log_level: str = flag("INFO", choices=LOG_LEVELS, help="Log this level and above.")
    log_format: str = flag("plain", choices=LOG_FORMATS, help="json: one JSON object per line (progress, summary, warnings).")

    def __post_init__(self):
        _check_declared(self)
        if self.engine not in ENGINES and ":" not in self.engine:
            raise ConfigError(f"--engine {self.engine!r}: expected one of {', '.join(ENGINES)}, or module:function")
        if self.devices and self.engine != "local":
            raise ConfigError("--devices is for --engine local; Ray places one task per GPU")
