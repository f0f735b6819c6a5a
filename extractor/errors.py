"""What can end a run, and the exit code each means to a scheduler (the README's one table).

A retry policy reads the code: 2 and 3 never get better by retrying the same command, 75 does once
the other run is done, 1 and the signal codes resume where they stopped.
"""

from __future__ import annotations

import signal

EXIT_OK = 0  # every row embedded or recorded as failed, this run's failures within the limit
EXIT_UNEXPECTED = 1  # a crash: committed parts stay valid; retry (the rerun resumes)
EXIT_CONFIG = 2  # a configuration or input error, or a broken install, found before anything was written: never retry
EXIT_FAILURE_RATE = 3  # done, but this run's failure rate is over --max-failure-rate: look, don't retry
EXIT_BUSY = 75  # EX_TEMPFAIL (sysexits.h): a live run holds the output's shard: retry later
EXIT_SIGINT = 128 + signal.SIGINT  # 130: interrupted; what was embedded is committed, rerun resumes
EXIT_SIGTERM = 128 + signal.SIGTERM  # 143: likewise, for Kubernetes, Airflow and systemd


class ConfigError(Exception):
    """The command, its manifest, model, adapter or output cannot run as given (exit 2).

    Raised before anything is written: a refused run leaves the output as it found it.
    """

    exit_code = EXIT_CONFIG


class OutputBusy(Exception):
    """Another live run holds this shard of the output (exit 75: retry later)."""

    exit_code = EXIT_BUSY


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived; the run stopped taking work and kept what it had embedded.

    A BaseException, like KeyboardInterrupt: `except Exception` clean-up paths must not swallow it.
    """

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    def __reduce__(self):
        return type(self), (self.signum,)  # crosses to a --devices parent as itself

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def exit_code_of(error: BaseException) -> int:
    """The documented exit code for an error that ended a run."""
    if isinstance(error, ImportError):
        # A broken or partial install (a dependency missing, or an extra such as [ray]): the
        # same command in the same environment fails the same way, so it is configuration.
        return EXIT_CONFIG
    return getattr(error, "exit_code", EXIT_UNEXPECTED)
