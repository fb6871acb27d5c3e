"""The PostgreSQL store: fleet mode's queue, dead letters, sender lease and state.

Selected by ``queue_url="postgresql://..."`` (or ``$CIO_LOGGING_QUEUE_URL``). Every
process of every host that logs for a workspace writes its events here; exactly one of
them, the holder of the workspace's lease, sends them.

* :class:`Database`: the connection pool (opened lazily, new in a forked child), the
  schema (created on first use from ``sql/migrations``, versioned, never dropping
  anything), the statements of ``sql/queries.sql`` by name, and errors mapped to
  :class:`~cio_logging.errors.DatabaseError` with the password scrubbed.
* :class:`PostgresLog`: the :class:`~cio_logging.store.EventLog`. A commit that the
  database does not answer within ``database_timeout`` goes to the local spill (a
  diskcache log in the queue directory) instead, and rows spilled are moved to the
  database once it answers, by this process or the next one to open the directory.
* :class:`PostgresDeadLetters`: the :class:`~cio_logging.store.DeadLetterArchive`,
  the table ``cio_dead_letter``.
* :class:`PostgresLease`: the one-sender-per-workspace lease, with its term as the
  fencing token of every acknowledgement.

Rows are keyed by workspace (site id and endpoint), so applications and workspaces
share a database without seeing each other's events. Sessions hold no state between
transactions (no advisory lock, no prepared statement that must survive), so the store
works through PgBouncer in transaction-pooling mode.
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
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import unquote, urlsplit, urlunsplit

from ..errors import ConfigurationError, DatabaseError, InvalidEventError, LeaseLostError
from ..events import Event, event_from_dict
from .local import WriteAheadLog
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
    dead_letter_from_json,
    dead_letter_from_text,
    decode_row,
    encode_row,
    matching_letters,
)

if TYPE_CHECKING:
    import psycopg
    from psycopg_pool import ConnectionPool

    from . import EventLog

internal_log = logging.getLogger("cio_logging")

#: The schema version this release writes; ``sql/migrations`` holds one file per version.
SCHEMA_VERSION = 2

# Passwords of every queue URL this process opened: scrubbed from any text we let out
# (our exceptions, our log lines, the driver's log lines).
_PASSWORDS: set[str] = set()
_PASSWORDS_GUARD = threading.Lock()
_REDACTED = "***"


def scrub(text: str) -> str:
    """``text`` with every known queue password replaced by ``***``."""
    with _PASSWORDS_GUARD:
        passwords = sorted(_PASSWORDS, key=len, reverse=True)
    for password in passwords:
        text = text.replace(password, _REDACTED)
    return text


def display_url(url: str) -> str:
    """The URL without its password (``postgresql://user:***@host/db``, also one given
    as a ``password=`` parameter), for people."""
    _remember_password(url)
    parts = urlsplit(url)
    if parts.password is None:
        return scrub(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    netloc = f"{user}:{_REDACTED}@{host}"
    return scrub(urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment)))


def _remember_password(url: str) -> None:
    password = None
    with contextlib.suppress(ValueError):
        password = urlsplit(url).password
    if not password:
        # A password given as a query parameter (password=...) or in a keyword string.
        match = re.search(r"(?:[?&\s]|^)password=([^&\s]+)", url)
        password = match.group(1) if match else None
    if password:
        with _PASSWORDS_GUARD:
            _PASSWORDS.add(password)
            # The URL-decoded form too, which is what the server may quote.
            _PASSWORDS.add(unquote(password))


class _ScrubDriverLogs(logging.Filter):
    """The driver's own log lines with passwords scrubbed; our pool's reconnection
    warnings at most once a minute (an outage would otherwise log one per attempt; our
    own warning says what happens to the events)."""

    _REPEAT_SECONDS = 60.0

    def __init__(self) -> None:
        super().__init__()
        self._reported_at = float("-inf")

    def filter(self, record: logging.LogRecord) -> bool:
        if _PASSWORDS:
            record.msg = scrub(record.getMessage())
            record.args = None
        if record.levelno <= logging.WARNING and "'cio_logging'" in str(record.msg):
            now = time.monotonic()
            if now - self._reported_at < self._REPEAT_SECONDS:
                return False
            self._reported_at = now
        return True


for _name in ("psycopg", "psycopg.pool"):
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
    """psycopg and psycopg_pool, imported once. Never an import statement on the hot
    path: a fork while another thread is inside one leaves the child's import lock
    held (seen here: a multiprocessing child hung in its first commit)."""
    global _DRIVER
    if _DRIVER is not None:
        return _DRIVER
    try:
        import psycopg
        import psycopg.types.json
        import psycopg_pool
    except ImportError as exc:
        raise ConfigurationError(
            "queue_url needs the PostgreSQL driver: pip install 'cio-logging[postgres]'"
        ) from exc
    _DRIVER = (psycopg, psycopg_pool)
    return _DRIVER


# Connections (and pools) a forked child inherited: kept referenced and never closed
# there, since closing one would end the parent's session on the shared socket.
_INHERITED: list[object] = []


class Database:
    """One PostgreSQL database: a small pool, the schema, statements by name.

    Thread-safe. Every failure is a :class:`DatabaseError` whose text and cause hold no
    password. ``timeout`` bounds the wait for a connection; each statement is bounded
    by ``statement_timeout`` on the server and ``tcp_user_timeout`` on the socket, so
    a database that vanished from the network cannot hold a thread for long.
    """

    def __init__(self, url: str, *, timeout: float = 5.0, max_size: int = 4) -> None:
        _driver()  # imported now, on the constructing thread (see _driver)
        _remember_password(url)
        self.url = url
        self.timeout = timeout
        self._max_size = max_size
        self._guard = threading.Lock()
        self._pool: ConnectionPool[Any] | None = None
        self._pool_pid = 0
        self._schema_ready = False
        reference = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _reset_database_in_child(reference))

    def __repr__(self) -> str:
        return f"Database({display_url(self.url)!r})"

    @property
    def display_url(self) -> str:
        return display_url(self.url)

    def _get_pool(self) -> ConnectionPool[Any]:
        with self._guard:
            if self._pool is not None and self._pool_pid == os.getpid():
                return self._pool
            if self._pool is not None:  # a forked child: the parent's is not ours
                _INHERITED.append(self._pool)
                self._schema_ready = False
            _, psycopg_pool = _driver()
            statement_ms = int(max(self.timeout, 1.0) * 2000)

            def configure(connection: Any) -> None:
                connection.execute(f"SET statement_timeout = {statement_ms}")

            pool: ConnectionPool[Any] = psycopg_pool.ConnectionPool(
                self.url,
                min_size=1,
                max_size=self._max_size,
                open=False,
                timeout=self.timeout,
                name="cio_logging",
                kwargs={
                    "autocommit": True,
                    "connect_timeout": max(2, math.ceil(self.timeout)),
                    "tcp_user_timeout": statement_ms,
                    "application_name": "cio_logging",
                },
                configure=configure,
                reconnect_timeout=0,  # keep trying for ever; each try is bounded
            )
            pool.open(wait=False)
            self._pool, self._pool_pid = pool, os.getpid()
            return pool

    @contextlib.contextmanager
    def connection(self, timeout: float | None = None) -> Iterator[psycopg.Connection[Any]]:
        """A connection of the pool (autocommit; ``with conn.transaction():`` for more).
        After :meth:`close` a new pool is opened: a handler used after close works."""
        psycopg, psycopg_pool = _driver()
        try:
            pool = self._get_pool()
            with pool.connection(timeout=self.timeout if timeout is None else timeout) as conn:
                if not self._schema_ready:
                    self._migrate(conn)
                yield conn
        except (psycopg.Error, psycopg_pool.PoolTimeout, OSError) as exc:
            raise _mapped(exc) from exc

    def check(self) -> None:
        """Connect once, outside the pool, so a failure says why (the pool only says
        it timed out); creates the schema if needed. Raises :class:`DatabaseError`."""
        psycopg, _ = _driver()
        try:
            with psycopg.connect(
                self.url, connect_timeout=max(2, math.ceil(self.timeout)), autocommit=True
            ) as conn:
                self._migrate(conn)
        except (psycopg.Error, OSError) as exc:
            raise _mapped(exc) from exc

    def run(
        self, name: str, params: dict[str, Any] | None = None, *, timeout: float | None = None
    ) -> list[tuple[Any, ...]]:
        """Run the statement ``name`` in its own transaction; its rows (if it has any)."""
        with self.connection(timeout) as conn:
            cursor = conn.execute(QUERIES[name], params or {})
            return cursor.fetchall() if cursor.description is not None else []

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
        """Close the pool's connections (a later use opens a new pool)."""
        with self._guard:
            pool, self._pool = self._pool, None
        if pool is not None and self._pool_pid == os.getpid():
            with contextlib.suppress(Exception):
                pool.close(timeout=1.0)
        elif pool is not None:
            _INHERITED.append(pool)


