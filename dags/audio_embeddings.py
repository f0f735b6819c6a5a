"""Airflow DAG `audio_embeddings`: each shard of extract-embeddings as a mapped task, then a check
of OUTPUT/_SUCCESS with the shards' summaries added up.

    airflow dags trigger audio_embeddings --conf '{"manifest": "s3://lake/manifests/audio.parquet",
        "model": "/models/Qwen2-Audio-7B", "adapter": "/models/lora-v3",
        "output": "s3://lake/embeddings/qwen2-audio-v1", "num_shards": 16, "extra_args": ["--id-column", "id"]}'

Each shard task runs the job's command with --shard-index/--num-shards, --device auto and
--summary-json, and pushes the summary to XCom (key "summary") whatever the outcome. Exit 2
(configuration, a broken install of the job included) and 3 (failure rate over the limit) fail the
task with no retry, as does a command that cannot start (not found, or Python cannot import it);
a crash, a busy output (75) or a signal fails it with retries, and the retry resumes from the
committed parts.
No task clears markers: they name the manifest they were written for, so a shard whose rows are
all done for tonight's manifest exits 0 in about a second without loading the model.

The workers' environment:
    AUDIO_EMBEDDINGS_COMMAND        the job's command, e.g. "/opt/embeddings/bin/extract-embeddings"
                                    (default: extract-embeddings on PATH); the job's venv need not be Airflow's
    EXTRACT_EMBEDDINGS_<FLAG>       any flag of the job: the command inherits the environment
    extractor.integrations.airflow  importable (standard library only): this repository on PYTHONPATH, or
                                    `pip install --no-deps qwen2-audio-embeddings` beside Airflow
Read when the DAG is parsed:
    AUDIO_EMBEDDINGS_RETRIES (3), AUDIO_EMBEDDINGS_RETRY_DELAY_S (660), AUDIO_EMBEDDINGS_MAX_ACTIVE_SHARDS (4)

For a nightly run, set `schedule` (e.g. "@daily") and give the params defaults: a scheduled run has no conf.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta

import pendulum
from airflow.sdk import Param, dag, task
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from extractor.integrations.airflow import SUMMARY_KEY, ShardRequest, check_complete, run_shard, totals

logger = logging.getLogger("audio_embeddings")  # the module is loaded under a generated name

RETRIES = int(os.environ.get("AUDIO_EMBEDDINGS_RETRIES", "3"))
# An object store's lock left by a killed run is taken over after 10 min without a heartbeat
# (extractor.output.locks), so a retry sooner would find the output busy (75) again.
RETRY_DELAY = timedelta(seconds=float(os.environ.get("AUDIO_EMBEDDINGS_RETRY_DELAY_S", "660")))
MAX_ACTIVE_SHARDS = int(os.environ.get("AUDIO_EMBEDDINGS_MAX_ACTIVE_SHARDS", "4"))  # per DAG run: GPUs to use

PARAMS = {
    "manifest": Param(type="string", minLength=1, description="Manifest of the audio (path or URL)."),
    "model": Param(type="string", minLength=1, description="Qwen2-Audio checkpoint directory."),
    "adapter": Param(None, type=["null", "string"], description="PEFT LoRA adapter directory, merged at load."),
    "output": Param(type="string", minLength=1, description="Output directory or URL; keep num_shards fixed for it."),
    "num_shards": Param(1, type="integer", minimum=1, description="Shards, one mapped task each."),
    "extra_args": Param([], type="array", items={"type": "string"},
                        description='More flags of extract-embeddings, e.g. ["--id-column", "id"].'),
}


@dag(dag_id="audio_embeddings", schedule=None, start_date=pendulum.datetime(2025, 1, 1, tz="UTC"), catchup=False,
     max_active_runs=1, params=PARAMS, tags=["embeddings"], doc_md=__doc__)
def audio_embeddings():
    @task
    def shards(params=None) -> list[int]:
        return list(range(params["num_shards"]))

    # multiple_outputs=False: a task annotated `-> dict` would push every key as an XCom of its own.
    @task(retries=RETRIES, retry_delay=RETRY_DELAY, max_active_tis_per_dagrun=MAX_ACTIVE_SHARDS, multiple_outputs=False)
    def embed(shard_index: int, params=None, ti=None) -> dict:
        req = ShardRequest(manifest=params["manifest"], model=params["model"], adapter=params["adapter"],
                           output=params["output"], shard_index=shard_index, num_shards=params["num_shards"],
                           extra_args=tuple(params["extra_args"]))
        outcome = run_shard(req, log=logger)
        ti.xcom_push(key=SUMMARY_KEY, value=outcome.summary)  # before raising: the summary of a failure matters most
        if outcome.ok:
            return outcome.summary
        if outcome.retry:
            raise AirflowException(outcome.reason())
        raise AirflowFailException(outcome.reason())

    @task(multiple_outputs=False)
    def check_success(summaries, params=None) -> dict:
        # By index: iterating the lazy sequence probes one past its end, which Airflow logs as an error.
        summaries = [summaries[i] for i in range(len(summaries))]
        marker = check_complete(params["output"], params["num_shards"], summaries)
        return {**totals(summaries), "output": params["output"], "whole_manifest": marker["whole_manifest"]}

    check_success(embed.expand(shard_index=shards()))


audio_embeddings()
