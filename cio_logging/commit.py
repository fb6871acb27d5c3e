"""Group commit: events reach the write-ahead log in batches, one transaction each.

On the caller's thread ``emit`` only appends a prepared row to an in-memory buffer.

* A non-essential event returns at once; a writer thread commits the buffer once
  its oldest row is half ``commit_interval`` old (sooner once it holds a full group).
  When the writer falls behind (a thread logging flat out keeps the GIL from it), the
  first caller to find the oldest buffered row older than the interval commits the
  buffer itself, unless a commit is running already, so a row waits at most
  ``commit_interval`` plus a commit or two. A SIGKILL loses at most that.
* An essential event returns once its row is committed. The first caller to wait
  commits everything buffered so far in one transaction; callers that arrive while it
  commits wait for it, find their rows committed, or commit the next group together
  (leader and followers). Eight threads logging essential events thus share commits
  instead of paying one each.

Interrupts (KeyboardInterrupt, or SystemExit raised by a signal handler) reach the
caller as they would anywhere else, but never cost a row: rows leave the buffer only
once they are committed, every flag set here is reset in a ``finally``, and a
transaction is rolled back by the log on any exception.

When the disk fails (full, read-only, deleted, corrupt), rows stay in the buffer,
which is bounded by ``max_buffer_bytes``. The writer reports the failure once, retries
with backoff, asks the log to recover (a fresh database in a recreated directory, a
corrupt file quarantined) and reports again when a commit succeeds. Nothing here ever
raises into the caller.
"""

from __future__ import annotations

import contextlib
import logging
import operator
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator

from . import background
from .store import EventLog, Row

internal_log = logging.getLogger("cio_logging")

#: What became of a submitted row.
COMMITTED = "committed"  # on disk before submit returned
BUFFERED = "buffered"  # in memory; the writer commits it (or holds it while the disk fails)
REFUSED = "refused"  # the buffer is full: not kept (the caller counts the drop)

# A group this large is committed without waiting for the interval to end.
_GROUP_ROWS = 2_000
_GROUP_BYTES = 1 << 20
# Past this much waiting, the caller commits the backlog itself (backpressure).
_BACKPRESSURE_ROWS = 4 * _GROUP_ROWS
_BACKPRESSURE_BYTES = 4 * _GROUP_BYTES
# Estimated memory of one buffered row beyond its text (tuple, key, float).
_ROW_OVERHEAD = 150
_TEXT = operator.itemgetter(2)  # a row's JSON text
# Retrying a failing disk: from this delay, doubling, up to the cap.
_RETRY_FIRST, _RETRY_CAP = 0.05, 5.0
# How often the writer re-reads the log's size for the shedding limits.
_VOLUME_REFRESH_SECONDS = 0.5
_IDLE_VOLUME_REFRESH_SECONDS = 5.0
# How often a commit checks that the database file is still the one on disk (a stat
# call); rows committed to a deleted file in between are salvaged from it.
_IDENTITY_CHECK_SECONDS = 0.25
# Waiting for another thread's commit: a wake-up is never awaited longer than this,
# and the main thread, which never waits on a condition (see _commit_through), looks
# this often.
_WAIT_SLICE = 0.05
_MAIN_THREAD_POLL_SECONDS = 0.0002
_MAIN_THREAD = threading.main_thread().ident
# Idle, the writer still wakes this often to check the file (deleted while idle).
_IDLE_IDENTITY_CHECK_SECONDS = 1.0


