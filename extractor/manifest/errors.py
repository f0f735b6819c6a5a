"""The one error of the manifest stage."""

from __future__ import annotations

from ..errors import ConfigError


class ManifestError(ConfigError):
    """The manifest cannot be used (exit 2); the message names the file, the row or column, and what was expected."""
