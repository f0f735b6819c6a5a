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
import time

from extractor.decode import DecodeRequest, decode_request

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
    _limit_address_space()
    name = os.path.basename(request.path)
    if SEGFAULT in name:
        ctypes.string_at(0)
    if ABORT in name:
        os.abort()
    if HANG in name:
        time.sleep(HANG_SECONDS)
    return decode_request(request)
