"""The `extract-embeddings` command: parse flags, run the engine, map the outcome to an exit code.

Exit codes (extractor.errors, the README's table): 0 done; 1 unexpected (retry); 2 configuration
or input error, a broken install included (never retry); 3 this run's failure rate over the
limit; 75 the output is busy with a live run (retry later); 130/143 stopped by SIGINT/SIGTERM
(what was embedded is kept). --summary-json is written for every one of them, click's own usage
errors included; a summary that cannot be written is a warning, never another outcome.

Nothing here imports torch: `--help`, `--version` and a rerun with nothing to do stay fast. The
console script is jobs/extract.py, which imports this module.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
from pathlib import Path

import click

from extractor import __version__
from extractor.errors import EXIT_FAILURE_RATE, EXIT_OK, EXIT_UNEXPECTED, ConfigError, Interrupted, exit_code_of
from extractor.options import CommandOptions, JobOptions
from extractor.seams import NONE, Seams
from extractor.signals import StopSignal, graceful_signals
from jobs.extract import PROG, broken_install, summary_of_refusal, write_summary
from jobs.flags import envvar, flag_options, options_from
from jobs.logs import configure

logger = logging.getLogger(PROG)

# Test seams the command hands to the engine (extractor.seams); the library reads no environment
# variable to let tests in. `module:function`, called at the run's named events.
TEST_HOOK_ENV = "EXTRACTOR_TEST_HOOK"


class _Command(click.Command):
    """A click command whose usage errors (a bad choice, a missing flag) are summarised too: click
    refuses them before the command's body runs, and a scheduler reads the summary of every outcome."""

    def make_context(self, info_name, args, parent=None, **extra):
        given = list(args)
        try:
            return super().make_context(info_name, list(args), parent, **extra)
        except click.ClickException as e:
            summary_of_refusal(given, os.environ, e.exit_code, f"{type(e).__name__}: {e.format_message()}")
            raise


