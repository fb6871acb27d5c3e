"""The diskcache store: the write-ahead log and the dead-letter store on local disk.

An event is appended before ``emit`` returns and deleted only after Customer.io
accepted it (or it was moved to the dead-letter store), so the log is at-least-once.
Keys are the events' ULIDs, so key order is logging order (to the millisecond) and
a resend keeps its id. The plumbing (fork gate, opening, salvage) is in ``_sqlite.py``.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import operator
import os
import sqlite3
import threading
import time
import weakref
from collections import Counter
from collections.abc import Collection, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import diskcache

from ..errors import CorruptEntryError, InvalidEventError
from ..events import Event, event_from_dict
from ._sqlite import (
    FORK_GATE,
    LIVE_CONNECTIONS,
    PERSON_OF_VALUE,
    SALVAGE_ALL,
    SALVAGE_ONE,
    SALVAGE_RANGE,
    SALVAGE_RANGE_SQL,
    Connection,
    Transaction,
    close_if_ours,
    database_identity,
    delete_non_text_keys,
    is_corruption,
    open_cache,
    quarantine_database,
    readable_rows,
    sqlite_section,
)
from .rows import (
    Batch,
    CorruptEntry,
    DeadLetter,
    DeadLetterHistory,
    DeadLetterReason,
    QueuedEvent,
    ReplayRecord,
    Row,
    dead_letter_entry,
    dead_letter_from_text,
    decode_row,
    encode_row,
    matching_letters,
    storable_key,
)

if TYPE_CHECKING:
    from . import EventLog

_internal_log = logging.getLogger("cio_logging")

_MODE_RAW = diskcache.core.MODE_RAW


def _decode_row(row: tuple[Any, ...]) -> QueuedEvent:
    """A row selected by one of the queries below, checked and decoded; never unpickles.

    Raises:
        CorruptEntryError: the row is not inline text under a text key.
        InvalidEventError: the text is not an entry of ours.
    """
    rowid, key, raw, tag, mode, filename, value = row
    if type(key) is not str or raw != 1:
        raise CorruptEntryError("a queue key is not a plain string (refused, not decoded)")
    if mode != _MODE_RAW or filename is not None or type(value) is not str:
        raise CorruptEntryError(
            f"a stored row has mode {mode}, not inline JSON text (refused, not decoded)"
        )
    return decode_row(key, tag, value, rowid)


class WriteAheadLog:
    """Events waiting for Customer.io, on disk, oldest due first.

    Rows live in diskcache's ``Cache`` table: the key is the event id, the value our
    JSON text (see :func:`encode_row`) and the ``tag`` column, indexed, the time the
    next attempt is due (the logging time for a fresh event). A column of ours,
    ``person`` (indexed; diskcache names its columns and never sees it), holds whose
    call it is: a row is read only once no earlier row of the same person would be
    read after it (see ``_SELECT_DUE``), so a person's calls go in logging order
    through retries and restarts. Reading what is due is
    then an index range scan, whatever the backlog of events waiting for a retry, and
    appends, acknowledgements and retries are one statement per batch in one
    transaction: the hot paths are written in SQL on diskcache's own connection, and
    diskcache's triggers keep its counters right.
    """

    @sqlite_section
    def __init__(self, directory: Path, *, fsync: bool | None = False) -> None:
        """``fsync``: True for synchronous=FULL, False for NORMAL, None to leave it."""
        self.directory = directory
        self._fsync = fsync
        # One writer at a time in this process: threads queue on a fair lock rather
        # than on SQLite's busy handler, whose sleeps made the latency tail.
        self._write_guard = threading.Lock()
        self._anchor: tuple[int, sqlite3.Connection] | None = None
        self._open(open_cache(directory, fsync=fsync))
        reference = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _reset_wal_in_child(reference))

    def _open(self, cache: diskcache.Cache) -> None:
        """Start using ``cache``; remember which file it is, and keep a connection to it."""
        _upgrade_schema(cache)
        self._cache = cache
        self._identity = database_identity(self.directory)
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
                factory=Connection,
                check_same_thread=False,  # used under the write guard, by whichever thread
            )
            LIVE_CONNECTIONS.add(anchor)
            # A first read opens SQLite's -wal and -shm files too: rows not yet
            # checkpointed live there, and once deleted they cannot be opened by path.
            anchor.execute("SELECT count(*) FROM Settings").fetchall()
            self._anchor = (os.getpid(), anchor)
            # A log collected unclosed closes it (nobody else uses it); not at exit,
            # when a daemon flush thread may still be salvaging through it.
            weakref.finalize(self, close_if_ours, os.getpid(), anchor).atexit = False

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

    @sqlite_section
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

    def _transaction(self) -> Transaction:
        """``with self._transaction() as connection:`` one write transaction."""
        return Transaction(self._cache._con)

    @sqlite_section
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
            rows += sql(_SELECT_DUE_AFTER, (moment, tag, rowid, limit - len(rows))).fetchall()
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

    @sqlite_section
    def earlier_rows(
        self, people: Collection[str], through: int
    ) -> list[tuple[str, int, float, str]]:
        """``(person, position, due time, key)`` of every row of ``people`` at or before
        ``through``, in commit order (see :meth:`EventLog.earlier_rows`)."""
        found: list[tuple[str, int, float, str]] = []
        for chunk, marks in _chunks_of_people(people):
            found += self._cache._sql(
                "SELECT person, rowid, coalesce(tag, 0.0), key FROM Cache"  # noqa: S608
                f" INDEXED BY Cache_person WHERE person IN ({marks}) AND rowid <= ?"
                " ORDER BY rowid",
                (*chunk, through),
            ).fetchall()
        if len(people) > _PEOPLE_PER_STATEMENT:
            found.sort(key=_POSITION)  # one statement's rows are in order already
        return found

    @sqlite_section
    def person_counts(self, people: Collection[str], through: int) -> dict[str, int]:
        """How many rows each of ``people`` has at or before ``through``: the cheap
        check before :meth:`earlier_rows` (counted in SQLite, nothing listed)."""
        counts: dict[str, int] = {}
        for chunk, marks in _chunks_of_people(people):
            counts.update(
                self._cache._sql(
                    "SELECT person, count(*) FROM Cache INDEXED BY Cache_person"  # noqa: S608
                    f" WHERE person IN ({marks}) AND rowid <= ? GROUP BY person",
                    (*chunk, through),
                ).fetchall()
            )
        return counts

    @sqlite_section
    def remove(self, keys: Iterable[str], *, delivered: int = 0) -> None:
        """Delete delivered (or dead-lettered) events, in one transaction.

        ``delivered``: how many of them Customer.io accepted; added to the queue's count
        of delivered events in the same transaction, so the count is exact whatever
        happens to the process after (see :meth:`delivered_total`).
        """
        doomed = list(keys)
        if not doomed:
            return
        # One statement per chunk, not executemany: executemany steps the statement
        # once per row from Python (a tenth of the sender's CPU), a statement with an
        # IN list deletes a whole batch in one call into SQLite. diskcache's delete
        # trigger is FOR EACH ROW, so its count stays right either way.
        with self._write_guard, self._transaction() as connection:
            for start in range(0, len(doomed), _KEYS_PER_STATEMENT):
                chunk = doomed[start : start + _KEYS_PER_STATEMENT]
                connection.execute(_delete_keys_sql(len(chunk)), chunk)
            if delivered:
                connection.execute(_COUNT_DELIVERED, (delivered,))

    @sqlite_section
    def delivered_total(self) -> int | None:
        """Events delivered from this queue, by every process, since it was created."""
        rows = self._cache._sql(_READ_DELIVERED).fetchall()
        return int(rows[0][0]) if rows else 0

    @sqlite_section
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

    @sqlite_section
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

    @sqlite_section
    def get(self, key: str) -> QueuedEvent | None:
        """One waiting event by key, or None (gone, or not readable: left for the worker)."""
        if not storable_key(key):
            return None
        # fetchall, not fetchone: a statement left unfinished keeps its read snapshot
        # open, and this connection would not see later commits.
        rows = self._cache._sql(_SELECT_KEY, (key,)).fetchall()
        row = rows[0] if rows else None
        try:
            return None if row is None else _decode_row(row)
        except (CorruptEntryError, InvalidEventError):
            return None

    @sqlite_section
    def sendable_through(self, rowid: int, now: float, horizon: float) -> bool:
        """Whether a row with a rowid at most ``rowid`` is still here and can go now:
        never tried yet (whatever its due time says: a record stamped ahead of the
        clock is still sent at once), tried and due for its retry, or due further
        ahead than ``horizon``, the longest wait ever scheduled (the clock stepped
        back since: it is treated as due)."""
        parameters = (rowid, now, now + horizon)
        rows = self._cache._sql(_SELECT_SENDABLE_THROUGH, parameters).fetchall()  # see get()
        return bool(rows)

    @sqlite_section
    def oldest_logged_at(self) -> float | None:
        """When the oldest waiting event was logged (keys are ULIDs: time-ordered)."""
        rows = self._cache._sql(_SELECT_OLDEST_KEY).fetchall()  # see get()
        row = rows[0] if rows else None
        try:
            return None if row is None else _decode_row(row).event.logged_at
        except (CorruptEntryError, InvalidEventError):
            return None  # the worker quarantines it; the gauge just skips a beat

    @sqlite_section
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
        return database_identity(self.directory) != self._identity

    @sqlite_section
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
            if isinstance(error, sqlite3.DatabaseError) and is_corruption(error):
                return self._quarantine_corrupt()
        return None

    def _reopen_replaced(self) -> str:
        old = self._cache
        survivors = self._salvage()
        self._open(open_cache(self.directory, fsync=self._fsync))
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
        self._open(open_cache(self.directory, fsync=self._fsync))
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
            return readable_rows(connection, SALVAGE_ALL, ())
        except (sqlite3.Error, OSError):
            pass
        try:
            ((highest,),) = connection.execute("SELECT max(rowid) FROM Cache").fetchall()
        except (sqlite3.Error, OSError):
            return []
        rows: list[Row] = []
        for start in range(1, int(highest or 0) + 1, SALVAGE_RANGE):
            end = start + SALVAGE_RANGE - 1
            try:
                rows += readable_rows(connection, SALVAGE_RANGE_SQL, (start, end))
            except (sqlite3.Error, OSError):
                for rowid in range(start, end + 1):
                    with contextlib.suppress(sqlite3.Error, OSError):
                        rows += readable_rows(connection, SALVAGE_ONE, (rowid,))
        return rows

    def _insert_salvaged(self, rows: list[Row]) -> None:
        if rows:
            with self._transaction() as connection:
                connection.executemany(_INSERT_ROW, rows)

    @sqlite_section
    def __contains__(self, key: object) -> bool:
        return key in self._cache

    @sqlite_section
    def __len__(self) -> int:
        return len(self._cache)

    def close(self) -> None:
        """Close every connection to the log, of every thread (a later use reopens)."""
        self._cache.close_all()
        with FORK_GATE.inside():
            if self._anchor is not None and self._anchor[0] == os.getpid():
                with contextlib.suppress(sqlite3.Error):
                    self._anchor[1].close()
                self._anchor = None


def _upgrade_schema(cache: diskcache.Cache) -> None:
    """Give a log what this version adds to diskcache's schema, once: the ``person``
    column and its index (a log of an earlier version: its waiting rows get their
    person from their text), and the table of the queue's counts."""
    sql = cache._sql
    columns = {row[1] for row in sql("PRAGMA table_info(Cache)").fetchall()}
    present = {
        row[0]
        for row in sql(
            "SELECT name FROM sqlite_master WHERE name IN ('Cache_person', 'cio_counts')"
        ).fetchall()
    }
    if "person" in columns and present == {"Cache_person", "cio_counts"}:
        return  # every open but the first
    if "person" not in columns:
        try:
            with cache.transact():
                sql("ALTER TABLE Cache ADD COLUMN person TEXT")
                sql("UPDATE Cache SET person = " + PERSON_OF_VALUE + " WHERE raw = 1")  # noqa: S608
        except sqlite3.OperationalError as exc:
            if "duplicate column" not in str(exc):  # another process added it first
                raise
    sql("CREATE INDEX IF NOT EXISTS Cache_person ON Cache(person)")
    sql(_CREATE_COUNTS)
    # The schema change lives in SQLite's -wal file until a checkpoint, and so does the
    # database's first page: write it back now, so the file on disk is the whole truth
    # (damage to it is then seen at once, not masked until a checkpoint long after).
    sql("PRAGMA wal_checkpoint(PASSIVE)").fetchall()


