"""Writing and deleting files so that a power cut leaves the old state or the new one, never a mix."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


class NotDurable(OSError):
    """The new state is in place (renamed or deleted) but its directory entry may not have reached the disk: a
    power cut now could bring the old state back."""


def write_all(fd: int, data: bytes) -> None:
    """Write every byte of `data` to `fd` (os.write may write less than asked)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data` (file mode `mode`): a temporary file beside it, fsync, rename, fsync of the
    directory. OSError before the rename leaves `path` as it was (and no temporary file); NotDurable after it."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
        try:
            os.fchmod(fd, mode)
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def remove_durably(path: Path) -> bool:
    """Delete `path` so that the deletion survives a power cut; False when there was no such file. NotDurable when
    it is deleted but the directory could not be synced."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    _fsync_dir(path.parent)
    return True


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise NotDurable(e.errno, f"{directory}: the change is made but not synced to disk ({e.strerror})") from e
