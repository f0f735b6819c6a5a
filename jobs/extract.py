"""`extract-embeddings`: parse flags, run the engine, map the outcome to an exit code.

Exit codes (extractor.errors, the README's table): 0 done; 1 unexpected (retry); 2 configuration
or input error (never retry); 3 this run's failure rate over the limit; 75 the output is busy
with a live run (retry later); 130/143 stopped by SIGINT/SIGTERM (what was embedded is kept).

Nothing here imports torch: `--help`, `--version` and a rerun with nothing to do stay fast.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys

import click

from extractor import __version__
from extractor.errors import EXIT_CONFIG, EXIT_FAILURE_RATE, EXIT_OK, EXIT_UNEXPECTED, Interrupted, exit_code_of
from extractor.options import (DEFAULT_DECODE_TIMEOUT_S, DEFAULT_MAX_DURATION_S, DEFAULT_MAX_FAILURE_RATE, DEFAULT_PART_ROWS,
                               DEFAULT_READ_TIMEOUT_S, DTYPES, MANIFEST_FORMATS, OUTPUT_DTYPES, POOLINGS, JobOptions,
                               ManifestSpec, Shard)
from extractor.signals import StopSignal, graceful_signals
from jobs.logs import configure

logger = logging.getLogger("extract-embeddings")

ENV_PREFIX = "EXTRACT_EMBEDDINGS"


def _columns(value: str | None) -> tuple[str, ...]:
    return tuple(c.strip() for c in value.split(",") if c.strip()) if value else ()


def _json_object(ctx, param, value: str | None) -> dict | None:
    if value is None:
        return None
    try:
        parsed = json.loads(value)
    except ValueError as e:
        raise click.BadParameter(f"not JSON: {e}") from e
    if not isinstance(parsed, dict):
        raise click.BadParameter("must be a JSON object")
    return parsed


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", package_name="qwen2-audio-embeddings")
@click.option("--manifest", required=True,
              help="Manifest, one row per audio: Parquet, CSV, JSONL (.gz) or lhotse cuts, local or fsspec URL; the format from "
                   "the extension (see --manifest-format).")
@click.option("--manifest-format", type=click.Choice(MANIFEST_FORMATS),
              help="Read the manifest as this format whatever its name; default: .parquet, .csv(.gz), .jsonl(.gz), "
                   "*cuts*.jsonl(.gz) for lhotse, else Parquet. CSV columns are read as strings.")
@click.option("--audio-column",
              help="Audio stored in a Parquet manifest: a binary column, or a struct of bytes and path (Hugging Face Audio); "
                   "replaces --path-column. The id defaults to the struct's path.")
@click.option("--output", required=True, help="Output directory (created if missing); readers read OUTPUT/embeddings.")
@click.option("--storage-options", callback=_json_object,
              help='JSON object of fsspec options for s3://, gs://, ... paths, e.g. \'{"client_kwargs": {"endpoint_url": "http://minio:9000"}}\'; '
                   "default: the environment (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ...).")
@click.option("--model", required=True, help="Qwen2-Audio checkpoint directory (HF layout).")
@click.option("--adapter", help="PEFT LoRA adapter directory, merged at load.")
@click.option("--id-column", help="Unique key column; default: the path is the id.")
@click.option("--path-column", default="path", show_default=True, help="Column holding the audio path.")
@click.option("--keep-columns", help="Comma-separated manifest columns copied to the output.")
@click.option("--start-column", help="Segment start in seconds (float); embeds a region of the file.")
@click.option("--end-column", help="Segment end in seconds (float).")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N")
@click.option("--devices", help="One worker process per device, one output and one progress bar: cuda:0,cuda:1,... or all; overrides --device.")
@click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True,
              help="Compute dtype; auto is bfloat16 on CUDA, float32 on CPU.")
@click.option("--no-padding-mask", is_flag=True, help="Reproduce audio_tower(input_features) on 30 s padded windows with no mask.")
@click.option("--pooling", type=click.Choice(POOLINGS), default="mean", show_default=True,
              help="mean: one vector per row; none: also a `frames` column with every 40 ms frame.")
@click.option("--output-dtype", type=click.Choice(OUTPUT_DTYPES), default="float32", show_default=True)
@click.option("--part-rows", type=click.IntRange(min=1), default=DEFAULT_PART_ROWS, show_default=True,
              help="Rows per committed part (a part is also committed at least every 60 s).")
@click.option("--max-failure-rate", type=click.FloatRange(0, 1), default=DEFAULT_MAX_FAILURE_RATE, show_default=True,
              help="Exit 3 when the fraction of this run's rows that failed is above this.")
@click.option("--retry-failed", is_flag=True, help="Retry rows that failed in earlier runs.")
@click.option("--max-duration-s", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_MAX_DURATION_S, show_default=True,
              help="Longer audio becomes a failure record (memory stays bounded).")
@click.option("--decode-workers", type=click.IntRange(min=0), help="Decoder processes; default: the cores (max 16); 0 decodes in-process.")
@click.option("--decode-timeout-s", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_DECODE_TIMEOUT_S, show_default=True,
              help="A decode that makes no progress for this long is killed; its file gets a failure record.")
@click.option("--read-timeout-s", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_READ_TIMEOUT_S, show_default=True,
              help="A remote read (http, s3, ...) that waits this long for a byte fails as timed out.")
@click.option("--token-budget", type=click.IntRange(min=1500), help="Encoder tokens per batch (default: 32768 on GPU).")
@click.option("--shard-index", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--num-shards", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: this host; ray: every shard as a task on a Ray cluster at RAY_ADDRESS, or a local Ray (pip install '.[ray]').")
@click.option("--summary-json", type=click.Path(dir_okay=False), help="Write the run's summary here, whatever the outcome (for XCom and dashboards).")
@click.option("--dry-run", is_flag=True, help="Print what a run would do (pending rows, audio hours, recipe) or why it would be refused; write nothing.")
@click.option("--log-level", default="INFO", show_default=True)
@click.option("--log-format", type=click.Choice(["plain", "json"]), default="plain", show_default=True,
              help="json: one JSON object per line (progress, summary, warnings).")
@click.option("--decode-fn", hidden=True, help="module:function replacing the decoder (tests only).")
def extract(**kw) -> None:
    """Embed every audio of a manifest with Qwen2-Audio's audio tower (+ LoRA) into Parquet parts.

    Resumable: rerun the same command after any interruption; every row ends up exactly once in
    OUTPUT/embeddings/ or OUTPUT/_failures/. Every flag can also be set as an environment variable,
    EXTRACT_EMBEDDINGS_<FLAG> (e.g. EXTRACT_EMBEDDINGS_PART_ROWS=5000).

    Exit codes: 0 done, 1 unexpected (retry), 2 configuration error (never retry), 3 failure
    rate over the limit, 75 output busy (retry later), 130/143 interrupted (rerun resumes).
    """
    # First thing, before an engine's imports: a signal from here on is a graceful stop (a
    # KeyboardInterrupt would reach click, which exits 1 with "Aborted!").
    stop = StopSignal()
    with graceful_signals(stop):
        _extract(stop, kw)


def _extract(stop: StopSignal, kw: dict) -> None:
    configure(kw["log_level"], kw["log_format"])
    if kw["shard_index"] >= kw["num_shards"]:
        raise click.BadParameter(f"--shard-index {kw['shard_index']} must be below --num-shards {kw['num_shards']}")
    opts = JobOptions(
        manifest=ManifestSpec(
            path=kw["manifest"], path_column=kw["path_column"], id_column=kw["id_column"], keep_columns=_columns(kw["keep_columns"]),
            start_column=kw["start_column"], end_column=kw["end_column"], format=kw["manifest_format"],
            audio_column=kw["audio_column"],
        ),
        output=kw["output"], model=kw["model"], adapter=kw["adapter"], device=kw["device"], dtype=kw["dtype"],
        padding_mask=not kw["no_padding_mask"], pooling=kw["pooling"], output_dtype=kw["output_dtype"],
        part_rows=kw["part_rows"], max_failure_rate=kw["max_failure_rate"], retry_failed=kw["retry_failed"],
        decode_workers=kw["decode_workers"], decode_timeout_s=kw["decode_timeout_s"], read_timeout_s=kw["read_timeout_s"],
        max_duration_s=kw["max_duration_s"],
        token_budget=kw["token_budget"], shard=Shard(kw["shard_index"], kw["num_shards"]),
        storage_options=kw["storage_options"],
    )
    seams = _seams(kw["decode_fn"])
    summary, code, error = None, EXIT_OK, None
    try:
        if kw["dry_run"]:
            from extractor.tools.dry_run import dry_run

            code = dry_run(opts, kw["engine"], kw["devices"])
            sys.exit(code)
        elif kw["engine"] == "ray":
            from extractor.engines.ray import run_ray

            if kw["devices"]:
                raise click.UsageError("--devices is for --engine local; Ray places one task per GPU")
            summary = run_ray(opts, stop, seams=seams)
        elif kw["devices"]:
            from extractor.engines.devices import run_on_devices

            summary = run_on_devices(opts, kw["devices"], stop, seams=seams)
        else:
            from extractor.engines.local import run_local

            summary = run_local(opts, stop=stop, seams=seams)
    except click.UsageError:
        raise
    except Interrupted as e:
        code, error = e.exit_code, f"stopped by {e}"
        logger.error("stopped at once by a second %s; committed parts are intact, rerun to resume", e)
    except Exception as e:
        code, error = exit_code_of(e), f"{type(e).__name__}: {e}"
        if code == EXIT_UNEXPECTED:
            logger.exception("unexpected error; committed parts are intact, rerun to resume")
        else:
            logger.error("%s", e)
    if summary is not None:
        if summary.interrupted:
            code = 128 + getattr(signal.Signals, summary.interrupted, signal.SIGTERM).value if summary.interrupted != "stopped" else EXIT_UNEXPECTED
            logger.warning("interrupted by %s: kept %d embedded and %d failed rows in committed parts; rerun the same command to resume",
                           summary.interrupted, summary.embedded, summary.failed, extra={"event": "interrupted"})
        elif summary.failure_rate > opts.max_failure_rate:
            code = EXIT_FAILURE_RATE
            logger.error("this run's failure rate %.2f%% (%d of %d rows) is over --max-failure-rate %.2f%%: see %s/_failures/",
                         100 * summary.failure_rate, summary.failed, summary.attempted, 100 * opts.max_failure_rate, summary.output)
    if kw["summary_json"]:
        payload = dict(summary.to_json() if summary is not None else {"output": opts.output})
        payload.update(exit_code=code, error=error)
        with open(kw["summary_json"], "w") as f:
            json.dump(payload, f, indent=2, default=str)
    sys.exit(code)


def _named(spec: str):
    """`module:function`, imported."""
    import importlib

    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def _seams(decode_fn: str | None):
    """Test seams, from the command line only: EXTRACTOR_TEST_HOOK=module:function is called at the
    run's named events (extractor.seams), --decode-fn module:function replaces the decoder."""
    from extractor.seams import Seams

    hook = os.environ.get("EXTRACTOR_TEST_HOOK")
    return Seams(on_event=_named(hook) if hook else None, decode_fn=_named(decode_fn) if decode_fn else None)


def main() -> None:
    try:
        extract(auto_envvar_prefix=ENV_PREFIX)
        code = EXIT_OK
    except SystemExit as e:  # click's standalone mode ends every run with sys.exit(code)
        code = e.code if isinstance(e.code, int) else (EXIT_OK if e.code is None else EXIT_UNEXPECTED)
    # Everything is committed, fsynced and the lock let go by now: skip the interpreter's teardown.
    # It costs seconds with torch and CUDA loaded (the tail an operator waits for), and tearing
    # down native libraries while their threads still run once aborted a finished run
    # ("terminate called without an active exception", exit -6, seen on an H100).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
