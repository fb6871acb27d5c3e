"""The write-ahead log and the dead-letter store: the only module that touches diskcache.

Both are diskcache caches in the queue directory, opened so that:

* nothing is ever evicted or expired (diskcache evicts by default once over 1 GiB);
* values are JSON texts we wrote, stored inline in SQLite, and anything else read
  back (a pickle, a blob, a file) raises :class:`CorruptEntryError` instead of
  being decoded: a planted pickle never runs;
* the directory is 0700 and every file 0600, whatever the process umask, because
  events carry personal data.

An event is appended before ``emit`` returns and deleted only after Customer.io
accepted it (or it was moved to the dead-letter store), so the log is at-least-once.
Keys are the events' ULIDs, so key order is logging order (to the millisecond) and
a resend keeps its id.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sqlite3
import stat
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import diskcache

from .errors import CorruptEntryError, InvalidEventError, QueueError
from .events import Event, event_from_dict

_internal_log = logging.getLogger("cio_logging")

_ENTRY_VERSION = 1
_DIRECTORY_MODE = 0o700
_FILE_MODE = 0o600
# Values above this size would go to separate files that diskcache creates with the
# process umask; events are at most ~100 KB, so keep everything inside SQLite.
_INLINE_LIMIT = 1 << 30
# How long a writer waits for another process's transaction before giving up.
_LOCK_TIMEOUT_SECONDS = 5.0


class _JSONTextDisk(diskcache.Disk):  # type: ignore[misc]  # diskcache is untyped
    """A diskcache Disk that stores only ``str`` keys and JSON texts, inline.

    The stock Disk pickles anything that is not a plain type and unpickles whatever a
    row says it holds. This one refuses both directions.
    """

    def put(self, key: object) -> tuple[object, bool]:
        if type(key) is not str:
            raise TypeError("queue keys are strings")
        return key, True

    def get(self, key: object, raw: bool) -> object:
        if not raw or type(key) is not str:
            raise CorruptEntryError("a queue key is not a plain string (refused, not decoded)")
        return key

    def store(self, value: object, read: bool, key: object = diskcache.UNKNOWN) -> object:
        if read or type(value) is not str:
            raise TypeError("queue values are JSON texts")
        return 0, diskcache.core.MODE_RAW, None, value

    def fetch(self, mode: int, filename: str | None, value: object, read: bool) -> object:
        if mode != diskcache.core.MODE_RAW or filename is not None or type(value) is not str:
            raise CorruptEntryError(
                f"a stored row has mode {mode}, not inline JSON text (refused, not decoded)"
            )
        return value


# How long fork() may wait for threads to leave SQLite before it goes ahead anyway.
_FORK_WAIT_SECONDS = 10.0

Method = TypeVar("Method", bound=Callable[..., Any])


class _Connection(sqlite3.Connection):
    """A plain SQLite connection that can be weakly referenced (the base class cannot)."""


# Every connection this process opened, weakly: a dead thread's connection is closed
# by garbage collection as usual. At a fork they are held strongly (see _ForkGate),
# and a child keeps what it inherited here for its whole life, never closing it.
_LIVE_CONNECTIONS: weakref.WeakSet[_Connection] = weakref.WeakSet()
_INHERITED_CONNECTIONS: list[_Connection] = []


class _ForkGate:
    """Makes fork() wait until no thread of this process is inside SQLite.

    A child forked while another thread held one of SQLite's internal mutexes inherits
    it held, and its first database call blocks forever (seen here: a forked gunicorn
    or multiprocessing worker hung in ``sqlite3.connect``). Every entry into SQLite
    goes through :meth:`inside`; an ``os.register_at_fork`` hook waits, bounded, until
    none is active and holds new ones back until the fork is done.
    """

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(
            before=self._before_fork,
            after_in_parent=self._after_fork_in_parent,
            after_in_child=self._reset,
        )

    def _reset(self) -> None:
        # In a child: what the parent had open is kept referenced, never closed.
        _INHERITED_CONNECTIONS.extend(getattr(self, "_held_over_fork", ()))
        self._held_over_fork: list[_Connection] = []
        self._condition = threading.Condition(threading.Lock())
        self._active = 0
        self._forking = False
        self._depth = threading.local()

    @contextlib.contextmanager
    def inside(self) -> Iterator[None]:
        depth = getattr(self._depth, "value", 0)
        if depth == 0:  # nested calls (replay appends) must not wait on a pending fork
            with self._condition:
                while self._forking:
                    self._condition.wait()
                self._active += 1
        self._depth.value = depth + 1
        try:
            yield
        finally:
            self._depth.value = depth
            if depth == 0:
                with self._condition:
                    self._active -= 1
                    if self._active == 0:
                        self._condition.notify_all()

    def _before_fork(self) -> None:
        with self._condition:
            self._forking = True
            deadline = time.monotonic() + _FORK_WAIT_SECONDS
            while self._active and (remaining := deadline - time.monotonic()) > 0:
                self._condition.wait(remaining)
        # Strong references across the fork: in the child, a dead thread's connection
        # must not be garbage-collected, which would close it.
        self._held_over_fork = list(_LIVE_CONNECTIONS)

    def _after_fork_in_parent(self) -> None:
        self._held_over_fork = []
        with self._condition:
            self._forking = False
            self._condition.notify_all()


_FORK_GATE = _ForkGate()


def _sqlite_section(method: Method) -> Method:
    """Run ``method`` inside the fork gate."""

    @functools.wraps(method)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        with _FORK_GATE.inside():
            return method(*args, **kwargs)

    return guarded  # type: ignore[return-value]


class _ForkSafeCache(diskcache.Cache):  # type: ignore[misc]  # diskcache is untyped
    """A diskcache Cache whose child processes never close the parent's connections.

    diskcache notices a fork and *closes* the connection it inherited before opening a
    new one. SQLite forbids exactly that: closing, in a child, a connection opened in
    the parent runs clean-up that can delete the parent's write-ahead content. Here
    that lost every event a forked child logged. This class keeps diskcache's
    per-thread connection, but in a child it drops the inherited ones without closing
    them (the fork gate keeps them referenced) and opens fresh ones. A thread only ever
    uses and closes its own connection.
    """

    def __init__(self, *args: Any, synchronous: int | None = None, **kwargs: Any) -> None:
        self._owner_pid = os.getpid()
        # SQLite's synchronous mode for this process's connections. diskcache would take
        # it from the shared Settings table, where another process (a CLI, a handler
        # without fsync) could have lowered it under an application that asked for fsync.
        self._synchronous = synchronous
        super().__init__(*args, **kwargs)

    @property
    def _con(self) -> sqlite3.Connection:
        if self._owner_pid != os.getpid():
            # First use in a forked child: forget the parent's per-thread connections
            # without closing them (the fork gate keeps them referenced), start afresh.
            self._owner_pid = os.getpid()
            self._local = threading.local()
            self._txn_id = None  # a transaction of a parent's thread is not ours
        local = self._local
        connection: _Connection | None = getattr(local, "connection", None)
        if connection is None:
            connection = sqlite3.connect(
                os.path.join(self._directory, diskcache.core.DBNAME),
                timeout=self._timeout,
                isolation_level=None,
                factory=_Connection,
            )
            local.connection = connection
            _LIVE_CONNECTIONS.add(connection)
            try:
                settings = connection.execute("SELECT key, value FROM Settings").fetchall()
            except sqlite3.OperationalError:  # a new database: __init__ creates it
                settings = []
            for key, value in settings:
                if key.startswith("sqlite_"):
                    self.reset(key, value, update=False)
            if self._synchronous is not None:
                connection.execute(f"PRAGMA synchronous = {int(self._synchronous)}")
        return connection

    def close(self) -> None:
        """Close this thread's connection only: other threads may be mid-transaction."""
        if self._owner_pid != os.getpid():
            return  # never close, in a child, what the parent opened
        local = self._local
        connection = getattr(local, "connection", None)
        if connection is not None:
            connection.close()
            local.connection = None


