"""The diskcache store: the write-ahead log and the dead-letter store on local disk.

An event is appended before ``emit`` returns and deleted only after Customer.io
accepted it (or it was moved to the dead-letter store), so the log is at-least-once.
A resend keeps the event's id. The plumbing (fork gate, opening, salvage) is in
``_sqlite.py``; the batch items the database builds, in ``items.py``.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import os
import sqlite3
import threading
import time
import weakref
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import diskcache

from ..errors import CorruptEntryError, InvalidEventError
from ..events import Event
from ..templates import Templates
from ._sqlite import (
    FORK_GATE,
    LIVE_CONNECTIONS,
    PERSON_OF_VALUE,
    SALVAGE_ALL,
    SALVAGE_RANGE,
    Connection,
    SalvageQueries,
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
from .items import per_templates, sqlite_item
from .rows import (
    LANES,
    Batch,
    BatchQuery,
    CorruptEntry,
    DeadLetter,
    DeadLetterHistory,
    DeadLetterReason,
    LaterCall,
    QueuedEvent,
    ReplayRecord,
    Row,
    SendBatch,
    dead_letter_entry,
    dead_letter_from_text,
    decode_row,
    encode_row,
    letter_json,
    matching_letters,
    storable_key,
)

_internal_log = logging.getLogger("cio_logging")


def _decode_row(row: tuple[Any, ...]) -> QueuedEvent:
    """A queue row ``(position, id, due, body, waiting, attempts, first_failure_at,
    last_error)``, checked and decoded; never unpickles. The retry columns, once set,
    win over the history in the text (the text keeps what a replay or a spill carried).

    Raises:
        CorruptEntryError: the body is not text.
        InvalidEventError: the text is not an entry of ours.
    """
    position, key, due, body, waiting, attempts, first_failure_at, last_error = row
    if type(key) is not str or type(body) is not str:
        raise CorruptEntryError("a stored row is not JSON text (refused, not decoded)")
    queued = decode_row(key, due, body, position)
    if attempts is None:
        return queued
    return queued._replace(
        attempts=int(attempts),
        first_failure_at=first_failure_at,
        last_error=last_error,
        next_attempt_at=float(due) if waiting is not None else queued.next_attempt_at,
    )


class WriteAheadLog:
    """Events waiting for Customer.io, on disk, in the order they were committed.

    The database is diskcache's (it opens, configures and fork-proofs it: see
    ``_sqlite.py``); the rows live in a table of our own, ``cio_queue``. diskcache's
    ``Cache`` table, with five indexes and two triggers on every row, cost 15 to 27 us
    of CPU to insert a row and 9 us to delete one (measured here with 100,000 rows);
    this one costs 2 to 5 and 2. Rows an earlier version left in ``Cache`` are moved in
    (:meth:`move_legacy_rows`).

    A row is ``(position, id, due, person, body, ...)``: ``position`` is commit order
    (the order a person's calls go in; a replayed row gets one below every other, so it
    goes ahead of its person's queued calls); ``body`` is the row text of
    :func:`encode_row`. A row never tried is due at once. A row that failed ``waits``:
    its due time counts, and its person's later calls wait for it. Only waiting rows
    are indexed by person and due time (partial indexes), so the index work of an
    append or an acknowledgement stays that of the table and its id.

    The sender's work is per batch: :meth:`next_batch` returns the items of the calls
    that may go, joined by SQLite from the stored text with the API's templates;
    :meth:`acknowledge` and :meth:`schedule_retries` are one statement each.
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
        _create_queue_table(cache)
        self._cache = cache
        self._identity = database_identity(self.directory)
        self._identity_checked_at = time.monotonic()
        self._legacy_checked_at = float("-inf")
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

    # -- appending (the committer) -----------------------------------------------------

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
        still waiting). Returns the largest position SQLite gave (every row of ``rows``
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

    # -- the sender ------------------------------------------------------------------------

    @sqlite_section
    def next_batch(self, query: BatchQuery, templates: Templates) -> SendBatch:
        """The calls that may go now, in commit order, with their items joined by SQLite.

        A call may go when it is due (never tried, or its retry's time has come), no
        person of it is ``busy``, and no earlier call of its people waits for a retry
        still to come. Calls of a person come in commit order; an earlier call of the
        person that may go comes in the same batch, ahead of it.
        """
        sql = _next_batch_sql(templates, query.lane is not None)
        parameters = {
            "now": query.now,
            "limit": query.limit,
            "lane": query.lane,
            "scan": query.scan or 4 * query.limit,
            "after": -(2**63),
            "budget": query.budget,
            "item_limit": query.item_limit,
            "expire_before": query.expire_before,
            "late_before": max(query.late_before, -1e300),
            "busy": json.dumps(list(query.busy)) if query.busy else "[]",
            "essential": json.dumps(list(query.essential)) if query.essential else "[]",
        }
        while True:
            found = self._cache._sql(sql, parameters).fetchall()
            ((positions, ids, people, others, items, logged, flags, count, late, oldest),) = found
            if count:
                batch = _send_batch(positions, ids, people, others, items, logged, flags, count)
                batch.late, batch.oldest = late or 0, oldest
                return batch
            # Nothing may go in this scan: was it a whole scan (then look past it, a
            # bounded scan at a time), or the end of the queue? A scan whose every call
            # is of a busy person ends the read: an answer frees them, and reading on
            # through a long backlog of theirs at every read would cost more each time.
            scanned_sql = _SCANNED_ALL if query.lane is None else _SCANNED_LANE
            ((last, scanned, busy),) = self._cache._sql(scanned_sql, parameters).fetchall()
            if scanned < parameters["scan"] or last is None or busy == scanned:
                return _send_batch(None, None, None, None, None, None, None, 0)
            parameters["after"] = last

    @sqlite_section
    def rows(self, positions: Sequence[str | int]) -> tuple[list[QueuedEvent], list[CorruptEntry]]:
        """The rows at ``positions``, decoded, in commit order; unreadable ones as
        corrupt entries (still queued: :meth:`acknowledge` takes them out)."""
        found = self._cache._sql(_SELECT_POSITIONS, (_json_numbers(positions),)).fetchall()
        events: list[QueuedEvent] = []
        corrupt: list[CorruptEntry] = []
        for row in found:
            try:
                events.append(_decode_row(row))
            except (CorruptEntryError, InvalidEventError) as exc:
                name = row[1] if type(row[1]) is str else f"row-{row[0]}"
                corrupt.append(CorruptEntry(name, str(exc), row[0]))
        return events, corrupt

    @sqlite_section
    def acknowledge(self, positions: Sequence[str | int], *, delivered: int = 0) -> None:
        """Take the rows at ``positions`` out: delivered, or in the dead-letter store;
        ``delivered`` of them were accepted (added to :meth:`delivered_total` in the same
        transaction)."""
        if not positions:
            return
        with self._write_guard, self._transaction() as connection:
            connection.execute(_DELETE_POSITIONS, (_json_numbers(positions),))
            if delivered:
                connection.execute(_COUNT_DELIVERED, (delivered,))

    @sqlite_section
    def delivered_total(self) -> int | None:
        """Calls delivered from this queue so far, by any process (0 before the first)."""
        rows = self._cache._sql(_SELECT_DELIVERED).fetchall()
        return int(rows[0][0]) if rows else 0

    @sqlite_section
    def schedule_retries(
        self,
        positions: Sequence[str | int],
        *,
        count_attempt: bool,
        delays: Sequence[float],
        now: float,
        error: str,
        max_attempts: int,
    ) -> list[QueuedEvent]:
        """Record a failed attempt (when ``count_attempt``) on the rows at ``positions``
        and make each wait ``delays[attempts]`` seconds (the last delay for more
        attempts); one statement.

        Rows that would reach ``max_attempts`` are left as they are and returned,
        decoded, for the sender to dead-letter (then :meth:`acknowledge`).
        """
        if not positions:
            return []
        numbers = _json_numbers(positions)
        exhausted: list[QueuedEvent] = []
        if count_attempt:
            found = self._cache._sql(_SELECT_EXHAUSTED, (numbers, max_attempts)).fetchall()
            for row in found:
                with contextlib.suppress(CorruptEntryError, InvalidEventError):
                    exhausted.append(_decode_row(row))
        parameters = {
            "positions": numbers,
            "counted": 1 if count_attempt else 0,
            "delays": json.dumps(list(delays)),
            "now": now,
            "error": error,
            "max_attempts": max_attempts if count_attempt else 2**62,
        }
        with self._write_guard, self._transaction() as connection:
            connection.execute(_SCHEDULE_RETRIES, parameters)
        return exhausted

    @sqlite_section
    def next_due(self, after: float) -> float | None:
        """When the earliest retry due after ``after`` is due (None: none waits)."""
        ((due,),) = self._cache._sql(_NEXT_DUE, (after,)).fetchall()
        return None if due is None else float(due)

    @sqlite_section
    def requeue(self, rows: Sequence[Row]) -> list[int]:
        """Put rows back ahead of every queued row (a replay from the dead-letter store):
        each below the lowest position, in the order given, so a person's replayed
        call goes ahead of the person's calls still queued. A row whose id is queued
        already is left where it is. Returns the positions given."""
        if not rows:
            return []
        with self._write_guard, self._transaction() as connection:
            ((lowest,),) = connection.execute(_LOWEST_POSITION).fetchall()
            start = min(int(lowest or 1), 1) - len(rows)
            positions = list(range(start, start + len(rows)))
            for position, (key, due, body, person) in zip(positions, rows, strict=True):
                connection.execute(_INSERT_AT, (position, key, due, body, person))
        return positions

    @sqlite_section
    def queued_calls_of(self, person: str) -> int:
        """How many calls of ``person`` are queued (read by an operator's replay)."""
        ((count,),) = self._cache._sql(_COUNT_PERSON, (person, person)).fetchall()
        return int(count)

    @sqlite_section
    def move_legacy_rows(
        self, limit: int = 500, *, at_most_every: float = 0.0
    ) -> tuple[int, list[CorruptEntry]]:
        """Move rows an earlier version left in diskcache's ``Cache`` table into the
        queue (in their order, keeping their due times and histories); rows there that
        are not our JSON text are deleted and returned as corrupt entries. Returns how
        many rows moved; 0 at once when it ran less than ``at_most_every`` ago."""
        moment = time.monotonic()
        if moment - self._legacy_checked_at < at_most_every:
            return 0, []
        self._legacy_checked_at = moment
        sql = self._cache._sql
        if not sql("SELECT 1 FROM Cache LIMIT 1").fetchall():
            return 0, []
        corrupt: list[CorruptEntry] = []
        with self._write_guard, self._transaction() as connection:
            bad = connection.execute(_SELECT_LEGACY_BAD, (limit,)).fetchall()
            for rowid, key in bad:
                name = key if type(key) is str else f"row-{rowid}"
                corrupt.append(
                    CorruptEntry(
                        name, "a stored row is not inline JSON text (refused, not decoded)"
                    )
                )
            if bad:
                connection.execute(
                    "DELETE FROM Cache WHERE rowid IN (SELECT value FROM json_each(?))",
                    (json.dumps([rowid for rowid, _ in bad]),),
                )
            moved = connection.execute(_SELECT_LEGACY, (limit,)).fetchall()
            for _, key, tag, value, person, failed in moved:
                connection.execute(
                    _INSERT_LEGACY, (key, 0.0 if tag is None else tag, person, value, failed)
                )
            if moved:
                connection.execute(
                    "DELETE FROM Cache WHERE rowid IN (SELECT value FROM json_each(?))",
                    (json.dumps([row[0] for row in moved]),),
                )
        return len(moved), corrupt

    # -- compatibility: the spill, read whole (see postgres.py) ----------------------------

    @sqlite_section
    def read_due(
        self, limit: int, now: float | None = None, *, after: tuple[float, int] | None = None
    ) -> Batch:
        """Up to ``limit`` rows in commit order (a spill being moved to the database,
        the operator's tools); unreadable ones come back as corrupt entries, taken out."""
        lowest = float("-inf") if after is None else after[1]
        found = self._cache._sql(_SELECT_FROM, (lowest, limit)).fetchall()
        events: list[QueuedEvent] = []
        corrupt: list[CorruptEntry] = []
        for row in found:
            try:
                events.append(_decode_row(row))
            except (CorruptEntryError, InvalidEventError) as exc:
                name = row[1] if type(row[1]) is str else f"row-{row[0]}"
                corrupt.append(CorruptEntry(name, str(exc), row[0]))
        if corrupt:
            self.acknowledge([entry.position for entry in corrupt if entry.position is not None])
        cursor = (0.0, int(found[-1][0])) if found else after
        return Batch(events, corrupt, cursor)

    @sqlite_section
    def remove(self, keys: Iterable[str], *, delivered: int = 0) -> None:
        """Delete rows by event id (one statement); ``delivered`` of them were accepted
        (counted as :meth:`acknowledge` does)."""
        doomed = list(keys)
        if doomed:
            # SQLite's JSON functions end a string at an escaped NUL: such ids (a
            # foreign or damaged row) are deleted one by one, bound as they are.
            odd = [(key,) for key in doomed if "\x00" in key]
            with self._write_guard, self._transaction() as connection:
                connection.execute(_DELETE_IDS, (json.dumps(doomed),))
                if odd:
                    connection.executemany(_DELETE_ID, odd)
                if delivered:
                    connection.execute(_COUNT_DELIVERED, (delivered,))

    # -- clock steps ---------------------------------------------------------------------

    @sqlite_section
    def adjust_due_times(self, step: float, now: float, horizon: float) -> int:
        """Keep due times true to steady time across a wall-clock step; returns the rows moved.

        ``step``: seconds the wall clock just stepped (negative: back), 0 for none;
        ``now``: the wall clock after it; ``horizon``: the longest wait the delivering
        process can schedule. Run by the delivering process only (another would move
        the same rows twice). Only rows waiting for a retry have a due time that
        counts (a row never tried is due at once).

        * Back: every retry due after ``now`` moves back by the step, so it keeps the
          rest of its wait.
        * Forward: retries that were waiting (a due time in the horizon before the
          step) move forward by it, so a backoff or a Retry-After is not cut short.
        * Always: a due time further than ``horizon`` ahead cannot have been scheduled
          on this clock (a step while no process delivered): due now.
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

    # -- looking -------------------------------------------------------------------------

    @sqlite_section
    def get(self, key: str) -> QueuedEvent | None:
        """One waiting event by id, or None (gone, or not readable: left for the sender)."""
        if not storable_key(key):
            return None
        # fetchall, not fetchone: a statement left unfinished keeps its read snapshot
        # open, and this connection would not see later commits.
        rows = self._cache._sql(_SELECT_ID, (key,)).fetchall()
        try:
            return _decode_row(rows[0]) if rows else None
        except (CorruptEntryError, InvalidEventError):
            return None

    @sqlite_section
    def sendable_through(self, rowid: int, now: float, horizon: float) -> bool:
        """Whether a row at position at most ``rowid`` is still here and can go now:
        never tried yet, tried and due for its retry, or due further ahead than
        ``horizon``, the longest wait ever scheduled (the clock stepped back since:
        it is treated as due)."""
        rows = self._cache._sql(_SELECT_SENDABLE_THROUGH, (rowid, now, now + horizon)).fetchall()
        return bool(rows)

    @sqlite_section
    def oldest_logged_at(self) -> float | None:
        """When the oldest waiting event was logged (ids are ULIDs: time-ordered)."""
        rows = self._cache._sql(_SELECT_OLDEST).fetchall()
        try:
            return _decode_row(rows[0]).event.logged_at if rows else None
        except (CorruptEntryError, InvalidEventError):
            return None  # the sender quarantines it; the gauge just skips a beat

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
        """Every row of ours still readable in the file we had open (best effort): the
        queue's rows, then any an earlier version left in diskcache's table.

        One damaged page fails a full scan: then the rows are read in ranges of
        positions, and a range that fails one by one, so only what is unreadable is lost.
        """
        if self._anchor is None or self._anchor[0] != os.getpid():
            return []  # in a forked child the parent's connection is not ours to use
        connection = self._anchor[1]
        rows: list[Row] = []
        for table in (QUEUE_SALVAGE, LEGACY_SALVAGE):
            try:
                rows += readable_rows(connection, table.all, ())
                continue
            except (sqlite3.Error, OSError):
                pass
            try:
                ((low, high),) = connection.execute(table.bounds).fetchall()
            except (sqlite3.Error, OSError):
                continue
            if low is None:
                continue
            for start in range(int(low), int(high) + 1, SALVAGE_RANGE):
                end = start + SALVAGE_RANGE - 1
                try:
                    rows += readable_rows(connection, table.range, (start, end))
                except (sqlite3.Error, OSError):
                    for position in range(start, end + 1):
                        with contextlib.suppress(sqlite3.Error, OSError):
                            rows += readable_rows(connection, table.one, (position,))
        return rows

    def _insert_salvaged(self, rows: list[Row]) -> None:
        if rows:
            with self._transaction() as connection:
                connection.executemany(_INSERT_ROW, rows)

    @sqlite_section
    def __contains__(self, key: object) -> bool:
        return bool(self._cache._sql(_SELECT_ID_EXISTS, (key,)).fetchall())

    @sqlite_section
    def __len__(self) -> int:
        ((count,),) = self._cache._sql(_COUNT).fetchall()
        return int(count)

    def close(self) -> None:
        """Close every connection to the log, of every thread (a later use reopens)."""
        self._cache.close_all()
        with FORK_GATE.inside():
            if self._anchor is not None and self._anchor[0] == os.getpid():
                with contextlib.suppress(sqlite3.Error):
                    self._anchor[1].close()
                self._anchor = None


def _create_queue_table(cache: diskcache.Cache) -> None:
    """The queue table and its indexes, once (every open after the first finds them)."""
    sql = cache._sql
    if sql("SELECT 1 FROM sqlite_master WHERE name = 'cio_queue_merges'").fetchall():
        return
    with cache.transact():
        for statement in _SCHEMA:
            sql(statement)
    # The schema lives in SQLite's -wal file until a checkpoint, and so does the
    # database's first page: write it back now, so the file on disk is the whole truth
    # (damage to it is then seen at once, not masked until a checkpoint long after).
    sql("PRAGMA wal_checkpoint(PASSIVE)").fetchall()


def _reset_wal_in_child(reference: weakref.ref[WriteAheadLog]) -> None:
    # The fork gate waits for writers to finish, but only for so long.
    wal = reference()
    if wal is not None:
        wal._write_guard = threading.Lock()


def _json_numbers(positions: Sequence[str | int]) -> str:
    """Positions as a JSON array, for json_each: joined in C, never looped over."""
    return "[" + ",".join(map(str, positions)) + "]"


def _send_batch(
    positions: str | None,
    ids: str | None,
    people: str | None,
    others: str | None,
    items: str | None,
    logged: str | None,
    flags: str | None,
    count: int,
) -> SendBatch:
    """A batch from the one row the batch query returns: lists split in C."""
    if not count:
        return SendBatch([], [], [], [], [], [], [], [])
    item_list = (items or "").split(_ITEM_SEPARATOR)
    slow = [index for index, item in enumerate(item_list) if not item] if "" in item_list else []
    return SendBatch(
        (positions or "").split(","),
        json.loads(ids or "[]"),
        json.loads(people or "[]"),
        [other for other in json.loads(others or "[]") if other],
        item_list,
        [float(value) for value in (logged or "").split(",")],
        [flag == "1" for flag in flags or ""],
        slow,
    )


#: The lane of a person (see rows.lane_of, which computes the same): the code points of
#: the key's last two characters and its length, modulo LANES. None: lane 0.
_LANE = (
    "(CASE WHEN {person} IS NULL THEN 0 ELSE (unicode(substr({person}, -1)) * 31"
    f" + unicode(substr({{person}}, -2, 1)) * 7 + length({{person}})) % {LANES} END)"
)

# The queue table. AUTOINCREMENT: a position is never given twice, so "every row this
# process committed has a position at most N" stays true after deliveries.
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS cio_queue ("
    " position INTEGER PRIMARY KEY AUTOINCREMENT,"
    " id TEXT NOT NULL,"
    " due REAL NOT NULL,"  # when a retry is due (a row never tried is due at once)
    " person TEXT,"  # whose call (Event.person); NULL: no order to keep
    " body TEXT NOT NULL,"  # the row text of rows.encode_row
    " waiting INTEGER,"  # 1: tried and failed; its due time counts
    " attempts INTEGER,"  # failed attempts counted (NULL: as the body's history says)
    " first_failure_at REAL,"
    " last_error TEXT,"
    # Which of the LANES lanes the call's person is in: requests in flight each take
    # one lane's calls, so they never share a person (see BatchQuery).
    f" lane INTEGER AS ({_LANE.format(person='person')}) VIRTUAL,"
    # A second person the call keeps order with: a merge's primary (its person is the
    # secondary); as Event.people names it. Worked out from the text, for merges only.
    " other_person TEXT AS (CASE WHEN substr(body, 1, 3) = '[3,' AND json_valid(body)"
    " AND body ->> '$[7]' = 'merge' THEN 'c:' || (body ->> '$[8].primary') END) VIRTUAL)",
    "CREATE UNIQUE INDEX IF NOT EXISTS cio_queue_id ON cio_queue(id)",
    "CREATE INDEX IF NOT EXISTS cio_queue_lane ON cio_queue(lane, position)",
    "CREATE INDEX IF NOT EXISTS cio_queue_waiting ON cio_queue(person, position)"
    " WHERE waiting IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS cio_queue_other ON cio_queue(other_person, position)"
    " WHERE other_person IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS cio_queue_merges ON cio_queue(person, position)"
    " WHERE other_person IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS cio_queue_waiting_due ON cio_queue(due) WHERE waiting IS NOT NULL",
    # Running totals kept with the rows: "delivered", bumped as accepted rows go.
    "CREATE TABLE IF NOT EXISTS cio_counts (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
)
_COUNT_DELIVERED = (
    "INSERT INTO cio_counts VALUES ('delivered', ?)"
    " ON CONFLICT(name) DO UPDATE SET value = value + excluded.value"
)
_SELECT_DELIVERED = "SELECT value FROM cio_counts WHERE name = 'delivered'"

_INSERT_INTO = "INSERT OR IGNORE INTO cio_queue(id, due, body, person) VALUES "
_INSERT_ROW = _INSERT_INTO + "(?, ?, ?, ?)"
_INSERT_AT = (
    "INSERT OR IGNORE INTO cio_queue(position, id, due, body, person) VALUES (?, ?, ?, ?, ?)"
)
_INSERT_LEGACY = (
    "INSERT OR IGNORE INTO cio_queue(id, due, person, body, waiting) VALUES (?, ?, ?, ?, ?)"
)
# Up to this many rows (a group of essential events) go in one multi-row INSERT; more
# (the writer's groups) in statements of _ROWS_PER_BIG_STATEMENT rows, then the rest in
# statements of at most this many, within one transaction. Few sizes: few statements
# for SQLite to compile and cache.
_ROWS_PER_STATEMENT = 16
_ROWS_PER_BIG_STATEMENT = 64


@functools.lru_cache(maxsize=_ROWS_PER_STATEMENT + 1)
def _insert_rows_sql(count: int) -> str:
    """An INSERT of ``count`` rows in one statement."""
    return _INSERT_INTO + ", ".join(["(?, ?, ?, ?)"] * count)


def _flatten(rows: Sequence[Row]) -> list[object]:
    # In C: a Python loop here held the GIL through a whole group of rows, a third of
    # the commit thread's time with the GIL under load.
    return list(itertools.chain.from_iterable(rows))


_ITEM_SEPARATOR = "\x1e"  # never inside JSON text: control characters are escaped there
_COLUMNS = "position, id, due, body, waiting, attempts, first_failure_at, last_error"
_IN_POSITIONS = "position IN (SELECT value FROM json_each(?))"
_SELECT_POSITIONS = f"SELECT {_COLUMNS} FROM cio_queue WHERE {_IN_POSITIONS} ORDER BY position"  # noqa: S608
_DELETE_POSITIONS = f"DELETE FROM cio_queue WHERE {_IN_POSITIONS}"  # noqa: S608
_DELETE_IDS = "DELETE FROM cio_queue WHERE id IN (SELECT value FROM json_each(?))"
_DELETE_ID = "DELETE FROM cio_queue WHERE id = ?"
_SELECT_FROM = f"SELECT {_COLUMNS} FROM cio_queue WHERE position > ? ORDER BY position LIMIT ?"  # noqa: S608
_SELECT_ID = f"SELECT {_COLUMNS} FROM cio_queue WHERE id = ?"  # noqa: S608
_SELECT_ID_EXISTS = "SELECT 1 FROM cio_queue WHERE id = ?"
_SELECT_OLDEST = f"SELECT {_COLUMNS} FROM cio_queue ORDER BY id LIMIT 1"  # noqa: S608
_COUNT = "SELECT count(*) FROM cio_queue"
_COUNT_PERSON = "SELECT count(*) FROM cio_queue WHERE person = ? OR other_person = ?"
_LOWEST_POSITION = "SELECT min(position) FROM cio_queue"
_NEXT_DUE = "SELECT min(due) FROM cio_queue WHERE waiting IS NOT NULL AND due > ?"
_SCANNED = (
    "SELECT max(position), count(*), coalesce(sum(person IN (SELECT value FROM"
    " json_each(:busy)) OR other_person IN (SELECT value FROM json_each(:busy))), 0)"
    " FROM (SELECT position, person, other_person FROM cio_queue {where}"
    " ORDER BY position LIMIT :scan)"
)
# One lane's rows through its index: a lane with nothing to send must cost a probe,
# not a walk through every other lane's rows.
_SCANNED_ALL = _SCANNED.format(where="WHERE position > :after")
_SCANNED_LANE = _SCANNED.format(
    where="INDEXED BY cio_queue_lane WHERE lane = :lane AND position > :after"
)
# The attempts a row has had: the column once set, else what its text's history says
# (a row replayed or moved from a spill carries it there).
_ATTEMPTS = (
    "coalesce(attempts, CASE WHEN json_valid(body) AND json_type(body, '$[6]') = 'object'"
    " THEN json_extract(body, '$[6].attempts') END, 0)"
)
_SELECT_EXHAUSTED = (
    f"SELECT {_COLUMNS} FROM cio_queue WHERE {_IN_POSITIONS}"  # noqa: S608
    f" AND {_ATTEMPTS} + 1 >= ? ORDER BY position"
)
# One statement for a whole batch: each row's next due time from the policy's delay
# for its attempt count (chosen by the sender, passed in as a JSON array).
_SCHEDULE_RETRIES = (
    "UPDATE cio_queue SET"  # noqa: S608
    " attempts = " + _ATTEMPTS + " + :counted,"
    " first_failure_at = coalesce(first_failure_at, CASE WHEN json_valid(body)"
    " AND json_type(body, '$[6]') = 'object' THEN json_extract(body, '$[6].first_failure_at')"
    " END, :now),"
    " last_error = :error, waiting = 1,"
    " due = :now + coalesce(json_extract(:delays, '$[' || min(" + _ATTEMPTS + " + :counted,"
    " json_array_length(:delays) - 1) || ']'), 0)"
    " WHERE position IN (SELECT value FROM json_each(:positions))"
    " AND " + _ATTEMPTS + " + :counted < :max_attempts"
)
_SELECT_SENDABLE_THROUGH = (
    "SELECT 1 FROM cio_queue WHERE position <= ? AND (waiting IS NULL OR due <= ? OR due > ?)"
    " LIMIT 1"
)
# Clock steps (see WriteAheadLog.adjust_due_times): only waiting rows' due times count.
_SHIFT_LATER_DUE = "UPDATE cio_queue SET due = due + ? WHERE waiting IS NOT NULL AND due > ?"
_SHIFT_WAITING_RETRIES = (
    "UPDATE cio_queue SET due = due + ? WHERE waiting IS NOT NULL AND due > ? AND due <= ?"
)
_ANY_DUE_AFTER = "SELECT 1 FROM cio_queue WHERE waiting IS NOT NULL AND due > ? LIMIT 1"
_DUE_NOW_IF_AFTER = "UPDATE cio_queue SET due = ? WHERE waiting IS NOT NULL AND due > ?"

# Rows of diskcache's Cache table an earlier version left: ours (inline JSON text under
# a text key) move into the queue; anything else is refused without being decoded.
_LEGACY_OURS = (
    "raw = 1 AND typeof(key) = 'text' AND mode = 1 AND filename IS NULL AND typeof(value) = 'text'"
)
_SELECT_LEGACY = (
    "SELECT rowid, key, tag, value, " + PERSON_OF_VALUE + ","  # noqa: S608
    " CASE WHEN json_valid(value) AND json_type(value) = 'array'"
    " AND json_extract(value, '$[6].last_error') IS NOT NULL THEN 1 END"
    f" FROM Cache WHERE {_LEGACY_OURS} ORDER BY rowid LIMIT ?"
)
_SELECT_LEGACY_BAD = f"SELECT rowid, key FROM Cache WHERE NOT ({_LEGACY_OURS}) LIMIT ?"  # noqa: S608


def _next_batch_sql(templates: Templates, lane: bool = False) -> str:
    """The batch query for one API's templates (see WriteAheadLog.next_batch)."""
    return per_templates(templates, _with_lane if lane else _build_next_batch_sql)


def _with_lane(templates: Templates) -> str:
    return _build_next_batch_sql(templates, lane=True)


def _build_next_batch_sql(templates: Templates, *, lane: bool = False, order: bool = True) -> str:
    """The batch query (see WriteAheadLog.next_batch): the calls that may go, in commit
    order (of one lane of people, ``:lane``, when ``lane``), at most ``:scan`` rows
    looked at, at most ``:limit`` taken, cut at ``:budget`` bytes; then their items,
    built from their text.

    ``order=False`` leaves out the person rules: the benchmarks' anchor for what the
    order guarantee costs a read. Never sent with.
    """
    item = sqlite_item(templates, "q.body", "q.id")
    blocked = (
        "EXISTS (SELECT 1 FROM cio_queue AS w INDEXED BY cio_queue_waiting"
        " WHERE w.waiting IS NOT NULL AND w.person = {who} AND w.position < q.position"
        " AND w.due > :now)"
    )
    rules = ""
    if order:
        rules = _PERSON_RULES.format(
            blocked_person=blocked.format(who="q.person"),
            other_lane=_LANE.format(person="q.other_person"),
        )
    return f"""
WITH scan AS (
  SELECT position, person, other_person, waiting, due FROM cio_queue
  {"INDEXED BY cio_queue_lane WHERE lane = :lane AND" if lane else "WHERE"} position > :after
  ORDER BY position LIMIT :scan
), chosen AS (
  SELECT q.position FROM scan AS q
  WHERE (q.waiting IS NULL OR q.due <= :now)
    {rules}
  LIMIT :limit
), built AS MATERIALIZED (
  SELECT c.position, q.id, q.person, q.other_person, q.body, {item} AS raw
  FROM chosen AS c JOIN cio_queue AS q ON q.position = c.position
), kept AS MATERIALIZED (
  SELECT position, id, person, other_person, body,
         CASE WHEN raw IS NULL OR length(CAST(raw AS BLOB)) > :item_limit THEN NULL
              ELSE raw END AS item
  FROM built
), cut AS (
  SELECT * FROM (
    SELECT *,
           sum(coalesce(length(CAST(item AS BLOB)),
                        length(CAST(body AS BLOB)) + {_ITEM_OVERHEAD}) + 1)
             OVER (ORDER BY position) AS used,
           row_number() OVER (ORDER BY position) AS n
    FROM kept)
  WHERE used <= :budget OR n = 1
), timed AS (
  SELECT position, id, person, other_person, body, item,
         CASE WHEN item IS NULL THEN NULL ELSE CAST(body ->> '$[5]' AS REAL) END AS logged,
         CASE WHEN item IS NULL THEN NULL ELSE CAST(body ->> '$[4]' AS REAL) END AS stamp
  FROM cut
)
SELECT group_concat(position, ','), json_group_array(id), json_group_array(coalesce(person, '')),
       json_group_array(other_person),
       group_concat(CASE WHEN logged < :expire_before THEN '' ELSE coalesce(item, '') END,
                    char(30)),
       group_concat(coalesce(logged, 0), ','),
       group_concat(CASE WHEN item IS NOT NULL AND (body ->> '$[1]') IN
                    (SELECT value FROM json_each(:essential)) THEN '1' ELSE '0' END, ''),
       count(*), sum(CASE WHEN logged < :expire_before THEN 0 ELSE stamp < :late_before END),
       min(CASE WHEN logged < :expire_before THEN NULL ELSE stamp END)
FROM timed
"""  # noqa: S608 - only the compiled templates, no input, go in


#: How much larger than its stored row a call's batch item can be (the item's keys and
#: id, less the row's own; the Pipelines API's context and ISO time are the most): the
#: byte budget is kept with this, before any item is built.
_ITEM_OVERHEAD = 320

# A call goes only when its person is not busy (a request in flight), has no earlier
# call waiting for a retry, and no earlier merge of theirs still queued (either side).
# A merge (other_person: the primary) goes only once every earlier call of the primary
# left the queue: the merge and what follows it wait a batch, merges being rare.
_PERSON_RULES = """
        AND (q.person IS NULL OR (
              q.person NOT IN (SELECT value FROM json_each(:busy))
              AND NOT {blocked_person}
              AND NOT EXISTS (SELECT 1 FROM cio_queue AS m INDEXED BY cio_queue_other
                              WHERE m.other_person = q.person AND m.position < q.position)
              AND NOT EXISTS (SELECT 1 FROM cio_queue AS m INDEXED BY cio_queue_merges
                              WHERE m.other_person IS NOT NULL AND m.person = q.person
                                AND m.position < q.position)))
        AND (q.other_person IS NULL OR (
              q.other_person NOT IN (SELECT value FROM json_each(:busy))
              AND NOT EXISTS (SELECT 1 FROM cio_queue AS w INDEXED BY cio_queue_lane
                              WHERE w.lane = {other_lane} AND w.person = q.other_person
                                AND w.position < q.position)))"""


QUEUE_SALVAGE = SalvageQueries(
    all=(
        "SELECT id, due, body, person FROM cio_queue"
        " WHERE typeof(id) = 'text' AND typeof(body) = 'text'"
    ),
    bounds="SELECT min(position), max(position) FROM cio_queue",
    key="position",
)
LEGACY_SALVAGE = SalvageQueries(
    all=SALVAGE_ALL, bounds="SELECT min(rowid), max(rowid) FROM Cache", key="rowid"
)


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

    def people(self) -> dict[str, list[str]]:
        """The ids of the entries of each person (see :attr:`DeadLetter.person`)."""
        found: dict[str, list[str]] = {}
        for letter in self:
            person = letter.person
            if person is not None:
                found.setdefault(person, []).append(letter.key)
        return found

    @sqlite_section
    def note_later_calls(self, key: str, calls: Sequence[LaterCall]) -> int:
        """Record calls of the entry's person delivered after it (a replay would land
        behind them): the first ones and every delete are kept, all are counted.
        Returns how many are counted (0: no such entry)."""
        letter = self.get(key)
        if letter is None or letter.event is None:
            return 0
        if not calls:
            return letter.later_count
        kept, count = letter.with_later(calls)
        entry = letter_json(letter)
        entry["later"] = [call.to_json() for call in kept]
        entry["later_count"] = count
        self._cache.set(letter.key, json.dumps(entry, ensure_ascii=False, separators=(",", ":")))
        return count

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