@click.command(cls=_Command, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", package_name="qwen2-audio-embeddings")
@flag_options(JobOptions, CommandOptions)
@click.option("--decode-fn", hidden=True, envvar=envvar("decode_fn"),
              help="module:function replacing the decoder (tests only: a decoder that really crashes or hangs).")
def extract(**kw) -> None:
    """Embed every audio of a manifest with Qwen2-Audio's audio tower (+ LoRA) into Parquet parts.

    Resumable: rerun the same command after any interruption; every row ends up exactly once in
    OUTPUT/embeddings/ or OUTPUT/_failures/. Every flag can also be set as an environment variable,
    EXTRACT_EMBEDDINGS_<FLAG> (e.g. EXTRACT_EMBEDDINGS_PART_ROWS=5000).

    Exit codes: 0 done, 1 unexpected (retry), 2 configuration error or broken install (never
    retry), 3 failure rate over the limit, 75 output busy (retry later), 130/143 interrupted
    (rerun resumes).
    """
    # First thing, before an engine's imports: a signal from here on is a graceful stop (a
    # KeyboardInterrupt would reach click, which exits 1 with "Aborted!").
    stop = StopSignal()
    with graceful_signals(stop):
        _extract(stop, kw)


def _extract(stop: StopSignal, kw: dict) -> None:
    configure(kw["log_level"], kw["log_format"])
    summary, code, error, opts = None, EXIT_OK, None, None
    summary_path = kw["summary_json"]
    try:
        cmd = options_from(CommandOptions, kw)
        if summary_path:
            _check_summary_path(summary_path)
        opts = options_from(JobOptions, kw)
        seams = _seams(kw["decode_fn"])
        if cmd.dry_run:
            from extractor.tools.dry_run import dry_run

            sys.exit(dry_run(opts, cmd.engine, cmd.devices))  # prints its report; writes nothing, a summary neither
        summary = _run(opts, cmd, stop, seams)
    except Interrupted as e:
        code, error = e.exit_code, f"stopped by {e}"
        logger.error("stopped at once by a second %s; committed parts are intact, rerun to resume", e)
    except Exception as e:
        code, error = exit_code_of(e), f"{type(e).__name__}: {e}"
        if isinstance(e, ImportError):
            error = broken_install(e)
            logger.error("%s", error)
        elif code == EXIT_UNEXPECTED:
            logger.exception("unexpected error; committed parts are intact, rerun to resume")
        else:
            logger.error("%s", e)
            if isinstance(e, _SummaryPathError):
                summary_path = None  # nowhere to write it
    except BaseException as e:
        if not _is_panic(e):
            raise
        code, error = EXIT_UNEXPECTED, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        logger.error("a native library panicked: %s; committed parts are intact, rerun to resume", error)
    if summary is not None:
        code = _outcome(summary, opts, code)
    if summary_path:
        payload = dict(summary.to_json() if summary is not None else {"output": kw["output"]})
        payload.update(exit_code=code, error=error)
        failed = write_summary(summary_path, payload)
        if failed:
            # The run's outcome stands: a summary is a report on the run, not part of its output.
            logger.warning("could not write the summary to %s: %s; the exit code (%d) stands", summary_path, failed, code)
    sys.exit(code)


def _run(opts: JobOptions, cmd: CommandOptions, stop: StopSignal, seams: Seams):
    # Engines are imported here, not above: they bring torch.
    if cmd.devices:
        from extractor.engines.devices import run_on_devices

        return run_on_devices(opts, cmd.devices, stop, seams=seams)
    from extractor.engines import engine_named

    return engine_named(cmd.engine)(opts, stop=stop, seams=seams)


def _outcome(summary, opts: JobOptions, code: int) -> int:
    """The exit code of a run that returned its summary: interrupted, over the failure rate, or done."""
    if summary.interrupted:
        logger.warning("interrupted by %s: kept %d embedded and %d failed rows in committed parts; rerun the same command to resume",
                       summary.interrupted, summary.embedded, summary.failed, extra={"event": "interrupted"})
        if summary.interrupted == "stopped":
            return EXIT_UNEXPECTED
        return 128 + getattr(signal.Signals, summary.interrupted, signal.SIGTERM).value
    if summary.failure_rate > opts.max_failure_rate:
        logger.error("this run's failure rate %.2f%% (%d of %d rows) is over --max-failure-rate %.2f%%: see %s/_failures/",
                     100 * summary.failure_rate, summary.failed, summary.attempted, 100 * opts.max_failure_rate, summary.output)
        return EXIT_FAILURE_RATE
    return code


class _SummaryPathError(ConfigError):
    """--summary-json cannot be written: the run is refused, and there is no summary to write."""


def _check_summary_path(path: str) -> None:
    """Refuse, before anything is written, a summary that could not be written at the end: a run
    whose report is lost reads to a scheduler like one that never ran."""
    p = Path(path)
    folder = Path(os.path.abspath(path)).parent
    if p.is_dir():
        raise _SummaryPathError(f"--summary-json {path} is a directory")
    if p.exists():
        if not os.access(p, os.W_OK):
            raise _SummaryPathError(f"--summary-json {path} is not writable")
    elif not folder.is_dir():
        raise _SummaryPathError(f"--summary-json {path}: its folder {folder} does not exist or is not a folder")
    elif not os.access(folder, os.W_OK | os.X_OK):
        raise _SummaryPathError(f"--summary-json {path}: its folder {folder} is not writable")


def _seams(decode_fn: str | None) -> Seams:
    """The run's test seams: EXTRACTOR_TEST_HOOK=module:function for its events, --decode-fn for its decoder."""
    hook = os.environ.get(TEST_HOOK_ENV)
    if not hook and not decode_fn:
        return NONE
    return Seams(on_event=_resolve(hook, TEST_HOOK_ENV) if hook else None,
                 decode_fn=_resolve(decode_fn, "--decode-fn") if decode_fn else None)


def _resolve(spec: str, where: str):
    module, sep, name = spec.partition(":")
    if not (module and sep and name):
        raise ConfigError(f"{where} {spec!r}: expected module:function")
    try:
        return getattr(importlib.import_module(module), name)
    except (ModuleNotFoundError, AttributeError) as e:
        raise ConfigError(f"{where} {spec!r}: {e}") from e


def _is_panic(e: BaseException) -> bool:
    """A Rust library's panic (pyo3's PanicException, from polars, safetensors, ...): a
    BaseException that `except Exception` misses, told apart without importing those libraries."""
    return type(e).__name__ == "PanicException" and type(e).__module__ == "pyo3_runtime"