def _reset_database_in_child(reference: weakref.ref[Database]) -> None:
    # Another thread of the parent may have held the guard at the fork: it would stay
    # held here. The parent's pool is left alone (see _get_pool).
    database = reference()
    if database is not None:
        database._guard = threading.Lock()


def _reset_passwords_guard() -> None:
    global _PASSWORDS_GUARD
    _PASSWORDS_GUARD = threading.Lock()


os.register_at_fork(after_in_child=_reset_passwords_guard)


def _mapped(exc: BaseException) -> DatabaseError:
    """Our error for a driver's, texts scrubbed; the driver's error (scrubbed in place)
    becomes its cause."""
    if isinstance(exc, DatabaseError):
        return exc
    text = scrub(str(exc)).strip().splitlines()
    summary = text[0] if text else ""
    with contextlib.suppress(Exception):
        exc.args = tuple(scrub(str(arg)) for arg in exc.args)
    return DatabaseError(f"PostgreSQL: {type(exc).__name__}: {summary}")


@dataclass(frozen=True, slots=True)
class Fence:
    """What a sender's writes are fenced with: its holder id and term."""

    holder: str
    term: int


class PostgresLog:
    """The :class:`~cio_logging.store.EventLog` on PostgreSQL, with a local spill.

    ``spill``: a diskcache log in the queue directory. A commit goes to the database
    while it answers within ``timeout``; otherwise to the spill, and for the next
    while straight to the spill (no caller waits on a database known to
    be away) until the worker's :meth:`probe` finds it answering; :meth:`move_spilled`
    moves spilled rows to the database.

    Fencing: while :attr:`fence` is set (the worker holds the lease), an
    acknowledgement (remove, record_failure) commits only if the lease's term is
    still the fence's, under a shared lock on the lease row, so no takeover can
    interleave; otherwise it raises :class:`LeaseLostError` and changes nothing.
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
        self._unavailable_until = 0.0
        self._reset_threads()
        reference = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _reset_log_in_child(reference))

    def _reset_threads(self) -> None:
        # One thread runs the commits, so a caller can stop waiting for one that hangs.
        self._executor: ThreadPoolExecutor | None = None
        self._executor_guard = threading.Lock()
        self._running: Future[int] | None = None

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
        time; returns the largest sequence number the database gave (0 if spilled).
        Raises only when the spill fails too (the local disk)."""
        if not rows:
            return 0
        if self.available():
            future = self._submit(rows)
            if future is not None:
                try:
                    return future.result(timeout=self.timeout)
                except FutureTimeout:
                    self._mark_unavailable(None)
                except DatabaseError as exc:
                    self._mark_unavailable(exc)
        self.spill.append_rows(rows)
        return 0

    def available(self) -> bool:
        """Whether a commit should try the database: not after one failed, until
        :meth:`probe` (the worker's, never a caller's) finds it answering again."""
        return time.monotonic() >= self._unavailable_until

    def probe(self) -> bool:
        """When commits go to the spill: whether the database answers again (then
        commits go to it again). Run by the worker, so no caller waits on it."""
        if self.available():
            return True
        try:
            self.database.run("ping", timeout=self.timeout)
        except DatabaseError:
            return False
        self._unavailable_until = 0.0
        return True

    def _mark_unavailable(self, error: BaseException | None) -> None:
        first = self.available()
        self._unavailable_until = math.inf
        if first:
            internal_log.warning(
                "PostgreSQL (%s) did not take a commit (%s); events go to the "
                "local spill in %s and move to the database once it answers",
                self.database.display_url,
                f"no answer within {self.timeout:g}s" if error is None else scrub(str(error)),
                self.spill.directory,
            )

    def _submit(self, rows: Sequence[Row]) -> Future[int] | None:
        with self._executor_guard:
            running = self._running
            if running is not None and not running.done():
                return None  # a commit still hangs: spill rather than queue behind it
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="cio_logging-db")
            self._running = self._executor.submit(self._insert, list(rows))
            return self._running

    def _insert(self, rows: Sequence[Row]) -> int:
        params = {
            "workspace": self.workspace,
            "ids": [row[0] for row in rows],
            "events": [_event_name(row[2]) for row in rows],
            "due": [row[1] for row in rows],
            "logged": [_logged_at(row[2], row[1]) for row in rows],
            "bodies": [row[2] for row in rows],
            "persons": [row[3] for row in rows],
        }
        result = self.database.run("insert_rows", params, timeout=self.timeout)
        return max((int(seq) for (seq,) in result), default=0)

    def move_spilled(self, limit: int = 500) -> int:
        """Move up to ``limit`` spilled rows to the database; returns how many moved.

        Inserted first (an id already there is left as it is), removed from the spill
        after: a crash in between leaves a row in both, and the id deduplicates.
        """
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
                "a spilled row could not be read and was dropped: %s",
                corrupt.reason,
            )
        if rows:
            self._insert(rows)
            self.spill.remove([row[0] for row in rows])
            self._unavailable_until = 0.0  # it answered: commits go to it again
        return len(rows)

    # -- reading and acknowledging (the sender) ----------------------------------------

    def read_due(
        self, limit: int, now: float | None = None, *, after: tuple[float, int] | None = None
    ) -> Batch:
        moment = time.time() if now is None else now
        params: dict[str, Any] = {"workspace": self.workspace, "now": moment, "limit": limit}
        if after is None:
            found = self.database.run("read_due", params)
        else:
            params.update(due=after[0], seq=after[1])
            found = self.database.run("read_due_after", params)
        events: list[QueuedEvent] = []
        corrupt: list[CorruptEntry] = []
        bad: list[str] = []
        positions = [(float(due), int(seq)) for _, due, _, seq in found]
        cursor = max([*positions, after] if after is not None else positions, default=None)
        for key, due, body, seq in found:
            try:
                events.append(decode_row(key, due, body, int(seq)))
            except InvalidEventError as exc:
                corrupt.append(CorruptEntry(key, str(exc)))
                bad.append(key)
        if bad:
            self._fenced("delete_rows", {"ids": bad})
        return Batch(events, corrupt, cursor)

    def earlier_rows(
        self, people: Collection[str], through: int
    ) -> list[tuple[str, int, float, str]]:
        if not people:
            return []
        params = {"workspace": self.workspace, "people": list(people), "through": through}
        found = self.database.run("earlier_rows", params)
        return [(str(person), int(seq), float(due), str(key)) for person, seq, due, key in found]

    def person_counts(self, people: Collection[str], through: int) -> dict[str, int]:
        if not people:
            return {}
        params = {"workspace": self.workspace, "people": list(people), "through": through}
        return {str(person): int(n) for person, n in self.database.run("person_counts", params)}

    def remove(self, keys: Iterable[str], *, delivered: int = 0) -> None:
        # A fleet's deliveries are counted in the sender's state row (cio_sender_state).
        ids = list(keys)
        if ids:
            self._fenced("delete_rows", {"ids": ids})

    def delivered_total(self) -> int | None:
        return None  # counted per sender, in cio_sender_state

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
                "error": error,
            }
            self._fenced("record_failure", params)

    def _fenced(self, name: str, params: dict[str, Any]) -> None:
        """Run a sender's write, checked against :attr:`fence` when one is set."""
        params = {"workspace": self.workspace, **params}
        with self._fenced_transaction() as conn:
            conn.execute(QUERIES[name], params)

    @contextlib.contextmanager
    def _fenced_transaction(self) -> Iterator[psycopg.Connection[Any]]:
        """A transaction that first checks :attr:`fence` (when set) under a shared lock
        on the lease row, so no take-over commits between the check and the writes.

        Raises:
            LeaseLostError: the lease's term or holder is no longer the fence's.
        """
        fence = self.fence
        with self.database.connection() as conn, conn.transaction():
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
        moved = 0
        base = {"workspace": self.workspace}
        with self._fenced_transaction() as conn:
            if step < 0:
                moved += conn.execute(
                    QUERIES["shift_later_due"], {**base, "step": step, "now": now}
                ).rowcount
            elif step > 0:
                window = {**base, "step": step, "low": now - step, "high": now - step + horizon}
                moved += conn.execute(QUERIES["shift_waiting_retries"], window).rowcount
            moved += conn.execute(
                QUERIES["due_now_if_after"], {**base, "now": now, "horizon": now + horizon}
            ).rowcount
        return moved

    # -- looking -----------------------------------------------------------------------

    def get(self, key: str) -> QueuedEvent | None:
        found = self.database.run("get_row", {"workspace": self.workspace, "id": key})
        if found:
            with contextlib.suppress(InvalidEventError):
                return decode_row(found[0][0], found[0][1], found[0][2], int(found[0][3]))
            return None
        return self.spill.get(key)

    def sendable_through(self, rowid: int, now: float, horizon: float) -> bool:
        """Also True while rows wait in the spill for a database that answers; False
        when it does not answer (nothing can go now: the rows are safe in the spill)."""
        if not self.available():
            return False
        if len(self.spill):
            return True
        params = {"workspace": self.workspace, "seq": rowid, "now": now, "horizon": now + horizon}
        try:
            return bool(self.database.run("sendable_through", params))
        except DatabaseError:
            return False

    def oldest_logged_at(self) -> float | None:
        self._require_available()
        ((oldest,),) = self.database.run("oldest_logged_at", {"workspace": self.workspace})
        spilled = self.spill.oldest_logged_at()
        candidates = [value for value in (oldest, spilled) if value is not None]
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
        # rather than each waiting for the pool's timeout.
        if not self.available():
            raise DatabaseError("PostgreSQL does not answer (commits go to the local spill)")

    def __len__(self) -> int:
        self._require_available()
        ((count,),) = self.database.run("count_rows", {"workspace": self.workspace})
        return int(count) + len(self.spill)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.get(key) is not None

    def close(self) -> None:
        with self._executor_guard:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False)
        self.spill.close()
        self.database.close()  # shared with the lease and the dead letters: reopens on use


