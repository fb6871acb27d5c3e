"""PostgreSQL connections that keep a deadline, and a small pool of them that runs no
thread.

Why not psycopg_pool: its pool opens and checks connections in worker threads, and
fleet mode commits at interpreter exit (``logging.shutdown()``), where Python 3.12
refuses new threads and ``concurrent.futures`` refuses work. Here every connection is
opened, used and closed on the thread that asks for it, so a commit at exit works on
every Python, and a forked child simply opens its own.

Why a deadline on the client: through a pooler (PgBouncer in transaction mode) a
session's ``SET statement_timeout`` would outlive our transaction and land in another
client's, and a server that stopped answering (a paused host, a partition) cannot
enforce a timeout at all. :class:`TimedConnection` bounds every wait for the server on
the calling thread; a connection whose deadline passed is closed, never reused.

Imported only by :mod:`.postgres`, and only once fleet mode is used (psycopg is an
optional dependency).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from typing import Any, TypeVar

import psycopg
from psycopg.abc import PQGen
from psycopg.pq import TransactionStatus

RV = TypeVar("RV")

# psycopg's own interval between checks for KeyboardInterrupt while it waits.
_WAIT_INTERVAL = 0.1


class DeadlineExceeded(psycopg.OperationalError):
    """The server did not answer before the connection's deadline."""


class TimedConnection(psycopg.Connection[Any]):
    """A connection whose every wait for the server ends at :attr:`deadline`.

    ``deadline`` is a :func:`time.monotonic` time, or None for no bound. Past it the
    wait raises :class:`DeadlineExceeded` and the connection is in an unknown state:
    the caller closes it. Connecting is bounded by ``connect_timeout`` (libpq's rule:
    at least 2 s) instead.
    """

    deadline: float | None = None

    def wait(
        self, gen: PQGen[RV], interval: float = _WAIT_INTERVAL, timeout: float | None = None
    ) -> RV:
        deadline = self.deadline
        if deadline is not None:
            left = max(deadline - time.monotonic(), 0.0)
            timeout = left if timeout is None else min(timeout, left)
        try:
            return super().wait(gen, interval, timeout)
        except psycopg.OperationalError as exc:
            if deadline is not None and time.monotonic() >= deadline:
                raise DeadlineExceeded("no answer before the deadline") from exc
            raise


class PoolExhausted(psycopg.OperationalError):
    """Every connection was busy until the deadline."""


class ConnectionSlots:
    """At most ``max_size`` connections, kept open between uses, opened on demand.

    Thread-safe; no thread of its own. A connection comes back to the pool only when
    it is idle and healthy; one that failed or passed its deadline is closed.
    """

    def __init__(self, conninfo: str, *, max_size: int, kwargs: dict[str, Any]) -> None:
        self._conninfo = conninfo
        self._kwargs = kwargs
        self._max_size = max_size
        self._idle: list[TimedConnection] = []
        self._open = 0
        self._changed = threading.Condition(threading.Lock())
        self._closed = False
        self._pid = os.getpid()

    def __del__(self) -> None:
        # Dropped without close() (a handler never closed): close quietly, never in a
        # forked child (the socket is the parent's session too).
        if self._pid == os.getpid():
            for conn in self._idle:
                with contextlib.suppress(Exception):
                    conn.close()

    def get(self, deadline: float) -> tuple[TimedConnection, bool]:
        """A connection, and whether it was reused (it may have died since its last
        use). Raises :class:`PoolExhausted` or the driver's error."""
        with self._changed:
            while True:
                while self._idle:
                    conn = self._idle.pop()
                    if not conn.closed:
                        return conn, True
                    self._open -= 1
                if self._open < self._max_size:
                    self._open += 1
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PoolExhausted(
                        f"all {self._max_size} connections stayed busy until the deadline"
                    )
                self._changed.wait(left)
        try:
            conn = connect(self._conninfo, **self._kwargs)
        except BaseException:
            with self._changed:
                self._open -= 1
                self._changed.notify()
            raise
        return conn, False

    def put(self, conn: TimedConnection, *, healthy: bool) -> None:
        """Give ``conn`` back: kept if ``healthy`` and idle, else closed."""
        conn.deadline = None
        keep = (
            healthy
            and not self._closed
            and not conn.closed
            and not conn.broken
            and conn.info.transaction_status == TransactionStatus.IDLE
        )
        if not keep:
            with contextlib.suppress(Exception):
                conn.close()
        with self._changed:
            if keep:
                self._idle.append(conn)
            else:
                self._open -= 1
            self._changed.notify()

    def discard_idle(self) -> None:
        """Close the idle connections (the server restarted: they are all dead)."""
        with self._changed:
            idle, self._idle = self._idle, []
            self._open -= len(idle)
            self._changed.notify_all()
        for conn in idle:
            with contextlib.suppress(Exception):
                conn.close()

    def close(self) -> None:
        """Close what is idle now, and every connection in use when it comes back."""
        self._closed = True
        self.discard_idle()


def connect(conninfo: str, **kwargs: Any) -> TimedConnection:
    """A new connection (fork-safe: see :class:`_ForkGate`)."""
    with _GATE.connecting():
        return TimedConnection.connect(conninfo, **kwargs)


class _ForkGate:
    """No fork while a thread of this process is connecting.

    Connecting runs OpenSSL's initialisation inside libpq (psycopg's own copy), which
    takes write locks; a fork at that moment leaves the child with a lock held by a
    thread that does not exist there, and the child's first connection waits on it for
    ever (seen here: forked children hung in ``CRYPTO_THREAD_read_lock``). So a fork
    waits until the connections being opened are open (at most ``_FORK_WAIT_SECONDS``),
    and no connection starts while it forks.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition(threading.Lock())
        self._connecting = 0
        self._forking = False

    @contextlib.contextmanager
    def connecting(self) -> Iterator[None]:
        with self._changed:
            while self._forking:
                self._changed.wait()
            self._connecting += 1
        try:
            yield
        finally:
            with self._changed:
                self._connecting -= 1
                self._changed.notify_all()

    def before_fork(self) -> None:
        deadline = time.monotonic() + _FORK_WAIT_SECONDS
        with self._changed:
            self._forking = True
            while self._connecting and time.monotonic() < deadline:
                self._changed.wait(deadline - time.monotonic())

    def after_fork_in_parent(self) -> None:
        with self._changed:
            self._forking = False
            self._changed.notify_all()


# A fork waits at most this long for connections being opened (one libpq attempt is
# bounded by connect_timeout, so this is rarely reached).
_FORK_WAIT_SECONDS = 10.0
_GATE = _ForkGate()


def _gate_in_child() -> None:
    global _GATE
    _GATE = _ForkGate()  # the parent's connecting threads do not exist here


os.register_at_fork(
    before=lambda: _GATE.before_fork(),
    after_in_parent=lambda: _GATE.after_fork_in_parent(),
    after_in_child=_gate_in_child,
)


__all__ = ["ConnectionSlots", "DeadlineExceeded", "PoolExhausted", "TimedConnection", "connect"]
