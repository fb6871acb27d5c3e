"""The PostgreSQL store: fleet mode's queue, dead letters, sender lease and state.

Selected by ``queue_url="postgresql://..."`` (or ``$CIO_LOGGING_QUEUE_URL``). Every
process of every host that logs for a workspace writes its events here; exactly one of
them, the holder of the workspace's lease, sends them.

* :class:`Database`: a few connections kept without a thread (:mod:`._pgconn`; opened
  on the calling thread, new in a forked child), the schema (created on first use from
  ``sql/migrations``, versioned, never dropping anything), the statements of
  ``sql/queries.sql`` by name, the database's clock against this host's, and errors
  mapped to :class:`~cio_logging.errors.DatabaseError` with the password scrubbed
  (:mod:`.queue_url`).
* :class:`PostgresLog`: the :class:`~cio_logging.store.EventLog`. A commit that the
  database does not answer within ``database_timeout`` goes to the local spill (a
  diskcache log in the queue directory) instead; the spill is moved into the database
  once it answers, by any process of the directory.
* :class:`PostgresDeadLetters`: the :class:`~cio_logging.store.DeadLetterArchive`,
  the table ``cio_dead_letter``.
* :class:`PostgresLease`: the one-sender-per-workspace lease, with its term as the
  fencing token of every write of the sender.

Rows are keyed by workspace (site id and endpoint), so applications and workspaces
share a database without seeing each other's events. Times are the database's clock.
Sessions hold no state between transactions (no server-side prepared statement, no
``SET`` outliving a transaction, no advisory lock, temporary table or ``LISTEN``), so
the store works through PgBouncer in transaction-pooling mode (tested).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import socket
import threading
import time
import uuid
import weakref
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .. import background
from ..errors import ConfigurationError, DatabaseError, InvalidEventError, LeaseLostError
from ..events import Event
from ..process_lock import DeliveryLock
from ..templates import Templates
from . import queue_url
from .items import per_templates, postgres_item
from .local import DeadLetterStore, WriteAheadLog
from .queue_url import display_url, scrub
from .rows import (
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
    dead_letter_from_json,
    dead_letter_from_text,
    decode_row,
    encode_row,
    matching_letters,
    storable_key,
)
from .rows import _split_row as _split_row

if TYPE_CHECKING:
    import psycopg

internal_log = logging.getLogger("cio_logging")

#: The schema version this release writes; ``sql/migrations`` holds one file per version.
SCHEMA_VERSION = 4


class _ScrubDriverLogs(logging.Filter):
    """The driver's own log lines with passwords scrubbed: message, traceback, stack."""

    def filter(self, record: logging.LogRecord) -> bool:
        if queue_url.known():
            record.msg = scrub(record.getMessage())
            record.args = None
            if record.exc_info and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            if record.exc_text:
                # Formatters print exc_text when it is set; dropping exc_info keeps a
                # formatter that renders the exception itself from quoting it unscrubbed.
                record.exc_text = scrub(record.exc_text)
                record.exc_info = None
            if record.stack_info:
                record.stack_info = scrub(record.stack_info)
        return True


#: Every logger psycopg logs on. A logger's filter does not see what its children log,
#: so each one gets its own.
DRIVER_LOGGERS = (
    "psycopg",
    "psycopg.debug",
    "psycopg.pq",
    "psycopg.transaction",
    "psycopg.waiting",
)

for _name in DRIVER_LOGGERS:
    logging.getLogger(_name).addFilter(_ScrubDriverLogs())


def _load_queries() -> dict[str, str]:
    text = resources.files(__package__).joinpath("sql/queries.sql").read_text("utf-8")
    queries: dict[str, str] = {}
    name = None
    lines: list[str] = []
    for line in text.splitlines():
        header = re.match(r"--\s*name:\s*(\w+)", line)
        if header:
            if name is not None:
                queries[name] = "\n".join(lines).strip()
            name, lines = header.group(1), []
        elif name is not None and not line.startswith("--"):
            lines.append(line)
    if name is not None:
        queries[name] = "\n".join(lines).strip()
    return queries


#: Every statement, by name (``sql/queries.sql``).
QUERIES = _load_queries()


def migrations() -> list[tuple[int, str]]:
    """``(version, sql)`` of every migration file, in order."""
    folder = resources.files(__package__).joinpath("sql/migrations")
    found = []
    for entry in folder.iterdir():
        match = re.match(r"(\d+)_.*\.sql$", entry.name)
        if match:
            found.append((int(match.group(1)), entry.read_text("utf-8")))
    return sorted(found)


_DRIVER: tuple[Any, Any] | None = None


def _driver() -> Any:
    """psycopg and our connection module (:mod:`._pgconn`), imported once. Never an
    import statement on the hot path: a fork while another thread is inside one leaves
    the child's import lock held (seen here: a multiprocessing child hung in its first
    commit)."""
    global _DRIVER
    if _DRIVER is not None:
        return _DRIVER
    try:
        import psycopg
        import psycopg.conninfo
        import psycopg.types.json

        from . import _pgconn
    except ImportError as exc:
        raise ConfigurationError(
            "queue_url needs the PostgreSQL driver: pip install 'cio-logging[postgres]'"
        ) from exc
    _DRIVER = (psycopg, _pgconn)
    return _DRIVER


# Connections a forked child inherited: kept referenced and never closed there, since
# closing one would end the parent's session on the shared socket.
_INHERITED: list[object] = []

# The clock shift (see Database.clock_shift) is measured again this often, and at once
# when this host's wall clock steps by more than _CLOCK_STEP_SECONDS; a measurement
# whose round trip is this short is kept without a second one.
_CLOCK_REFRESH_SECONDS = 60.0
_CLOCK_STEP_SECONDS = 0.05
_CLOCK_GOOD_ENOUGH_SECONDS = 0.005

# The schema's first creation may wait for another process's (an advisory lock) and
# build indexes: it gets longer than a statement.
_MIGRATION_SECONDS = 60.0