def _reset_wal_in_child(reference: weakref.ref[WriteAheadLog]) -> None:
    # The fork gate waits for writers to finish, but only for so long.
    wal = reference()
    if wal is not None:
        wal._write_guard = threading.Lock()


# The SQL of the hot paths, on diskcache's Cache table. Rows are inline text (mode 1,
# diskcache's MODE_RAW), never expire, and carry their due time in the indexed tag.
_INSERT_INTO = (
    "INSERT OR IGNORE INTO Cache(key, raw, store_time, expire_time, access_time,"
    " access_count, tag, size, mode, filename, value, person) VALUES "
)
# One row: key, due time, value and person are the parameters.
_ROW_VALUES = (
    "(?, 1, (julianday('now') - 2440587.5) * 86400.0, NULL,"
    " (julianday('now') - 2440587.5) * 86400.0, 0, ?, 0, 1, NULL, ?, ?)"
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
    # In C: a Python loop here held the GIL through a whole group of rows, a third of
    # the commit thread's time with the GIL under load.
    return list(itertools.chain.from_iterable(rows))


# SQLite takes at most 999 parameters in older builds: stay well under.
_PEOPLE_PER_STATEMENT = 500
_KEYS_PER_STATEMENT = 500
# The queue's own counts, kept in the log's database: a count changes in the same
# transaction as the rows it counts.
_CREATE_COUNTS = (
    "CREATE TABLE IF NOT EXISTS cio_counts (name TEXT PRIMARY KEY, value INTEGER NOT NULL)"
)
_COUNT_DELIVERED = (
    "INSERT INTO cio_counts (name, value) VALUES ('delivered', ?)"
    " ON CONFLICT (name) DO UPDATE SET value = value + excluded.value"
)
_READ_DELIVERED = "SELECT value FROM cio_counts WHERE name = 'delivered'"
_POSITION = operator.itemgetter(1)


@functools.lru_cache(maxsize=64)
def _delete_keys_sql(count: int) -> str:
    """A DELETE of ``count`` keys in one statement (the (key, raw) index finds each)."""
    marks = ", ".join("?" * count)
    return f"DELETE FROM Cache WHERE key IN ({marks}) AND raw = 1"  # noqa: S608 - only marks


def _chunks_of_people(people: Collection[str]) -> Iterator[tuple[list[str], str]]:
    """``people`` in chunks a statement takes, each with its parameter marks."""
    names = list(people)
    for start in range(0, len(names), _PEOPLE_PER_STATEMENT):
        chunk = names[start : start + _PEOPLE_PER_STATEMENT]
        yield chunk, ", ".join("?" * len(chunk))


_SELECT_UNTAGGED = (
    "SELECT rowid, key, raw, tag, mode, filename, value FROM Cache WHERE tag IS NULL LIMIT ?"
)
_SELECT_DUE = (
    "SELECT rowid, key, raw, tag, mode, filename, value FROM Cache"
    " WHERE tag <= ? ORDER BY tag, rowid LIMIT ?"
)
# A row value, not "tag > ? OR (tag = ? AND rowid > ?)": SQLite then walks the (tag,
# rowid) index from the cursor in order and stops at the limit; the OR form read every
# due row into a temporary B-tree to sort it, at every read.
_SELECT_DUE_AFTER = (
    "SELECT rowid, key, raw, tag, mode, filename, value FROM Cache"
    " WHERE tag <= ? AND (tag, rowid) > (?, ?) ORDER BY tag, rowid LIMIT ?"
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


class DeadLetterStore:
    """Events that failed for good, with the reason (status, error type, scrubbed text)."""

    @sqlite_section
    def __init__(self, directory: Path, *, fsync: bool | None = False) -> None:
        """``fsync``: True for synchronous=FULL, False for NORMAL, None to leave it."""
        self.directory = directory
        self._cache = open_cache(directory, fsync=fsync)

    @sqlite_section
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
        entry = dead_letter_entry(
            key,
            event,
            status=status,
            error_type=error_type,
            message=message,
            attempts=attempts,
            first_failure_at=first_failure_at,
            now=moment,
            original=original,
            replays=replays,
            replay_count=replay_count,
            existing=lambda: self.get(key),
        )
        self._cache.set(key, json.dumps(entry, ensure_ascii=False, separators=(",", ":")))

    def __iter__(self) -> Iterator[DeadLetter]:
        with FORK_GATE.inside():  # never hold the gate while the caller consumes
            try:
                keys = list(self._cache.iterkeys())
            except CorruptEntryError:
                for quarantined in delete_non_text_keys(self._cache):
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

    @sqlite_section
    def get(self, key: str) -> DeadLetter | None:
        """One entry by its key (the event id, in either case), or None."""
        if not storable_key(key):
            return None
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
        return dead_letter_from_text(key, text)

    @sqlite_section
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
        letters = self if wanted is None else filter(None, map(self.get, sorted(wanted)))
        return matching_letters(
            letters, event=event, reason=reason, since=since, before=before, limit=limit
        )

    @sqlite_section
    def replay(self, letters: Iterable[DeadLetter], wal: EventLog) -> int:
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

    @sqlite_section
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

    @sqlite_section
    def __len__(self) -> int:
        return len(self._cache)

    def close(self) -> None:
        """Close every connection to the store, of every thread (a later use reopens)."""
        self._cache.close_all()
