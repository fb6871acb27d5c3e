"""The background flush thread: reads the write-ahead log, delivers, acknowledges.

Lifecycle: started on the first event (so a process that forks after configuring
logging works, and each forked child starts its own); woken by new events, by
``flush()`` and by a short interval (which also picks up events other processes
appended). A daemon thread, because the interpreter joins non-daemon threads before
``logging.shutdown()`` could ask it to stop; ``close()`` stops it within a bound and
whatever it had not sent stays on disk.

Data flows one way: log -> read_due -> deliver -> remove / dead-letter / schedule a
retry. An event leaves the log only after Customer.io accepted it or it was written to
the dead-letter store, so a crash at any point sends it again (same id), never loses it.

Failure handling (see resilience.py for the policies):

* transient failures (5xx, 429, timeouts, connection errors) count an attempt on the
  events sent; each is retried after its own backoff, and dead-lettered after
  ``max_attempts`` or once older than ``max_event_age``;
* the breaker opens when Customer.io keeps failing; while it is open nothing is sent
  and the thread sleeps until the probe is due; the probe is one event;
* 401/403 pause delivery for ``auth_retry_interval`` without counting attempts: events
  accumulate on disk and flow again by themselves once the credentials work;
* a payload rejected as invalid goes to the dead-letter store at once.

Time: due times in the log are wall-clock times (they outlive the process), every
wait in memory (breaker, Retry-After, 401/403 pause, rate cap) is monotonic. The wall
clock is read through a :class:`~cio_logging.clock.WallClock`, which notices steps;
the delivering process moves the persisted due times by each step it notices, and a
forward step does not age the events queued before it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import socket
import sys
import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from . import background
from .clock import STEP_TOLERANCE_SECONDS, WallClock
from .config import Settings
from .errors import DatabaseError, LeaseLostError
from .events import Event
from .process_lock import DeliveryLock
from .resilience import CLOSED, OPEN, DeliveryBreaker, RequestRateCap, RetryPolicy
from .state_record import read_state, write_state
from .store import (
    Batch,
    DeadLetterArchive,
    DeadLetterHistory,
    DeadLetterReason,
    EventLog,
    QueuedEvent,
    ReplayRecord,
)
from .telemetry import Telemetry
from .transport import (
    AUTH,
    CONFIG,
    TRANSIENT,
    DeliveryClient,
    DeliveryReport,
    Failure,
    make_client,
)

internal_log = logging.getLogger("cio_logging")
status_log = logging.getLogger("cio_logging.status")

#: Set on our threads (flush, senders, commit): records logged there (by the SDK,
#: urllib3, ourselves) must never come back into a handler (a feedback loop), and their
#: level checks never take logging's module lock (see background.py).
flush_thread_marker = background.marker

# How long the flush thread lets events gather after new ones woke it.
_LINGER_SECONDS = 0.02

# Repeat the same delivery error at most this often.
_ERROR_REPEAT_SECONDS = 60.0
# Rewrite state.json at most this often (and on every breaker transition).
_STATE_RECORD_SECONDS = 2.0
# A delivery pass that found a call held back by a row it cannot see ends after this
# long, so the next pass (from the start of the log) finds that row.
_PASS_SECONDS = 1.0
# At most this many calls wait in memory for their person's request in flight; past it
# the pass stops reading until an answer comes.
_HELD_LIMIT = 10_000
# Look for due times too far ahead to be ours at most this often (see _keep_due_times).
_DUE_CHECK_SECONDS = 1.0


class SenderLock(Protocol):
    """The right to send: the queue directory's flock, or fleet mode's lease."""

    path: Any

    @property
    def held(self) -> bool: ...

    def try_acquire(self) -> bool: ...

    def release(self) -> None: ...


class FleetState(Protocol):
    """Fleet mode's record of the sender's state, in the database."""

    def write(self, state: dict[str, Any]) -> None: ...

    def read(self) -> dict[str, Any] | None: ...


@dataclass
class DeliveryStats:
    """What this process's worker did; read by ``handler.status()``."""

    delivered: int = 0
    dead_lettered: int = 0
    requests: int = 0
    failed_requests: int = 0
    retries_scheduled: int = 0
    last_error: str | None = None
    last_error_at: float | None = None
    delivery_paused: str | None = None
    breaker_transitions: list[tuple[str, str]] = field(default_factory=list)


