"""The sender's plan, exchange and effects on the in-memory store, with a scripted client
and a fake clock: no HTTP, no sleeping, no thread."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from cio_logging.clock import WallClock
from cio_logging.config import Settings, resolve_settings
from cio_logging.events import Event, cio_delete, cio_event, cio_identify, event_from_record
from cio_logging.resilience import CLOSED, OPEN, DeliveryBreaker, RequestRateCap, RetryPolicy
from cio_logging.sender.effects import Effects
from cio_logging.sender.exchange import Result, exchange
from cio_logging.sender.outcome import Answer
from cio_logging.sender.plan import Planner
from cio_logging.sender.state import AUTH_PAUSE, RETRY_AFTER, DeliveryStats, Holds
from cio_logging.store import QueuedEvent, encode_row
from cio_logging.testing import InMemoryStore
from cio_logging.transport.batching import Item
from cio_logging.transport.track import TEMPLATES, TrackClient
from cio_logging.window import WindowWatch

NOW = 1_800_000_000.0


class FakeClock:
    """Wall and steady time that move only when told."""

    def __init__(self) -> None:
        self.now = NOW

    def wall(self) -> float:
        return self.now

    def steady(self) -> float:
        return self.now - NOW


class ScriptedClient:
    """A client that answers from ``answer(items)``; records every request."""

    batch_route = "v2_batch"
    templates = TEMPLATES

    def __init__(self, answer: Callable[[Sequence[str]], Answer]) -> None:
        self.answer = answer
        self.sent: list[list[str]] = []
        self.singles: list[QueuedEvent] = []
        self.window = WindowWatch()

    def items(self, events: Sequence[QueuedEvent]) -> list[Item | QueuedEvent]:
        return TrackClient.items(self, events)  # type: ignore[arg-type]  # uses no state

    def post_batch(self, items: Sequence[str]) -> Answer:
        self.sent.append(list(items))
        return self.answer(items)

    def post_single(self, queued: QueuedEvent) -> Answer:
        self.singles.append(queued)
        return Answer(200)

    def close(self) -> None:
        """Nothing to close."""


def accept_all(items: Sequence[str]) -> Answer:
    return Answer(200)


def refuse_bad(items: Sequence[str]) -> Answer:
    """A 400 for any request holding a call named "bad" (bisection finds it)."""
    if any('"name":"bad"' in item for item in items):
        return Answer(400, "http_400", "HTTP 400: Bad Request")
    return Answer(200)


def settings(tmp_path: Path, **options: object) -> Settings:
    return resolve_settings(
        "site",
        "key-123456",
        region=None,
        queue_dir=tmp_path / "queue",
        track_url="https://127.0.0.1:9",
        ca_bundle=None,
        options={"batch_size": 1000, "max_attempts": 3, **options},
        environ={},
    )


class Stages:
    """A planner, a breaker and the effects on one in-memory store."""

    def __init__(self, tmp_path: Path, client: ScriptedClient, **options: object) -> None:
        self.settings = settings(tmp_path, **options)
        self.store = InMemoryStore()
        self.fake = FakeClock()
        self.clock = WallClock(wall=self.fake.wall, steady=self.fake.steady)
        self.client = client
        self.retry = RetryPolicy.from_settings(self.settings)
        self.breaker = DeliveryBreaker.from_settings(self.settings)
        self.cap = RequestRateCap(100)
        self.holds = Holds(
            breaker_wait=self.breaker.seconds_until_probe, shared_wait=self.cap.seconds_on_hold
        )
        self.stats = DeliveryStats()
        self.planner = Planner(
            self.settings, self.store, client, retry=self.retry, clock=self.clock
        )
        self.effects = Effects(
            self.settings,
            self.store,
            self.store,
            retry=self.retry,
            holds=self.holds,
            rate_cap=self.cap,
            stats=self.stats,
            clock=self.clock,
        )

    def log(self, *events: Event) -> None:
        self.store.append_rows([encode_row(event) for event in events])

    def turn(self, busy: set[str] | None = None) -> Result | None:
        """One batch: plan, send, apply; None when nothing may go."""
        probe = self.breaker.state != CLOSED
        planned = self.planner.next(busy or set(), probe=probe)
        if planned is None:
            return None
        self.effects.set_aside(planned)
        result = exchange(planned, self.client, self.breaker, probe=probe)
        self.effects.apply(result, probe=probe)
        return result


def call(person: str, number: int, kind: str = "event", *, name: str = "step") -> Event:
    extra = {"event": cio_event, "identify": cio_identify}.get(kind)
    tag = cio_delete(person) if kind == "delete" else extra(person, n=number)  # type: ignore[misc]
    record = logging.getLogger("t").makeRecord(
        "t", logging.INFO, "f.py", 1, name, (), None, extra=tag
    )
    record.created = NOW - 100 + number
    event = event_from_record(record)
    assert event is not None
    return event


def names(items: Sequence[str]) -> list[str]:
    return [json.loads(item).get("name", json.loads(item)["action"]) for item in items]


class TestPlan:
    """Which calls may go now, in what requests."""

    def test_a_batch_is_every_due_call_in_commit_order(self, tmp_path: Path) -> None:
        stages = Stages(tmp_path, ScriptedClient(accept_all))
        calls = [call("ann", 0, "identify"), call("bob", 1), call("ann", 2)]
        stages.log(*calls)
        planned = stages.planner.next(set())
        assert planned is not None
        assert planned.batch.ids == [c.id for c in calls]
        assert len(planned.requests) == 1
        assert planned.people == {"c:ann", "c:bob"}

    def test_a_busy_person_waits_for_their_request(self, tmp_path: Path) -> None:
        stages = Stages(tmp_path, ScriptedClient(accept_all))
        stages.log(call("ann", 0), call("bob", 1))
        planned = stages.planner.next({"c:ann"})
        assert planned is not None
        assert planned.batch.people == ["c:bob"]

    def test_the_probe_is_one_call(self, tmp_path: Path) -> None:
        stages = Stages(tmp_path, ScriptedClient(accept_all))
        stages.log(call("ann", 0), call("bob", 1))
        planned = stages.planner.next(set(), probe=True)
        assert planned is not None
        assert len(planned.batch) == 1

    def test_a_call_that_goes_alone_keeps_its_persons_order(self, tmp_path: Path) -> None:
        """A Track event over 32 KB goes alone (v1): ann's calls around it keep their
        order (the batch before it is closed), bob's ride with her later ones."""
        stages = Stages(tmp_path, ScriptedClient(accept_all))
        big = call("ann", 1)._replace(data_json='{"pad":"' + "x" * 40_000 + '"}')
        stages.log(call("ann", 0), call("bob", 1), big, call("ann", 3), call("bob", 4))
        planned = stages.planner.next(set())
        assert planned is not None
        assert planned.batch.slow == [2]
        shapes = [(r.indices, r.single is not None) for r in planned.requests]
        assert shapes == [([0, 1], False), ([2], True), ([3, 4], False)]

    def test_an_expired_call_is_set_aside(self, tmp_path: Path) -> None:
        stages = Stages(tmp_path, ScriptedClient(accept_all), max_event_age=3600)
        old = call("ann", 0)._replace(logged_at=NOW - 7200)
        stages.log(old, call("bob", 1))
        result = stages.turn()
        assert result is not None
        assert result.planned.expired[0][1].key == old.id
        letter = stages.store.dead_letters.get(old.id)
        assert letter is not None
        assert letter.error_type == "expired"
        assert len(stages.store) == 0


