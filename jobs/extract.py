"""`extract-embeddings`: parse flags, wire the stages, map outcomes to exit codes.

Exit codes: 0 done (failures within --max-failure-rate), 3 done but over it, 2 usage or
configuration error (nothing written), 1 anything unexpected.
"""

from __future__ import annotations

import json
import logging
import sys

import click

from extractor.checkpoint import CheckpointError
from extractor.lora import AdapterError
from extractor.manifest import ManifestError, ManifestSpec
from extractor.multidevice import run_on_devices
from extractor.output import OutputError, Shard
from extractor.pipeline import EXIT_CONFIG, EXIT_FAILURE_RATE, EXIT_OK, EXIT_UNEXPECTED, ConfigError, JobOptions, run_job

logger = logging.getLogger("extract-embeddings")

ENV_PREFIX = "EXTRACT_EMBEDDINGS"
CONFIG_ERRORS = (ManifestError, CheckpointError, AdapterError, OutputError, ConfigError)


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
@click.option("--manifest", required=True, help="Parquet manifest, one row per audio.")
@click.option("--output", required=True, help="Output directory (created if missing).")
@click.option("--storage-options", callback=_json_object,
              help='JSON object of fsspec options for s3://, gs://, ... paths, e.g. \'{"client_kwargs": {"endpoint_url": "http://minio:9000"}}\'; '
                   "default: the environment (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ...).")
@click.option("--model", required=True, type=click.Path(exists=True, file_okay=False), help="Qwen2-Audio checkpoint directory (HF layout).")
@click.option("--adapter", type=click.Path(exists=True, file_okay=False), help="PEFT LoRA adapter directory, merged at load.")
@click.option("--id-column", help="Unique key column; default: the path is the id.")
@click.option("--path-column", default="path", show_default=True, help="Column holding the audio path.")
@click.option("--keep-columns", help="Comma-separated manifest columns copied to the output.")
@click.option("--start-column", help="Segment start in seconds (float); embeds a region of the file.")
@click.option("--end-column", help="Segment end in seconds (float).")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N")
@click.option("--devices", help="One worker process per device, one output and one progress bar: cuda:0,cuda:1,... or all; overrides --device.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto", show_default=True,
              help="Compute dtype; auto is bfloat16 on CUDA, float32 on CPU.")
@click.option("--no-padding-mask", is_flag=True, help="Reproduce audio_tower(input_features) on 30 s padded windows with no mask.")
@click.option("--pooling", type=click.Choice(["mean", "none"]), default="mean", show_default=True,
              help="mean: one vector per row; none: also a `frames` column with every 40 ms frame.")
@click.option("--output-dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True)
@click.option("--part-rows", type=click.IntRange(min=1), default=10_000, show_default=True,
              help="Rows per committed part (a part is also committed at least every 60 s).")
@click.option("--max-failure-rate", type=click.FloatRange(0, 1), default=0.01, show_default=True,
              help="Exit 3 when the fraction of failed rows is above this.")
@click.option("--retry-failed", is_flag=True, help="Retry rows that failed in earlier runs.")
@click.option("--max-duration-s", type=click.FloatRange(min=0, min_open=True), default=2 * 3600.0, show_default=True,
              help="Longer audio becomes a failure record (memory stays bounded).")
@click.option("--decode-workers", type=click.IntRange(min=0), help="Decoder processes; default: cores - 1 (max 16); 0 decodes in-process.")
@click.option("--decode-timeout-s", type=click.FloatRange(min=0, min_open=True), default=120.0, show_default=True,
              help="Per-file decode timeout; the worker is killed and replaced.")
@click.option("--token-budget", type=click.IntRange(min=1500), help="Encoder tokens per batch (default: 32768 on GPU).")
@click.option("--shard-index", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--num-shards", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: this host; ray: a Ray cluster at RAY_ADDRESS, or a local Ray (pip install '.[ray]').")
@click.option("--ray-actors", type=click.IntRange(min=1), help="--engine ray: embedder actors (default: one per GPU, 1 without GPUs).")
@click.option("--summary-json", type=click.Path(dir_okay=False), help="Write the run's summary here (for XCom and dashboards).")
@click.option("--log-level", default="INFO", show_default=True)
@click.option("--decode-fn", hidden=True, help="module:function replacing the decoder (tests only).")
def extract(**kw) -> None:
    """Embed every audio of a Parquet manifest with Qwen2-Audio's audio tower (+ LoRA) into Parquet parts.

    Resumable: rerun the same command after any interruption; every row ends up exactly once in
    OUTPUT/part-*.parquet or OUTPUT/_failures/. Every flag can also be set as an environment
    variable, EXTRACT_EMBEDDINGS_<FLAG> (e.g. EXTRACT_EMBEDDINGS_PART_ROWS=5000).
    """
    # force: the command owns the process's logging (and under test, the current sys.stderr).
    logging.basicConfig(force=True, level=kw["log_level"].upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if kw["shard_index"] >= kw["num_shards"]:
        raise click.BadParameter(f"--shard-index {kw['shard_index']} must be below --num-shards {kw['num_shards']}")
    opts = JobOptions(
        manifest=ManifestSpec(
            path=kw["manifest"], path_column=kw["path_column"], id_column=kw["id_column"], keep_columns=_columns(kw["keep_columns"]),
            start_column=kw["start_column"], end_column=kw["end_column"],
        ),
        output=kw["output"], model=kw["model"], adapter=kw["adapter"], device=kw["device"], dtype=kw["dtype"],
        padding_mask=not kw["no_padding_mask"], pooling=kw["pooling"], output_dtype=kw["output_dtype"],
        part_rows=kw["part_rows"], max_failure_rate=kw["max_failure_rate"], retry_failed=kw["retry_failed"],
        decode_workers=kw["decode_workers"], decode_timeout_s=kw["decode_timeout_s"], max_duration_s=kw["max_duration_s"],
        token_budget=kw["token_budget"], shard=Shard(kw["shard_index"], kw["num_shards"]), decode_fn=kw["decode_fn"],
        storage_options=kw["storage_options"],
    )
    try:
        if kw["engine"] == "ray":
            from extractor.ray_engine import run_job_ray  # Ray is an optional extra

            if kw.get("devices"):
                raise ConfigError("--devices is for --engine local; Ray places one actor per GPU (see --ray-actors)")
            summary = run_job_ray(opts, actors=kw["ray_actors"])
        elif kw["devices"]:
            summary = run_on_devices(opts, kw["devices"])
        else:
            summary = run_job(opts)
    except CONFIG_ERRORS as e:
        logger.error("%s", e)
        sys.exit(EXIT_CONFIG)
    except ValueError as e:  # resolve_device and friends: a bad flag value
        logger.error("%s", e)
        sys.exit(EXIT_CONFIG)
    except Exception:
        logger.exception("unexpected error; committed parts are intact, rerun to resume")
        sys.exit(EXIT_UNEXPECTED)
    if kw["summary_json"]:
        with open(kw["summary_json"], "w") as f:
            json.dump(summary.to_json(), f, indent=2)
    if summary.failure_rate > opts.max_failure_rate:
        logger.error("failure rate %.2f%% is over --max-failure-rate %.2f%%: see %s/_failures/",
                     100 * summary.failure_rate, 100 * opts.max_failure_rate, summary.output)
        sys.exit(EXIT_FAILURE_RATE)
    sys.exit(EXIT_OK)


def main() -> None:
    extract(auto_envvar_prefix=ENV_PREFIX)


if __name__ == "__main__":
    main()
