"""The sender's life: its thread, waking, the right to send, the in-flight window.

The loop decides nothing. Each turn it takes the clock's step and does the upkeep,
tries for the right to send (``delivery.lock``, or fleet mode's lease), and then, unless
a hold says wait, keeps up to ``max_in_flight`` batches in flight: the planner reads
the next batch (never one with a person whose request is still out), an exchange sends
it on a sender thread, and as each comes back the effects write what the outcome
policy decided. Reading, sending and acknowledging overlap. After a failure nothing new
goes out; what is in flight is awaited. When nothing more can go, ``flush()`` callers
are told, and the loop sleeps until new events, a retry's due time, the end of a hold or
``flush_interval``.

The thread is started on demand (the first event, ``flush()``), restarted in a forked
child by comparing process ids (:class:`~cio_logging.background.OwnThread`), never
started at interpreter exit: :meth:`Sender.deliver_here` then does the same work on the
calling thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

from .. import background
from ..clock import STEP_TOLERANCE_SECONDS, WallClock
from ..config import Settings
from ..errors import DatabaseError, LeaseLostError
from ..process_lock import DeliveryLock
from ..resilience import CLOSED, OPEN, DeliveryBreaker, RequestRateCap, RetryPolicy
from ..store import (
    LANES,
    DeadLetterWriter,
    EventSink,
    LegacyRows,
    QueueView,
    SenderQueue,
    Spilling,
)
from ..telemetry import Telemetry
from ..transport import make_client
from ..transport.base import DeliveryClient
from .effects import Effects
from .exchange import Result, exchange
from .plan import Planned, Planner
from .state import BREAKER_OPEN, DeliveryStats, Hold, Holds, StateRecord
from .upkeep import Upkeep

internal_log = logging.getLogger("cio_logging")
status_log = logging.getLogger("cio_logging.status")

#: Set on our threads (flush, senders, commit): records logged there (by the SDK,
#: urllib3, ourselves) must never come back into a handler (a feedback loop), and their
#: level checks never take logging's module lock (see background.py).
flush_thread_marker = background.marker

# How long the loop lets events gather after new ones woke it.
_LINGER_SECONDS = 0.02
# Report an unexpected error at most this often.
_ERROR_REPEAT_SECONDS = 60.0
# Rewrite the state record at most this often (and on every breaker transition).
_STATE_RECORD_SECONDS = 2.0


class SenderLock(Protocol):
    """The right to send: the queue directory's flock, or fleet mode's lease."""

    path: Any

    @property
    def held(self) -> bool: ...

    def try_acquire(self) -> bool: ...

    def lost(self) -> None:
        """Another process took the right over (fleet mode): forget holding it."""

    def release(self) -> None: ...


class Sender:
    """The sender of one handler in one process (or of a ``cio-logging deliver``)."""

    def __init__(
        self,
        settings: Settings,
        queue: SenderQueue,
        view: QueueView,
        sink: EventSink,
        dead_letters: DeadLetterWriter,
        *,
        record: StateRecord,
        clock: WallClock | None = None,
        telemetry: Telemetry | None = None,
        status_report: Callable[[], dict[str, Any]] | None = None,
        lock: SenderLock | None = None,
        fleet: bool = False,
        spill: Spilling | None = None,
        legacy: LegacyRows | None = None,
        client_factory: Callable[..., DeliveryClient] = make_client,
    ) -> None:
        """``lock``: the right to send (default: the queue directory's delivery.lock);
        fleet mode passes the workspace's lease (``fleet=True``), and the directory's
        lock then only chooses which local process moves spilled rows."""
        self._settings = settings
        self._queue = queue
        self._view = view
        self._sink = sink
        self._dead_letters = dead_letters
        self._record = record
        self._clock = clock or WallClock()
        self._telemetry = telemetry
        self._status_report = status_report
        self._local_lock = DeliveryLock(settings.queue_dir / "delivery.lock")
        self._lock: SenderLock = lock or self._local_lock
        self._fleet = fleet
        self._spill = spill
        self._legacy = legacy
        self._client_factory = client_factory
        self.retry = RetryPolicy.from_settings(settings)
        # No due time this process stores is further ahead than this; one that is was
        # not scheduled on this clock and counts as due (see adjust_due_times).
        self._due_horizon = self.retry.longest_delay + STEP_TOLERANCE_SECONDS
        self.stats = DeliveryStats()
        self._thread = background.OwnThread(
            self._run, "cio_logging-flush", on_fork=self._reset_in_child
        )
        self._reset()

    def _reset(self) -> None:
        """The state a process starts with (at construction, and in a forked child,
        where the parent's thread does not exist and its locks may be copied held)."""
        settings = self._settings
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._progress = threading.Condition()
        self._flush_requested = 0
        self._flush_completed = 0
        self._lock_tried = False
        self._state_recorded_at = float("-inf")
        self._recorded_news: tuple[str | None, str | None] = (None, None)
        self._unexpected_reported_at = float("-inf")
        self._status_logged_at = time.monotonic()
        self._senders: ThreadPoolExecutor | None = None
        self.breaker = DeliveryBreaker.from_settings(settings, self._breaker_changed)
        self._rate_cap = RequestRateCap(
            settings.max_requests_per_second,
            stop=self._stop,
            # This process's handlers on one workspace share one cap.
            workspace=(settings.account, settings.endpoint.base_url),
        )
        self.holds = Holds(
            breaker_wait=self.breaker.seconds_until_probe,
            shared_wait=self._rate_cap.seconds_on_hold,
        )
        self._effects = Effects(
            settings,
            self._queue,
            self._dead_letters,
            retry=self.retry,
            holds=self.holds,
            rate_cap=self._rate_cap,
            stats=self.stats,
            clock=self._clock,
            telemetry=self._telemetry,
        )
        self._upkeep = Upkeep(
            self._queue,
            self._sink,
            clock=self._clock,
            horizon=self._due_horizon,
            local_lock=self._local_lock,
            stopped=self._stop.is_set,
            spill=self._spill,
            legacy=self._legacy,
            corrupt=self._effects.set_aside_corrupt,
        )

    def _reset_in_child(self) -> None:
        # What the parent's sender did is not the child's to report or record.
        self.stats = DeliveryStats()
        self._reset()

    # -- what the handler calls ------------------------------------------------------

    @property
    def is_delivering_process(self) -> bool:
        """Whether this process holds the right to send."""
        return self._lock.held

    def hold(self) -> Hold | None:
        """Why nothing is sent now (Retry-After, a pause, the open breaker), or None."""
        self._thread.forked()
        return self.holds.current()

    def ensure_started(self) -> bool:
        """Start the thread if it does not run; whether it runs. False once closed,
        and at interpreter exit (no thread starts then: see :meth:`deliver_here`)."""
        return self._thread.ensure_started(stopped=self._stop.is_set())

    def notify(self) -> None:
        # Event.set takes a lock and notifies even when already set; this runs after
        # every commit. Skipping it then loses nothing: the flag is cleared before the
        # queue is read (_turn), so a set flag means that read is still to come.
        if not self._wake.is_set():
            self._wake.set()

    def flush(self, timeout: float, last_rowid: int) -> bool:
        """Wait until nothing more can go now; whether every row this process committed
        (all at positions at most ``last_rowid``) has left the queue.

        "Nothing more can go": all sent, or what is left waits for a retry, or behind a
        hold (Retry-After, the breaker, refused credentials), which flush does not wait
        out: it returns False at once then. In a process that does not send, it waits
        for the rows it committed the same way. False on timeout.
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
                    break
                if (
                    self._lock_tried
                    and not self._lock.held
                    and self._nothing_more_to_wait_for(last_rowid)
                ):
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._thread.is_alive():
                    return False
                self._progress.wait(min(remaining, 0.05))
        return not self._committed_rows_wait(last_rowid)

    def wait_for_sender(self, timeout: float, last_rowid: int) -> bool:
        """``deliver="process"``: wait, without a thread of our own, until the sender
        process has sent every row at most ``last_rowid`` or they cannot go now; then
        whether they have all left the queue. False on timeout."""
        deadline = time.monotonic() + timeout
        while not self._nothing_more_to_wait_for(last_rowid):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            time.sleep(min(remaining, 0.05))
        return not self._committed_rows_wait(last_rowid)

    def deliver_here(self, timeout: float, last_rowid: int) -> bool:
        """:meth:`flush` without the thread: deliver on the calling thread.

        For interpreter exit, where no thread may start and thread pools refuse work:
        batches go one after another on this thread, and none starts after
        ``timeout`` (each request is bounded by what is left of it). Returns as
        :meth:`flush` does. When another process holds the right to send, it waits for
        that one instead. Never raises.
        """
        deadline = time.monotonic() + timeout
        try:
            acquired = self._lock.try_acquire()
        except PermissionError as exc:
            self._upkeep.report_foreign_lock(exc, self._lock)
            acquired = False
        self._lock_tried = True
        if not acquired:
            return self.wait_for_sender(timeout, last_rowid)
        client: DeliveryClient | None = None
        try:
            self._upkeep.tidy(self._upkeep.take_step())
            settings = dataclasses.replace(
                self._settings,
                request_timeout=max(0.1, min(self._settings.request_timeout, timeout)),
            )
            client = self._client_factory(
                settings, rate_cap=self._rate_cap, telemetry=self._telemetry
            )
            planner = self._planner(client)
            if not self._effects.remove_settled():
                return False
            while self.holds.seconds_left() <= 0 and time.monotonic() < deadline:
                if not self._pump(planner, client, inline=True, deadline=deadline):
                    break
            return time.monotonic() < deadline and not self._committed_rows_wait(last_rowid)
        except Exception:  # never raise into flush() (logging.shutdown): it stays on disk
            self._report_unexpected()
            return False
        finally:
            if client is not None:
                client.close()
            with contextlib.suppress(Exception):
                self._record_state(now=True)
            if not self._thread.is_alive():
                # No thread goes on sending: let another process take over.
                self._lock.release()
                self._local_lock.release()

    def close(self, timeout: float) -> bool:
        """Stop the thread, waiting at most ``timeout``; returns whether it stopped."""
        self._stop.set()
        self._wake.set()
        stopped = self._thread.join(timeout)
        if stopped:
            self._lock.release()
            self._local_lock.release()
            self._rate_cap.close()
        return stopped

    # -- waiting for rows ------------------------------------------------------------

    def _committed_rows_wait(self, last_rowid: int) -> bool:
        """Whether any row at a position at most ``last_rowid`` is still queued."""
        if last_rowid <= 0:
            return False
        try:
            return self._view.sendable_through(last_rowid, float("inf"), 0.0)
        except Exception:  # a failing store: the rows are not known gone
            return True

    def _nothing_more_to_wait_for(self, last_rowid: int) -> bool:
        """In a process that does not send: are all the rows it committed gone, or
        waiting for a retry, or can the sending process not send now (its record
        shows a hold)? Then waiting would only cost time, at every exit."""
        try:
            sendable = self._view.sendable_through(last_rowid, self._clock(), self._due_horizon)
        except Exception:  # a failing store: nothing to wait for here
            return True
        if last_rowid == 0 or not sendable:
            return True
        state = self._read_state()
        if state is None:
            return False
        hold = state.get("hold")
        held = isinstance(hold, dict) and float(hold.get("until") or 0) > time.time()
        return held or state.get("breaker") != CLOSED or bool(state.get("delivery_paused"))

    def _read_state(self) -> dict[str, Any] | None:
        try:
            return self._record.read()
        except DatabaseError:
            return None

    # -- the thread ----------------------------------------------------------------------

    def _run(self) -> None:
        background.mark_current_thread()
        background.guard_loggers()
        client: DeliveryClient | None = None
        try:
            while not self._stop.is_set():
                try:
                    client = self._turn(client)
                except LeaseLostError as exc:
                    # Paused or cut off past the lease: another process sends now. Stop
                    # at once; the rows not acknowledged are the new sender's.
                    internal_log.warning("%s; this process stops sending", exc)
                    self._lock.lost()
                    client = self._drop(client)
                except DatabaseError as exc:
                    # Fleet mode, the database away (a restart, a failover): expected,
                    # said in a line (at most once a minute), no traceback. The rows are
                    # in the database; sending resumes when it answers.
                    self._report_database_away(exc)
                    client = self._drop(client)
                    self._stop.wait(max(self._settings.flush_interval, 1.0))
                except Exception:
                    # A locked database (another process held it past the timeout), a
                    # full disk, a bug: never let the thread die. Events stay on disk;
                    # report (at most once a minute), start over with a fresh client.
                    self._report_unexpected()
                    self._upkeep.recover()
                    client = self._drop(client)
                    self._stop.wait(max(self._settings.flush_interval, 1.0))
        finally:
            self._drop(client)
            if self._senders is not None:
                self._senders.shutdown(wait=True)
                self._senders = None
            if self._lock.held:
                with contextlib.suppress(Exception):
                    self._record_state(now=True)  # the final counters, for status after exit
            self._lock.release()
            self._local_lock.release()
            with self._progress:
                self._progress.notify_all()

    @staticmethod
    def _drop(client: DeliveryClient | None) -> None:
        if client is not None:
            client.close()

    def _turn(self, client: DeliveryClient | None) -> DeliveryClient | None:
        """One turn of the loop: send what can go, or wait. Returns the client to reuse."""
        # Cleared before reading the queue: an event appended from here on sets it
        # again, so no wake-up is lost.
        self._wake.clear()
        generation = self._flush_requested
        step = self._upkeep.take_step()
        self._upkeep.move_spilled()
        was_held = self._lock.held
        try:
            acquired = self._lock.try_acquire()
        except PermissionError as exc:
            self._upkeep.report_foreign_lock(exc, self._lock)
            acquired = False
        # Until this thread has tried for the lock, the state record may be another
        # (even an earlier, dead) process's: flush() must not take its word for it.
        self._lock_tried = True
        if not acquired:
            self._wait(self._settings.flush_interval)
            return client
        if not was_held:
            self._effects.forget_dead_people()
            self._effects.forget_unremoved()
            if self._fleet:
                self._adopt_fleet_state()
        self._record_state()
        self._log_status()
        self._upkeep.tidy(step)
        if not self._effects.remove_settled():
            self._complete(generation)  # flush(): nothing can go now
            self._wait(max(self._settings.flush_interval, 1.0))
            return client
        on_hold = self.holds.seconds_left()
        if on_hold > 0:
            self._complete(generation)  # flush(): nothing can go now
            self._wait(on_hold)
            return client
        if client is None:
            client = self._client_factory(
                self._settings, rate_cap=self._rate_cap, telemetry=self._telemetry
            )
        if not self._pump(self._planner(client), client):
            self._complete(generation)
            self._wait(self._next_wait())
        return client

    def _planner(self, client: DeliveryClient) -> Planner:
        return Planner(self._settings, self._queue, client, retry=self.retry, clock=self._clock)

    def _pump(
        self,
        planner: Planner,
        client: DeliveryClient,
        *,
        inline: bool = False,
        deadline: float | None = None,
    ) -> bool:
        """Keep up to ``max_in_flight`` batches in flight until nothing more can go;
        whether anything was sent or taken out. ``inline``: every exchange on the
        calling thread, one at a time (interpreter exit).

        Requests in flight never share a person. With nothing in flight, a read takes
        everyone's calls; a full batch means a backlog, and from then on each request
        takes one lane of people's calls (see BatchQuery) and a lane has at most one
        request out: several calls of each of a few people per request, and other
        people for the requests beside it.
        """
        window = 1 if inline else self._settings.max_in_flight
        free: deque[int] = deque(range(LANES))
        in_flight: deque[tuple[Future[Result], Planned, bool, list[int]]] = deque()
        progress = failed = backlog = False
        while True:
            while not failed and len(in_flight) < window and free and self._may_send(deadline):
                probe = self.breaker.state != CLOSED
                if probe and in_flight:
                    break  # the probe goes alone
                lanes, planned = self._next_batch(planner, free, probe, backlog or bool(in_flight))
                if planned is None:
                    break
                if len(lanes) > 1 and len(planned.batch) >= self._settings.batch_size:
                    backlog = window > 1
                self._effects.set_aside(planned)
                progress = progress or bool(planned.corrupt or planned.expired)
                if not planned.requests:
                    continue  # everything read was set aside: read again
                for lane in lanes:
                    free.remove(lane)
                future = self._submit(planned, client, probe, inline)
                in_flight.append((future, planned, probe, lanes))
                if probe:
                    break
            if not in_flight:
                return progress
            future, planned, probe, lanes = in_flight.popleft()
            result = future.result()
            free.extend(lanes)
            self._effects.apply(result, probe=probe)
            progress = progress or bool(result.delivered or result.refused or result.retry)
            failed = failed or result.stopped
            if result.delivered or result.refused:
                self._record_state()

    def _next_batch(
        self, planner: Planner, free: deque[int], probe: bool, by_lane: bool
    ) -> tuple[list[int], Planned | None]:
        """The next batch and the lanes it takes: everyone's calls (every lane) unless
        ``by_lane``, else the first free lane whose people have calls that may go."""
        if probe or not by_lane:
            return list(free), planner.next(probe=probe)
        for _ in range(len(free)):
            lane = free[0]
            free.rotate(-1)
            planned = planner.next(lane=lane)
            if planned is not None:
                return [lane], planned
        return [], None

    def _may_send(self, deadline: float | None) -> bool:
        if self._stop.is_set() and deadline is None:
            return False
        if deadline is not None and time.monotonic() >= deadline:
            return False
        return (
            self._lock.held
            and self.holds.seconds_left() <= 0
            and not self._effects.rows_left_behind
        )

    def _submit(
        self, planned: Planned, client: DeliveryClient, probe: bool, inline: bool
    ) -> Future[Result]:
        """Run the batch's exchange on a sender thread (here, when ``inline`` or at
        interpreter exit, where thread pools refuse work)."""
        if not inline and not background.interpreter_exiting():
            try:
                return self._sender_pool().submit(
                    exchange, planned, client, self.breaker, probe=probe
                )
            except RuntimeError:
                pass  # "cannot schedule new futures after interpreter shutdown"
        done: Future[Result] = Future()
        done.set_result(exchange(planned, client, self.breaker, probe=probe))
        return done

    def _sender_pool(self) -> ThreadPoolExecutor:
        if self._senders is None:
            self._senders = ThreadPoolExecutor(
                max_workers=self._settings.max_in_flight,
                thread_name_prefix="cio_logging-send",
                initializer=background.mark_current_thread,
            )
        return self._senders

    def _next_wait(self) -> float:
        """Sleep until the earliest retry is due, but at most ``flush_interval`` (which
        also picks up rows other processes append)."""
        wait = self._settings.flush_interval
        try:
            now = self._clock()
            due = self._queue.next_due(now)
        except Exception:  # a figure to sleep by
            return wait
        if due is not None:
            wait = min(wait, max(0.0, due - now) + 0.001)
        return wait

    def _wait(self, seconds: float) -> None:
        interval = self._settings.status_log_interval
        if interval:  # a long hold must not hold back the periodic status report
            seconds = min(seconds, interval)
        if self._wake.wait(seconds) and not self._stop.is_set():
            # Woken by new events: linger a moment so the next read takes a batch
            # rather than the one event that woke us (essential events wake us one
            # by one), which also leaves the GIL to the threads that log.
            self._stop.wait(_LINGER_SECONDS)

    def _complete(self, generation: int) -> None:
        with self._progress:
            self._flush_completed = max(self._flush_completed, generation)
            self._progress.notify_all()

    # -- the state record ----------------------------------------------------------------

    def _adopt_fleet_state(self) -> None:
        """A process that just took over the fleet's sending keeps the last sender's
        holds: an open breaker and a Retry-After or credentials pause still running
        (the fleet must not probe again at once because its sender changed)."""
        state = self._read_state()
        if not state:
            return
        wall_now = time.time()
        hold = state.get("hold")
        if isinstance(hold, dict) and isinstance(hold.get("until"), (int, float)):
            left = float(hold["until"]) - wall_now
            reason = str(hold.get("reason") or "retry_after")
            if left > 0 and reason != BREAKER_OPEN:
                self.holds.hold(reason, left, str(hold.get("message") or "held by the last sender"))
        resume_at = state.get("hold_until")  # written by earlier versions
        if isinstance(resume_at, (int, float)) and resume_at > wall_now:
            self.holds.hold("retry_after", resume_at - wall_now, "held by the last sender")
        if state.get("breaker") == OPEN:
            # Its breaker, too: one probe when the predecessor's was due, not a batch.
            probe_at = state.get("probe_at")
            wait = probe_at - wall_now if isinstance(probe_at, (int, float)) else 0.0
            self.breaker.open_for(max(0.0, wait))
        if state.get("delivery_paused"):
            self.stats.delivery_paused = str(state["delivery_paused"])
        if state.get("last_error"):
            self.stats.last_error = str(state["last_error"])

    def _record_state(self, *, now: bool = False, breaker: str | None = None) -> None:
        """Rewrite the state record for ``cio-logging status`` (the sending process)."""
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
        hold = self.holds.current()
        probe = self.breaker.seconds_until_probe()
        wall_now = time.time()
        state: dict[str, Any] = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "updated_at": self._clock(),
            # pybreaker notifies before it stores the new state: take it as given.
            "breaker": breaker or self.breaker.state,
            "last_error": stats.last_error,
            "last_error_at": stats.last_error_at,
            "delivery_paused": stats.delivery_paused,
            "hold": None if hold is None else hold.to_dict(),
            # For a successor in fleet mode: when the breaker's probe is due.
            "probe_at": wall_now + probe if probe > 0 else None,
            "delivered": stats.delivered,
            "dead_lettered": stats.dead_lettered,
            "requests": stats.requests,
            "failed_requests": stats.failed_requests,
            "uncertain": stats.uncertain,
        }
        if not self._fleet and not stats.did_anything():
            # A process that has sent nothing (a gunicorn --preload master taking the
            # lock at shutdown, a drain with nothing to do) must not replace the record
            # of one that did with zeros: status would show "delivered: 0".
            existing = self._read_state()
            if existing is not None and existing.get("pid") != os.getpid():
                return
        try:
            self._record.write(state)
        except LeaseLostError:
            raise  # fenced: another sender took over; the loop stops this one
        except DatabaseError as exc:
            internal_log.debug("sender state not recorded: %s", exc)

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
