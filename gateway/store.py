"""Durable state of the gateway: the event outbox, the points ledger and recent visits.

This is the only module that imports tinydb. TinyDB's own JSON storage rewrites the
whole file on every single insert (about 5 ms at 1,000 documents, 125 ms at 20,000),
so the store is shaped around group commit instead:

- every write (`put_events`, `ack_events`, `put_awards`, `put_visits`) changes the
  in-memory state at once and costs no I/O;
- `commit()` writes the whole state once, atomically: temp file in the same directory,
  fsync, rename over the target, fsync the directory. A crash at any moment leaves the
  previous commit intact; the runtime calls `commit()` once per tick.

Tables in the hot file `<data_dir>/visita.json`:

- ``outbox``: events not yet acknowledged by the broker, document id = seq;
- ``ledger``: awards, append-only, in insertion order;
- ``visits``: the newest finished visits (bounded);
- ``meta``: one document with ``last_seq``, so the sequence survives an empty outbox.

One process owns the data directory (an exclusive `flock` on it, released by the
kernel when the process dies); the dashboard reads through the gateway's objects.
The store is not thread-safe: call it from one thread (the runtime's loop).
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import heapq
import json
import logging
import os
import re
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tinydb import Storage, TinyDB
from tinydb.table import Document, Table

from gateway.model import (
    Award,
    Event,
    Visit,
    award_from_record,
    award_to_record,
    visit_from_record,
    visit_to_record,
)

__all__ = ["Store", "StoreError"]

_log = logging.getLogger("visita.store")

HOT_FILE = "visita.json"
"""Name of the hot file inside the data directory."""

_OUTBOX, _LEDGER, _VISITS, _META = "outbox", "ledger", "visits", "meta"
_META_DOC_ID = 1
_DAY_RE = re.compile(r"\d{4}-\d{2}-\d{2}")
_FIX = "pass --data-dir DIR or fix its permissions"


class StoreError(Exception):
    """The store cannot do its job; the message says what, where and the fix."""


class _CorruptFileError(Exception):
    """The hot file is not valid JSON or not the shape this module writes."""


def _write_all(fd: int, data: bytes) -> None:
    """Write every byte of `data` to `fd` (os.write may write less than asked)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _plain(rec: dict[str, Any], what: str) -> dict[str, Any]:
    """A deep copy of `rec` holding only JSON types, exactly as it will read back from disk.

    Done when a record is put rather than at commit, so a value that cannot be stored
    (a numpy integer, a set) fails the caller's `put_*` call instead of every later
    commit, and so a caller mutating an event's `data` dict afterwards cannot change
    what is stored.
    """
    try:
        copy: dict[str, Any] = json.loads(json.dumps(rec))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} is not JSON-safe and cannot be stored: {e}") from e
    return copy


