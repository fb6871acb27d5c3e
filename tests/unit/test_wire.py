"""The wire form of every call, and the size rule both APIs share, with no network:
each call is measured on the bytes that will be sent (multi-byte characters, six-byte
escapes of control characters), accepted at exactly 32,768 and refused at 32,769;
request bodies stay under 500,000 bytes."""

from __future__ import annotations

import json
from typing import Any

import pytest

from cio_logging import cio_event, cio_identify, cio_page, cio_screen
from cio_logging.errors import InvalidEventError
from cio_logging.store import QueuedEvent
from cio_logging.transport.batching import BATCH_BUDGET, Item, plan_requests
from cio_logging.wire import (
    MAX_CALL_BYTES,
    REQUEST_BYTES_LIMIT,
    V1,
    V1_ANONYMOUS,
    V2_BATCH,
    batch_body_size,
    check_for_api,
    pipelines_call,
    track_item,
    track_v1_body,
    utf8_size,
)

from ..helpers import PADDING, event_of, sized


def _identify(padding: str) -> dict[str, Any]:
    return cio_identify("user-ü-1", bio=padding, plan="pro")


def _control_characters(padding: str) -> dict[str, Any]:
    """The issue's case: a name of 100 control characters and an identifier of 150, within
    the limits as logged, each six bytes on the wire."""
    return cio_event("\x02" * 150, name="\x03" * 100, bio=padding)


class TestOneSizeRuleForBothAPIs:
    @pytest.mark.parametrize("api", ["track", "pipelines"])
    @pytest.mark.parametrize("kind", list(PADDING))
    def test_a_call_of_exactly_32_768_bytes_is_taken_and_one_more_is_refused(
        self, api: str, kind: str
    ) -> None:
        check_for_api(sized(_identify, api, MAX_CALL_BYTES, kind), api)
        with pytest.raises(InvalidEventError) as refused:
            check_for_api(sized(_identify, api, MAX_CALL_BYTES + 1, kind), api)
        assert refused.value.rule == "call_too_large"
        assert "32,769 bytes as sent" in str(refused.value)

    def test_escaped_names_and_identifiers_are_counted_as_sent(self) -> None:
        """100 + 150 bytes as logged, 1,500 on the wire: the old estimate missed 1,250."""
        event = sized(_control_characters, "pipelines", MAX_CALL_BYTES)
        assert len(event.name.encode()) == 100
        check_for_api(event, "pipelines")
        with pytest.raises(InvalidEventError):
            check_for_api(sized(_control_characters, "pipelines", MAX_CALL_BYTES + 1), "pipelines")

    def test_the_text_measured_is_the_json_sent(self) -> None:
        """Compact, UTF-8, and what json itself writes: decoding gives the call back."""
        event = event_of(cio_event("user-ü", name="naïve\x01", note="é\x00🎉"))
        item = json.loads(track_item(event))
        assert (item["name"], item["attributes"]) == ("naïve\x01", {"note": "é\x00🎉"})
        call = json.loads(pipelines_call(event))
        assert (call["event"], call["userId"]) == ("naïve\x01", "user-ü")
        body = track_v1_body(event)
        assert body == json.dumps(json.loads(body), ensure_ascii=False, separators=(",", ":"))


class TestRoutes:
    """An identified event or page view too big for a v2 item goes by v1; a screen view
    cannot (v1 takes one only for an anonymous person): refused at emit."""

    def test_events_and_page_views_over_32_kb_go_by_v1(self) -> None:
        event = sized(lambda pad: cio_event("u1", bio=pad), "track", MAX_CALL_BYTES + 1)
        assert check_for_api(event, "track") == V1
        page = sized(lambda pad: cio_page("u1", "/", bio=pad), "track", MAX_CALL_BYTES + 1)
        assert check_for_api(page, "track") == V1
        at_limit = sized(lambda pad: cio_event("u1", bio=pad), "track", MAX_CALL_BYTES)
        assert check_for_api(at_limit, "track") == V2_BATCH

    def test_an_identified_screen_view_over_32_kb_is_refused(self) -> None:
        screen = sized(lambda pad: cio_screen("u1", "feed", bio=pad), "track", MAX_CALL_BYTES + 1)
        with pytest.raises(InvalidEventError) as refused:
            check_for_api(screen, "track")
        assert refused.value.rule == "call_too_large"
        assert "anonymous" in str(refused.value)
        anonymous = event_of(cio_screen(anonymous_id="a1", name="feed", bio="x" * 40_000))
        assert check_for_api(anonymous, "track") == V1_ANONYMOUS

    @pytest.mark.parametrize(
        ("extra", "api", "rule"),
        [
            (cio_identify("u1", createdAt=1_700_000_000), "pipelines", "reserved_attribute"),
            (cio_identify("u1", email=["a@b.c"]), "pipelines", "reserved_attribute"),
            (cio_identify("u1", _update="yes"), "track", "reserved_attribute"),
            (cio_event("u1", recipient=42), "track", "reserved_attribute"),
            (cio_page("u1", "/", keywords="a,b"), "track", "reserved_attribute"),
        ],
    )
    def test_a_key_the_spec_types_must_have_that_type(
        self, extra: dict[str, Any], api: str, rule: str
    ) -> None:
        with pytest.raises(InvalidEventError) as refused:
            check_for_api(event_of(extra), api)
        assert refused.value.rule == rule

    def test_typed_keys_of_the_right_type_pass(self) -> None:
        check_for_api(event_of(cio_identify("u1", createdAt="2026-01-02T03:04:05Z")), "pipelines")
        check_for_api(event_of(cio_event("u1", recipient="a@example.com")), "track")


def _queued(size: int, person: int) -> Item:
    event = event_of(cio_event(f"u{person}"))
    return Item(QueuedEvent(event.id, event, 0, None, None, 0.0), "", size)


class TestRequestBudget:
    def test_the_budget_keeps_every_body_under_500_000_bytes(self) -> None:
        assert batch_body_size([BATCH_BUDGET - 1]) == REQUEST_BYTES_LIMIT - 1

    def test_a_body_of_499_999_bytes_goes_in_one_request_and_one_more_byte_splits(self) -> None:
        sizes = [30_000] * 16
        sizes.append(REQUEST_BYTES_LIMIT - 1 - batch_body_size(sizes) - 1)  # its comma
        assert batch_body_size(sizes) == REQUEST_BYTES_LIMIT - 1
        items = [_queued(size, person) for person, size in enumerate(sizes)]
        assert [len(p.items) for p in plan_requests(items, 1000)] == [17]
        items[-1] = items[-1]._replace(size=items[-1].size + 1)
        assert [len(p.items) for p in plan_requests(items, 1000)] == [16, 1]

    def test_the_body_size_is_the_joined_text(self) -> None:
        texts = ['{"a":1}', '{"é":"\\u0001"}', "{}"]
        body = '{"batch":[' + ",".join(texts) + "]}"
        assert batch_body_size(utf8_size(text) for text in texts) == utf8_size(body)