class Database:
    """One PostgreSQL database: a few connections, the schema, statements by name.

    Thread-safe, and runs no thread of its own (see :mod:`._pgconn`): whatever thread
    calls, at interpreter exit included, does the work and waits at most its deadline.

    Works through a pooler in transaction mode (PgBouncer): no server-side prepared
    statement (``prepare_threshold=None``), no session state (no ``SET``, advisory
    lock, temporary table or ``LISTEN`` outliving a transaction). A statement's time
    is bounded on the client (the deadline; the connection is closed past it) and, in
    a :meth:`transaction`, on the server too (``SET LOCAL statement_timeout``).

    Every failure is a :class:`DatabaseError` whose text and cause hold no password.
    ``timeout`` bounds the wait for a connection (connecting: libpq's least is 2 s);
    a statement gets twice it (at least 2 s) unless the caller gives its own bound.
    """

    def __init__(self, url: str, *, timeout: float = 5.0, max_size: int = 4) -> None:
        _driver()  # imported now, on the constructing thread (see _driver)
        self.url = queue_url.normalized(url)
        self.timeout = timeout
        self.statement_seconds = max(timeout, 1.0) * 2
        self._max_size = max_size
        self._guard = threading.Lock()
        self._slots: Any = None
        self._slots_pid = 0
        self._schema_ready = False
        self._clock: tuple[float, float, float, float] | None = None
        reference = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _reset_database_in_child(reference))

    def __repr__(self) -> str:
        return f"Database({display_url(self.url)!r})"

    @property
    def display_url(self) -> str:
        return display_url(self.url)

    def _connect_options(self) -> dict[str, Any]:
        psycopg, _ = _driver()
        options: dict[str, Any] = {
            "autocommit": True,
            # No server-side prepared statements: through PgBouncer in transaction
            # mode the next statement may reach another server session, where the
            # name is unknown or means another statement.
            "prepare_threshold": None,
            "connect_timeout": max(2, math.ceil(self.timeout)),
            # A server that vanished from the network: the kernel gives up on
            # unacknowledged data after this long (milliseconds).
            "tcp_user_timeout": int(self.statement_seconds * 1000),
        }
        # Which process holds a connection, for pg_stat_activity (unless the URL names
        # one of its own).
        with contextlib.suppress(psycopg.ProgrammingError):
            if "application_name" not in psycopg.conninfo.conninfo_to_dict(self.url):
                options["application_name"] = f"cio_logging pid {os.getpid()}"
        return options

    def _get_slots(self) -> Any:
        with self._guard:
            if self._slots is not None and self._slots_pid == os.getpid():
                return self._slots
            if self._slots is not None:  # a forked child: the parent's are not ours
                _INHERITED.append(self._slots)
                self._schema_ready = False
            _, pgconn = _driver()
            self._slots = pgconn.ConnectionSlots(
                self.url, max_size=self._max_size, kwargs=self._connect_options()
            )
            self._slots_pid = os.getpid()
            return self._slots

    def _checked_out(self, deadline: float) -> tuple[Any, Any, bool]:
        """(slots, connection, reused) with the schema in place; the connection's
        deadline set. Raises the driver's error."""
        slots = self._get_slots()
        conn, reused = slots.get(deadline)
        try:
            if not self._schema_ready:
                conn.deadline = time.monotonic() + _MIGRATION_SECONDS
                self._migrate(conn)
            conn.deadline = deadline
        except BaseException:
            slots.put(conn, healthy=False)
            raise
        return slots, conn, reused

    def _deadline(self, timeout: float | None) -> float:
        return time.monotonic() + (self.statement_seconds if timeout is None else timeout)

    @contextlib.contextmanager
    def connection(self, timeout: float | None = None) -> Iterator[psycopg.Connection[Any]]:
        """A connection (autocommit; ``with conn.transaction():`` for more) whose every
        statement must be answered within ``timeout`` from now (default: twice the
        database timeout). After :meth:`close` new connections are opened."""
        psycopg, pgconn = _driver()
        deadline = self._deadline(timeout)
        try:
            slots, conn, _ = self._checked_out(deadline)
        except (psycopg.Error, OSError) as exc:
            raise _mapped(exc, deadline) from exc
        healthy = False
        try:
            yield conn
            healthy = True
        except (psycopg.Error, OSError) as exc:
            healthy = not isinstance(exc, pgconn.DeadlineExceeded)
            raise _mapped(exc, deadline) from exc
        finally:
            slots.put(conn, healthy=healthy)

    @contextlib.contextmanager
    def transaction(self, timeout: float | None = None) -> Iterator[psycopg.Connection[Any]]:
        """A transaction whose statements the server also stops at the deadline
        (``SET LOCAL``: it ends with the transaction, so no pooled session keeps it)."""
        seconds = self.statement_seconds if timeout is None else timeout
        with self.connection(seconds) as conn, conn.transaction():
            milliseconds = str(max(1, int(seconds * 1000)))
            conn.execute(QUERIES["limit_transaction"], {"ms": milliseconds})
            yield conn

    def run(
        self,
        name: str,
        params: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
        atomic: bool = False,
    ) -> list[tuple[Any, ...]]:
        """Run the statement ``name`` on its own (autocommit); its rows, if it has any.

        ``atomic``: inside BEGIN ... COMMIT, so that a statement whose deadline passes
        (the connection is closed) is rolled back, not committed behind our back, unless
        the deadline passed during the COMMIT itself. Two more round trips; for the
        commits, whose rows would otherwise also go to the spill and be sent twice.

        A connection kept from an earlier use that turns out dead (the server
        restarted) is replaced and the statement sent again, once: every statement
        run this way may run twice (inserts ignore ids already there).
        """
        psycopg, pgconn = _driver()
        deadline = self._deadline(timeout)
        query = QUERIES[name]
        for attempt in (1, 2):
            try:
                slots, conn, reused = self._checked_out(deadline)
            except (psycopg.Error, OSError) as exc:
                raise _mapped(exc, deadline) from exc
            healthy = False
            try:
                with conn.transaction() if atomic else contextlib.nullcontext():
                    cursor = conn.execute(query, params or {})
                    rows = cursor.fetchall() if cursor.description is not None else []
                healthy = True
                return rows
            except (psycopg.Error, OSError, ValueError) as exc:
                # ValueError: a value the driver cannot send (text that is not Unicode).
                timed_out = isinstance(exc, pgconn.DeadlineExceeded)
                healthy = not timed_out
                if attempt == 1 and reused and conn.broken and not timed_out:
                    slots.discard_idle()  # they were opened before the same restart
                    continue
                raise _mapped(exc, deadline) from exc
            finally:
                slots.put(conn, healthy=healthy)
        raise AssertionError("unreachable")  # pragma: no cover

    def clock_shift(self) -> tuple[float, float]:
        """``(shift, slack)``: the database's clock minus this host's, and how far off
        that may be (half the round trip it was measured with), in seconds.

        Measured with one statement, kept for a minute, and measured again at once when
        this host's wall clock steps (against its monotonic clock). The fleet's due
        times, ages and lease expiries are on the database's clock; a host's times are
        moved onto it by ``shift`` (see ``sql/queries.sql``).

        Raises:
            DatabaseError: the database does not answer.
        """
        wall, steady = time.time(), time.monotonic()
        cached = self._clock
        if cached is not None:
            shift, slack, wall_minus_steady, measured_at = cached
            if (
                steady - measured_at < _CLOCK_REFRESH_SECONDS
                and abs((wall - steady) - wall_minus_steady) < _CLOCK_STEP_SECONDS
            ):
                return shift, slack
        best: tuple[float, float] | None = None
        for _ in range(2):  # the first may have paid for a connection: keep the tighter
            before, sent = time.time(), time.monotonic()
            ((database_now,),) = self.run("clock")
            after, answered = time.time(), time.monotonic()
            measured = (float(database_now) - (before + after) / 2, (answered - sent) / 2)
            if best is None or measured[1] < best[1]:
                best = measured
            if best[1] < _CLOCK_GOOD_ENOUGH_SECONDS:
                break
        assert best is not None
        shift, slack = best[0], best[1] + 0.001
        self._clock = (shift, slack, time.time() - time.monotonic(), time.monotonic())
        return shift, slack

    def check(self) -> None:
        """Connect once, outside the pool, so a failure says why; creates the schema
        if needed. Raises :class:`DatabaseError`."""
        psycopg, pgconn = _driver()
        deadline = time.monotonic() + _MIGRATION_SECONDS
        try:
            with pgconn.connect(self.url, **self._connect_options()) as conn:
                conn.deadline = deadline
                self._migrate(conn)
        except (psycopg.Error, OSError) as exc:
            raise _mapped(exc, deadline) from exc

    def _migrate(self, conn: psycopg.Connection[Any]) -> None:
        """Bring the schema to :data:`SCHEMA_VERSION`; nothing when it is already there
        (then the role needs no CREATE privilege)."""
        psycopg, _ = _driver()
        try:
            ((current,),) = conn.execute(QUERIES["schema_version"]).fetchall()
        except psycopg.errors.UndefinedTable:
            current = 0
        if current >= SCHEMA_VERSION:
            self._schema_ready = True
            return
        with conn.transaction():
            conn.execute(QUERIES["lock_schema"])
            conn.execute(QUERIES["create_schema_version"])
            ((current,),) = conn.execute(QUERIES["schema_version"]).fetchall()
            for version, sql in migrations():
                if version > current:
                    conn.execute(sql)
                    conn.execute(QUERIES["record_schema_version"], {"version": version})
        self._schema_ready = True

    def close(self) -> None:
        """Close the connections (a later use opens new ones)."""
        with self._guard:
            slots, self._slots = self._slots, None
        if slots is not None and self._slots_pid == os.getpid():
            slots.close()
        elif slots is not None:
            _INHERITED.append(slots)


def _reset_database_in_child(reference: weakref.ref[Database]) -> None:
    # Another thread of the parent may have held the guard at the fork: it would stay
    # held here. The parent's connections are left alone (see _get_slots).
    database = reference()
    if database is not None:
        database._guard = threading.Lock()


def _mapped(exc: BaseException, deadline: float | None = None) -> DatabaseError:
    """Our error for a driver's, texts scrubbed; the driver's error (scrubbed in place)
    becomes its cause."""
    if isinstance(exc, DatabaseError):
        return exc
    text = scrub(str(exc)).strip().splitlines()
    summary = text[0] if text else ""
    with contextlib.suppress(Exception):
        exc.args = tuple(scrub(str(arg)) for arg in exc.args)
    if type(exc).__name__ == "DeadlineExceeded":
        summary = "no answer in time (the connection was closed)"
        return DatabaseError(f"PostgreSQL: {summary}")
    return DatabaseError(f"PostgreSQL: {type(exc).__name__}: {summary}")