def secure_directory(directory: Path) -> None:
    """Create ``directory`` as 0700 and tighten it if it already exists.

    Missing parents are created 0700 too (``mkdir(parents=True)`` would give them the
    umask's default): the queue directory may be a parent of the log's own directory.
    """
    missing = [directory, *directory.parents]
    missing = [path for path in missing if not path.exists()]
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another process made it meanwhile
            path.mkdir(mode=_DIRECTORY_MODE)
        path.chmod(_DIRECTORY_MODE)
    if stat.S_IMODE(directory.stat().st_mode) != _DIRECTORY_MODE:
        directory.chmod(_DIRECTORY_MODE)


def secure_file(path: Path) -> None:
    """Create ``path`` as 0600 if missing, and tighten it if it exists.

    An existing file is changed by path, never opened: closing any descriptor of an
    SQLite file drops every POSIX lock this process holds on it, including the lock
    that tells other processes this one still uses the database. Without it, another
    process closing its last connection deletes the write-ahead files under us.
    """
    try:
        descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, _FILE_MODE)
    except FileExistsError:
        if stat.S_IMODE(path.stat().st_mode) != _FILE_MODE:
            path.chmod(_FILE_MODE)
        return
    try:
        os.fchmod(descriptor, _FILE_MODE)  # the umask may have taken bits away
    finally:
        os.close(descriptor)


