"""Is this a URL: the one answer every stage uses for manifests, audio sources and outputs.

A location is a URL when it names a scheme (`scheme://...`); `file://` URLs are local paths.
"""

from __future__ import annotations

import os


def is_url(location: str | os.PathLike) -> bool:
    """`s3://b/k`, `https://h/x`, `file:///a` (a path object never is)."""
    return isinstance(location, str) and "://" in location


def is_local(location: str | os.PathLike) -> bool:
    """A path on this machine: a plain path or a file:// URL."""
    return not is_url(location) or str(location).startswith("file://")


def local_path(location: str | os.PathLike) -> str:
    """The path of a local location (file:// removed)."""
    return os.fspath(location).removeprefix("file://")
