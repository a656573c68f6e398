"""Durable state of the gateway: the event outbox (hot) and the history of awards and visits.

This is the only module that imports tinydb. TinyDB's own JSON storage rewrites the
whole file on every single insert (about 5 ms at 1,000 documents, 125 ms at 20,000),
so the store is shaped around that:

- every write (`put_events`, `ack_events`, `put_awards`, `put_visits`) changes the
  in-memory state at once and costs no I/O;
- `commit()` writes the small hot file once, atomically: temp file in the same
  directory, fsync, rename over the target, fsync the directory. A crash at any moment
  leaves the previous commit intact; the runtime calls `commit()` once per tick;
- history (awards and finished visits) does not live in the hot file. A new award or
  visit first goes to the hot file's ``journal`` table (so it is durable with the same
  atomic commit as the events that announce it); every `ROLL_EVERY` records, at close and
  at open, the journal is appended to per-day files ``history/YYYY-MM-DD.jsonl`` (one
  JSON record per line, fsynced) and only then cleared from the hot file. The hot file
  therefore holds the outbox plus at most a few hundred journal records, whatever the
  history: the cost of a commit does not grow with the ledger;
- opening reads the day files of the last INDEX_DAYS days (and older ones only as far as needed for
  `recent_visits_limit` visits, or named by the journal), so start-up does not grow with the history either;
- `retain(before_day)` deletes the day files of older days with the next commit (the runtime asks for it once a
  store-local day, after `storage.history_days`).

Tables in the hot file `<data_dir>/visita.json`:

- ``outbox.<n>``: events not yet acknowledged by the broker, document id = seq, in chunks of
  CHUNK seqs (n = seq // CHUNK; a single ``outbox`` table of an older file is split at open);
- ``journal``: awards and visits not yet appended to their day file;
- ``meta``: one document with ``last_seq``, so the sequence survives an empty outbox;
- ``kept``: one document with the runtime's state across restarts (`keep`: footfall's counts and what time the
  open visits are as of), written with the events it goes with;
- ``open_visits``: one document per open visit (`put_open_visits`), replaced when the visit changes, removed in
  the write that holds its end.

A crash between the append to a day file and the commit that clears the journal leaves a
record in both: the open finds it in the day file and drops it from the journal (records
are keyed by award_id / visit_id, so nothing is counted twice). A torn last line of a day
file (power lost during the append) is cut off at open; its record is still in the journal. An append a full
disk cuts short is cut off at once, so the retry starts on a line of its own.

The outbox has a size bound (`outbox_max`). Past it, pending events of the droppable types
are dropped, oldest first, in `DROP_ORDER` (``footfall.minute`` first, then ``zone.changed``);
visits and awards are never dropped (the bound is exceeded for them rather). Every drop is
counted per type (`diagnostics()["outbox_dropped"]`) and the first of a run is logged.

A full disk (ENOSPC, EDQUOT) does not stop the gateway: `commit()` returns False, the
changes stay in memory (under the same bound and drop policy, at `full_disk_outbox_max`),
the condition is logged once, and the first commit that succeeds again says so.
Events that are not committed yet are not handed out by `sendable()`: nothing is
published before it is on disk.

One process owns the data directory (an exclusive `flock` on it, released by the
kernel when the process dies); the dashboard reads through the gateway's objects.
The store is not thread-safe: call it from one thread (the runtime's loop); only `write_commit`, the
disk part of a commit, may run on another (the runtime's writer thread).
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import errno
import fcntl
import heapq
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from tinydb import Storage, TinyDB
from tinydb.table import Document, Table

from gateway.files import write_all
from gateway.model import (
    Award,
    Event,
    Visit,
    award_from_record,
    award_to_record,
    visit_from_record,
    visit_to_record,
)

__all__ = ["DROP_ORDER", "ROLL_EVERY", "PendingCommit", "Store", "StoreError"]

_log = logging.getLogger("visita.store")

HOT_FILE = "visita.json"
"""Name of the hot file inside the data directory."""
HISTORY_DIR = "history"
"""Folder of the per-day history files inside the data directory."""
ROLL_EVERY = 256
"""Journal records that trigger an append to the day files."""
ACK_COMMIT_S = 2.0
"""A commit whose only changes are acks writes at most this often, seconds: losing an ack in a
crash costs a QoS 1 duplicate (same id), never an event, and a large backlog drains without
rewriting the outbox at every tick."""
INDEX_DAYS = 7
"""Days of history, counted back from the newest day file, whose award ids and visits are read at open (older
files only as far as needed to hold `recent_visits_limit` visits, or for a journal record of their day). The points
engine reads the ledger it needs itself (`awards(since_day)`, at least 9 days) and never judges a visit older than
that (`ledger_since`): exactly-once is its work, and the award ids indexed here only refuse a second copy of a recent
award."""
DROP_ORDER = ("footfall.minute", "zone.changed")
"""Event types the outbox bound may drop, first to last. Visits and awards are never dropped."""

_OUTBOX, _JOURNAL, _META, _KEPT, _OPEN = "outbox", "journal", "meta", "kept", "open_visits"
_FOOTFALL = "footfall"
"""Where earlier versions kept the footfall state alone (read as the kept state's "footfall")."""
CHUNK = 1000
"""Events per outbox table (``outbox.<seq // CHUNK>``): a tick touches the newest chunk and the
oldest, and the storage reuses the JSON text of every other chunk, so a long backlog is not
serialised again at every commit."""
_LEGACY = ("ledger", "visits")  # tables of the single-file layout (before the history files)
_META_DOC_ID = 1
_DAY_RE = re.compile(r"\d{4}-\d{2}-\d{2}")
_DAY_FILE_RE = re.compile(r"(\d{4}-\d{2}-\d{2})\.jsonl")
_FIX = "pass --data-dir DIR or fix its permissions"
_FULL = (errno.ENOSPC, errno.EDQUOT)


class StoreError(Exception):
    """The store cannot do its job; the message says what, where and the fix."""


class StoreInUse(StoreError):
    """Another Visita process (a running gateway) holds the data directory."""


def lock_data_dir(d: Path) -> int:
    """Create the data directory `d` if needed (mode 0700), open it and take its single-writer lock.

    Returns the directory's descriptor; closing it releases the lock (so does the process's end). The lock is an
    exclusive `flock` on the directory: a running gateway holds it for as long as it runs, and whatever else writes
    the directory (`visita keys import`) takes it too. StoreInUse when another process holds it, StoreError when
    the directory cannot be created, opened or locked.
    """
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
        raise StoreInUse(
            f"data directory {d} is in use by another Visita process; stop that gateway or pass --data-dir DIR"
        ) from e
    except OSError as e:
        os.close(fd)
        raise StoreError(f"data directory {d} cannot be locked: {e.strerror}; {_FIX}") from e
    return fd


@contextlib.contextmanager
def holding_data_dir(d: Path) -> Iterator[None]:
    """Hold the data directory's single-writer lock (`lock_data_dir`) for the block: for writers other than the
    store, which must not write behind a running gateway's back."""
    fd = lock_data_dir(Path(d))
    try:
        yield
    finally:
        os.close(fd)


class _CorruptFileError(Exception):
    """The hot file is not valid JSON or not the shape this module writes."""


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
        self._docs: dict[str, dict[str, tuple[Any, str]]] = {}  # per table: key -> (document, its text)
        self.writes = 0
        """Completed atomic file writes since open."""
        self.last_write_ms = 0.0
        """Duration of the last completed write (write, fsync, rename, fsync of the directory), ms."""
        self.size_bytes = 0
        """Size of the hot file as of the last load or write, bytes."""

    def load(self) -> dict[str, Any] | None:
        """Read the hot file into memory; None when there is none yet.

        Raises _CorruptFileError for anything that is not a JSON object of tables (NUL bytes after a whole one are
        ignored), and OSError when the file cannot be read at all.
        """
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            self._data, self._dirty, self._fragments, self._docs, self.size_bytes = None, False, {}, {}, 0
            return None
        self.size_bytes = len(raw)
        whole = raw.rstrip(b"\0")
        if len(whole) < len(raw) and whole.endswith(b"}"):
            # A power cut can leave a file longer than what was written to it, the rest zeros. A complete document
            # before them (checked like any other below) is the last commit, whole; the next commit drops the zeros.
            _log.warning(
                "%s ends in %d NUL byte(s) (a power cut); the commit before them is whole and is used",
                self.path,
                len(raw) - len(whole),
            )
            raw = whole
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
        self._data, self._dirty, self._fragments, self._docs = data, False, {}, {}
        return data

    def discard(self) -> None:
        """Forget the loaded state (after the file was moved aside)."""
        self._data, self._dirty, self._fragments, self._docs, self.size_bytes = None, False, {}, {}, 0

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
        payload = self.prepare()
        if payload is None:
            return False
        try:
            ms = self.write_payload(payload)
        except BaseException:
            self.failed()
            raise
        self.written(len(payload), ms)
        return True

    def prepare(self) -> bytes | None:
        """The state to write as bytes (None when nothing changed), counted as written from now on.

        The caller then calls `write_payload` (on any thread) and `written` or, when that raised, `failed`.
        """
        if not self._dirty:
            return None
        self._dirty = False
        return self._serialise()

    def write_payload(self, payload: bytes) -> float:
        """Temp file, fsync, rename, fsync of the directory; the duration in ms. Touches no shared state,
        so it may run on a writer thread while the loop goes on changing the in-memory tables."""
        t0 = time.perf_counter()
        try:
            fd = os.open(self.tmp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                write_all(fd, payload)
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
        return (time.perf_counter() - t0) * 1000.0

    def written(self, size: int, ms: float) -> None:
        """A prepared payload of `size` bytes reached the disk."""
        self.writes += 1
        self.size_bytes = size
        self.last_write_ms = ms

    def failed(self) -> None:
        """A prepared payload did not reach the disk: write the state again at the next flush."""
        self._dirty = True

    def _serialise(self) -> bytes:
        """The state as compact JSON, serialising again only the tables that changed.

        TinyDB's `Table._update_table` replaces a table's dict with a new object on every
        operation, so a table whose dict is still the object serialised last time is
        unchanged and its text can be reused: a tick that only touches the outbox does
        not pay for serialising the whole ledger again.
        """
        parts: list[str] = []
        fragments: dict[str, tuple[dict[str, Any], str]] = {}
        docs: dict[str, dict[str, tuple[Any, str]]] = {}
        for name, table in (self._data or {}).items():
            cached = self._fragments.get(name)
            if cached is None or cached[0] is not table:
                cached = (table, self._table_text(name, table, docs))
            elif name in self._docs:
                docs[name] = self._docs[name]
            # Holding the dict itself, not its id(), keeps the `is` test sound: no id reuse.
            fragments[name] = cached
            parts.append(f"{json.dumps(name)}:{cached[1]}")
        self._fragments, self._docs = fragments, docs
        return ("{" + ",".join(parts) + "}").encode("ascii")

    def _table_text(self, name: str, table: dict[str, Any], docs: dict[str, dict[str, tuple[Any, str]]]) -> str:
        """One table as JSON. Outbox, journal and open-visit documents are only ever inserted and removed, never
        changed in place, and TinyDB keeps a document's dict across operations: their text is reused the same way
        (a check-in's commit encodes its own few events, not the thousand in the newest outbox chunk)."""
        # ASCII-only output (json's default): encoding can never fail, whatever the strings.
        if not (name in (_JOURNAL, _OPEN) or name.startswith(_OUTBOX + ".")):
            return json.dumps(table, separators=(",", ":"))
        old = self._docs.get(name, {})
        new: dict[str, tuple[Any, str]] = {}
        parts: list[str] = []
        for key, doc in table.items():
            hit = old.get(key)
            if hit is None or hit[0] is not doc:
                hit = (doc, f"{json.dumps(key)}:{json.dumps(doc, separators=(',', ':'))}")
            new[key] = hit
            parts.append(hit[1])
        docs[name] = new
        return "{" + ",".join(parts) + "}"

    def close(self) -> None:
        # Nothing to release: the file is opened only for the duration of a write, and
        # Store.close() commits before it closes TinyDB.
        pass


_SEQ_TEXT = re.compile(rb'"(?:last_)?seq"\s*:\s*(\d{1,16})(?![\d.eE])')
_SEQ_MAX = 2**53 - 10**9
"""Seqs stay below this: JSON consumers that read numbers as doubles keep every seq exact."""


def _seqs_in(path: Path) -> int:
    """The highest event seq (or `last_seq`) written anywhere in a hot file that does not parse, among plausible
    ones (garbage digits are not a seq); 0 when none."""
    try:
        raw = path.read_bytes()
    except OSError:
        return 0
    return max((n for m in _SEQ_TEXT.finditer(raw) if (n := int(m.group(1))) < _SEQ_MAX), default=0)


def _history_lines(docs: Iterable[dict[str, Any]]) -> dict[str, list[bytes]]:
    """Journal records as day-file lines, by day."""
    by_day: dict[str, list[bytes]] = {}
    for doc in docs:
        line = json.dumps({"kind": doc["kind"], "rec": doc["rec"]}, separators=(",", ":"))
        by_day.setdefault(doc["day"], []).append(line.encode("ascii") + b"\n")
    return by_day


@dataclass(slots=True)
class PendingCommit:
    """A commit between `Store.begin_commit` and `Store.finish_commit` (see `Store.commit`)."""

    payload: bytes | None
    """The hot file to write; None when it did not change."""
    seq: int
    """Events up to this seq are on disk once it is written."""
    history: dict[str, list[bytes]]
    """Day-file lines to append after the hot file (a roll of the journal), by day."""
    roll_ids: list[int]
    """Journal documents those lines are; dropped from the journal once appended."""
    pending: int = 0
    """Events waiting in the outbox as this payload holds them."""
    retain_from: str | None = None
    """Delete the day files of days before this one ("YYYY-MM-DD") after the write (`Store.retain`)."""
    ms: float = 0.0
    error: OSError | None = None
    roll_error: OSError | None = None
    deleted: int = 0
    """Day files deleted for `retain_from`."""
    retain_error: OSError | None = None


def _visit_day(ended: float) -> str:
    """The day file of a finished visit: the UTC date it ended."""
    return datetime.fromtimestamp(ended, UTC).strftime("%Y-%m-%d")


class Store:
    """The gateway's durable state: a small hot file written once per tick by `commit()`,
    and per-day history files appended to every `ROLL_EVERY` awards and visits.

    Reads see buffered (uncommitted) changes. Indexes kept in memory (event id -> seq,
    award ids, the newest visits) make ack, award dedupe and visit replacement O(1).
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        recent_visits_limit: int = 5000,
        outbox_max: int = 20_000,
        full_disk_outbox_max: int = 2_000,
    ) -> None:
        """Open (or create) the store in `data_dir`, recovering from an interrupted commit.

        Creates `data_dir` with mode 0700 when missing. A leftover temp file from a
        commit that never finished is deleted; a hot file that is not valid JSON or not
        the expected shape is renamed to ``visita.json.corrupt-<UTC timestamp>`` and the
        store starts empty. Raises StoreError when the directory cannot be created,
        written or locked.
        """
        if recent_visits_limit < 1:
            raise ValueError(f"recent_visits_limit = {recent_visits_limit}: must be at least 1")
        if outbox_max < 1 or full_disk_outbox_max < 1:
            raise ValueError("outbox_max and full_disk_outbox_max must be at least 1")
        self._dir = Path(data_dir)
        self._path = self._dir / HOT_FILE
        self._hist = self._dir / HISTORY_DIR
        self._limit = recent_visits_limit
        self._outbox_max = outbox_max
        self._full_max = full_disk_outbox_max
        self._closed = False
        self._visits_trimmed = 0
        self._dropped: dict[str, int] = {}
        self._drop_logged = False
        self._disk_full = False
        self._last_error = ""
        self._rolls = 0
        self._history_lines = 0
        self._retain_from: str | None = None  # asked for by `retain`, done by the next commit
        self._deleted_days = 0
        self._named_visits: dict[str, list[dict[str, Any]]] = {}
        """At open: the visits in the day files that the journal names, by day (`_in_history`)."""
        self._must_write = False  # changes that must be on disk before anything is published
        self._last_write = 0.0
        self._keep: Callable[[], dict[str, Any]] | None = None
        self._pending_on_disk = 0  # events waiting in the outbox as the hot file on disk holds them

        self._dir_fd = self._open_dir()
        try:
            self._recover_tmp()
            self._db = TinyDB(str(self._path), dir_fd=self._dir_fd, storage=_AtomicJSONStorage)
            disk = self._db.storage
            assert isinstance(disk, _AtomicJSONStorage)
            self._disk = disk
            self._journal: Table = self._db.table(_JOURNAL)
            self._open: Table = self._db.table(_OPEN)
            self._meta: Table = self._db.table(_META)
            self._load()
            self._pending_on_disk = len(self._outbox_seq)
            if self._open_bad:
                self._open.remove(doc_ids=self._open_bad)
        except BaseException:
            self._release_dir()
            raise

    # ------------------------------------------------------------------ opening

    def _open_dir(self) -> int:
        """Create the data directory if needed, open it and take the single-writer lock."""
        return lock_data_dir(self._dir)

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
            if e.errno in _FULL:
                # A full disk must not keep the gateway from starting: it runs, keeps
                # events in memory and writes them when space returns.
                self._note_full(e)
                return
            raise StoreError(f"data directory {self._dir} is not writable: {e.strerror}; {_FIX}") from e

    def _load(self) -> None:
        """Read the hot file and the history, build the in-memory indexes; quarantine a corrupt hot file."""
        try:
            data = self._disk.load()
            self._build_indexes(data)
        except _CorruptFileError as e:
            found = _seqs_in(self._path)
            self._quarantine(str(e))
            self._disk.discard()
            self._build_indexes(None)
            self._go_on_after(found)
        except OSError as e:
            raise StoreError(f"cannot read {self._path}: {e.strerror}; fix its permissions") from e
        self._load_history()
        if self._unchunked or _OUTBOX in self._db.tables():
            self._db.drop_table(_OUTBOX)
            self._insert_events({d.doc_id: d for d in self._unchunked})
            self._unchunked.clear()
        if self._legacy or any(name in self._db.tables() for name in _LEGACY):
            fresh = [d for d in self._legacy if not self._in_history(d)]
            if fresh:
                self._journal.insert_multiple(fresh)
            for name in _LEGACY:
                self._db.drop_table(name)
            _log.info("moved %d award(s) and visit(s) from %s to the history files", len(fresh), self._path)
            self._legacy.clear()
        # Journal records already in a day file (a crash after the append, before the commit
        # that clears the journal) are dropped from the journal; the rest are appended now.
        stale = [doc.doc_id for doc in self._journal.all() if self._in_history(doc)]
        if stale:
            self._journal.remove(doc_ids=stale)
        self._named_visits.clear()
        for doc in self._journal.all():
            self._index_history(doc["kind"], doc["rec"])
        self._roll()

    def _go_on_after(self, found: int) -> None:
        """After a hot file that could not be used: never publish a seq again for another event. The highest seq
        still readable in it, plus as many as the outbox can hold (the events of the part that could not be read
        had at most that many), is where the sequence goes on: a gap, never a number used twice."""
        if not found:
            _log.error(
                "no event seq could be read from the unusable store file: seqs start at 1 again, so the backend will "
                "see numbers it has seen before, for other events (ids stay unique)"
            )
            return
        self._last_seq = self._committed_seq = found + self._outbox_max
        self._meta.upsert(Document({"last_seq": self._last_seq}, doc_id=_META_DOC_ID))
        self._must_write = True
        _log.warning(
            "events go on from seq %d: the highest readable in the unusable file was %d, and up to %d more may have "
            "been in the part that was not (a gap, never a seq used twice)",
            self._last_seq + 1,
            found,
            self._outbox_max,
        )

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
        """Check every hot record and index it; raises _CorruptFileError on the first bad one."""
        tables: dict[str, Any] = data or {}
        self._outbox_seq: dict[str, int] = {}
        self._outbox_id: dict[int, str] = {}
        self._order: list[int] = []  # pending seqs, ascending; may hold acked ones (lazy delete)
        self._droppable: dict[str, dict[int, None]] = {t: {} for t in DROP_ORDER}
        self._committed_seq = 0  # events up to this seq are on disk
        self._award_ids: set[str] = set()
        self._visits_heap: list[tuple[float, str]] = []  # (ended, visit_id), the newest `limit`
        self._visits: dict[str, dict[str, Any]] = {}
        last_seq = 0

        def docs(name: str) -> Iterable[tuple[int, dict[str, Any]]]:
            for key, rec in tables.get(name, {}).items():
                if not (isinstance(key, str) and key.isdigit() and isinstance(rec, dict)):
                    raise _CorruptFileError(f"table {name!r} has a malformed document {key!r}")
                yield int(key), rec

        def bad(name: str, doc_id: int, e: Exception) -> _CorruptFileError:
            # The exception's type only: its text could quote stored values.
            return _CorruptFileError(f"table {name!r} document {doc_id} is not a valid record ({type(e).__name__})")

        self._chunk_count: dict[int, int] = {}
        self._unchunked: list[Document] = []  # events in the single "outbox" table of the previous layout
        for name in [n for n in tables if n == _OUTBOX or n.startswith(_OUTBOX + ".")]:
            chunk = None if name == _OUTBOX else name.removeprefix(_OUTBOX + ".")
            if chunk is not None and not chunk.isdigit():
                raise _CorruptFileError(f"table {name!r} is not an outbox chunk")
            for doc_id, rec in docs(name):
                try:
                    ev = Event.from_record(rec)
                except (KeyError, TypeError, ValueError) as e:
                    raise bad(name, doc_id, e) from e
                if ev.seq != doc_id or ev.id in self._outbox_seq or doc_id in self._outbox_id:
                    raise _CorruptFileError(f"table {name!r} document {doc_id} does not match its seq or id")
                if chunk is None:
                    self._unchunked.append(Document(rec, doc_id=doc_id))
                elif int(chunk) != doc_id // CHUNK:
                    raise _CorruptFileError(f"table {name!r} document {doc_id} is in the wrong chunk")
                else:
                    self._chunk_count[doc_id // CHUNK] = self._chunk_count.get(doc_id // CHUNK, 0) + 1
                self._outbox_seq[ev.id] = doc_id
                self._outbox_id[doc_id] = ev.id
                if ev.type in self._droppable:
                    self._droppable[ev.type][doc_id] = None
                last_seq = max(last_seq, doc_id)
        self._order = sorted(self._outbox_id)
        for t in DROP_ORDER:
            self._droppable[t] = dict.fromkeys(sorted(self._droppable[t]))

        for doc_id, rec in docs(_JOURNAL):
            try:
                kind, body = rec["kind"], rec["rec"]
                if kind == "award":
                    award_from_record(body)
                elif kind == "visit":
                    if visit_from_record(body).ended is None:
                        raise ValueError("open visit")
                else:
                    raise ValueError(kind)
            except (KeyError, TypeError, ValueError) as e:
                raise bad(_JOURNAL, doc_id, e) from e

        # A hot file of the previous layout kept the ledger and the visits in it: they are
        # checked here and moved to the journal (then the day files) by `_load`.
        self._legacy: list[dict[str, Any]] = []
        for name in _LEGACY:
            for doc_id, rec in docs(name):
                try:
                    if name == "ledger":
                        a = award_from_record(rec)
                        self._legacy.append({"kind": "award", "day": a.day, "rec": rec})
                    else:
                        v = visit_from_record(rec)
                        if v.ended is None:
                            raise ValueError("open visit")
                        self._legacy.append({"kind": "visit", "day": _visit_day(v.ended), "rec": rec})
                except (KeyError, TypeError, ValueError) as e:
                    raise bad(name, doc_id, e) from e

        self._kept: dict[str, Any] | None = None  # as on disk (or about to be)
        self._legacy_footfall = _FOOTFALL in tables
        self._open_ids: dict[str, int] = {}  # visit id -> its document in the open-visits table
        self._open_bad: list[int] = []  # documents that are not open visits, removed once the tables are open
        for doc_id, rec in docs(_OPEN):  # state too: a bad one is dropped, with a warning
            visit = rec.get("visit")
            if isinstance(visit, dict) and isinstance(visit.get("visit_id"), str):
                self._open_ids[visit["visit_id"]] = doc_id
            else:
                _log.warning("open visit document %d in %s is malformed; dropped", doc_id, self._path)
                self._open_bad.append(doc_id)
        for name in (_FOOTFALL, _KEPT):  # state, not records: a bad one is not worth the hot file
            for doc_id, rec in docs(name):
                if doc_id == 1 and isinstance(rec.get("state"), dict):
                    self._kept = {"footfall": rec["state"]} if name == _FOOTFALL else rec["state"]
                else:
                    _log.warning(
                        "the state kept in %s is malformed; today's counts and open visits start afresh", self._path
                    )

        for doc_id, rec in docs(_META):
            value = rec.get("last_seq")
            if doc_id != _META_DOC_ID or not isinstance(value, int) or value < 0:
                raise _CorruptFileError(f"table {_META!r} document {doc_id} is malformed")
            last_seq = max(last_seq, value)

        self._last_seq = last_seq
        self._committed_seq = last_seq

    # ------------------------------------------------------------------ history files

    def history_days(self) -> list[str]:
        """Days ("YYYY-MM-DD") with a history file, oldest first."""
        self._require_open()
        return [day for day, _ in self._day_files()]

    def _day_files(self) -> list[tuple[str, Path]]:
        """(day, path) of every history file, oldest day first."""
        try:
            names = os.listdir(self._hist)
        except FileNotFoundError:
            return []
        except OSError as e:
            raise StoreError(f"cannot read {self._hist}: {e.strerror}; fix its permissions") from e
        out = [(m.group(1), self._hist / n) for n in names if (m := _DAY_FILE_RE.fullmatch(n))]
        return sorted(out)

    def _read_day(self, path: Path, *, repair: bool = False) -> Iterator[tuple[str, dict[str, Any]]]:
        """(kind, record) of every good line of a day file; a torn last line is cut off when `repair`. None of a file
        that is gone (retention deleted it on the writer thread since the directory was listed)."""
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as e:
            raise StoreError(f"cannot read {path}: {e.strerror}; fix its permissions") from e
        end = raw.rfind(b"\n") + 1
        if end < len(raw) and repair:
            # Power lost in the middle of an append: the torn record is still in the journal.
            with open(path, "r+b") as f:
                f.truncate(end)
                os.fsync(f.fileno())
            _log.info("cut a torn last record off %s (power lost during an append; it is in the journal)", path)
        for n, line in enumerate(raw[:end].splitlines(), 1):
            try:
                doc = json.loads(line)
                kind, rec = doc["kind"], doc["rec"]
                if kind == "award":
                    award_from_record(rec)
                elif kind == "visit":
                    visit_from_record(rec)
                else:
                    raise ValueError(kind)
            except (KeyError, TypeError, ValueError, UnicodeDecodeError) as e:
                _log.warning("%s line %d is not a valid record (%s); skipped", path, n, type(e).__name__)
                continue
            yield kind, rec

    def _load_history(self) -> None:
        """Index the recent day files (INDEX_DAYS, else as many as `recent_visits_limit` visits need) and those the
        journal names; cut a torn last line off any day file."""
        files = self._day_files()
        if not files:
            return
        named = {d["day"] for d in self._journal.all()} | {d["day"] for d in self._legacy}
        first = (date.fromisoformat(files[-1][0]) - timedelta(days=INDEX_DAYS)).isoformat()
        chosen: list[list[tuple[str, dict[str, Any]]]] = []
        visits = 0
        for day, path in reversed(files):
            if day >= first or visits < self._limit or day in named:
                records = list(self._read_day(path, repair=True))
                visits += sum(kind == "visit" for kind, _ in records)
                chosen.append(records)
                if day in named:
                    self._named_visits[day] = [rec for kind, rec in records if kind == "visit"]
            else:
                self._repair_tail(path)
        for records in reversed(chosen):  # oldest first: of two records of one visit, the later one wins
            for kind, rec in records:
                self._index_history(kind, rec)
            self._history_lines += len(records)

    def _repair_tail(self, path: Path) -> None:
        """Cut a torn last line off a day file that is not read at open (the next append would join it)."""
        try:
            with open(path, "rb") as f:
                f.seek(0, os.SEEK_END)
                if f.tell() == 0:
                    return
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
        except OSError as e:
            raise StoreError(f"cannot read {path}: {e.strerror}; fix its permissions") from e
        if torn:
            for _ in self._read_day(path, repair=True):
                pass

    def _index_history(self, kind: str, rec: dict[str, Any]) -> None:
        if kind == "award":
            self._award_ids.add(str(rec["award_id"]))
            return
        visit_id, ended = str(rec["visit_id"]), float(rec["ended"])
        old = self._visits.get(visit_id)
        if old is not None:
            # Replaced: the newer record wins; the heap entry of the old one is dropped lazily.
            self._visits[visit_id] = rec
            if float(old["ended"]) != ended:
                heapq.heappush(self._visits_heap, (ended, visit_id))
        else:
            self._visits[visit_id] = rec
            heapq.heappush(self._visits_heap, (ended, visit_id))
        self._trim_visits()

    def _trim_visits(self) -> None:
        while len(self._visits) > self._limit:
            ended, visit_id = heapq.heappop(self._visits_heap)
            rec = self._visits.get(visit_id)
            if rec is not None and float(rec["ended"]) == ended:
                del self._visits[visit_id]
                self._visits_trimmed += 1
        if len(self._visits_heap) > 2 * self._limit + 64:
            # Compact the stale entries of replaced visits.
            self._visits_heap = [(float(r["ended"]), v) for v, r in self._visits.items()]
            heapq.heapify(self._visits_heap)

    def _in_history(self, doc: dict[str, Any]) -> bool:
        """At open: whether a journal (or legacy) record is in its day file already."""
        rec = doc["rec"]
        if doc["kind"] == "award":
            return str(rec["award_id"]) in self._award_ids
        return rec in self._named_visits.get(doc["day"], ())

    def _roll(self) -> bool:
        """Append the journal to the day files (fsynced) and clear it from memory; True when done.

        The hot file still holds the journal until the next commit, so a crash before
        that commit leaves the records in both places, which `_load` resolves.
        """
        docs = self._journal.all()
        if not docs or self._disk_full:
            return False
        history = _history_lines(docs)
        return self._rolled([d.doc_id for d in docs], self._append_history(history))

    def _append_history(self, history: dict[str, list[bytes]]) -> OSError | None:
        """Append lines to their day files, fsynced; the error instead of raising it. Touches no shared
        state (the writer thread calls it during a commit)."""
        try:
            created = not self._hist.exists()
            self._hist.mkdir(mode=0o700, exist_ok=True)
            if created:
                os.fsync(self._dir_fd)
            hist_fd = os.open(self._hist, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                for day, lines in sorted(history.items()):
                    fd = os.open(
                        self._hist / f"{day}.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600
                    )
                    try:
                        size = os.fstat(fd).st_size
                        try:
                            write_all(fd, b"".join(lines))
                            os.fsync(fd)
                        except OSError:
                            # A full disk takes part of an append: cut it off, or the retry's first line would be
                            # joined to the torn one and neither read back (the records stay in the journal).
                            with contextlib.suppress(OSError):
                                os.ftruncate(fd, size)
                            raise
                    finally:
                        os.close(fd)
                os.fsync(hist_fd)
            finally:
                os.close(hist_fd)
        except OSError as e:
            return e
        return None

    def _delete_days(self, before: str) -> int:
        """Delete the day files of days before `before`; how many. Touches no shared state (the writer thread calls
        it during a commit, after that commit's appends: never while a day file is being appended to)."""
        gone = 0
        try:
            names = os.listdir(self._hist)
        except FileNotFoundError:
            return 0
        for name in names:
            if (m := _DAY_FILE_RE.fullmatch(name)) and m.group(1) < before:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._hist / name)
                    gone += 1
        if gone:
            hist_fd = os.open(self._hist, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(hist_fd)
            finally:
                os.close(hist_fd)
        return gone

    def _rolled(self, doc_ids: list[int], error: OSError | None) -> bool:
        """After `_append_history`: drop the appended records from the journal, or report why not."""
        if error is not None:
            if error.errno in _FULL:
                self._note_full(error)
                return False
            raise StoreError(
                f"cannot append to {self._hist}: {error.strerror}; fix the permissions of {self._dir} "
                "(the records stay in the hot file's journal and are retried)"
            ) from error
        self._journal.remove(doc_ids=doc_ids)
        self._rolls += 1
        self._history_lines += len(doc_ids)
        return True

    # ------------------------------------------------------------------ reads

    @property
    def path(self) -> Path:
        """The hot file, ``<data_dir>/visita.json``."""
        return self._path

    @property
    def disk_full(self) -> bool:
        """True while the last write failed for want of space."""
        return self._disk_full

    def pending_events(self) -> list[Event]:
        """The outbox: events put and not yet acknowledged, ascending seq."""
        self._require_open()
        docs = sorted((d for c in sorted(self._chunk_count) for d in self._chunk(c).all()), key=lambda d: d.doc_id)
        # A deep copy of `data`: a caller changing a returned event must not reach the stored one.
        return [Event.from_record({**d, "data": copy.deepcopy(d["data"])}) for d in docs]

    def sendable(self, after_seq: int, limit: int) -> list[Event]:
        """Up to `limit` pending events with seq > `after_seq`, ascending, that are on disk already.

        This is how the uplink is fed: the backlog first, in seq order, then new events.
        """
        self._require_open()
        out: list[Event] = []
        i = bisect.bisect_right(self._order, after_seq)
        while i < len(self._order) and len(out) < limit:
            seq = self._order[i]
            i += 1
            if seq > self._committed_seq:
                break
            if seq not in self._outbox_id:
                continue
            doc = self._chunk(seq // CHUNK).get(doc_id=seq)
            assert doc is not None  # the index and the table change together
            out.append(Event.from_record({**doc, "data": copy.deepcopy(doc["data"])}))
        return out

    def last_seq(self) -> int:
        """Highest seq ever put (0 for a new store); survives restarts and an empty outbox."""
        self._require_open()
        return self._last_seq

    def retain(self, before_day: str) -> None:
        """Delete the history of the days before `before_day` ("YYYY-MM-DD"): its day files go with the next commit
        (on the thread that writes, after that commit's appends), and its visits leave the recent visits then.

        Records still in the journal for those days are appended with a later roll and deleted the next time."""
        self._require_open()
        if not _DAY_RE.fullmatch(before_day):
            raise ValueError(f"before_day = {before_day!r}: must be a date written YYYY-MM-DD")
        self._retain_from = before_day
        self._must_write = True

    def awards(self, since_day: str | None = None) -> list[Award]:
        """The ledger, oldest day first; with `since_day` ("YYYY-MM-DD") only awards of that day or later.

        Reads the day files (only those of `since_day` or later) and the journal.
        """
        self._require_open()
        if since_day is not None and not _DAY_RE.fullmatch(since_day):
            raise ValueError(f"since_day = {since_day!r}: must be a date written YYYY-MM-DD")
        seen: set[str] = set()
        out: list[Award] = []
        recs = [
            rec
            for day, path in self._day_files()
            if since_day is None or day >= since_day
            for kind, rec in self._read_day(path)
            if kind == "award"
        ]
        recs += [d["rec"] for d in self._journal.all() if d["kind"] == "award"]
        for rec in recs:
            a = award_from_record(rec)
            # ISO dates compare correctly as strings.
            if a.award_id not in seen and (since_day is None or a.day >= since_day):
                seen.add(a.award_id)
                out.append(a)
        return out

    def recent_visits(self, limit: int = 100) -> list[Visit]:
        """Up to `limit` finished visits, newest (by `ended`) first."""
        self._require_open()
        if limit <= 0:
            return []
        return _newest(self._visits.items(), limit)

    def visits_of(self, subject: str, limit: int = 100) -> list[Visit]:
        """Up to `limit` finished visits of one subject (e.g. "member:<ref>"), newest (by `ended`) first; from the
        recent visits the store keeps (`recent_visits_limit`)."""
        self._require_open()
        return _newest((kv for kv in self._visits.items() if kv[1]["subject"] == subject), max(0, limit))

    def diagnostics(self) -> dict[str, Any]:
        """Figures for the CLI and dashboard: sizes, depths, drops and commit cost."""
        return {
            "file_size_bytes": self._disk.size_bytes,
            "outbox_depth": len(self._outbox_seq),
            "outbox_max": self._outbox_max,
            "outbox_dropped": dict(self._dropped),
            "journal": len(self._journal),
            "ledger_size": len(self._award_ids),
            "history_records": self._history_lines,
            "history_rolls": self._rolls,
            "history_days_deleted": self._deleted_days,
            "recent_visits": len(self._visits),
            "visits_trimmed": self._visits_trimmed,
            "last_seq": self._last_seq,
            "uncommitted": int(self._disk.dirty),
            "disk_full": self._disk_full,
            "last_error": self._last_error,
            "commits": self._disk.writes,
            "last_commit_ms": round(self._disk.last_write_ms, 3),
        }

    # ------------------------------------------------------------------ buffered writes

    def put_events(self, events: Iterable[Event]) -> None:
        """Add events to the outbox and raise `last_seq` to the highest seq among them.

        Every event must carry a seq (status events, seq None, are outside the durable
        stream: ValueError). Putting an event that is already pending is a no-op; a seq
        already pending under another event id is a ValueError. The call applies all
        events or, on error, none. Past the outbox bound, droppable events are dropped
        (see the module docstring).
        """
        self._require_open()
        new: dict[int, Document] = {}
        new_ids: dict[str, int] = {}
        types: dict[int, str] = {}
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
            types[ev.seq] = ev.type
        if not new:
            return
        self._insert_events(new)
        for event_id, seq in new_ids.items():
            self._outbox_seq[event_id] = seq
            self._outbox_id[seq] = event_id
        for seq in sorted(new):
            if self._order and seq < self._order[-1]:
                bisect.insort(self._order, seq)
            else:
                self._order.append(seq)
            if types[seq] in self._droppable:
                self._droppable[types[seq]][seq] = None
        self._must_write = True
        top = max(new)
        if top > self._last_seq:
            self._last_seq = top
            self._meta.upsert(Document({"last_seq": top}, doc_id=_META_DOC_ID))
        self._enforce_bound()

    def keep(self, provider: Callable[[], dict[str, Any]]) -> None:
        """What the runtime keeps across restarts and power losses (today's footfall counts, what time the open
        visits of `put_open_visits` are as of).

        `provider` is asked at every write that happens anyway (new events make one; the footfall minute at least
        once a minute) and at `close`, and its answer goes into that same atomic write, with the events it goes
        with: a restart reads a state that matches the events on disk. It costs no write of its own.
        """
        self._require_open()
        self._keep = provider

    def put_open_visits(self, visits: Sequence[dict[str, Any]], ended: Iterable[str]) -> None:
        """Keep these open visits (each a dict with its `visit_id`, as VisitTracker.take_kept gives them; one kept
        before under the same id is replaced) and forget the `ended` ones. They are written with the next commit,
        together with the events of those starts and ends: a restart reads the visits that were open as of the
        events on disk (`open_visits`)."""
        self._require_open()
        docs = {v["visit_id"]: _plain({"visit": v}, f"open visit {v['visit_id']}") for v in visits}
        gone = [i for vid in {*ended, *docs} if (i := self._open_ids.pop(vid, None)) is not None]
        if gone:
            self._open.remove(doc_ids=gone)
        if docs:
            ids = self._open.insert_multiple(docs.values())
            self._open_ids.update(zip(docs, ids, strict=True))
        if gone or docs:
            self._must_write = True

    def open_visits(self) -> list[dict[str, Any]]:
        """The open visits kept by `put_open_visits` (at start: as of the last write before the restart)."""
        return [self._open.get(doc_id=i)["visit"] for i in self._open_ids.values()]  # type: ignore[index]

    def keep_now(self) -> None:
        """The state `keep` asks for changed in a way a restart must see, without an event to write with it (a
        check-in's visit counted by footfall at a later tick): the next commit writes it all the same."""
        self._require_open()
        self._must_write = True

    def kept(self) -> dict[str, Any] | None:
        """The state `keep`'s provider gave at the last write (this run's, or at start the one before the restart);
        None when there is none."""
        return self._kept

    def _take_kept(self, force: bool) -> None:
        """Into the snapshot about to be written, when a write happens anyway: the state `keep` asks for."""
        if self._keep is None or not (force or self._disk.dirty):
            return
        self._kept = _plain(self._keep(), "the state kept across restarts")
        self._db.table(_KEPT).upsert(Document({"state": self._kept}, doc_id=1))
        if self._legacy_footfall:  # read at open (into `_kept`): the first write replaces it
            self._db.drop_table(_FOOTFALL)
            self._legacy_footfall = False

    def _chunk(self, chunk: int) -> Table:
        return self._db.table(f"{_OUTBOX}.{chunk}")

    def _insert_events(self, docs: dict[int, Document]) -> None:
        """Insert outbox documents (doc id = seq) into their chunk tables, one operation per chunk."""
        by_chunk: dict[int, list[Document]] = {}
        for seq, doc in docs.items():
            by_chunk.setdefault(seq // CHUNK, []).append(doc)
        for chunk, group in by_chunk.items():
            self._chunk(chunk).insert_multiple(group)
            self._chunk_count[chunk] = self._chunk_count.get(chunk, 0) + len(group)

    def _remove_events(self, seqs: list[int]) -> None:
        """Remove outbox documents from their chunk tables; a chunk left empty is dropped."""
        by_chunk: dict[int, list[int]] = {}
        for seq in seqs:
            by_chunk.setdefault(seq // CHUNK, []).append(seq)
        for chunk, group in by_chunk.items():
            left = self._chunk_count[chunk] - len(group)
            if left:
                self._chunk(chunk).remove(doc_ids=group)
                self._chunk_count[chunk] = left
            else:
                self._db.drop_table(f"{_OUTBOX}.{chunk}")
                del self._chunk_count[chunk]

    def set_outbox_max(self, outbox_max: int) -> None:
        """Change the outbox bound (a `cmd/config` downlink); a smaller one applies at once."""
        if outbox_max < 1:
            raise ValueError(f"outbox_max = {outbox_max}: must be at least 1")
        self._outbox_max = outbox_max
        self._enforce_bound()

    def _enforce_bound(self) -> None:
        """Drop droppable events, oldest first in DROP_ORDER, until the outbox is within its bound."""
        bound = self._full_max if self._disk_full else self._outbox_max
        excess = len(self._outbox_seq) - bound
        if excess <= 0:
            return
        victims: list[int] = []
        for t in DROP_ORDER:
            pool = self._droppable[t]
            while pool and len(victims) < excess:
                seq = next(iter(pool))
                del pool[seq]
                victims.append(seq)
                self._dropped[t] = self._dropped.get(t, 0) + 1
        if not victims:
            return  # only visits and awards left: never dropped, the bound is exceeded
        for seq in victims:
            del self._outbox_seq[self._outbox_id.pop(seq)]
        self._remove_events(victims)
        self._compact_order()
        if not self._drop_logged:
            self._drop_logged = True
            _log.warning(
                "outbox is over its bound of %d events%s: dropping the oldest %s events first "
                "(visits and awards are never dropped); drops are counted in the health event",
                bound,
                " (disk full)" if self._disk_full else "",
                " then ".join(DROP_ORDER),
            )

    def _compact_order(self) -> None:
        if len(self._order) > 2 * len(self._outbox_id) + 1024:
            self._order = sorted(self._outbox_id)

    def ack_events(self, ids: Iterable[str]) -> int:
        """Remove acknowledged events from the outbox; returns how many were pending.

        Unknown ids (already acknowledged, dropped, or never put) are ignored.
        """
        self._require_open()
        if isinstance(ids, str):
            raise TypeError("ack_events takes an iterable of event ids, not a single string")
        seqs: list[int] = []
        for event_id in ids:
            seq = self._outbox_seq.pop(event_id, None)
            if seq is not None:
                del self._outbox_id[seq]
                for pool in self._droppable.values():
                    pool.pop(seq, None)
                seqs.append(seq)
        if seqs:
            self._remove_events(seqs)
            self._compact_order()
        return len(seqs)

    def put_awards(self, awards: Iterable[Award]) -> int:
        """Append awards to the ledger; an award_id already present is ignored. Returns the number added."""
        self._require_open()
        added: list[dict[str, Any]] = []
        ids: set[str] = set()
        for award in awards:
            if award.award_id in self._award_ids or award.award_id in ids:
                continue
            rec = _plain(award_to_record(award), f"award {award.award_id}")
            added.append({"kind": "award", "day": award.day, "rec": rec})
            ids.add(award.award_id)
        if added:
            self._journal.insert_multiple(added)
            self._award_ids.update(ids)
            self._must_write = True
        return len(added)

    def put_visits(self, visits: Iterable[Visit]) -> None:
        """Store finished visits in the history; the newest `recent_visits_limit` stay in memory.

        A visit_id already stored is replaced (the newer record wins when read back). An
        open visit (ended None) is a ValueError; the call applies all visits or, on error, none.
        """
        self._require_open()
        batch: dict[str, tuple[float, dict[str, Any]]] = {}
        for v in visits:
            if v.ended is None:
                raise ValueError(f"visit {v.visit_id} is still open (ended None): only finished visits are stored")
            batch[v.visit_id] = (v.ended, _plain(visit_to_record(v), f"visit {v.visit_id}"))
        if not batch:
            return
        self._journal.insert_multiple(
            {"kind": "visit", "day": _visit_day(ended), "rec": rec} for ended, rec in batch.values()
        )
        self._must_write = True
        for _, rec in batch.values():
            self._index_history("visit", rec)

    # ------------------------------------------------------------------ durability

    def commit(self, force: bool = False) -> bool:
        """Write everything changed since the last commit in one atomic write; True when it is on disk.

        Changes that are only acks are written at most every ACK_COMMIT_S (or when `force`).

        A full disk is not an error: returns False, keeps the changes in memory (the next
        commit retries them; the bound tightens to `full_disk_outbox_max`), and the file
        keeps the last commit. Other failures (permissions, I/O errors) raise StoreError.

        The same commit in three steps, for a caller that keeps the disk off its thread:
        `begin_commit` and `finish_commit` on the store's thread, `write_commit` on any.
        """
        pending = self.begin_commit(force)
        if pending is None:
            return True
        self.write_commit(pending)
        return self.finish_commit(pending)

    def begin_commit(self, force: bool = False) -> PendingCommit | None:
        """Snapshot what `commit` would write; None when there is nothing to write now (as good as done).

        Changes made after this call belong to the next commit.
        """
        self._require_open()
        if not (force or self._must_write or self._disk_full) and time.monotonic() - self._last_write < ACK_COMMIT_S:
            return None  # acks only, written recently: they ride along with the next write
        self._take_kept(force or self._must_write)
        roll = self._journal.all() if len(self._journal) >= ROLL_EVERY and not self._disk_full else []
        # Only records in this very write may reach a day file, after it: the event announcing each is then
        # on disk first. The cleared journal is written by the next commit.
        self._must_write = False
        pending = len(self._outbox_seq)
        retain, self._retain_from = self._retain_from, None
        return PendingCommit(
            self._disk.prepare(), self._last_seq, _history_lines(roll), [d.doc_id for d in roll], pending, retain
        )

    def write_commit(self, pending: PendingCommit) -> None:
        """The disk part of a commit: the hot file, then the day files of a roll. Thread-safe; keeps an
        OSError in `pending` for `finish_commit` instead of raising it."""
        try:
            if pending.payload is not None:
                pending.ms = self._disk.write_payload(pending.payload)
        except OSError as e:
            pending.error = e
            return
        if pending.roll_ids:
            pending.roll_error = self._append_history(pending.history)
        if pending.retain_from is not None:
            try:
                pending.deleted = self._delete_days(pending.retain_from)
            except OSError as e:
                pending.retain_error = e

    def finish_commit(self, pending: PendingCommit) -> bool:
        """Account for a written commit (`write_commit` done); True when it is on disk, as `commit` says."""
        self._require_open()
        e = pending.error
        if e is not None:
            self._disk.failed()
            self._must_write = True
            if pending.retain_from is not None:  # not done: asked again with the next commit
                self._retain_from = self._retain_from or pending.retain_from
            if e.errno in _FULL:
                self._note_full(e)
                self._enforce_bound()
                return False
            raise StoreError(
                f"cannot write {self._path}: {e.strerror or e}; free disk space or fix the permissions of "
                f"{self._dir} (changes are kept in memory and retried at the next commit)"
            ) from e
        if pending.payload is not None:
            self._disk.written(len(pending.payload), pending.ms)
            self._pending_on_disk = pending.pending
        self._committed_seq = max(self._committed_seq, pending.seq)
        self._last_write = time.monotonic()
        if self._disk_full:  # before the roll's accounting: a roll the disk is still too full for says so again
            self._disk_full = False
            _log.warning("disk space is back: %s written again (%d events pending)", self._path, len(self._outbox_seq))
        if pending.retain_from is not None:  # before the roll's accounting, which may raise: the files are gone
            self._forget_before(pending.retain_from, pending.deleted, pending.retain_error)
        if pending.roll_ids:
            self._rolled(pending.roll_ids, pending.roll_error)
        return True

    def _forget_before(self, before: str, deleted: int, error: OSError | None) -> None:
        """After `retain`'s files are gone: its visits leave the recent visits.

        A day file that cannot be deleted is logged, not raised: raising would stop the pipeline, and the first tick
        of every restart would ask again and stop it again. The runtime asks again the next store-local day."""
        if error is not None:
            _log.warning(
                "cannot delete the history before %s in %s: %s; it is kept until it can be (asked again tomorrow): "
                "fix the permissions of %s",
                before,
                self._hist,
                error.strerror or error,
                self._dir,
            )
        old = [vid for vid, rec in self._visits.items() if _visit_day(float(rec["ended"])) < before]
        for vid in old:
            del self._visits[vid]
        if old:
            self._visits_heap = [(float(r["ended"]), v) for v, r in self._visits.items()]
            heapq.heapify(self._visits_heap)
        self._deleted_days += deleted
        if deleted:
            _log.info("deleted %d day file(s) of history before %s (storage.history_days)", deleted, before)

    def _note_full(self, e: OSError) -> None:
        self._last_error = f"cannot write {self._dir}: {e.strerror or e}"
        if not self._disk_full:
            self._disk_full = True
            _log.warning(
                "disk full: cannot write %s (%s); Visita keeps running, holds new events in memory "
                "(at most %d, dropping %s first) and writes them when space returns; free disk space",
                self._dir,
                e.strerror or e,
                self._full_max,
                " then ".join(DROP_ORDER),
            )

    def close(self) -> tuple[int, int]:
        """Commit, roll the journal to the day files, commit again, then release the files and the lock. Idempotent.

        Returns the events waiting in the outbox on disk (sent at the next start), and those that could not be
        written (a full disk): lost, never having been published."""
        if self._closed:
            return 0, 0
        try:
            if self.commit(force=True):
                self._roll()
            if self.commit(force=True):
                return len(self._outbox_seq), 0
            lost = sum(1 for seq in self._outbox_seq.values() if seq > self._committed_seq)
            _log.error(
                "disk full at stop: %d event(s) and %d history record(s) not written to %s are lost",
                lost,
                len(self._journal),
                self._dir,
            )
            return self._pending_on_disk, lost
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


def _newest(records: Iterable[tuple[str, dict[str, Any]]], limit: int) -> list[Visit]:
    """The `limit` newest (by `ended`) of (visit_id, record) pairs, as visits."""
    newest = heapq.nlargest(limit, records, key=lambda kv: (float(kv[1]["ended"]), kv[0]))
    return [visit_from_record(rec) for _, rec in newest]
