"""The Airflow integration: the shard task's logic (extractor.integrations.airflow, no Airflow
needed), then the DAG for real: `airflow dags test audio_embeddings` on the built-in sample, in
Airflow's own venv (.ci/airflow-env.sh builds it at /tmp/ci-airflow; AIRFLOW_VENV overrides),
with a SQLite metadata DB in a temporary AIRFLOW_HOME. XComs and task states are read from that DB.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from extractor.errors import EXIT_BUSY, EXIT_CONFIG, EXIT_FAILURE_RATE, EXIT_OK, EXIT_SIGINT, EXIT_SIGTERM, EXIT_UNEXPECTED
from extractor.integrations import airflow as integ
from extractor.integrations.airflow import COMMAND_ENV, ShardRequest, check_complete, run_shard, totals

REPO = Path(__file__).resolve().parents[2]
AIRFLOW_VENV = Path(os.environ.get("AIRFLOW_VENV", "/tmp/ci-airflow"))
AIRFLOW = AIRFLOW_VENV / "bin" / "airflow"
needs_airflow = pytest.mark.skipif(
    not AIRFLOW.exists(), reason=f"no Airflow venv at {AIRFLOW_VENV}: build it with `bash .ci/airflow-env.sh` (.ci/run does)")
DAGS_TEST_TIMEOUT_S = 240  # one `dags test` takes ~15 s here; a wrongly retried task would loop much longer

# A stand-in for the job: writes a summary as extract-embeddings does (unless told not to) and exits
# with FAKE_EXIT; FAKE_SLEEP keeps it running, and on SIGTERM it records the signal and exits 143.
FAKE_JOB = textwrap.dedent("""
    import json, os, signal, sys, time
    args = sys.argv[1:]
    summary = args[args.index("--summary-json") + 1]
    def on_term(signum, frame):
        open(os.environ["FAKE_SIGNALLED"], "w").write(str(signum))
        sys.exit(143)
    signal.signal(signal.SIGTERM, on_term)
    print("fake job", " ".join(args), flush=True)
    time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
    code = int(os.environ["FAKE_EXIT"])
    if os.environ.get("FAKE_NO_SUMMARY"):
        os.kill(os.getpid(), signal.SIGKILL)
    json.dump({"output": "out", "shard": "1 of 3", "embedded": 5, "failed": 1, "rows_total": 7, "skipped": 1,
               "audio_seconds": 2.5, "complete": code == 0, "argv": args, "exit_code": code,
               "error": None if code == 0 else "boom"}, open(summary, "w"))
    sys.exit(code)
