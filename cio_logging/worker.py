"""The background flush thread: reads the write-ahead log, delivers, acknowledges.

Lifecycle: started on the first event (so a process that forks after configuring
logging works, and each forked child starts its own); woken by new events, by
``flush()`` and by a short interval (which also picks up events other processes
appended). A daemon thread, because the interpreter joins non-daemon threads before
``logging.shutdown()`` could ask it to stop; ``close()`` stops it within a bound and
whatever it had not sent stays on disk.

Data flows one way: log -> read_due -> deliver -> remove / dead-letter / keep for
later. An event leaves the log only after Customer.io accepted it or it was written
to the dead-letter store, so a crash at any point sends it again (same id), never
loses it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

from .config import Settings
from .delivery import DeliveryReport, Failure, TrackClient
from .events import Event
from .process_lock import DeliveryLock
from .resilience import Backoff
from .wal import DeadLetterStore, WriteAheadLog

internal_log = logging.getLogger("cio_logging")

# Repeat the same delivery error at most this often.
_ERROR_REPEAT_SECONDS = 60.0


@dataclass
class DeliveryStats:
    """What this process's worker did; read by ``handler.status()``."""

    delivered: int = 0
    dead_lettered: int = 0
    requests: int = 0
    failed_requests: int = 0
    last_error: str | None = None
    last_error_at: float | None = None


class DeliveryWorker:
    """Owns the flush thread of one handler in one process."""

    def __init__(
        self,
        settings: Settings,
        wal: WriteAheadLog,
        dead_letters: DeadLetterStore,
        *,
        client_factory: Callable[[Settings], TrackClient] = TrackClient,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._wal = wal
        self._dead_letters = dead_letters
        self._client_factory = client_factory
        self._clock = clock
        self._lock = DeliveryLock(settings.queue_dir / "delivery.lock")
        self.stats = DeliveryStats()
        self._reset_threading_state()
        reference = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _reset_in_child(reference))

    def _reset_threading_state(self) -> None:
        # Called at construction and in a forked child, where the parent's thread does
        # not exist and its locks may have been copied while held.
        self._thread: threading.Thread | None = None
        self._start_guard = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._progress = threading.Condition()
        self._flush_requested = 0
        self._flush_completed = 0
        self._last_reported: tuple[str, float] | None = None

    @property
    def is_delivering_process(self) -> bool:
        """Whether this process holds the queue directory's delivery lock."""
        return self._lock.held

    def ensure_started(self) -> None:
        if self._thread is not None or self._stop.is_set():
            return
        with self._start_guard:
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(
                    target=self._run, name="cio_logging-flush", daemon=True
                )
                self._thread.start()

    def notify(self) -> None:
        self._wake.set()

    def flush(self, timeout: float, last_key: str | None) -> bool:
        """Wait until the queue was emptied or a delivery attempt failed.

        In the delivering process that means everything in the queue directory; in any
        other process, that the last event this handler appended has left the queue
        (the delivering process sends in key order). Returns False on timeout.
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
                if not self._lock.held and (last_key is None or last_key not in self._wal):
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._thread is None:
                    return False
                self._progress.wait(min(remaining, 0.05))

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
        return stopped

    def _run(self) -> None:
        client: TrackClient | None = None
        backoff = Backoff(maximum=self._settings.max_backoff)
        try:
            while not self._stop.is_set():
                # Clear before reading the log: an event appended from here on sets it
                # again, so no wake-up is lost.
                self._wake.clear()
                generation = self._flush_requested
                if not self._lock.try_acquire():
                    self._wait(self._settings.flush_interval)
                    continue
                if client is None:
                    client = self._client_factory(self._settings)
                delay = self._deliver_once(client, backoff, generation)
                if delay is not None:
                    self._wait(delay, wake_early=False)
                elif self._nothing_due():
                    self._complete(generation)
                    self._wait(self._settings.flush_interval)
        except Exception:  # the thread must never die silently
            internal_log.exception(
                "cio_logging flush thread stopped by an unexpected error; "
                "events stay on disk and a new process will send them"
            )
        finally:
            if client is not None:
                client.close()
            self._lock.release()
            with self._progress:
                self._progress.notify_all()

    def _deliver_once(self, client: TrackClient, backoff: Backoff, generation: int) -> float | None:
        """Deliver one batch; return how long to back off, or None to go on."""
        batch = self._wal.read_due(self._settings.batch_size, self._clock())
        for corrupt in batch.corrupt:
            self._dead_letter(
                corrupt.key,
                None,
                Failure(None, "corrupt_entry", corrupt.reason),
                attempts=1,
                first_failure_at=None,
            )
            internal_log.error(
                "cio_logging: a queue entry could not be read and was moved to "
                "the dead-letter store: %s",
                corrupt.reason,
            )
        if not batch.events:
            return None
        report = client.deliver(batch.events)
        self._apply(report)
        if report.failure is None:
            backoff.reset()
            return None
        delay = backoff.next_delay(report.failure.retry_after)
        self._wal.record_failure(
            report.deferred, report.failure.message, self._clock() + delay, self._clock()
        )
        self._complete(generation)  # flush() waits for "delivered or could not be"
        return delay

    def _apply(self, report: DeliveryReport) -> None:
        for queued, failure in report.rejected:
            self._dead_letter(
                queued.key,
                queued.event,
                failure,
                attempts=queued.attempts + 1,
                first_failure_at=queued.first_failure_at,
            )
        # Dead letters are written before the log entries are removed: a crash in
        # between leaves an event in both places, never in neither.
        self._wal.remove([q.key for q in report.accepted] + [q.key for q, _ in report.rejected])
        stats = self.stats
        stats.delivered += len(report.accepted)
        stats.requests += report.requests
        if report.failure is not None:
            stats.failed_requests += 1
            self._report_failure(report.failure, len(report.deferred))

    def _dead_letter(
        self,
        key: str,
        event: Event | None,
        failure: Failure,
        *,
        attempts: int,
        first_failure_at: float | None,
    ) -> None:
        self._dead_letters.add(
            key,
            event,
            status=failure.status,
            error_type=failure.error_type,
            message=failure.message,
            attempts=attempts,
            first_failure_at=first_failure_at,
            now=self._clock(),
        )
        self.stats.dead_lettered += 1
        internal_log.warning(
            "cio_logging: event %s (%s) moved to the dead-letter store: %s",
            key,
            event.name if event else "unreadable",
            failure.message,
        )

    def _report_failure(self, failure: Failure, waiting: int) -> None:
        now = self._clock()
        self.stats.last_error = failure.message
        self.stats.last_error_at = now
        previous = self._last_reported
        repeated = previous is not None and previous[0] == failure.message
        if repeated and previous is not None and now - previous[1] < _ERROR_REPEAT_SECONDS:
            return
        self._last_reported = (failure.message, now)
        internal_log.warning(
            "cio_logging: Customer.io delivery failed (%s); %d event(s) wait on "
            "disk and will be retried",
            failure.message,
            waiting,
        )

    def _nothing_due(self) -> bool:
        return not self._wal.read_due(1, self._clock()).events

    def _complete(self, generation: int) -> None:
        with self._progress:
            self._flush_completed = max(self._flush_completed, generation)
            self._progress.notify_all()

    def _wait(self, seconds: float, *, wake_early: bool = True) -> None:
        if wake_early:
            self._wake.wait(seconds)
        else:
            self._stop.wait(seconds)


def _reset_in_child(reference: weakref.ref[DeliveryWorker]) -> None:
    worker = reference()
    if worker is not None:
        worker._reset_threading_state()