@dataclass(frozen=True, slots=True)
class Fence:
    """What a sender's writes are fenced with: its holder id and term."""

    holder: str
    term: int


# The spill mover's waits between tries while the database does not answer.
_MOVE_RETRY_FIRST = 0.5
_MOVE_RETRY_MAX = 5.0
# Rows moved from the spill per read of it, and bytes per statement.
_MOVE_BATCH = 500
_MOVE_BYTES = 4 << 20
# At exit, how long moving the spill may take in all (on the calling thread).
_EXIT_MOVE_SECONDS = 10.0


def _pg_text(text: str) -> str:
    """``text`` for a column people read (an event name, an error): PostgreSQL's text
    cannot hold NUL, which is written as the six characters ``\\u0000``."""
    return text.replace("\x00", "\\u0000") if "\x00" in text else text


def _pg_optional(text: str | None) -> str | None:
    return None if text is None else _pg_text(text)


def _person_column(person: str | None) -> str | None:
    """The ``person`` column of a row: the person itself, unless it holds a NUL, then
    ``n`` and the person with ``\\`` and NUL escaped (persons start ``c:`` or ``a:``,
    so the two forms never meet). Read back by :func:`_person_from_column`."""
    if person is None or "\x00" not in person:
        return person
    return "n" + person.replace("\\", "\\\\").replace("\x00", "\\0")


def _person_from_column(value: str) -> str:
    if not value.startswith("n"):
        return value
    return re.sub(r"\\(.)", lambda m: "\x00" if m.group(1) == "0" else m.group(1), value[1:])


def _jsonb_safe(value: Any) -> Any:
    """A copy of a JSON value that jsonb accepts: NUL in keys and strings written out."""
    if isinstance(value, str):
        return _pg_text(value)
    if isinstance(value, dict):
        return {_pg_text(str(key)): _jsonb_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_jsonb_safe(item) for item in value]
    return value


def _refused_by_data(error: DatabaseError) -> bool:
    """Whether PostgreSQL (or the driver, before sending) refused what a statement
    carried (a value its types cannot hold: class 22, data exception; class 23,
    integrity), rather than failing to answer or to let us in: sending the rows in
    halves then finds which."""
    psycopg, pgconn = _driver()
    cause = error.__cause__
    if isinstance(cause, pgconn.DeadlineExceeded | pgconn.PoolExhausted):
        return False
    return isinstance(cause, psycopg.DataError | psycopg.IntegrityError | ValueError)


