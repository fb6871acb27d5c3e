"""The one place that writes decisions into the stores.

An exchange's :class:`~cio_logging.sender.exchange.Result` says what happened to each
call of a batch; :class:`Effects` makes it so, per batch: dead letters first (a crash
in between leaves a call in both stores, never in neither), then one acknowledgement
statement for every call that left the queue, one statement for the retries (the
store returns the calls that reached ``max_attempts``, which become dead letters), the
holds (Retry-After, the credentials pause), the counters, the metrics and the log
lines an operator needs, at most once a minute each.

It also keeps the record a replay needs: the later calls of a person who has a dead
letter, delivered after it (so ``dlq replay`` can say what a replayed call would land
behind, and refuse to land one after a delete of its person).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ..config import Settings
from ..errors import LeaseLostError
from ..events import DELETE
from ..resilience import RequestRateCap, RetryPolicy
from ..store import (
    DeadLetterHistory,
    DeadLetterReason,
    DeadLetterWriter,
    LaterCall,
    QueuedEvent,
    ReplayRecord,
    SenderQueue,
)
from ..store.rows import LATER_KEPT
from ..telemetry import Telemetry
from .exchange import Result
from .outcome import Reason
from .plan import Planned
from .state import AUTH_PAUSE, CONFIG_PAUSE, RETRY_AFTER, DeliveryStats, Holds

internal_log = logging.getLogger("cio_logging")

# Repeat the same delivery error at most this often.
ERROR_REPEAT_SECONDS = 60.0


class Effects:
    """Applies results to the queue, the dead letters, the holds and the counters."""

    def __init__(
        self,
        settings: Settings,
        queue: SenderQueue,
        dead_letters: DeadLetterWriter,
        *,
        retry: RetryPolicy,
        holds: Holds,
        rate_cap: RequestRateCap,
        stats: DeliveryStats,
        clock: Callable[[], float],
        telemetry: Telemetry | None = None,
    ) -> None:
        self._settings = settings
        self._queue = queue
        self._dead_letters = dead_letters
        self._retry = retry
        self._holds = holds
        self._rate_cap = rate_cap
        self.stats = stats
        self._clock = clock
        self._telemetry = telemetry
        self._last_reported: tuple[str, float] | None = None
        self._uncertain_reported_at = float("-inf")
        # The people who have dead letters, and the ids of those (see note_later).
        self._dead_people: dict[str, list[str]] | None = None
        # Entries that hold their first later calls already: noted again for a delete only.
        self._later_full: set[str] = set()
        # Calls settled (accepted, or dead-lettered) whose rows the queue could not take
        # out, with how many of them were delivered: a full disk fails the delete too.
        # Nothing more is sent until they are out, so a full disk never sends one twice.
        self._unremoved: list[tuple[list[str | int], int]] = []
        self._unremoved_guard = threading.Lock()  # the thread, and flush at exit
        self._unremoved_reported_at = float("-inf")

    # -- before sending: what may not go ----------------------------------------------

    def set_aside(self, planned: Planned) -> None:
        """Dead-letter a batch's unreadable and expired calls before it goes."""
        if not planned.corrupt and not planned.expired:
            return
        batch = planned.batch
        for index, entry in planned.corrupt:
            self._dead_letter(batch.ids[index], None, Reason("corrupt_entry", None, entry.reason))
            internal_log.error(
                "a queue entry could not be read and was moved to the dead-letter store: %s",
                entry.reason,
            )
        for _, queued in planned.expired:
            age = self._settings.max_event_age
            self._dead_letter(
                queued.key,
                queued,
                Reason(
                    "expired", None, f"older than max_event_age ({age:g} s) before it could be sent"
                ),
            )
        self._queue.acknowledge(
            [batch.positions[index] for index, _ in planned.corrupt]
            + [batch.positions[index] for index, _ in planned.expired]
        )

    def set_aside_corrupt(self, entries: Sequence[Any]) -> None:
        """Dead-letter rows refused as not ours (an earlier version's table)."""
        for entry in entries:
            self._dead_letter(entry.key, None, Reason("corrupt_entry", None, entry.reason))
            internal_log.error(
                "a queue entry could not be read and was moved to the dead-letter store: %s",
                entry.reason,
            )

    # -- after the answers --------------------------------------------------------------

    def apply(self, result: Result, *, probe: bool = False) -> None:
        """Write one batch's outcome; everything that left the queue in one statement."""
        planned = result.planned
        batch = planned.batch
        now = self._clock()
        # Read before the rows go; written after: the dead letters and the one
        # acknowledgement follow each other with nothing in between (a sender stopped
        # there, a SIGSTOP past its lease, leaves the least for the next one to redo).
        gone: list[str | int] = [batch.positions[index] for index in result.delivered]
        try:
            later = self._later_calls(planned, result.delivered, result.refused, now)
            refused = self._refused(result, now)
        except BaseException:
            # The dead letters could not be written (their store is on the same full
            # disk): the refused calls stay queued, to be refused again, but the
            # accepted ones must go, or the next turn sends them again.
            self._settle(gone, len(result.delivered))
            raise
        gone += [batch.positions[index] for index, _ in result.refused]
        self._settle(gone, len(result.delivered))
        for key, calls in later.items():
            with contextlib.suppress(LeaseLostError):  # advisory; the loop sees the loss
                if self._dead_letters.note_later_calls(key, calls) >= LATER_KEPT:
                    self._later_full.add(key)
        self.stats.delivered += len(result.delivered)
        self.stats.dead_lettered += refused
        self.stats.requests += result.requests
        self.stats.failed_requests += result.failed_requests
        if result.delivered:
            self._count_delivered(planned, result.delivered, now)
            if self.stats.delivery_paused:
                internal_log.warning("Customer.io accepts events again; delivery resumed")
                self.stats.delivery_paused = None
                self._holds.release(AUTH_PAUSE, CONFIG_PAUSE)
        if result.uncertain:
            self._uncertain(result.uncertain)
        if result.retry_decision is not None:
            self._retries(result, now)
        if result.pause is not None:
            self._paused(result)

    def _refused(self, result: Result, now: float) -> int:
        """Dead-letter the calls found at fault; how many."""
        if not result.refused:
            return 0
        planned, batch = result.planned, result.planned.batch
        missing = [index for index, _ in result.refused if index not in planned.events]
        if missing:
            events, _ = self._queue.rows([batch.positions[index] for index in missing])
            by_position = {str(queued.position): queued for queued in events}
            for index in missing:
                found = by_position.get(batch.positions[index])
                if found is not None:
                    planned.events[index] = found
        for index, reason in result.refused:
            self._dead_letter(batch.ids[index], planned.events.get(index), reason, count=False)
        return len(result.refused)

    def _retries(self, result: Result, now: float) -> None:
        decision = result.retry_decision
        assert decision is not None
        reason = decision.reason
        self._report_failure(reason)
        batch = result.planned.batch
        hold = None if decision.hold is None else min(decision.hold, self._settings.max_retry_after)
        if hold:
            # Customer.io asked every client to wait, not just these calls: this
            # sender, and this process's other handlers on the workspace.
            self._holds.hold(RETRY_AFTER, hold, f"Customer.io asked for a pause: {reason.message}")
            self._rate_cap.hold(hold)
        exhausted = self._queue.schedule_retries(
            [batch.positions[index] for index in result.retry],
            count_attempt=decision.count_attempt,
            delays=self._retry.delays(hold),
            now=now,
            error=reason.message,
            max_attempts=self._retry.max_attempts,
        )
        for queued in exhausted:
            attempts = queued.attempts + 1
            self._dead_letter(
                queued.key,
                queued,
                Reason(
                    "max_attempts",
                    reason.status,
                    f"gave up after {attempts} attempts; last: {reason.message}",
                ),
                attempts=attempts,
                count=False,
            )
        if exhausted:
            self._queue.acknowledge([queued.position for queued in exhausted])
            self.stats.dead_lettered += len(exhausted)
        scheduled = len(result.retry) - len(exhausted)
        self.stats.retries_scheduled += scheduled
        if self._telemetry is not None and scheduled:
            essential = result.planned.batch.essential
            flags = [essential[index] for index in result.retry]
            for kind in (True, False):
                for _ in range(flags.count(kind)):
                    self._telemetry.event_retried(kind)
        self._log_failure(
            reason,
            logging.WARNING,
            "Customer.io delivery failed (%s); %s event(s) wait on disk and will be retried",
        )

    def _paused(self, result: Result) -> None:
        pause = result.pause
        assert pause is not None
        reason = pause.reason
        self._report_failure(reason)
        interval = self._settings.auth_retry_interval
        kind = AUTH_PAUSE if pause.kind == "auth" else CONFIG_PAUSE
        self._holds.hold(kind, interval, reason.message)
        self.stats.delivery_paused = reason.message
        self._log_failure(
            reason,
            logging.ERROR,
            (
                "Customer.io refused the credentials (%s): delivery is paused and "
                "%s event(s) wait on disk; check CUSTOMERIO_SITE_ID and "
                "CUSTOMERIO_API_KEY. Retrying every %g s."
            )
            if kind == AUTH_PAUSE
            else (
                "TLS verification failed (%s): delivery is paused and %s event(s) "
                "wait on disk; check ca_bundle and any proxy. Retrying every %g s."
            ),
            interval,
        )

    def _report_failure(self, reason: Reason) -> None:
        # The error first, then the counters: a status() reader never sees a failure
        # counted without its reason.
        self.stats.last_error = reason.message
        self.stats.last_error_at = self._clock()

    def _uncertain(self, count: int) -> None:
        self.stats.uncertain += count
        moment = time.monotonic()
        if moment - self._uncertain_reported_at >= ERROR_REPEAT_SECONDS:
            self._uncertain_reported_at = moment
            internal_log.warning(
                "Customer.io answered 207 with %d error(s) that name no call of the request; "
                "it accepted the request, so nothing was resent or dead-lettered, but those "
                "calls may have been refused unseen (%d so far: status()['uncertain'])",
                count,
                self.stats.uncertain,
            )

    def _log_failure(self, reason: Reason, level: int, message: str, *extra: object) -> None:
        moment = time.monotonic()  # a wall-clock step must not silence a repeat for as long
        previous = self._last_reported
        repeated = previous is not None and previous[0] == reason.message
        if repeated and previous is not None and moment - previous[1] < ERROR_REPEAT_SECONDS:
            return
        self._last_reported = (reason.message, moment)
        internal_log.log(level, message, reason.message, _waiting(self._queue), *extra)

    # -- dead letters ----------------------------------------------------------------------

    def _dead_letter(
        self,
        key: str,
        queued: QueuedEvent | None,
        reason: Reason,
        *,
        attempts: int | None = None,
        count: bool = True,
    ) -> None:
        now = self._clock()
        tries = attempts if attempts is not None else (queued.attempts + 1 if queued else 1)
        first_failure_at = queued.first_failure_at if queued else None
        history: dict[str, Any] = {}
        if queued is not None and queued.replayed_at is not None:
            # Replayed from the dead-letter store and failed again: it goes back with
            # its first reason and its earlier replays, plus this one.
            earlier = queued.dead_letter or _history_lost_by_an_earlier_version(queued)
            latest = DeadLetterReason(reason.error_type, reason.status, reason.message, now)
            history = {
                "original": earlier.original,
                "replays": [*earlier.replays, ReplayRecord.came_back(queued.replayed_at, latest)],
                "replay_count": earlier.replay_count + 1,
            }
            tries += earlier.attempts
            first_failure_at = earlier.first_failure_at or first_failure_at
        event = None if queued is None else queued.event
        self._dead_letters.add(
            key,
            event,
            status=reason.status,
            error_type=reason.error_type,
            message=reason.message,
            attempts=tries,
            first_failure_at=first_failure_at,
            now=now,
            **history,
        )
        if count:
            self.stats.dead_lettered += 1
        if event is not None and self._dead_people is not None:
            self._dead_people.setdefault(event.person, []).append(key)
        if self._telemetry is not None:
            essential = (
                None if event is None else event.is_essential(self._settings.essential_events)
            )
            self._telemetry.event_dead_lettered(reason.error_type, essential)
        internal_log.warning(
            "event %s (%s) moved to the dead-letter store: %s",
            key,
            event.name if event else "unreadable",
            reason.message,
        )

    @property
    def rows_left_behind(self) -> bool:
        """Whether settled calls are still in the queue (their rows could not be taken
        out): asked before every batch, so a flag, not a count."""
        return bool(self._unremoved)  # one read of the list: no lock needed

    def _settle(self, positions: list[str | int], delivered: int) -> None:
        if positions:
            with self._unremoved_guard:
                self._unremoved.append((positions, delivered))
            self.remove_settled()

    def remove_settled(self) -> bool:
        """Take out the rows of settled calls; whether none is left in the queue.

        A failure (a full disk, a locked file, the database away) keeps them here, said
        at most once a minute, to be tried again before anything more is sent: sent
        again, they would reach Customer.io twice. A lost lease is raised (the next
        sender owns the rows)."""
        with self._unremoved_guard:
            while self._unremoved:
                positions, delivered = self._unremoved[0]
                try:
                    self._queue.acknowledge(positions, delivered=delivered)
                except LeaseLostError:
                    self._unremoved.clear()
                    raise
                except Exception as exc:
                    self._report_unremoved(exc)
                    return False
                del self._unremoved[0]
            return True

    def _report_unremoved(self, error: Exception) -> None:
        now = time.monotonic()
        if now - self._unremoved_reported_at >= ERROR_REPEAT_SECONDS:
            self._unremoved_reported_at = now
            internal_log.error(
                "the queue cannot take out %d call(s) already sent or dead-lettered "
                "(%s: %s); nothing more is sent until it can, so that none is sent twice",
                sum(len(positions) for positions, _ in self._unremoved),
                type(error).__name__,
                error,
            )

    def forget_unremoved(self) -> None:
        """A new lease: the rows are the last sender's business, sent again at worst."""
        with self._unremoved_guard:
            self._unremoved.clear()

    def forget_dead_people(self) -> None:
        """Read the dead letters' people again at the next batch (a new sender)."""
        self._dead_people = None

    def _later_calls(
        self,
        planned: Planned,
        delivered: list[int],
        refused: list[tuple[int, Reason]],
        now: float,
    ) -> dict[str, list[LaterCall]]:
        """For each dead letter whose person had calls delivered in this batch after it,
        those calls (to note; none for an entry that holds its first ones, bar a delete)."""
        if not delivered:
            return {}
        if self._dead_people is None:
            try:
                self._dead_people = self._dead_letters.people()
            except Exception:  # the record is advisory; retried next batch
                internal_log.debug("dead letters' people not read", exc_info=True)
                return {}
        batch = planned.batch
        people = self._dead_people
        if refused:  # dead-lettered in this very batch: theirs count from here on
            people = {person: list(keys) for person, keys in people.items()}
            for index, _ in refused:
                keys = people.setdefault(batch.people[index], [])
                if batch.ids[index] not in keys:
                    keys.append(batch.ids[index])
        mine = people.keys() & set(batch.people) if people else set()
        if not mine:
            return {}
        chosen = [index for index in delivered if batch.people[index] in mine]
        events, _ = self._queue.rows([batch.positions[index] for index in chosen])
        index_of = {batch.positions[index]: index for index in chosen}
        # Dead-lettered in this very batch: only the calls after it are later ones.
        refused_at = {batch.ids[index]: index for index, _ in refused}
        # One write per entry and batch, and none for an entry that holds its first
        # calls already (bar a delete): a person with many dead letters and many calls
        # costs no more writes than one with a few.
        noted: dict[str, list[LaterCall]] = {}
        for queued in sorted(events, key=lambda q: q.position):
            event, index = queued.event, index_of[str(queued.position)]
            call = LaterCall(queued.key, event.call, event.name, event.logged_at, now)
            for key in people.get(event.person, ()):
                if refused_at.get(key, -1) >= index:
                    continue
                if key in self._later_full and event.call != DELETE:
                    continue
                noted.setdefault(key, []).append(call)
        return noted

    def _count_delivered(self, planned: Planned, delivered: list[int], now: float) -> None:
        if self._telemetry is None:
            return
        batch = planned.batch
        pairs: Iterable[tuple[float, bool]]
        if len(delivered) == len(batch):
            pairs = zip(batch.logged_at, batch.essential, strict=True)
        else:
            pairs = ((batch.logged_at[i], batch.essential[i]) for i in delivered)
        self._telemetry.events_delivered(pairs, now)


def _waiting(queue: SenderQueue) -> str:
    try:
        return str(len(queue))
    except Exception:  # a figure for a log line
        return "some"


def _history_lost_by_an_earlier_version(queued: QueuedEvent) -> DeadLetterHistory:
    # A row replayed by a version that did not carry the entry's history: its first
    # reason is unknown, and saying so beats passing off this failure as the first.
    replayed_at = queued.replayed_at or queued.event.logged_at
    lost = "replayed by an earlier version, which did not keep the reason"
    return DeadLetterHistory(DeadLetterReason("unknown", None, lost, replayed_at), (), 0, 0.0, 0)
