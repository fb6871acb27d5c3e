"""One contract for both stores: what the committer, the worker, replay, the CLI and
status() rely on, run against the diskcache store and the PostgreSQL store alike."""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cio_logging.events import Event, cio_event, cio_identify, event_from_record
from cio_logging.store import (
    DeadLetterArchive,
    DeadLetterStore,
    EventLog,
    WriteAheadLog,
    encode_row,
)

from ..helpers import make_event

Stores = tuple[EventLog, DeadLetterArchive]


@pytest.fixture(
    params=[
        "local",
        pytest.param("postgres", marks=pytest.mark.postgres),
        # Every statement of the store once through a pooler in transaction mode.
        pytest.param("postgres-pgbouncer", marks=pytest.mark.postgres),
    ]
)
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stores]:
    """The event log and dead-letter archive of one implementation."""
    if request.param == "local":
        log: EventLog = WriteAheadLog(tmp_path / "wal")
        dead: DeadLetterArchive = DeadLetterStore(tmp_path / "dead")
        yield log, dead
        log.close()
        dead.close()
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


class TestEventLogContract:
    """Append, read what is due in order, acknowledge, record failures."""

    def test_append_read_remove_in_logging_order(self, stores: Stores) -> None:
        log, _ = stores
        events = [make_event(n) for n in range(5)]
        for event in events:
            log.append(event)
        assert [q.event for q in log.read_due(10).events] == events
        log.remove([events[0].id, events[2].id])
        assert [q.key for q in log.read_due(10).events] == [events[i].id for i in (1, 3, 4)]
        assert len(log) == 3
        assert events[1].id in log
        assert events[0].id not in log

    def test_an_id_already_queued_is_left_as_it_is(self, stores: Stores) -> None:
        log, _ = stores
        event = make_event()
        log.append_rows([encode_row(event)])
        log.append_rows([encode_row(event)])
        assert len(log) == 1

    def test_append_rows_returns_a_position_that_flush_waits_on(self, stores: Stores) -> None:
        log, _ = stores
        position = log.append_rows([encode_row(make_event(n)) for n in range(3)])
        assert position > 0
        now = time.time()
        assert log.sendable_through(position, now, 600.0)
        log.remove([q.key for q in log.read_due(10).events])
        assert not log.sendable_through(position, now, 600.0)

    def test_limit_and_cursor_read_past_what_is_in_flight(self, stores: Stores) -> None:
        log, _ = stores
        events = [make_event(n) for n in range(5)]
        log.append_rows([encode_row(event) for event in events])
        first = log.read_due(2)
        assert [q.key for q in first.events] == [e.id for e in events[:2]]
        second = log.read_due(10, after=first.cursor)
        assert [q.key for q in second.events] == [e.id for e in events[2:]]
        assert log.read_due(10, after=second.cursor).events == []

    def test_failures_count_attempts_and_delay(self, stores: Stores) -> None:
        log, _ = stores
        log.append(make_event())
        queued = log.read_due(10).events[0]
        log.record_failure([(queued, 2_000.0)], "HTTP 503", now=1_000.0)
        assert log.read_due(10, now=1_500.0).events == []
        again = log.read_due(10, now=2_000.0).events[0]
        assert (again.attempts, again.last_error, again.first_failure_at) == (1, "HTTP 503", 1000.0)
        log.record_failure([(again, 3_000.0)], "HTTP 429", now=2_000.0, count_attempt=False)
        third = log.read_due(10, now=3_000.0).events[0]
        assert (third.attempts, third.last_error, third.first_failure_at) == (1, "HTTP 429", 1000.0)
        assert third.next_attempt_at == 3_000.0

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

    def test_a_clock_stepped_back_moves_retries_back(self, stores: Stores) -> None:
        log, _ = stores
        log.append(make_event())
        queued = log.read_due(10).events[0]
        now = time.time()
        log.record_failure([(queued, now + 100.0)], "HTTP 503", now=now)
        if isinstance(log, WriteAheadLog):
            # Due times on this host's clock: moved back with it.
            assert log.adjust_due_times(-50.0, now - 50.0, 600.0) == 1
            moved = log.read_due(10, now=now + 60.0).events[0]
            assert math.isclose(moved.next_attempt_at, now + 50.0)
        else:
            # Due times on the database's clock: a step of a host's clock moves none
            # (the host's next reading of the database's clock takes the step in).
            assert log.adjust_due_times(-50.0, now - 50.0, 600.0) == 0
            assert log.read_due(10, now=now + 60.0).events == []
            later = log.read_due(10, now=now + 100.0).events[0]
            assert abs(later.next_attempt_at - (now + 100.0)) < 0.01


