"""Decoder hooks for `--decode-fn tests.hooks:crashy_decode`: decoders that really crash or hang.

The decode workers are started by multiprocessing's forkserver, which imports this module afresh
in every worker, so it must import nothing from the test suite but the code under test. The job's
subprocess needs the repository root on PYTHONPATH for `tests.hooks` to resolve.

A file whose name contains one of the markers below makes the worker misbehave the way native
decoders do on malformed input; any other file goes to the real decoder.
"""

from __future__ import annotations

import ctypes
import os
import resource
import sys
import time

from extractor.audio.decode import DecodeRequest, decode_request

SEGFAULT = "SEGFAULT"  # reads address 0: SIGSEGV, as a buggy libsndfile/FFmpeg build does
ABORT = "ABORT"  # abort(): SIGABRT, as a failed assert() in a C library does
HANG = "HANG"  # sleeps far past any decode timeout, as a decoder looping on a bad header does
HANG_SECONDS = 3600.0
# Address space a worker may add to what it has mapped at its first request, in bytes, from the
# job's environment: an allocation sized from a hostile header then fails visibly (MemoryError)
# instead of quietly succeeding on a big machine. Relative, because a CUDA build of torch maps
# gigabytes of address space at import.
AS_HEADROOM_VAR = "HOOK_WORKER_AS_HEADROOM"
_limited = False


def _limit_address_space() -> None:
    global _limited
    if not _limited and os.environ.get(AS_HEADROOM_VAR):
        with open("/proc/self/status") as f:
            mapped = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
        limit = mapped + int(os.environ[AS_HEADROOM_VAR])
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    _limited = True


def crashy_decode(request: DecodeRequest):
    """The real decoder, unless a file of the request is named to crash or hang it. Files before
    the marked one are decoded first, as a worker would, so what it had cut is sent (streamed)."""
    _limit_address_space()
    names = [os.path.basename(f.name) for f in request.files]
    if any(SEGFAULT in n for n in names):
        ctypes.string_at(0)
    if any(ABORT in n for n in names):
        os.abort()
    if any(HANG in n for n in names):
        time.sleep(HANG_SECONDS)
    return decode_request(request)


KILL_ME = "KILLME"  # decode_awaiting_a_kill: the worker on such a file waits to be killed from outside, once


def decode_awaiting_a_kill(request: DecodeRequest):
    """The real decoder; but the first worker given a file named KILL_ME says so (a flag
    `decoding-PID` in HOOK_DIR) and sleeps, for the test to SIGKILL it from outside as the OOM killer
    would. Once the test has left `killed-once`, the file decodes normally on any worker."""
    if any(KILL_ME in os.path.basename(f.name) for f in request.files) and not os.path.exists(_flag("killed-once")):
        open(_flag(f"decoding-{os.getpid()}"), "w").close()
        time.sleep(HANG_SECONDS)
    return decode_request(request)


def slow_decode(request: DecodeRequest):
    """The real decoder, after HOOK_DECODE_DELAY_S seconds (default 1) per request: a slow source."""
    time.sleep(float(os.environ.get("HOOK_DECODE_DELAY_S", "1")))
    return decode_request(request)


# --- run hooks: EXTRACTOR_TEST_HOOK=tests.hooks:<name>, with HOOK_DIR set to a folder ---------------
# The job calls extractor.hooks.point(name, **info) at fixed points; these make a test's race
# happen at exactly that point: they leave a file saying where the run is, and wait for the test.

HOOK_DIR = "HOOK_DIR"


def _flag(name: str) -> str:
    return os.path.join(os.environ[HOOK_DIR], name)


