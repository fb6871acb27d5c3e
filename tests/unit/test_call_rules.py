"""Person calls at emit, without the network: what each API carries, what is refused
(with the rule named and counted), how calls are stored, and how a delivery groups a
person's calls into requests without reordering them."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cio_logging import (
    CustomerIOHandler,
    cio_delete,
    cio_event,
    cio_identify,
    cio_page,
    cio_screen,
    cio_suppress,
    cio_unsuppress,
)
from cio_logging.errors import InvalidEventError
from cio_logging.events import Event, event_from_record
from cio_logging.store import QueuedEvent, encode_row
from cio_logging.store.rows import decode_row
from cio_logging.transport.batching import Item, plan_requests
from cio_logging.transport.pipelines import call_text, iso_timestamp
from cio_logging.wire import check_for_api


def _record(extra: dict[str, Any], message: str = "msg") -> logging.LogRecord:
    return logging.getLogger("t").makeRecord(
        "t", logging.INFO, "f.py", 1, message, (), None, extra=extra
    )


def _event(extra: dict[str, Any], message: str = "msg") -> Event:
    event = event_from_record(_record(extra, message))
    assert event is not None
    return event


class TestHelpers:
    def test_every_helper_makes_its_call(self) -> None:
        assert _event(cio_identify("u1", plan="pro")).call == "identify"
        assert _event(cio_identify("u1", plan="pro")).name == "identify"
        assert _event(cio_identify("u1", plan="pro")).data == {"plan": "pro"}
        page = _event(cio_page("u1", "/pricing", referrer="x"))
        assert (page.call, page.name, page.data) == ("page", "/pricing", {"referrer": "x"})
        screen = _event(cio_screen(anonymous_id="a1"), message="Home")
        assert (screen.call, screen.name, screen.anonymous_id) == ("screen", "Home", "a1")
        for helper, call in ((cio_delete, "delete"), (cio_suppress, "suppress")):
            made = _event(helper("u2"))
            assert (made.call, made.name, made.customer_id, made.data) == (call, call, "u2", {})
        assert _event(cio_unsuppress(7)).customer_id == "7"
        assert _event(cio_event("u1")).call == "event"

    def test_keys_that_cannot_be_keywords_go_in_the_mapping(self) -> None:
        made = _event(cio_identify("u1", attributes={"id": 3, "name": "Ann"}, plan="pro"))
        assert made.data == {"id": 3, "name": "Ann", "plan": "pro"}
        with pytest.raises(InvalidEventError, match="both in attributes= and as keywords"):
            _event(cio_identify("u1", attributes={"plan": "a"}, plan="b"))

    def test_person_calls_are_essential_and_page_views_are_not(self) -> None:
        essentials = frozenset({"signup"})
        assert _event(cio_identify("u1")).is_essential(essentials)
        assert _event(cio_delete("u1")).is_essential(essentials)
        assert not _event(cio_page("u1", "/")).is_essential(essentials)
        assert _event(cio_page("u1", "signup")).is_essential(essentials)

    def test_an_unknown_call_is_refused(self) -> None:
        with pytest.raises(InvalidEventError, match="unknown call"):
            _event({"cio": {"customer_id": "u1", "call": "transmogrify"}})

    def test_a_call_needs_a_person(self) -> None:
        with pytest.raises(InvalidEventError, match="a identify call needs exactly one"):
            _event(cio_identify())


class TestWhatEachAPICarries:
    """Refused at emit, with a named rule: never sent wrong."""

    @pytest.mark.parametrize(
        ("extra", "api", "rule"),
        [
            (cio_identify(anonymous_id="a1"), "track", "anonymous_person_call"),
            (
                {"cio": {"anonymous_id": "a1", "call": "delete", "data": {}}},
                "pipelines",
                "anonymous_person_call",
            ),
            (cio_identify("u1", bio="x" * 40_000), "track", "call_too_large"),
            (cio_event("u1", bio="x" * 40_000), "pipelines", "call_too_large"),
            (cio_page("u1", "/", bio="é" * 20_000), "pipelines", "call_too_large"),
        ],
    )
    def test_refused(self, extra: dict[str, Any], api: str, rule: str) -> None:
        with pytest.raises(InvalidEventError) as refused:
            check_for_api(_event(extra), api)
        assert refused.value.rule == rule

    @pytest.mark.parametrize(
        ("extra", "api"),
        [
            (cio_identify(anonymous_id="a1"), "pipelines"),
            (cio_page(anonymous_id="a1", name="/"), "track"),  # v1 with type page
            (cio_event("u1", bio="x" * 40_000), "track"),  # v1 takes 100 KB of data
            (cio_page("u1", "/", bio="x" * 40_000), "track"),
            (cio_suppress("u1"), "pipelines"),
        ],
    )
    def test_carried(self, extra: dict[str, Any], api: str) -> None:
        check_for_api(_event(extra), api)

    def test_a_refusal_is_counted_by_its_rule(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        handler = CustomerIOHandler(
            "site", "key", queue_dir=tmp_path / "q", track_url="https://127.0.0.1:9"
        )
        log = logging.getLogger("test_call_rules.refusal")
        log.propagate = False
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        try:
            with caplog.at_level(logging.WARNING, logger="cio_logging"):
                log.info("identify", extra=cio_identify(anonymous_id="a1"))
            status = handler.status()
            assert status["refused"] == {"anonymous_person_call": 1}
            assert status["dropped"] == {"invalid_event": 1}
            assert status["queued"] == 0
            assert "rule anonymous_person_call" in caplog.text
        finally:
            log.removeHandler(handler)
            handler.close()


class TestStoredCalls:
    def test_a_person_call_survives_the_row_format(self) -> None:
        identify = _event(cio_identify("u1", plan="pro"))
        key, due, text, person = encode_row(identify)
        assert person == "c:u1"
        assert text.startswith("[3,")  # the call's row version
        assert decode_row(key, due, text).event == identify

    def test_an_event_keeps_the_row_format_the_previous_release_reads(self) -> None:
        _, _, text, person = encode_row(_event(cio_event(anonymous_id="a9")))
        assert text.startswith("[2,")
        assert person == "a:a9"


def _queued(event: Event) -> QueuedEvent:
    return QueuedEvent(event.id, event, 0, None, None, 0.0)


class TestRequestPlan:
    """A single (a call no batch can carry) never overtakes its person's batched calls."""

    def test_a_single_closes_the_batch_that_holds_its_person(self) -> None:
        first = _queued(_event(cio_event("u1")))
        other = _queued(_event(cio_event("u2")))
        big = _queued(_event(cio_event("u1", bio="x" * 40_000)))
        later = _queued(_event(cio_event("u1")))
        planned = plan_requests(
            [Item(first, {}, 10), Item(other, {}, 10), big, Item(later, {}, 10)], 100
        )
        assert [(p.single, [i.queued.key for i in p.items]) for p in planned] == [
            (False, [first.key, other.key]),
            (True, [big.key]),
            (False, [later.key]),
        ]

    def test_a_single_of_someone_else_does_not_split_a_batch(self) -> None:
        calls = [_queued(_event(cio_event(f"u{n}"))) for n in range(3)]
        anonymous = _queued(_event(cio_event(anonymous_id="a1")))
        planned = plan_requests([Item(calls[0], {}, 1), anonymous, Item(calls[1], {}, 1)], 100)
        assert [len(p.items) for p in planned] == [1, 2]  # the single, then one batch


class TestPipelinesWireForm:
    def test_a_call_is_the_stored_data_spliced_into_the_published_shape(self) -> None:
        event = _event(cio_event("u1", amount=9.99, note="naïve"), message="purchase")
        text = call_text(event)
        assert '"properties":{"amount":9.99,"note":"naïve"}' in text
        assert text.startswith('{"type":"track","userId":"u1","event":"purchase","messageId":')
        assert '"context":{"library":{"name":"cio_logging","version":' in text

    def test_timestamps_keep_the_record_milliseconds(self) -> None:
        event = _event(cio_event("u1"))._replace(timestamp=1_800_000_000, logged_at=1.8e9 + 0.25)
        assert iso_timestamp(event) == "2027-01-15T08:00:00.250Z"
        given = event._replace(timestamp=1_700_000_000)
        assert iso_timestamp(given) == "2023-11-14T22:13:20.000Z"


@pytest.fixture(autouse=True)
def _no_leftover_handlers() -> Iterator[None]:
    yield
    logging.getLogger("test_call_rules.refusal").handlers.clear()
