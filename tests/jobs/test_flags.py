"""Flags declared once (extractor.options): every flag from its environment variable, the options
checking themselves whoever makes them, the --decode-workers bound, and the README's table."""

from __future__ import annotations

import json
import os
import re

import pytest

from extractor.errors import ConfigError
from extractor.options import DECODE_WORKERS_LIMIT, CommandOptions, JobOptions, ManifestSpec, Shard, declared
from jobs.extract import ENV_PREFIX, OUTPUT_FLAG, SUMMARY_FLAG, extract
from jobs.flags import options_from, param_name
from jobrun import REPO, run_cli

# Every flag, as an environment variable's text (not its default), and the option it must give.
# A flag declared without a line here fails test_every_flag_comes_from_its_environment_variable.
FROM_ENVIRONMENT = {
    "manifest": ("m.csv", "manifest.path", "m.csv"),
    "path_column": ("file", "manifest.path_column", "file"),
    "id_column": ("uid", "manifest.id_column", "uid"),
    "keep_columns": ("a, b", "manifest.keep_columns", ("a", "b")),
    "start_column": ("t0", "manifest.start_column", "t0"),
    "end_column": ("t1", "manifest.end_column", "t1"),
    "manifest_format": ("jsonl", "manifest.format", "jsonl"),
    "audio_column": ("audio", "manifest.audio_column", "audio"),
    "output": ("/out", "output", "/out"),
    "model": ("org/name", "model", "org/name"),
    "adapter": ("/lora", "adapter", "/lora"),
    "device": ("cuda:1", "device", "cuda:1"),
    "dtype": ("bfloat16", "dtype", "bfloat16"),
    "no_padding_mask": ("1", "padding_mask", False),
    "pooling": ("max", "pooling", "max"),
    "output_dtype": ("float16", "output_dtype", "float16"),
    "part_rows": ("5000", "part_rows", 5000),
    "max_failure_rate": ("0.5", "max_failure_rate", 0.5),
    "retry_failed": ("true", "retry_failed", True),
    "decode_workers": ("0", "decode_workers", 0),
    "decode_timeout_s": ("7.5", "decode_timeout_s", 7.5),
    "read_timeout_s": ("3", "read_timeout_s", 3.0),
    "max_duration_s": ("60", "max_duration_s", 60.0),
    "token_budget": ("4096", "token_budget", 4096),
    "shard_index": ("2", "shard.index", 2),
    "num_shards": ("3", "shard.count", 3),
    "storage_options": ('{"anon": true}', "storage_options", {"anon": True}),
    "devices": ("cpu,cpu", "devices", "cpu,cpu"),
    "engine": ("local", "engine", "local"),
    "summary_json": ("/tmp/s.json", "summary_json", "/tmp/s.json"),
    "dry_run": ("1", "dry_run", True),
    "log_level": ("warning", "log_level", "WARNING"),
    "log_format": ("json", "log_format", "json"),
}


def _declared(cls) -> list[tuple]:
    """(field, Flag) of every flag of `cls` and of the options it holds."""
    found = []
    for f, decl, kind in declared(cls):
        if decl is None and hasattr(kind, "__dataclass_fields__"):
            found += _declared(kind)
        elif decl is not None:
            found.append((f, decl))
    return found


FLAGS = _declared(JobOptions) + _declared(CommandOptions)


def _get(options, dotted: str):
    for part in dotted.split("."):
        options = getattr(options, part)
    return options


def test_every_flag_comes_from_its_environment_variable(monkeypatch):
    assert set(FROM_ENVIRONMENT) == {param_name(decl, f) for f, decl in FLAGS}
    for param, (text, _, _) in FROM_ENVIRONMENT.items():
        monkeypatch.setenv(f"{ENV_PREFIX}_{param.upper()}", text)
    ctx = extract.make_context("extract-embeddings", [])
    opts, cmd = options_from(JobOptions, ctx.params), options_from(CommandOptions, ctx.params)
    for param, (_, where, expected) in FROM_ENVIRONMENT.items():
        got = _get(cmd if where in CommandOptions.__dataclass_fields__ else opts, where)
        assert got == expected, (param, got)


def test_flags_not_given_leave_the_declared_defaults(monkeypatch):
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    ctx = extract.make_context("extract-embeddings", ["--manifest", "m.parquet", "--output", "o", "--model", "m"])
    assert options_from(JobOptions, ctx.params) == JobOptions(ManifestSpec("m.parquet"), output="o", model="m")
    assert options_from(CommandOptions, ctx.params) == CommandOptions()


