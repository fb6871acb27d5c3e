"""The pure record-to-event mapping: tagging, defaults, validation."""

from __future__ import annotations

import datetime as dt
import decimal
import json
import logging
import os
import uuid
from typing import Any

import pytest
from ulid import ULID

from cio_logging import InvalidEventError, cio_event
from cio_logging.errors import UnreadableTagError
from cio_logging.events import Event, carries_tag, event_from_dict, event_from_record


def make_record(
    message: str = "purchase", extra: dict[str, Any] | None = None, args: tuple[Any, ...] = ()
) -> logging.LogRecord:
    logger = logging.getLogger("test.mapping")
    return logger.makeRecord(
        "test.mapping", logging.INFO, "app.py", 12, message, args, None, extra=extra
    )


class TestCioEvent:
    """cio_event builds the extra dict."""

    def test_identified_with_data(self) -> None:
        assert cio_event("user-42", amount=9.99, sku="A-1") == {
            "cio": {"customer_id": "user-42", "data": {"amount": 9.99, "sku": "A-1"}}
        }

    def test_anonymous_and_name(self) -> None:
        assert cio_event(anonymous_id="anon-1", name="viewed") == {
            "cio": {"anonymous_id": "anon-1", "name": "viewed", "data": {}}
        }

    def test_id_and_timestamp_are_the_events_own(self) -> None:
        """id= and timestamp= set the event's id and time, not data keys of those names."""
        given = str(ULID())
        event = event_from_record(
            make_record(extra=cio_event("u", id=given.lower(), timestamp=1_700_000_000, n=1))
        )
        assert event is not None
        assert (event.id, event.timestamp, event.data) == (given, 1_700_000_000, {"n": 1})

    def test_an_id_may_be_a_ulid_object(self) -> None:
        given = ULID()
        event = event_from_record(make_record(extra=cio_event("u", id=given)))
        assert event is not None
        assert event.id == str(given)

    def test_data_keys_named_like_fields_go_through_data(self) -> None:
        """name, id, timestamp (and data) as data keys: through data=, merged with keywords."""
        fields = {"name": "Alice", "id": 7, "timestamp": "yesterday", "data": [1]}
        event = event_from_record(
            make_record("profile_updated", cio_event("user-1", data=fields, plan="pro"))
        )
        assert event is not None
        assert event.name == "profile_updated"
        assert event.data == {**fields, "plan": "pro"}

    def test_a_key_given_twice_is_refused_at_emit_naming_it(self) -> None:
        tag = cio_event("u", data={"plan": "pro", "seats": 1}, plan="basic")  # never raises
        with pytest.raises(InvalidEventError, match=r"'plan' both in data= and as keywords"):
            event_from_record(make_record(extra=tag))

    def test_data_that_is_not_a_mapping_is_refused_at_emit(self) -> None:
        tag = cio_event("u", data=[("plan", "pro")])  # type: ignore[arg-type]
        with pytest.raises(InvalidEventError, match="data= must be a mapping, not list"):
            event_from_record(make_record(extra=tag))


class TestEventFromRecord:
    """Mapping a tagged record, with its defaults."""

    def test_untagged_record_is_not_an_event(self) -> None:
        assert event_from_record(make_record()) is None

    def test_defaults_come_from_the_record(self) -> None:
        record = make_record("bought %s", cio_event("user-42", sku="A-1"), args=("socks",))
        event = event_from_record(record)
        assert event is not None
        assert event.name == "bought socks"
        assert event.customer_id == "user-42"
        assert event.anonymous_id is None
        assert event.timestamp == int(record.created)
        assert event.data == {"sku": "A-1"}
        assert str(ULID.from_str(event.id)) == event.id

    def test_explicit_fields_win(self) -> None:
        event_id = str(ULID())
        record = make_record(
            "ignored",
            {
                "cio": {
                    "customer_id": 42,
                    "name": "signup",
                    "timestamp": 1_764_300_000.7,
                    "id": event_id,
                    "data": {"plan": "pro"},
                }
            },
        )
        event = event_from_record(record)
        assert event is not None
        assert (event.name, event.customer_id, event.timestamp, event.id) == (
            "signup",
            "42",
            1_764_300_000,
            event_id,
        )

    def test_each_record_gets_its_own_ulid(self) -> None:
        ids = {
            event.id
            for event in (event_from_record(make_record(extra=cio_event("u"))) for _ in range(100))
            if event
        }
        assert len(ids) == 100

    def test_datetime_values_become_unix_seconds(self) -> None:
        when = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
        record = make_record(
            extra={
                "cio": {
                    "customer_id": "u",
                    "timestamp": when,
                    "data": {
                        "at": when,
                        "day": dt.date(2026, 1, 2),
                        "price": decimal.Decimal("9.99"),
                        "ref": uuid.UUID(int=1),
                        "tags": {"a"},
                    },
                }
            }
        )
        event = event_from_record(record)
        assert event is not None
        assert event.timestamp == int(when.timestamp())
        assert event.data == {
            "at": int(when.timestamp()),
            "day": "2026-01-02",
            "price": 9.99,
            "ref": str(uuid.UUID(int=1)),
            "tags": ["a"],
        }

    def test_round_trip_through_json(self) -> None:
        event = event_from_record(make_record(extra=cio_event("u", text="zürich ✓")))
        assert event is not None
        assert event_from_dict(json.loads(event.to_json())) == event


