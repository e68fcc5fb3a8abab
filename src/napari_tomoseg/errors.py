"""Exceptions and warnings that every part of napari-tomoseg raises.

One base class lets the CLI and the widgets tell a user-facing problem (bad input, a
refused file) from a programming error, and print it without a traceback.
"""

from __future__ import annotations


class TomosegError(Exception):
    """A problem the user can fix; the message says what went wrong and what to do."""


class TomosegIOError(TomosegError, OSError):
    """A file could not be read or written (names the file and the reason)."""


class OutputExistsError(TomosegIOError):
    """A file to be written exists already and replacing it was not asked for."""

    def __init__(self, path: object, how: str = "allow overwriting explicitly") -> None:
        self.path = path
        super().__init__(f"{path} already exists; choose another name or {how}.")


class MissingVoxelSizeWarning(UserWarning):
    """The file has no usable voxel size (0 or 1.0 Angstrom); 1.0 is assumed."""


class TemporariesRemovedWarning(UserWarning):
    """Temporary files that killed writes had left behind were removed (the message lists
    them with their sizes)."""