class DeliveryWorker:
    """Owns the flush thread of one handler in one process."""

    def __init__(
        self,
        settings: Settings,
        wal: EventLog,
        dead_letters: DeadLetterArchive,
        *,
        clock: WallClock | None = None,
        telemetry: Telemetry | None = None,
        status_report: Callable[[], dict[str, Any]] | None = None,
        lock: SenderLock | None = None,
        fleet_state: FleetState | None = None,
    ) -> None:
        """``lock``: the right to send (default: the queue directory's delivery.lock);
        fleet mode passes the workspace's lease, and ``fleet_state`` where the sender
        records its state for the fleet. The directory's lock then only chooses which
        local process moves spilled rows to the database."""
        self._settings = settings
        self._wal = wal
        self._dead_letters = dead_letters
        self._clock = clock or WallClock()
        self._telemetry = telemetry
        self._status_report = status_report
        self._local_lock = DeliveryLock(settings.queue_dir / "delivery.lock")
        self._lock: SenderLock = lock or self._local_lock
        self._fleet_state = fleet_state
        self.retry = RetryPolicy.from_settings(settings)
        # No due time this process persists is further ahead than this; one that is
        # was not scheduled on this clock and counts as due (see adjust_due_times).
        self._due_horizon = self.retry.longest_delay + STEP_TOLERANCE_SECONDS
        self.stats = DeliveryStats()
        self._reset_threading_state()
        reference = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _reset_in_child(reference))

    def _reset_threading_state(self) -> None:
        # Called at construction and in a forked child, where the parent's thread does
        # not exist and its locks (pybreaker's among them) may have been copied held.
        self._thread: threading.Thread | None = None
        self._start_guard = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._progress = threading.Condition()
        self._flush_requested = 0
        self._flush_completed = 0
        self._lock_tried = False
        self._held_until = 0.0  # no request before this (401/403, Retry-After)
        self._last_reported: tuple[str, float] | None = None
        self._state_recorded_at = float("-inf")
        self._recorded_news: tuple[str | None, str | None] = (None, None)
        self._unexpected_reported_at = float("-inf")
        self._foreign_lock_reported_at = float("-inf")
        self._status_logged_at = time.monotonic()
        self._due_checked_at = float("-inf")
        settings = self._settings
        self.breaker = DeliveryBreaker.from_settings(settings, self._breaker_changed)
        self._rate_cap = RequestRateCap(
            settings.max_requests_per_second,
            stop=self._stop,
            # This process's handlers on one workspace share one cap.
            workspace=(settings.account, settings.endpoint.base_url),
        )

    @property
    def is_delivering_process(self) -> bool:
        """Whether this process holds the queue directory's delivery lock."""
        return self._lock.held

    def ensure_started(self) -> bool:
        """Start the flush thread if it does not run; returns whether it runs.

        False once closed, and at interpreter exit, where no thread is started (see
        background.py): :meth:`deliver_here` then does the thread's work.
        """
        thread = self._thread
        if thread is not None and thread.is_alive():
            return True
        if self._stop.is_set() or background.interpreter_exiting():
            return False
        with self._start_guard:  # a thread that died (it should not) is started again
            thread = self._thread
            if thread is not None and thread.is_alive():
                return True
            if self._stop.is_set():
                return False
            thread = threading.Thread(target=self._run, name="cio_logging-flush", daemon=True)
            try:
                thread.start()
            except RuntimeError:  # "can't create new thread at interpreter shutdown"
                return False
            self._thread = thread
            return True

    def notify(self) -> None:
        # Event.set takes a lock and notifies even when already set; this runs after
        # every commit. Skipping it then loses nothing: the flag is cleared before the
        # log is read (_cycle), so a set flag means that read is still to come.
        if not self._wake.is_set():
            self._wake.set()

    def flush(self, timeout: float, last_rowid: int) -> bool:
        """Wait until nothing is due: all delivered, or what is left cannot go now.

        "Cannot go now": it waits for a retry, the breaker is open, or the credentials
        are refused. In the delivering process that covers the whole queue directory;
        in any other process, it covers every row this process committed, which all
        have a rowid at most ``last_rowid``. False on timeout.
        """
        self.ensure_started()
        deadline = time.monotonic() + timeout
        with self._progress:
            self._flush_requested += 1
            generation = self._flush_requested
        self._wake.set()
        with self._progress:
            while True:
                if self._flush_completed >= generation:
                    return True
                if (
                    self._lock_tried
                    and not self._lock.held
                    and self._nothing_more_to_wait_for(last_rowid)
                ):
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._thread is None:
                    return False
                self._progress.wait(min(remaining, 0.05))

    def _nothing_more_to_wait_for(self, last_rowid: int) -> bool:
        """In a process that does not deliver: are all the rows it committed gone, or
        waiting for a retry, or can the delivering process not send now? (Then waiting
        would only cost time, at every exit during an outage.)"""
        sendable = self._wal.sendable_through(last_rowid, self._clock(), self._due_horizon)
        if last_rowid == 0 or not sendable:
            return True
        state = self._read_state()
        return state is not None and (
            state.get("breaker") != CLOSED or bool(state.get("delivery_paused"))
        )

    def _read_state(self) -> dict[str, Any] | None:
        if self._fleet_state is None:
            return read_state(self._settings.queue_dir)
        try:
            return self._fleet_state.read()
        except DatabaseError:
            return None

    def wait_for_sender(self, timeout: float, last_rowid: int) -> bool:
        """``deliver="process"``: wait, without a thread of our own, until the sender
        process has sent every row at most ``last_rowid`` or they cannot go now (the
        same test as :meth:`flush` in a process that does not deliver). False on
        timeout."""
        deadline = time.monotonic() + timeout
        while not self._nothing_more_to_wait_for(last_rowid):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            time.sleep(min(remaining, 0.05))
        return True

    def deliver_here(self, timeout: float, last_rowid: int) -> bool:
        """:meth:`flush` without the flush thread: deliver on the calling thread.

        For interpreter exit, where no thread may start and thread pools refuse work:
        the requests go one after another on this thread (the client's ``deliver``,
        never its ``submit``), and none starts after ``timeout`` (each is bounded by
        what is left of it). Returns True once nothing more is due or what is left
        cannot go now, as :meth:`flush` does; False on timeout. When another process
        holds the right to send, it waits for that one as :meth:`flush` would.
        """
        deadline = time.monotonic() + timeout
        try:
            acquired = self._lock.try_acquire()
        except PermissionError as exc:
            self._report_foreign_lock(exc)
            acquired = False
        self._lock_tried = True
        if not acquired:
            return self.wait_for_sender(timeout, last_rowid)
        client: DeliveryClient | None = None
        try:
            self._keep_due_times(self._clock.take_step())
            settings = replace(
                self._settings,
                request_timeout=max(0.1, min(self._settings.request_timeout, timeout)),
            )
            client = make_client(
                settings, breaker=self.breaker, rate_cap=self._rate_cap, telemetry=self._telemetry
            )
            here = CallingThreadClient(client, deadline)
            while self._seconds_on_hold() <= 0 and self._deliver_once(here):
                if time.monotonic() >= deadline:
                    return False
            return True
        except Exception:  # never raise into flush() (logging.shutdown): it stays on disk
            self._report_unexpected()
            return False
        finally:
            if client is not None:
                client.close()
            with contextlib.suppress(Exception):
                self._record_state(now=True)
            thread = self._thread
            if thread is None or not thread.is_alive():
                # No thread goes on sending: let another process take over.
                self._lock.release()
                self._local_lock.release()

    def close(self, timeout: float) -> bool:
        """Stop the thread, waiting at most ``timeout``; returns whether it stopped."""
        self._stop.set()
        self._wake.set()
        thread = self._thread
        stopped = True
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            stopped = not thread.is_alive()
        if stopped:
            self._lock.release()
            self._local_lock.release()
        return stopped

    def _run(self) -> None:
        background.mark_current_thread()
        background.guard_loggers()
        client: DeliveryClient | None = None
        try:
            while not self._stop.is_set():
                try:
                    client = self._cycle(client)
                except LeaseLostError as exc:
                    # Paused or cut off past the lease: another process sends now. Stop
                    # at once; the rows not acknowledged are the new sender's.
                    internal_log.warning("%s; this process stops sending", exc)
                    lost = getattr(self._lock, "lost", None)
                    if lost is not None:
                        lost()
                    if client is not None:
                        client.close()
                        client = None
                except DatabaseError as exc:
                    # Fleet mode, the database away (a restart, a failover): expected,
                    # said in a line (at most once a minute), no traceback. The rows are
                    # in the database; sending resumes when it answers.
                    self._report_database_away(exc)
                    self._stop.wait(max(self._settings.flush_interval, 1.0))
                except Exception:
                    # A locked database (another process held it past the timeout), a
                    # full disk, a bug: never let the thread die. Events stay on disk;
                    # report (at most once a minute), start over with a fresh client.
                    self._report_unexpected()
                    self._try_recovery()
                    if client is not None:
                        client.close()
                        client = None
                    self._stop.wait(max(self._settings.flush_interval, 1.0))
        finally:
            if client is not None:
                client.close()
            if self._lock.held:
                with contextlib.suppress(Exception):
                    self._record_state(now=True)  # the final counters, for status after exit
            self._lock.release()
            self._local_lock.release()
            with self._progress:
                self._progress.notify_all()

    def _cycle(self, client: DeliveryClient | None) -> DeliveryClient | None:
        """One turn of the loop: deliver a batch, or wait. Returns the client to reuse."""
        # Clear before reading the log: an event appended from here on sets it again,
        # so no wake-up is lost.
        self._wake.clear()
        generation = self._flush_requested
        # Taken in every process, applied only by the delivering one: a step noticed
        # while another process delivered was that process's to apply.
        step = self._clock.take_step()
        if self._fleet_state is not None:
            self._move_spilled()
        was_held = self._lock.held
        try:
            acquired = self._lock.try_acquire()
        except PermissionError as exc:
            self._report_foreign_lock(exc)
            acquired = False
        # Until this thread has tried for the lock, state.json may be another (even an
        # earlier, dead) process's: flush() must not take its word for what can go.
        self._lock_tried = True
        if not acquired:
            self._wait(self._settings.flush_interval)
            return client
        if not was_held and self._fleet_state is not None:
            self._adopt_fleet_state()
        self._record_state()
        self._log_status()
        self._keep_due_times(step)
        if self._wal.replaced_on_disk(at_most_every=1.0):
            # Deleted under a process that only delivers (it never logs, so no commit
            # would notice): it would go on reading the unlinked file.
            action = self._wal.recover(None)
            if action is not None:
                internal_log.error("%s", action)
        on_hold = self._seconds_on_hold()
        if on_hold > 0:
            self._complete(generation)  # flush(): nothing can go now
            self._wait(on_hold)
            return client
        if client is None:
            client = make_client(
                self._settings,
                breaker=self.breaker,
                rate_cap=self._rate_cap,
                telemetry=self._telemetry,
                thread_initializer=_mark_flush_thread,
            )
        if not self._deliver_once(client):
            self._complete(generation)
            self._wait(self._settings.flush_interval)
        return client

    def _move_spilled(self) -> None:
        """Fleet mode: move rows spilled while the database was away (by this process
        or an earlier one using this queue directory) into it. One local process does
        it: the holder of the directory's delivery.lock."""
        mover = getattr(self._wal, "move_spilled", None)
        probe = getattr(self._wal, "probe", None)
        if mover is None or probe is None:
            return
        try:
            if not probe() or not self._local_lock.try_acquire():
                return
            while not self._stop.is_set() and mover() > 0:
                pass
        except PermissionError as exc:
            self._report_foreign_lock(exc)
        except DatabaseError as exc:
            internal_log.debug("spilled rows not moved yet: %s", exc)

    def _adopt_fleet_state(self) -> None:
        """A process that just took over the fleet's sending keeps the last sender's
        pauses: an open breaker and a Retry-After or credentials pause still running
        (the fleet must not probe again at once because its sender changed)."""
        state = self._read_state()
        if not state:
            return
        wall_now = time.time()
        resume_at = state.get("hold_until")
        if isinstance(resume_at, (int, float)) and resume_at > wall_now:
            self._held_until = max(self._held_until, time.monotonic() + (resume_at - wall_now))
        if state.get("breaker") == OPEN:
            # Its breaker, too: one probe when the predecessor's was due, not a batch.
            probe_at = state.get("probe_at")
            wait = probe_at - wall_now if isinstance(probe_at, (int, float)) else 0.0
            self.breaker.open_for(max(0.0, wait))
        if state.get("delivery_paused"):
            self.stats.delivery_paused = str(state["delivery_paused"])
        if state.get("last_error"):
            self.stats.last_error = str(state["last_error"])

    def _keep_due_times(self, step: float) -> None:
        """Move persisted due times by a wall-clock step, and make due those too far
        ahead to be ours (on the first turn, then every _DUE_CHECK_SECONDS)."""
        moment = time.monotonic()
        if not step and moment - self._due_checked_at < _DUE_CHECK_SECONDS:
            return
        self._due_checked_at = moment
        now = self._clock()
        moved = self._wal.adjust_due_times(step, now, self._due_horizon)
        if step:
            internal_log.warning(
                "the wall clock stepped %+.1f s; moved %d due time(s) in the "
                "queue by it, so retries keep their wait",
                step,
                moved,
            )
        elif moved:
            internal_log.warning(
                "%d event(s) were due more than %g s ahead (written under "
                "another clock); they are due now",
                moved,
                self._due_horizon,
            )

    def _try_recovery(self) -> None:
        # A corrupt or deleted database fails every read: the log may repair itself
        # (quarantine, a fresh file); the commit thread does the same on writes.
        error = sys.exc_info()[1]
        try:
            action = self._wal.recover(error)
        except Exception as exc:  # the disk is not back yet: the next turn tries again
            internal_log.debug("queue recovery failed: %r", exc)
            return
        if action is not None:
            internal_log.error("%s", action)

    def _report_foreign_lock(self, error: PermissionError) -> None:
        # A root shell ran the CLI here with an older version and left the lock as
        # root's: this process can log (events wait on disk) but never deliver.
        now = time.monotonic()
        if now - self._foreign_lock_reported_at >= _ERROR_REPEAT_SECONDS:
            self._foreign_lock_reported_at = now
            path = self._lock.path
            try:
                owner = pwd.getpwuid(path.stat().st_uid).pw_name
            except (OSError, KeyError):
                owner = "another user"
            internal_log.error(
                "cannot open %s (%s): it belongs to %s, so this process "
                "cannot deliver from this queue; events wait on disk. Give it back to "
                "the queue directory's owner (chown)",
                path,
                error.strerror,
                owner,
            )

    def _report_database_away(self, error: DatabaseError) -> None:
        now = time.monotonic()
        if now - self._unexpected_reported_at >= _ERROR_REPEAT_SECONDS:
            self._unexpected_reported_at = now
            internal_log.warning("sending paused: %s; it resumes once the database answers", error)

    def _report_unexpected(self) -> None:
        now = time.monotonic()
        if now - self._unexpected_reported_at >= _ERROR_REPEAT_SECONDS:
            self._unexpected_reported_at = now
            internal_log.exception(
                "unexpected error in the flush thread; events stay on disk and delivery is retried"
            )

    def _seconds_on_hold(self) -> float:
        held = self._held_until - time.monotonic()
        # A Retry-After answered to another handler of this process on this workspace
        # holds this one too.
        return max(held, self.breaker.seconds_until_probe(), self._rate_cap.seconds_on_hold())

    def _deliver_once(self, client: DeliveryClient) -> bool:
        """Deliver what is due (one call as a breaker probe); False when nothing was."""
        if self.breaker.state != CLOSED:
            # The probe: the first call that may go (earlier ones may wait behind
            # a person's retry); corrupt and expired rows read on the way are progress.
            cursor: tuple[float, int] | None = None
            progress = False
            while not self._stop.is_set():
                events, batch = self._take_due(self._settings.batch_size, self._clock(), cursor)
                if not (batch.events or batch.corrupt):
                    return progress
                progress = progress or bool(batch.corrupt) or len(events) < len(batch.events)
                allowed, _ = self._in_person_order(events, {})
                if allowed:
                    self._apply(client.deliver(allowed[:1]), probing=True)
                    self._record_state()
                    return True
                cursor = batch.cursor
            return progress
        return self._deliver_pipelined(client)

    def _deliver_pipelined(self, client: DeliveryClient) -> bool:
        """Keep up to ``max_in_flight`` batches in flight until nothing more is due.

        While requests are out, the next batch is read (after the cursor of the last
        one: what is in flight is still in the log) and finished ones are acknowledged,
        so reading, sending and acknowledging overlap. After a failure nothing new is
        sent; what is in flight is awaited and applied.

        A person's calls go in commit order (which is logging order in one process):
        a call goes only once every earlier row of its person is accounted for (see
        :meth:`_in_person_order`); one whose person has a request in flight waits in
        memory (``held``) until that request is answered, then goes in the next batch,
        ahead of newer calls. A call held back by an earlier row this pass cannot see
        (one waiting for a retry, or committed behind the cursor) waits for a later
        pass: the pass ends within _PASS_SECONDS once that happened. Other people's
        calls are not held up.
        """
        settings = self._settings
        in_flight: deque[tuple[Future[DeliveryReport], list[QueuedEvent]]] = deque()
        busy: dict[str, set[int]] = {}  # people with calls in flight: their positions
        held: dict[str, list[QueuedEvent]] = {}  # their later calls, in order
        # In flight, held, or ready to go: each is on its way, ahead of anything a
        # read finds for its person. Kept as they come and go, not rebuilt at every
        # read (that was a sixth of the sender's CPU under load).
        accounted: dict[str, set[int]] = {}
        # People held back by an earlier row waiting for a retry, with its due time: not
        # counted or listed again at every read until then (the row cannot go sooner,
        # and only this sender removes rows, so the wait is never wrong for long).
        waiting: dict[str, float] = {}
        cursor: tuple[float, int] | None = None
        found = failed = exhausted = False
        blocked_since: float | None = None
        while True:
            while not failed and len(in_flight) < settings.max_in_flight:
                if (
                    self._stop.is_set()
                    or self.breaker.state != CLOSED
                    or self._rate_cap.seconds_on_hold() > 0
                    or not self._lock.held
                    or (
                        blocked_since is not None
                        and time.monotonic() - blocked_since > _PASS_SECONDS
                    )
                ):
                    break
                ready = _released(held, busy, settings.batch_size)
                if not exhausted and len(ready) < settings.batch_size:
                    events, batch = self._take_due(
                        settings.batch_size - len(ready), self._clock(), cursor
                    )
                    if batch.events or batch.corrupt:
                        cursor = batch.cursor
                    else:
                        exhausted = True  # read again once a request is answered
                    allowed, blocked = self._in_person_order(events, accounted, waiting)
                    if blocked and blocked_since is None:
                        blocked_since = time.monotonic()
                    # Progress: something to send, or rows taken out (corrupt, expired).
                    # Calls only held back are not: the next pass would find them again.
                    if allowed or batch.corrupt or len(events) < len(batch.events):
                        found = True
                    for queued in allowed:
                        person = queued.event.person
                        accounted.setdefault(person, set()).add(queued.position)
                        # A merge waits for either person's request in flight.
                        people = queued.event.people
                        if person in held or any(other in busy for other in people):
                            held.setdefault(person, []).append(queued)
                        else:
                            ready.append(queued)
                if not ready:
                    if exhausted or sum(map(len, held.values())) >= _HELD_LIMIT:
                        break  # wait for an answer: it frees people or shows new rows
                    continue  # all held back: read on, past them
                for queued in ready:
                    for person in queued.event.people:
                        busy.setdefault(person, set()).add(queued.position)
                in_flight.append((client.submit(ready), ready))
            if not in_flight:
                break
            future, sent = in_flight.popleft()
            report = future.result()
            for queued in sent:
                person = queued.event.person
                for on_the_way, people in (
                    (busy, queued.event.people),
                    (accounted, (person,)),
                ):
                    for someone in people:
                        positions = on_the_way.get(someone)
                        if positions is not None:
                            positions.discard(queued.position)
                            if not positions:
                                del on_the_way[someone]
            self._apply(report)
            failed = failed or report.failure is not None
            exhausted = False
        if found:
            self._record_state()
        return found

    def _in_person_order(
        self,
        events: list[QueuedEvent],
        accounted: dict[str, set[int]],
        waiting: dict[str, float] | None = None,
    ) -> tuple[list[QueuedEvent], int]:
        """The calls that may go now, in commit order, and how many of ``events`` may not.

        A call may go once every earlier row of its person in the log is accounted
        for: in ``accounted`` (in flight or held, by position), ahead of it among
        ``events``, or due and fetched here to go ahead of it (the log reads in due-time
        order, and an earlier row may come due after a later one: a retry, a row whose
        commit came after a newer record's). An earlier row that is not due yet (a
        retry waiting) holds back its person's later calls. A row already accounted
        for (fetched ahead of its turn) is not sent twice. Usually one count query a
        read; a person whose count does not match is listed. A person found held back by
        a row due later goes in ``waiting`` with its due time, and is neither counted nor
        listed again before then.
        """
        events = [q for q in events if q.position not in accounted.get(q.event.person, ())]
        read = len(events)
        now = self._clock()
        if waiting:
            for person in [person for person, due in waiting.items() if due <= now]:
                del waiting[person]
            events = [q for q in events if q.event.person not in waiting]
        if not events:
            return [], read
        candidates = {queued.position: queued for queued in events}
        through = max(candidates)
        mine = Counter(queued.event.person for queued in events)
        for person in mine:
            positions = accounted.get(person)
            if positions:
                # Mostly all earlier than this read: then counted without a loop.
                if max(positions) <= through:
                    mine[person] += len(positions)
                else:
                    mine[person] += sum(1 for position in positions if position <= through)
        counts = self._wal.person_counts(mine.keys(), through)
        # A person whose rows up to here are exactly these calls and those accounted for.
        listed_people = {person for person, known in mine.items() if counts.get(person) != known}
        allowed = [queued for queued in events if queued.event.person not in listed_people]
        if listed_people:
            listed: set[int] = set()
            stopped: set[str] = set()
            for person, position, due, key in self._wal.earlier_rows(listed_people, through):
                listed.add(position)
                if person in stopped:
                    continue
                queued = candidates.get(position)
                if queued is not None and queued.event.person == person:
                    allowed.append(queued)
                elif position in accounted.get(person, ()):
                    continue
                elif due <= now and (ahead := self._wal.get(key)) is not None:
                    # Its position in this log (a fleet's spill numbers its own rows).
                    allowed.append(ahead._replace(position=position))
                else:
                    stopped.add(person)  # an earlier call that cannot go yet
                    if due > now and waiting is not None:
                        waiting[person] = due
            # Rows without a person (an earlier version wrote them): no order to keep.
            allowed += [
                queued
                for queued in events
                if queued.event.person in listed_people and queued.position not in listed
            ]
        allowed.sort(key=_by_position)
        allowed = self._merges_in_order(allowed, accounted)
        positions = {queued.position for queued in events}
        return allowed, read - sum(1 for queued in allowed if queued.position in positions)

    def _merges_in_order(
        self, allowed: list[QueuedEvent], accounted: dict[str, set[int]]
    ) -> list[QueuedEvent]:
        """Hold back a merge until every earlier call of the person it merges into is
        accounted for, and with it the later calls of the person merged away.

        A merge is stored under the person merged away, so that person's order holds
        it already; ``Event.people`` names the other person. Rare: one query per merge.
        """
        if all(len(queued.event.people) == 1 for queued in allowed):
            return allowed
        kept: list[QueuedEvent] = []
        stopped: set[str] = set()
        for queued in allowed:
            person, *others = queued.event.people
            if person in stopped:
                continue
            if others:
                earlier = self._wal.earlier_rows(others, queued.position - 1)
                if any(position not in accounted.get(other, ()) for other, position, *_ in earlier):
                    stopped.add(person)
                    continue
            kept.append(queued)
        return kept

    def _take_due(
        self, limit: int, now: float, after: tuple[float, int] | None
    ) -> tuple[list[QueuedEvent], Batch]:
        """Read what is due; dead-letter corrupt rows and expired events on the way."""
        batch = self._wal.read_due(limit, now, after=after)
        for corrupt in batch.corrupt:
            self._dead_letter(corrupt.key, None, Failure(None, "corrupt_entry", corrupt.reason))
            internal_log.error(
                "a queue entry could not be read and was moved to the dead-letter store: %s",
                corrupt.reason,
            )
        events: list[QueuedEvent] = []
        for queued in batch.events:
            # Fleet mode: logged_at_here is on the database's clock (a host whose clock
            # is off ages nothing); keep it when porting (see store/postgres.py).
            logged_at = queued.logged_at_here or queued.event.logged_at
            since = max(logged_at, queued.replayed_at or 0.0)
            if self.retry.expired(since, now, uncounted=self._clock.uncounted_since(since)):
                self._give_up(
                    queued,
                    "expired",
                    f"older than max_event_age "
                    f"({self._settings.max_event_age:g} s) before it could be sent",
                )
            else:
                events.append(queued)
        return events, batch

    def _apply(self, report: DeliveryReport, *, probing: bool = False) -> None:
        for queued, rejection in report.rejected:
            self._dead_letter(queued.key, queued.event, rejection, queued, remove=False)
        # Dead letters are written before the log entries are removed: a crash in
        # between leaves an event in both places, never in neither.
        self._wal.remove(
            [q.key for q in report.accepted] + [q.key for q, _ in report.rejected],
            delivered=len(report.accepted),
        )
        self.stats.delivered += len(report.accepted)
        if self._telemetry is not None and report.accepted:
            essentials = self._settings.essential_events
            self._telemetry.events_delivered(
                ((q.event.logged_at, q.event.is_essential(essentials)) for q in report.accepted),
                self._clock(),
            )
        self.stats.requests += report.requests
        if report.accepted and self.stats.delivery_paused:
            internal_log.warning("Customer.io accepts events again; delivery resumed")
            self.stats.delivery_paused = None
        failure = report.failure
        if failure is None:
            return
        # The error first, then the counters: a status() reader never sees a failure
        # counted without its reason.
        self.stats.last_error = failure.message
        self.stats.last_error_at = self._clock()
        if failure.kind in (AUTH, CONFIG):
            # Wrong credentials or a failing TLS set-up are not Customer.io failing and
            # not the events' fault: count no attempt, dead-letter nothing, try later.
            self.stats.failed_requests += 1
            self._held_until = time.monotonic() + self._settings.auth_retry_interval
            self.stats.delivery_paused = failure.message
            self._report(
                failure,
                len(self._wal),
                logging.ERROR,
                (
                    "Customer.io refused the credentials (%s): delivery is paused and "
                    "%d event(s) wait on disk; check CUSTOMERIO_SITE_ID and "
                    "CUSTOMERIO_API_KEY. Retrying every %g s."
                )
                if failure.kind == AUTH
                else (
                    "TLS verification failed (%s): delivery is paused and %d event(s) "
                    "wait on disk; check ca_bundle and any proxy. Retrying every %g s."
                ),
                self._settings.auth_retry_interval,
            )
        elif failure.kind == TRANSIENT:
            self.stats.failed_requests += 1
            # A failed probe (the breaker already knows Customer.io is down) and a 429
            # (it asked us to slow down) say nothing about these events: they are
            # rescheduled without an attempt, so a long outage dead-letters nothing
            # before max_event_age.
            counts = not probing and failure.status != 429
            self._schedule_retries(report.failed, failure, count_attempt=counts)
            if failure.retry_after:
                # Customer.io asked every client to wait, not just these events.
                wait = min(failure.retry_after, self._settings.max_retry_after)
                self._rate_cap.hold(wait)  # and this process's other handlers on it
                self._held_until = max(self._held_until, time.monotonic() + wait)
            self._report(
                failure,
                len(self._wal),
                logging.WARNING,
                "Customer.io delivery failed (%s); %d event(s) wait on disk and will be retried",
            )

    def _schedule_retries(
        self, failed: list[QueuedEvent], failure: Failure, *, count_attempt: bool
    ) -> None:
        now = self._clock()
        later: list[tuple[QueuedEvent, float]] = []
        for queued in failed:
            attempts = queued.attempts + (1 if count_attempt else 0)
            if count_attempt and self.retry.exhausted(attempts):
                self._give_up(
                    queued,
                    "max_attempts",
                    f"gave up after {attempts} attempts; last: {failure.message}",
                    status=failure.status,
                    attempts=attempts,
                )
            else:
                delay = self.retry.delay(max(attempts, 1), failure.retry_after)
                later.append((queued, now + delay))
                if self._telemetry is not None:
                    essential = queued.event.is_essential(self._settings.essential_events)
                    self._telemetry.event_retried(essential)
        self._wal.record_failure(later, failure.message, now, count_attempt=count_attempt)
        self.stats.retries_scheduled += len(later)

    def _give_up(
        self,
        queued: QueuedEvent,
        error_type: str,
        message: str,
        *,
        status: int | None = None,
        attempts: int | None = None,
    ) -> None:
        failure = Failure(status, error_type, message)
        self._dead_letter(queued.key, queued.event, failure, queued, attempts=attempts)

    def _dead_letter(
        self,
        key: str,
        event: Event | None,
        failure: Failure,
        queued: QueuedEvent | None = None,
        *,
        attempts: int | None = None,
        remove: bool = True,
    ) -> None:
        now = self._clock()
        tries = attempts if attempts is not None else (queued.attempts + 1 if queued else 1)
        first_failure_at = queued.first_failure_at if queued else None
        history: dict[str, Any] = {}
        if queued is not None and queued.replayed_at is not None:
            # Replayed from the dead-letter store and failed again: it goes back with
            # its first reason and its earlier replays, plus this one.
            earlier = queued.dead_letter or _history_lost_by_an_earlier_version(queued)
            reason = DeadLetterReason(failure.error_type, failure.status, failure.message, now)
            history = {
                "original": earlier.original,
                "replays": [*earlier.replays, ReplayRecord.came_back(queued.replayed_at, reason)],
                "replay_count": earlier.replay_count + 1,
            }
            tries += earlier.attempts
            first_failure_at = earlier.first_failure_at or first_failure_at
        self._dead_letters.add(
            key,
            event,
            status=failure.status,
            error_type=failure.error_type,
            message=failure.message,
            attempts=tries,
            first_failure_at=first_failure_at,
            now=now,
            **history,
        )
        if remove and queued is not None:
            self._wal.remove([key])
        self.stats.dead_lettered += 1
        if self._telemetry is not None:
            essentials = self._settings.essential_events
            essential = None if event is None else event.is_essential(essentials)
            self._telemetry.event_dead_lettered(failure.error_type, essential)
        internal_log.warning(
            "event %s (%s) moved to the dead-letter store: %s",
            key,
            event.name if event else "unreadable",
            failure.message,
        )

    def _report(
        self, failure: Failure, waiting: int, level: int, message: str, *extra: object
    ) -> None:
        now = time.monotonic()  # a wall-clock step must not silence a repeat for as long
        previous = self._last_reported
        repeated = previous is not None and previous[0] == failure.message
        if repeated and previous is not None and now - previous[1] < _ERROR_REPEAT_SECONDS:
            return
        self._last_reported = (failure.message, now)
        internal_log.log(level, message, failure.message, waiting, *extra)

    def _record_state(self, *, now: bool = False, breaker: str | None = None) -> None:
        """Rewrite state.json for ``cio-logging status`` (the delivering process only)."""
        moment = time.monotonic()
        stats = self.stats
        news = (stats.last_error, stats.delivery_paused)  # an operator must see these at once
        if (
            not now
            and news == self._recorded_news
            and (moment - self._state_recorded_at < _STATE_RECORD_SECONDS)
        ):
            return
        self._state_recorded_at = moment
        self._recorded_news = news
        state = {
            "pid": os.getpid(),
            "updated_at": self._clock(),
            # pybreaker notifies before it stores the new state: take it as given.
            "breaker": breaker or self.breaker.state,
            "last_error": stats.last_error,
            "last_error_at": stats.last_error_at,
            "delivery_paused": stats.delivery_paused,
            "delivered": stats.delivered,
            "dead_lettered": stats.dead_lettered,
            "requests": stats.requests,
            "failed_requests": stats.failed_requests,
        }
        if self._fleet_state is None:
            if not self._did_anything(stats):
                # A process that has sent nothing (a gunicorn --preload master taking
                # the lock at shutdown, a drain with nothing to do) must not replace the
                # record of one that did with zeros: status would show "delivered: 0".
                existing = read_state(self._settings.queue_dir)
                if existing is not None and existing.get("pid") != os.getpid():
                    return
            write_state(self._settings.queue_dir, state)
            return
        # For a successor: when the pauses end, on the wall clock (another host's).
        wall_now, moment = time.time(), time.monotonic()
        hold = self._held_until - moment
        probe = self.breaker.seconds_until_probe()
        state["hold_until"] = wall_now + hold if hold > 0 else None
        state["probe_at"] = wall_now + probe if probe > 0 else None
        state["host"] = socket.gethostname()
        try:
            self._fleet_state.write(state)
        except LeaseLostError:
            raise  # fenced: another sender took over; _run stops this one
        except DatabaseError as exc:
            internal_log.debug("sender state not recorded: %s", exc)

    @staticmethod
    def _did_anything(stats: DeliveryStats) -> bool:
        """Has this process's worker anything of its own to record?"""
        return bool(
            stats.requests
            or stats.delivered
            or stats.dead_lettered
            or stats.breaker_transitions
            or stats.last_error
            or stats.delivery_paused
        )

    def _log_status(self) -> None:
        """The reference design's periodic breaker report, when status_log_interval is set."""
        interval = self._settings.status_log_interval
        if not interval or self._status_report is None:
            return
        moment = time.monotonic()
        if moment - self._status_logged_at >= interval:
            self._status_logged_at = moment
            status_log.info("%s", self._status_report())  # the logger's name says what it is

    def _breaker_changed(self, old: str, new: str) -> None:
        self.stats.breaker_transitions.append((old, new))
        if self._lock.held:
            # A listener's exception would reach the request: a lost lease shows at the
            # sender's next fenced write instead.
            with contextlib.suppress(LeaseLostError):
                self._record_state(now=True, breaker=new)
        if new == OPEN:
            internal_log.warning(
                "circuit breaker opened (%s -> %s): Customer.io keeps failing; "
                "sending stops, events wait on disk, a probe follows in %g s",
                old,
                new,
                self._settings.reset_timeout,
            )
        elif new == CLOSED:
            internal_log.warning(
                "circuit breaker closed (%s -> %s): Customer.io answers again; delivery resumes",
                old,
                new,
            )
        else:
            internal_log.info("circuit breaker %s -> %s", old, new)
        if self._telemetry is not None:
            self._telemetry.breaker_transition(old, new)

    def _complete(self, generation: int) -> None:
        with self._progress:
            self._flush_completed = max(self._flush_completed, generation)
            self._progress.notify_all()

    def _wait(self, seconds: float) -> None:
        interval = self._settings.status_log_interval
        if interval:  # a long hold must not hold back the periodic status report
            seconds = min(seconds, interval)
        if self._wake.wait(seconds) and not self._stop.is_set():
            # Woken by new events: linger a moment so the next read takes a batch
            # rather than the one event that woke us (essential events wake us one
            # by one), which also leaves the GIL to the threads that log.
            self._stop.wait(_LINGER_SECONDS)


