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
import fcntl
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
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar

import diskcache

from .errors import CorruptEntryError, InvalidEventError, QueueError
from .events import Event, event_from_dict
from .interrupts import run_through_interrupts

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
# ... checking this often, whatever notifications it got.
_FORK_POLL_SECONDS = 0.01

Method = TypeVar("Method", bound=Callable[..., Any])


class _Connection(sqlite3.Connection):
    """A plain SQLite connection that can be weakly referenced (the base class cannot)
    and tells whether it was closed."""

    closed = False
    # Its cache was garbage-collected unclosed: the thread that uses it closes it at
    # its next opening of a connection, or as it ends (never another thread: one in
    # the middle of a statement may still hold it).
    orphaned = False

    def close(self) -> None:
        self.closed = True
        super().close()


# Every connection this process opened, weakly. At a fork they are held strongly (see
# _ForkGate), and a child keeps what it inherited here for its whole life, never
# closing it.
_LIVE_CONNECTIONS: weakref.WeakSet[_Connection] = weakref.WeakSet()
_INHERITED_CONNECTIONS: list[_Connection] = []
# How long closing a store waits for other threads to leave SQLite before it closes
# only the calling thread's connection (the others then close as their threads end).
_CLOSE_WAIT_SECONDS = 1.0


class _ThreadConnections:
    """The connections one thread opened; closed on that thread as it ends.

    Every connection is closed deterministically, never left to garbage collection,
    which Python 3.13 reports as ``ResourceWarning: unclosed database`` (an error
    under ``-W error`` or pytest's ``filterwarnings = error``). One of these lives in
    a module-level ``threading.local``, whose values CPython frees on the thread
    itself when it ends: ``__del__`` then closes what the thread opened and nobody
    closed. A store's ``close()`` closes every thread's connection to it.

    In a forked child the values of the parent's threads are freed too: those
    connections are the parent's, kept referenced by the fork gate and never closed.
    """

    __slots__ = ("connections", "pid")

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.connections: list[_Connection] = []

    def add(self, connection: _Connection) -> None:
        kept = []
        for known in self.connections:
            if known.orphaned and not known.closed:
                with contextlib.suppress(sqlite3.Error):
                    known.close()
            if not known.closed:
                kept.append(known)
        kept.append(connection)
        self.connections = kept

    def __del__(self) -> None:
        try:
            if self.pid != os.getpid():
                return  # the parent's: closing them here could delete the parent's work
            for connection in self.connections:
                with contextlib.suppress(Exception):
                    connection.close()
        except Exception:  # interpreter shutdown: nothing more to do  # noqa: S110
            pass


_THREAD_CONNECTIONS = threading.local()


def _orphan(connections: weakref.WeakSet[_Connection]) -> None:
    for connection in list(connections):
        connection.orphaned = True


def _close_if_ours(pid: int, connection: sqlite3.Connection) -> None:
    if pid == os.getpid():  # never, in a forked child, one the parent opened
        with contextlib.suppress(sqlite3.Error):
            connection.close()


def _connections_of_this_thread() -> _ThreadConnections:
    held: _ThreadConnections | None = getattr(_THREAD_CONNECTIONS, "held", None)
    if held is None or held.pid != os.getpid():
        # In a forked child the parent's list is dropped unclosed (the fork gate keeps
        # its connections referenced), and this thread starts a list of its own.
        held = _THREAD_CONNECTIONS.held = _ThreadConnections()
    return held


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
        # The condition's lock itself, so the exit path below can take it with no
        # Python-level call in between (each call is a point where a signal handler
        # can raise).
        self._mutex = threading.Lock()
        self._condition = threading.Condition(self._mutex)
        self._active = 0
        self._forking = False
        self._exclusive = False
        self._depth = threading.local()

    @contextlib.contextmanager
    def inside(self) -> Iterator[None]:
        depth = getattr(self._depth, "value", 0)
        counted = False
        try:
            if depth == 0:  # nested calls (replay appends) must not wait on a pending fork
                with self._condition:
                    while self._forking or self._exclusive:
                        self._condition.wait()
                    self._active += 1
                    counted = True  # no call in between: an interrupt cannot split them
            self._depth.value = depth + 1
            yield
        finally:
            self._depth.value = depth
            if counted:
                # An interrupt must not leave us counted (every fork would wait its
                # whole bound for a thread that left long ago): the decrement sits in
                # this finally with no call before it, and the fork (or a close waiting
                # to be alone) polls rather than relying on the notification, which an
                # interrupt may skip.
                with self._mutex:
                    self._active -= 1
                if self._forking or self._exclusive:
                    with self._condition:
                        self._condition.notify_all()

    @contextlib.contextmanager
    def alone(self, timeout: float) -> Iterator[bool]:
        """Like :meth:`inside`, with every other thread held out of SQLite meanwhile.

        Yields whether the threads inside when it was called left within ``timeout``
        (False: some are still inside; then touch only this thread's connections).
        Called from inside already, it cannot wait for the others (one may be waiting
        for a lock this thread holds) and yields False at once.
        """
        if getattr(self._depth, "value", 0):
            yield False
            return
        with self._condition:
            while self._forking or self._exclusive:
                self._condition.wait()
            self._exclusive = True
            deadline = time.monotonic() + timeout
            while self._active and (remaining := deadline - time.monotonic()) > 0:
                self._condition.wait(min(remaining, _FORK_POLL_SECONDS))
            alone = self._active == 0
            self._active += 1
        self._depth.value = 1
        try:
            yield alone
        finally:
            self._depth.value = 0
            with self._condition:
                self._active -= 1
                self._exclusive = False
                self._condition.notify_all()

    def _before_fork(self) -> None:
        with self._condition:
            self._forking = True
            deadline = time.monotonic() + _FORK_WAIT_SECONDS
            while self._active and (remaining := deadline - time.monotonic()) > 0:
                self._condition.wait(min(remaining, _FORK_POLL_SECONDS))
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
        # This process's connections to this cache, one per thread that used it.
        self._open_connections: weakref.WeakSet[_Connection] = weakref.WeakSet()
        # Collected unclosed: each thread closes its own connection when it next opens
        # one, or as it ends. Not at exit: daemon threads may still be using them.
        weakref.finalize(self, _orphan, self._open_connections).atexit = False
        super().__init__(*args, **kwargs)

    @property
    def _con(self) -> sqlite3.Connection:
        if self._owner_pid != os.getpid():
            # First use in a forked child: forget the parent's per-thread connections
            # without closing them (the fork gate keeps them referenced), start afresh.
            self._owner_pid = os.getpid()
            self._local = threading.local()
            self._txn_id = None  # a transaction of a parent's thread is not ours
            self._open_connections.clear()  # the parent's are not ours to close
        local = self._local
        connection: _Connection | None = getattr(local, "connection", None)
        if connection is None:
            connection = sqlite3.connect(
                os.path.join(self._directory, diskcache.core.DBNAME),
                timeout=self._timeout,
                isolation_level=None,
                factory=_Connection,
                # Used by this thread only; closed by another in close_all, when no
                # thread is inside SQLite, or as the thread ends.
                check_same_thread=False,
            )
            local.connection = connection
            _LIVE_CONNECTIONS.add(connection)
            self._open_connections.add(connection)
            _connections_of_this_thread().add(connection)
            _retry_while_locked(lambda: self._configure(connection))
        return connection

    def _configure(self, connection: sqlite3.Connection) -> None:
        try:
            settings = connection.execute("SELECT key, value FROM Settings").fetchall()
        except sqlite3.OperationalError as exc:
            if "no such table" not in str(exc):
                raise
            settings = []  # a new database: __init__ creates the table
        for key, value in settings:
            if key.startswith("sqlite_"):
                self.reset(key, value, update=False)
        if self._synchronous is not None:
            connection.execute(f"PRAGMA synchronous = {int(self._synchronous)}")

    def close(self) -> None:
        """Close this thread's connection only: other threads may be mid-transaction."""
        if self._owner_pid != os.getpid():
            return  # never close, in a child, what the parent opened
        local = self._local
        connection = getattr(local, "connection", None)
        if connection is not None:
            connection.close()
            local.connection = None

    def close_all(self) -> None:
        """Close every thread's connection to this cache: its owner is closing.

        Waits (briefly) until no thread is inside SQLite, so none is closed in use;
        a thread that uses the cache afterwards opens a fresh connection. If threads
        stay inside, only this thread's is closed; theirs close as those threads end.
        """
        if self._owner_pid != os.getpid():
            return  # never close, in a child, what the parent opened
        with _FORK_GATE.alone(_CLOSE_WAIT_SECONDS) as alone:
            if not alone:
                self.close()
                return
            for connection in list(self._open_connections):
                with contextlib.suppress(sqlite3.Error):
                    connection.close()
            self._open_connections.clear()
            self._local = threading.local()