class PostgresLog:
    """The :class:`~cio_logging.store.EventLog` on PostgreSQL, with a local spill.

    Appending runs on the calling thread (no thread pool: a commit at interpreter exit
    works on every Python) and waits at most ``timeout``. When the database does not
    answer in time, rows go to ``spill`` (a diskcache log in the queue directory), and
    so do the next commits while spilled rows wait there (a person's calls keep their
    order). The spill is moved into the database by whichever process of the
    directory can reach it, whatever its ``deliver``: a thread of this store's own,
    started when rows are spilled or found in the spill at start, which ends once the
    spill is empty; :meth:`sendable_through` (``flush()``) and :meth:`close` (exit)
    move it on the calling thread. A row the database refuses (its text) never holds
    up the others: it goes to the dead letters with the reason.

    One clock: due times and logging times are stored on the database's clock (see
    ``sql/queries.sql``); this class takes and gives this host's.

    Fencing: once :attr:`fence` is set (the worker took the lease), each sender write
    (remove, record_failure, adjust_due_times, a dead letter, the sender state)
    commits only if the lease's term is still the fence's, under a shared lock on the
    lease row, so no takeover can interleave; otherwise it raises
    :class:`LeaseLostError` and changes nothing. The fence stays set when the lease is
    lost, so a sender that was paused past it cannot write after a takeover.
    """

    def __init__(
        self, database: Database, workspace: str, spill: WriteAheadLog, *, timeout: float = 1.0
    ) -> None:
        self.database = database
        self.workspace = workspace
        self.spill = spill
        self.directory = spill.directory
        self.timeout = timeout
        self.fence: Fence | None = None
        #: Dead letters for rows the database refuses (set by open_fleet_store).
        self.dead_letters: PostgresDeadLetters | None = None
        self._spill_lock = DeliveryLock(spill.directory.parent / "spill.lock")
        self._host = socket.gethostname()
        # Commits go to the database (True), or to the spill while it is away or rows
        # wait in the spill (False).
        self._direct = True
        self._answered = True  # the last try of the database's (mover, commit) worked
        self._moved_through = 0  # the largest position a move from the spill gave
        self._closing = False
        self._reset_threads()
        reference = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _reset_log_in_child(reference))
        with contextlib.suppress(Exception):
            if len(spill):
                # An earlier process left rows here: they go first, moved in the
                # background (nothing here waits for the database).
                self._direct = False
                self._start_mover()

    def _reset_threads(self) -> None:
        # Called at construction and in a forked child (the parent's mover is not ours).
        self._spill_guard = threading.Lock()
        self._move_guard = threading.Lock()
        self._mover: threading.Thread | None = None
        self._mover_stop = threading.Event()
        self._mover_guard = threading.Lock()

    def __repr__(self) -> str:
        return f"PostgresLog({self.database.display_url!r}, workspace={self.workspace!r})"

    # -- appending ---------------------------------------------------------------------

    def append(
        self,
        event: Event,
        *,
        replayed_at: float | None = None,
        dead_letter: DeadLetterHistory | None = None,
    ) -> None:
        self.append_rows([encode_row(event, replayed_at=replayed_at, dead_letter=dead_letter)])

    def append_rows(self, rows: Sequence[Row]) -> int:
        """Commit ``rows`` to the database, or to the spill when it does not answer in
        time (or rows wait there); returns the largest position the database gave (0
        if spilled). Raises only when the spill fails too (the local disk)."""
        if not rows:
            return 0
        if self._direct:
            try:
                return self._insert_or_dead_letter(rows, self.timeout)
            except DatabaseError as exc:
                self._divert(exc)
        with self._spill_guard:
            self.spill.append_rows(rows)
            self._direct = False
        self._start_mover()
        return 0

    @property
    def moved_through(self) -> int:
        """The largest position a row moved from the spill by this process got (0:
        none): ``flush()`` waits for those rows too."""
        return self._moved_through

    def available(self) -> bool:
        """Whether the database answered the last time it was tried (while it does
        not, commits go to the spill and figures are not asked of it)."""
        return self._answered

    def settle(self, timeout: float) -> int:
        """Move what waits in the spill into the database now (the caller waits, at
        most ``timeout``): ``flush()`` counts rows in the spill as not yet committed.
        Returns how many rows are still in the spill (0: all in the database)."""
        deadline = time.monotonic() + timeout
        while len(self.spill) and not self._move_all(deadline):
            if not self._answered or time.monotonic() >= deadline:
                break
            time.sleep(0.05)  # another process of this directory is moving it
        return len(self.spill)

    def spilled(self) -> int:
        """Rows in the local spill now (committed while the database did not answer)."""
        return len(self.spill)

    def probe(self) -> bool:
        """Whether the database answers; when it does, the spill is moved into it
        first (then commits go to the database again)."""
        if self._direct:
            return True
        return self._move_all()

    def _divert(self, error: BaseException | None) -> None:
        first = self._direct
        self._direct = False
        self._answered = False
        if first:
            internal_log.warning(
                "PostgreSQL (%s) did not take a commit (%s); events go to the "
                "local spill in %s and move to the database once it answers",
                self.database.display_url,
                f"no answer within {self.timeout:g}s" if error is None else scrub(str(error)),
                self.spill.directory,
            )

    def _insert(self, rows: Sequence[Row], timeout: float | None) -> int:
        heads = [_row_head(row[2], row[1]) for row in rows]
        params = {
            "workspace": self.workspace,
            "ids": [row[0] for row in rows],
            "events": [_pg_text(name) for name, _ in heads],
            "due": [row[1] for row in rows],
            "logged": [logged for _, logged in heads],
            "bodies": [row[2] for row in rows],
            "persons": [_person_column(row[3]) for row in rows],
            "shift": self.database.clock_shift()[0],
            "host_now": time.time(),
        }
        ((seq,),) = self.database.run("insert_rows", params, timeout=timeout, atomic=True)
        return int(seq)

    def _insert_or_dead_letter(self, rows: Sequence[Row], timeout: float | None) -> int:
        """Insert ``rows``; when the database refuses some of them (not when it does not
        answer), find which by halves and dead-letter those with the reason."""
        try:
            return self._insert(rows, timeout)
        except DatabaseError as exc:
            if not _refused_by_data(exc):
                raise
            if len(rows) == 1:
                self._refuse(rows[0], exc)
                return 0
        half = len(rows) // 2
        first = self._insert_or_dead_letter(rows[:half], timeout)
        return max(first, self._insert_or_dead_letter(rows[half:], timeout))

    def _refuse(self, row: Row, error: DatabaseError) -> None:
        """A row the database cannot store: a dead letter with the reason, so it holds
        up nothing behind it. The dead letter keeps any event exactly (see
        :class:`PostgresDeadLetters`); an id the database cannot hold (ours are ULIDs:
        a damaged or foreign spill) is written with its NUL spelled out. Should the
        database refuse even that, the row goes to the queue directory's own
        dead-letter store (``cio-logging dlq --queue-dir``), never away."""
        reason = f"PostgreSQL refused the row: {scrub(str(error))}"
        key = _pg_text(row[0])
        try:
            event: Event | None = decode_row(row[0], row[1], row[2]).event
        except InvalidEventError:
            event = None
        kind = "refused_by_database"
        try:
            if self.dead_letters is None:
                raise error
            self.dead_letters.add(
                key, event, status=None, error_type=kind, message=reason, attempts=0, fenced=False
            )
            where = "the dead-letter table"
        except DatabaseError as exc:
            if not _refused_by_data(exc):
                raise
            local = DeadLetterStore(self.spill.directory.parent / "dead", fsync=True)
            try:
                local.add(key, event, status=None, error_type=kind, message=reason, attempts=0)
            finally:
                local.close()
            where = f"the local dead-letter store in {local.directory}"
        internal_log.error("event %s moved to %s: %s", key, where, reason)

    # -- the spill ---------------------------------------------------------------------

    def move_spilled(self, limit: int = _MOVE_BATCH) -> int:
        """Move up to ``limit`` spilled rows to the database; returns how many moved
        (0 also when another process of this directory is moving them).

        Inserted first (an id already there is left as it is), removed from the spill
        after: a crash in between leaves a row in both, and the id deduplicates.
        """
        if not len(self.spill):
            return 0  # the usual answer: no lock taken
        with self._move_guard:
            if not self._spill_lock.try_acquire():
                return 0
            try:
                return self._move_batch(limit, None)
            finally:
                self._spill_lock.release()

    def _move_batch(self, limit: int, timeout: float | None) -> int:
        if not len(self.spill):
            return 0
        batch = self.spill.read_due(limit, math.inf)
        rows = [
            (
                queued.key,
                queued.next_attempt_at,
                encode_row(
                    queued.event,
                    replayed_at=queued.replayed_at,
                    dead_letter=queued.dead_letter,
                    attempts=queued.attempts,
                    first_failure_at=queued.first_failure_at,
                    last_error=queued.last_error,
                )[2],
                queued.event.person,
            )
            for queued in batch.events
        ]
        for corrupt in batch.corrupt:
            internal_log.error(
                "a spilled row could not be read and was dropped: %s", corrupt.reason
            )
        # Large events: a statement of at most _MOVE_BYTES, so each fits its deadline.
        chunk: list[Row] = []
        size = 0
        for row in rows:
            if chunk and size + len(row[2]) > _MOVE_BYTES:
                self._move_rows(chunk, timeout)
                chunk, size = [], 0
            chunk.append(row)
            size += len(row[2])
        if chunk:
            self._move_rows(chunk, timeout)
        return len(rows) + len(batch.corrupt)

    def _move_rows(self, rows: list[Row], timeout: float | None) -> None:
        seq = self._insert_or_dead_letter(rows, timeout)
        self._moved_through = max(self._moved_through, seq)
        self._answered = True
        self.spill.remove([row[0] for row in rows])

    def _move_all(self, deadline: float | None = None) -> bool:
        """Move the whole spill (another process of the directory may be doing it);
        True once it is empty and commits go to the database again. Raises nothing."""
        with self._move_guard:
            try:
                if not self._spill_lock.try_acquire():
                    return False
            except OSError as exc:
                internal_log.debug("spill lock not taken: %s", exc)
                return False
            try:
                reported = False
                while True:
                    if deadline is not None and time.monotonic() >= deadline:
                        return False
                    if not reported and len(self.spill):
                        self._report_spill()
                        reported = True
                    if self._move_batch(_MOVE_BATCH, None):
                        continue
                    with self._spill_guard:
                        if len(self.spill):
                            continue  # a commit spilled meanwhile
                        was_direct, self._direct = self._direct, True
                    self._answered = True
                    if reported:
                        self._report_spill()
                    if not was_direct:
                        internal_log.warning(
                            "PostgreSQL (%s) answers again; the events spilled in %s "
                            "are in the database",
                            self.database.display_url,
                            self.spill.directory,
                        )
                    return True
            except DatabaseError as exc:
                self._answered = False
                internal_log.debug("spilled rows not moved yet: %s", exc)
                return False
            except Exception:
                self._answered = False
                internal_log.exception("spilled rows not moved (they stay in the spill)")
                return False
            finally:
                self._spill_lock.release()

    def _report_spill(self) -> None:
        """Tell the fleet (status on any host) how many rows this host's spill holds."""
        with contextlib.suppress(Exception):
            self.database.run(
                "report_spill",
                {
                    "workspace": self.workspace,
                    "host": self._host,
                    "directory": str(self.spill.directory),
                    "rows": len(self.spill),
                    "oldest": self.spill.oldest_logged_at(),
                    "shift": self.database.clock_shift()[0],
                },
            )

    def _start_mover(self) -> None:
        """A thread that moves the spill once the database answers, then ends. Never
        at interpreter exit (threads are refused there): :meth:`close` moves it."""
        with self._mover_guard:
            mover = self._mover
            if mover is not None and mover.is_alive():
                return
            if self._closing or not threading.main_thread().is_alive():
                return
            self._mover_stop.clear()
            background.collect_garbage_here()  # see background.OwnThread.ensure_started
            thread = threading.Thread(
                target=self._move_in_background, name="cio_logging-spill", daemon=True
            )
            try:
                thread.start()
            except RuntimeError:  # the interpreter is shutting down
                return
            self._mover = thread

    def _move_in_background(self) -> None:
        background.mark_current_thread()
        wait = _MOVE_RETRY_FIRST
        while not self._mover_stop.is_set():
            if self._move_all():
                return
            self._mover_stop.wait(wait)
            wait = min(wait * 2, _MOVE_RETRY_MAX)

    # -- reading and acknowledging (the sender) ----------------------------------------

    def read_due(
        self, limit: int, now: float | None = None, *, after: tuple[float, int] | None = None
    ) -> Batch:
        shift, slack = self.database.clock_shift()
        moment = time.time() if now is None else now
        params: dict[str, Any] = {
            "workspace": self.workspace,
            # A row committed just now is due on the database's clock: by as much as
            # the shift may be off, rows come due early rather than late.
            "now": moment + slack,
            "shift": shift,
            "limit": limit,
        }
        if after is None:
            found = self.database.run("read_due", params)
        else:
            params.update(due=after[0], seq=after[1])
            found = self.database.run("read_due_after", params)
        events: list[QueuedEvent] = []
        corrupt: list[CorruptEntry] = []
        bad: list[str] = []
        # The cursor is the database's (due time as stored, position): opaque to callers.
        positions = [(float(due), int(seq)) for _, due, _, seq, _, _ in found]
        cursor = max([*positions, after] if after is not None else positions, default=None)
        for key, _, body, seq, due_here, logged_here in found:
            try:
                queued = decode_row(key, float(due_here), body, int(seq))
            except InvalidEventError as exc:
                corrupt.append(CorruptEntry(key, str(exc)))
                bad.append(key)
                continue
            events.append(queued._replace(logged_at_here=float(logged_here)))
        if bad:
            self._fenced("delete_rows", {"ids": bad})
        return Batch(events, corrupt, cursor)

    def earlier_rows(
        self, people: Collection[str], through: int
    ) -> list[tuple[str, int, float, str]]:
        if not people:
            return []
        params = {
            "workspace": self.workspace,
            "people": [_person_column(person) for person in people],
            "through": through,
            "shift": self.database.clock_shift()[0],
        }
        found = self.database.run("earlier_rows", params)
        return [
            (_person_from_column(str(person)), int(seq), float(due), str(key))
            for person, seq, due, key in found
        ]

    def person_counts(self, people: Collection[str], through: int) -> dict[str, int]:
        if not people:
            return {}
        params = {
            "workspace": self.workspace,
            "people": [_person_column(person) for person in people],
            "through": through,
        }
        return {
            _person_from_column(str(person)): int(n)
            for person, n in self.database.run("person_counts", params)
        }

    def remove(self, keys: Iterable[str], *, delivered: int = 0) -> None:
        # A fleet's deliveries are counted in the sender's state row (cio_sender_state).
        ids = list(keys)
        if ids:
            self._fenced("delete_rows", {"ids": ids})

    def delivered_total(self) -> int | None:
        return None  # counted per sender, in cio_sender_state

    # -- the sender, per batch (see SenderQueue) ------------------------------------------
    #
    # Times cross here on the host's clock and are stored on the database's (see the
    # header of queries.sql): due times and logging times are moved by the shift.

    def next_batch(self, query: BatchQuery, templates: Templates) -> SendBatch:
        """The calls that may go now, items built by PostgreSQL (see SenderQueue)."""
        shift = self.database.clock_shift()[0]
        params: dict[str, Any] = {
            "workspace": self.workspace,
            "now": query.now + shift,
            "limit": query.limit,
            "lane": query.lane,
            "scan": query.scan or 4 * query.limit,
            "after": -(2**63),
            "budget": query.budget,
            "item_limit": query.item_limit,
            "expire_before": max(query.expire_before, -1e300) + shift,
            "late_before": max(query.late_before, -1e300),
            "busy": [_person_column(person) for person in query.busy],
            "essential": list(query.essential),
        }
        sql = _next_batch_sql(templates)
        while True:
            with self.database.connection() as conn:
                found = conn.execute(sql, params).fetchall()
            ((positions, ids, people, items, logged, flags, count, last, scanned, *more),) = found
            busy, late, oldest, others = more
            # A scan whose every call is of a busy person ends the read (see the local
            # store's next_batch).
            if count or scanned < params["scan"] or last is None or busy == scanned:
                break
            params["after"] = last  # a whole scan that may not go: look past it
        if not count:
            return SendBatch([], [], [], [], [], [], [], [])
        item_list = str(items).split("\x1e")
        slow = [i for i, item in enumerate(item_list) if not item] if "" in item_list else []
        persons: list[str] = json.loads(people)
        if any(person.startswith("n") for person in persons):
            persons = [_person_from_column(person) for person in persons]
        return SendBatch(
            str(positions).split(","),
            json.loads(ids),
            persons,
            [_person_from_column(other) for other in json.loads(others)],
            item_list,
            [float(value) - shift for value in str(logged).split(",")],
            [flag == "1" for flag in str(flags)],
            slow,
            int(late or 0),
            None if oldest is None else float(oldest),
        )

    def rows(self, positions: Sequence[str | int]) -> tuple[list[QueuedEvent], list[CorruptEntry]]:
        params = {
            "workspace": self.workspace,
            "seqs": [int(p) for p in positions],
            "shift": self.database.clock_shift()[0],
        }
        found = self.database.run("rows_at", params)
        events: list[QueuedEvent] = []
        corrupt: list[CorruptEntry] = []
        for key, due, body, seq, attempts, first_failure_at, last_error, logged in found:
            try:
                queued = decode_row(key, due, body, int(seq))
            except InvalidEventError as exc:
                corrupt.append(CorruptEntry(key, str(exc), int(seq)))
                continue
            if last_error is not None or attempts:
                queued = queued._replace(
                    attempts=max(int(attempts), queued.attempts),
                    first_failure_at=first_failure_at or queued.first_failure_at,
                    last_error=last_error or queued.last_error,
                )
            events.append(queued._replace(logged_at_here=float(logged)))
        return events, corrupt

    def acknowledge(self, positions: Sequence[str | int], *, delivered: int = 0) -> None:
        # A fleet's deliveries are counted in the sender's state row (cio_sender_state).
        if positions:
            self._fenced("delete_seqs", {"seqs": "{" + ",".join(map(str, positions)) + "}"})

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
        if not positions:
            return []
        seqs = "{" + ",".join(map(str, positions)) + "}"
        shift = self.database.clock_shift()[0]
        exhausted: list[QueuedEvent] = []
        if count_attempt:
            params = {
                "workspace": self.workspace,
                "seqs": seqs,
                "max_attempts": max_attempts,
                "shift": shift,
            }
            for key, due, body, seq, attempts, first, last, logged in self.database.run(
                "exhausted_rows", params
            ):
                with contextlib.suppress(InvalidEventError):
                    queued = decode_row(key, due, body, int(seq))
                    exhausted.append(
                        queued._replace(
                            attempts=max(int(attempts), queued.attempts),
                            first_failure_at=first or queued.first_failure_at,
                            last_error=last or queued.last_error,
                            logged_at_here=float(logged),
                        )
                    )
        self._fenced(
            "schedule_retries",
            {
                "seqs": seqs,
                "counted": 1 if count_attempt else 0,
                "delays": list(delays),
                "now": now,
                "shift": shift,
                "error": _pg_text(error),
                "max_attempts": max_attempts if count_attempt else 2**62,
            },
        )
        return exhausted

    def next_due(self, after: float) -> float | None:
        shift = self.database.clock_shift()[0]
        params = {"workspace": self.workspace, "after": after, "shift": shift}
        ((due,),) = self.database.run("next_due", params)
        return None if due is None else float(due)

    def requeue(self, rows: Sequence[Row]) -> list[int]:
        return requeue_rows(self.database, self.workspace, rows)

    def queued_calls_of(self, person: str) -> int:
        params = {"workspace": self.workspace, "person": _person_column(person)}
        ((count,),) = self.database.run("count_person", params)
        return int(count)

    def record_failure(
        self,
        failures: Iterable[tuple[QueuedEvent, float]],
        error: str,
        now: float | None = None,
        *,
        count_attempt: bool = True,
    ) -> None:
        moment = time.time() if now is None else now
        ids, due, bodies, attempts, first = [], [], [], [], []
        for queued, next_attempt_at in failures:
            tries = queued.attempts + (1 if count_attempt else 0)
            first_failure_at = queued.first_failure_at or moment
            ids.append(queued.key)
            due.append(next_attempt_at)
            attempts.append(tries)
            first.append(first_failure_at)
            bodies.append(
                encode_row(
                    queued.event,
                    replayed_at=queued.replayed_at,
                    dead_letter=queued.dead_letter,
                    attempts=tries,
                    first_failure_at=first_failure_at,
                    last_error=error,
                )[2]
            )
        if ids:
            params = {
                "ids": ids,
                "due": due,
                "bodies": bodies,
                "attempts": attempts,
                "first": first,
                "error": _pg_text(error),
                "shift": self.database.clock_shift()[0],
            }
            self._fenced("record_failure", params)

    def _fenced(self, name: str, params: dict[str, Any]) -> None:
        """Run a sender's write, checked against :attr:`fence` when one is set."""
        params = {"workspace": self.workspace, **params}
        with self.fenced_transaction() as conn:
            conn.execute(QUERIES[name], params)

    @contextlib.contextmanager
    def fenced_transaction(self) -> Iterator[psycopg.Connection[Any]]:
        """A transaction that first checks :attr:`fence` (when set) under a shared lock
        on the lease row, so no take-over commits between the check and the writes.

        Raises:
            LeaseLostError: the lease's term or holder is no longer the fence's.
        """
        fence = self.fence
        with self.database.transaction() as conn:
            if fence is not None:
                lease = conn.execute(
                    QUERIES["lease_for_share"], {"workspace": self.workspace}
                ).fetchall()
                if not lease or (lease[0][0], lease[0][1]) != (fence.term, fence.holder):
                    raise LeaseLostError(
                        f"the lease of this workspace moved past term {fence.term}: "
                        "another sender took over"
                    )
            yield conn

    def adjust_due_times(self, step: float, now: float, horizon: float) -> int:
        """Due times are on the database's clock: a step of this host's clock moves
        none. Rows due further ahead than ``horizon`` (an earlier version stored hosts'
        own clocks) are made due now."""
        params = {"workspace": self.workspace, "horizon": horizon}
        with self.fenced_transaction() as conn:
            return int(conn.execute(QUERIES["due_now_if_after"], params).rowcount)

    # -- looking -----------------------------------------------------------------------

    def get(self, key: str) -> QueuedEvent | None:
        if not storable_key(key):
            return None
        params = {"workspace": self.workspace, "id": key, "shift": self.database.clock_shift()[0]}
        found = self.database.run("get_row", params)
        if found:
            key, due, body, seq, logged = found[0]
            with contextlib.suppress(InvalidEventError):
                return decode_row(key, float(due), body, int(seq))._replace(
                    logged_at_here=float(logged)
                )
            return None
        return self.spill.get(key)

    def sendable_through(self, rowid: int, now: float, horizon: float) -> bool:
        """Whether a row this process committed (at or before ``rowid``, or moved from
        its spill) still waits and can go now. Rows in the spill are moved first, here
        if no mover runs: False while the database does not answer (nothing can go
        now: the rows are safe in the spill)."""
        if len(self.spill):
            mover = self._mover
            if mover is not None and mover.is_alive():
                return self._answered
            if not self._move_all():
                return False
        if not self._direct:
            return False
        through = max(rowid, self._moved_through)
        params = {"workspace": self.workspace, "seq": through, "horizon": horizon}
        try:
            return bool(self.database.run("sendable_through", params))
        except DatabaseError:
            return False

    def oldest_logged_at(self) -> float | None:
        self._require_available()
        params = {"workspace": self.workspace, "shift": self.database.clock_shift()[0]}
        ((oldest,),) = self.database.run("oldest_logged_at", params)
        spilled = self.spill.oldest_logged_at()
        candidates = [float(value) for value in (oldest, spilled) if value is not None]
        return min(candidates) if candidates else None

    def volume(self) -> int:
        """The local spill's size: the disk limits protect this host's disk."""
        return self.spill.volume()

    def replaced_on_disk(self, *, at_most_every: float = 0.0) -> bool:
        return self.spill.replaced_on_disk(at_most_every=at_most_every)

    def recover(self, error: BaseException | None) -> str | None:
        return self.spill.recover(error)

    def _require_available(self) -> None:
        # Figures for status() and the gauges: answered at once while commits spill,
        # rather than each waiting for a timeout.
        if not self._answered:
            raise DatabaseError("PostgreSQL does not answer (commits go to the local spill)")

    def __len__(self) -> int:
        self._require_available()
        ((count,),) = self.database.run("count_rows", {"workspace": self.workspace})
        return int(count) + len(self.spill)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.get(key) is not None

    def close(self) -> None:
        """Move what the spill holds, if the database answers (on this thread: at exit
        no thread may start), then release the spill and the connections."""
        self._closing = True
        self._mover_stop.set()
        mover = self._mover
        if mover is not None and mover is not threading.current_thread():
            mover.join(self.timeout * 2)
        with contextlib.suppress(Exception):
            if len(self.spill):
                self._move_all(time.monotonic() + _EXIT_MOVE_SECONDS)
        self._closing = False  # a handler used after close works (and reopens)
        self.spill.close()
        self.database.close()  # shared with the lease and the dead letters: reopens on use


