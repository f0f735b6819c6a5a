"""A decode function for DecodePool that also reports its worker's peak memory (issue 12).

Imported by the decode workers, so it imports nothing from the test suite: only the decoder
(and PyAV, so that loading FFmpeg is not counted as the request's memory).
"""

from __future__ import annotations

import av  # noqa: F401 - loaded before the baseline is taken

from extractor.audio.decode import DecodeRequest, decode_request


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def decode_reporting_peak_rss(request: DecodeRequest):
    """decode_request's blocks, then {"base_rss": bytes, "peak_rss": bytes} of this worker."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS: the peak is this request's
    except OSError:
        pass  # then VmHWM also covers earlier requests, which only makes the bound stricter
    base = _status_kb("VmRSS")
    yield from decode_request(request)
    yield {"base_rss": base << 10, "peak_rss": _status_kb("VmHWM") << 10}