def _retry_while_locked(action: Callable[[], None]) -> None:
    """Run ``action``, again while SQLite answers "database is locked" (some of its
    locks, such as a journal-mode switch by another process, do not wait)."""
    deadline = time.monotonic() + _LOCK_TIMEOUT_SECONDS
    while True:
        try:
            action()
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def inherited_owner(directory: Path) -> tuple[int, int] | None:
    """The uid and gid a file or directory created in ``directory`` should be given:
    the directory's own, when this process runs as root and they are not root's.

    A root shell running the CLI on the application user's queue must not leave files
    there that the application's user cannot open (a lock file, a database). None
    when nothing needs changing, or this process could not change it anyway.
    """
    if os.geteuid() != 0:
        return None
    status = os.stat(directory)
    if (status.st_uid, status.st_gid) == (os.geteuid(), os.getegid()):
        return None
    return status.st_uid, status.st_gid


def secure_directory(directory: Path) -> None:
    """Create ``directory`` as 0700 and tighten it if it already exists.

    Missing parents are created 0700 too (``mkdir(parents=True)`` would give them the
    umask's default): the queue directory may be a parent of the log's own directory.
    Run as root, what it creates belongs to the owner of the nearest existing parent
    (see :func:`inherited_owner`).
    """
    missing = [directory, *directory.parents]
    missing = [path for path in missing if not path.exists()]
    owner = inherited_owner(missing[-1].parent) if missing else None
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another process made it meanwhile
            path.mkdir(mode=_DIRECTORY_MODE)
            if owner is not None:
                os.chown(path, *owner, follow_symlinks=False)
        path.chmod(_DIRECTORY_MODE)
    if stat.S_IMODE(directory.stat().st_mode) != _DIRECTORY_MODE:
        directory.chmod(_DIRECTORY_MODE)


def secure_file(path: Path) -> None:
    """Create ``path`` as 0600 if missing, and tighten it if it exists.

    An existing file is changed by path, never opened: closing any descriptor of an
    SQLite file drops every POSIX lock this process holds on it, including the lock
    that tells other processes this one still uses the database. Without it, another
    process closing its last connection deletes the write-ahead files under us.
    Run as root, a new file belongs to its directory's owner (see
    :func:`inherited_owner`); SQLite gives its -wal and -shm files the database's.
    """
    try:
        descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, _FILE_MODE)
    except FileExistsError:
        if not path.is_symlink() and stat.S_IMODE(path.stat().st_mode) != _FILE_MODE:
            path.chmod(_FILE_MODE)
        return
    try:
        os.fchmod(descriptor, _FILE_MODE)  # the umask may have taken bits away
        owner = inherited_owner(path.parent)
        if owner is not None:
            os.fchown(descriptor, *owner)
    finally:
        os.close(descriptor)


def _open_cache(directory: Path, *, fsync: bool | None) -> diskcache.Cache:
    """Open (or create) the cache in ``directory``; a corrupt database file is
    quarantined (renamed aside, kept for forensics) and a fresh one started."""
    try:
        return _open_cache_once(directory, fsync=fsync)
    except QueueError as exc:
        cause = exc.__cause__
        if not isinstance(cause, sqlite3.DatabaseError) or not _is_corruption(cause):
            raise
        moved = quarantine_database(directory)
        _internal_log.error(
            "the database in %s is corrupt (%s); quarantined as %s and started a fresh one",
            directory,
            cause,
            ", ".join(moved),
        )
        return _open_cache_once(directory, fsync=fsync)


