"""One contract for every store: what the committer, the sender, replay, the CLI and
status() rely on, run against the diskcache store, the PostgreSQL store and the
in-memory store alike (tests/unit uses the last for the sender's stages)."""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cio_logging.events import (
    Event,
    cio_delete,
    cio_event,
    cio_identify,
    cio_merge,
    event_from_record,
)
from cio_logging.store import (
    BatchQuery,
    DeadLetterArchive,
    DeadLetterStore,
    EventLog,
    LaterCall,
    WriteAheadLog,
    encode_row,
)
from cio_logging.store.rows import LANES, lane_of
from cio_logging.testing import InMemoryStore
from cio_logging.transport.pipelines import TEMPLATES as PIPELINES_TEMPLATES
from cio_logging.transport.pipelines import call_text
from cio_logging.transport.track import TEMPLATES as TRACK_TEMPLATES
from cio_logging.transport.track import item_text

from ..helpers import make_event

Stores = tuple[EventLog, DeadLetterArchive]


@pytest.fixture(
    params=[
        "local",
        "memory",
        pytest.param("postgres", marks=pytest.mark.postgres),
        # Every statement of the store once through a pooler in transaction mode.
        pytest.param("postgres-pgbouncer", marks=pytest.mark.postgres),
    ]
)
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stores]:
    """The queue and dead-letter archive of one implementation."""
    if request.param == "local":
        log: EventLog = WriteAheadLog(tmp_path / "wal")
        dead: DeadLetterArchive = DeadLetterStore(tmp_path / "dead")
        yield log, dead
        log.close()
        dead.close()
        return
    if request.param == "memory":
        memory = InMemoryStore()
        yield memory, memory.dead_letters
        return
    from cio_logging.store.postgres import Database, PostgresDeadLetters, PostgresLog

    # One database for the session's contract tests; a workspace of this test's own.
    if request.param == "postgres-pgbouncer":
        url = request.getfixturevalue("pg_bouncer").url()
    else:
        url = request.getfixturevalue("pg_cluster").url()
    database = Database(url)
    workspace = f"site-{uuid.uuid4().hex[:8]}@https://track.example"
    spill = WriteAheadLog(tmp_path / "spill")
    log = PostgresLog(database, workspace, spill)
    dead = PostgresDeadLetters(database, workspace, tmp_path)
    yield log, dead
    log.close()
    database.close()


def query(now: float | None = None, **changes: object) -> BatchQuery:
    """A batch query as the sender makes it, with ``changes``."""
    fields: dict[str, object] = {
        "now": time.time() if now is None else now,
        "limit": 1000,
        "budget": 500_000,
        "item_limit": 32_768,
    }
    fields.update(changes)
    return BatchQuery(**fields)  # type: ignore[arg-type]


def _call_for(person: str, number: int, call: str = "event") -> Event:
    """A call of ``person`` (number ``number`` in logging order)."""
    if call == "delete":
        extra = cio_delete(person)
    elif call == "merge":
        extra = cio_merge("primary", person)
    elif call == "identify":
        extra = cio_identify(person, n=number)
    else:
        extra = cio_event(person, n=number)
    record = logging.getLogger("t").makeRecord(
        "t", logging.INFO, "f.py", 1, f"step_{number}", (), None, extra=extra
    )
    event = event_from_record(record)
    assert event is not None
    return event


class TestEventSinkAndViewContract:
    """Append in commit order, look, and say whether a committed row still waits."""

    def test_an_id_already_queued_is_left_as_it_is(self, stores: Stores) -> None:
        log, _ = stores
        event = make_event()
        log.append_rows([encode_row(event)])
        log.append_rows([encode_row(event)])
        assert len(log) == 1
        assert event.id in log
        assert make_event(9).id not in log

    def test_append_rows_returns_a_position_that_flush_waits_on(self, stores: Stores) -> None:
        log, _ = stores
        position = log.append_rows([encode_row(make_event(n)) for n in range(3)])
        assert position > 0
        now = time.time()
        assert log.sendable_through(position, now, 600.0)
        batch = log.next_batch(query(), TRACK_TEMPLATES)
        log.acknowledge(batch.positions)
        assert not log.sendable_through(position, now, 600.0)
        assert len(log) == 0

    def test_acknowledge_counts_the_delivered(self, stores: Stores) -> None:
        """The accepted rows are counted as they go, in the same transaction; the
        dead-lettered ones are not (fleet mode keeps no such count: None)."""
        log, _ = stores
        log.append_rows([encode_row(make_event(n)) for n in range(3)])
        batch = log.next_batch(query(), TRACK_TEMPLATES)
        log.acknowledge(batch.positions[:2], delivered=2)
        log.acknowledge(batch.positions[2:])
        assert len(log) == 0
        fleet = type(log).__name__ == "PostgresLog"
        assert log.delivered_total() == (None if fleet else 2)

    def test_get_and_oldest(self, stores: Stores) -> None:
        log, _ = stores
        assert log.oldest_logged_at() is None
        events = [make_event(n) for n in range(2)]
        for event in events:
            log.append(event)
        got = log.get(events[1].id)
        assert got is not None
        assert got.event == events[1]
        assert log.get("01NOTTHERE0000000000000000") is None
        oldest = log.oldest_logged_at()
        assert oldest is not None
        assert math.isclose(oldest, events[0].logged_at)