class TestValidation:
    """A tag that breaks a rule is refused with a message naming the rule, not the value."""

    @pytest.mark.parametrize(
        ("tag", "words"),
        [
            ({"data": {}}, "exactly one of customer_id and anonymous_id"),
            ({"customer_id": "a", "anonymous_id": "b"}, "exactly one"),
            ({"customer_id": ""}, "must not be empty"),
            ({"customer_id": True}, "string or an integer"),
            ({"customer_id": "x" * 151}, "151 bytes"),
            ({"customer_id": "u", "name": "n" * 101}, "101 bytes"),
            ({"customer_id": "u", "name": ""}, "name must not be empty"),
            ({"customer_id": "u", "name": 5}, "name must be a string"),
            ({"customer_id": "u", "data": [1, 2]}, "data must be a dict"),
            ({"customer_id": "u", "data": {"x": object()}}, "not JSON serializable"),
            ({"customer_id": "u", "data": {"x": float("nan")}}, "Out of range float"),
            ({"customer_id": "u", "data": {"x": float("inf")}}, "Out of range float"),
            ({"customer_id": "u", "data": {"x": b"bytes"}}, "not JSON serializable"),
            ({"customer_id": "u", "data": {"x": "\ud800"}}, "lone surrogate"),
            ({"customer_id": "u", "data": {"x": "y" * 100_000}}, "Customer.io accepts at most"),
            ({"customer_id": "u", "id": "not-a-ulid"}, "not a valid ULID"),
            ({"customer_id": "u", "id": 12}, "ULID string"),
            ({"customer_id": "u", "timestamp": "yesterday"}, "Unix seconds"),
            ({"customer_id": "u", "timestamp": -5}, "outside the range"),
            ({"customer_id": "u", "amount": 5}, "unknown key(s) amount"),
        ],
    )
    def test_refused(self, tag: dict[str, Any], words: str) -> None:
        with pytest.raises(InvalidEventError, match=None) as caught:
            event_from_record(make_record(extra={"cio": tag}))
        assert words in str(caught.value)

    def test_cycle_is_refused(self) -> None:
        data: dict[str, Any] = {}
        data["self"] = data
        with pytest.raises(InvalidEventError, match="Circular reference"):
            event_from_record(make_record(extra=cio_event("u", loop=data)))

    def test_deep_nesting_is_refused(self) -> None:
        data: dict[str, Any] = {}
        inner = data
        for _ in range(100_000):
            inner["x"] = {}
            inner = inner["x"]
        with pytest.raises(InvalidEventError, match="nested too deeply"):
            event_from_record(make_record(extra=cio_event("u", deep=data)))

    def test_tag_must_be_a_dict(self) -> None:
        with pytest.raises(InvalidEventError, match="must be a dict"):
            event_from_record(make_record(extra={"cio": "user-42"}))

    def test_message_never_quotes_the_value(self) -> None:
        with pytest.raises(InvalidEventError) as caught:
            event_from_record(make_record(extra={"cio": {"customer_id": "secret-person" * 20}}))
        assert "secret-person" not in str(caught.value)