def quarantine_database(directory: Path) -> list[str]:
    """Rename the database files in ``directory`` aside; returns the new names."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    moved = []
    for suffix in ("", "-wal", "-shm"):
        path = directory / f"{diskcache.core.DBNAME}{suffix}"
        if path.exists():
            target = path.with_name(f"{diskcache.core.DBNAME}.corrupt-{stamp}{suffix}")
            path.rename(target)
            moved.append(target.name)
    return moved


@contextlib.contextmanager
def _opening_lock(directory: Path) -> Iterator[None]:
    """An exclusive flock on ``directory/open.lock`` for as long as a cache opens."""
    path = directory / "open.lock"
    secure_file(path)
    # Never through a link: root opening a queue its user prepared must not open
    # (and lock) some other file.
    descriptor = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # releases the lock


def _open_cache_once(directory: Path, *, fsync: bool | None) -> diskcache.Cache:
    secure_directory(directory)
    # SQLite gives its -wal and -shm files the database file's mode, so creating the
    # database 0600 first covers all three.
    secure_file(directory / diskcache.core.DBNAME)
    # Settings persist in the database and a later open reuses them: pass every one
    # that matters, every time. Durability is the exception: it is per process (see
    # _ForkSafeCache), and a reader (fsync=None) leaves it as it is.
    durability = {} if fsync is None else {"sqlite_synchronous": 2 if fsync else 1}
    try:
        # Opening writes settings and switches the journal mode, and SQLite answers
        # "database is locked" at once, without waiting, to a second process doing
        # the same (gunicorn workers starting together): one opener at a time.
        with _opening_lock(directory):
            cache = _ForkSafeCache(
                str(directory),
                synchronous=None if fsync is None else (2 if fsync else 1),
                timeout=_LOCK_TIMEOUT_SECONDS,
                disk=_JSONTextDisk,
                eviction_policy="none",
                size_limit=2**62,
                cull_limit=0,
                statistics=0,
                tag_index=1,  # the due-time index of WriteAheadLog
                disk_min_file_size=_INLINE_LIMIT,
                # Memory stays flat however long the queue grows: a page cache of 8 MiB
                # per connection (diskcache's default is 32), and reads without mmap,
                # whose pages would count in the process's RSS as the queue is read.
                sqlite_cache_size=2048,
                sqlite_mmap_size=0,
                **durability,
            )
    except (sqlite3.Error, OSError) as exc:
        raise QueueError(
            f"cannot open the queue in {directory}: {type(exc).__name__}: {exc}"
        ) from exc
    for entry in directory.iterdir():
        if (
            not entry.is_symlink()
            and entry.is_file()
            and stat.S_IMODE(entry.stat().st_mode) != _FILE_MODE
        ):
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


# A NamedTuple, not a frozen dataclass: as immutable, and built about four times
# faster (a frozen dataclass pays object.__setattr__ per field); one is built for
# every event, at emit and at every read of the log.
class QueuedEvent(NamedTuple):
    """An event in the write-ahead log, with its delivery history."""

    key: str
    event: Event
    attempts: int
    first_failure_at: float | None
    last_error: str | None
    next_attempt_at: float
    replayed_at: float | None = None
    # Set for an event replayed from the dead-letter store: what it was dead-lettered
    # for first and its earlier replays, so failing again keeps them.
    dead_letter: DeadLetterHistory | None = None


@dataclass(frozen=True, slots=True)
class CorruptEntry:
    """A row that could not be read as an event; it is taken out of the log."""

    key: str
    reason: str


@dataclass(frozen=True, slots=True)
class Batch:
    """What one read of the log found: events due now, and rows taken out as corrupt.

    ``cursor`` marks where the read stopped (due time, row id): a later read from it
    continues after these rows, while they are still in the log (in flight).
    """

    events: list[QueuedEvent]
    corrupt: list[CorruptEntry]
    cursor: tuple[float, int] | None = None


class WriteAheadLog:
    """Events waiting for Customer.io, on disk, oldest due first.

    Rows live in diskcache's ``Cache`` table: the key is the event id, the value our
    JSON text (see :func:`encode_row`) and the ``tag`` column, indexed, the time the
    next attempt is due (the logging time for a fresh event). Reading what is due is
    then an index range scan, whatever the backlog of events waiting for a retry, and
    appends, acknowledgements and retries are one statement per batch in one
    transaction: the hot paths are written in SQL on diskcache's own connection, and
    diskcache's triggers keep its counters right.
    """

    @_sqlite_section
    def __init__(self, directory: Path, *, fsync: bool | None = False) -> None:
        """``fsync``: True for synchronous=FULL, False for NORMAL, None to leave it."""
        self.directory = directory
        self._fsync = fsync
        # One writer at a time in this process: threads queue on a fair lock rather
        # than on SQLite's busy handler, whose sleeps made the latency tail.
        self._write_guard = threading.Lock()
        self._anchor: tuple[int, sqlite3.Connection] | None = None
        self._open(_open_cache(directory, fsync=fsync))
        reference = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _reset_wal_in_child(reference))

    def _open(self, cache: diskcache.Cache) -> None:
        """Start using ``cache``; remember which file it is, and keep a connection to it."""
        self._cache = cache
        self._identity = _database_identity(self.directory)
        self._identity_checked_at = time.monotonic()
        self._open_anchor()

    def _open_anchor(self) -> None:
        """Keep a connection of our own to the current file, used only to salvage rows
        if it is deleted or found corrupt: whichever thread notices may never have
        opened one to it, and opening one by path would find the new file."""
        old, self._anchor = self._anchor, None
        if old is not None and old[0] == os.getpid():
            with contextlib.suppress(sqlite3.Error):
                old[1].close()
        with contextlib.suppress(sqlite3.Error):
            anchor = sqlite3.connect(
                self.directory / diskcache.core.DBNAME,
                isolation_level=None,
                factory=_Connection,
                check_same_thread=False,  # used under the write guard, by whichever thread
            )
            _LIVE_CONNECTIONS.add(anchor)
            # A first read opens SQLite's -wal and -shm files too: rows not yet
            # checkpointed live there, and once deleted they cannot be opened by path.
            anchor.execute("SELECT count(*) FROM Settings").fetchall()
            self._anchor = (os.getpid(), anchor)
            # A log collected unclosed closes it (nobody else uses it); not at exit,
            # when a daemon flush thread may still be salvaging through it.
            weakref.finalize(self, _close_if_ours, os.getpid(), anchor).atexit = False

    def append(
        self,
        event: Event,
        *,
        replayed_at: float | None = None,
        dead_letter: DeadLetterHistory | None = None,
    ) -> None:
        """Write ``event`` durably (committed to SQLite) before returning.

        ``replayed_at``: set by a replay from the dead-letter store; the age limit then
        counts from it rather than from when the event was logged. ``dead_letter``:
        that entry's history, kept with the row until it is delivered.
        """
        self.append_rows([encode_row(event, replayed_at=replayed_at, dead_letter=dead_letter)])

    @_sqlite_section
    def append_rows(self, rows: Sequence[Row]) -> int:
        """Commit rows made by :func:`encode_row`, all in one transaction.

        A row whose id is already queued is left as it is (a replay of an event that is
        still waiting). Returns the largest rowid SQLite gave (every row of ``rows``
        that was inserted has one at most this; 0 if none). Raises ``sqlite3.Error`` or
        ``OSError`` if the disk fails; then nothing of ``rows`` was written.
        """
        with self._write_guard:
            if self._anchor is None or self._anchor[0] != os.getpid():
                self._open_anchor()  # a forked child: the parent's is not ours to use
            connection = self._cache._con
            # The caller's thread runs this, and on the main thread a signal handler can
            # raise (KeyboardInterrupt, SystemExit) after any call. So the BEGIN and the
            # roll-back sit in one try in this one frame, with no Python-level call
            # between an exception and the roll-back: a transaction left open would
            # keep SQLite's write lock from every other process, and every later
            # statement on this connection would join it and never commit.
            try:
                if connection.in_transaction:  # never join one left open: it would not commit
                    connection.execute("ROLLBACK")
                if len(rows) <= _ROWS_PER_STATEMENT:
                    # One statement is its own transaction: one call into SQLite, not the
                    # three of BEGIN, executemany and COMMIT. Each call gives the GIL
                    # away, and with other threads running, getting it back is what a
                    # commit costs the essential events waiting for it.
                    cursor = connection.execute(_insert_rows_sql(len(rows)), _flatten(rows))
                    return cursor.lastrowid or 0
                last = 0
                connection.execute("BEGIN IMMEDIATE")
                # Multi-row statements, not executemany: a statement gives the GIL away
                # once, executemany once per row, and with the application's threads
                # running, each hand-back can take a while.
                full = len(rows) - len(rows) % _ROWS_PER_BIG_STATEMENT
                big = _insert_rows_sql(_ROWS_PER_BIG_STATEMENT)
                for start in range(0, full, _ROWS_PER_BIG_STATEMENT):
                    chunk = rows[start : start + _ROWS_PER_BIG_STATEMENT]
                    last = connection.execute(big, _flatten(chunk)).lastrowid or last
                for start in range(full, len(rows), _ROWS_PER_STATEMENT):
                    chunk = rows[start : start + _ROWS_PER_STATEMENT]
                    sql = _insert_rows_sql(len(chunk))
                    last = connection.execute(sql, _flatten(chunk)).lastrowid or last
                connection.execute("COMMIT")
                return last
            except BaseException:
                try:
                    if connection.in_transaction:
                        connection.execute("ROLLBACK")
                except BaseException:  # noqa: S110 - a failing disk, or a second interrupt
                    pass  # the next write rolls it back first (above)
                raise

    def _transaction(self) -> _Transaction:
        """``with self._transaction() as connection:`` one write transaction."""
        return _Transaction(self._cache._con)

    @_sqlite_section
    def read_due(
        self, limit: int, now: float | None = None, *, after: tuple[float, int] | None = None
    ) -> Batch:
        """Up to ``limit`` events whose next attempt is due, the longest-due first.

        ``after``: the cursor of an earlier read; only rows past it are read (the
        earlier ones are being sent). Rows that are not our JSON are deleted from the
        log and returned as :class:`CorruptEntry` so the caller can dead-letter them.
        """
        moment = time.time() if now is None else now
        sql = self._cache._sql
        # Rows without a due time were not written by this module (an older version,
        # another diskcache user): read them first, as due, and check them. Once read
        # they get one (below), so they are never read twice.
        rows = sql(_SELECT_UNTAGGED, (limit,)).fetchall()
        if len(rows) < limit and after is None:
            rows += sql(_SELECT_DUE, (moment, limit - len(rows))).fetchall()
        elif len(rows) < limit and after is not None:
            tag, rowid = after
            rows += sql(_SELECT_DUE_AFTER, (moment, tag, tag, rowid, limit - len(rows))).fetchall()
        untagged = [(row[0],) for row in rows if row[3] is None]
        if untagged:
            # Rows from an older version (or another writer) get a due time now, the
            # earliest there is, so a read after this one's cursor does not take them
            # again while they are in flight.
            with self._write_guard, self._transaction() as connection:
                connection.executemany("UPDATE Cache SET tag = 0.0 WHERE rowid = ?", untagged)
            rows = [row if row[3] is not None else (*row[:3], 0.0, *row[4:]) for row in rows]
        # The last row read, in (due time, row id) order; never back over ``after``,
        # whose rows are in flight.
        positions = [(float(row[3]), int(row[0])) for row in rows]
        cursor = max([*positions, after] if after is not None else positions, default=None)
        events: list[QueuedEvent] = []
        corrupt: list[CorruptEntry] = []
        bad_rows: list[tuple[int]] = []
        for row in rows:
            try:
                events.append(_decode_row(row))
            except (CorruptEntryError, InvalidEventError) as exc:
                rowid, key = row[0], row[1]
                name = key if type(key) is str and row[2] == 1 else f"row-{rowid}"
                corrupt.append(CorruptEntry(name, str(exc)))
                bad_rows.append((rowid,))
        if bad_rows:
            with self._write_guard, self._transaction() as connection:
                connection.executemany("DELETE FROM Cache WHERE rowid = ?", bad_rows)
        return Batch(events, corrupt, cursor)

    @_sqlite_section
    def remove(self, keys: Iterable[str]) -> None:
        """Delete delivered (or dead-lettered) events, in one transaction."""
        doomed = [(key,) for key in keys]
        if not doomed:
            return
        with self._write_guard, self._transaction() as connection:
            connection.executemany("DELETE FROM Cache WHERE key = ? AND raw = 1", doomed)

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
        ``count_attempt=False`` only the time and the error change. An event no longer
        in the log (accepted via another path meanwhile) is not brought back.
        """
        moment = time.time() if now is None else now
        updates = [
            (
                next_attempt_at,
                encode_row(
                    queued.event,
                    replayed_at=queued.replayed_at,
                    dead_letter=queued.dead_letter,
                    attempts=queued.attempts + (1 if count_attempt else 0),
                    first_failure_at=queued.first_failure_at or moment,
                    last_error=error,
                )[2],
                queued.key,
            )
            for queued, next_attempt_at in failures
        ]
        if not updates:
            return
        with self._write_guard, self._transaction() as connection:
            connection.executemany(
                "UPDATE Cache SET tag = ?, value = ? WHERE key = ? AND raw = 1", updates
            )

    @_sqlite_section
    def adjust_due_times(self, step: float, now: float, horizon: float) -> int:
        """Keep due times true to steady time across a wall-clock step; returns the rows moved.

        ``step``: seconds the wall clock just stepped (negative: back), 0 for none;
        ``now``: the wall clock after it; ``horizon``: the longest wait the delivering
        process can schedule. Run by the delivering process only (another would move
        the same rows twice).

        * Back: every row due after ``now`` moves back by the step. A retry keeps the
          rest of its wait; a row that was due already (logged before the step) is
          due again. Rows written since have due times at most ``now`` and stay.
        * Forward: retries that were waiting (a due time in the horizon before the
          step, and an error recorded) move forward by it, so a backoff or a
          Retry-After is not cut short. Fresh rows written since the step are due at
          about ``now`` and must not move: they have no error recorded.
        * Always: a due time further than ``horizon`` ahead cannot have been scheduled
          on this clock (a step while no process delivered, a row of an older version
          stamped with a record's future time): due now.
        """
        if not step and not self._cache._sql(_ANY_DUE_AFTER, (now + horizon,)).fetchall():
            return 0  # the usual answer, without taking the write lock
        moved = 0
        with self._write_guard, self._transaction() as connection:
            if step < 0:
                moved += connection.execute(_SHIFT_LATER_DUE, (step, now)).rowcount
            elif step > 0:
                window = (step, now - step, now - step + horizon)
                moved += connection.execute(_SHIFT_WAITING_RETRIES, window).rowcount
            if connection.execute(_ANY_DUE_AFTER, (now + horizon,)).fetchall():
                moved += connection.execute(_DUE_NOW_IF_AFTER, (now, now + horizon)).rowcount
        return moved

    @_sqlite_section
    def get(self, key: str) -> QueuedEvent | None:
        """One waiting event by key, or None (gone, or not readable: left for the worker)."""
        # fetchall, not fetchone: a statement left unfinished keeps its read snapshot
        # open, and this connection would not see later commits.
        rows = self._cache._sql(_SELECT_KEY, (key,)).fetchall()
        row = rows[0] if rows else None
        try:
            return None if row is None else _decode_row(row)
        except (CorruptEntryError, InvalidEventError):
            return None

    @_sqlite_section
    def sendable_through(self, rowid: int, now: float, horizon: float) -> bool:
        """Whether a row with a rowid at most ``rowid`` is still here and can go now:
        never tried yet (whatever its due time says: a record stamped ahead of the
        clock is still sent at once), tried and due for its retry, or due further
        ahead than ``horizon``, the longest wait ever scheduled (the clock stepped
        back since: it is treated as due)."""
        parameters = (rowid, now, now + horizon)
        rows = self._cache._sql(_SELECT_SENDABLE_THROUGH, parameters).fetchall()  # see get()
        return bool(rows)

    @_sqlite_section
    def oldest_logged_at(self) -> float | None:
        """When the oldest waiting event was logged (keys are ULIDs: time-ordered)."""
        rows = self._cache._sql(_SELECT_OLDEST_KEY).fetchall()  # see get()
        row = rows[0] if rows else None
        try:
            return None if row is None else _decode_row(row).event.logged_at
        except (CorruptEntryError, InvalidEventError):
            return None  # the worker quarantines it; the gauge just skips a beat

    @_sqlite_section
    def volume(self) -> int:
        """Bytes the log's rows take on disk (SQLite pages in use), for the shedding
        limits. Pages freed by deliveries are not counted: SQLite reuses them."""
        sql = self._cache._sql
        ((pages,),) = sql("PRAGMA page_count").fetchall()
        ((free,),) = sql("PRAGMA freelist_count").fetchall()
        ((page_size,),) = sql("PRAGMA page_size").fetchall()
        return int((pages - free) * page_size)

    def replaced_on_disk(self, *, at_most_every: float = 0.0) -> bool:
        """Whether the database file we write is gone or another file now (deleted
        directory, a file moved away): SQLite would go on writing to the unlinked one.

        ``at_most_every``: skip the check (answer False) if one ran this recently;
        rows committed meanwhile are salvaged from the old file by :meth:`recover`.
        """
        now = time.monotonic()
        if now - self._identity_checked_at < at_most_every:
            return False
        self._identity_checked_at = now
        return _database_identity(self.directory) != self._identity

    @_sqlite_section
    def recover(self, error: BaseException | None) -> str | None:
        """Try to make the log writable again after ``error``; says what it did.

        * The database file is gone or replaced (the directory was deleted): recreate
          the directory and a fresh database, and move every row still readable
          through our open connection into it, so nothing committed is lost.
        * SQLite reports the file corrupt: rename the files aside (quarantine) and
          start a fresh database.
        * Anything else (a full or read-only disk): nothing to do but wait.
        """
        with self._write_guard:
            if self.replaced_on_disk():
                return self._reopen_replaced()
            if isinstance(error, sqlite3.DatabaseError) and _is_corruption(error):
                return self._quarantine_corrupt()
        return None

    def _reopen_replaced(self) -> str:
        old = self._cache
        survivors = self._salvage()
        self._open(_open_cache(self.directory, fsync=self._fsync))
        self._insert_salvaged(survivors)
        with contextlib.suppress(Exception):
            old.close()
        return (
            f"the queue database was gone or replaced; made a fresh one in "
            f"{self.directory} and moved {len(survivors)} waiting event(s) into it"
        )

    def _quarantine_corrupt(self) -> str:
        old = self._cache
        survivors = self._salvage()  # whatever SQLite can still read of it
        with contextlib.suppress(Exception):
            old.close()
        moved = quarantine_database(self.directory)
        self._open(_open_cache(self.directory, fsync=self._fsync))
        self._insert_salvaged(survivors)
        return (
            f"the queue database in {self.directory} is corrupt; quarantined as "
            f"{', '.join(moved) or 'nothing'}, started a fresh one and moved the "
            f"{len(survivors)} event(s) still readable into it"
        )

    def _salvage(self) -> list[Row]:
        """Every row of ours still readable in the file we had open (best effort).

        One damaged page fails a full scan: then the rows are read in ranges of row
        ids, and a range that fails one by one, so only what is unreadable is lost.
        """
        if self._anchor is None or self._anchor[0] != os.getpid():
            return []  # in a forked child the parent's connection is not ours to use
        connection = self._anchor[1]
        try:
            return _readable_rows(connection, _SALVAGE_ALL, ())
        except (sqlite3.Error, OSError):
            pass
        try:
            ((highest,),) = connection.execute("SELECT max(rowid) FROM Cache").fetchall()
        except (sqlite3.Error, OSError):
            return []
        rows: list[Row] = []
        for start in range(1, int(highest or 0) + 1, _SALVAGE_RANGE):
            end = start + _SALVAGE_RANGE - 1
            try:
                rows += _readable_rows(connection, _SALVAGE_RANGE_SQL, (start, end))
            except (sqlite3.Error, OSError):
                for rowid in range(start, end + 1):
                    with contextlib.suppress(sqlite3.Error, OSError):
                        rows += _readable_rows(connection, _SALVAGE_ONE, (rowid,))
        return rows

    def _insert_salvaged(self, rows: list[Row]) -> None:
        if rows:
            with self._transaction() as connection:
                connection.executemany(_INSERT_ROW, rows)

    @_sqlite_section
    def __contains__(self, key: object) -> bool:
        return key in self._cache

    @_sqlite_section
    def __len__(self) -> int:
        return len(self._cache)

    def close(self) -> None:
        """Close every connection to the log, of every thread (a later use reopens)."""
        self._cache.close_all()
        with _FORK_GATE.inside():
            if self._anchor is not None and self._anchor[0] == os.getpid():
                with contextlib.suppress(sqlite3.Error):
                    self._anchor[1].close()
                self._anchor = None