def _open_cache(directory: Path, *, fsync: bool | None) -> diskcache.Cache:
    secure_directory(directory)
    # SQLite gives its -wal and -shm files the database file's mode, so creating the
    # database 0600 first covers all three.
    secure_file(directory / diskcache.core.DBNAME)
    # Settings persist in the database and a later open reuses them: pass every one
    # that matters, every time. Durability is the exception: it is per process (see
    # _ForkSafeCache), and a reader (fsync=None) leaves it as it is.
    durability = {} if fsync is None else {"sqlite_synchronous": 2 if fsync else 1}
    try:
        cache = _ForkSafeCache(
            str(directory),
            synchronous=None if fsync is None else (2 if fsync else 1),
            timeout=_LOCK_TIMEOUT_SECONDS,
            disk=_JSONTextDisk,
            eviction_policy="none",
            size_limit=2**62,
            cull_limit=0,
            statistics=0,
            tag_index=0,
            disk_min_file_size=_INLINE_LIMIT,
            **durability,
        )
    except (sqlite3.Error, OSError) as exc:
        raise QueueError(
            f"cannot open the queue in {directory}: {type(exc).__name__}: {exc}"
        ) from exc
    for entry in directory.iterdir():
        if entry.is_file() and stat.S_IMODE(entry.stat().st_mode) != _FILE_MODE:
            entry.chmod(_FILE_MODE)  # by path: see secure_file
    return cache


def _delete_non_text_keys(cache: diskcache.Cache) -> list[CorruptEntry]:
    """Delete rows whose key is not text, which diskcache's iteration cannot get past.

    Below diskcache's API on purpose: such a key cannot be named through it without
    unpickling it. diskcache's triggers keep its counters right.
    """
    sql = cache._sql
    with cache.transact():
        rows = sql("SELECT rowid FROM Cache WHERE raw = 0 OR typeof(key) != 'text'")
        rowids = [rowid for (rowid,) in rows.fetchall()]
        for rowid in rowids:
            sql("DELETE FROM Cache WHERE rowid = ?", (rowid,))
    return [
        CorruptEntry(f"row-{rowid}", "a queue key is not text (refused, not decoded)")
        for rowid in rowids
    ]


