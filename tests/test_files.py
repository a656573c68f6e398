"""gateway/files.py: a write either replaces the file whole or leaves it as it was (and no temporary file), and a
directory that cannot be synced after the rename is reported, not mistaken for a failed write."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from gateway import files
from gateway.files import remove_durably, write_all, write_atomic


def test_write_atomic_replaces_the_file_with_its_mode(tmp_path: Path) -> None:
    path = tmp_path / "f.json"
    path.write_text("old")
    assert write_atomic(path, b"new", 0o600) is True
    assert path.read_bytes() == b"new" and path.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]


def test_a_write_that_fails_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "f.json"
    path.write_text("old")

    def half_then_full(fd: int, data: bytes) -> None:
        os.write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files, "write_all", half_then_full)
    with pytest.raises(OSError, match="No space left"):
        write_atomic(path, b"a longer new content")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]


def test_a_directory_that_cannot_be_synced_is_reported_after_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "f.json"
    path.write_text("old")
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    assert write_atomic(path, b"new") is False  # in place, not durable
    assert path.read_bytes() == b"new"
    assert "f.json is changed, but its directory could not be synced" in caplog.text
    caplog.clear()
    assert remove_durably(path) is True and not path.exists()
    assert "could not be synced" in caplog.text
    assert remove_durably(path) is False


def test_write_all_writes_what_a_short_write_left(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write

    def short(fd: int, data: Any) -> int:
        return real_write(fd, bytes(data)[:3])  # at most 3 bytes a call, as a pipe or a full disk may do

    monkeypatch.setattr(os, "write", short)
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    try:
        write_all(fd, b"0123456789")
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == b"0123456789"