class _Transaction:
    """A write transaction on one connection, rolled back on any exception.

    A class, not a generator-based context manager, on purpose: Python runs signal
    handlers after calls return, and contextlib's ``__enter__`` is one call deeper
    than BEGIN. An interrupt (KeyboardInterrupt, or SystemExit from a signal handler)
    raised there, after BEGIN and before the ``with`` block is entered, left the
    transaction open: the connection kept SQLite's write lock, other processes got
    "database is locked", and every later statement on it joined a transaction that
    never committed. Here the BEGIN and its roll-back are in one ``try``.
    """

    __slots__ = ("connection",)

    def __init__(self, connection: sqlite3.Connection) -> None:
        self.connection = connection

    def __enter__(self) -> sqlite3.Connection:
        connection = self.connection
        try:
            if connection.in_transaction:  # never join one left open: it would not commit
                _roll_back(connection)
            connection.execute("BEGIN IMMEDIATE")
        except BaseException:
            _roll_back(connection)
            raise
        return connection

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is not None:
            _roll_back(self.connection)
            return
        try:
            self.connection.execute("COMMIT")
        except BaseException:
            # Also when COMMIT itself fails (a full disk): a transaction left open
            # would hold the write lock and make this connection unusable.
            _roll_back(self.connection)
            raise