def _reset_log_in_child(reference: weakref.ref[PostgresLog]) -> None:
    log = reference()
    if log is not None:
        log._reset_threads()
        log._closing = False
        # No thread started here (inside the fork): the child's next spilled commit
        # starts its mover; the parent's goes on moving the directory's spill.


def _with_later(text: str, later: str | None) -> str:
    """An entry's text with the later calls noted beside it, when there are any."""
    if later is None:
        return text
    with contextlib.suppress(ValueError, TypeError):
        entry = json.loads(text)
        if isinstance(entry, dict):
            entry.update(json.loads(later))
            return json.dumps(entry, separators=(",", ":"))
    return text


def requeue_rows(database: Database, workspace: str, rows: Sequence[Row]) -> list[int]:
    """Put replayed rows ahead of every queued row of ``workspace``, in the order
    given (see SenderQueue.requeue); their positions."""
    if not rows:
        return []
    heads = [_row_head(row[2], row[1]) for row in rows]
    params = {
        "workspace": workspace,
        "ids": [row[0] for row in rows],
        "events": [_pg_text(name) for name, _ in heads],
        "due": [row[1] for row in rows],
        "logged": [logged for _, logged in heads],
        "bodies": [row[2] for row in rows],
        "persons": [_person_column(row[3]) for row in rows],
        "attempts": [_history_attempts(row[2]) for row in rows],
        "shift": database.clock_shift()[0],
    }
    found = database.run("requeue_rows", params)
    return sorted(int(seq) for (seq,) in found)