@dataclass(frozen=True, slots=True)
class QueuedEvent:
    """An event in the write-ahead log, with its delivery history."""

    key: str
    event: Event
    attempts: int
    first_failure_at: float | None
    last_error: str | None
    next_attempt_at: float
    replayed_at: float | None = None


@dataclass(frozen=True, slots=True)
class CorruptEntry:
    """A row that could not be read as an event; it is taken out of the log."""

    key: str
    reason: str


@dataclass(frozen=True, slots=True)
class Batch:
    """What one read of the log found: events due now, and rows taken out as corrupt."""

    events: list[QueuedEvent]
    corrupt: list[CorruptEntry]


class WriteAheadLog:
    """Events waiting for Customer.io, on disk, in logging order."""

    @_sqlite_section
    def __init__(self, directory: Path, *, fsync: bool | None = False) -> None:
        """``fsync``: True for synchronous=FULL, False for NORMAL, None to leave it."""
        self.directory = directory
        self._cache = _open_cache(directory, fsync=fsync)

    @_sqlite_section
    def append(self, event: Event, *, replayed_at: float | None = None) -> None:
        """Write ``event`` durably (committed to SQLite) before returning.

        ``replayed_at``: set by a replay from the dead-letter store; the age limit then
        counts from it rather than from when the event was logged.
        """
        replayed = "null" if replayed_at is None else repr(float(replayed_at))
        entry = (
            f'{{"v":{_ENTRY_VERSION},"attempts":0,"first_failure_at":null,'
            f'"last_error":null,"next_attempt_at":0,"replayed_at":{replayed},'
            f'"event":{event.to_json()}}}'
        )
        self._cache.set(event.id, entry)

    @_sqlite_section
    def read_due(self, limit: int, now: float | None = None) -> Batch:
        """Up to ``limit`` events whose next attempt is due, oldest first.

        Rows that are not our JSON are deleted from the log and returned as
        :class:`CorruptEntry` so the caller can dead-letter them.
        """
        moment = time.time() if now is None else now
        events: list[QueuedEvent] = []
        corrupt: list[CorruptEntry] = []
        try:
            keys = self._cache.iterkeys()
            for key in keys:
                entry = self._read(key, corrupt)
                if entry is not None and entry.next_attempt_at <= moment:
                    events.append(entry)
                    if len(events) >= limit:
                        break
        except CorruptEntryError:
            # A key that is not text (planted by another writer) stops diskcache's own
            # iteration; quarantine such rows and let the next call read on.
            corrupt.extend(self._quarantine_non_text_keys())
        return Batch(events, corrupt)

    def _read(self, key: str, corrupt: list[CorruptEntry]) -> QueuedEvent | None:
        try:
            text = self._cache.get(key)
            if text is None:  # delivered by another process since the key was listed
                return None
            return _decode_entry(key, text)
        except (CorruptEntryError, InvalidEventError) as exc:
            corrupt.append(CorruptEntry(key, str(exc)))
            self._cache.delete(key)
            return None

    def _quarantine_non_text_keys(self) -> list[CorruptEntry]:
        return _delete_non_text_keys(self._cache)

    @_sqlite_section
    def remove(self, keys: Iterable[str]) -> None:
        """Delete delivered (or dead-lettered) events, in one transaction."""
        with self._cache.transact():
            for key in keys:
                self._cache.delete(key)

    @_sqlite_section
    def record_failure(
        self,
        failures: Iterable[tuple[QueuedEvent, float]],
        error: str,
        now: float | None = None,
        *,
        count_attempt: bool = True,
    ) -> None:
        """Count one more failed attempt for each event and set when it is next due.

        ``failures`` pairs each event with its next attempt time. With
        ``count_attempt=False`` only the time and the error change.
        """
        moment = time.time() if now is None else now
        with self._cache.transact():
            for queued, next_attempt_at in failures:
                if queued.key not in self._cache:
                    continue  # accepted via another path meanwhile: never resurrect it
                entry = {
                    "v": _ENTRY_VERSION,
                    "attempts": queued.attempts + (1 if count_attempt else 0),
                    "first_failure_at": queued.first_failure_at or moment,
                    "last_error": error,
                    "next_attempt_at": next_attempt_at,
                    "replayed_at": queued.replayed_at,
                    "event": json.loads(queued.event.to_json()),
                }
                self._cache.set(
                    queued.key, json.dumps(entry, ensure_ascii=False, separators=(",", ":"))
                )

    @_sqlite_section
    def get(self, key: str) -> QueuedEvent | None:
        """One waiting event by key, or None (gone, or not readable: left for the worker)."""
        try:
            text = self._cache.get(key)
            return None if text is None else _decode_entry(key, text)
        except (CorruptEntryError, InvalidEventError):
            return None

    @_sqlite_section
    def oldest_logged_at(self) -> float | None:
        """When the oldest waiting event was logged (keys are ULIDs: time-ordered)."""
        try:
            for key in self._cache.iterkeys():
                text = self._cache.get(key)
                return None if text is None else _decode_entry(key, text).event.logged_at
        except (CorruptEntryError, InvalidEventError):
            return None  # the worker quarantines it; the gauge just skips a beat
        return None

    @_sqlite_section
    def volume(self) -> int:
        """Bytes the log takes on disk (SQLite pages), for the shedding limits."""
        return int(self._cache.volume())

    @_sqlite_section
    def __contains__(self, key: object) -> bool:
        return key in self._cache

    @_sqlite_section
    def __len__(self) -> int:
        return len(self._cache)

    @_sqlite_section
    def close(self) -> None:
        self._cache.close()