def _roll_back(connection: sqlite3.Connection) -> None:
    """Roll back an open transaction, even through a storm of interrupts."""

    def roll_back() -> None:
        if connection.in_transaction:
            # A failing disk can make the connection unusable: nothing to roll back then.
            with contextlib.suppress(sqlite3.Error):
                connection.execute("ROLLBACK")

    run_through_interrupts(roll_back)


def _reset_wal_in_child(reference: weakref.ref[WriteAheadLog]) -> None:
    # The fork gate waits for writers to finish, but only for so long.
    wal = reference()
    if wal is not None:
        wal._write_guard = threading.Lock()


_SALVAGE_COLUMNS = (
    "SELECT key, tag, value FROM Cache WHERE raw = 1 AND typeof(key) = 'text'"
    " AND typeof(value) = 'text'"
)
_SALVAGE_ALL = _SALVAGE_COLUMNS
_SALVAGE_RANGE_SQL = _SALVAGE_COLUMNS + " AND rowid BETWEEN ? AND ?"
_SALVAGE_ONE = _SALVAGE_COLUMNS + " AND rowid = ?"
_SALVAGE_RANGE = 256


def _readable_rows(
    connection: sqlite3.Connection, sql: str, parameters: tuple[int, ...]
) -> list[Row]:
    return [
        (key, 0.0 if tag is None else tag, value)
        for key, tag, value in connection.execute(sql, parameters).fetchall()
    ]