class GroupCommitter:
    """The buffer between ``emit`` and the write-ahead log, and its writer thread."""

    def __init__(
        self,
        wal: EventLog,
        *,
        interval: float,
        max_buffer_bytes: int,
        on_committed: Callable[[], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``clock``: ages, intervals and retry times (a test may fake it); waits for
        another thread's commit always count real time."""
        self._clock = clock
        self._wal = wal
        self._interval = interval
        self._max_bytes = max_buffer_bytes
        self._on_committed = on_committed
        #: The log's size on disk, refreshed by the writer (never by the caller).
        self.queue_bytes = 0
        self._reset()
        reference = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _reset_in_child(reference))

    def _reset(self) -> None:
        # At construction and in a forked child: the parent's buffered rows stay the
        # parent's to commit, its writer thread does not exist here, and its locks may
        # have been copied held.
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        # One thread commits at a time (the leader); the others wait on _done, all
        # woken at once when it finishes, and most find their rows committed by it.
        self._done = threading.Condition(self._lock)
        self._committing = False
        # Rows stay here until they are committed: a commit works on a copy and takes
        # its rows out only once they are on disk, so an interrupt at any point of a
        # commit leaves every row either committed or still here.
        self._pending: list[Row] = []
        self._pending_bytes = 0
        # When the oldest row in _pending was submitted (an upper bound on its age).
        self._oldest_at = 0.0
        # Rows committed so far. A row's ticket is its position in the stream of rows
        # (committed + its index in _pending + 1): derived, never a second counter
        # that an interrupt could leave out of step with the list.
        self._committed = 0
        #: The largest SQLite rowid any commit of this process got: every row this
        #: process committed has a rowid at most this (flush() waits on it).
        self.last_rowid = 0
        #: Transactions committed, and the rows they carried: the group size under load.
        self.transactions = 0
        self._last_group = 0
        self.rows_committed = 0
        # A signal that arrived while this thread was inside the committer, to be
        # raised again once it has left (see signals.py).
        self._inside = threading.local()
        self._deferred_signal: int | None = None
        self._failing: str | None = None
        self._last_error: BaseException | None = None
        self._retry_at = 0.0
        self._retry_delay = 0.0
        self._writer: threading.Thread | None = None
        self._stopping = False
        # Told to stop (a SIGTERM): every row from then on is committed by its caller.
        self._unbuffered = False
        self._volume_at = float("-inf")
        self._volume_dirty = False
        self._identity_at = self._clock()

    @property
    def buffered(self) -> int:
        """Rows in memory, not yet on disk (being committed or waiting)."""
        return len(self._pending)

    @property
    def inside_on_this_thread(self) -> bool:
        """Whether this thread is inside submit/commit/close (a signal handler must not
        commit then: it could wait on a lock or a commit its own thread holds)."""
        return bool(getattr(self._inside, "depth", 0))

    def defer_signal(self, signum: int) -> None:
        """Raise ``signum`` again once this thread has left the committer."""
        self._deferred_signal = signum

    @contextlib.contextmanager
    def _entered(self) -> Iterator[None]:
        depth = self._enter()
        try:
            yield
        finally:
            self._leave(depth)

    def _enter(self) -> int:
        """Count this thread in; returns the depth to give back to :meth:`_leave`."""
        depth: int = getattr(self._inside, "depth", 0)
        self._inside.depth = depth + 1
        return depth

    def _leave(self, depth: int) -> None:
        """Count this thread out; raise a deferred signal once it has left entirely."""
        self._inside.depth = depth
        if depth == 0 and self._deferred_signal is not None:
            signum, self._deferred_signal = self._deferred_signal, None
            os.kill(os.getpid(), signum)

    @property
    def buffered_bytes(self) -> int:
        """The memory those rows take, as counted against ``max_buffer_bytes``."""
        return self._pending_bytes

    @property
    def disk_error(self) -> str | None:
        """Why commits fail, while they do; None when the disk takes them."""
        return self._failing

    def submit(self, row: Row, *, durable: bool) -> str:
        """Buffer ``row``; with ``durable``, commit it before returning if the disk allows.

        Returns COMMITTED, BUFFERED or REFUSED. Never raises for a disk failure; an
        interrupt (KeyboardInterrupt, SystemExit) raised meanwhile propagates, and the
        row is then either committed or still buffered for the writer.
        """
        # _entered() without its generator (about a microsecond): this runs on the
        # caller's thread for every event.
        depth = self._enter()
        try:
            return self._submit(row, durable)
        finally:
            self._leave(depth)

    def _submit(self, row: Row, durable: bool) -> str:
        size = len(row[2]) + _ROW_OVERHEAD
        # Without a writer (none may start at interpreter exit), the caller commits.
        if self._writer is None and not self._start_writer():
            durable = True
        now = self._clock()
        with self._lock:
            # Essential rows may use twice the budget: they are shed last.
            if self._pending_bytes + size > self._max_bytes * (2 if durable else 1):
                return REFUSED
            first = not self._pending
            if first:
                self._oldest_at = now
                self._pending_bytes = 0  # recount from nothing: no drift can accumulate
            self._pending_bytes += size
            self._pending.append(row)
            ticket = self._committed + len(self._pending)
            failing = self._failing is not None
            # Once closing, no writer commits for us: commit before returning. And
            # when the writer falls behind (a burst, or the GIL spent elsewhere), the
            # caller commits the backlog itself: the oldest row waits at most one
            # interval (and a commit or two), and the buffer stays small. Not while a
            # commit runs, though: that one ends the lag (rows that came during it
            # count from its start), and waiting for it would cost this caller the
            # commit's GIL hand-backs, the slowest calls under load, for nothing.
            durable = (
                durable
                or self._stopping
                or self._unbuffered
                or (
                    not failing
                    and not self._committing
                    and (
                        now - self._oldest_at >= self._interval
                        or len(self._pending) >= _BACKPRESSURE_ROWS
                        or self._pending_bytes >= _BACKPRESSURE_BYTES
                    )
                )
            )
            if (first and not durable) or (
                len(self._pending) >= _GROUP_ROWS or self._pending_bytes >= _GROUP_BYTES
            ):
                # The first row starts the interval the idle writer must now wait for
                # (a durable row is committed by its caller).
                self._wake.notify()
        if not durable or failing:
            return BUFFERED  # while the disk fails, the writer retries for everyone
        return COMMITTED if self._commit_through(ticket, gather=True) else BUFFERED

    def commit(self, timeout: float | None = None) -> bool:
        """Commit everything submitted so far; False if the disk failed or on timeout."""
        with self._entered():
            with self._lock:
                ticket = self._committed + len(self._pending)
            if self._committed >= ticket:
                return True
            return self._commit_through(ticket, timeout)

    def stop_buffering(self) -> None:
        """From now on commit every row before ``submit`` returns.

        For a process told to stop: it may end by any path from then on (a server that
        re-raises SIGTERM with Python's default action ends it without ``atexit``), so
        no event may wait in memory for the writer any more.
        """
        self._unbuffered = True

    def close(self, timeout: float) -> int:
        """Stop the writer after a last commit; returns how many rows could not be written."""
        with self._entered():
            with self._lock:
                self._stopping = True
                self._wake.notify()
            writer = self._writer
            if writer is not None and writer is not threading.current_thread():
                writer.join(timeout)
            # Rows other threads submit meanwhile are theirs to commit (see submit).
            return 0 if self.commit(timeout) else self.buffered

    def _commit_through(
        self, ticket: int, timeout: float | None = None, *, gather: bool = False
    ) -> bool:
        """Return once rows up to ``ticket`` are committed (True), or the disk failed or
        ``timeout`` passed first (False). Leads a commit if none is running.

        With ``gather`` (an essential caller), a leader that sees other callers at work
        (the last commit carried more than its own row) gives the GIL away once before
        it takes the buffer: the threads running then add their rows and wait, so one
        transaction carries them all instead of each waking to lead a commit of its own
        (eight threads logging essential events shared commits three or four to one).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        # Only the main thread runs signal handlers, and an exception they raise
        # inside Condition.wait can surface while the wait re-takes its lock, leaving
        # the lock released under another thread. There, waiting is a short sleep
        # between looks at plain counters instead: interrupting it changes nothing.
        on_main_thread = threading.get_ident() == _MAIN_THREAD
        leading = waited = False
        try:
            while True:
                with self._lock:
                    if self._committed >= ticket:
                        return True  # a commit by another thread carried our row
                    if waited and self._failing is not None:
                        return False  # the leader met a failing disk: our row waits in memory
                    if not self._committing:
                        # Set before the flag: the finally below resets what was set.
                        leading = True
                        self._committing = True
                        gather = gather and self._last_group > 1
                        break
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        return False
                    if not on_main_thread:
                        # Bounded: a notification skipped by an interrupt costs a moment.
                        slice_ = _WAIT_SLICE if remaining is None else min(remaining, _WAIT_SLICE)
                        self._done.wait(slice_)
                waited = True
                if on_main_thread:
                    time.sleep(_MAIN_THREAD_POLL_SECONDS)
            if gather:
                time.sleep(0)  # hand the GIL to the callers running (see above)
            self._commit_pending()
        finally:
            if leading:
                # No call before the reset, so no interrupt between: a flag left set
                # would make every later commit wait for a leader that is gone.
                with self._lock:
                    self._committing = False
                with self._lock:
                    self._done.notify_all()
        return self._committed >= ticket

    def _commit_pending(self) -> bool:
        """Commit every buffered row in one transaction; only the leader calls it.

        The rows stay in the buffer while they are written and leave it together with
        the count of committed rows, under the lock, once they are on disk: whatever
        interrupts this (an exception, KeyboardInterrupt, SystemExit) loses nothing.
        A row written just before an interrupt is written again by a later commit,
        and ignored by the log, which already has its id.
        """
        with self._lock:
            rows = self._pending[:]
            started = self._clock()
        if not rows:
            return True
        try:
            # Checked every time while failing: the file may be what failed.
            recently = 0.0 if self._failing is not None else _IDENTITY_CHECK_SECONDS
            if self._wal.replaced_on_disk(at_most_every=recently):
                # SQLite would go on writing to the unlinked file: recover first.
                raise FileNotFoundError("the queue database was deleted or replaced")
            rowid = self._wal.append_rows(rows)
        except Exception as exc:
            self._note_failure(exc)
            return False
        taken = len(rows)
        # In C, not a Python loop over the group.
        size = sum(map(len, map(_TEXT, rows))) + _ROW_OVERHEAD * taken
        recovered = False
        with self._lock:
            # No call between these statements: nothing can interrupt them halfway.
            del self._pending[:taken]
            self._committed += taken
            self._pending_bytes -= size
            self.last_rowid = max(self.last_rowid, rowid)
            self.transactions += 1
            self._last_group = taken
            self.rows_committed += taken
            # Rows that arrived during the commit are no older than its start.
            self._oldest_at = started
            self._volume_dirty = True
            if self._failing is not None:
                recovered, self._failing, self._last_error = True, None, None
        if recovered:
            internal_log.warning(
                "the queue in %s is writable again; %d buffered event(s) are on disk",
                self._wal.directory,
                taken,
            )
        self._on_committed()
        return True

    def _note_failure(self, exc: BaseException) -> None:
        """Enter (or stay in) the failing state; the first failure is reported loudly."""
        with self._lock:
            first_failure = self._failing is None
            self._failing = f"{type(exc).__name__}: {exc}"
            self._last_error = exc
            if first_failure:
                self._retry_delay = _RETRY_FIRST
                self._retry_at = self._clock()
            self._wake.notify()
        if first_failure:
            internal_log.error(
                "cannot write events to the queue in %s (%s); they are "
                "kept in memory (at most max_buffer_bytes=%d) and NOT safe from a "
                "crash until the disk recovers",
                self._wal.directory,
                self._failing,
                self._max_bytes,
            )

    def _start_writer(self) -> bool:
        """Start the writer thread if none runs; returns whether one runs.

        It never ends before close(), and a forked child has none. None is started once
        the interpreter exits (see background.py): callers then commit themselves.
        """
        with self._lock:
            writer = self._writer
            if writer is not None and writer.is_alive():
                return True
            if self._stopping or background.interpreter_exiting():
                return False
            background.collect_garbage_here()  # see background.OwnThread.ensure_started
            writer = threading.Thread(target=self._run, name="cio_logging-commit", daemon=True)
            try:
                writer.start()
            except RuntimeError:  # "can't create new thread at interpreter shutdown"
                return False
            self._writer = writer
            return True

    def _run(self) -> None:
        # A flush or close may wait for this thread while holding logging's module lock
        # (dictConfig does): what it logs must not wait for that lock.
        background.mark_current_thread()
        background.guard_loggers()
        while True:
            with self._lock:
                while not (
                    self._stopping or self._due() or self._volume_stale() or self._check_due()
                ):
                    self._wake.wait(self._seconds_until_due())
                stopping = self._stopping
            try:
                with self._lock:
                    ticket = self._committed + len(self._pending)
                committed = self._commit_through(ticket)
                if not committed:
                    self._try_recovery()
                elif self._check_due():
                    self._identity_at = self._clock()
                    if self._wal.replaced_on_disk():
                        # Deleted while idle: no commit would notice, and the worker
                        # would go on reading the unlinked file.
                        self._recover_replaced()
                self._refresh_volume()
            except Exception:  # never let the writer die; the next turn tries again
                internal_log.exception("unexpected error in the commit thread")
                time.sleep(_RETRY_FIRST)
            if stopping:
                return

    def _due(self) -> bool:
        """Whether the writer should commit now (call with the lock held)."""
        if not self._pending:
            return False
        now = self._clock()
        if self._failing is not None:
            return now >= self._retry_at
        full = len(self._pending) >= _GROUP_ROWS or self._pending_bytes >= _GROUP_BYTES
        return full or now >= self._oldest_at + self._writer_lead()

    def _writer_lead(self) -> float:
        # The writer commits at half the interval: under load it needs a while to get
        # the GIL, and if it reached the full interval first, the caller that found
        # the oldest row past it would commit instead, paying for the commit's GIL
        # hand-backs in its own logging call.
        return self._interval / 2

    def _volume_refresh_period(self) -> float:
        # After commits the size has grown: re-read it soon. Otherwise it changes only
        # as the worker delivers, and a slow refresh will do.
        return _VOLUME_REFRESH_SECONDS if self._volume_dirty else _IDLE_VOLUME_REFRESH_SECONDS

    def _volume_stale(self) -> bool:
        return self._clock() - self._volume_at >= self._volume_refresh_period()

    def _seconds_until_due(self) -> float:
        now = self._clock()
        if not self._pending:
            refresh = self._volume_at + self._volume_refresh_period() - now
            return max(0.01, min(refresh, _IDLE_IDENTITY_CHECK_SECONDS))
        if self._failing is not None:
            return max(0.0, self._retry_at - now)
        return max(0.0, self._oldest_at + self._writer_lead() - now)

    def _check_due(self) -> bool:
        """Whether the writer should check that the database file is still on disk."""
        return self._clock() - self._identity_at >= _IDLE_IDENTITY_CHECK_SECONDS

    def _recover_replaced(self) -> None:
        with self._lock:
            if self._committing:
                return  # a commit is running; it checks the file itself
            self._committing = True
        try:
            action = self._wal.recover(None)
        except Exception as exc:  # e.g. a read-only volume: the directory cannot be made
            self._note_failure(exc)
            return
        finally:
            with self._lock:
                self._committing = False
            with self._lock:
                self._done.notify_all()
        if action is not None:
            internal_log.error("%s", action)

    def _try_recovery(self) -> None:
        with self._lock:
            self._retry_delay = min(max(self._retry_delay * 2, _RETRY_FIRST), _RETRY_CAP)
            self._retry_at = self._clock() + self._retry_delay
            error = self._last_error
        try:
            action = self._wal.recover(error)
        except Exception as exc:  # the directory may be unwritable too: wait and retry
            action = None
            with self._lock:
                self._failing = f"{type(exc).__name__}: {exc}"  # what status() shows now
            internal_log.debug("queue recovery failed: %s", self._failing)
        if action is not None:
            internal_log.error("%s", action)
            with self._lock:
                self._retry_at = self._clock()  # try the fresh database at once

    def _refresh_volume(self) -> None:
        now = self._clock()
        if now - self._volume_at >= _VOLUME_REFRESH_SECONDS:
            self._volume_at, self._volume_dirty = now, False
            # A failing disk is reported by the commits themselves.
            with contextlib.suppress(Exception):
                self.queue_bytes = self._wal.volume()


def _reset_in_child(reference: weakref.ref[GroupCommitter]) -> None:
    committer = reference()
    if committer is not None:
        committer._reset()