class TestSenderQueueContract:
    """A batch per query, built by the store, in each person's order."""

    def test_a_lane_of_people_at_a_time(self, stores: Stores) -> None:
        """Calls of many people, interleaved: a batch of one lane takes only that lane's
        people (several calls each), so batches of different lanes, in flight
        together, never share a person; all lanes together are everyone."""
        log, _ = stores
        calls = [_call_for(f"p{n % 40}", n) for n in range(200)]
        log.append_rows([encode_row(call) for call in calls])
        seen: set[str] = set()
        for lane in range(LANES):
            batch = log.next_batch(query(lane=lane), TRACK_TEMPLATES)
            people = set(batch.people)
            assert all(lane_of(person) == lane for person in people)
            assert not people & seen
            seen |= people
            mine = [int(position) for position in batch.positions]
            assert mine == sorted(mine)
        assert seen == {call.person for call in calls}
        assert len({lane_of(call.person) for call in calls}) > LANES // 2  # spread over lanes

    def test_a_read_looks_past_a_scan_of_calls_waiting_for_a_retry(self, stores: Stores) -> None:
        """The first rows are all a person's, behind their first call's retry: the read
        looks on past them, a scan at a time."""
        log, _ = stores
        calls = [_call_for("late", n) for n in range(30)] + [_call_for("free", 30)]
        log.append_rows([encode_row(call) for call in calls])
        now = time.time()
        first = log.next_batch(query(now, limit=1), TRACK_TEMPLATES)
        log.schedule_retries(
            first.positions,
            count_attempt=True,
            delays=[60.0],
            now=now,
            error="HTTP 503",
            max_attempts=8,
        )
        batch = log.next_batch(query(now, limit=5, scan=10), TRACK_TEMPLATES)
        assert batch.ids == [calls[-1].id]

    def test_a_scan_of_busy_peoples_calls_only_ends_the_read(self, stores: Stores) -> None:
        """The first rows are all a busy person's: the read ends there (their answer will
        free them) instead of reading on through their backlog at every read."""
        log, _ = stores
        calls = [_call_for("busy", n) for n in range(30)] + [_call_for("free", 30)]
        log.append_rows([encode_row(call) for call in calls])
        busy = frozenset({"c:busy"})
        assert not log.next_batch(query(limit=5, scan=10, busy=busy), TRACK_TEMPLATES)
        assert log.next_batch(query(limit=5, scan=40, busy=busy), TRACK_TEMPLATES).ids == [
            calls[-1].id
        ]

    @pytest.mark.parametrize(
        ("templates", "render"),
        [(TRACK_TEMPLATES, item_text), (PIPELINES_TEMPLATES, call_text)],
        ids=["track", "pipelines"],
    )
    def test_a_batch_is_the_items_as_the_client_would_build_them(
        self, stores: Stores, templates: object, render: object
    ) -> None:
        log, _ = stores
        calls = [
            _call_for("ann", 0, "identify"),
            _call_for('b"ob\u00e9\n', 1),
            _call_for("ann", 2, "delete"),
        ]
        log.append_rows([encode_row(call) for call in calls])
        batch = log.next_batch(query(), templates)  # type: ignore[arg-type]
        expected = calls
        assert batch.ids == [call.id for call in expected]
        assert batch.items == [render(call) for call in expected]  # type: ignore[operator]
        assert batch.slow == []
        assert batch.people == [call.person for call in expected]
        assert [int(p) for p in batch.positions] == sorted(int(p) for p in batch.positions)
        assert batch.logged_at == pytest.approx([call.logged_at for call in expected])

    def test_a_call_without_a_template_is_left_to_python(self, stores: Stores) -> None:
        log, _ = stores
        anonymous = make_event(0)._replace(customer_id=None, anonymous_id="cookie-1")
        log.append_rows([encode_row(anonymous), encode_row(make_event(1))])
        batch = log.next_batch(query(), TRACK_TEMPLATES)  # Track batches carry no anonymous
        assert batch.slow == [0]
        assert batch.items[0] == ""
        events, corrupt = log.rows([batch.positions[0]])
        assert [queued.event for queued in events] == [anonymous]
        assert corrupt == []

    def test_limits_budget_and_the_item_limit(self, stores: Stores) -> None:
        log, _ = stores
        log.append_rows([encode_row(make_event(n)) for n in range(5)])
        assert len(log.next_batch(query(limit=2), TRACK_TEMPLATES)) == 2
        one = len(log.next_batch(query(limit=1), TRACK_TEMPLATES).items[0]) + 1
        cut = log.next_batch(query(budget=2 * one), TRACK_TEMPLATES)  # a store may keep
        assert 1 <= len(cut) <= 2  # the budget with an estimate of the items' size
        assert sum(len(item) + 1 for item in cut.items) <= 2 * one
        assert len(log.next_batch(query(budget=50 * one), TRACK_TEMPLATES)) == 5
        assert len(log.next_batch(query(budget=1), TRACK_TEMPLATES)) == 1  # the first always
        small = log.next_batch(query(item_limit=10), TRACK_TEMPLATES)
        assert small.slow == list(range(5))

    def test_a_busy_person_waits_and_others_go(self, stores: Stores) -> None:
        log, _ = stores
        ann, bob = _call_for("ann", 0), _call_for("bob", 1)
        log.append_rows([encode_row(ann), encode_row(bob)])
        batch = log.next_batch(query(busy=frozenset({"c:ann"})), TRACK_TEMPLATES)
        assert batch.ids == [bob.id]

    def test_a_retry_holds_back_its_persons_later_calls(self, stores: Stores) -> None:
        log, _ = stores
        identify = _call_for("ann", 0, "identify")
        ann_event, bob_event = _call_for("ann", 1), _call_for("bob", 2)
        log.append_rows([encode_row(call) for call in (identify, ann_event, bob_event)])
        now = time.time()
        first = log.next_batch(query(now, limit=1), TRACK_TEMPLATES)
        assert first.ids == [identify.id]
        exhausted = log.schedule_retries(
            first.positions,
            count_attempt=True,
            delays=[30.0],
            now=now,
            error="HTTP 503",
            max_attempts=8,
        )
        assert exhausted == []
        # Ann's event waits behind her identify's retry; Bob's goes.
        assert log.next_batch(query(now), TRACK_TEMPLATES).ids == [bob_event.id]
        assert log.next_due(now) == pytest.approx(now + 30)
        later = log.next_batch(query(now + 31), TRACK_TEMPLATES)
        assert later.ids == [identify.id, ann_event.id, bob_event.id]
        (retried,), _ = log.rows([later.positions[0]])
        assert (retried.attempts, retried.last_error) == (1, "HTTP 503")
        assert retried.first_failure_at == pytest.approx(now)

    def test_a_merge_goes_after_the_primarys_earlier_calls_and_before_later_ones(
        self, stores: Stores
    ) -> None:
        """A merge is the secondary's call: it waits until every earlier call of the
        primary left the queue, and the calls of both after it wait for it."""
        log, _ = stores
        identify = _call_for("primary", 0, "identify")
        before = _call_for("secondary", 1)
        merge = _call_for("secondary", 2, "merge")
        after, primary_after = _call_for("secondary", 3), _call_for("primary", 4)
        calls = (identify, before, merge, after, primary_after)
        log.append_rows([encode_row(call) for call in calls])
        now = time.time()
        first = log.next_batch(query(now), TRACK_TEMPLATES)
        assert first.ids == [identify.id, before.id]  # the merge waits for the identify
        assert log.next_batch(query(now, busy=frozenset({"c:primary"})), TRACK_TEMPLATES).ids == [
            before.id
        ]
        log.acknowledge(first.positions)
        second = log.next_batch(query(now), TRACK_TEMPLATES)
        assert second.ids == [merge.id]
        assert second.everyone() == {"c:secondary", "c:primary"}  # both busy while it flies
        log.acknowledge(second.positions)
        assert log.next_batch(query(now), TRACK_TEMPLATES).ids == [after.id, primary_after.id]

    def test_a_429_counts_no_attempt_and_attempts_run_out(self, stores: Stores) -> None:
        log, _ = stores
        event = make_event()
        log.append(event)
        positions = log.next_batch(query(), TRACK_TEMPLATES).positions
        log.schedule_retries(
            positions, count_attempt=False, delays=[5.0], now=1000.0, error="429", max_attempts=2
        )
        (queued,), _ = log.rows(positions)
        assert (queued.attempts, queued.last_error) == (0, "429")
        log.schedule_retries(
            positions, count_attempt=True, delays=[5.0], now=1000.0, error="503", max_attempts=2
        )
        exhausted = log.schedule_retries(
            positions, count_attempt=True, delays=[5.0], now=1000.0, error="503", max_attempts=2
        )
        assert [q.key for q in exhausted] == [event.id]  # left for the sender to dead-letter
        assert event.id in log

    def test_corrupt_rows_are_reported_not_decoded(self, stores: Stores) -> None:
        log, _ = stores
        log.append_rows([("01HZZZZZZZZZZZZZZZZZZZZZZZ", time.time(), "[2, not json", "c:x")])
        batch = log.next_batch(query(), TRACK_TEMPLATES)
        assert batch.slow == [0]
        events, corrupt = log.rows(batch.positions)
        assert events == []
        assert [entry.key for entry in corrupt] == ["01HZZZZZZZZZZZZZZZZZZZZZZZ"]
        log.acknowledge(batch.positions)
        assert len(log) == 0

    def test_requeued_rows_go_ahead_of_their_persons_calls(self, stores: Stores) -> None:
        log, _ = stores
        queued_call = _call_for("ann", 1)
        log.append(queued_call)
        replayed = _call_for("ann", 0, "identify")
        positions = log.requeue([encode_row(replayed, replayed_at=time.time())])
        assert len(positions) == 1
        assert log.queued_calls_of("c:ann") == 2
        batch = log.next_batch(query(), TRACK_TEMPLATES)
        assert batch.ids == [replayed.id, queued_call.id]

    def test_a_clock_stepped_back_moves_retries_back(self, stores: Stores) -> None:
        log, _ = stores
        log.append(make_event())
        now = time.time()
        positions = log.next_batch(query(now), TRACK_TEMPLATES).positions
        log.schedule_retries(
            positions, count_attempt=True, delays=[100.0], now=now, error="503", max_attempts=8
        )
        if type(log).__name__ != "PostgresLog":
            # Due times on this host's clock: moved back with it.
            assert log.adjust_due_times(-50.0, now - 50.0, 600.0) == 1
            assert log.next_due(now - 50.0) == pytest.approx(now + 50.0)
        else:
            # Due times on the database's clock: a step of a host's clock moves none
            # (the host's next reading of the database's clock takes the step in).
            assert log.adjust_due_times(-50.0, now - 50.0, 600.0) == 0
            assert log.next_due(now) == pytest.approx(now + 100.0, abs=0.05)


