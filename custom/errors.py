"""User-facing errors: each names the file (when there is one) and what to do about it.

The command line prints these as one line and exits non-zero; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

from pathlib import Path


class HoloHistoError(Exception):
    """An error a user can act on. `str(err)` is the whole message."""


class SlideError(HoloHistoError):
    """A slide (or mask) file that cannot be opened or read."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class ConfigError(HoloHistoError):
    """A configuration, checkpoint or argument that does not fit."""