def _history_attempts(body: str) -> int:
    with contextlib.suppress(ValueError, TypeError, IndexError, KeyError, AttributeError):
        entry = json.loads(body)
        if type(entry) is list and isinstance(entry[6], dict):
            return int(entry[6].get("attempts", 0))
    return 0


def _next_batch_sql(templates: Templates) -> str:
    """The batch query for one API's templates (see WriteAheadLog.next_batch, the same
    rules): built here, not in queries.sql, because the items are compiled from the
    API's templates. Literal percent signs are doubled for psycopg's parameters."""
    return per_templates(templates, _build_next_batch_sql)


def _build_next_batch_sql(templates: Templates) -> str:
    """The batch query (see WriteAheadLog.next_batch, the same rules and buckets). Due
    and logging times are compared on the database's clock (the caller moved them)."""
    item = postgres_item(templates, "q.body", "q.id").replace("%", "%%")
    return f"""
WITH scan AS (
  SELECT seq, person, other_person, last_error, due_at FROM cio_queue
  WHERE workspace = %(workspace)s AND seq > %(after)s
    AND (%(lane)s::int IS NULL OR lane = %(lane)s::int)
  ORDER BY seq LIMIT %(scan)s
), chosen AS (
  SELECT s.seq FROM scan AS s
  WHERE (s.last_error IS NULL OR s.due_at <= %(now)s::float8)
    AND (s.person IS NULL OR (
          NOT (s.person = ANY(%(busy)s::text[]))
          AND NOT EXISTS (SELECT 1 FROM cio_queue AS w
                          WHERE w.workspace = %(workspace)s AND w.person = s.person
                            AND w.seq < s.seq AND w.last_error IS NOT NULL
                            AND w.due_at > %(now)s::float8)
          AND NOT EXISTS (SELECT 1 FROM cio_queue AS m
                          WHERE m.workspace = %(workspace)s AND m.other_person = s.person
                            AND m.other_person IS NOT NULL AND m.seq < s.seq)
          AND NOT EXISTS (SELECT 1 FROM cio_queue AS m
                          WHERE m.workspace = %(workspace)s AND m.person = s.person
                            AND m.other_person IS NOT NULL AND m.seq < s.seq)))
    AND (s.other_person IS NULL OR (
          NOT (s.other_person = ANY(%(busy)s::text[]))
          AND NOT EXISTS (SELECT 1 FROM cio_queue AS w
                          WHERE w.workspace = %(workspace)s AND w.person = s.other_person
                            AND w.seq < s.seq)))
  ORDER BY s.seq
  LIMIT %(limit)s
), built AS MATERIALIZED (
  SELECT c.seq, q.id, q.person, q.other_person, q.body, q.event, q.logged_at AS logged,
         {item} AS raw
  FROM chosen AS c JOIN cio_queue AS q ON q.workspace = %(workspace)s AND q.seq = c.seq
), sized AS (
  SELECT seq, id, person, other_person, logged,
         CASE WHEN raw IS NULL OR octet_length(raw) > %(item_limit)s
              OR logged < %(expire_before)s::float8 THEN NULL
              ELSE ((body)::json ->> 4)::double precision END AS stamp,
         CASE WHEN raw IS NULL OR octet_length(raw) > %(item_limit)s
              OR logged < %(expire_before)s::float8 THEN NULL ELSE raw END AS item,
         raw IS NOT NULL AND event = ANY(%(essential)s::text[]) AS essential,
         sum(coalesce(octet_length(raw), octet_length(body)) + 1) OVER (ORDER BY seq) AS used,
         row_number() OVER (ORDER BY seq) AS n
  FROM built
), kept AS (
  SELECT * FROM sized WHERE used <= %(budget)s OR n = 1
)
SELECT string_agg(seq::text, ',' ORDER BY seq),
       json_agg(id ORDER BY seq)::text,
       json_agg(coalesce(person, '') ORDER BY seq)::text,
       string_agg(coalesce(item, ''), E'\\x1e' ORDER BY seq),
       string_agg(logged::text, ',' ORDER BY seq),
       string_agg(CASE WHEN essential THEN '1' ELSE '0' END, '' ORDER BY seq), count(*),
       (SELECT max(seq) FROM scan), (SELECT count(*) FROM scan),
       (SELECT count(*) FROM scan WHERE person = ANY(%(busy)s::text[])
          OR other_person = ANY(%(busy)s::text[])),
       count(*) FILTER (WHERE stamp < %(late_before)s::float8), min(stamp),
       coalesce(json_agg(other_person ORDER BY seq)
                FILTER (WHERE other_person IS NOT NULL), '[]')::text
FROM kept
"""  # noqa: S608 - only the compiled templates, no input, go in


