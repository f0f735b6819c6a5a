"""`--engine ray` on a cluster of two Ray nodes (tests/engines/conftest.py), with the manifest, the
audio and the output on a loopback S3 server (moto in server mode; nothing is mocked).

Every run is the real command in a process of its own, the driver, joining the cluster through
RAY_ADDRESS. What its shard tasks need in their environment (the S3 endpoint and keys, a test hook)
reaches them as `ray job submit --runtime-env-json` would send it: a job config in the driver's
environment. The model is the Hub repo `org/tiny`, resolved offline from three Hugging Face caches
(the driver's and each node's), as on hosts that each hold their own.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

pytest.importorskip("ray", reason="--engine ray needs the optional extra: pip install '.[ray]'")
pytest.importorskip("s3fs", reason="s3:// needs the optional extra: pip install '.[s3]'")
import s3server  # noqa: E402
from s3server import s3_server  # noqa: E402

from jobrun import REPO, job_cmd, job_env, make_corpus, run_cli, wait_for  # noqa: E402

BUCKET = "ray-engine"
N_CLIPS = 10  # r00..r09; r90 names a missing object, r91 a clip too short for one frame
REPO_ID = "org/tiny"
PINNED = hashlib.sha1(b"the driver's main").hexdigest()  # what `main` is where the driver resolves it
MOVED = hashlib.sha1(b"main moved on").hexdigest()  # what `main` is on the nodes: other weights
FLAGS = ["--id-column", "id", "--part-rows", "2", "--max-failure-rate", "1", "--device", "cpu", "--log-level", "INFO"]
RUN_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on 127.0.0.1 (tests/s3server.py); AWS_* in os.environ."""
    with s3_server(BUCKET) as server:
        yield server


def put_manifest(fs, key: str, rows: list[dict]) -> str:
    return s3server.put_manifest(fs, BUCKET, key, rows)


@pytest.fixture(scope="module")
def corpus(s3, tmp_path_factory):
    root = tmp_path_factory.mktemp("ray_corpus")
    _, paths, _ = make_corpus(root / "audio", n=N_CLIPS, seed=7)
    from builders import speechlike, write_audio

    paths.append(write_audio(root / "audio" / "short.wav", speechlike(0.015, 16_000, seed=3), 16_000))
    for p in paths:
        s3.fs.put_file(str(p), f"{BUCKET}/audio/{p.name}")
    rows = [{"id": f"r{i:02d}", "path": f"s3://{BUCKET}/audio/{p.name}"} for i, p in enumerate(paths[:N_CLIPS])]
    rows += [{"id": "r90", "path": f"s3://{BUCKET}/audio/missing.flac"}, {"id": "r91", "path": f"s3://{BUCKET}/audio/short.wav"}]
    return SimpleNamespace(manifest=put_manifest(s3.fs, "in/manifest.parquet", rows), ids=sorted(r["id"] for r in rows),
                           duplicates=put_manifest(s3.fs, "in/duplicates.parquet", rows + rows[:1]))