def _reset_log_in_child(reference: weakref.ref[PostgresLog]) -> None:
    log = reference()
    if log is not None:
        log._reset_threads()


def _event_name(body: str) -> str:
    with contextlib.suppress(ValueError, TypeError, IndexError):
        entry = json.loads(body)
        if type(entry) is list:
            return str(entry[1])
        return str(entry["event"]["name"])
    return ""


def _logged_at(body: str, due: float) -> float:
    with contextlib.suppress(ValueError, TypeError, IndexError, KeyError):
        entry = json.loads(body)
        if type(entry) is list:
            return float(entry[5])
        return float(entry["event"]["logged_at"])
    return due


class PostgresDeadLetters:
    """The :class:`~cio_logging.store.DeadLetterArchive` in table ``cio_dead_letter``.

    Besides the whole entry (``entry``, jsonb) each row has columns to read with psql:
    ``event``, ``customer_id``, ``anonymous_id``, ``data`` (jsonb), ``error``,
    ``error_type``, ``status``, ``attempts``, ``created_at``.
    """

    def __init__(self, database: Database, workspace: str, directory: Path) -> None:
        self.database = database
        self.workspace = workspace
        self.directory = directory

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
    ) -> None:
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
        jsonb = psycopg.types.json.Jsonb
        self.database.run(
            "add_dead_letter",
            {
                "workspace": self.workspace,
                "id": key,
                "event": None if event is None else event.name,
                "customer_id": None if event is None else event.customer_id,
                "anonymous_id": None if event is None else event.anonymous_id,
                "data": None if event is None else jsonb(json.loads(event.data_json)),
                "error": message,
                "error_type": error_type,
                "status": status,
                "attempts": attempts,
                "last_failure_at": moment,
                "entry": jsonb(entry),
            },
        )

    def __iter__(self) -> Iterator[DeadLetter]:
        found = self.database.run("all_dead_letters", {"workspace": self.workspace})
        for key, text in found:
            yield dead_letter_from_text(key, text)

    def get(self, key: str) -> DeadLetter | None:
        found = self.database.run("get_dead_letter", {"workspace": self.workspace, "id": key})
        return dead_letter_from_text(key, found[0][0]) if found else None

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

    def replay(self, letters: Iterable[DeadLetter], wal: EventLog) -> int:
        moved = 0
        for letter in letters:
            if letter.event is None:
                continue
            wal.append(
                event_from_dict(letter.event), replayed_at=time.time(), dead_letter=letter.history()
            )
            self.database.run(
                "delete_dead_letters", {"workspace": self.workspace, "ids": [letter.key]}
            )
            moved += 1
        return moved

    def purge(self, letters: Iterable[DeadLetter]) -> int:
        ids = [letter.key for letter in letters]
        if not ids:
            return 0
        with self.database.connection() as conn:
            cursor = conn.execute(
                QUERIES["delete_dead_letters"], {"workspace": self.workspace, "ids": ids}
            )
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
    """Who holds a workspace's lease, as the database says."""

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
    thread renews it every third of ``seconds``. This process trusts it only until a
    safety margin before it would expire (measured from before the renewal was sent,
    on the monotonic clock): a holder paused or cut off stops sending before the
    database lets anyone take over. Each take-over increments the term, which
    :class:`PostgresLog` checks on every acknowledgement (the fencing token).
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
        self._heartbeat: threading.Thread | None = None
        self._stop = threading.Event()
        self.taken_over = 0  # times this process took the lease

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
            }
            try:
                # A read first: while another holder's lease runs (the usual answer for
                # every process but one), no process of the fleet writes or locks the row.
                current = self.database.run("read_lease", {"workspace": self.workspace})
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
        if self._heartbeat is not None and self._heartbeat.is_alive():
            return
        self._stop.clear()
        self._heartbeat = threading.Thread(target=self._beat, name="cio_logging-lease", daemon=True)
        self._heartbeat.start()

    def _beat(self) -> None:
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
        if self._term is not None:
            internal_log.warning(
                "this process (%s) no longer holds the lease of %s (term %d)",
                self.holder,
                self.workspace,
                self._term,
            )
        self._term = None
        self._trusted_until = 0.0
        if self._log is not None:
            self._log.fence = None
        if self.on_lost is not None:
            self.on_lost()

    def lost(self) -> None:
        """Called when an acknowledgement was refused (another holder's term)."""
        with self._guard:
            self._lose()

    def release(self) -> None:
        """Give the lease up now, so another process takes over without waiting."""
        self._stop.set()
        with self._guard:
            term = self._term
            self._term = None
            self._trusted_until = 0.0
            if self._log is not None:
                self._log.fence = None
        if term is not None:
            params = {"workspace": self.workspace, "holder": self.holder, "term": term}
            with contextlib.suppress(DatabaseError):
                self.database.run("release_lease", params, timeout=1.0)

    def info(self) -> LeaseInfo | None:
        """The lease as the database has it (any holder), or None if never taken."""
        found = self.database.run("read_lease", {"workspace": self.workspace})
        if not found:
            return None
        term, host, pid, since, expires_at, valid = found[0]
        return LeaseInfo(int(term), host, int(pid), float(since), float(expires_at), bool(valid))


