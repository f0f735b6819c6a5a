"""`extract-embeddings`, the console script: the standard library only, until the command is imported.

A broken or partial install (a missing dependency, a wrong environment) shows up as an ImportError
while the command or its engine is imported. Retrying the same environment cannot help, so it is a
configuration error (exit 2, which schedulers do not retry), said in one line that names the
missing module, and written to --summary-json like every other outcome. For this module to catch
it, nothing above `main`'s import of the command may need a third-party package.

The command itself (flags, engines, exit codes) is jobs/extract_command.py.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence

ENV_PREFIX = "EXTRACT_EMBEDDINGS"  # every flag is also EXTRACT_EMBEDDINGS_<FLAG>, dashes as underscores
# extractor.options.CommandOptions.summary_json's flag and variable, read here without click or the
# library, which may be what failed to import (tests/jobs/test_extract.py checks that they agree).
SUMMARY_FLAG = "--summary-json"
OUTPUT_FLAG = "--output"
EXIT_CONFIG = 2  # extractor.errors.EXIT_CONFIG, which may not be importable here
PROG = "extract-embeddings"

logger = logging.getLogger(PROG)


def flag_value(flag: str, args: Sequence[str], environ: Mapping[str, str]) -> str | None:
    """A flag's value as click would take it (the last one given, else its environment variable),
    read without click: for the summary of a run that click refused or that could not start."""
    value = None
    for i, arg in enumerate(args):
        if arg == "--":
            break
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.partition("=")[2]
    if value is None:
        value = environ.get(f"{ENV_PREFIX}_{flag[2:].replace('-', '_').upper()}") or None
    return value


def write_summary(path: str, payload: dict) -> str | None:
    """Write the summary JSON; why it could not be written, or None."""
    try:
        with open(path, "w") as f:
            json.dump(payload, f, indent=2, default=str)
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    return None


def summary_of_refusal(args: Sequence[str], environ: Mapping[str, str], code: int, error: str) -> None:
    """The summary of a run refused before it began (click's usage errors, a broken install)."""
    path = flag_value(SUMMARY_FLAG, args, environ)
    if path:
        failed = write_summary(path, {"output": flag_value(OUTPUT_FLAG, args, environ), "exit_code": code, "error": error})
        if failed:
            logger.warning("could not write the summary to %s: %s", path, failed)


def broken_install(e: ImportError) -> str:
    """One line: what cannot be imported, where, and what to do about it."""
    missing = e.name or str(e)
    return (f"broken install: {sys.executable} cannot import {missing!r} ({e}); reinstall the job into this environment "
            "as the README says (`pip install .`; --engine ray needs the [ray] extra, s3:// the [s3] extra), "
            "or run the extract-embeddings of the environment that has it")


def main() -> None:
    args = sys.argv[1:]
    try:
        from jobs.extract_command import extract
    except ImportError as e:
        message = broken_install(e)
        sys.stderr.write(f"{PROG}: {message}\n")
        summary_of_refusal(args, os.environ, EXIT_CONFIG, message)
        code = EXIT_CONFIG
    else:
        try:
            extract.main(args)
            code = 0
        except SystemExit as e:  # click's standalone mode ends every run with sys.exit(code)
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    # Everything is committed, fsynced and the lock let go by now: skip the interpreter's teardown.
    # It costs seconds with torch and CUDA loaded (the tail an operator waits for), and tearing
    # down native libraries while their threads still run once aborted a finished run
    # ("terminate called without an active exception", exit -6).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def __getattr__(name: str):
    # The click command, for callers that invoke it themselves (click.testing): imported on
    # demand, so that the console script starts with the standard library alone.
    if name == "extract":
        from jobs.extract_command import extract

        return extract
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    main()