def _row_head(body: str, due: float) -> tuple[str, float]:
    """The event name and logging time of a row text, read from its head (the data,
    which may be large, is not decoded)."""
    split = _split_row(body)
    if split is not None:
        fields = split[0]
        with contextlib.suppress(TypeError, ValueError):
            return str(fields[1]), float(fields[5])
    with contextlib.suppress(ValueError, TypeError, IndexError, KeyError):
        entry = json.loads(body)
        if type(entry) is list:
            return str(entry[1]), float(entry[5])
        return str(entry["event"]["name"]), float(entry["event"]["logged_at"])
    return "", due


class PostgresDeadLetters:
    """The :class:`~cio_logging.store.DeadLetterArchive` in table ``cio_dead_letter``.

    Besides the whole entry (``entry``, jsonb) each row has columns to read with psql:
    ``event``, ``customer_id``, ``anonymous_id``, ``data`` (jsonb), ``error``,
    ``error_type``, ``status``, ``attempts``, ``created_at``. An event holding a NUL
    character (which jsonb and text refuse) keeps its exact entry in ``entry_text``;
    the other columns then show each NUL as ``\\u0000``.

    A dead letter added by the sender is fenced by the lease's term (see
    :class:`PostgresLog`): ``log`` holds the fence.
    """

    def __init__(
        self, database: Database, workspace: str, directory: Path, log: PostgresLog | None = None
    ) -> None:
        self.database = database
        self.workspace = workspace
        self.directory = directory
        self._log = log

    def __repr__(self) -> str:
        return f"PostgresDeadLetters({self.database.display_url!r}, workspace={self.workspace!r})"

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
        fenced: bool = True,
    ) -> None:
        """Store the entry; ``fenced`` (the sender's writes): only while this process's
        lease term is current, else :class:`LeaseLostError` and nothing written."""
        psycopg, _ = _driver()
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
        exact = json.dumps(entry, separators=(",", ":"))
        jsonb = psycopg.types.json.Jsonb
        data = None if event is None else json.loads(event.data_json)
        params = {
            "workspace": self.workspace,
            "id": key,
            "event": None if event is None else _pg_text(event.name),
            "customer_id": None if event is None else _pg_optional(event.customer_id),
            "anonymous_id": None if event is None else _pg_optional(event.anonymous_id),
            "data": None if data is None else jsonb(_jsonb_safe(data)),
            "error": _pg_text(message),
            "error_type": _pg_text(error_type),
            "status": status,
            "attempts": attempts,
            "last_failure_at": moment,
            "entry": jsonb(_jsonb_safe(entry)),
            # json.dumps writes a NUL as \u0000: the text column holds it exactly.
            "entry_text": exact if "\\u0000" in exact else None,
        }
        # A new entry (or one back from a replay) starts with no later calls noted.
        forget = {"workspace": self.workspace, "ids": [key]}
        if fenced and self._log is not None:
            with self._log.fenced_transaction() as conn:
                conn.execute(QUERIES["add_dead_letter"], params)
                conn.execute(QUERIES["delete_later_calls"], forget)
        else:
            with self.database.transaction() as conn:
                conn.execute(QUERIES["add_dead_letter"], params)
                conn.execute(QUERIES["delete_later_calls"], forget)

    def __iter__(self) -> Iterator[DeadLetter]:
        found = self.database.run("all_dead_letters", {"workspace": self.workspace})
        for key, text, later in found:
            yield dead_letter_from_text(key, _with_later(text, later))

    def get(self, key: str) -> DeadLetter | None:
        if not storable_key(key):
            return None  # no id in the database holds it
        found = self.database.run("get_dead_letter", {"workspace": self.workspace, "id": key})
        if not found:
            return None
        text, later = found[0]
        return dead_letter_from_text(key, _with_later(text, later))

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
        if keys is None:
            letters: Iterable[DeadLetter] = self
        else:
            letters = filter(None, map(self.get, sorted(set(keys))))
        return matching_letters(
            letters, event=event, reason=reason, since=since, before=before, limit=limit
        )

    def people(self) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for letter in self:
            person = letter.person
            if person is not None:
                found.setdefault(person, []).append(letter.key)
        return found

    def note_later_calls(self, key: str, calls: Sequence[LaterCall]) -> int:
        """The notes go in a table of their own (``cio_dead_letter_later``): an entry
        is written once, when the event is dead-lettered."""
        letter = self.get(key)
        if letter is None or letter.event is None:
            return 0
        if not calls:
            return letter.later_count
        kept, count = letter.with_later(calls)
        notes = {"later": [call.to_json() for call in kept], "later_count": count}
        params = {
            "workspace": self.workspace,
            "id": key,
            "later": json.dumps(notes, separators=(",", ":")),
        }
        if self._log is not None:  # the sender's write: fenced by its lease's term
            with self._log.fenced_transaction() as conn:
                conn.execute(QUERIES["set_later_calls"], params)
        else:
            self.database.run("set_later_calls", params)
        return count

    def purge(self, letters: Iterable[DeadLetter]) -> int:
        ids = [letter.key for letter in letters]
        if not ids:
            return 0
        params = {"workspace": self.workspace, "ids": ids}
        with self.database.transaction() as conn:
            cursor = conn.execute(QUERIES["delete_dead_letters"], params)
            conn.execute(QUERIES["delete_later_calls"], params)
            return int(cursor.rowcount)

    def count(self, by: Literal["event", "reason"] | None = None) -> Counter[str]:
        params = {"workspace": self.workspace}
        if by is None:
            ((total,),) = self.database.run("count_dead_letters", params)
            return Counter({"total": int(total)}) if total else Counter()
        name = "count_dead_letters_by_event" if by == "event" else "count_dead_letters_by_reason"
        return Counter({str(key): int(n) for key, n in self.database.run(name, params)})

    def __len__(self) -> int:
        ((total,),) = self.database.run("count_dead_letters", {"workspace": self.workspace})
        return int(total)

    def close(self) -> None:
        """The database is the handler's to close."""


@dataclass(frozen=True, slots=True)
class LeaseInfo:
    """Who holds a workspace's lease, as the database says (times on this host's clock)."""

    term: int
    host: str
    pid: int
    since: float
    expires_at: float
    valid: bool