def _reset_lease_in_child(reference: weakref.ref[PostgresLease]) -> None:
    lease = reference()
    if lease is not None:
        lease._reset()


class SenderState:
    """The sender's state (breaker, pauses, last error, counters) in ``cio_sender_state``,
    written by the lease holder, read by ``status`` on any host."""

    def __init__(self, database: Database, workspace: str, lease: PostgresLease | None) -> None:
        self.database = database
        self.workspace = workspace
        self.lease = lease

    def write(self, state: dict[str, Any]) -> None:
        psycopg, _ = _driver()
        term = self.lease.term if self.lease is not None else None
        if term is None:
            return  # only the holder speaks for the fleet
        params = {
            "workspace": self.workspace,
            "term": term,
            "state": psycopg.types.json.Jsonb(state),
        }
        self.database.run("write_sender_state", params)

    def read(self) -> dict[str, Any] | None:
        found = self.database.run("read_sender_state", {"workspace": self.workspace})
        if not found:
            return None
        state = dict(found[0][0])
        state["recorded_at"] = float(found[0][1])
        return state


def open_fleet_store(
    url: str,
    workspace: str,
    queue_dir: Path,
    *,
    fsync: bool | None,
    timeout: float,
    lease_seconds: float,
) -> tuple[PostgresLog, PostgresDeadLetters, PostgresLease, SenderState]:
    """The four parts of fleet mode for one workspace, on one pool."""
    database = Database(url, timeout=max(timeout, 2.0))
    spill = WriteAheadLog(queue_dir / "spill", fsync=fsync)
    log = PostgresLog(database, workspace, spill, timeout=timeout)
    dead = PostgresDeadLetters(database, workspace, queue_dir / "spill")
    lease = PostgresLease(database, workspace, seconds=lease_seconds, log=log)
    return log, dead, lease, SenderState(database, workspace, lease)


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
    "open_fleet_store",
    "scrub",
]
