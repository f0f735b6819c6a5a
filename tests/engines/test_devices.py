"""`--devices`: one worker process per device over one manifest, tested with several CPU workers.

The multi-worker path must give what the single-worker path gives (same rows, bit-identical
embeddings on CPU, same failure records), show one progress stream and one summary line, leave
the markers a one-device run leaves, stop every worker when one crashes, and resume from any
number of devices.
"""

from __future__ import annotations

import json
import os
from collections import Counter
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from builders import speechlike, write_audio
from extractor.engines.devices import parse_devices
from extractor.errors import ConfigError
from extractor.summary import DeviceStats, Summary, merge
from jobrun import REPO, SR, job_cmd, job_env, parts, read_output, run_cli, snapshot, wait_for, write_manifest
from test_shard import FLAGS, HANG_ID, assert_same_output, corpus, full_run, job_args  # noqa: F401 (corpus, full_run: shared module fixtures)


def spawned_children(parent: int | None = None) -> list[int]:
    """Live `spawn` children of `parent` (default: this process), i.e. the workers, from /proc."""
    parent = os.getpid() if parent is None else parent
    pids = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
            cmdline = (status.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if fields.get("PPid", "").strip() == str(parent) and b"spawn_main" in cmdline and fields.get("State", "").strip()[:1] != "Z":
            pids.append(int(status.parent.name))
    return pids


def alive(pid: int) -> bool:
    """Whether any thread of `pid` still runs. A killed process's main thread shows as a zombie
    while another of its threads is still dying, and the process's files (the lock's descriptor
    among them) are closed only when the last thread has gone."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for tid in tasks:
        try:
            if Path(f"/proc/{pid}/task/{tid}/status").read_text().split("State:\t", 1)[1][:1] not in "ZX":
                return True
        except (OSError, IndexError):
            pass
    return False


@pytest.fixture(scope="module")
def two_workers(corpus, tiny_model, tmp_path_factory):
    """The corpus through `--devices cpu,cpu`, with a progress line at every commit."""
    out = tmp_path_factory.mktemp("multi") / "out"
    summary_json = out.parent / "summary.json"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("extractor.progress.LOG_EVERY_S", 0.0)
        code, log = run_cli(job_args(corpus, out, tiny_model, "--devices", "cpu,cpu", "--summary-json", str(summary_json)))
    assert code == 0, log
    return out, log, json.loads(summary_json.read_text())


def test_two_workers_equal_one(two_workers, full_run):
    out, log, summary = two_workers
    assert_same_output(full_run, out)
    # Both workers write the shard's parts under its one lock, with part numbers dealt out by the parent.
    names = [p.name for p in parts(out)]
    assert {n[:10] for n in names} == {"part-00000"} and len(set(names)) == len(names) >= 2
    # The markers a one-device run leaves (so its rerun is a no-op), and no lock left behind.
    assert (out / "_SUCCESS").exists() and (out / "_shards" / "00000.done").exists() and not list((out / "_shards").glob("*.lock"))
    # One summary line, for the host; its JSON sums the workers.
    done = [line for line in log.splitlines() if "done: " in line]
    assert len(done) == 1 and "extractor.shard: done: 11 embedded, 2 failed, 0 skipped of 13 rows" in done[0]
    assert (summary["rows_total"], summary["embedded"], summary["failed"], summary["skipped"]) == (13, 11, 2, 0)
    assert summary["failure_rate"] == pytest.approx(2 / 13) and summary["complete"] and summary["device"] == "2 × cpu"
    # One progress stream, the parent's, fed by both workers' commits up to every row.
    progress = [line for line in log.splitlines() if "progress: " in line]
    assert progress and not any("[cpu#" in line for line in progress)
    assert "progress: 13/13 rows (2 failed)" in progress[-1]
    assert "[cpu#0]" in log and "[cpu#1]" in log  # the workers' records, tagged, in the same stream


def test_rerun_after_completion_is_a_noop(two_workers, corpus, tiny_model):
    out, _, _ = two_workers
    before = snapshot(out)
    code, log = run_cli(job_args(corpus, out, tiny_model, "--devices", "cpu,cpu"))
    assert code == 0, log
    assert "nothing to do: 0 embedded, 0 failed, 13 skipped of 13 rows" in log and "rows to embed on" not in log
    assert snapshot(out) == before  # nothing rewritten
    code, log = run_cli(job_args(corpus, out, tiny_model))  # and the one-device run agrees
    assert code == 0 and "nothing to do" in log and snapshot(out) == before


def test_new_rows_for_one_worker_keep_success_away_until_done(two_workers, corpus, tiny_model, tmp_path):
    """A grown manifest whose one new row is in worker 1's part, and hangs there: worker 0 has
    nothing new, yet _SUCCESS (and the shard's marker) go before any worker writes, and stay away.
    Then the parent is SIGKILLed (its workers die with it) and a one-device rerun completes the output."""
    out = tmp_path / "out"
    shutil.copytree(two_workers[0], out)
    rows = pl.read_parquet(corpus).to_dicts()
    new = write_audio(tmp_path / "newHANG.flac", speechlike(0.7, SR, seed=3), SR)  # hangs tests.hooks.crashy_decode
    manifest = write_manifest(tmp_path / "m.parquet", rows + [{"id": "h1", "path": str(new)}])  # h1: sub-shard 1 of 2
    workers: set[int] = set()

    def markers_cleared() -> bool:
        workers.update(spawned_children(proc.pid))
        return not (out / "_SUCCESS").exists()

    cmd = job_cmd(manifest, out, tiny_model, *FLAGS, "--devices", "cpu,cpu", "--decode-fn", "tests.hooks:crashy_decode")
    proc = subprocess.Popen(cmd, env=job_env(), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=REPO)
    try:
        wait_for(markers_cleared, 120, proc)
        assert not (out / "_shards" / "00000.done").exists()
        wait_for(lambda: len(workers.union(spawned_children(proc.pid))) == 2, 60, proc)
        workers.update(spawned_children(proc.pid))
    finally:
        proc.kill()
        proc.wait()
    wait_for(lambda: not any(alive(pid) for pid in workers), 30)  # PR_SET_PDEATHSIG: no orphan keeps a GPU
    code, log = run_cli(job_args(manifest, out, tiny_model))  # resumed on one device
    assert code == 0, log
    assert "done: 1 embedded, 0 failed, 13 skipped of 14 rows" in log and (out / "_SUCCESS").exists(), log
    assert read_output(out)["id"].to_list() == sorted(read_output(two_workers[0])["id"].to_list() + ["h1"])


def test_devices_within_an_orchestrator_shard(corpus, tiny_model, full_run, tmp_path):
    """Shard 0 of 2 on two devices (sub-shards 0 and 2 of 4), then shard 1 of 2 on one."""
    out = tmp_path / "out"
    code, log = run_cli(job_args(corpus, out, tiny_model, "--shard-index", "0", "--num-shards", "2", "--devices", "cpu,cpu"))
    assert code == 0, log
    assert {p.name[:10] for p in parts(out)} == {"part-00000"}  # shard 0's, from both devices
    assert (out / "_shards" / "00000.done").exists() and not (out / "_SUCCESS").exists()
    code, log = run_cli(job_args(corpus, out, tiny_model, "--shard-index", "1", "--num-shards", "2"))
    assert code == 0, log
    assert (out / "_SUCCESS").exists()
    assert_same_output(full_run, out)


def test_a_crashed_worker_stops_the_others(tiny_model, tmp_path):
    """One worker segfaults while the other hangs in a decoder: exit 1 at once, no worker left
    behind, and a rerun (here on one device) completes the output. Rows are handed out as workers
    ask, so which worker meets which file is not fixed: each takes one of the two."""
    rows = [
        {"id": "s2", "path": str(write_audio(tmp_path / "SEGFAULT.flac", speechlike(0.6, SR, seed=1), SR))},  # sub-shard 0 of 2
        {"id": HANG_ID, "path": str(write_audio(tmp_path / "HANG.flac", speechlike(0.6, SR, seed=2), SR))},  # sub-shard 1 of 2
    ]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    out = tmp_path / "out"
    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (0, hard))  # no core file from the deliberate segfault
    try:
        t = time.monotonic()
        code, log = run_cli(job_args(manifest, out, tiny_model, "--devices", "cpu,cpu", "--decode-fn", "tests.hooks:crashy_decode"))
    finally:
        resource.setrlimit(resource.RLIMIT_CORE, (soft, hard))
    assert code == 1, log
    crashed = re.search(r"worker (cpu#[01]) failed; stopping the other workers", log)
    assert crashed, log
    assert f"worker {crashed[1]} was killed by signal 11 (SIGSEGV)" in log and "rerun" in log
    assert time.monotonic() - t < 120  # the hanging worker was stopped, not waited for (it sleeps an hour)
    assert spawned_children() == []
    assert not (out / "_SUCCESS").exists()
    code, log = run_cli(job_args(manifest, out, tiny_model))
    assert code == 0, log
    assert (out / "_SUCCESS").exists() and "2 embedded" in log


def test_bad_manifest_is_refused_before_any_worker_starts(corpus, tiny_model, tmp_path):
    m = write_manifest(tmp_path / "m.parquet", [{"id": "a", "path": "x.wav"}, {"id": "a", "path": "y.wav"}])
    out = tmp_path / "out"
    code, log = run_cli(job_args(m, out, tiny_model, "--devices", "cpu,cpu"))
    assert code == 2 and "duplicate id" in log and not out.exists()
    assert "[cpu#" not in log and "rows to embed" not in log  # no worker was started


@pytest.mark.parametrize("spec, error", [
    ("all", "no CUDA device"), ("cuda:0,cuda:0", "more than once"), ("cuda:2", "not visible"),
    ("cuda", "by index"), ("cpu,banana", "neither"), ("cuda:0,", "not a device"), ("meta", "neither"), ("cpu:0", "neither"),
    ("cuda:x", "not a device"),
])
def test_bad_devices_are_config_errors(spec, error, monkeypatch):
    monkeypatch.setattr("extractor.engines.devices.cuda_device_count", lambda: 0 if spec == "all" else 2)
    with pytest.raises(ConfigError, match=error):
        parse_devices(spec)


def test_devices_parse(monkeypatch):
    monkeypatch.setattr("extractor.engines.devices.cuda_device_count", lambda: 3)
    assert parse_devices("all") == ["cuda:0", "cuda:1", "cuda:2"]
    assert parse_devices(" cuda:2, cuda:0 ") == ["cuda:2", "cuda:0"]
    assert parse_devices("cpu,cpu") == ["cpu", "cpu"]


def test_bad_devices_flag_exits_2(corpus, tiny_model, tmp_path):
    code, log = run_cli(job_args(corpus, tmp_path / "out", tiny_model, "--devices", "cpu,banana"))
    assert code == 2 and "'banana' is neither a CUDA device (cuda:N) nor cpu" in log and not (tmp_path / "out").exists()


def test_merge_summaries():
    a = Summary(output="o", rows_total=10, skipped=2, embedded=7, failed=1, audio_seconds=30.0,
                stats=DeviceStats(device="NVIDIA H100", time_to_first_batch_s=4.0, gpu_peak_mem_gb=10.0, host_rss_gb_end=2.0, batches=3))
    b = Summary(output="o", rows_total=5, embedded=5, audio_seconds=20.0,
                stats=DeviceStats(device="NVIDIA H100", time_to_first_batch_s=6.0, gpu_peak_mem_gb=12.0, host_rss_gb_end=3.0, batches=2))
    s = merge([a, b], "o", "0 of 1", wall_seconds=10.0, complete=True)
    assert (s.rows_total, s.skipped, s.embedded, s.failed, s.stats.batches) == (15, 2, 12, 1, 5)
    assert s.audio_seconds_per_second == 5.0 and s.failure_rate == pytest.approx(1 / 13)  # of the rows attempted
    assert (s.stats.time_to_first_batch_s, s.stats.gpu_peak_mem_gb, s.stats.host_rss_gb_end) == (6.0, 12.0, 5.0)
    assert s.stats.device == "2 × NVIDIA H100" and s.complete


def test_devices_are_counted_without_torch_and_as_torch_counts_them():
    """The parent of the device workers counts GPUs through the driver: no torch import (seconds of
    its start-up), and the same count as torch's on this machine (0 on CI, the GPUs on a GPU host)."""
    code = ("import sys; from extractor.engines.devices import cuda_device_count, parse_devices; "
            "n = cuda_device_count(); parse_devices('cpu,cpu'); no_torch = 'torch' not in sys.modules; "
            "import torch; print(no_torch, n, torch.cuda.device_count())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout.split()
    assert out[0] == "True" and out[1] == out[2]


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_while_the_workers_start_is_a_graceful_stop(signum, code, corpus, tiny_model, tmp_path):
    """The workers are held (a hook) as they start reading their weights; the parent is signalled
    and the hold let go: exit 143/130 with one line, no traceback, no worker left."""
    flags, out = tmp_path / "flags", tmp_path / "out"
    flags.mkdir()
    cmd = job_cmd(corpus, out, tiny_model, *FLAGS, "--devices", "cpu,cpu")
    env = job_env(EXTRACTOR_TEST_HOOK="tests.hooks:pause_at", HOOK_PAUSE="weights", HOOK_DIR=str(flags))
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=REPO)
    try:
        wait_for(lambda: any(flags.glob("at-weights-*")), 120, proc)
        workers = spawned_children(proc.pid)
        proc.send_signal(signum)
        for pid in workers:
            (flags / f"release-{pid}").touch()
        _, log = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == code, log
    assert log.count(f"interrupted by {signal.Signals(signum).name}") == 1 and "Traceback" not in log, log
    assert "stopping the other workers" not in log and "was killed by signal" not in log, log
    wait_for(lambda: not any(alive(pid) for pid in workers), 30)
    assert not (out / "_shards").exists() or not list((out / "_shards").glob("*.lock"))  # the lock was released


def test_another_model_with_nothing_pending_is_refused_as_the_local_engine_refuses_it(two_workers, corpus, checkpoint_factory, tmp_path):
    """Everything is done, but the rerun names another model of the same shape: the markers do
    not vouch for these inputs, so the fingerprints are compared (exit 2), nothing rewritten."""
    out = tmp_path / "out"
    shutil.copytree(two_workers[0], out)
    before = snapshot(out)
    other = checkpoint_factory(seed=7)
    for devices in (["--devices", "cpu,cpu"], []):
        code, log = run_cli(job_args(corpus, out, other, *devices))
        assert code == 2 and "model_fingerprint" in log and "refusing to mix" in log, log
        assert snapshot(out) == before


def test_the_parent_reads_the_manifest_and_the_committed_ids_once_and_the_workers_neither(two_workers, corpus, tiny_model, tmp_path):
    """A grown manifest over a finished output, on two devices: the parent reads the manifest once
    and the committed ids once (one pass over parts and failure records) to plan; the workers are
    handed their rows and part numbers and read neither."""
    out, flags = tmp_path / "out", tmp_path / "flags"
    flags.mkdir()
    shutil.copytree(two_workers[0], out)
    rows = pl.read_parquet(corpus).to_dicts()
    extra = [{"id": f"new{i}", "path": rows[i]["path"]} for i in range(4)]
    manifest = write_manifest(tmp_path / "m.parquet", rows + extra)
    env = job_env(EXTRACTOR_TEST_HOOK="tests.hooks:count_reads", HOOK_COUNT_READS="1", HOOK_DIR=str(flags))
    done = subprocess.run(job_cmd(manifest, out, tiny_model, *FLAGS, "--devices", "cpu,cpu"), env=env, capture_output=True, text=True,
                          cwd=REPO, timeout=180)
    assert done.returncode == 0 and "4 embedded, 0 failed, 13 skipped of 17 rows" in done.stderr, done.stderr
    reads = [line.split() for line in (flags / "reads").read_text().splitlines()]
    parent = {pid for what, pid in reads if what == "manifest"}
    assert [what for what, _ in reads if what == "manifest"] == ["manifest"] and [w for w, _ in reads if w == "committed"] == ["committed"]
    workers = {pid for what, pid in reads if what == "loaded"}
    assert len(workers) == 2 and not workers & parent  # the counters were live in both workers ...
    assert {pid for what, pid in reads if what != "loaded"} == parent  # ... and nothing was read there
    assert len([w for w, _ in reads if w == "ids"]) == 2  # parts, then failure records: one pass
    assert read_output(out)["id"].to_list() == sorted(read_output(two_workers[0])["id"].to_list() + [r["id"] for r in extra])


def test_a_slow_device_takes_fewer_rows_and_the_work_is_shared_to_the_end(tiny_model, tmp_path):
    """One worker decodes a second slower per file than the other (a slower device): rows are
    handed out as workers ask for them, so the fast one takes most of them instead of waiting with
    its half done, and every row is embedded once."""
    rows = [{"id": f"c{i:02d}", "path": str(write_audio(tmp_path / f"c{i:02d}.flac", speechlike(20.0, SR, seed=i), SR))}
            for i in range(32)]  # 20 s each: one file per decode request
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    out, flags = tmp_path / "out", tmp_path / "flags"
    flags.mkdir()
    cmd = job_cmd(manifest, out, tiny_model, *FLAGS, "--part-rows", "1", "--devices", "cpu,cpu", "--decode-fn", "tests.hooks:slow_first_decoder")
    done = subprocess.run(cmd, env=job_env(HOOK_DIR=str(flags), HOOK_SLOW_S="1"), capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0 and "32 embedded, 0 failed" in done.stderr, done.stderr
    ids = read_output(out)["id"].to_list()
    assert ids == sorted(r["id"] for r in rows)  # each once
    by_worker = Counter(int(p.stem.rsplit("-", 1)[1]) % 2 for p in parts(out))  # worker d of 2 writes parts d, d + 2, ... (one row each)
    assert sum(by_worker.values()) == 32 and len(by_worker) == 2, by_worker  # both took part ...
    assert max(by_worker.values()) >= 2 * min(by_worker.values()) + 1, by_worker  # ... the fast one far more