class TestTagShapes:
    """Where a tag can sit on a record besides record.cio, and which of those are read."""

    def test_under_record_extra_as_render_to_log_kwargs_leaves_it(self) -> None:
        record = make_record("purchase", extra={"extra": cio_event("u", amount=5)})
        assert carries_tag(record)
        event = event_from_record(record)
        assert event is not None
        assert (event.name, event.customer_id, event.data) == ("purchase", "u", {"amount": 5})

    @pytest.mark.parametrize(
        "event_dict",
        [
            {"event": "purchase", "level": "info", **cio_event("u", amount=5)},
            {"event": "purchase", "level": "info", "extra": cio_event("u", amount=5)},
        ],
        ids=["cio-key", "extra-key"],
    )
    def test_in_an_event_dict_message_named_after_its_event(
        self, event_dict: dict[str, Any]
    ) -> None:
        record = make_record()
        record.msg = event_dict  # as ProcessorFormatter.wrap_for_formatter hands it over
        assert carries_tag(record)
        event = event_from_record(record)
        assert event is not None
        assert (event.name, event.customer_id, event.data) == ("purchase", "u", {"amount": 5})

    def test_an_event_dict_without_a_tag_is_not_an_event(self) -> None:
        record = make_record()
        record.msg = {"event": "plain", "user": "u"}
        assert not carries_tag(record)
        assert event_from_record(record) is None

    @pytest.mark.parametrize(
        "text",
        [
            '{"cio": {"customer_id": "u", "data": {}}, "event": "purchase"}',
            "purchase   cio={'customer_id': 'u', 'data': {}}",
            "event=purchase cio=\"{'customer_id': 'u'}\"",
            "\x1b[1mpurchase\x1b[0m \x1b[36mcio\x1b[0m=\x1b[35m{'customer_id': 'u'}\x1b[0m",
            "purchase extra={'cio': {'customer_id': 'u'}}",
        ],
        ids=["json", "console", "logfmt", "console-colours", "extra"],
    )
    def test_a_tag_rendered_into_the_text_is_reported(self, text: str) -> None:
        record = make_record(text)
        assert carries_tag(record)
        with pytest.raises(UnreadableTagError, match="CioEventRenderer") as caught:
            event_from_record(record)
        assert caught.value.shape == "rendered"
        assert "'u'" not in str(caught.value)

    def test_a_tag_passed_as_the_argument_is_reported(self) -> None:
        record = make_record("purchase", args=(cio_event("u"),))
        assert carries_tag(record)
        with pytest.raises(UnreadableTagError, match=r"extra=cio_event") as caught:
            event_from_record(record)
        assert caught.value.shape == "args"

    @pytest.mark.parametrize(
        "text",
        [
            "plain",
            "cio_logging: flush timed out",
            "precious={1}",
            "cio=5",
            "cio_id: {x}",
            'settings {"cio": {"enabled": true}}',  # a dict, but naming no person
        ],
    )
    def test_text_that_only_mentions_cio_is_not_tagged(self, text: str) -> None:
        record = make_record(text)
        assert not carries_tag(record)
        assert event_from_record(record) is None

    def test_a_mapping_argument_named_cio_that_is_no_tag_is_not_tagged(self) -> None:
        record = make_record("officer: %(cio)s", args=({"cio": "Alice"},))
        assert record.getMessage() == "officer: Alice"
        assert not carries_tag(record)
        assert event_from_record(record) is None

    def test_a_tag_nested_in_its_own_key_says_how_to_fix_it(self) -> None:
        with pytest.raises(InvalidEventError, match=r"pass extra=cio_event\(\.\.\.\), not"):
            event_from_record(make_record(extra={"cio": cio_event("u")}))


def test_event_is_immutable() -> None:
    event = Event("01ARZ3NDEKTSV4RRFFQ69G5FAV", "n", "u", None, "{}", 1, 1.0)
    with pytest.raises(AttributeError):
        event.name = "other"  # type: ignore[misc]


def test_event_ids_are_valid_ulids_and_a_forked_child_never_repeats_the_parents() -> None:
    """The id generator is a seeded PRNG: a child must not continue the parent's stream."""
    from ulid import ULID

    from cio_logging.events import new_event_id

    ids = [new_event_id() for _ in range(1000)]
    assert len(set(ids)) == 1000
    assert all(str(ULID.from_str(event_id)) == event_id for event_id in ids)
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next ids, then leave without clean-up
        try:
            os.write(writer, " ".join(new_event_id() for _ in range(200)).encode())
        finally:
            os._exit(0)
    os.close(writer)
    parent_ids = {new_event_id()[10:] for _ in range(200)}  # the random part
    with os.fdopen(reader) as pipe:
        child_ids = {event_id[10:] for event_id in pipe.read().split()}
    os.waitpid(pid, 0)
    assert len(child_ids) == 200
    assert not parent_ids & child_ids