def _wait_for(name: str, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(_flag(name)):
        if time.monotonic() > deadline:
            raise RuntimeError(f"test hook: nobody released {name}")
        time.sleep(0.01)


def stop_after_first_commit(point: str, **info) -> None:
    """After the first committed part: say so, and wait (for the SIGKILL or signal the test sends)."""
    if point == "committed":
        open(_flag(f"committed-{os.getpid()}"), "w").close()
        _wait_for(f"release-{os.getpid()}")


def pause_at(point: str, **info) -> None:
    """At the point named by HOOK_PAUSE (once per process): say so, wait until released."""
    if point == os.environ.get("HOOK_PAUSE") and not os.path.exists(_flag(f"passed-{point}-{os.getpid()}")):
        open(_flag(f"at-{point}-{os.getpid()}"), "w").close()
        _wait_for(f"release-{os.getpid()}")
        open(_flag(f"passed-{point}-{os.getpid()}"), "w").close()


def decode_reporting_peak_rss(request: DecodeRequest):
    """decode_request, then one more message: this worker's peak RSS (bytes) before and after."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    yield from decode_request(request)
    yield {"rss_peak_before": before, "rss_peak_after": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def record_modules(point: str, **info) -> None:
    """At the end of a run (its markers written), list the modules the job process has imported."""
    if point == "marked":
        import json
        import sys

        with open(os.path.join(os.environ[HOOK_DIR], "modules.json"), "w") as f:
            json.dump(sorted(sys.modules), f)


# --- import holds: HOOK_HOLD_IMPORT=<module>, with HOOK_DIR set ---------------------------------
# A moment no run hook reaches: the command has started (click parsed the flags) and is importing
# its engine, before the engine installs its signal handlers. A zygote child of
# tests/test_reliability.py calls hold_import() before it runs the command.

HOLD_IMPORT = "HOOK_HOLD_IMPORT"


class _HoldImport:
    """A meta path finder that stops this process at its first import of one module."""

    def __init__(self, name: str):
        self.name = name

    def find_spec(self, fullname, path=None, target=None):
        if fullname == self.name:
            sys.meta_path.remove(self)
            open(_flag(f"importing-{fullname}-{os.getpid()}"), "w").close()
            _wait_for(f"release-{os.getpid()}")
        return None  # the regular finders import it


def hold_import(name: str) -> None:
    """At the first import of module `name`: say so, and wait until released."""
    sys.meta_path.insert(0, _HoldImport(name))


# --- counting reads: HOOK_COUNT_READS=1 with HOOK_DIR set, and EXTRACTOR_TEST_HOOK=tests.hooks:count_reads ----
# Every process that imports this module then records each read of the manifest and of the
# committed ids (a line "<what> <pid>" in HOOK_DIR/reads): a --devices worker imports it when it
# unpickles its seams, before it runs anything.


def _record_read(what: str) -> None:
    with open(_flag("reads"), "a") as f:
        f.write(f"{what} {os.getpid()}\n")


def _install_read_counters() -> None:
    import extractor.manifest.read as manifest_read
    import extractor.shard as shard
    from extractor.output.layout import OutputDir
    from extractor.output.storage import LocalStorage, ObjectStorage

    def counted(what, fn):
        def wrapper(*args, **kwargs):
            _record_read(what)
            return fn(*args, **kwargs)
        return wrapper

    manifest_read.read_manifest = shard.read_manifest = counted("manifest", manifest_read.read_manifest)
    shard.committed = counted("committed", shard.committed)
    OutputDir.read_ids = counted("ids", OutputDir.read_ids)
    for storage in (LocalStorage, ObjectStorage):  # every read of committed files' ids goes through one of these
        storage.read_parts = counted("ids", storage.read_parts)
        storage.read_tables = counted("ids", storage.read_tables)


def count_reads(point: str, **info) -> None:
    """The run hook of a read-counting run (the counting itself was installed at import): it
    records the model's load too, to show that the counters were there in every process."""
    if point == "loaded":
        _record_read("loaded")


if os.environ.get("HOOK_COUNT_READS"):
    _install_read_counters()


def slow_first_decoder(request: DecodeRequest):
    """The real decoder, but the first process to decode claims the flag `slow` (an exclusive
    create) and from then on sleeps HOOK_SLOW_S (default 1) per file: with --decode-workers 0 under
    --devices, that device worker is a slower device."""
    mine = _flag(f"slow-{os.getpid()}")
    if not os.path.exists(mine):
        try:
            os.close(os.open(_flag("slow"), os.O_CREAT | os.O_EXCL))
            open(mine, "w").close()
        except FileExistsError:
            pass
    if os.path.exists(mine):
        time.sleep(float(os.environ.get("HOOK_SLOW_S", "1")) * len(request.files))
    return decode_request(request)