def _decode_entry(key: str, text: str) -> QueuedEvent:
    try:
        raw = json.loads(text)
        if raw.get("v") != _ENTRY_VERSION:
            raise InvalidEventError(f"unknown entry version {raw.get('v')!r}")
        return QueuedEvent(
            key=key,
            event=event_from_dict(raw["event"]),
            attempts=int(raw["attempts"]),
            first_failure_at=raw["first_failure_at"],
            last_error=raw["last_error"],
            next_attempt_at=float(raw["next_attempt_at"]),
            replayed_at=raw.get("replayed_at"),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InvalidEventError(
            f"queue entry is not valid JSON of ours ({type(exc).__name__})"
        ) from None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An event Customer.io will never accept, kept with why."""

    key: str
    event: dict[str, Any] | None  # None when the stored row could not even be read
    status: int | None
    error_type: str
    message: str
    attempts: int
    first_failure_at: float
    last_failure_at: float

    @property
    def event_name(self) -> str | None:
        return None if self.event is None else str(self.event.get("name"))


class DeadLetterStore:
    """Events that failed for good, with the reason (status, error type, scrubbed text)."""

    @_sqlite_section
    def __init__(self, directory: Path, *, fsync: bool | None = False) -> None:
        """``fsync``: True for synchronous=FULL, False for NORMAL, None to leave it."""
        self.directory = directory
        self._cache = _open_cache(directory, fsync=fsync)

    @_sqlite_section
    def add(
        self,
        key: str,
        event: Event | None,
        *,
        status: int | None,
        error_type: str,
        message: str,
        attempts: int,
        first_failure_at: float | None = None,
        now: float | None = None,
    ) -> None:
        moment = time.time() if now is None else now
        entry = {
            "v": _ENTRY_VERSION,
            "key": key,
            "event": None if event is None else json.loads(event.to_json()),
            "status": status,
            "error_type": error_type,
            "message": message,
            "attempts": attempts,
            "first_failure_at": first_failure_at or moment,
            "last_failure_at": moment,
        }
        self._cache.set(key, json.dumps(entry, ensure_ascii=False, separators=(",", ":")))

    def __iter__(self) -> Iterator[DeadLetter]:
        with _FORK_GATE.inside():  # never hold the gate while the caller consumes
            try:
                keys = list(self._cache.iterkeys())
            except CorruptEntryError:
                for quarantined in _delete_non_text_keys(self._cache):
                    _internal_log.error(
                        "cio_logging: dead-letter %s deleted: %s",
                        quarantined.key,
                        quarantined.reason,
                    )
                keys = list(self._cache.iterkeys())
        for key in keys:
            letter = self.get(key)
            if letter is not None:
                yield letter

    @_sqlite_section
    def get(self, key: str) -> DeadLetter | None:
        """One entry by its key (the event id), or None."""
        try:
            text = self._cache.get(key)
        except CorruptEntryError as exc:
            # Listed, counted and purgeable like any entry; never decoded or replayed.
            return DeadLetter(key, None, None, "corrupt_entry", str(exc), 0, 0.0, 0.0)
        if text is None:
            return None
        try:
            raw = json.loads(text)
            return DeadLetter(
                key=raw["key"],
                event=raw["event"],
                status=raw["status"],
                error_type=raw["error_type"],
                message=raw["message"],
                attempts=raw["attempts"],
                first_failure_at=raw["first_failure_at"],
                last_failure_at=raw["last_failure_at"],
            )
        except (ValueError, KeyError, TypeError):
            return DeadLetter(
                key,
                None,
                None,
                "corrupt_entry",
                "not a dead letter written by cio_logging",
                0,
                0.0,
                0.0,
            )

    @_sqlite_section
    def select(
        self,
        *,
        event: str | None = None,
        reason: str | None = None,
        since: float | None = None,
        before: float | None = None,
        keys: Iterable[str] | None = None,
        limit: int | None = None,
    ) -> list[DeadLetter]:
        """Entries matching every filter given, oldest key first.

        ``reason`` matches the error type exactly or appears in the message.
        ``since`` and ``before`` compare with the last failure time.
        """
        wanted = None if keys is None else set(keys)
        chosen: list[DeadLetter] = []
        for letter in self if wanted is None else filter(None, map(self.get, sorted(wanted))):
            if event is not None and letter.event_name != event:
                continue
            if reason is not None and reason != letter.error_type and reason not in letter.message:
                continue
            if since is not None and letter.last_failure_at < since:
                continue
            if before is not None and letter.last_failure_at >= before:
                continue
            chosen.append(letter)
            if limit is not None and len(chosen) >= limit:
                break
        return chosen

    @_sqlite_section
    def replay(self, letters: Iterable[DeadLetter], wal: WriteAheadLog) -> int:
        """Move entries back into the write-ahead log, with their ids, as new attempts.

        Each entry is appended to the log before it leaves this store, so a crash in
        between leaves it in both (the id deduplicates), never in neither. Entries
        whose event could not be read stay here. Returns how many moved.
        """
        moved = 0
        for letter in letters:
            if letter.event is None:
                continue
            wal.append(event_from_dict(letter.event), replayed_at=time.time())
            self._cache.delete(letter.key)
            moved += 1
        return moved

    @_sqlite_section
    def purge(self, letters: Iterable[DeadLetter]) -> int:
        """Delete entries for good; returns how many were deleted."""
        removed = 0
        with self._cache.transact():
            for letter in letters:
                removed += bool(self._cache.delete(letter.key))
        return removed

    def count(self, by: Literal["event", "reason"] | None = None) -> Counter[str]:
        """Count entries, grouped by event name or by error type (the operator's GROUP BY)."""
        counts: Counter[str] = Counter()
        for letter in self:
            if by == "event":
                counts[letter.event_name or "<unreadable>"] += 1
            elif by == "reason":
                counts[letter.error_type] += 1
            else:
                counts["total"] += 1
        return counts

    @_sqlite_section
    def __len__(self) -> int:
        return len(self._cache)

    @_sqlite_section
    def close(self) -> None:
        self._cache.close()