def _call_for(person: str, number: int, call: str = "event") -> Event:
    """A call of ``person`` (number ``number`` in logging order)."""
    tagged = {"event": cio_event, "identify": cio_identify}[call]
    record = logging.getLogger("t").makeRecord(
        "t", logging.INFO, "f.py", 1, f"step_{number}", (), None, extra=tagged(person, n=number)
    )
    event = event_from_record(record)
    assert event is not None
    return event


class TestPersonOrderContract:
    """What the sender keeps a person's calls in order by: positions in commit order,
    and every waiting row of given people up to a position."""

    def test_positions_follow_commit_order_whatever_the_due_times(self, stores: Stores) -> None:
        log, _ = stores
        identify = _call_for("ann", 0, "identify")
        ann_event, bob_event = _call_for("ann", 1), _call_for("bob", 2)
        for call in (identify, ann_event, bob_event):
            log.append(call)
        now = time.time()
        (first,) = log.read_due(1, now).events
        assert first.key == identify.id
        assert first.event.call == "identify"
        log.record_failure([(first, now + 30)], "HTTP 503", now)
        due = log.read_due(10, now).events  # the retry is not due: Ann's event is read
        assert [q.key for q in due] == [ann_event.id, bob_event.id]
        assert 0 < first.position < due[0].position < due[1].position
        # ... and the sender sees the identify before it, still waiting.
        through = due[1].position

        def rows(people: set[str], upto: int) -> list[tuple[str, int]]:
            return [(person, position) for person, position, _, _ in log.earlier_rows(people, upto)]

        assert rows({"c:ann"}, through) == [("c:ann", first.position), ("c:ann", due[0].position)]
        listed = log.earlier_rows({"c:ann"}, through)
        assert [key for *_, key in listed] == [identify.id, ann_event.id]
        assert listed[0][2] == pytest.approx(now + 30)  # its due time: not yet
        assert rows({"c:ann", "c:bob"}, due[0].position) == [
            ("c:ann", first.position),
            ("c:ann", due[0].position),
        ]
        assert rows(set(), through) == []
        assert log.person_counts({"c:ann", "c:bob", "c:nobody"}, through) == {
            "c:ann": 2,
            "c:bob": 1,
        }
        assert log.get(identify.id).position == first.position  # type: ignore[union-attr]
        log.remove([identify.id])
        assert rows({"c:ann"}, through) == [("c:ann", due[0].position)]

    def test_person_calls_keep_their_call_type(self, stores: Stores) -> None:
        log, _ = stores
        identify = _call_for("dee", 0, "identify")
        log.append(identify)
        (queued,) = log.read_due(1).events
        assert queued.event == identify
        assert queued.event.call == "identify"
        assert queued.event.name == "identify"


class TestDeadLetterContract:
    """Add, read, select, count, replay and purge dead letters."""

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

    def test_replay_moves_entries_back_with_their_history(self, stores: Stores) -> None:
        log, dead = stores
        event = make_event()
        dead.add(event.id, event, status=400, error_type="invalid", message="first", attempts=3)
        assert dead.replay(dead.select(), log) == 1
        assert len(dead) == 0
        queued = log.get(event.id)
        assert queued is not None
        assert queued.replayed_at is not None
        assert queued.dead_letter is not None
        assert queued.dead_letter.original.message == "first"

    def test_purge(self, stores: Stores) -> None:
        _, dead = stores
        events = [make_event(n) for n in range(3)]
        for event in events:
            dead.add(event.id, event, status=None, error_type="x", message="m", attempts=1)
        assert dead.purge(dead.select(keys=[events[0].id, events[1].id])) == 2
        assert [x.key for x in dead] == [events[2].id]
        assert dead.purge([]) == 0
