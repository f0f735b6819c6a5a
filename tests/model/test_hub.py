"""`--model org/name` and `--adapter org/lora` through a Hub on loopback (tests/hub_server.py).

The job runs as a real process with HF_ENDPOINT pointing at the loopback Hub and a fresh HF cache:
huggingface_hub reads its environment once, at import, so every resolution here is a process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from builders import LM_PREFIX, TOWER_PREFIX, shard_contents, speechlike, write_audio
from extractor.errors import ConfigError
from extractor.model.checkpoint import fingerprint, read_tower_tensors
from extractor.model.hub import parse_ref, readable_source, resolve_adapter, resolve_model
from hub_server import HubServer

REPO = Path(__file__).resolve().parents[2]
SR = 16_000
INDEX = "model.safetensors.index.json"
# Run the CLI's command as `python -m jobs.extract` does (but for its os._exit at the very end),
# and report whether it imported torch.
RUN_JOB = """
import sys
from jobs.extract import ENV_PREFIX, extract
sys.argv = ["extract-embeddings", *sys.argv[1:]]
try:
    extract(auto_envvar_prefix=ENV_PREFIX)
    code = 0
except SystemExit as e:
    code = e.code or 0
print("torch imported:", "torch" in sys.modules, file=sys.stderr)
sys.exit(code)
"""
RESOLVE = """
import json, sys
from extractor.model.hub import resolve_adapter, resolve_model
print(json.dumps([resolve_model(sys.argv[1]), resolve_adapter(sys.argv[2]) if len(sys.argv) > 2 else None]))
"""


@pytest.fixture(scope="module")
def hub(tiny_model, tiny_adapter, checkpoint_factory, adapter_factory):
    with HubServer() as server:
        server.add_repo("org/tiny", tiny_model)
        server.add_repo("org/lora", tiny_adapter)
        server.add_repo("org/single", checkpoint_factory(single_file=True))
        server.add_repo("org/lora-bin", adapter_factory("tf5_full", bin_format=True))
        server.add_repo("org/flaky", tiny_model, drop=True)
        yield server


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub_corpus")
    rows = [{"id": f"clip{i}", "path": str(write_audio(root / f"clip{i}.flac", speechlike(0.4 + 0.3 * i, SR, seed=i), SR))}
            for i in range(3)]
    pq.write_table(pa.Table.from_pylist(rows), root / "manifest.parquet")
    return root / "manifest.parquet"


def hub_env(tmp: Path, endpoint: str, *, offline: bool = False) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp / "hf_home"), HF_HUB_CACHE=str(tmp / "hf_cache"), HF_HUB_DISABLE_PROGRESS_BARS="1",
               XDG_CACHE_HOME=str(tmp / "xdg"), PYTHONPATH=str(REPO))
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env


def run_job(env: dict, manifest: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", RUN_JOB, "--manifest", str(manifest), "--output", str(out), "--id-column", "id",
           "--decode-workers", "0", "--device", "cpu", *args]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)


def resolve(env: dict, *specs: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RESOLVE, *specs], env=env, cwd=REPO, capture_output=True, text=True, timeout=60)


def file_requests(hub: HubServer) -> list[tuple[str, str]]:
    """What the client asked of the Hub, less its once-a-day agent-registry lookup (/api/agent-harnesses)."""
    return [r for r in hub.requests if not r[1].startswith("/api/")]


def dead_endpoint() -> str:
    """A loopback port where nothing listens: the Hub, stopped."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture(scope="module")
def first_run(hub, corpus, tmp_path_factory):
    """The job run once with both flags as repo ids, into a fresh cache."""
    tmp = tmp_path_factory.mktemp("hub_run")
    hub.requests.clear()
    env = hub_env(tmp, hub.endpoint)
    out = tmp / "out"
    result = run_job(env, corpus, out, "--model", "org/tiny", "--adapter", "org/lora")
    assert result.returncode == 0, result.stderr[-3000:]
    return {"tmp": tmp, "out": out, "env": env, "requested": {r: hub.files_requested(r) for r in ("org/tiny", "org/lora")},
            "stderr": result.stderr}


def test_job_by_repo_id_downloads_only_the_tower(first_run, hub, tiny_model, tiny_adapter):
    shards = shard_contents(tiny_model)
    tower = {f.name for f, keys in shards.items() if any(k.startswith(TOWER_PREFIX) for k in keys)}
    lm_only = {f.name for f, keys in shards.items() if all(k.startswith(LM_PREFIX) for k in keys)}
    assert lm_only and tower
    assert first_run["requested"]["org/tiny"] == {"config.json", INDEX, *tower}
    assert not first_run["requested"]["org/tiny"] & lm_only
    assert first_run["requested"]["org/lora"] == {"adapter_config.json", "adapter_model.safetensors"}  # not its README.md

    expected = {"model": "org/tiny", "model_revision": hub.commit("org/tiny"), "adapter": "org/lora", "adapter_revision": hub.commit("org/lora")}
    run = json.loads((first_run["out"] / "_run.json").read_text())
    assert run["sources"] == expected
    parts = sorted((first_run["out"] / "embeddings").glob("part-*.parquet"))
    assert parts and all(json.loads(pq.read_schema(p).metadata[b"qwen2_audio_embeddings.sources"]) == expected for p in parts)
    assert sum(pq.read_metadata(p).num_rows for p in parts) == 3
    # The weights the job read are the ones the Hub served.
    assert run["recipe"]["model_fingerprint"] == fingerprint(read_tower_tensors(tiny_model))


