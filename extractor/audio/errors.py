"""A problem with one file (or one segment of it): it becomes that row's failure record.

The pipeline records failures as `f"{type(e).__name__}: {e}"` for millions of files and nobody
will have a traceback, so every message names the problem and the file.
"""


class AudioError(Exception):
    """A problem with one file (or one segment of it); the message names the problem and the file."""


class DecodeError(AudioError):
    """The file is not audio we can decode: junk, truncated, no audio stream, NaN samples, ..."""


class TooLongError(AudioError):
    """The decoded audio is longer than max_duration_s."""


class SegmentError(AudioError):
    """A requested segment is invalid or lies outside the file."""


class TooShort(AudioError):
    """The audio is too short for one output frame of the encoder."""