class _AtomicJSONStorage(Storage):
    """TinyDB storage holding the database in memory and writing it only on `flush()`.

    This does the job of `CachingMiddleware` with an unbounded write cache (TinyDB's
    writes land in memory) plus an atomic file write, in one small typed class:
    CachingMiddleware would still flush by itself every 1,000 writes.
    """

    def __init__(self, path: str, *, dir_fd: int) -> None:
        super().__init__()
        self.path = Path(path)
        self.tmp_path = self.path.with_name(self.path.name + ".tmp")
        self._dir_fd = dir_fd
        self._data: dict[str, dict[str, Any]] | None = None
        self._dirty = False
        self._fragments: dict[str, tuple[dict[str, Any], str]] = {}
        self.writes = 0
        """Completed atomic file writes since open."""
        self.last_write_ms = 0.0
        """Duration of the last completed write (serialise, write, fsync, rename), ms."""
        self.size_bytes = 0
        """Size of the hot file as of the last load or write, bytes."""

    def load(self) -> dict[str, Any] | None:
        """Read the hot file into memory; None when there is none yet.

        Raises _CorruptFileError for anything that is not a JSON object of tables,
        and OSError when the file cannot be read at all.
        """
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            self._data, self._dirty, self._fragments, self.size_bytes = None, False, {}, 0
            return None
        self.size_bytes = len(raw)
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, ValueError) as e:
            # JSONDecodeError's message has a position only, never file content.
            raise _CorruptFileError(f"not valid JSON ({e})") from e
        if not isinstance(data, dict):
            raise _CorruptFileError(f"top level is a JSON {type(data).__name__}, expected an object")
        for name, table in data.items():
            if not isinstance(table, dict):
                raise _CorruptFileError(f"table {name!r} is not a JSON object")
        self._data, self._dirty, self._fragments = data, False, {}
        return data

    def discard(self) -> None:
        """Forget the loaded state (after the file was moved aside)."""
        self._data, self._dirty, self._fragments, self.size_bytes = None, False, {}, 0

    def read(self) -> dict[str, dict[str, Any]] | None:
        # TinyDB mutates the returned dict in place and hands it back to write().
        return self._data

    def write(self, data: dict[str, dict[str, Any]]) -> None:
        self._data = data
        self._dirty = True

    @property
    def dirty(self) -> bool:
        """True when memory holds changes that are not on disk yet."""
        return self._dirty

    def flush(self) -> bool:
        """Write the state atomically if it changed; True when a write happened.

        On failure the state stays dirty, so the next flush retries it, and the target
        file still holds the previous successful write.
        """
        if not self._dirty:
            return False
        t0 = time.perf_counter()
        payload = self._serialise()
        try:
            fd = os.open(self.tmp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                _write_all(fd, payload)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(self.tmp_path, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(self.tmp_path)
            raise
        # The rename is durable only once the directory entry itself reaches the disk.
        os.fsync(self._dir_fd)
        self._dirty = False
        self.writes += 1
        self.size_bytes = len(payload)
        self.last_write_ms = (time.perf_counter() - t0) * 1000.0
        return True

    def _serialise(self) -> bytes:
        """The state as compact JSON, serialising again only the tables that changed.

        TinyDB's `Table._update_table` replaces a table's dict with a new object on every
        operation, so a table whose dict is still the object serialised last time is
        unchanged and its text can be reused: a tick that only touches the outbox does
        not pay for serialising the whole ledger again.
        """
        parts: list[str] = []
        fragments: dict[str, tuple[dict[str, Any], str]] = {}
        for name, table in (self._data or {}).items():
            cached = self._fragments.get(name)
            if cached is None or cached[0] is not table:
                # ASCII-only output (json's default): encoding can never fail, whatever the strings.
                cached = (table, json.dumps(table, separators=(",", ":")))
            # Holding the dict itself, not its id(), keeps the `is` test sound: no id reuse.
            fragments[name] = cached
            parts.append(f"{json.dumps(name)}:{cached[1]}")
        self._fragments = fragments
        return ("{" + ",".join(parts) + "}").encode("ascii")

    def close(self) -> None:
        # Nothing to release: the file is opened only for the duration of a write, and
        # Store.close() commits before it closes TinyDB.
        pass


class Store:
    """The gateway's durable state in one hot file, written once per tick by `commit()`.

    Reads see buffered (uncommitted) changes. Writes are applied in memory at once and
    reach the disk at the next `commit()`, in one atomic write however many records
    changed. Indexes kept in memory (event id -> seq, award ids, visit ids) make ack,
    award dedupe and visit replacement O(1) lookups.
    """

    def __init__(self, data_dir: Path, *, recent_visits_limit: int = 5000) -> None:
        """Open (or create) the store in `data_dir`, recovering from an interrupted commit.

        Creates `data_dir` with mode 0700 when missing. A leftover temp file from a
        commit that never finished is deleted; a hot file that is not valid JSON or not
        the expected shape is renamed to ``visita.json.corrupt-<UTC timestamp>`` and the
        store starts empty. Raises StoreError when the directory cannot be created,
        written or locked.
        """
        if recent_visits_limit < 1:
            raise ValueError(f"recent_visits_limit = {recent_visits_limit}: must be at least 1")
        self._dir = Path(data_dir)
        self._path = self._dir / HOT_FILE
        self._limit = recent_visits_limit
        self._closed = False
        self._visits_trimmed = 0

        self._dir_fd = self._open_dir()
        try:
            self._recover_tmp()
            self._db = TinyDB(str(self._path), dir_fd=self._dir_fd, storage=_AtomicJSONStorage)
            disk = self._db.storage
            assert isinstance(disk, _AtomicJSONStorage)
            self._disk = disk
            self._outbox: Table = self._db.table(_OUTBOX)
            self._ledger: Table = self._db.table(_LEDGER)
            self._visits: Table = self._db.table(_VISITS)
            self._meta: Table = self._db.table(_META)
            self._load()
        except BaseException:
            self._release_dir()
            raise

    # ------------------------------------------------------------------ opening

    def _open_dir(self) -> int:
        """Create the data directory if needed, open it and take the single-writer lock."""
        d = self._dir
        try:
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        except FileExistsError as e:
            raise StoreError(f"data directory {d} exists but is not a directory; {_FIX}") from e
        except OSError as e:
            raise StoreError(f"data directory {d} cannot be created: {e.strerror}; {_FIX}") from e
        try:
            fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise StoreError(f"data directory {d} cannot be opened: {e.strerror}; {_FIX}") from e
        try:
            # Two writers would silently overwrite each other's commits.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            os.close(fd)
            raise StoreError(
                f"data directory {d} is in use by another Visita process; stop that gateway or pass --data-dir DIR"
            ) from e
        except OSError as e:
            os.close(fd)
            raise StoreError(f"data directory {d} cannot be locked: {e.strerror}; {_FIX}") from e
        return fd

    def _release_dir(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._dir_fd)  # closing the descriptor also drops the flock

    def _recover_tmp(self) -> None:
        """Delete a temp file left by an interrupted commit, then prove the directory is writable."""
        tmp = self._path.with_name(self._path.name + ".tmp")
        try:
            if os.path.lexists(tmp):
                # The target still holds the last commit that finished; the temp file is
                # a commit that never returned, so it is not state anyone was promised.
                os.unlink(tmp)
                _log.info("removed leftover temporary file %s from an interrupted commit", tmp)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            os.close(fd)
            os.unlink(tmp)
        except OSError as e:
            raise StoreError(f"data directory {self._dir} is not writable: {e.strerror}; {_FIX}") from e

    def _load(self) -> None:
        """Read the hot file and build the in-memory indexes; quarantine a corrupt file."""
        try:
            data = self._disk.load()
            self._build_indexes(data)
        except _CorruptFileError as e:
            self._quarantine(str(e))
            self._disk.discard()
            self._build_indexes(None)
        except OSError as e:
            raise StoreError(f"cannot read {self._path}: {e.strerror}; fix its permissions") from e
        # A smaller limit than last run trims at once (written at the next commit).
        self._trim_visits(new_docs={}, removed=[])

    def _quarantine(self, reason: str) -> None:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        target = self._path.with_name(f"{self._path.name}.corrupt-{stamp}")
        n = 1
        while os.path.lexists(target):  # never overwrite an earlier quarantined file
            target = self._path.with_name(f"{self._path.name}.corrupt-{stamp}-{n}")
            n += 1
        try:
            os.rename(self._path, target)
            os.fsync(self._dir_fd)
        except OSError as e:
            raise StoreError(
                f"{self._path} is corrupt ({reason}) and cannot be moved aside to {target}: "
                f"{e.strerror}; move it away by hand or {_FIX}"
            ) from e
        _log.warning("store file %s is unusable (%s); moved it to %s and starting empty", self._path, reason, target)

    def _build_indexes(self, data: dict[str, Any] | None) -> None:
        """Check every stored record and index it; raises _CorruptFileError on the first bad one."""
        tables: dict[str, Any] = data or {}
        self._outbox_seq: dict[str, int] = {}
        self._outbox_id: dict[int, str] = {}
        self._award_ids: set[str] = set()
        self._visit_doc: dict[str, int] = {}
        self._visit_by_doc: dict[int, tuple[str, float]] = {}
        last_seq = 0

        def docs(name: str) -> Iterable[tuple[int, dict[str, Any]]]:
            for key, rec in tables.get(name, {}).items():
                if not (isinstance(key, str) and key.isdigit() and isinstance(rec, dict)):
                    raise _CorruptFileError(f"table {name!r} has a malformed document {key!r}")
                yield int(key), rec

        def bad(name: str, doc_id: int, e: Exception) -> _CorruptFileError:
            # The exception's type only: its text could quote stored values.
            return _CorruptFileError(f"table {name!r} document {doc_id} is not a valid record ({type(e).__name__})")

        for doc_id, rec in docs(_OUTBOX):
            try:
                ev = Event.from_record(rec)
            except (KeyError, TypeError, ValueError) as e:
                raise bad(_OUTBOX, doc_id, e) from e
            if ev.seq != doc_id or ev.id in self._outbox_seq:
                raise _CorruptFileError(f"table {_OUTBOX!r} document {doc_id} does not match its seq or id")
            self._outbox_seq[ev.id] = doc_id
            self._outbox_id[doc_id] = ev.id
            last_seq = max(last_seq, doc_id)

        for doc_id, rec in docs(_LEDGER):
            try:
                award = award_from_record(rec)
            except (KeyError, TypeError, ValueError) as e:
                raise bad(_LEDGER, doc_id, e) from e
            self._award_ids.add(award.award_id)

        for doc_id, rec in docs(_VISITS):
            try:
                visit = visit_from_record(rec)
            except (KeyError, TypeError, ValueError) as e:
                raise bad(_VISITS, doc_id, e) from e
            if visit.ended is None or visit.visit_id in self._visit_doc:
                raise _CorruptFileError(f"table {_VISITS!r} document {doc_id} is open or a duplicate")
            self._visit_doc[visit.visit_id] = doc_id
            self._visit_by_doc[doc_id] = (visit.visit_id, visit.ended)

        for doc_id, rec in docs(_META):
            value = rec.get("last_seq")
            if doc_id != _META_DOC_ID or not isinstance(value, int) or value < 0:
                raise _CorruptFileError(f"table {_META!r} document {doc_id} is malformed")
            last_seq = max(last_seq, value)

        self._last_seq = last_seq
        self._next_visit_doc = max(self._visit_by_doc, default=0) + 1

    # ------------------------------------------------------------------ reads

    @property
    def path(self) -> Path:
        """The hot file, ``<data_dir>/visita.json``."""
        return self._path

    def pending_events(self) -> list[Event]:
        """The outbox: events put and not yet acknowledged, ascending seq."""
        self._require_open()
        docs = sorted(self._outbox.all(), key=lambda d: d.doc_id)
        # A deep copy of `data`: a caller changing a returned event must not reach the stored one.
        return [Event.from_record({**d, "data": copy.deepcopy(d["data"])}) for d in docs]

    def last_seq(self) -> int:
        """Highest seq ever put (0 for a new store); survives restarts and an empty outbox."""
        self._require_open()
        return self._last_seq

    def awards(self, since_day: str | None = None) -> list[Award]:
        """The ledger in insertion order; with `since_day` ("YYYY-MM-DD") only awards of that day or later."""
        self._require_open()
        if since_day is not None and not _DAY_RE.fullmatch(since_day):
            raise ValueError(f"since_day = {since_day!r}: must be a date written YYYY-MM-DD")
        out = (award_from_record(d) for d in self._ledger.all())
        # ISO dates compare correctly as strings.
        return [a for a in out if since_day is None or a.day >= since_day]

    def recent_visits(self, limit: int = 100) -> list[Visit]:
        """Up to `limit` finished visits, newest (by `ended`) first."""
        self._require_open()
        if limit <= 0:
            return []
        newest = heapq.nlargest(limit, self._visit_by_doc.items(), key=lambda kv: (kv[1][1], kv[0]))
        out: list[Visit] = []
        for doc_id, _ in newest:
            doc = self._visits.get(doc_id=doc_id)
            assert doc is not None  # the index and the table change together
            out.append(visit_from_record(doc))
        return out

    def diagnostics(self) -> dict[str, float | int]:
        """Figures for the CLI and dashboard: sizes, depths and commit cost."""
        return {
            "file_size_bytes": self._disk.size_bytes,
            "outbox_depth": len(self._outbox_seq),
            "ledger_size": len(self._award_ids),
            "recent_visits": len(self._visit_by_doc),
            "visits_trimmed": self._visits_trimmed,
            "last_seq": self._last_seq,
            "uncommitted": int(self._disk.dirty),
            "commits": self._disk.writes,
            "last_commit_ms": round(self._disk.last_write_ms, 3),
        }

    # ------------------------------------------------------------------ buffered writes

    def put_events(self, events: Iterable[Event]) -> None:
        """Add events to the outbox and raise `last_seq` to the highest seq among them.

        Every event must carry a seq (status events, seq None, are outside the durable
        stream: ValueError). Putting an event that is already pending is a no-op; a seq
        already pending under another event id is a ValueError. The call applies all
        events or, on error, none.
        """
        self._require_open()
        new: dict[int, Document] = {}
        new_ids: dict[str, int] = {}
        for ev in events:
            if ev.seq is None:
                raise ValueError(
                    f"event {ev.id} ({ev.type}) has seq None: only events of the durable stream go to the outbox"
                )
            if ev.seq < 0:
                raise ValueError(f"event {ev.id} ({ev.type}) has seq {ev.seq}: must be 0 or more")
            known = self._outbox_seq.get(ev.id, new_ids.get(ev.id))
            if known == ev.seq:
                continue
            if known is not None:
                raise ValueError(f"event {ev.id} is already pending with seq {known}, cannot put it with seq {ev.seq}")
            if ev.seq in self._outbox_id or ev.seq in new:
                other = self._outbox_id.get(ev.seq) or new[ev.seq]["id"]
                raise ValueError(f"seq {ev.seq} of event {ev.id} is already pending as event {other}")
            new[ev.seq] = Document(_plain(ev.to_record(), f"event {ev.id}"), doc_id=ev.seq)
            new_ids[ev.id] = ev.seq
        if not new:
            return
        self._outbox.insert_multiple(new.values())
        for event_id, seq in new_ids.items():
            self._outbox_seq[event_id] = seq
            self._outbox_id[seq] = event_id
        top = max(new)
        if top > self._last_seq:
            self._last_seq = top
            self._meta.upsert(Document({"last_seq": top}, doc_id=_META_DOC_ID))

    def ack_events(self, ids: Iterable[str]) -> int:
        """Remove acknowledged events from the outbox; returns how many were pending.

        Unknown ids (already acknowledged, or never put) are ignored.
        """
        self._require_open()
        if isinstance(ids, str):
            raise TypeError("ack_events takes an iterable of event ids, not a single string")
        seqs: list[int] = []
        for event_id in ids:
            seq = self._outbox_seq.pop(event_id, None)
            if seq is not None:
                del self._outbox_id[seq]
                seqs.append(seq)
        if seqs:
            self._outbox.remove(doc_ids=seqs)
        return len(seqs)

    def put_awards(self, awards: Iterable[Award]) -> int:
        """Append awards to the ledger; an award_id already present is ignored. Returns the number added."""
        self._require_open()
        added: list[dict[str, Any]] = []
        ids: list[str] = []
        for award in awards:
            if award.award_id in self._award_ids or award.award_id in ids:
                continue
            added.append(_plain(award_to_record(award), f"award {award.award_id}"))
            ids.append(award.award_id)
        if added:
            self._ledger.insert_multiple(added)
            self._award_ids.update(ids)
        return len(added)

    def put_visits(self, visits: Iterable[Visit]) -> None:
        """Store finished visits, keeping only the newest `recent_visits_limit` by `ended`.

        A visit_id already stored is replaced. The oldest visits beyond the limit are
        dropped and counted (`visits_trimmed` in `diagnostics()`). An open visit (ended
        None) is a ValueError; the call applies all visits or, on error, none.
        """
        self._require_open()
        batch: dict[str, tuple[Visit, dict[str, Any]]] = {}
        for v in visits:
            if v.ended is None:
                raise ValueError(f"visit {v.visit_id} is still open (ended None): only finished visits are stored")
            batch[v.visit_id] = (v, _plain(visit_to_record(v), f"visit {v.visit_id}"))
        if not batch:
            return
        removed: list[int] = []
        new_docs: dict[int, Document] = {}
        for visit_id, (v, rec) in batch.items():
            old = self._visit_doc.pop(visit_id, None)
            if old is not None:
                del self._visit_by_doc[old]
                removed.append(old)
            assert v.ended is not None
            doc_id = self._next_visit_doc
            self._next_visit_doc += 1
            new_docs[doc_id] = Document(rec, doc_id=doc_id)
            self._visit_doc[visit_id] = doc_id
            self._visit_by_doc[doc_id] = (visit_id, v.ended)
        self._trim_visits(new_docs, removed)

    def _trim_visits(self, new_docs: dict[int, Document], removed: list[int]) -> None:
        """Drop the oldest visits beyond the limit, then apply removals and inserts as one op each."""
        excess = len(self._visit_by_doc) - self._limit
        if excess > 0:
            oldest = heapq.nsmallest(excess, self._visit_by_doc.items(), key=lambda kv: (kv[1][1], kv[0]))
            for doc_id, (visit_id, _) in oldest:
                del self._visit_by_doc[doc_id]
                del self._visit_doc[visit_id]
                if new_docs.pop(doc_id, None) is None:
                    removed.append(doc_id)
            self._visits_trimmed += excess
        if removed:
            self._visits.remove(doc_ids=removed)
        if new_docs:
            self._visits.insert_multiple(new_docs.values())

    # ------------------------------------------------------------------ durability

    def commit(self) -> None:
        """Write everything changed since the last commit in one atomic write; nothing if unchanged.

        On failure (disk full, permissions) raises StoreError; the changes stay in
        memory and the next commit retries them, and the file keeps the last commit.
        """
        self._require_open()
        try:
            self._disk.flush()
        except OSError as e:
            raise StoreError(
                f"cannot write {self._path}: {e.strerror or e}; free disk space or fix the permissions of "
                f"{self._dir} (changes are kept in memory and retried at the next commit)"
            ) from e

    def close(self) -> None:
        """Commit, then release the file and the directory lock. Closing twice is harmless."""
        if self._closed:
            return
        try:
            self.commit()
        finally:
            self._closed = True
            self._db.close()
            self._release_dir()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _require_open(self) -> None:
        if self._closed:
            raise StoreError(f"store {self._path} is closed; open a new Store")
