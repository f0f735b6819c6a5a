"""The command as an operator meets it (issue 11): exit codes, early refusals that write nothing,
progress in a terminal and in JSON, --help without torch, --version, --dry-run."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import shutil
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from builders import speechlike, write_audio
from extractor import __version__
from jobrun import REPO, SR, base_args, job_cmd, job_env, read_failures, read_output, run_cli, snapshot, write_manifest


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("ops")
    paths = [write_audio(root / f"c{i:02d}.wav", speechlike(0.4 + 0.1 * i, SR, seed=i), SR) for i in range(20)]
    rows = [{"id": f"r{i:02d}", "path": str(p)} for i, p in enumerate(paths)]
    return {"root": root, "rows": rows, "manifest": write_manifest(root / "m.parquet", rows)}


def cli(manifest, out, model, *extra):
    return base_args(manifest, out, model, None, "--id-column", "id", *extra)


# -- exit codes -------------------------------------------------------------------------------


def test_a_noop_rerun_over_old_failures_exits_0_and_reports_the_standing_rate(corpus, tiny_model, tmp_path):
    rows = [dict(r) for r in corpus["rows"]]
    for r in rows[:3]:  # 15% of 20 rows fail: their files do not exist
        r["path"] = str(tmp_path / f"gone-{r['id']}.wav")
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    out, summary = tmp_path / "out", tmp_path / "s.json"
    code, log = run_cli(cli(manifest, out, tiny_model, "--summary-json", str(summary)))
    assert code == 3, log  # this run: 3 of 20 failed, over the 1% limit
    first = json.loads(summary.read_text())
    assert first["exit_code"] == 3 and first["failure_rate"] == pytest.approx(0.15)
    code, log = run_cli(cli(manifest, out, tiny_model, "--summary-json", str(summary)))
    assert code == 0, log  # nothing attempted, no new failure: a nightly cron does not alert again
    again = json.loads(summary.read_text())
    assert again["exit_code"] == 0 and again["attempted"] == 0 and again["noop"]
    assert again["standing_failed"] == 3 and again["standing_failure_rate"] == pytest.approx(0.15)
    assert "standing failures 3 (15.00%)" in log


# -- refusals before anything is written --------------------------------------------------------


def _config(model: Path, tmp_path: Path, **audio_config) -> Path:
    """A copy of `model` whose config.json has `audio_config` fields overridden."""
    bad = tmp_path / "model"
    shutil.copytree(model, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["audio_config"].update(audio_config)
    (bad / "config.json").write_text(json.dumps(cfg))
    return bad


def _nan_weight(model: Path, tmp_path: Path) -> Path:
    bad = tmp_path / "model"
    shutil.copytree(model, bad)
    index = json.loads((bad / "model.safetensors.index.json").read_text())["weight_map"]
    key = "audio_tower.layers.1.fc2.weight"
    state = load_file(bad / index[key])
    state[key] = state[key].clone()
    state[key][3, 5] = float("nan")
    save_file(state, bad / index[key], metadata={"format": "pt"})
    return bad


def _nan_adapter(adapter: Path, tmp_path: Path) -> Path:
    bad = tmp_path / "adapter"
    shutil.copytree(adapter, bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["lora_alpha"] = float("nan")
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    return bad


@pytest.mark.parametrize("case", ["output_is_a_file", "failures_is_a_file", "tmp_is_a_file", "lock_is_a_directory",
                                  "recipe_null", "foreign_parquet", "foreign_in_embeddings", "heads_zero", "positions_short",
                                  "nan_weight", "nan_alpha"])
def test_bad_configuration_exits_2_naming_it_and_writes_nothing(case, corpus, tiny_model, tiny_adapter, tmp_path):
    """Each refusal: exit 2, the output byte-identical (no _run.json created), the message names
    the file, tensor or field; the JSON-only checks come before any model load."""
    out, model, adapter = tmp_path / "out", tiny_model, None
    out.mkdir()
    needs_model = case == "nan_weight"  # a NaN alpha is refused from adapter_config.json alone
    expect = {
        "output_is_a_file": "is a file, not a directory", "failures_is_a_file": "failures is a file", "tmp_is_a_file": "_tmp is a file",
        "lock_is_a_directory": "00000.lock is a directory", "recipe_null": "_run.json is not a recipe", "foreign_parquet": "notes.parquet",
        "foreign_in_embeddings": "stray.txt", "heads_zero": "encoder_attention_heads is 0", "positions_short": "max_source_positions 1000",
        "nan_weight": "audio_tower) : tensor layers.1.fc2.weight holds NaN", "nan_alpha": "lora_alpha is nan",
    }[case]
    if case == "output_is_a_file":
        out.rmdir()
        out.write_text("not a directory")
    elif case == "failures_is_a_file":
        (out / "_failures").write_text("x")
    elif case == "tmp_is_a_file":
        (out / "_tmp").write_text("x")
    elif case == "lock_is_a_directory":
        (out / "_shards" / "00000.lock").mkdir(parents=True)
    elif case == "recipe_null":
        (out / "_run.json").write_text(json.dumps({"recipe": None, "num_shards": 1}))
    elif case == "foreign_parquet":
        shutil.copy(corpus["manifest"], out / "notes.parquet")
    elif case == "foreign_in_embeddings":
        (out / "embeddings").mkdir()
        (out / "embeddings" / "stray.txt").write_text("x")
    elif case == "heads_zero":
        model = _config(tiny_model, tmp_path, encoder_attention_heads=0)
    elif case == "positions_short":
        model = _config(tiny_model, tmp_path, max_source_positions=1000)
    elif case == "nan_weight":
        model = _nan_weight(tiny_model, tmp_path)
        expect = "tensor layers.1.fc2.weight holds NaN or Inf"
    elif case == "nan_alpha":
        adapter = _nan_adapter(tiny_adapter, tmp_path)
    before = snapshot(out) if out.is_dir() else out.read_text()
    code, log = run_cli(base_args(corpus["manifest"], out, model, adapter, "--id-column", "id"))
    assert code == 2, log
    assert expect in log, log
    assert (snapshot(out) if out.is_dir() else out.read_text()) == before
    assert not (out.is_dir() and (out / "_run.json").exists()) or case == "recipe_null"
    assert ("rows to embed" in log) == needs_model, log  # only the weights' own check needs them loaded


def test_a_read_only_output_with_work_to_do_is_refused(corpus, tiny_model, tmp_path):
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no user namespaces here: {probe.stderr.decode().strip()}")
    out = tmp_path / "out"
    half = write_manifest(tmp_path / "half.parquet", corpus["rows"][:10])
    assert run_cli(cli(half, out, tiny_model))[0] == 0
    before = snapshot(out)
    cmd = " ".join(f"'{a}'" for a in job_cmd(corpus["manifest"], out, tiny_model, "--id-column", "id", "--decode-workers", "0"))
    script = f"mount --bind '{out}' '{out}' && mount -o remount,ro,bind '{out}' && exec {cmd}"
    run = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], env=job_env(),
                         capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 2, run.stderr
    assert "read-only" in run.stderr and str(out) in run.stderr
    assert snapshot(out) == before


# -- progress and logs --------------------------------------------------------------------------


def test_the_progress_bar_in_a_terminal_ends_on_the_true_count(corpus, tiny_model, tmp_path):
    out = tmp_path / "out"
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # a 160-column terminal
    proc = subprocess.Popen(job_cmd(corpus["manifest"], out, tiny_model, "--id-column", "id", "--decode-workers", "0", "--part-rows", "7"),
                            env=job_env(COLUMNS="160", TQDM_MININTERVAL="0"), stdin=slave, stdout=slave, stderr=slave, cwd=REPO, close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        ready, _, _ = select.select([master], [], [], 120)
        if not ready:
            proc.kill()
            raise AssertionError("no output from the job for 120 s")
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the job closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(60) == 0
    text = b"".join(chunks).decode(errors="replace")
    counts = re.findall(r"\b(\d+)/20\b", text)
    assert counts and counts[-1] == "20", text[-2000:]
    assert len(set(counts)) > 2  # it moved per batch, not only at the three commits
    assert re.search(r"audio-s/s", text) and "done: 20 embedded" in text


def test_json_logs_are_one_object_per_line_with_progress_and_the_summary(corpus, tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "out"
    run = subprocess.run(job_cmd(corpus["manifest"], out, tiny_model, "--id-column", "id", "--decode-workers", "0", "--log-format", "json"),
                         env=job_env(), capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr
    lines = [json.loads(line) for line in run.stderr.splitlines() if line.strip()]
    assert lines and all({"ts", "level", "logger", "event", "message"} <= set(x) for x in lines)
    summary = [x for x in lines if x["event"] == "summary"]
    assert len(summary) == 1 and summary[0]["summary"]["embedded"] == 20 and summary[0]["summary"]["complete"]


def test_progress_log_lines_carry_an_eta(corpus, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr("extractor.progress.LOG_EVERY_S", 0.0)
    code, log = run_cli(cli(corpus["manifest"], tmp_path / "out", tiny_model))
    assert code == 0
    assert re.search(r"progress: \d+/20 rows \(0 failed\), [\d.]+ h audio, \d+ audio-s/s, ETA \d+:\d\d:\d\d", log), log


def test_help_imports_no_torch_and_version_prints():
    run = subprocess.run([sys.executable, "-X", "importtime", "-m", "jobs.extract", "--help"], env=job_env(), capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0 and "--manifest" in run.stdout
    imported = {line.split("|")[-1].strip().split(".")[0] for line in run.stderr.splitlines() if "|" in line}
    assert "click" in imported and not imported & {"torch", "polars", "pyarrow", "numpy"}
    version = subprocess.run([sys.executable, "-m", "jobs.extract", "--version"], env=job_env(), capture_output=True, text=True, cwd=REPO)
    assert version.returncode == 0 and __version__ in version.stdout


def test_a_noop_rerun_imports_no_torch(corpus, tiny_model, tmp_path):
    out = tmp_path / "out"
    assert run_cli(cli(corpus["manifest"], out, tiny_model))[0] == 0
    run = subprocess.run([sys.executable, "-X", "importtime", "-m", "jobs.extract", *cli(corpus["manifest"], out, tiny_model)],
                         env=job_env(), capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0 and "nothing to do" in run.stderr
    imported = {line.split("|")[-1].strip().split(".")[0] for line in run.stderr.splitlines() if "|" in line}
    assert "polars" in imported and "torch" not in imported


def test_dry_run_says_what_a_run_would_do_and_writes_nothing(corpus, tiny_model, tmp_path):
    out = tmp_path / "out"
    half = write_manifest(tmp_path / "half.parquet", corpus["rows"][:15])
    assert run_cli(cli(half, out, tiny_model))[0] == 0
    before = snapshot(out)
    code, text = run_cli(cli(corpus["manifest"], out, tiny_model, "--dry-run"))
    assert code == 0, text
    report = json.loads(text[text.index("{"):])
    assert report["would_run"] and report["pending_rows"] == 5 and report["already_embedded"] == 15
    assert report["pending_audio_hours"] == pytest.approx(sum(0.4 + 0.1 * i for i in range(15, 20)) / 3600, rel=1e-3)
    assert report["recipe"]["d_model"] == 64 and report["shard"] == "0 of 1"
    assert snapshot(out) == before
    code, text = run_cli(cli(corpus["manifest"], out, tiny_model, "--dry-run", "--num-shards", "2"))
    assert code == 2 and '"refused"' in text and "num_shards" in text
    assert snapshot(out) == before


def test_a_plain_adapter_run_imports_neither_peft_nor_transformers(corpus, tiny_model, tiny_adapter, tmp_path):
    """One merge path, in this process: the job never imports peft (or transformers under it)."""
    env = job_env(EXTRACTOR_TEST_HOOK="tests.hooks:record_modules", HOOK_DIR=str(tmp_path))
    run = subprocess.run(job_cmd(corpus["manifest"], tmp_path / "out", tiny_model, "--adapter", str(tiny_adapter), "--id-column", "id",
                                 "--decode-workers", "0"), env=env, capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr
    modules = set(json.loads((tmp_path / "modules.json").read_text()))
    assert "torch" in modules and "extractor.model.lora" in modules
    assert not {m.split(".")[0] for m in modules} & {"peft", "transformers"}
