"""``CustomerIOHandler``: the logging.Handler that turns tagged records into Track API events.

On the caller's thread it only maps the record, validates it and hands the row to the
group committer (``commit.py``): an essential event is on disk when ``emit`` returns,
another within ``commit_interval``. The background worker does all network work. It
never raises into the caller: a bad event is refused with a warning on the
``cio_logging`` logger and counted; a failing disk is reported by the committer, which
holds events in memory (bounded) until the disk recovers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from opentelemetry.metrics import MeterProvider
from opentelemetry.trace import TracerProvider

from . import background, cooperative
from .commit import REFUSED, GroupCommitter
from .config import (
    DELIVER_NONE,
    DELIVER_PROCESS,
    DELIVER_THREAD,
    DISABLED,
    ESSENTIAL_ONLY,
    Settings,
    degradation_level,
    resolve_settings,
)
from .errors import ConfigurationError, InvalidEventError, QueueError, UnreadableTagError
from .events import EXTRA_KEY, carries_tag
from .sender import Hold, Sender, StateFile, StateRecord, flush_thread_marker
from .sender_process import SenderSupervisor
from .signals import install_commit_on_signals, reraises_with_default_action
from .store import (
    DeadLetterArchive,
    DeadLetterStore,
    EventLog,
    Spilling,
    WriteAheadLog,
    encode_row,
    secure_directory,
)
from .store.owner import claim as claim_queue_dir
from .telemetry import QueueProbes, Telemetry
from .wire import call_from_record

if TYPE_CHECKING:
    from .store.postgres import PostgresLease, SenderState

internal_log = logging.getLogger("cio_logging")

#: Reasons under which ``status()["dropped"]`` counts events that were not queued.
DROP_INVALID = "invalid_event"
DROP_UNREADABLE = "unreadable_tag"  # a tag where it cannot be read (a rendered structlog one)
DROP_QUEUE_ERROR = "queue_error"
DROP_DISABLED = "degradation_disabled"
DROP_NON_ESSENTIAL = "degradation_essential_only"
DROP_DISK_SOFT = "disk_limit_non_essential"
DROP_DISK_HARD = "disk_limit_hard"
DROP_BUFFER_FULL = "buffer_full"  # not on disk yet and past max_buffer_bytes
DROP_UNWRITTEN_AT_CLOSE = "unwritten_at_close"  # the disk still failed at close()

# Set while this thread is inside emit(): anything logged meanwhile (by diskcache,
# by our own warnings) must not come back into the handler.
_inside_emit = threading.local()


class CustomerIOHandler(logging.Handler):
    """Sends log records tagged with ``extra={"cio": {...}}`` to Customer.io, durably.

    Args:
        site_id: Track API site id; default ``$CUSTOMERIO_SITE_ID``.
        api_key: Track API key; default ``$CUSTOMERIO_API_KEY``.
        region: ``"us"`` or ``"eu"``; default ``$CUSTOMERIO_REGION`` or ``"us"``.
        queue_dir: the write-ahead log's directory; default ``$CIO_LOGGING_QUEUE_DIR``
            or a persistent per-user directory (never a temporary one).
        track_url: replaces the Track API base URL (a proxy, the simulator); default
            ``$CIO_LOGGING_TRACK_URL``.
        ca_bundle: CA file for TLS verification, winning over ``REQUESTS_CA_BUNDLE``;
            default ``$CIO_LOGGING_CA_BUNDLE``.
        level: the handler's level, as for any handler.
        tracer_provider: OpenTelemetry tracer provider; default the global one.
        meter_provider: OpenTelemetry meter provider; default the global one.
        **options: tunables (``flush_timeout``, ``close_timeout``, ``request_timeout``,
            ``flush_interval``, ``batch_size``, retry, breaker, rate-cap, degradation and
            disk-limit options, ``fsync``, ``deliver``: ``"thread"``, ``"process"``
            or ``"none"``); each, with its default, in the settings reference
            (docs/reference/settings.md).

    Raises:
        ConfigurationError: a credential is missing or a setting is invalid.
    """

    def __init__(
        self,
        site_id: str | None = None,
        api_key: str | None = None,
        *,
        region: str | None = None,
        queue_dir: str | os.PathLike[str] | None = None,
        track_url: str | None = None,
        ca_bundle: str | os.PathLike[str] | None = None,
        level: int | str = logging.NOTSET,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
        **options: Any,
    ) -> None:
        self.settings: Settings = resolve_settings(
            site_id,
            api_key,
            region=region,
            queue_dir=queue_dir,
            track_url=track_url,
            ca_bundle=ca_bundle,
            options=options,
        )
        queue_dir_path = self.settings.queue_dir
        try:
            secure_directory(queue_dir_path)
            # One workspace per queue directory: its rows go out with our credentials.
            claim_queue_dir(queue_dir_path, self.settings.account)
            self._wal: EventLog
            self._dead_letters: DeadLetterArchive
            self._lease: PostgresLease | None = None
            self._spill: Spilling | None = None
            self._fleet_state: SenderState | None = None
            if self.settings.queue_url is None:
                self._wal = WriteAheadLog(queue_dir_path / "wal", fsync=self.settings.fsync)
                self._dead_letters = DeadLetterStore(
                    queue_dir_path / "dead", fsync=self.settings.fsync
                )
            else:
                # Fleet mode: the queue on PostgreSQL, queue_dir only for the spill.
                # Nothing here waits for the database: it may be away at start-up.
                from .store.postgres import open_fleet_store

                fleet = open_fleet_store(
                    self.settings.queue_url,
                    self.settings.workspace,
                    queue_dir_path,
                    fsync=self.settings.fsync,
                    timeout=self.settings.database_timeout,
                    lease_seconds=self.settings.lease_seconds,
                )
                self._wal, self._dead_letters, self._lease, self._fleet_state = fleet
                self._spill = fleet[0]
        except (OSError, QueueError) as exc:  # a bad queue_dir is a bad setting: fail now
            raise ConfigurationError(
                f"queue_dir {str(queue_dir_path)!r} cannot be used: {type(exc).__name__}: {exc}"
            ) from exc
        # Only now: Handler.__init__ registers the handler for logging.shutdown, which
        # would meet a half-built object at exit if opening the queue had failed.
        super().__init__(level)
        self._telemetry = Telemetry(
            endpoint=self.settings.endpoint,
            probes=QueueProbes(
                queue_dir=str(queue_dir_path),
                queue_depth=lambda: len(self._wal),
                dead_letter_depth=lambda: len(self._dead_letters),
                oldest_age=self._oldest_age,
                breaker_state=lambda: self._sender.breaker.state,
                hold=lambda: self._sender.hold(),
            ),
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
        )
        record: StateRecord = (
            StateFile(queue_dir_path) if self._fleet_state is None else self._fleet_state
        )
        self._sender = Sender(
            self.settings,
            self._wal,
            self._wal,
            self._wal,
            self._dead_letters,
            record=record,
            telemetry=self._telemetry,
            status_report=self.status,
            lock=self._lease,
            fleet=self._lease is not None,
            spill=self._spill,
            legacy=self._wal if isinstance(self._wal, WriteAheadLog) else None,
        )
        self._committer = GroupCommitter(
            self._wal,
            interval=self.settings.commit_interval,
            max_buffer_bytes=self.settings.max_buffer_bytes,
            on_committed=self._committed,
        )
        self._committer.queue_bytes = self._wal.volume()
        # Who sends: our flush thread, a supervised child, or a sender run elsewhere.
        # Outside "thread" the flush thread is never started: it would take the lock
        # from the sender and send itself.
        self._deliver = self.settings.deliver
        self._supervisor = (
            SenderSupervisor(self.settings) if self._deliver == DELIVER_PROCESS else None
        )
        self._essential_events = self.settings.essential_events
        self._always_durable = self.settings.commit_interval == 0
        self._counts_guard = threading.Lock()
        reference = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _reset_in_child(reference))
        self._enqueued = 0
        self._dropped: Counter[str] = Counter()
        # The calls refused at emit (counted as dropped: invalid), by the rule broken.
        self._refused: Counter[str] = Counter()
        self._api = self.settings.api
        self._unreadable_warned: set[tuple[str, str]] = set()
        self._closed = False
        self._close_done = False
        self._degradation = self.settings.degradation
        self._disk_warned_at = float("-inf")
        self._buffer_warned_at = float("-inf")
        cooperative.resolve_names_on_the_hub_at_exit()
        if self.settings.signal_handlers:
            try:
                self.install_signal_handlers()
            except ValueError:
                internal_log.warning(
                    "signal_handlers=True needs the handler built on the main thread; "
                    "no signal handler installed"
                )
        elif reraises_with_default_action(signal.SIGTERM):
            # uvicorn's worker ends by re-raising SIGTERM with the default action, so
            # no logging.shutdown() will commit: commit on the signal, on top of it.
            with contextlib.suppress(ValueError):  # not on the main thread
                self.install_signal_handlers()
        if self._supervisor is not None:
            self._supervisor.ensure(now=True)
        elif self._deliver == DELIVER_NONE:
            pass  # another process sends; this one only appends
        elif self._lease is not None:
            # Fleet mode: every process competes for the lease from the start (one that
            # never logs still takes over from a sender that died) and moves what an
            # earlier process spilled here. Nothing here waits for the database.
            self._sender.ensure_started()
        elif len(self._wal):
            # An earlier process left events: deliver them without waiting for a new one.
            self._sender.ensure_started()

    def __repr__(self) -> str:
        who = (
            f"site_id={self.settings.site_id!r}"
            if self.settings.api == "track"
            else f"api=pipelines source={self.settings.account}"
        )
        return (
            f"<{type(self).__name__} {who} "
            f"endpoint={self.settings.endpoint.base_url}{self.settings.endpoint.path} "
            f"queue_dir={str(self.settings.queue_dir)!r} "
            f"level={logging.getLevelName(self.level)}>"
        )

    def handle(self, record: logging.LogRecord) -> Any:
        """Filter and emit, without the handler lock.

        Untagged records return at the cost of a few lookups (``carries_tag``). The lock
        is skipped on purpose: the write-ahead log is safe for concurrent writers, and
        serialising every caller behind one lock would make logging threads queue up.
        """
        if (
            (EXTRA_KEY not in record.__dict__ and not carries_tag(record))
            or getattr(_inside_emit, "active", False)
            or getattr(flush_thread_marker, "active", False)
        ):
            return False
        if not self.filters:  # the common case: Filterer.filter's loop for nothing
            self.emit(record)
            return True
        result = self.filter(record)
        if isinstance(result, logging.LogRecord):  # Python 3.12+: a filter may swap it
            record = result
        if result:
            self.emit(record)
        return result

    def emit(self, record: logging.LogRecord) -> None:
        """Hand the record's event to the group committer.

        An essential event is committed to disk before this returns (unless the disk
        fails: then it waits in memory); any other within ``commit_interval``.
        """
        _inside_emit.active = True
        try:
            if self._degradation == DISABLED:
                self._count_drop(DROP_DISABLED, None)
                return
            event = call_from_record(record, self._api)
            if event is None:
                return
            essential = event.is_essential(self._essential_events)
            if self._degradation == ESSENTIAL_ONLY and not essential:
                self._count_drop(DROP_NON_ESSENTIAL, essential)
                return
            shed = self._disk_limit_reached(essential)
            if shed is not None:
                self._count_drop(shed, essential)
                return
            # After close() no writer runs: every event is committed before returning.
            outcome = self._committer.submit(
                encode_row(event), durable=essential or self._always_durable or self._closed
            )
            if outcome == REFUSED:
                self._count_drop(DROP_BUFFER_FULL, essential)
                self._warn_buffer_full()
                return
            self._telemetry.event_enqueued(essential)
            with self._counts_guard:
                self._enqueued += 1
        except UnreadableTagError as exc:
            self._count_drop(DROP_UNREADABLE, None)
            self._warn_unreadable(record, exc)
        except InvalidEventError as exc:
            self._count_drop(DROP_INVALID, None)
            with self._counts_guard:
                self._refused[exc.rule] += 1
            internal_log.warning(
                "event refused at emit (logger %s, %s:%d; rule %s): %s",
                record.name,
                record.filename,
                record.lineno,
                exc.rule,
                exc,
            )
        except Exception:
            self._count_drop(DROP_QUEUE_ERROR, None)
            self.handleError(record)
        finally:
            _inside_emit.active = False

    def _warn_unreadable(self, record: logging.LogRecord, exc: UnreadableTagError) -> None:
        """Say once per logger and shape that its tags cannot be read, and how to fix that."""
        key = (record.name, exc.shape)
        with self._counts_guard:
            if key in self._unreadable_warned:
                return
            self._unreadable_warned.add(key)
        internal_log.warning(
            "records on logger %s carry a Customer.io tag the handler cannot read "
            "(%s:%d); they are counted as dropped (%s) and this is said once: %s",
            record.name,
            record.filename,
            record.lineno,
            DROP_UNREADABLE,
            exc,
        )

    def _committed(self) -> None:
        """Rows reached the log: the flush thread has work."""
        if self._closed or background.interpreter_exiting():
            # No thread starts at exit: flush() delivers on its own thread (see flush).
            if self._deliver == DELIVER_THREAD:
                self._sender.notify()
            return
        if self._deliver != DELIVER_THREAD:
            if self._supervisor is not None:
                self._supervisor.ensure()  # take over from a supervisor that is gone
            return
        if self._sender.ensure_started():
            self._sender.notify()

    def _warn_buffer_full(self) -> None:
        now = time.monotonic()
        if now - self._buffer_warned_at > 60.0:
            self._buffer_warned_at = now
            internal_log.error(
                "%d event(s) wait in memory, past max_buffer_bytes=%d (%s); "
                "shedding events at emit",
                self._committer.buffered,
                self.settings.max_buffer_bytes,
                self._committer.disk_error or "the disk is slower than the event rate",
            )

    def start_delivery(self) -> None:
        """Start the flush thread now, not at the first event: a process that only
        sends (``cio-logging deliver``) must send what other processes append.

        Raises:
            ConfigurationError: ``deliver`` is not ``"thread"``: another process sends.
        """
        if self._deliver != DELIVER_THREAD:
            raise ConfigurationError(f"deliver={self._deliver!r}: this handler does not send")
        self._sender.ensure_started()

    def commit(self, timeout: float | None = None) -> bool:
        """Wait until every event emitted so far is on disk.

        Returns False if the disk fails (the events wait in memory and the committer
        keeps retrying) or ``timeout`` passed first.
        """
        return self._committer.commit(timeout)

    def install_signal_handlers(self, signals: Iterable[int] = (signal.SIGTERM,)) -> None:
        """Commit buffered events to disk when one of ``signals`` arrives (opt-in).

        Python's default SIGTERM ends the process at once, without ``logging.shutdown``:
        the non-essential events of the last ``commit_interval`` would be lost. The
        installed handler commits them (within ``close_timeout``), then passes the
        signal on to whatever handled it before (the default action ends the process
        as before, with the same status). Call it from the main thread, after any
        framework installed its own handlers. ``signal_handlers=True`` does the same
        at construction.

        Raises:
            ValueError: not called from the main thread.
        """
        install_commit_on_signals(self._committer, self.settings.close_timeout, signals)

    def set_degradation(self, level: str) -> None:
        """Switch between ``full``, ``essential_only`` and ``disabled`` at run time.

        Essential-only drops every event not in ``essential_events`` at emit; disabled
        drops all. Drops are counted under their reason in ``status()["dropped"]``;
        events already on disk are still delivered.

        Raises:
            ConfigurationError: an unknown level.
        """
        new = degradation_level(level)
        old, self._degradation = self._degradation, new
        if old != new:
            internal_log.warning("degradation %s -> %s", old, new)

    def _disk_limit_reached(self, essential: bool) -> str | None:
        """The drop reason when the queue is past a size limit, else None. Never blocks."""
        size = self._committer.queue_bytes  # refreshed by the commit thread
        if size < self.settings.max_queue_bytes:
            return None
        now = time.monotonic()
        if size >= self.settings.hard_max_queue_bytes:
            reason = DROP_DISK_HARD
        elif size >= self.settings.max_queue_bytes and not essential:
            reason = DROP_DISK_SOFT
        else:
            return None
        if now - self._disk_warned_at > 60.0:
            self._disk_warned_at = now
            internal_log.error(
                "the queue holds %d bytes on disk, past %s; shedding %s events "
                "at emit until delivery catches up",
                size,
                "hard_max_queue_bytes" if reason == DROP_DISK_HARD else "max_queue_bytes",
                "all" if reason == DROP_DISK_HARD else "non-essential",
            )
        return reason

    def flush(self, timeout: float | None = None) -> bool:  # type: ignore[override]
        """Wait, at most ``timeout`` (default ``flush_timeout``), until what was queued is
        delivered or cannot be; whether everything was delivered.

        Returns True once every event emitted so far has left the queue (delivered, or
        dead-lettered); False while events wait: behind a hold (a Retry-After, the open
        breaker, refused credentials: ``status()["hold"]`` says which, and flush does
        not wait it out), for a retry, for the disk, or past ``timeout``. With
        ``deliver="none"`` it only commits to disk (the sender is not ours to wait
        for) and returns whether that worked. With ``"process"`` it waits for the
        sender process as for the thread. (``logging`` ignores what it returns.)
        """
        return self.deliver_within(self.settings.flush_timeout if timeout is None else timeout)

    def deliver_within(self, timeout: float) -> bool:
        """:meth:`flush` with a time budget: True once every event this process logged
        has left the queue; False while some wait (behind a hold, for a retry, for
        another process, or past ``timeout``) or could not even be written to disk.
        Writing them to disk is not cut short by a ``timeout`` below ``close_timeout``:
        a short delivery budget must not leave events in memory.
        """
        if self._closed:
            return False
        background.collect_garbage_here()  # a reconfiguration's flush: see background
        deadline = time.monotonic() + timeout
        if not self._committer.commit(max(timeout, self.settings.close_timeout)):
            internal_log.warning(
                "flush could not write %d event(s) to disk (%s)",
                self._committer.buffered,
                self._committer.disk_error or "timed out",
            )
            return False
        # Fleet mode: rows in the local spill are not in the database yet; move them
        # now if it answers (whatever "deliver" is: no sender of ours may exist).
        spill = self._spill
        spilled = 0 if spill is None else spill.settle(max(0.0, deadline - time.monotonic()))
        if spilled:
            internal_log.warning(
                "flush: PostgreSQL does not answer; %d event(s) wait in the local spill "
                "and move to the database once it answers",
                spilled,
            )
            return False
        # Every row this process committed has a position at most this one: flush
        # waits until none of them is left to go now.
        last_rowid = self._committer.last_rowid
        # Fleet mode: rows moved from the spill into the database are ours too.
        if spill is not None:
            last_rowid = max(last_rowid, spill.moved_through)
        if self._deliver == DELIVER_NONE:
            return True
        if background.interpreter_exiting():
            # gevent would resolve the host name in a thread it cannot start now.
            cooperative.resolve_names_on_the_hub()
        remaining = max(0.0, deadline - time.monotonic())
        if self._deliver == DELIVER_PROCESS:
            delivered = self._sender.wait_for_sender(remaining, last_rowid)
        elif self._sender.ensure_started():
            delivered = self._sender.flush(remaining, last_rowid)
        else:
            # At interpreter exit no thread may start (Python 3.12 refuses, and thread
            # pools refuse on every version): deliver here, on the caller's thread.
            delivered = self._sender.deliver_here(remaining, last_rowid)
        if not delivered:
            hold = self._sender.hold()
            waiting = _or_none(self._wal.__len__)  # a failing store must not raise here
            if hold is not None:
                internal_log.info(
                    "flush: %s event(s) wait on disk behind a hold (%s, %.0f s more): %s",
                    waiting,
                    hold.reason,
                    hold.seconds,
                    hold.message,
                )
            elif time.monotonic() >= deadline:
                internal_log.warning(
                    "flush timed out after %gs; %s event(s) wait on disk and will be sent later",
                    timeout,
                    waiting,
                )
        return delivered

    def close(self) -> None:
        """Stop the worker within ``close_timeout``; unsent events stay on disk.

        Idempotent. A close cut short by an interrupt (KeyboardInterrupt, or SystemExit
        from a signal handler) is done again in full by the next call, such as the one
        ``logging.shutdown`` makes at exit.
        """
        with self._counts_guard:
            if self._close_done:
                return
            first, self._closed = not self._closed, True
        if first:
            self._telemetry.close()
        background.collect_garbage_here()  # a reconfiguration's close: see background
        unwritten = self._committer.close(self.settings.close_timeout)
        if unwritten:
            with self._counts_guard:
                self._dropped[DROP_UNWRITTEN_AT_CLOSE] += unwritten
            internal_log.error(
                "%d event(s) could not be written to disk before close (%s) and are lost",
                unwritten,
                self._committer.disk_error,
            )
        try:
            if self._supervisor is not None:
                # Our events are committed: the sender child stops with us (what it
                # had not sent stays on disk for the next one).
                self._supervisor.close(self.settings.close_timeout)
            if self._sender.close(self.settings.close_timeout):
                # Release the database files now; an emit after close reopens them.
                self._wal.close()
                self._dead_letters.close()
            else:
                internal_log.warning(
                    "the flush thread did not stop within %gs; its unsent events stay on disk",
                    self.settings.close_timeout,
                )
            self._close_done = True
        finally:
            super().close()

    def status(self) -> dict[str, Any]:
        """A snapshot for operators and health checks."""
        stats = self._sender.stats
        with self._counts_guard:
            dropped = dict(self._dropped)
            refused = dict(self._refused)
            enqueued = self._enqueued
        return {
            "api": self.settings.api,
            "breaker": self._sender.breaker.state,
            "queued": _or_none(self._wal.__len__),
            # Seconds since the oldest waiting event was logged (None: none waits, or
            # the disk fails); past 72 hours Customer.io triggers nothing with it.
            "oldest_age": self._oldest_age_or_none(),
            "dead_letters": _or_none(self._dead_letters.__len__),
            "degradation": self._degradation,
            "enqueued": enqueued,
            "delivered": stats.delivered,
            "dead_lettered": stats.dead_lettered,
            "dropped": dropped,
            "refused": refused,
            "buffered": self._committer.buffered,
            "commits": {
                "transactions": self._committer.transactions,
                "rows": self._committer.rows_committed,
            },
            "disk_error": self._committer.disk_error,
            "requests": stats.requests,
            "failed_requests": stats.failed_requests,
            "retries_scheduled": stats.retries_scheduled,
            "last_error": stats.last_error,
            "delivery_paused": stats.delivery_paused,
            # Why nothing is sent now (Retry-After, a pause, the open breaker), or None.
            "hold": _hold_dict(self._sender.hold()),
            "uncertain": stats.uncertain,
            "delivering_process": self._sender.is_delivering_process,
            **self._delivery_status(),
            "queue_bytes": _or_none(self._wal.volume),
            "queue_dir": str(self.settings.queue_dir),
            **self._fleet_status(),
        }

    def _delivery_status(self) -> dict[str, Any]:
        """Who sends: ``deliver`` as configured; ``delivery_external`` when no thread of
        this process sends (the counters above then stay at zero: the sender's are in
        state.json); for ``"process"``, whether this process supervises the sender
        child, and its pid."""
        supervisor = self._supervisor
        return {
            "deliver": self._deliver,
            "delivery_external": self._deliver != DELIVER_THREAD,
            "supervising_sender": supervisor is not None and supervisor.supervising,
            "sender_pid": None if supervisor is None else supervisor.child_pid,
            "sender_restarts": None if supervisor is None else supervisor.restarts,
        }

    def _fleet_status(self) -> dict[str, Any]:
        """Fleet mode: the store, the lease holder and the sender's state as the
        database has them (None where the database does not answer)."""
        if self._lease is None or self._fleet_state is None:
            return {"store": "diskcache"}
        from .store.postgres import display_url

        url = self.settings.queue_url or ""
        lease, fleet = None, None
        spill = self._spill
        try:
            if spill is not None and not spill.available():
                raise QueueError("PostgreSQL does not answer (commits go to the local spill)")
            info = self._lease.info()
            lease = (
                None
                if info is None
                else {
                    "host": info.host,
                    "pid": info.pid,
                    "term": info.term,
                    "since": info.since,
                    "expires_at": info.expires_at,
                    "valid": info.valid,
                }
            )
            fleet = self._fleet_state.read()
        except Exception as exc:  # status() never raises; the error is scrubbed
            fleet = {"database_error": str(exc)}
        return {
            "store": "postgresql",
            "queue_url": display_url(url),
            "workspace": self.settings.workspace,
            "lease": lease,
            "fleet": fleet,
            "spilled": None if spill is None else _or_none(spill.spilled),
        }

    def _count_drop(self, reason: str, essential: bool | None) -> None:
        with self._counts_guard:
            self._dropped[reason] += 1
        self._telemetry.event_dropped(reason, essential)

    def _oldest_age_or_none(self) -> float | None:
        try:
            age = self._oldest_age()
        except Exception:
            return None
        return None if age is None else round(age, 3)

    def _oldest_age(self) -> float | None:
        logged_at = self._wal.oldest_logged_at()
        return None if logged_at is None else max(0.0, time.time() - logged_at)


def _hold_dict(hold: Hold | None) -> dict[str, Any] | None:
    return None if hold is None else hold.to_dict()


def _or_none(read: Callable[[], int]) -> int | None:
    """A figure read from disk for status(), or None while the disk fails."""
    try:
        return read()
    except Exception:
        return None


def _reset_in_child(reference: weakref.ref[CustomerIOHandler]) -> None:
    # A lock copied while another thread of the parent held it would stay held here.
    handler = reference()
    if handler is not None:
        handler._counts_guard = threading.Lock()
