"""One shard of extract-embeddings as an Airflow task; dags/audio_embeddings.py is the DAG.

The task runs the job as a command, not as a function call: the job's environment (torch, CUDA,
this package) is rarely Airflow's, and a command is what the job's signals, exit codes and
`--summary-json` were made for. This module decides what a task does with each outcome and never
imports Airflow, so its logic is tested without Airflow; the DAG maps the verdict onto Airflow's
exceptions (AirflowFailException: no retry; any other: retry).

    exit 0            the summary is the task's return value
    exit 2, 3         configuration error (a broken install of the job included), failure rate
                      over the limit: fail, never retry
    no command        the command is not found, or Python cannot import it (exit 1 with no
                      summary, an ImportError its last words): the worker's setup, never retried
    exit 1, 75, 130,  unexpected, output busy, stopped by a signal (or killed, e.g. by the OOM
    143, anything     killer): fail and retry; a rerun resumes from the committed parts

Whatever the outcome, the summary (the job's `--summary-json`, with `exit_code` and `error`) is
pushed to XCom before the task fails.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import signal
import subprocess
import tempfile
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from ..errors import EXIT_BUSY, EXIT_CONFIG, EXIT_FAILURE_RATE, EXIT_OK, EXIT_SIGINT, EXIT_SIGTERM, EXIT_UNEXPECTED
from ..options import Shard

logger = logging.getLogger(__name__)

# The job's command in the worker's environment, split like a shell line: the job's venv is rarely
# Airflow's, e.g. "/opt/embeddings/bin/extract-embeddings" or "/opt/embeddings/bin/python -m jobs.extract".
COMMAND_ENV = "AUDIO_EMBEDDINGS_COMMAND"
DEFAULT_COMMAND = ("extract-embeddings",)
SUMMARY_KEY = "summary"  # the XCom key every shard task pushes, whatever its outcome
SUCCESS_FILE = "_SUCCESS"  # extractor.output.layout's name; not imported: that module needs pyarrow
# When the task itself is stopped (execution_timeout, an exception in Airflow's runner), the job
# gets SIGTERM and this long to commit what it embedded and release its lock (it needs about 10 s
# on CPU) before SIGKILL. Airflow's own SIGTERM reaches the job directly: it shares the task's
# process group, which Airflow signals as a whole.
STOP_GRACE_S = 30.0
LOG_TAIL_LINES = 20  # of the job's output, kept for the error when it wrote no summary

NEVER_RETRY = frozenset({EXIT_CONFIG, EXIT_FAILURE_RATE})
MEANING = {
    EXIT_OK: "done",
    EXIT_UNEXPECTED: "unexpected error",
    EXIT_CONFIG: "configuration or input error",
    EXIT_FAILURE_RATE: "failure rate over --max-failure-rate",
    EXIT_BUSY: "output busy with a live run",
    EXIT_SIGINT: "stopped by SIGINT",
    EXIT_SIGTERM: "stopped by SIGTERM",
}
# What the DAG sums over shards (extractor.summary.Summary's counts).
TOTALS = ("rows_total", "embedded", "failed", "skipped", "standing_failed", "audio_seconds")


@dataclass(frozen=True)
class ShardRequest:
    """One shard of the job, from the DAG's params."""

    manifest: str
    model: str
    output: str
    shard_index: int
    num_shards: int
    adapter: str | None = None
    extra_args: tuple[str, ...] = ()  # more flags, e.g. ("--id-column", "id")

    def __post_init__(self):
        Shard(self.shard_index, self.num_shards)  # ConfigError for a shard outside the layout

    @property
    def tag(self) -> str:
        return f"shard {Shard(self.shard_index, self.num_shards)}"


