"""Which calls may go now, and in which requests: order, batching, sizes.

The store answers one query per batch (``SenderQueue.next_batch``): the calls that may
go, in commit order, none of a person with a request in flight or waiting behind a
retry, with their batch items built by the database. The planner only looks, in
Python, at the few calls the database could not build (``SendBatch.slow``): an
unreadable row, one old enough to be past ``max_event_age``, a call without a template
or one that must go alone (a Track event over 32 KB, an anonymous Track call). It then
cuts the batch into requests in order: a call that goes alone closes the batch before
it when its person has a call there, so a person's calls keep their order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..clock import WallClock
from ..config import Settings
from ..resilience import RetryPolicy
from ..store import BatchQuery, CorruptEntry, QueuedEvent, SendBatch, SenderQueue
from ..transport.base import DeliveryClient
from ..transport.batching import BATCH_BUDGET, MAX_ITEM_BYTES
from ..window import WINDOW_SECONDS


@dataclass(slots=True)
class Request:
    """One HTTP request of a batch: the batch's calls at ``indices``, as ``items`` (a
    batch request) or ``single`` (one call on its own route)."""

    indices: list[int]
    items: list[str] = field(default_factory=list)
    single: QueuedEvent | None = None


@dataclass(slots=True)
class Planned:
    """One batch read from the store, ready to send.

    ``requests`` go one after another, in order. ``corrupt`` and ``expired`` are the
    calls that must not go (dead-letter them); ``events``: the calls decoded in Python
    (by index), so a dead letter needs no second read.
    """

    batch: SendBatch
    requests: list[Request] = field(default_factory=list)
    events: dict[int, QueuedEvent] = field(default_factory=dict)
    corrupt: list[tuple[int, CorruptEntry]] = field(default_factory=list)
    expired: list[tuple[int, QueuedEvent]] = field(default_factory=list)
    #: Calls stamped past Customer.io's 72-hour window, and the earliest stamp of them.
    late: int = 0
    oldest: float | None = None

    @property
    def people(self) -> set[str]:
        return self.batch.everyone()

    @property
    def sendable(self) -> int:
        return sum(len(request.indices) for request in self.requests)


class Planner:
    """Reads the next batch and plans its requests."""

    def __init__(
        self,
        settings: Settings,
        queue: SenderQueue,
        client: DeliveryClient,
        *,
        retry: RetryPolicy,
        clock: WallClock,
    ) -> None:
        self._settings = settings
        self._queue = queue
        self._client = client
        self._retry = retry
        self._clock = clock
        self._essential = settings.essential_events

    def next(
        self,
        busy: set[str] | None = None,
        *,
        probe: bool = False,
        lane: int | None = None,
    ) -> Planned | None:
        """The next batch that may go now, of the people of ``lane`` (everyone's when
        None), none of them ``busy``; one call when it is the breaker's probe. None
        when nothing may go."""
        now = self._clock()
        query = BatchQuery(
            now=now,
            limit=1 if probe else self._settings.batch_size,
            lane=lane,
            budget=BATCH_BUDGET,
            item_limit=MAX_ITEM_BYTES,
            busy=frozenset(busy or ()),
            # Younger than this cannot be past max_event_age; older is checked exactly.
            expire_before=now - self._retry.max_event_age,
            essential=self._essential,
            late_before=now - WINDOW_SECONDS,
        )
        batch = self._queue.next_batch(query, self._client.templates)
        if not batch:
            return None
        planned = Planned(batch, late=batch.late, oldest=batch.oldest)
        if batch.slow:
            self._look_at_slow(planned, now)
        planned.requests = self._requests(planned)
        return planned

    def _look_at_slow(self, planned: Planned, now: float) -> None:
        batch = planned.batch
        positions = [batch.positions[index] for index in batch.slow]
        events, corrupt = self._queue.rows(positions)
        index_of = {batch.positions[index]: index for index in batch.slow}
        for entry in corrupt:
            planned.corrupt.append((index_of[str(entry.position)], entry))
        for queued in events:
            index = index_of[str(queued.position)]
            # Fleet mode: logged_at_here is on the database's clock, moved to this host's
            # (a host whose clock is off ages nothing).
            logged_at = queued.logged_at_here or queued.event.logged_at
            since = max(logged_at, queued.replayed_at or 0.0)
            uncounted = self._clock.uncounted_since(since)
            if self._retry.expired(since, now, uncounted=uncounted):
                planned.expired.append((index, queued))
            else:
                planned.events[index] = queued
                stamp = queued.event.timestamp
                if stamp < now - WINDOW_SECONDS:
                    planned.late += 1
                    planned.oldest = stamp if planned.oldest is None else min(planned.oldest, stamp)

    def _requests(self, planned: Planned) -> list[Request]:
        """The batch cut into requests in order, around the calls that go alone.

        A call that goes alone closes the batch being filled first when its person
        has a call there (so it goes after it); the person's later calls go in the
        next batch (after it). Other people's calls are not held up.
        """
        batch = planned.batch
        if not planned.events and not planned.corrupt and not planned.expired:
            return [Request(list(range(len(batch))), batch.items)]
        ruled_out = {index for index, _ in planned.corrupt}
        ruled_out.update(index for index, _ in planned.expired)
        built = dict(
            zip(planned.events, self._client.items(list(planned.events.values())), strict=True)
        )
        requests: list[Request] = []
        current = Request([])
        people: set[str] = set()
        used = 0
        for index in range(len(batch)):
            if index in ruled_out:
                continue
            person = batch.people[index]
            entry = built.get(index)
            if isinstance(entry, QueuedEvent):  # a route of its own
                if person in people:
                    requests.append(current)
                    current, people, used = Request([]), set(), 0
                requests.append(Request([index], single=entry))
                continue
            text = batch.items[index] if entry is None else entry.wire
            size = len(text.encode("utf-8")) if entry is None else entry.size
            too_many = len(current.indices) >= self._settings.batch_size
            if current.indices and (used + size + 1 > BATCH_BUDGET or too_many):
                requests.append(current)
                current, people, used = Request([]), set(), 0
            current.indices.append(index)
            current.items.append(text)
            people.add(person)
            used += size + 1
        if current.indices:
            requests.append(current)
        return requests
