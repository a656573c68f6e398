"""Writing and deleting files so that a power cut leaves the old state or the new one, never a mix."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

log = logging.getLogger("visita.files")


def write_all(fd: int, data: bytes) -> None:
    """Write every byte of `data` to `fd` (os.write may write less than asked)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> bool:
    """Replace `path` with `data` (file mode `mode`): a temporary file beside it, fsync, rename, fsync of the
    directory. OSError before the rename leaves `path` as it was (and no temporary file). After it the new content
    is in place whatever happens: False (logged) when the directory could not be synced, so that a power cut now
    could still bring the old content back; True when it is durable."""
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
    return _fsync_dir(path)


def remove_durably(path: Path) -> bool:
    """Delete `path` so that the deletion survives a power cut; False when there was no such file. OSError when it
    cannot be deleted; once deleted, a directory that cannot be synced is logged (as by `write_atomic`)."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    _fsync_dir(path)
    return True


def _fsync_dir(changed: Path) -> bool:
    try:
        fd = os.open(changed.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        log.warning(
            "%s is changed, but its directory could not be synced to disk (%s): a power cut now may undo it",
            changed,
            e.strerror,
        )
        return False
    return True