def _database_identity(directory: Path) -> tuple[int, int] | None:
    try:
        status = (directory / diskcache.core.DBNAME).stat()
    except OSError:
        return None
    return status.st_dev, status.st_ino


def _is_corruption(error: sqlite3.DatabaseError) -> bool:
    text = str(error).lower()
    return "malformed" in text or "not a database" in text or "corrupt" in text


#: A row ready for :meth:`WriteAheadLog.append_rows`: (event id, due time, JSON text).
Row = tuple[str, float, str]

_ROW_VERSION = 2
_MODE_RAW = diskcache.core.MODE_RAW
# The SQL of the hot paths, on diskcache's Cache table. Rows are inline text (mode 1,
# diskcache's MODE_RAW), never expire, and carry their due time in the indexed tag.
_INSERT_INTO = (
    "INSERT OR IGNORE INTO Cache(key, raw, store_time, expire_time, access_time,"
    " access_count, tag, size, mode, filename, value) VALUES "
)
# One row: key, due time and value are the parameters.
_ROW_VALUES = (
    "(?, 1, (julianday('now') - 2440587.5) * 86400.0, NULL,"
    " (julianday('now') - 2440587.5) * 86400.0, 0, ?, 0, 1, NULL, ?)"
)
_INSERT_ROW = _INSERT_INTO + _ROW_VALUES
# Up to this many rows (a group of essential events) go in one multi-row INSERT; more
# (the writer's groups) in statements of _ROWS_PER_BIG_STATEMENT rows, then the rest in
# statements of at most this many, within one transaction. Few sizes: few statements
# for SQLite to compile and cache.
_ROWS_PER_STATEMENT = 16
_ROWS_PER_BIG_STATEMENT = 64


@functools.lru_cache(maxsize=_ROWS_PER_STATEMENT + 1)
def _insert_rows_sql(count: int) -> str:
    """An INSERT of ``count`` rows in one statement."""
    return _INSERT_INTO + ", ".join([_ROW_VALUES] * count)


def _flatten(rows: Sequence[Row]) -> list[object]:
    return [value for row in rows for value in row]


