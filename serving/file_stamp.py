"""What tells that a watched file was replaced or rewritten: the service reloads its model
file and its API keys file when their stamp changes."""

from __future__ import annotations

import os
from pathlib import Path

FileStamp = tuple[int, int, int]
"""(inode, size, modification time in nanoseconds)."""


def file_stamp(path: Path) -> FileStamp | None:
    """The stamp of ``path`` now; None when it is missing or cannot be read.

    A file moved into place (``nextbest export``, a keys file rewritten by ``create`` or
    ``revoke``) changes the inode, even within the modification time's resolution.
    """
    try:
        info = path.stat()
    except OSError:
        return None
    return stamp_of(info)


def stamp_of(info: os.stat_result) -> FileStamp:
    """The stamp of a file whose status is ``info`` (``os.stat`` or ``os.fstat``)."""
    return info.st_ino, info.st_size, info.st_mtime_ns
