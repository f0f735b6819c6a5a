"""An exit code and a summary for every outcome: click's usage errors, a summary that cannot be
written (refused at start, a warning at the end), a broken install, a native library's panic."""

from __future__ import annotations

import ast
import gzip
import json
import subprocess
import sys
import tomllib

import pytest

from builders import speechlike, write_audio
from jobs.extract import ENV_PREFIX
from jobrun import REPO, SR, base_args, job_env, run_cli, write_manifest

from . import outcome_hooks


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("outcomes")
    paths = [write_audio(root / f"c{i}.wav", speechlike(0.5, SR, seed=i), SR) for i in range(3)]
    return write_manifest(root / "m.parquet", [{"id": f"r{i}", "path": str(p)} for i, p in enumerate(paths)])


def _summary(path) -> dict:
    return json.loads(path.read_text())


# -- click's own refusals ------------------------------------------------------------------------


@pytest.mark.parametrize("args, says", [
    (["--pooling", "bogus"], "Invalid value for '--pooling': 'bogus' is not one of 'mean', 'none', 'max'"),
    (["--model", None], "Missing option '--model'"),
    (["--storage-options", "[1]"], "Invalid value for '--storage-options': must be a JSON object"),
    (["--no-such-flag"], "No such option '--no-such-flag'"),
])
def test_usage_errors_exit_2_with_the_summary(args, says, manifest, tiny_model, tmp_path):
    summary, out = tmp_path / "s.json", tmp_path / "out"
    given = ["--manifest", str(manifest), "--output", str(out), "--model", str(tiny_model), "--summary-json", str(summary)]
    if args[-1] is None:  # leave the flag out
        i = given.index(args[0])
        del given[i:i + 2]
    else:
        given += args
    code, log = run_cli(given)
    assert code == 2 and says in log, log
    written = _summary(summary)
    assert written["exit_code"] == 2 and says in written["error"] and written["output"] == str(out)
    assert not out.exists()


def test_a_usage_error_of_the_console_script_writes_the_summary_named_in_the_environment(tmp_path):
    summary = tmp_path / "s.json"
    run = subprocess.run([sys.executable, "-m", "jobs.extract", "--pooling", "bogus"], env=job_env(**{f"{ENV_PREFIX}_SUMMARY_JSON": str(summary)}),
                         capture_output=True, text=True, cwd=REPO, timeout=60)
    assert run.returncode == 2 and "'bogus' is not one of" in run.stderr
    assert _summary(summary)["exit_code"] == 2 and "--pooling" in _summary(summary)["error"]


# -- the summary's own file ----------------------------------------------------------------------


@pytest.mark.parametrize("where", ["missing_folder", "a_file_in_the_way", "a_directory"])
def test_a_summary_that_could_not_be_written_is_refused_before_anything_is_written(where, manifest, tiny_model, tmp_path):
    out = tmp_path / "out"
    (tmp_path / "afile").write_text("x")
    path = {"missing_folder": tmp_path / "nope" / "s.json", "a_file_in_the_way": tmp_path / "afile" / "s.json",
            "a_directory": tmp_path}[where]
    code, log = run_cli(base_args(manifest, out, tiny_model, None, "--id-column", "id", "--summary-json", str(path)))
    assert code == 2 and f"--summary-json {path}" in log, log
    assert not out.exists()


def test_a_read_only_summary_folder_is_refused_before_anything_is_written(manifest, tiny_model, tmp_path):
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no user namespaces here: {probe.stderr.decode().strip()}")
    reports, out = tmp_path / "reports", tmp_path / "out"
    reports.mkdir()
    cmd = [sys.executable, "-m", "jobs.extract", *base_args(manifest, out, tiny_model, None, "--summary-json", str(reports / "s.json"))]
    script = f"mount --bind '{reports}' '{reports}' && mount -o remount,ro,bind '{reports}' && exec {' '.join(repr(a) for a in cmd)}"
    run = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], env=job_env(),
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert run.returncode == 2 and f"its folder {reports} is not writable" in run.stderr, run.stderr
    assert not out.exists()


def test_a_summary_that_cannot_be_written_after_a_run_is_a_warning_not_a_failure(manifest, tiny_model, tmp_path):
    reports, out = tmp_path / "reports", tmp_path / "out"
    reports.mkdir()
    env = {"EXTRACTOR_TEST_HOOK": "tests.jobs.outcome_hooks:remove_folder_when_marked", outcome_hooks.GONE: str(reports)}
    code, log = run_cli(base_args(manifest, out, tiny_model, None, "--id-column", "id", "--summary-json", str(reports / "s.json")), env=env)
    assert code == 0, log
    assert "could not write the summary" in log and "the exit code (0) stands" in log
    assert (out / "_SUCCESS").exists()


# -- a broken install ----------------------------------------------------------------------------


def _job_without(module: str, *args: str, cwd=REPO) -> subprocess.CompletedProcess:
    """The console script's main() in a process where `module` cannot be imported (None in
    sys.modules raises ImportError, as an install without it would)."""
    code = f"import sys; sys.modules[{module!r}] = None; from jobs.extract import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], env=job_env(), capture_output=True, text=True, cwd=cwd, timeout=120)


@pytest.mark.parametrize("missing", ["click", "torch"])
def test_a_broken_install_exits_2_in_one_line_naming_the_module_with_the_summary(missing, manifest, tiny_model, tmp_path):
    """click: the command cannot even be imported; torch: the engine cannot, once the flags are read."""
    out, summary = tmp_path / "out", tmp_path / "s.json"
    run = _job_without(missing, *base_args(manifest, out, tiny_model, None, "--id-column", "id", "--summary-json", str(summary)))
    assert run.returncode == 2, run.stderr
    lines = [line for line in run.stderr.splitlines() if "broken install" in line]
    assert len(lines) == 1 and f"cannot import {missing!r}" in lines[0] and "reinstall the job" in lines[0], run.stderr
    assert "Traceback" not in run.stderr
    written = _summary(summary)
    assert written["exit_code"] == 2 and f"cannot import {missing!r}" in written["error"]
    assert not out.exists()


def test_the_console_script_imports_the_standard_library_alone_before_the_command():
    script = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]["extract-embeddings"]
    assert script == "jobs.extract:main"
    tree = ast.parse((REPO / "jobs" / "extract.py").read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    modules = {(a.name if isinstance(n, ast.Import) else n.module).split(".")[0] for n in top for a in n.names}
    assert modules <= set(sys.stdlib_module_names) | {"__future__"}, modules


# -- a native library's panic --------------------------------------------------------------------


def test_a_panic_during_a_run_exits_1_with_the_summary(manifest, tiny_model, tmp_path):
    broken = tmp_path / "t.csv.gz"
    data = gzip.compress(b"a,b\n" * 5000)
    broken.write_bytes(data[: len(data) // 2])
    out, summary = tmp_path / "out", tmp_path / "s.json"
    env = {"EXTRACTOR_TEST_HOOK": "tests.jobs.outcome_hooks:panic_when_prepared", outcome_hooks.TRUNCATED_GZIP: str(broken)}
    code, log = run_cli(base_args(manifest, out, tiny_model, None, "--id-column", "id", "--summary-json", str(summary)), env=env)
    assert code == 1 and "a native library panicked: PanicException" in log, log
    written = _summary(summary)
    assert written["exit_code"] == 1 and written["error"].startswith("PanicException")
    assert not out.exists()  # the hook panicked before the run took its lock