class TestExchangeAndEffects:
    """What the answers do to the store, the holds and the breaker."""

    def test_one_bad_call_in_a_thousand_is_dead_lettered_alone(self, tmp_path: Path) -> None:
        client = ScriptedClient(refuse_bad)
        stages = Stages(tmp_path, client)
        calls = [call(f"p{n}", n, name="bad" if n == 617 else "ok") for n in range(1000)]
        stages.log(*calls)
        result = stages.turn()
        assert result is not None
        assert len(result.delivered) == 999
        assert [result.planned.batch.ids[i] for i, _ in result.refused] == [calls[617].id]
        assert len(client.sent) <= 21
        assert len(stages.store) == 0
        assert len(stages.store.dead_letters) == 1
        assert stages.breaker.state == CLOSED

    def test_a_storm_of_bare_400s_dead_letters_nothing_and_opens_the_breaker(
        self, tmp_path: Path
    ) -> None:
        storm = [True]

        def answer(items: Sequence[str]) -> Answer:
            if storm[0]:
                return Answer(400, "http_400", "HTTP 400: Bad Request")
            return Answer(200)

        client = ScriptedClient(answer)
        stages = Stages(tmp_path, client, consecutive_failures=5, reset_timeout=30)
        stages.log(*[call(f"p{n}", n) for n in range(110)])
        result = stages.turn()
        assert result is not None
        assert result.refused == []
        assert len(stages.store.dead_letters) == 0
        assert stages.breaker.state == OPEN
        assert len(client.sent) <= 10  # down one side: 1 + log2(110) requests
        assert stages.holds.current() is not None
        # After the storm, the probe closes the breaker and everything goes.
        storm[0] = False
        stages.breaker.open_for(0)
        stages.fake.now += 3600
        while stages.turn() is not None:
            pass
        assert len(stages.store) == 0
        assert len(stages.store.dead_letters) == 0
        assert stages.breaker.state == CLOSED

    def test_a_207_naming_nothing_is_counted_not_resent(self, tmp_path: Path) -> None:
        client = ScriptedClient(lambda items: Answer(207, unmatched_errors=1))
        stages = Stages(tmp_path, client)
        stages.log(*[call(f"p{n}", n) for n in range(5)])
        result = stages.turn()
        assert result is not None
        assert len(result.delivered) == 5
        assert len(stages.store) == 0
        assert len(stages.store.dead_letters) == 0
        assert stages.stats.uncertain == 1
        assert stages.turn() is None
        assert len(client.sent) == 1

    def test_a_failing_dead_letter_write_still_takes_the_delivered_calls_out(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """One call refused, the rest accepted, and the dead-letter store (on the same
        full disk) fails: the accepted calls must still leave the queue, or the next turn
        sends them again. The refused one stays queued (it is sent and refused again)."""

        client = ScriptedClient(refuse_bad)
        stages = Stages(tmp_path, client)
        calls = [call(f"p{n}", n, name="bad" if n == 3 else "ok") for n in range(8)]
        stages.log(*calls)

        def disk_full(*args: object, **kwargs: object) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(InMemoryStore, "add", disk_full)
        with pytest.raises(OSError, match="No space"):
            stages.turn()
        assert len(stages.store) == 1
        assert calls[3].id in stages.store
        monkeypatch.undo()
        before = len(client.sent)
        stages.turn()
        again = [json.loads(item)["name"] for request in client.sent[before:] for item in request]
        assert again == ["bad"], "an accepted call was sent again"

    def test_a_long_retry_after_is_a_hold_and_counts_no_attempt(self, tmp_path: Path) -> None:
        client = ScriptedClient(lambda items: Answer(429, "http_429", "HTTP 429", retry_after=3600))
        stages = Stages(tmp_path, client, max_retry_after=3600)
        first = call("ann", 0)
        stages.log(first)
        stages.turn()
        hold = stages.holds.current()
        assert hold is not None
        assert hold.reason == RETRY_AFTER
        assert hold.seconds == pytest.approx(3600, abs=5)
        queued = stages.store.get(first.id)
        assert queued is not None
        assert (queued.attempts, queued.last_error) == (0, "HTTP 429")

    def test_attempts_run_out_into_a_dead_letter(self, tmp_path: Path) -> None:
        client = ScriptedClient(lambda items: Answer(503, "http_503", "HTTP 503"))
        stages = Stages(tmp_path, client, max_attempts=2, consecutive_failures=50)
        first = call("ann", 0)
        stages.log(first)
        for _ in range(2):
            stages.turn()
            stages.fake.now += 3600
        letter = stages.store.dead_letters.get(first.id)
        assert letter is not None
        assert (letter.error_type, letter.attempts) == ("max_attempts", 2)

    def test_refused_credentials_pause_and_change_nothing(self, tmp_path: Path) -> None:
        client = ScriptedClient(lambda items: Answer(401, "http_401", "HTTP 401"))
        stages = Stages(tmp_path, client)
        first = call("ann", 0)
        stages.log(first)
        stages.turn()
        hold = stages.holds.current()
        assert hold is not None
        assert hold.reason == AUTH_PAUSE
        queued = stages.store.get(first.id)
        assert queued is not None
        assert (queued.attempts, queued.last_error) == (0, None)
        assert stages.stats.delivery_paused == "HTTP 401"

    def test_later_calls_of_a_dead_letters_person_are_noted(self, tmp_path: Path) -> None:
        """What a replay would land behind: the person's calls delivered after it."""

        def answer(items: Sequence[str]) -> Answer:
            refused = {i: "invalid" for i, item in enumerate(items) if '"identify"' in item}
            return Answer(207, item_errors=refused)

        stages = Stages(tmp_path, ScriptedClient(answer))
        identify = call("ann", 0, "identify")
        event, delete = call("ann", 1), call("ann", 2, "delete")
        stages.log(identify, event, delete)
        stages.turn()
        letter = stages.store.dead_letters.get(identify.id)
        assert letter is not None
        assert [(c.call, c.id) for c in letter.later] == [
            ("event", event.id),
            ("delete", delete.id),
        ]
        assert letter.landed_after_a_delete