class TestDeadLetterContract:
    """Add, read, select, count, later calls and purge dead letters."""

    def test_add_get_select_count(self, stores: Stores) -> None:
        _, dead = stores
        events = [make_event(0, "purchase"), make_event(1, "signup"), make_event(2, "purchase")]
        for event in events:
            dead.add(event.id, event, status=400, error_type="invalid", message="bad", attempts=1)
        assert len(dead) == 3
        letter = dead.get(events[1].id)
        assert letter is not None
        assert letter.event_name == "signup"
        assert letter.status == 400
        # Oldest key first (ULIDs of one millisecond sort by their random part).
        assert [x.key for x in dead.select(event="purchase")] == sorted(
            [events[0].id, events[2].id]
        )
        assert dead.select(reason="nope") == []
        assert dead.count(by="event") == {"purchase": 2, "signup": 1}
        assert dead.count(by="reason") == {"invalid": 3}
        assert dead.count() == {"total": 3}
        assert [x.key for x in dead] == sorted(e.id for e in events)

    def test_a_second_failure_keeps_the_original_reason(self, stores: Stores) -> None:
        _, dead = stores
        event = make_event()
        dead.add(event.id, event, status=400, error_type="invalid", message="first", attempts=1)
        dead.add(event.id, event, status=None, error_type="expired", message="later", attempts=2)
        letter = dead.get(event.id)
        assert letter is not None
        assert letter.original is not None
        assert (letter.error_type, letter.original.message) == ("expired", "first")
        assert dead.select(reason="first")[0].key == event.id

    def test_later_calls_of_the_person_are_kept(self, stores: Stores) -> None:
        _, dead = stores
        event = _call_for("ann", 0, "identify")
        dead.add(event.id, event, status=400, error_type="invalid", message="bad", attempts=1)
        assert dead.people() == {"c:ann": [event.id]}
        delete = LaterCall("01HZZZZZZZZZZZZZZZZZZZZZZZ", "delete", "delete", 1.0, 2.0)
        dead.note_later_calls(event.id, [delete])
        dead.note_later_calls(event.id, [delete])  # the same call once
        letter = dead.get(event.id)
        assert letter is not None
        assert letter.later == (delete,)
        assert letter.later_count == 1
        assert letter.landed_after_a_delete

    def test_purge(self, stores: Stores) -> None:
        _, dead = stores
        events = [make_event(n) for n in range(3)]
        for event in events:
            dead.add(event.id, event, status=None, error_type="x", message="m", attempts=1)
        assert dead.purge(dead.select(keys=[events[0].id, events[1].id])) == 2
        assert [x.key for x in dead] == [events[2].id]
        assert dead.purge([]) == 0