class PostgresLease:
    """The workspace's one-sender lease: a row with a term and an expiry.

    The same face as :class:`~cio_logging.process_lock.DeliveryLock` (``try_acquire``,
    ``held``, ``release``), so the worker runs alike on both stores. A heartbeat
    thread renews it every third of ``seconds``. The expiry is judged by the
    database's clock alone; this process trusts the lease only until a safety margin
    before it would expire (measured from before the renewal was sent, on the
    monotonic clock): a holder paused or cut off stops sending before the database
    lets anyone take over. Each take-over increments the term, which fences every
    write of the sender (see :class:`PostgresLog`); a lost lease leaves the fence at
    the old term, so whatever the stale sender still tries to write is refused.
    """

    def __init__(
        self, database: Database, workspace: str, *, seconds: float, log: PostgresLog | None
    ) -> None:
        self.database = database
        self.workspace = workspace
        self.seconds = seconds
        self.margin = min(max(seconds / 5, 0.5), seconds / 2)
        self.path = Path(f"<lease {workspace}>")  # named in messages, like a lock file
        self._log = log
        self.on_lost: Callable[[], None] | None = None
        self._reset()
        reference = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _reset_lease_in_child(reference))

    def _reset(self) -> None:
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self._guard = threading.Lock()
        self._term: int | None = None
        self._trusted_until = 0.0
        self._heartbeat = background.OwnThread(self._beat, "cio_logging-lease")
        self._stop = threading.Event()
        self.taken_over = 0  # times this process took the lease
        if self._log is not None:
            self._log.fence = None  # a forked child holds no lease (yet)

    def __repr__(self) -> str:
        return f"PostgresLease({self.workspace!r}, term={self._term})"

    @property
    def term(self) -> int | None:
        return self._term if self.held else None

    @property
    def held(self) -> bool:
        return self._term is not None and time.monotonic() < self._trusted_until

    def try_acquire(self) -> bool:
        """Take the lease if it is free or expired, renew it if ours; never blocks
        longer than the database timeout. False also when the database is away."""
        with self._guard:
            if self.held:
                return True
            sent = time.monotonic()
            params = {
                "workspace": self.workspace,
                "holder": self.holder,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "seconds": self.seconds,
                "shift": 0.0,  # read_lease's times are not used here
            }
            try:
                # A read first: while another holder's lease runs (the usual answer for
                # every process but one), no process of the fleet writes or locks the row.
                current = self.database.run("read_lease", params)
                if current and current[0][5]:
                    self._lose()
                    return False
                taken = self.database.run("take_lease", params)
            except DatabaseError as exc:
                internal_log.debug("lease not taken: %s", exc)
                self._lose()
                return False
            if not taken:
                self._lose()
                return False
            self._term = int(taken[0][0])
            self._trusted_until = sent + self.seconds - self.margin
            self.taken_over += 1
            if self._log is not None:
                self._log.fence = Fence(self.holder, self._term)
            self._start_heartbeat()
            internal_log.info(
                "this process (%s) now sends for %s (term %d)",
                self.holder,
                self.workspace,
                self._term,
            )
            return True

    def _start_heartbeat(self) -> None:
        """Renew the lease from a thread of its own. None is started once the
        interpreter exits (3.12 refuses new threads there): the last delivery then
        runs within the lease just taken, and :attr:`held` ends with it."""
        if not self._heartbeat.is_alive():
            self._stop.clear()
            self._heartbeat.ensure_started()

    def _beat(self) -> None:
        background.mark_current_thread()
        while not self._stop.wait(self.seconds / 3):
            term = self._term
            if term is None:
                return
            sent = time.monotonic()
            params = {
                "workspace": self.workspace,
                "holder": self.holder,
                "term": term,
                "seconds": self.seconds,
            }
            try:
                renewed = self.database.run("renew_lease", params)
            except DatabaseError as exc:
                internal_log.debug("lease renewal failed: %s", exc)
                continue  # trusted until the margin; the next beat tries again
            with self._guard:
                if renewed and self._term == term:
                    self._trusted_until = sent + self.seconds - self.margin
                elif self._term == term:
                    self._lose()
                    return

    def _lose(self) -> None:
        # The log's fence stays at the lost term: the sender's writes still in progress
        # (a paused process waking up) are refused once another process took over.
        if self._term is not None:
            internal_log.warning(
                "this process (%s) no longer holds the lease of %s (term %d)",
                self.holder,
                self.workspace,
                self._term,
            )
        self._term = None
        self._trusted_until = 0.0
        if self.on_lost is not None:
            self.on_lost()

    def lost(self) -> None:
        """Called when a fenced write was refused (another holder's term)."""
        with self._guard:
            self._lose()

    def release(self) -> None:
        """Give the lease up now, so another process takes over without waiting."""
        self._stop.set()
        with self._guard:
            term = self._term
            self._term = None
            self._trusted_until = 0.0
        if term is not None:
            params = {"workspace": self.workspace, "holder": self.holder, "term": term}
            with contextlib.suppress(DatabaseError):
                self.database.run("release_lease", params, timeout=1.0)

    def info(self) -> LeaseInfo | None:
        """The lease as the database has it (any holder), or None if never taken."""
        params = {"workspace": self.workspace, "shift": self.database.clock_shift()[0]}
        found = self.database.run("read_lease", params)
        if not found:
            return None
        term, host, pid, since, expires_at, valid = found[0]
        return LeaseInfo(int(term), host, int(pid), float(since), float(expires_at), bool(valid))


def _reset_lease_in_child(reference: weakref.ref[PostgresLease]) -> None:
    lease = reference()
    if lease is not None:
        lease._reset()


#: Times in the sender's state, on its host's clock when written; read back on the
#: reader's (see SenderState.read).
_STATE_TIMES = ("updated_at", "last_error_at", "hold_until", "probe_at")


class SenderState:
    """The sender's state (breaker, pauses, last error, counters) in ``cio_sender_state``,
    written by the lease holder (fenced by its term), read by ``status`` on any host
    and by the next sender, with its times moved onto the reader's clock."""

    def __init__(
        self,
        database: Database,
        workspace: str,
        lease: PostgresLease | None,
        log: PostgresLog | None = None,
    ) -> None:
        self.database = database
        self.workspace = workspace
        self.lease = lease
        self._log = log

    def write(self, state: dict[str, Any]) -> None:
        """Record ``state`` while this process holds the lease.

        Raises:
            LeaseLostError: another process took the lease over since (nothing written).
        """
        psycopg, _ = _driver()
        lease = self.lease
        term = lease.term if lease is not None else None
        if lease is None or term is None:
            return  # only the holder speaks for the fleet
        params = {
            "workspace": self.workspace,
            "term": term,
            "holder": lease.holder,
            "state": psycopg.types.json.Jsonb(_jsonb_safe(state)),
            "shift": self.database.clock_shift()[0],
        }
        if not self.database.run("write_sender_state", params):
            raise LeaseLostError(
                f"the lease of this workspace moved past term {term}: another sender took over"
            )

    def read(self) -> dict[str, Any] | None:
        reader_shift = self.database.clock_shift()[0]
        params = {"workspace": self.workspace, "shift": reader_shift}
        found = self.database.run("read_sender_state", params)
        if not found:
            return None
        raw, recorded_at = found[0]
        state = dict(raw)
        # The writer's clock -> the database's -> this host's.
        move = float(state.pop("clock_offset", 0.0) or 0.0) - reader_shift
        for name in _STATE_TIMES:
            value = state.get(name)
            if isinstance(value, int | float) and not isinstance(value, bool):
                state[name] = float(value) + move
        state["recorded_at"] = float(recorded_at)
        return state


def fleet_summary(database: Database, workspace: str) -> dict[str, Any]:
    """What waits for a workspace: rows, the oldest's logging time (this host's clock),
    and each host's spill that held rows when last reported."""
    params = {"workspace": workspace, "shift": database.clock_shift()[0]}
    ((queued, oldest),) = database.run("queue_summary", params)
    spills = [
        {
            "host": host,
            "directory": directory,
            "rows": int(rows),
            "oldest_logged_at": None if spilled_oldest is None else float(spilled_oldest),
            "reported_at": float(reported_at),
        }
        for host, directory, rows, spilled_oldest, reported_at in database.run("spills", params)
    ]
    return {
        "queued": int(queued),
        "oldest_logged_at": None if oldest is None else float(oldest),
        "spills": spills,
    }


def open_fleet_store(
    url: str,
    workspace: str,
    queue_dir: Path,
    *,
    fsync: bool | None,
    timeout: float,
    lease_seconds: float,
) -> tuple[PostgresLog, PostgresDeadLetters, PostgresLease, SenderState]:
    """The four parts of fleet mode for one workspace, on one set of connections."""
    database = Database(url, timeout=max(timeout, 2.0))
    spill = WriteAheadLog(queue_dir / "spill", fsync=fsync)
    log = PostgresLog(database, workspace, spill, timeout=timeout)
    dead = PostgresDeadLetters(database, workspace, queue_dir / "spill", log)
    log.dead_letters = dead
    lease = PostgresLease(database, workspace, seconds=lease_seconds, log=log)
    return log, dead, lease, SenderState(database, workspace, lease, log)


__all__ = [
    "Database",
    "Fence",
    "LeaseInfo",
    "PostgresDeadLetters",
    "PostgresLease",
    "PostgresLog",
    "SenderState",
    "dead_letter_from_json",
    "display_url",
    "fleet_summary",
    "open_fleet_store",
    "scrub",
]