_SELECT_UNTAGGED = (
    "SELECT rowid, key, raw, tag, mode, filename, value FROM Cache WHERE tag IS NULL LIMIT ?"
)
_SELECT_DUE = (
    "SELECT rowid, key, raw, tag, mode, filename, value FROM Cache"
    " WHERE tag <= ? ORDER BY tag, rowid LIMIT ?"
)
_SELECT_DUE_AFTER = (
    "SELECT rowid, key, raw, tag, mode, filename, value FROM Cache"
    " WHERE tag <= ? AND (tag > ? OR (tag = ? AND rowid > ?)) ORDER BY tag, rowid LIMIT ?"
)
_SELECT_KEY = (
    "SELECT rowid, key, raw, tag, mode, filename, value FROM Cache WHERE key = ? AND raw = 1"
)
# A row that never failed has no error in its history (the seventh value of a row: null,
# or a replay's history without one; a version 1 row has none at that path either and
# counts as never failed). A row that is not JSON is the worker's to quarantine: it
# counts as sendable (json_extract would raise on it).
_SELECT_SENDABLE_THROUGH = (
    "SELECT 1 FROM Cache WHERE rowid <= ? AND raw = 1 AND (tag <= ? OR tag > ? OR CASE"
    " WHEN json_valid(value) THEN json_extract(value, '$[6].last_error') IS NULL ELSE 1 END)"
    " LIMIT 1"
)
_SELECT_OLDEST_KEY = (
    "SELECT rowid, key, raw, tag, mode, filename, value FROM Cache"
    " WHERE raw = 1 ORDER BY key LIMIT 1"
)
# Clock steps (see WriteAheadLog.adjust_due_times). A row waits for a retry when its
# history (element 6 of a version 2 row) records an error; json_valid first, so a
# damaged row (left for read_due to quarantine) does not fail the statement.
_SHIFT_LATER_DUE = "UPDATE Cache SET tag = tag + ? WHERE tag > ? AND raw = 1"
_SHIFT_WAITING_RETRIES = (
    "UPDATE Cache SET tag = tag + ? WHERE tag > ? AND tag <= ? AND raw = 1"
    " AND CASE WHEN json_valid(value) THEN json_extract(value, '$[6].last_error') END"
    " IS NOT NULL"
)
_ANY_DUE_AFTER = "SELECT 1 FROM Cache WHERE tag > ? LIMIT 1"
_DUE_NOW_IF_AFTER = "UPDATE Cache SET tag = ? WHERE tag > ? AND raw = 1"
# Built once: json.dumps with options builds a new encoder on every call.
_ROW_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def encode_row(
    event: Event,
    *,
    replayed_at: float | None = None,
    attempts: int = 0,
    first_failure_at: float | None = None,
    last_error: str | None = None,
    dead_letter: DeadLetterHistory | None = None,
) -> Row:
    """The log row for ``event``: ``[2, name, customer_id, anonymous_id, timestamp,
    logged_at, history, data]``, where history is null for an event never tried.

    Positional and without the id (it is the key), so a row costs little more than
    the event's own JSON. The data is spliced in as encoded at emit. A replayed dead
    letter's history goes in ``history["dead_letter"]``; rows without it (never
    replayed, or replayed by an earlier version) read as before.
    """
    history: dict[str, Any] | None = None
    if attempts or first_failure_at is not None or last_error is not None or replayed_at:
        history = {
            "attempts": attempts,
            "first_failure_at": first_failure_at,
            "last_error": last_error,
            "replayed_at": replayed_at,
        }
    if dead_letter is not None:
        history = history or {"attempts": attempts, "replayed_at": replayed_at}
        history["dead_letter"] = dead_letter.to_json()
    head = _ROW_ENCODER.encode(
        [
            _ROW_VERSION,
            event.name,
            event.customer_id,
            event.anonymous_id,
            event.timestamp,
            event.logged_at,
            history,
        ]
    )
    # Due when logged, to keep the log in logging order, but never later than now: a
    # record stamped ahead of this clock (a host with a fast clock forwarding it, a
    # clock stepped back since) must not wait until the clock catches up.
    due = min(event.logged_at, time.time()) if replayed_at is None else replayed_at
    return event.id, due, f"{head[:-1]},{event.data_json}]"