""")


@pytest.fixture
def fake_env(tmp_path):
    script = tmp_path / "fake_job.py"
    script.write_text(FAKE_JOB)
    return {**os.environ, COMMAND_ENV: f"{sys.executable} {script}", "FAKE_SIGNALLED": str(tmp_path / "signalled")}


def _request(**kw) -> ShardRequest:
    base = dict(manifest="m.parquet", model="model", output="out", shard_index=1, num_shards=3, adapter="lora",
                extra_args=("--id-column", "id"))
    return ShardRequest(**{**base, **kw})


# -- the task's logic, without Airflow ----------------------------------------------------------------
@pytest.mark.parametrize("code, retry", [(EXIT_OK, False), (EXIT_CONFIG, False), (EXIT_FAILURE_RATE, False),
                                         (EXIT_UNEXPECTED, True), (EXIT_BUSY, True), (EXIT_SIGINT, True), (EXIT_SIGTERM, True)])
def test_exit_code_decides_retry_and_the_summary_comes_back(fake_env, code, retry):
    outcome = run_shard(_request(), environ={**fake_env, "FAKE_EXIT": str(code)})
    assert outcome.exit_code == code
    assert outcome.ok == (code == EXIT_OK)
    assert outcome.retry == retry
    assert outcome.summary["exit_code"] == code and outcome.summary["embedded"] == 5
    argv = outcome.summary["argv"]
    flags = dict(zip(argv[::2], argv[1::2]))
    assert flags["--shard-index"] == "1" and flags["--num-shards"] == "3" and flags["--device"] == "auto"
    assert flags["--adapter"] == "lora" and flags["--id-column"] == "id" and "--devices" not in flags
    if code != EXIT_OK:
        assert f"exit {code}" in outcome.reason() and ("retry" if retry else "never retried") in outcome.reason()


def test_a_job_killed_before_its_summary_gets_one_naming_the_signal_and_its_last_output(fake_env):
    outcome = run_shard(_request(), environ={**fake_env, "FAKE_EXIT": "0", "FAKE_NO_SUMMARY": "1"})
    assert outcome.exit_code == 128 + signal.SIGKILL
    assert outcome.retry
    assert outcome.summary["exit_code"] == 128 + signal.SIGKILL and outcome.summary["shard"] == "1 of 3"
    assert "killed by SIGKILL" in outcome.summary["error"] and "fake job" in outcome.summary["error"]


def test_a_command_that_cannot_run_is_a_config_error_naming_the_variable(fake_env):
    outcome = run_shard(_request(), environ={**fake_env, COMMAND_ENV: "/nonexistent/extract-embeddings"})
    assert outcome.exit_code == EXIT_CONFIG and not outcome.retry
    assert COMMAND_ENV in outcome.summary["error"] and "/nonexistent/extract-embeddings" in outcome.summary["error"]


def test_a_usage_error_of_the_real_job_is_not_retried_and_its_summary_says_why():
    env = {**os.environ, COMMAND_ENV: f"{sys.executable} -m jobs.extract", "PYTHONPATH": str(REPO)}
    outcome = run_shard(_request(extra_args=("--pooling", "bogus")), environ=env)
    assert outcome.exit_code == EXIT_CONFIG and not outcome.retry
    assert "'bogus' is not one of" in outcome.summary["error"] and outcome.summary["exit_code"] == EXIT_CONFIG


@pytest.mark.parametrize("command", [
    "{python} -m no_such_job_module",  # python -m without the package: "No module named ..."
    "{python} -c 'import no_such_job_module'",  # a console script whose import fails: its traceback
    "{python} -c \"import sys; sys.modules['click'] = None; from jobs.extract import main; main()\"",  # the job's own: exit 2
])
def test_a_job_that_cannot_import_is_a_config_error_and_not_retried(command):
    env = {**os.environ, COMMAND_ENV: command.format(python=sys.executable), "PYTHONPATH": str(REPO)}
    outcome = run_shard(_request(), environ=env)
    assert outcome.exit_code == EXIT_CONFIG and not outcome.retry, outcome.summary
    assert re.search(r"No module named|cannot import", outcome.summary["error"]), outcome.summary


def test_a_stopped_task_stops_its_job_with_sigterm(fake_env, tmp_path):
    class StopAtFirstLine:  # what an execution_timeout does: an exception in the task's process
        def info(self, fmt, *args):
            if args and str(args[0]).startswith("fake job"):
                raise TimeoutError("execution_timeout")

        warning = info

    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        run_shard(_request(), environ={**fake_env, "FAKE_EXIT": "0", "FAKE_SLEEP": "60"}, log=StopAtFirstLine())
    assert time.monotonic() - t0 < 30
    assert (tmp_path / "signalled").read_text() == str(int(signal.SIGTERM))


def test_check_complete_trusts_only_a_success_marker_that_this_run_vouches_for(tmp_path):
    out = str(tmp_path)
    with pytest.raises(RuntimeError, match="_SUCCESS is missing"):
        check_complete(out, 2, [{"complete": True}])
    (tmp_path / "_SUCCESS").write_text(json.dumps({"whole_manifest": "abc", "num_shards": 2}))
    assert check_complete(out, 2, [{"complete": False}, {"complete": True}])["whole_manifest"] == "abc"
    with pytest.raises(RuntimeError, match="earlier run"):
        check_complete(out, 2, [{"complete": False}, {"complete": False}])
    with pytest.raises(RuntimeError, match="for 2 shards, this run has 4"):
        check_complete(out, 4, [{"complete": True}])
    (tmp_path / "_SUCCESS").write_text("")  # the 0.1.x empty marker
    with pytest.raises(RuntimeError, match="not JSON"):
        check_complete(out, 2, [{"complete": True}])


def test_totals_add_up_the_shards():
    t = totals([{"rows_total": 3, "embedded": 2, "failed": 1, "audio_seconds": 1.5, "noop": True},
                {"rows_total": 4, "embedded": 4, "audio_seconds": 2.0, "noop": False}])
    assert (t["rows_total"], t["embedded"], t["failed"], t["audio_seconds"], t["shards"], t["noop"]) == (7, 6, 1, 3.5, 2, False)


def test_the_integration_imports_nothing_outside_the_standard_library():
    # Airflow's environment has neither torch nor this package's dependencies.
    code = ("import json, sys; before = set(sys.modules); import extractor.integrations.airflow; "
            "print(json.dumps(sorted({m.split('.')[0] for m in set(sys.modules) - before} - set(sys.stdlib_module_names))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == ["extractor"]


# -- the DAG, in Airflow ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def airflow_env(tmp_path_factory):
    home = tmp_path_factory.mktemp("airflow-home")
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
        "PYTHONPATH": str(REPO),  # the DAG imports extractor.integrations.airflow; the job runs `python -m jobs.extract`
        COMMAND_ENV: f"{sys.executable} -m jobs.extract",
        "AUDIO_EMBEDDINGS_RETRY_DELAY_S": "1",  # a task wrongly retried shows as a second try, not a 11 min wait
        "EXTRACT_EMBEDDINGS_DECODE_WORKERS": "1",  # 2 cores in CI
    }
    subprocess.run([str(AIRFLOW), "db", "migrate"], env=env, check=True, capture_output=True, timeout=DAGS_TEST_TIMEOUT_S)
    return env


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    from extractor.tools.sample import build_sample

    d = tmp_path_factory.mktemp("sample")
    build_sample(str(d))
    return d


def dags_test(env: dict, conf: dict) -> tuple[str, str]:
    """Run the DAG once; (its run_id, what it printed)."""
    p = subprocess.run([str(AIRFLOW), "dags", "test", "audio_embeddings", "--conf", json.dumps(conf)], env=env,
                       capture_output=True, text=True, timeout=DAGS_TEST_TIMEOUT_S)
    db = sqlite3.connect(Path(env["AIRFLOW_HOME"]) / "airflow.db")
    row = db.execute("select run_id from dag_run where dag_id = 'audio_embeddings' order by id desc limit 1").fetchone()
    assert row is not None, f"dags test made no run (rc {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return row[0], p.stdout + p.stderr


def task_states(env: dict, run_id: str) -> dict[tuple[str, int], tuple[str, int]]:
    """(task_id, map_index) -> (state, try_number)."""
    return {(t, m): (s, n) for t, m, s, n, _ in task_rows(env, run_id)}


def task_rows(env: dict, run_id: str) -> list[tuple]:
    db = sqlite3.connect(Path(env["AIRFLOW_HOME"]) / "airflow.db")
    return db.execute("select task_id, map_index, state, try_number, max_tries from task_instance where run_id = ?", (run_id,)).fetchall()


def xcom(env: dict, run_id: str, task_id: str, key: str) -> dict[int, object]:
    db = sqlite3.connect(Path(env["AIRFLOW_HOME"]) / "airflow.db")
    rows = db.execute("select map_index, value from xcom where run_id = ? and task_id = ? and key = ?", (run_id, task_id, key))
    return {m: json.loads(v) for m, v in rows}


def sample_conf(sample: Path, output: Path, num_shards: int) -> dict:
    return {"manifest": str(sample / "manifest.parquet"), "model": str(sample / "model"), "adapter": str(sample / "adapter"),
            "output": str(output), "num_shards": num_shards, "extra_args": ["--id-column", "id", "--keep-columns", "source"]}


@needs_airflow
def test_dag_embeds_the_sample_and_a_second_run_is_a_noop(airflow_env, sample, tmp_path):
    out = tmp_path / "out"
    conf = sample_conf(sample, out, num_shards=2)
    run_id, log = dags_test(airflow_env, conf)
    states = task_states(airflow_env, run_id)
    assert states == {("shards", -1): ("success", 1), ("embed", 0): ("success", 1), ("embed", 1): ("success", 1),
                      ("check_success", -1): ("success", 1)}, log[-5000:]
    summaries = xcom(airflow_env, run_id, "embed", integ.SUMMARY_KEY)
    assert sorted(summaries) == [0, 1]
    assert all(s["exit_code"] == 0 and s["error"] is None for s in summaries.values())
    assert sorted(s["shard"] for s in summaries.values()) == ["0 of 2", "1 of 2"]
    assert sum(s["embedded"] for s in summaries.values()) == 7 and sum(s["failed"] for s in summaries.values()) == 0
    success = json.loads((out / "_SUCCESS").read_text())
    assert success["num_shards"] == 2
    total = xcom(airflow_env, run_id, "check_success", "return_value")[-1]
    assert (total["rows_total"], total["embedded"], total["failed"], total["shards"]) == (7, 7, 0, 2)
    assert total["whole_manifest"] == success["whole_manifest"]
    table = ds.dataset(out / "embeddings", format="parquet").to_table()
    assert sorted(table["id"].to_pylist()) == sorted(pq.read_table(sample / "manifest.parquet")["id"].to_pylist())
    assert "model loaded" in log

    success_bytes = (out / "_SUCCESS").read_bytes()
    run_id2, log2 = dags_test(airflow_env, conf)
    assert run_id2 != run_id
    assert {k: v for k, v in task_states(airflow_env, run_id2).items()} == states, log2[-5000:]
    again = xcom(airflow_env, run_id2, "embed", integ.SUMMARY_KEY)
    assert all(s["exit_code"] == 0 and s["noop"] and s["embedded"] == 0 and s["skipped"] == s["rows_total"] for s in again.values())
    assert "model loaded" not in log2  # a shard with nothing to do never loads the model
    assert (out / "_SUCCESS").read_bytes() == success_bytes
    assert xcom(airflow_env, run_id2, "check_success", "return_value")[-1]["noop"] is True


@needs_airflow
def test_a_failure_rate_over_the_limit_fails_the_task_without_retry_and_its_summary_is_in_xcom(airflow_env, sample, tmp_path):
    audio = tmp_path / "garbage"
    audio.mkdir()
    paths = []
    for i in range(4):
        p = audio / f"noise-{i}.wav"
        p.write_bytes(os.urandom(3000))  # not a RIFF header: every row fails to decode
        paths.append(str(p))
    manifest = tmp_path / "garbage.parquet"
    pq.write_table(pa.table({"id": [f"g{i}" for i in range(4)], "path": paths}), manifest)
    conf = {**sample_conf(sample, tmp_path / "out", num_shards=1), "manifest": str(manifest), "extra_args": ["--id-column", "id"]}
    run_id, log = dags_test(airflow_env, conf)
    states = task_states(airflow_env, run_id)
    assert states[("embed", 0)] == ("failed", 1), log[-5000:]  # one try: no retry taken...
    assert [r[4] for r in task_rows(airflow_env, run_id) if r[0] == "embed"] == [3]  # ...of the 3 configured
    assert states[("check_success", -1)][0] == "upstream_failed"
    summary = xcom(airflow_env, run_id, "embed", integ.SUMMARY_KEY)[0]
    assert summary["exit_code"] == EXIT_FAILURE_RATE
    assert (summary["failed"], summary["embedded"], summary["failure_rate"]) == (4, 0, 1.0)
    assert "failure rate over --max-failure-rate; never retried" in log