class CallingThreadClient:
    """A client that sends on the calling thread and starts no request after ``deadline``.

    ``submit`` delivers at once (a thread pool refuses work at interpreter exit); past
    the deadline nothing is sent and the calls are reported deferred (no attempt
    counted): they stay in the log for the next sender.
    """

    def __init__(self, client: DeliveryClient, deadline: float) -> None:
        self._client = client
        self._deadline = deadline

    def deliver(self, events: Sequence[QueuedEvent]) -> DeliveryReport:
        if time.monotonic() >= self._deadline:
            stopped = Failure(None, "stopped", "out of time at exit: not sent")
            return DeliveryReport(deferred=list(events), failure=stopped)
        return self._client.deliver(events)

    def submit(self, events: Sequence[QueuedEvent]) -> Future[DeliveryReport]:
        done: Future[DeliveryReport] = Future()
        done.set_result(self.deliver(events))
        return done

    def close(self) -> None:
        self._client.close()


def _by_position(queued: QueuedEvent) -> int:
    return queued.position


def _released(
    held: dict[str, list[QueuedEvent]], busy: dict[str, set[int]], limit: int
) -> list[QueuedEvent]:
    """Held calls whose person has nothing in flight any more, oldest person first;
    a person's calls all go together (in order), up to ``limit`` calls in all."""
    ready: list[QueuedEvent] = []
    for person in list(held):
        if len(ready) >= limit:
            break
        if person not in busy and not any(
            other in busy for queued in held[person] for other in queued.event.people[1:]
        ):
            ready.extend(held.pop(person))
    return ready


def _history_lost_by_an_earlier_version(queued: QueuedEvent) -> DeadLetterHistory:
    # A row replayed by a version that did not carry the entry's history: its first
    # reason is unknown, and saying so beats passing off this failure as the first.
    replayed_at = queued.replayed_at or queued.event.logged_at
    lost = "replayed by an earlier version, which did not keep the reason"
    return DeadLetterHistory(DeadLetterReason("unknown", None, lost, replayed_at), (), 0, 0.0, 0)


def _mark_flush_thread() -> None:
    # Delivery's sender threads work for the flush thread: what they log must not
    # come back into the handler either, nor wait for logging's module lock.
    background.mark_current_thread()


def _reset_in_child(reference: weakref.ref[DeliveryWorker]) -> None:
    worker = reference()
    if worker is not None:
        worker._reset_threading_state()
        # What the parent's worker delivered is not the child's to report or record.
        worker.stats = DeliveryStats()