def test_rerun_asks_the_hub_once_per_repo_and_imports_no_torch(first_run, hub, corpus):
    args = ("--model", "org/tiny", "--adapter", "org/lora")
    # The first run read files downloaded within RACY_S of its start: their stat signature was not
    # trusted, so its marker's inputs were "unknown". The first rerun finds nothing pending and
    # marks the output with trusted inputs; from then on a rerun is a no-op.
    settle = run_job(first_run["env"], corpus, first_run["out"], *args)
    assert settle.returncode == 0 and "3 skipped" in settle.stderr, settle.stderr[-3000:]
    hub.requests.clear()
    result = run_job(first_run["env"], corpus, first_run["out"], *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "nothing to do" in result.stderr
    assert "torch imported: False" in result.stderr
    # The branch is looked up; every other file is pinned to the commit it named, and cached.
    assert file_requests(hub) == [("HEAD", "/org/tiny/resolve/main/config.json"), ("HEAD", "/org/lora/resolve/main/adapter_config.json")]


def test_offline_and_hub_down_resolve_from_the_cache(first_run, hub, corpus):
    tmp = first_run["tmp"]
    snapshots = [str(tmp / "hf_cache" / f"models--org--{name}" / "snapshots" / hub.commit(f"org/{name}")) for name in ("tiny", "lora")]
    down = dead_endpoint()
    pinned = [f"org/tiny@{hub.commit('org/tiny')}", f"org/lora@{hub.commit('org/lora')}"]
    hub.requests.clear()
    # HF_HUB_OFFLINE=1, a Hub that refuses connections, and revisions given as commits.
    for offline, specs in ((True, ["org/tiny", "org/lora"]), (False, ["org/tiny", "org/lora"]), (True, pinned)):
        result = resolve(hub_env(tmp, down, offline=offline), *specs)
        assert result.returncode == 0, result.stderr[-3000:]
        assert json.loads(result.stdout) == snapshots
    assert (Path(snapshots[0]) / INDEX).is_file() and (Path(snapshots[1]) / "adapter_model.safetensors").is_file()
    rerun = run_job(hub_env(tmp, down, offline=True), corpus, first_run["out"], "--model", "org/tiny", "--adapter", "org/lora")
    assert rerun.returncode == 0 and "0 embedded, 0 failed, 3 skipped of 3 rows" in rerun.stderr, rerun.stderr[-3000:]
    assert hub.requests == []


def test_unsharded_checkpoint_and_pickled_adapter(hub, tmp_path):
    env = hub_env(tmp_path, hub.endpoint)
    hub.requests.clear()
    result = resolve(env, "org/single", "org/lora-bin")
    assert result.returncode == 0, result.stderr[-3000:]
    model, adapter = map(Path, json.loads(result.stdout))
    # The index and the safetensors adapter: asked for, absent, and the other file taken.
    assert hub.files_requested("org/single") == {"config.json", INDEX, "model.safetensors"}
    assert hub.files_requested("org/lora-bin") == {"adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"}
    assert sorted(p.name for p in model.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.bin"]
    # Offline, those absences are known from the cache (the Hub's 404s named the commit): the same snapshots.
    offline = resolve(hub_env(tmp_path, dead_endpoint(), offline=True), "org/single", "org/lora-bin")
    assert offline.returncode == 0, offline.stderr[-3000:]
    assert list(map(Path, json.loads(offline.stdout))) == [model, adapter]


@pytest.mark.parametrize("args, offline, code, words", [
    (["--model", "org/tiny"], True, 2, ["org/tiny", "HF_HUB_OFFLINE", "config.json"]),
    (["--model", "org/missing"], False, 2, ["org/missing", "has no repo"]),
    (["--model", "org/tiny@v9"], False, 2, ["org/tiny@v9", "no revision 'v9'"]),
    (["--model", "org/tiny", "--adapter", "org/tiny"], False, 2, ["--adapter org/tiny", "adapter_config.json"]),
    (["--model", "no/such/dir"], False, 2, ["'no/such/dir'", "neither an existing directory nor a Hugging Face Hub repo id"]),
    (["--model", "org/flaky"], False, 1, ["--model org/flaky", "retry"]),
], ids=["offline-not-cached", "no-repo", "no-revision", "model-as-adapter", "not-a-name", "connection-dropped"])
def test_refusals_name_the_repo_and_write_nothing(hub, corpus, tmp_path, args, offline, code, words):
    out = tmp_path / "out"
    result = run_job(hub_env(tmp_path, hub.endpoint, offline=offline), corpus, out, *args)
    assert result.returncode == code, result.stderr[-3000:]
    for word in words:
        assert word in result.stderr
    assert not out.exists()


# -- in-process: what is a name, what is a directory ------------------------------------------

def test_an_existing_directory_wins_over_a_repo_id(tmp_path, monkeypatch):
    (tmp_path / "org" / "tiny").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert parse_ref("org/tiny", "--model") is None
    assert resolve_model("org/tiny") == "org/tiny" and resolve_adapter("org/tiny") == "org/tiny"
    assert parse_ref("org/other@v1", "--model").revision == "v1"
    assert parse_ref("org/other", "--model").revision == "main"


@pytest.mark.parametrize("spec", ["/no/such/dir", "a/b/c", "s3://bucket/model", "tiny", "org/na--me", "org/name@", ""])
def test_what_is_neither_is_refused(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="--model"):
        parse_ref(spec, "--model")


def test_a_file_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="is a file"):
        parse_ref(str(tmp_path / "config.json"), "--model")


def test_readable_source_of_a_snapshot_and_of_a_path(tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "hub" / "models--Qwen--Qwen2-Audio-7B-Instruct" / "snapshots" / commit
    assert readable_source(str(snapshot)) == ("Qwen/Qwen2-Audio-7B-Instruct", commit)
    assert readable_source(str(tmp_path / "my-model")) == (str(tmp_path / "my-model"), None)
    assert readable_source(None) == (None, None)