def _decode_row(row: tuple[Any, ...]) -> QueuedEvent:
    """A row selected by one of the queries above, checked and decoded; never unpickles.

    Raises:
        CorruptEntryError: the row is not inline text under a text key.
        InvalidEventError: the text is not an entry of ours.
    """
    _, key, raw, tag, mode, filename, value = row
    if type(key) is not str or raw != 1:
        raise CorruptEntryError("a queue key is not a plain string (refused, not decoded)")
    if mode != _MODE_RAW or filename is not None or type(value) is not str:
        raise CorruptEntryError(
            f"a stored row has mode {mode}, not inline JSON text (refused, not decoded)"
        )
    try:
        raw_entry = json.loads(value)
        if type(raw_entry) is dict:  # version 1: written before rows had a due time
            return _decode_entry(key, value)
        version, name, customer_id, anonymous_id, timestamp, logged_at, history, data = raw_entry
        if version != _ROW_VERSION or type(data) is not dict:
            raise InvalidEventError(f"unknown entry version {version!r}")
        history = history or {}
        event = Event(
            id=key,
            name=str(name),
            customer_id=customer_id,
            anonymous_id=anonymous_id,
            data_json=_ROW_ENCODER.encode(data),
            timestamp=int(timestamp),
            logged_at=float(logged_at),
        )
        return QueuedEvent(
            key=key,
            event=event,
            attempts=int(history.get("attempts", 0)),
            first_failure_at=history.get("first_failure_at"),
            last_error=history.get("last_error"),
            next_attempt_at=float(tag) if tag is not None else 0.0,
            replayed_at=history.get("replayed_at"),
            dead_letter=DeadLetterHistory.from_json(history.get("dead_letter")),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InvalidEventError(
            f"queue entry is not valid JSON of ours ({type(exc).__name__})"
        ) from None


def _decode_entry(key: str, text: str) -> QueuedEvent:
    """A version 1 entry (a JSON object with the event inside), from before rows had a
    due time; still read so a queue left by an older version is delivered."""
    raw = json.loads(text)
    if raw.get("v") != 1:
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


@dataclass(frozen=True, slots=True)
class DeadLetterReason:
    """Why an event was dead-lettered, and when."""

    error_type: str
    status: int | None
    message: str
    at: float

    def to_json(self) -> dict[str, Any]:
        return {
            "error_type": self.error_type,
            "status": self.status,
            "message": self.message,
            "at": self.at,
        }

    @classmethod
    def from_json(cls, raw: Any) -> DeadLetterReason:
        """Raises ``KeyError``, ``TypeError`` or ``ValueError`` for anything else."""
        status = raw["status"]
        return cls(
            error_type=str(raw["error_type"]),
            status=None if status is None else int(status),
            message=str(raw["message"]),
            at=float(raw["at"]),
        )


@dataclass(frozen=True, slots=True)
class ReplayRecord:
    """One replay of a dead letter that did not deliver it: when, and what came back.

    An accepted replay leaves no record: the entry leaves the store.
    """

    at: float  # when it was replayed
    error_type: str  # the reason it came back with
    status: int | None
    message: str
    failed_at: float  # when it came back

    def to_json(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "error_type": self.error_type,
            "status": self.status,
            "message": self.message,
            "failed_at": self.failed_at,
        }

    @classmethod
    def came_back(cls, replayed_at: float, reason: DeadLetterReason) -> ReplayRecord:
        """The record of a replay at ``replayed_at`` that came back for ``reason``."""
        return cls(replayed_at, reason.error_type, reason.status, reason.message, reason.at)

    @classmethod
    def from_json(cls, raw: Any) -> ReplayRecord:
        """Raises ``KeyError``, ``TypeError`` or ``ValueError`` for anything else."""
        status = raw["status"]
        return cls(
            at=float(raw["at"]),
            error_type=str(raw["error_type"]),
            status=None if status is None else int(status),
            message=str(raw["message"]),
            failed_at=float(raw["failed_at"]),
        )


# The replays an entry keeps (the latest); replay_count counts them all. A cron job
# replaying through a long outage must not grow an entry without bound.
_REPLAY_HISTORY = 20


@dataclass(frozen=True, slots=True)
class DeadLetterHistory:
    """What a dead letter carries back into the write-ahead log when it is replayed
    there, so that failing again writes it back with its first reason and attempts."""

    original: DeadLetterReason
    replays: tuple[ReplayRecord, ...]
    replay_count: int
    first_failure_at: float
    attempts: int

    def to_json(self) -> dict[str, Any]:
        return {
            "original": self.original.to_json(),
            "replays": [record.to_json() for record in self.replays],
            "replay_count": self.replay_count,
            "first_failure_at": self.first_failure_at,
            "attempts": self.attempts,
        }

    @classmethod
    def from_json(cls, raw: Any) -> DeadLetterHistory | None:
        """None when absent or not ours: the event is delivered all the same."""
        if raw is None:
            return None
        try:
            return cls(
                original=DeadLetterReason.from_json(raw["original"]),
                replays=tuple(ReplayRecord.from_json(item) for item in raw["replays"]),
                replay_count=int(raw["replay_count"]),
                first_failure_at=float(raw["first_failure_at"]),
                attempts=int(raw["attempts"]),
            )
        except (KeyError, TypeError, ValueError):
            return None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An event Customer.io will never accept, kept with why.

    ``error_type``, ``status``, ``message`` and ``last_failure_at`` are the latest
    reason; ``original`` is the reason it was first dead-lettered for (the same, for
    an entry never replayed), and ``replays`` the replays that did not deliver it.
    """

    key: str
    event: dict[str, Any] | None  # None when the stored row could not even be read
    status: int | None
    error_type: str
    message: str
    attempts: int
    first_failure_at: float
    last_failure_at: float
    original: DeadLetterReason | None = None  # None only for an unreadable entry
    replays: tuple[ReplayRecord, ...] = ()
    replay_count: int = 0  # every replay that failed, also those dropped from replays

    @property
    def event_name(self) -> str | None:
        return None if self.event is None else str(self.event.get("name"))

    @property
    def latest(self) -> DeadLetterReason:
        return DeadLetterReason(self.error_type, self.status, self.message, self.last_failure_at)

    def matches_reason(self, reason: str) -> bool:
        """Whether ``reason`` is the latest or the original error type, or text in
        either message."""
        reasons = [self.latest] if self.original is None else [self.latest, self.original]
        return any(reason == r.error_type or reason in r.message for r in reasons)

    def history(self) -> DeadLetterHistory:
        """What a replay into the write-ahead log carries with the event."""
        return DeadLetterHistory(
            original=self.original or self.latest,
            replays=self.replays,
            replay_count=self.replay_count,
            first_failure_at=self.first_failure_at,
            attempts=self.attempts,
        )


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
        original: DeadLetterReason | None = None,
        replays: Sequence[ReplayRecord] = (),
        replay_count: int | None = None,
    ) -> None:
        """Store (or overwrite) the entry ``key`` with this reason as the latest.

        ``original``: the reason it was first dead-lettered for; when not given, an
        entry already stored under ``key`` keeps its own (an event in both the log and
        this store after a crash, failing again), and a new entry's is this reason.
        ``replays``: the replays that failed, oldest first; the latest
        ``_REPLAY_HISTORY`` are kept, ``replay_count`` (default: how many are given)
        counts them all.
        """
        moment = time.time() if now is None else now
        if original is None:
            existing = self.get(key)
            if existing is not None and existing.original is not None:
                original = existing.original
                replays, replay_count = existing.replays, existing.replay_count
            else:
                original = DeadLetterReason(error_type, status, message, moment)
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
            # Added in place, still version 1: an entry without them reads as one
            # never replayed, and an earlier version reading these ignores them.
            "original": original.to_json(),
            "replays": [record.to_json() for record in replays[-_REPLAY_HISTORY:]],
            "replay_count": len(replays) if replay_count is None else replay_count,
        }
        self._cache.set(key, json.dumps(entry, ensure_ascii=False, separators=(",", ":")))

    def __iter__(self) -> Iterator[DeadLetter]:
        with _FORK_GATE.inside():  # never hold the gate while the caller consumes
            try:
                keys = list(self._cache.iterkeys())
            except CorruptEntryError:
                for quarantined in _delete_non_text_keys(self._cache):
                    _internal_log.error(
                        "dead-letter %s deleted: %s",
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
        """One entry by its key (the event id, in either case), or None."""
        try:
            text = self._cache.get(key)
            if text is None and key != key.upper():  # ULIDs are case-insensitive
                key = key.upper()
                text = self._cache.get(key)
        except CorruptEntryError as exc:
            # Listed, counted and purgeable like any entry; never decoded or replayed.
            return DeadLetter(key, None, None, "corrupt_entry", str(exc), 0, 0.0, 0.0)
        if text is None:
            return None
        try:
            raw = json.loads(text)
            latest = DeadLetterReason(
                raw["error_type"], raw["status"], raw["message"], raw["last_failure_at"]
            )
            # An entry from before replays kept history: its reason is the original.
            original = raw.get("original")
            return DeadLetter(
                key=raw["key"],
                event=raw["event"],
                status=raw["status"],
                error_type=raw["error_type"],
                message=raw["message"],
                attempts=raw["attempts"],
                first_failure_at=raw["first_failure_at"],
                last_failure_at=raw["last_failure_at"],
                original=latest if original is None else DeadLetterReason.from_json(original),
                replays=tuple(ReplayRecord.from_json(item) for item in raw.get("replays", ())),
                replay_count=int(raw.get("replay_count", 0)),
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

        ``reason`` matches the latest or the original error type exactly, or appears
        in either message (a replay that failed must not hide an entry from a second
        one by its first reason). ``since`` and ``before`` compare with the last
        failure time.
        """
        wanted = None if keys is None else set(keys)
        chosen: list[DeadLetter] = []
        for letter in self if wanted is None else filter(None, map(self.get, sorted(wanted))):
            if event is not None and letter.event_name != event:
                continue
            if reason is not None and not letter.matches_reason(reason):
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
        whose event could not be read stay here. The log row carries the entry's
        original reason and replay history: if it fails again, the worker writes it
        back with them. Returns how many moved.
        """
        moved = 0
        for letter in letters:
            if letter.event is None:
                continue
            wal.append(
                event_from_dict(letter.event), replayed_at=time.time(), dead_letter=letter.history()
            )
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

    def close(self) -> None:
        """Close every connection to the store, of every thread (a later use reopens)."""
        self._cache.close_all()