def test_the_launcher_reads_the_summary_and_output_flags_the_command_declares():
    assert {SUMMARY_FLAG, OUTPUT_FLAG} <= {decl.flag_name(f) for f, decl in FLAGS}


@pytest.mark.parametrize("make, says", [
    (lambda: JobOptions(ManifestSpec("m"), "o", "m", pooling="median"), "--pooling 'median': expected one of mean, none, max"),
    (lambda: JobOptions(ManifestSpec("m"), "o", "m", dtype="fp8"), "--dtype 'fp8': expected one of auto, float32, bfloat16"),
    (lambda: JobOptions(ManifestSpec("m"), "o", "m", part_rows=0), "--part-rows 0: expected an integer at least 1"),
    (lambda: JobOptions(ManifestSpec("m"), "o", "m", part_rows=2.5), "--part-rows 2.5: expected an integer"),
    (lambda: JobOptions(ManifestSpec("m"), "o", "m", max_failure_rate=float("nan")), "--max-failure-rate nan: expected a number"),
    (lambda: JobOptions(ManifestSpec("m"), "o", "m", max_failure_rate=1.5), "at least 0 and at most 1"),
    (lambda: JobOptions(ManifestSpec("m"), "o", "m", max_duration_s=0), "--max-duration-s 0: expected a number above 0"),
    (lambda: JobOptions(ManifestSpec("m"), "o", "m", decode_workers=True), "--decode-workers True: expected an integer"),
    (lambda: JobOptions(ManifestSpec("m"), "o", "m", token_budget=100), "--token-budget 100: expected an integer at least 1500"),
    (lambda: JobOptions(ManifestSpec("m"), "o", "m", device="gpu"), "--device 'gpu': expected auto, cpu, cuda or cuda:N"),
    (lambda: JobOptions(ManifestSpec("m"), "o", "m", storage_options="{}"), "--storage-options '{}': expected a JSON object"),
    (lambda: JobOptions(ManifestSpec("m"), "", "m"), "--output is empty"),
    (lambda: ManifestSpec("m", format="tsv"), "--manifest-format 'tsv': expected one of parquet, csv, lhotse, jsonl"),
    (lambda: Shard(3, 3), "--shard-index 3 must be below --num-shards 3"),
    (lambda: Shard(0, 0), "--num-shards 0: expected an integer at least 1"),
    (lambda: CommandOptions(engine="ray", devices="all"), "--devices is for --engine local"),
    (lambda: CommandOptions(log_level="LOUD"), "--log-level 'LOUD'"),
])
def test_the_options_check_themselves_naming_the_flag(make, says):
    with pytest.raises(ConfigError) as e:
        make()
    assert says in str(e.value)


def test_decode_workers_are_bounded_and_say_so(tmp_path):
    assert JobOptions(ManifestSpec("m"), "o", "m", decode_workers=DECODE_WORKERS_LIMIT).decode_workers == DECODE_WORKERS_LIMIT
    with pytest.raises(ConfigError, match=f"--decode-workers {DECODE_WORKERS_LIMIT + 1}: expected an integer at least 0 "
                                          f"and at most {DECODE_WORKERS_LIMIT}"):
        JobOptions(ManifestSpec("m"), "o", "m", decode_workers=DECODE_WORKERS_LIMIT + 1)
    summary = tmp_path / "s.json"
    for given in (["--decode-workers", "640"], []):
        env = {} if given else {f"{ENV_PREFIX}_DECODE_WORKERS": "640"}
        code, log = run_cli(["--manifest", "m", "--output", str(tmp_path / "out"), "--model", "m", "--summary-json", str(summary),
                             *given], env=env)
        assert code == 2 and f"0<=x<={DECODE_WORKERS_LIMIT}" in log, log
        assert f"0<=x<={DECODE_WORKERS_LIMIT}" in json.loads(summary.read_text())["error"]
    _, help_text = run_cli(["--help"])
    assert f"at most {DECODE_WORKERS_LIMIT}" in " ".join(help_text.split())
    assert not (tmp_path / "out").exists()


def test_the_readme_table_has_every_flag():
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("| flag | meaning |"):readme.index("### Exit codes")]
    listed = set(re.findall(r"`(--[a-z0-9-]+)", table))
    flags = {decl.flag_name(f) for f, decl in FLAGS if not decl.hidden}
    assert flags <= listed, sorted(flags - listed)