def fill_cache(cache: Path, main: str, snapshots: dict[str, Path]) -> None:
    """An HF cache holding `org/tiny` at the given commits, `main` naming one (huggingface_hub's layout)."""
    repo = cache / f"models--{REPO_ID.replace('/', '--')}"
    for commit, checkpoint in snapshots.items():
        shutil.copytree(checkpoint, repo / "snapshots" / commit, dirs_exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(main)


@pytest.fixture(scope="module")
def hub_caches(ray_cluster, tiny_model, checkpoint_factory, tmp_path_factory):
    """The driver's cache: main is PINNED (tiny_model). The nodes' caches: PINNED too, but their
    main has moved on to other weights, so a task that resolved `main` itself would embed other rows."""
    other = checkpoint_factory(seed=1)
    for cache in ray_cluster.hf_cache.values():
        fill_cache(cache, MOVED, {PINNED: tiny_model, MOVED: other})
    driver = tmp_path_factory.mktemp("driver_hf")
    fill_cache(driver, PINNED, {PINNED: tiny_model})
    return SimpleNamespace(driver=driver)


@pytest.fixture(scope="module")
def reference(s3, corpus, tiny_model):
    """The local engine, one shard, the model as a directory, from the same S3 manifest and audio."""
    out = f"s3://{BUCKET}/reference"
    code, log = run_cli(["--manifest", corpus.manifest, "--output", out, "--model", str(tiny_model), *FLAGS, "--decode-workers", "0"])
    assert code == 0, log
    return read_output(s3.fs, "reference")


def driver_env(ray_cluster, s3, hub_caches, hook_dir: Path, hook: str = "tests.engines.ray_hooks:record") -> dict:
    tasks = {**s3.env, "HF_HUB_OFFLINE": "1", "EXTRACTOR_TEST_HOOK": hook, "HOOK_DIR": str(hook_dir)}
    return job_env(**s3.env, RAY_ADDRESS=ray_cluster.address, RAY_JOB_CONFIG_JSON_ENV_VAR=json.dumps({"runtime_env": {"env_vars": tasks}}),
                   HF_HUB_CACHE=str(hub_caches.driver), HF_HUB_OFFLINE="1", EXTRACTOR_TEST_HOOK=hook, HOOK_DIR=str(hook_dir))


def ray_cmd(manifest: str, out: str, *extra: str) -> list[str]:
    return job_cmd(manifest, out, REPO_ID, "--engine", "ray", "--num-shards", "2", *FLAGS, *extra)


def run_driver(cmd: list[str], env: dict) -> SimpleNamespace:
    """The command to its end: (returncode, stderr, pid)."""
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    return SimpleNamespace(returncode=proc.returncode, stderr=stderr, pid=proc.pid)


@contextmanager
def driver_running(cmd: list[str], env: dict, log: Path):
    """The command in the background, its stderr in `log` (read while it runs); killed if still running at the end."""
    with open(log, "w") as stderr:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def read_output(fs, prefix: str) -> SimpleNamespace:
    """Rows and failure records as readers see them (datasets over s3fs)."""
    fs.invalidate_cache()

    def table(folder: str) -> pl.DataFrame:
        return pl.from_arrow(ds.dataset(f"{BUCKET}/{prefix}/{folder}", filesystem=fs, format="parquet").to_table()).sort("id")

    return SimpleNamespace(rows=table("embeddings"), failures=table("_failures"))


def keys(fs, prefix: str) -> dict[str, str]:
    """Every object under the prefix, with its ETag: equal only if nothing was written."""
    fs.invalidate_cache()
    return {k.removeprefix(f"{BUCKET}/{prefix}/"): v["ETag"] for k, v in fs.find(f"{BUCKET}/{prefix}", detail=True).items()}


def assert_exactly_once_and_equal(got: SimpleNamespace, want: SimpleNamespace, ids: list[str]) -> None:
    rows, failures = got.rows, got.failures
    assert sorted(rows["id"].to_list() + failures["id"].to_list()) == ids  # each id once, in the parts or the failures
    assert rows["id"].to_list() == want.rows["id"].to_list()
    assert np.array_equal(np.stack(rows["embedding"].to_numpy()), np.stack(want.rows["embedding"].to_numpy()))  # bit for bit
    assert rows.drop("embedding").equals(want.rows.drop("embedding"))
    assert failures.select("id", "path", "error").rows() == want.failures.select("id", "path", "error").rows()


def records(hook_dir: Path, kind: str) -> list[tuple[int, int, int, str]]:
    """The hook's files of one kind: (shard, seq or -1, pid, node id)."""
    found = []
    for p in hook_dir.glob(f"{kind}-*"):
        fields = p.name.split("-")[1:]
        shard, *seq, pid, node = fields
        found.append((int(shard), int(seq[0]) if seq else -1, int(pid), node))
    return sorted(found)


def part_numbers(fs, prefix: str) -> set[tuple[int, int]]:
    """(shard, seq) of every committed part and failure file: part-SSSSS-NNNNNN.parquet."""
    names = [k.rsplit("/", 1)[-1] for k in keys(fs, prefix) if k.startswith(("embeddings/part-", "_failures/part-"))]
    return {(int(n.split("-")[1]), int(n.split("-")[2].split(".")[0])) for n in names}


def test_two_nodes_each_write_their_shard_bit_identical_to_the_local_engine(ray_cluster, s3, corpus, reference, hub_caches, tmp_path):
    out, hooks = f"s3://{BUCKET}/two-nodes", tmp_path / "hooks"
    hooks.mkdir()
    run = run_driver(ray_cmd(corpus.manifest, out), driver_env(ray_cluster, s3, hub_caches, hooks))
    assert run.returncode == 0, run.stderr
    assert_exactly_once_and_equal(read_output(s3.fs, "two-nodes"), reference, corpus.ids)
    assert "_SUCCESS" in keys(s3.fs, "two-nodes")
    assert "done: 10 embedded, 2 failed, 0 skipped of 12 rows" in run.stderr

    # Each shard ran in one process on its own node; every part it committed was written there,
    # none by the driver; and the tasks loaded the commit the driver resolved `main` to, from their
    # own node's cache (their own `main` would have given other rows, caught above).
    commits = records(hooks, "commit")
    assert {(shard, seq) for shard, seq, _, _ in commits} == part_numbers(s3.fs, "two-nodes")
    where = {shard: {(pid, node) for s, _, pid, node in commits if s == shard} for shard in (0, 1)}
    assert all(len(w) == 1 for w in where.values()), where
    (pid0, node0), (pid1, node1) = where[0].pop(), where[1].pop()
    assert {node0, node1} == set(ray_cluster.nodes.values())
    assert run.pid not in (pid0, pid1)
    for cache in ray_cluster.hf_cache.values():
        assert f"{REPO_ID} at commit {PINNED}, in {cache}" in run.stderr, run.stderr

    # The tasks' log lines came to the driver's one stream, each saying where it ran.
    for shard, pid in ((0, pid0), (1, pid1)):
        assert re.search(rf"shard {shard} of 2 \([^)]*, pid {pid}\): done: ", run.stderr), run.stderr

    # A rerun: the driver finds the output done for this manifest and these inputs; no task starts.
    for p in hooks.iterdir():
        p.unlink()
    before = keys(s3.fs, "two-nodes")
    rerun = run_driver(ray_cmd(corpus.manifest, out), driver_env(ray_cluster, s3, hub_caches, hooks))
    assert rerun.returncode == 0, rerun.stderr
    assert "nothing to do: 0 embedded, 0 failed, 12 skipped of 12 rows" in rerun.stderr, rerun.stderr
    assert "Connecting to existing Ray cluster" not in rerun.stderr
    assert keys(s3.fs, "two-nodes") == before and not list(hooks.iterdir())


def test_a_worker_killed_mid_shard_then_a_rerun_is_exactly_once(ray_cluster, s3, corpus, reference, hub_caches, tmp_path):
    """SIGKILL one node's worker after its first commit; the other shard finishes; exit 1. The
    rerun takes the dead worker's S3 lock over (same host, its process is gone) and completes."""
    out, hooks = f"s3://{BUCKET}/killed", tmp_path / "hooks"
    hooks.mkdir()
    cmd = ray_cmd(corpus.manifest, out)
    log = tmp_path / "driver.log"
    with driver_running(cmd, driver_env(ray_cluster, s3, hub_caches, hooks, "tests.hooks:stop_after_first_commit"), log) as driver:
        # Both tasks stop after their first commit (tests.hooks), each in its own Ray worker.
        wait_for(lambda: len(list(hooks.glob("committed-*"))) == 2, RUN_TIMEOUT_S, driver)
        victim, survivor = sorted(int(p.name.split("-")[1]) for p in hooks.glob("committed-*"))
        os.kill(victim, signal.SIGKILL)
        (hooks / f"release-{survivor}").touch()
        code = driver.wait(RUN_TIMEOUT_S)
    stderr = log.read_text()
    assert code == 1, stderr
    assert "WorkerCrashedError" in stderr and "1 of 2 shards failed" in stderr and "rerun the same command to resume" in stderr

    # What the kill left: the victim's lock (the survivor let its own go), its committed parts,
    # the survivor's whole shard; no _SUCCESS.
    left = keys(s3.fs, "killed")
    locks = [k for k in left if k.endswith(".lock")]
    assert len(locks) == 1 and "_SUCCESS" not in left, left
    holder = json.loads(s3.fs.cat_file(f"{BUCKET}/killed/{locks[0]}"))
    assert holder["pid"] == victim
    done = read_output(s3.fs, "killed")
    assert 0 < done.rows.height + done.failures.height < len(corpus.ids)

    rerun = run_driver(cmd, driver_env(ray_cluster, s3, hub_caches, hooks))
    assert rerun.returncode == 0, rerun.stderr
    assert f"taking over stale lock s3://{BUCKET}/killed/{locks[0]} (pid {victim} on" in rerun.stderr, rerun.stderr
    assert f"its process {victim} on this host is gone" in rerun.stderr
    assert_exactly_once_and_equal(read_output(s3.fs, "killed"), reference, corpus.ids)
    left = keys(s3.fs, "killed")
    assert "_SUCCESS" in left and not [k for k in left if k.endswith(".lock")]


def test_sigterm_stops_the_tasks_gracefully_and_a_second_one_at_once(ray_cluster, s3, corpus, reference, hub_caches, tmp_path):
    """The driver's first SIGTERM reaches every task, which stops as the local engine does: what it
    has embedded is committed, its lock is let go, no marker. A second one ends the driver at once
    (143) and no task outlives it. (A rerun resumes as after any stop; the test above reruns after a worse one.)"""
    out, hooks = f"s3://{BUCKET}/stopped", tmp_path / "hooks"
    hooks.mkdir()
    log = tmp_path / "driver.log"
    env = driver_env(ray_cluster, s3, hub_caches, hooks, "tests.hooks:stop_after_first_commit")
    with driver_running(ray_cmd(corpus.manifest, out), env, log) as driver:
        wait_for(lambda: len(list(hooks.glob("committed-*"))) == 2, RUN_TIMEOUT_S, driver)
        first, second = sorted(int(p.name.split("-")[1]) for p in hooks.glob("committed-*"))
        driver.send_signal(signal.SIGTERM)
        # Each task hears of it from the driver (within a second), while it waits in the hook.
        wait_for(lambda: log.read_text().count("the driver got SIGTERM: stopping") == 2, RUN_TIMEOUT_S, driver)
        (hooks / f"release-{first}").touch()
        stopped = re.compile(rf"shard (\d) of 2 \(.*, pid {first}\): interrupted: ")
        wait_for(lambda: stopped.search(log.read_text()), RUN_TIMEOUT_S, driver)  # its own summary, relayed
        driver.send_signal(signal.SIGTERM)  # the other task still waits in the hook
        code = driver.wait(RUN_TIMEOUT_S)
    stderr = log.read_text()
    assert code == 128 + signal.SIGTERM, stderr
    assert "stopped at once by a second SIGTERM" in stderr and "Traceback" not in stderr, stderr
    wait_for(lambda: not os.path.exists(f"/proc/{second}"), 30)  # Ray ends a driver's tasks with it

    # The task that stopped gracefully: its lock let go, no marker; what it committed is exactly
    # the reference's rows. (The other task's lock may be left: a rerun on this host takes it over.)
    shard = int(stopped.search(stderr)[1])
    left = keys(s3.fs, "stopped")
    assert f"_shards/{shard:05d}.lock" not in left and not [k for k in left if k.endswith(".done") or k == "_SUCCESS"], left
    got = read_output(s3.fs, "stopped")
    assert got.rows.height >= 2 and got.rows["id"].n_unique() == got.rows.height
    want = reference.rows.filter(pl.col("id").is_in(got.rows["id"].implode()))
    assert np.array_equal(np.stack(got.rows["embedding"].to_numpy()), np.stack(want["embedding"].to_numpy()))


def test_a_bad_configuration_is_refused_on_the_driver_before_any_task(ray_cluster, s3, corpus, reference, hub_caches, tmp_path):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    env = driver_env(ray_cluster, s3, hub_caches, hooks)
    # A manifest with a duplicate id: nothing is written, not even the output's prefix.
    dup = run_driver(ray_cmd(corpus.duplicates, f"s3://{BUCKET}/dup"), env)
    assert dup.returncode == 2, dup.stderr
    assert "duplicate" in dup.stderr and "r00" in dup.stderr
    assert not keys(s3.fs, "dup")
    # An output written with one shard (the reference): another layout, refused; not one byte changes.
    before = keys(s3.fs, "reference")
    other = run_driver(ray_cmd(corpus.manifest, f"s3://{BUCKET}/reference"), env)
    assert other.returncode == 2, other.stderr
    assert "num_shards: 1 (existing output) → 2 (this run)" in other.stderr
    assert keys(s3.fs, "reference") == before
    # Refused before the driver joined the cluster: no task was submitted, none read the manifest.
    for run in (dup, other):
        assert "Connecting to existing Ray cluster" not in run.stderr
    assert not list(hooks.iterdir())


def test_shards_run_with_copies_of_the_model_complete_the_output(tiny_model, tmp_path):
    """Shards on other hosts read their own copy of one checkpoint (a Ray node's disk, a pod's
    volume): the copies' files differ in stat, not in content, and `_SUCCESS` is still written.
    (The local engine, one shard per copy: the two Ray nodes above share one file system.)"""
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model, copy)
    _, paths, _ = make_corpus(tmp_path / "audio", n=4, seed=3)
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": f"r{i:02d}", "path": str(p)} for i, p in enumerate(paths)]), manifest)
    out = tmp_path / "out"

    def shard_on_its_host(index: int) -> str:
        code, log = run_cli(["--manifest", str(manifest), "--output", str(out), "--model", str((tiny_model, copy)[index]),
                             "--id-column", "id", "--decode-workers", "0", "--num-shards", "2", "--shard-index", str(index)])
        assert code == 0, log
        return log

    for index in (0, 1):
        shard_on_its_host(index)
    assert (out / "_SUCCESS").exists()
    # Each shard's rerun on its own host is a no-op; none rewrites anything.
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert all("nothing to do" in shard_on_its_host(i) for i in (0, 1))
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