@dataclass(frozen=True)
class ShardOutcome:
    exit_code: int
    summary: dict

    @property
    def ok(self) -> bool:
        return self.exit_code == EXIT_OK

    @property
    def retry(self) -> bool:
        """Whether running the same command again can help (a rerun resumes)."""
        return not self.ok and self.exit_code not in NEVER_RETRY

    def reason(self) -> str:
        meaning = MEANING.get(self.exit_code) or (signal_meaning(self.exit_code) or "unknown exit code")
        verdict = "retry" if self.retry else ("never retried" if not self.ok else "ok")
        error = self.summary.get("error")
        return f"{self.summary.get('shard', '?')}: exit {self.exit_code} ({meaning}; {verdict})" + (f": {error}" if error else "")


def signal_meaning(code: int) -> str | None:
    if code > 128:
        try:
            return f"killed by {signal.Signals(code - 128).name}"
        except ValueError:
            return None
    return None


def command_prefix(environ: Mapping[str, str] | None = None) -> list[str]:
    """The job's command: AUDIO_EMBEDDINGS_COMMAND split like a shell line, else extract-embeddings."""
    value = (os.environ if environ is None else environ).get(COMMAND_ENV, "").strip()
    return shlex.split(value) if value else list(DEFAULT_COMMAND)


def shard_argv(req: ShardRequest, summary_json: str, prefix: Sequence[str]) -> list[str]:
    # --device auto, not --devices all: a CPU worker must run it too, and one task is one shard
    # on one device (scale with num_shards, or with --devices in extra_args on a multi-GPU worker).
    argv = [*prefix, "--manifest", req.manifest, "--model", req.model, "--output", req.output,
            "--shard-index", str(req.shard_index), "--num-shards", str(req.num_shards),
            "--device", "auto", "--summary-json", summary_json]
    if req.adapter:
        argv += ["--adapter", req.adapter]
    return argv + list(req.extra_args)


def run_shard(req: ShardRequest, *, environ: Mapping[str, str] | None = None, log: logging.Logger = logger) -> ShardOutcome:
    """Run the shard's command to its end, its output into `log`; the exit code and summary.

    Raises only when this process is stopped (its own exception, after the job was stopped).
    """
    env = dict(os.environ if environ is None else environ)
    with tempfile.TemporaryDirectory(prefix="audio-embeddings-") as tmp:
        summary_json = str(Path(tmp) / "summary.json")
        argv = shard_argv(req, summary_json, command_prefix(env))
        log.info("%s: %s", req.tag, shlex.join(argv))
        tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
        try:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, text=True, errors="replace")
        except OSError as e:  # not found, not executable: the worker's setup, not the shard
            return ShardOutcome(EXIT_CONFIG, _summary_without_file(req, EXIT_CONFIG,
                                                                   f"cannot run {argv[0]!r} (set {COMMAND_ENV}): {e}"))
        try:
            for line in proc.stdout:
                line = line.rstrip("\n")
                tail.append(line)
                log.info("%s", line)
            code = proc.wait()
        except BaseException as e:
            _stop(proc, already_signalled=isinstance(e, KeyboardInterrupt), log=log)
            raise
        code = 128 - code if code < 0 else code  # killed by signal N: report it as a shell does, 128 + N
        summary = _read_summary(summary_json, req, code)
        if summary is None:  # killed, refused before the job began, or the command could not start
            last = " | ".join(line for line in tail if line.strip())[-2000:]
            if _could_not_start(code, tail):
                code = EXIT_CONFIG
                why = f"the job's command {argv[0]!r} could not start (set {COMMAND_ENV} to the job's own environment)"
            else:
                why = f"exit {code} ({signal_meaning(code) or MEANING.get(code, 'unknown exit code')}) with no summary"
            summary = _summary_without_file(req, code, f"{why}; last output: {last or '(none)'}")
        return ShardOutcome(code, summary)


# The last words of a Python that could not import the job: `python -m jobs.extract` without the
# package ("No module named ..."), or a console script's traceback ("ModuleNotFoundError: ...").
# The job itself turns every import error it can catch into exit 2 with a summary; these come
# before it runs, and a retry on the same worker fails the same way.
_IMPORT_FAILURE = re.compile(r"\b(ModuleNotFoundError|ImportError)\b|: No module named ")


