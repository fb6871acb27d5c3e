"""diskcache plumbing: the JSON-only Disk, the fork gate, opening, salvage helpers.

Both diskcache stores (the write-ahead log and the dead letters) are caches in the
queue directory, opened so that:

* nothing is ever evicted or expired (diskcache evicts by default once over 1 GiB);
* values are JSON texts we wrote, stored inline in SQLite, and anything else read
  back (a pickle, a blob, a file) raises :class:`CorruptEntryError` instead of
  being decoded: a planted pickle never runs;
* the directory is 0700 and every file 0600, whatever the process umask, because
  events carry personal data.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import sqlite3
import stat
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import diskcache

from ..errors import CorruptEntryError, QueueError
from ..interrupts import run_through_interrupts
from .rows import CorruptEntry, Row

_internal_log = logging.getLogger("cio_logging")

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


class Connection(sqlite3.Connection):
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
LIVE_CONNECTIONS: weakref.WeakSet[Connection] = weakref.WeakSet()
_INHERITED_CONNECTIONS: list[Connection] = []
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
        self.connections: list[Connection] = []

    def add(self, connection: Connection) -> None:
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


def _orphan(connections: weakref.WeakSet[Connection]) -> None:
    for connection in list(connections):
        connection.orphaned = True


def close_if_ours(pid: int, connection: sqlite3.Connection) -> None:
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
        self._held_over_fork: list[Connection] = []
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
        self._held_over_fork = list(LIVE_CONNECTIONS)

    def _after_fork_in_parent(self) -> None:
        self._held_over_fork = []
        with self._condition:
            self._forking = False
            self._condition.notify_all()


FORK_GATE = _ForkGate()


def sqlite_section(method: Method) -> Method:
    """Run ``method`` inside the fork gate."""

    @functools.wraps(method)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        with FORK_GATE.inside():
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
        self._open_connections: weakref.WeakSet[Connection] = weakref.WeakSet()
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
        connection: Connection | None = getattr(local, "connection", None)
        if connection is None:
            connection = sqlite3.connect(
                os.path.join(self._directory, diskcache.core.DBNAME),
                timeout=self._timeout,
                isolation_level=None,
                factory=Connection,
                # Used by this thread only; closed by another in close_all, when no
                # thread is inside SQLite, or as the thread ends.
                check_same_thread=False,
            )
            local.connection = connection
            LIVE_CONNECTIONS.add(connection)
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
        with FORK_GATE.alone(_CLOSE_WAIT_SECONDS) as alone:
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


def open_cache(directory: Path, *, fsync: bool | None) -> diskcache.Cache:
    """Open (or create) the cache in ``directory``; a corrupt database file is
    quarantined (renamed aside, kept for forensics) and a fresh one started."""
    try:
        return _open_cache_once(directory, fsync=fsync)
    except QueueError as exc:
        cause = exc.__cause__
        if not isinstance(cause, sqlite3.DatabaseError) or not is_corruption(cause):
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


def delete_non_text_keys(cache: diskcache.Cache) -> list[CorruptEntry]:
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


class Transaction:
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
                roll_back(connection)
            connection.execute("BEGIN IMMEDIATE")
        except BaseException:
            roll_back(connection)
            raise
        return connection

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is not None:
            roll_back(self.connection)
            return
        try:
            self.connection.execute("COMMIT")
        except BaseException:
            # Also when COMMIT itself fails (a full disk): a transaction left open
            # would hold the write lock and make this connection unusable.
            roll_back(self.connection)
            raise


def roll_back(connection: sqlite3.Connection) -> None:
    """Roll back an open transaction, even through a storm of interrupts."""

    def roll_back() -> None:
        if connection.in_transaction:
            # A failing disk can make the connection unusable: nothing to roll back then.
            with contextlib.suppress(sqlite3.Error):
                connection.execute("ROLLBACK")

    run_through_interrupts(roll_back)


# The person a row's text names (see Event.person), for rows that have no person
# column yet: written by an earlier version, or salvaged from a file that lacks it.
PERSON_OF_VALUE = (
    "CASE WHEN json_valid(value) AND json_type(value) = 'array' THEN coalesce("
    "'c:' || json_extract(value, '$[2]'), 'a:' || json_extract(value, '$[3]')) END"
)
SALVAGE_COLUMNS = (
    "SELECT key, tag, value, "  # noqa: S608 - constant SQL, no input in it
    + PERSON_OF_VALUE
    + " FROM Cache WHERE raw = 1 AND typeof(key) = 'text' AND typeof(value) = 'text'"
)
SALVAGE_ALL = SALVAGE_COLUMNS
SALVAGE_RANGE = 256


@dataclass(frozen=True)
class SalvageQueries:
    """How to read one table's rows back after damage: all at once, or by ranges of
    ``key`` between its ``bounds``, or one by one (each query ends in a WHERE)."""

    all: str
    bounds: str
    key: str

    @property
    def range(self) -> str:
        return f"{self.all} AND {self.key} BETWEEN ? AND ?"

    @property
    def one(self) -> str:
        return f"{self.all} AND {self.key} = ?"


def readable_rows(
    connection: sqlite3.Connection, sql: str, parameters: tuple[int, ...]
) -> list[Row]:
    return [
        (key, 0.0 if tag is None else tag, value, person)
        for key, tag, value, person in connection.execute(sql, parameters).fetchall()
    ]


def database_identity(directory: Path) -> tuple[int, int] | None:
    try:
        status = (directory / diskcache.core.DBNAME).stat()
    except OSError:
        return None
    return status.st_dev, status.st_ino


def is_corruption(error: sqlite3.DatabaseError) -> bool:
    text = str(error).lower()
    return "malformed" in text or "not a database" in text or "corrupt" in text