def _could_not_start(code: int, tail: Iterable[str]) -> bool:
    lines = [line for line in tail if line.strip()]
    return code == EXIT_UNEXPECTED and bool(lines) and bool(_IMPORT_FAILURE.search(lines[-1]))


def _stop(proc: subprocess.Popen, *, already_signalled: bool, log: logging.Logger) -> None:
    """This process is being stopped: give the job its graceful stop, then SIGKILL.

    A SIGINT that reached us came from a terminal or Airflow's signal to the process group, so
    the job has it too: a second signal would make it stop at once and drop its part in flight.
    """
    if proc.poll() is not None:
        return
    if not already_signalled:
        log.warning("stopping the job (pid %d) with SIGTERM", proc.pid)
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        log.warning("the job (pid %d) did not stop within %.0f s: SIGKILL", proc.pid, STOP_GRACE_S)
        proc.kill()
        proc.wait()


def _read_summary(path: str, req: ShardRequest, code: int) -> dict | None:
    """The job's --summary-json (written on every outcome it sees), None if there is none; the
    process's exit code wins over the one written."""
    try:
        with open(path) as f:
            summary = json.load(f)
    except FileNotFoundError:
        return None
    except ValueError as e:
        return _summary_without_file(req, code, f"unreadable summary {path}: {e}")
    if not isinstance(summary, dict):
        return _summary_without_file(req, code, f"summary {path} is not a JSON object")
    if summary.get("exit_code") != code:
        summary["job_exit_code"] = summary.get("exit_code")
        summary["exit_code"] = code
    return summary


def _summary_without_file(req: ShardRequest, code: int, error: str) -> dict:
    return {"output": req.output, "shard": f"{req.shard_index} of {req.num_shards}", "exit_code": code, "error": error}


def totals(summaries: Iterable[Mapping]) -> dict:
    """The shards' summaries added up (counts and audio seconds)."""
    summaries = list(summaries)
    out = {k: sum(s.get(k) or 0 for s in summaries) for k in TOTALS}
    out["shards"] = len(summaries)
    out["noop"] = bool(summaries) and all(s.get("noop") for s in summaries)
    return out


def check_complete(output: str, num_shards: int, summaries: Sequence[Mapping], storage_options: Mapping | None = None) -> dict:
    """After every shard succeeded: OUTPUT/_SUCCESS stands for this run's manifest. Its JSON.

    A shard writes _SUCCESS when every shard's marker names the same manifest; the summary of the
    one that did (or of every shard, on a rerun with nothing to do) says `complete`. A _SUCCESS
    that no summary vouches for is last night's. Raises RuntimeError naming what is missing.
    """
    path = f"{output.rstrip('/')}/{SUCCESS_FILE}"
    try:
        text = _read_text(path, storage_options)
    except FileNotFoundError:
        raise RuntimeError(f"{path} is missing: not every shard of {output} finished for this manifest") from None
    try:
        marker = json.loads(text)
    except ValueError as e:
        raise RuntimeError(f"{path} is not JSON ({e}): an output of another version?") from e
    if not isinstance(marker, dict) or "whole_manifest" not in marker:
        raise RuntimeError(f"{path} names no manifest (no 'whole_manifest'): an output of another version?")
    if marker.get("num_shards") != num_shards:
        raise RuntimeError(f"{path} is for {marker.get('num_shards')} shards, this run has {num_shards}")
    if not any(s.get("complete") for s in summaries):
        raise RuntimeError(f"{path} is there, but no shard's summary says it completed this manifest: "
                           f"it is from an earlier run")
    return marker


def _read_text(path: str, storage_options: Mapping | None) -> str:
    if "://" in path and not path.startswith("file://"):
        import fsspec  # Airflow's environment has it; the job's [s3] extra brings s3fs for s3://

        with fsspec.open(path, "r", **dict(storage_options or {})) as f:
            return f.read()
    return Path(path.removeprefix("file://")).read_text()
